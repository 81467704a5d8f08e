"""`trl-retmask` command line, shaped like TRL's `trl` CLI: one subcommand per stage script in
`trl_retmask/scripts/`, each parsed by its own `TrlParser` (so `--help`, `--config file.yaml` and the underscore
flags of the dataclass fields work everywhere).

`trl-retmask train --recipe NAME` starts from a recipe's YAML defaults; with `--accelerate_config NAME|FILE` (or
any other `accelerate launch` argument) it launches the training script through accelerate, as `trl dpo` does.
User errors print one line `trl-retmask <stage>: error: <message>` and exit with 2; bugs keep their traceback.
"""

from __future__ import annotations

import importlib
import sys
from argparse import ArgumentParser

from .scripts import STAGES, config_argv, parse_stage_args, run_stage

TRAIN_MODULE = "trl_retmask.scripts.train"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="trl-retmask",
        allow_abbrev=False,
        description="RetMask: retrieval-head masking + DPO for TRL. `trl-retmask STAGE --help` "
        "lists a stage's arguments.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="STAGE")
    for name, help_text in STAGES.items():
        subparsers.add_parser(name, help=help_text, add_help=False)  # each stage parses its own arguments
    return parser


def _subtract_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """`items` without the ordered `subsequence` (what TRL's CLI does to split launcher from script arguments)."""
    rest, position = [], 0
    for item in items:
        if position < len(subsequence) and item == subsequence[position]:
            position += 1
        else:
            rest.append(item)
    return rest


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """`--accelerate_config NAME|FILE` -> `--config_file PATH`: a file, one of `recipes/accelerate/NAME.yaml`, or
    one of TRL's own configs (`zero2`, `fsdp1`, ...)."""
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    from .scripts.train import accelerate_config_path

    args = list(launch_args)
    if "--accelerate_config" in args:
        index = args.index("--accelerate_config")
        if index + 1 >= len(args):
            raise ValueError("`--accelerate_config` needs a value: a config name or a YAML file.")
        ours = accelerate_config_path(args[index + 1])
        if ours is not None:
            args[index + 1] = str(ours)
    return resolve_accelerate_config_argument(args)


def launch_training(launch_args: list[str], script_args: list[str]) -> None:
    """`accelerate launch <launch_args> -m trl_retmask.scripts.train <script_args>`."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command(launch_command_parser().parse_args([*launch_args, "--module", TRAIN_MODULE, *script_args]))


def train(argv: list[str]) -> None:
    """`trl-retmask train`: in this process, or through accelerate when launcher arguments are given."""
    from .scripts import train as script

    parser = script.make_parser(prog="trl-retmask train", recipe=script.recipe_in(argv))
    with config_argv(argv) as args:
        *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
            args, return_remaining_strings=True, separate_remaining_strings=True
        )
    launch_args = config_remaining + cli_remaining
    if launch_args:
        launch_training(resolve_accelerate_config(launch_args), _subtract_subsequence(argv, cli_remaining))
        return
    script.check_args(*parsed)
    script.main(*parsed)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    rest = argv[argv.index(args.command) + 1 :]
    if args.command == "train":
        return run_stage("train", train, rest)
    module = importlib.import_module(f"trl_retmask.scripts.{args.command}")
    prog = f"trl-retmask {args.command}"
    return run_stage(args.command, lambda: module.main(*parse_stage_args(module.make_parser(prog=prog), rest)))


if __name__ == "__main__":
    sys.exit(main())
