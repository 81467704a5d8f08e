"""A real two-process CPU run (gloo) of the smollm2 recipe on a tiny model, through `accelerate launch`.

`accelerate launch --cpu --num_processes 2` hands multi-process CPU runs to `mpirun` (absent here), so the test
launches through torchrun the way accelerate does for GPUs (`--multi_gpu`) with `ACCELERATE_USE_CPU` set: two
processes on the gloo backend.
"""

import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from tests.launch import launch_two_cpu_processes, worker_env
from tests.recipe_utils import (
    PROMPT_TEXTS,
    REPO,
    SELECTED,
    save_tiny_model,
    tiny_overrides,
    write_chat_log,
    write_head_scores,
)


def test_worker_env_keeps_the_parents_import_path(tmp_path, monkeypatch):
    """A worker started like the launcher's (same interpreter, inherited env, other cwd) imports what the parent
    does."""
    extra = tmp_path / "site_extra"
    (extra / "only_here_pkg").mkdir(parents=True)
    (extra / "only_here_pkg" / "__init__.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(extra))  # reachable by the parent only through its sys.path
    monkeypatch.setenv("PYTHONPATH", "/nonexistent/earlier/entry")
    env = worker_env(CUDA_VISIBLE_DEVICES="")
    code = (
        "import only_here_pkg, trl, trl_retmask, os; "
        "print(only_here_pkg.VALUE, os.environ['CUDA_VISIBLE_DEVICES'] == '')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["7", "True"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    assert env["PYTHONPATH"].split(os.pathsep)[-1] == "/nonexistent/earlier/entry"  # kept, not replaced
    # The replaced-PYTHONPATH environment the test used before could not import the parent-only package.
    old = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", "import only_here_pkg"],
        env=old,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "only_here_pkg" in proc.stderr


@pytest.mark.slow
def test_two_process_recipe_run_shares_pairs_and_trains(tmp_path, monkeypatch):
    """...and an `evaluate` on a new in-memory dataset before training (the recipe precomputes reference log-probs)
    works on both ranks: TRL caches those log-probs beside the dataset's files, which an in-memory dataset has in a
    temporary directory of its own on each process, and rank 1 failed to open rank 0's file (FileNotFoundError)."""
    monkeypatch.setenv("RETMASK_TEST_EVALUATE_FIRST", "1")
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_chat_log(tmp_path / "prompts.jsonl", n=len(PROMPT_TEXTS))
    scores = write_head_scores(tmp_path / "scores.json")
    out, reports = tmp_path / "out", tmp_path / "reports"
    recipe_args = tiny_overrides(
        model_dir,
        data,
        scores,
        out,
        "--mask_top_k",
        "2",
        "--niah_eval",
        "False",
        "--detect_heads",
        "False",
        "--generation_batch_size",
        "2",
        "--max_steps",
        "2",
        "--temperature",
        "0.6",
        "--learning_rate",
        "1e-3",
        "--use_cpu",
        "True",
    )
    launch_two_cpu_processes(REPO / "tests" / "distributed_driver.py", reports, *recipe_args, cwd=tmp_path, timeout=170)

    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["num_processes"] == 2 for r in ranks)
    assert all(r["backend"] == "gloo" and r["device"].startswith("cpu") for r in ranks)
    assert all(r["process_group_ended"] for r in ranks)  # the CLI left the group: no abort at interpreter exit
    assert all(not r["evaluate_first"]["precompute_engine_left"] for r in ranks)
    assert ranks[0]["evaluate_first"]["eval_loss"] == ranks[1]["evaluate_first"]["eval_loss"]
    assert math.isfinite(ranks[0]["evaluate_first"]["eval_loss"])

    # Shares: each process generated its own prompts (chosen + rejected call each), none twice, together all of them.
    shares = [Counter(r["generated_prompts"]) for r in ranks]
    assert all(share and set(share.values()) == {2} for share in shares), shares
    assert not set(shares[0]) & set(shares[1])
    assert len(shares[0]) + len(shares[1]) == len(PROMPT_TEXTS)
    generated = {p for share in shares for p in share}
    assert {next(t for t in PROMPT_TEXTS if t in p) for p in generated} == set(PROMPT_TEXTS)

    # All pairs reach both processes: the same full, ordered preference dataset on each rank.
    assert ranks[0]["pairs"] == ranks[1]["pairs"]
    assert ranks[0]["pair_stats"] == ranks[1]["pair_stats"]
    assert ranks[0]["pair_stats"]["prompts"] == len(PROMPT_TEXTS)
    stats = ranks[0]["pair_stats"]
    assert (
        len(ranks[0]["pairs"])
        == stats["kept"]
        == (stats["prompts"] - stats["dropped_identical"] - stats["dropped_empty"])
    )
    assert all(p["chosen"] != p["rejected"] for p in ranks[0]["pairs"])  # only identical pairs are dropped
    assert {p["prompt"][0]["content"] for p in ranks[0]["pairs"]} <= set(PROMPT_TEXTS)
    assert all(r["masked_heads"] == [list(h) for h in SELECTED] for r in ranks)

    # Training ran in lock-step, and the saved model loads and differs from the initial one.
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert ranks[0]["losses"] and all(math.isfinite(x) for x in ranks[0]["losses"])
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(model_dir)
    diffs = [(a - b).abs().max().item() for a, b in zip(trained.state_dict().values(), initial.state_dict().values())]
    assert max(diffs) > 0
    ids = torch.tensor([[1, 10, 20, 30]])
    assert torch.isfinite(trained(ids).logits).all()
    assert (out / "README.md").is_file() and (out / "retmask_recipe_summary.json").is_file()


# ------------------------------------------------------------------------------------------- CPU training memory
MALLOC_SCRIPT = """
import ctypes, sys
sys.path.insert(0, {repo!r})
from trl_retmask.distributed import limit_cpu_training_memory

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
def touched(n):
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    return p
if sys.argv[1] == "limit":
    assert limit_cpu_training_memory("cpu") is True
libc.free(touched(16 << 20))  # glibc's dynamic rule: freeing this mmapped block raises the mmap threshold to 16 MiB
before = rss()
blocks = [touched(1 << 20) for _ in range(201)]
for p in blocks[:-1]:  # the last block, on top of the heap, keeps the freed ones below it from being trimmed
    libc.free(p)
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_cpu_training_memory_returns_freed_blocks_to_the_os(tmp_path, monkeypatch):
    """Measured on glibc itself: after a large free, 200 freed 1 MiB blocks stay resident (heap), but with
    `limit_cpu_training_memory` they are mmapped and go back to the OS on free."""
    script = tmp_path / "malloc.py"
    script.write_text(MALLOC_SCRIPT.format(repo=str(REPO)))
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    kept = {
        mode: int(
            subprocess.run(
                [sys.executable, str(script), mode], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "limit")
    }
    assert kept["default"] >= 150 and kept["limit"] <= 20, kept  # MiB still resident of 200 freed
    # Only on the CPU, and never over the user's own setting.
    from trl_retmask.distributed import limit_cpu_training_memory

    assert limit_cpu_training_memory("cuda") is False and limit_cpu_training_memory(torch.device("mps")) is False
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert limit_cpu_training_memory("cpu") is False


# ------------------------------------------------------------------------------------------- FSDP refusals
def test_niah_eval_and_the_long_context_callback_are_refused_under_fsdp(tmp_path, monkeypatch):
    """After training, NIAH (the train script's `--niah_eval`) and `LongContextEvalCallback` would decode through
    FSDP's sharded forward, whose all-gathers hang when processes decode different samples: refused with the way
    out, before any model loads. Detection and NIAH before training are not concerned (the model is whole then)."""
    from types import SimpleNamespace

    from tests.tiny import make_tiny_tokenizer
    from trl_retmask.evaluation.callback import LongContextEvalCallback
    from trl_retmask.scripts.train import check_niah_under_fsdp

    script = SimpleNamespace(niah_eval=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(ValueError, match=r"^--niah_eval cannot run under FSDP: .* `trl-retmask niah "):
        check_niah_under_fsdp(script, SimpleNamespace(fsdp=""))
    check_niah_under_fsdp(SimpleNamespace(niah_eval=False), SimpleNamespace(fsdp=""))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_niah_under_fsdp(script, SimpleNamespace(fsdp=""))
    with pytest.raises(ValueError, match="cannot run under FSDP"):
        check_niah_under_fsdp(script, SimpleNamespace(fsdp="full_shard"))

    tokenizer = make_tiny_tokenizer(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"^LongContextEvalCallback cannot run under FSDP: .*`trl-retmask eval`"):
        LongContextEvalCallback(SimpleNamespace(is_fsdp_enabled=True, processing_class=tokenizer))


def test_a_failed_stage_leaves_a_gloo_group_and_leaves_an_nccl_group_to_its_destructor(tmp_path):
    """`run_stage`'s failure path tears a gloo group down before exit (left to interpreter exit, its worker threads
    aborted the process in about one run in four: tests/test_shared_disk.py); an NCCL group is not flushed there
    (its `shutdown()` waits on the other ranks, which may never come), its destructor aborts it at exit. In a fresh
    process: the group is the process's own."""
    script = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
import torch.distributed as dist
from trl_retmask.scripts import run_stage

def fail():
    raise ValueError("bad input")

left = {{}}
for backend in ("gloo", "nccl"):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    real = dist.get_backend
    if backend == "nccl":  # no NCCL on a CPU: the group reports it as its backend
        dist.get_backend = lambda group=None: "nccl"
    code = run_stage("pairs", fail)
    dist.get_backend = real
    left[backend] = [code, not dist.is_initialized()]
    if dist.is_initialized():
        dist.destroy_process_group()
print(json.dumps(left))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=worker_env(), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"gloo": [2, True], "nccl": [2, False]}
