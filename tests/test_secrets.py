"""No secret on disk or in a message: a run given `--hub_token` leaves that string in no file it writes (outputs,
checkpoints, caches, lock side files) and in nothing it prints; the lock's side file names the holder without its
command line."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import worker_env
from tests.recipe_utils import save_tiny_model, tiny_overrides, write_chat_log, write_head_scores
from trl_retmask.locks import OWNER_NAME, DirectoryBusyError, directory_lock

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_SECRETnever0n0disk7f3a9c"


def _files_holding(root: Path, secret: str) -> list[str]:
    """Every file under `root` whose bytes hold `secret` (binary files too: a pickle stores a str as is)."""
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes())


HOLD = """
import sys, time
from trl_retmask.locks import directory_lock
with directory_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lock_names_its_holder_without_the_command_line(tmp_path):
    """The side file stored `sys.argv` (a `--hub_token` included), world-readable and kept after `kill -9`, and the
    "in use" message of another run showed it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), "--hub_token", SECRET],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        owner = json.loads((tmp_path / OWNER_NAME).read_text())
        assert set(owner) == {"pid", "host", "started", "stage"} and owner["pid"] == proc.pid
        assert owner["stage"] == "-c"  # the program, never its arguments
        with pytest.raises(DirectoryBusyError) as refused:
            with directory_lock(tmp_path):
                pytest.fail("two writers")
        assert f"pid {proc.pid} on " in str(refused.value) and str(refused.value).endswith("another directory.")
        assert SECRET not in str(refused.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _files_holding(tmp_path, SECRET) == []  # what a kill -9 leaves holds no secret either


def test_the_stage_is_named_when_the_cli_runs_it(tmp_path, monkeypatch):
    from trl_retmask.locks import run_name
    from trl_retmask.scripts import run_stage

    names = []
    monkeypatch.setattr(sys, "argv", ["/usr/bin/trl-retmask", "pairs", "--hub_token", SECRET])
    assert run_stage("pairs", lambda: names.append(run_name())) == 0
    monkeypatch.setattr(sys, "argv", ["recipes/llama31.py", "--hub_token", SECRET])
    assert run_stage("train", lambda: names.append(run_name())) == 0  # a recipe runs the train stage
    names.append(run_name())  # outside a stage: the program only
    monkeypatch.setattr(sys, "argv", ["trl-retmask", SECRET.lower()])  # a first argument that is a value
    names.append(run_name())
    assert names == ["trl-retmask pairs", "llama31.py train", "llama31.py", "trl-retmask"]


@pytest.mark.slow
def test_a_training_run_given_a_hub_token_writes_and_prints_it_nowhere(tmp_path):
    """`train --hub_token T`: T was pickled into `training_args.bin` (the final model's and every checkpoint's, by
    transformers' `Trainer._save`). Every file under the output and cache directories and everything printed is
    searched for T, with the stages that record settings on (NIAH stores, the pair cache, checkpoints, the card,
    the recipe summary, logs)."""
    model = save_tiny_model(tmp_path / "model")
    data = write_chat_log(tmp_path / "prompts.jsonl")
    scores = write_head_scores(tmp_path / "scores.json")
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = [
        "train",
        "--recipe",
        "smollm2",
        *tiny_overrides(model, data, scores, out),
        "--mask_top_k",
        "2",
        "--hub_token",
        SECRET,
        "--pairs_cache_dir",
        str(cache),
        "--max_steps",
        "1",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
        "--logging_steps",
        "1",
        "--log_level",
        "info",
        "--niah_context_lengths",
        "96",
        "--niah_depths",
        "50",
        "--niah_max_new_tokens",
        "4",
    ]
    env = worker_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    env.pop("HF_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-m", "trl_retmask.cli", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "training_args.bin").is_file() and list(out.glob("checkpoint-*/training_args.bin"))
    assert (out / "niah_before" / "niah.meta.json").is_file() and any(cache.iterdir())
    assert _files_holding(out, SECRET) == [] and _files_holding(cache, SECRET) == []
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    # The arguments saved beside the model still load, with the token dropped and the rest kept.
    import torch

    saved = torch.load(out / "training_args.bin", weights_only=False)
    assert saved.hub_token is None and saved.output_dir == str(out) and saved.mask_top_k == 2
    assert os.path.samefile(saved.pairs_cache_dir, cache)


def test_the_training_arguments_pickle_and_print_without_secrets():
    """Pickled (what `Trainer._save` writes as `training_args.bin`), printed or serialised, the arguments hold no
    secret, nested ones included; in-memory copies keep them (`push_to_hub` reads `hub_token`)."""
    import copy
    import pickle

    from trl_retmask import RetMaskConfig

    args = RetMaskConfig(
        output_dir="out", hub_token=SECRET, report_to=[], model_init_kwargs={"token": SECRET, "dtype": "float32"}
    )
    for shown in (pickle.dumps(args), args.to_json_string(), str(args), repr(args), str(args.to_sanitized_dict())):
        assert (SECRET.encode() if isinstance(shown, bytes) else SECRET) not in shown
    loaded = pickle.loads(pickle.dumps(args))
    assert loaded.hub_token is None and loaded.model_init_kwargs == {"token": None, "dtype": "float32"}
    assert loaded.output_dir == "out" and loaded.pad_token == args.pad_token  # a tokenizer's token is no secret
    for copied in (copy.copy(args), copy.deepcopy(args)):
        assert copied.hub_token == SECRET and copied.model_init_kwargs["token"] == SECRET
    assert args.hub_token == SECRET and args.model_init_kwargs["token"] == SECRET
