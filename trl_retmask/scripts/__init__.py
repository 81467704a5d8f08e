"""One module per `trl-retmask` stage, shaped like `trl/scripts/*.py`: a `@dataclass` of script arguments,
`make_parser(subparsers=None, prog=None)` returning a `TrlParser` (so `--config file.yaml` works), and `main(...)`.
Each also runs as `python -m trl_retmask.scripts.<stage>`.

This module stays light (no torch): `trl-retmask --help` imports only it."""

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGES = {
    "detect": "Detect retrieval heads with needle-in-a-haystack copying (Wu et al.).",
    "heads": "Inspect head scores (sparsity, top heads, heatmap) and select heads to mask.",
    "niah": "Needle-in-a-haystack accuracy (context length x depth), optionally with heads masked.",
    "export": "Save a checkpoint with heads masked in the weights (for vLLM and other weight-only tools).",
    "pairs": "Generate the contrastive pairs only (chosen = model, rejected = heads masked) as JSONL.",
    "train": "Run a recipe end to end: scores (bundled or detected), NIAH before/after, pairs, DPO, save, push.",
    "eval": "Long-context suite (recall, re-ranking, citation), optionally with heads masked.",
}
"""Stage name -> one-line help (the order of `trl-retmask --help`)."""

TRACEBACK_ENV = "TRL_RETMASK_TRACEBACK"
"""Set to 1 to see the traceback of a user error too (the CLI otherwise prints one line)."""


# ------------------------------------------------------------------------------------------------ error path
def is_user_error(error: BaseException) -> bool:
    """Bad input, reported as one line: ValueError/FileNotFoundError raised for it, and ImportErrors that carry an
    install hint. Everything else is a bug and keeps its traceback."""
    if isinstance(error, ImportError):
        return "pip install" in str(error)
    return isinstance(error, (ValueError, FileNotFoundError))


def write_failure_message(failure: OSError) -> str:
    """One line for a failed write (`atomic.write_failure`): the file, the reason and the fix."""
    import errno

    where = failure.filename or "a write failed"
    if failure.errno == errno.ENAMETOOLONG:
        fix = "use a shorter file name"
    elif failure.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some space or write elsewhere, and rerun"
    else:
        fix = "check the permissions of that location or use another, and rerun"
    hint = "" if failure.filename else f" (set {TRACEBACK_ENV}=1 to see where)"
    return f"{where}: {failure.strerror}{hint}; {fix}."


def run_stage(stage: str, fn, *args) -> int:
    """Run `fn(*args)`; a user error prints `trl-retmask <stage>: error: <message>` and returns 2 (argparse's code).
    A write that fails for a reason the user fixes (full disk, read-only place: `atomic.write_failure`) is one too.
    After a success under `accelerate launch`, every process waits for the others and leaves the process group;
    after a failure it leaves at once (`leave_process_group`: the others may never reach a barrier)."""
    from ..atomic import write_failure
    from ..locks import running_stage

    try:
        with running_stage(stage):
            fn(*args)
        if "torch" in sys.modules:  # a stage that ran no torch started no process group
            from ..distributed import end_processes

            _close_vllm_engine()
            end_processes()
    except Exception as error:
        if "torch" in sys.modules:
            from ..distributed import leave_process_group

            _close_vllm_engine()
            leave_process_group()
        failure = write_failure(error)
        if (failure is None and not is_user_error(error)) or os.environ.get(TRACEBACK_ENV, "") in ("1", "true"):
            raise
        message = write_failure_message(failure) if failure else " ".join(str(error).split()) or type(error).__name__
        print(f"trl-retmask {stage}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _close_vllm_engine() -> None:
    """Close the process's vLLM engine, if a stage built one, before the process group goes: left to vLLM's shutdown
    at interpreter exit, it destroys the group again and prints a traceback ("Invalid process group specified") after
    a clean run (`pairs`, `eval`, and `train` when its engine stays through training: online on a CPU)."""
    engines = sys.modules.get("trl_retmask.generation.vllm_engine")  # never imported here: none was built
    if engines is not None:
        engines.close_engine()


# ------------------------------------------------------------------------------------------- parsing guards
MAX_YAML_NODES = 100_000
"""Most values a `--config` / recipe YAML may expand to: anchors and aliases (`*a`) let a 1 kB file expand to
billions of values ("billion laughs"), which the parser would then walk until memory runs out."""


def load_yaml(path, what: str = "Config file"):
    """A YAML file's content, refused with one clear line when missing, malformed or expanding beyond
    `MAX_YAML_NODES` values through aliases (counted on the node graph, without expanding it)."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
    sizes: dict[int, int] = {}

    def size(n, active=()) -> int:
        if id(n) in active:
            raise ValueError(f"{what} {str(path)!r} holds a recursive YAML alias.")
        if id(n) not in sizes:
            children = n.value if isinstance(n.value, list) else []
            items = [c for child in children for c in (child if isinstance(child, tuple) else (child,))]
            sizes[id(n)] = 1 + sum(size(c, (*active, id(n))) for c in items)
            if sizes[id(n)] > MAX_YAML_NODES:
                raise ValueError(
                    f"{what} {str(path)!r} expands to more than {MAX_YAML_NODES} values (YAML aliases); "
                    "write the values out."
                )
        return sizes[id(n)]

    if node is not None:
        size(node)
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@contextmanager
def config_argv(argv) -> Iterator[list[str]]:
    """`argv` for TRL's parser, which reads one `--config FILE` with no limits: every file is checked first
    (`load_yaml`), and several are merged in the order given (a later file's values win, `env` mappings merged
    alike) into one file held in memory (a temporary file, removed after parsing, where the OS has no `memfd`)."""
    argv, rest, files = list(argv), [], []
    i = 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
            i += 2
            continue
        if argv[i].startswith("--config="):
            files.append(argv[i].split("=", 1)[1])
        else:
            rest.append(argv[i])
        i += 1
    configs = [load_yaml(f) for f in files]
    for f, config in zip(files, configs):
        if not isinstance(config, dict):
            raise ValueError(f"Config file {str(f)!r} must hold a YAML mapping of argument names to values.")
    if len(files) <= 1:
        yield rest + (["--config", files[0]] if files else [])
        return
    import tempfile

    import yaml

    merged = {}
    for config in configs:
        env = {**(merged.get("env") or {}), **(config.get("env") or {})}
        merged.update(config)
        if env:
            merged["env"] = env
    text = yaml.safe_dump(merged)
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        # In memory, never on disk: the merged values may hold a secret (`hub_token`), and a file would outlive a
        # kill -9. The parser opens `/proc/self/fd/N` like any path.
        fd = os.memfd_create("trl_retmask_config.yaml")
        try:
            os.write(fd, text.encode("utf-8"))
            yield rest + ["--config", f"/proc/self/fd/{fd}"]
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="trl_retmask_config_", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        yield rest + ["--config", f.name]


def unknown_flag_hint(parser, message: str) -> str:
    """TRL's "arguments are not used" error, with the nearest existing flag for each unknown one."""
    import difflib
    import re

    flags = [f for f in parser._option_string_actions if f.startswith("--")]
    hints = []
    for flag in re.findall(r"'(--[^'=]+)", message):
        close = difflib.get_close_matches("--" + flag[2:].replace("-", "_"), flags, n=1, cutoff=0.6)
        hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    where = " in the config file" if "config file" in message else ""
    return f"unknown arguments{where}: {', '.join(hints)}. `--help` lists the flags." if hints else message


def parse_stage_args(parser, argv=None):
    """`parser.parse_args_and_config(argv)` with the `--config` file checked first and unknown flags answered with
    the nearest existing one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with config_argv(argv) as args:
            return parser.parse_args_and_config(args)
    except ValueError as e:
        if "not used by the HfArgumentParser" in str(e) or "Unknown arguments from config" in str(e):
            raise ValueError(unknown_flag_hint(parser, str(e))) from None
        raise
