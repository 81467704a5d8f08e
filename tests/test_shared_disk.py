"""Multi-node without a shared disk, on one machine: two gloo processes (two "nodes" of one process each, started
as torchrun starts its workers) that each see a private tmpfs mounted at the same path (`unshare --mount`). Either
both finish with the right result, or both stop at once with the same one line naming the cause; nothing hangs
(every launch has a deadline). The same launches without the private mounts (one disk) still work."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import REPO, free_port, worker_env
from trl_retmask.store import run_resumable

DEADLINE = 240  # seconds for both processes together: a hang fails the test instead of blocking it


def _private_mounts_work() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        return (
            subprocess.run(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                capture_output=True,
                timeout=30,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_private_mounts = pytest.mark.skipif(
    not _private_mounts_work(), reason="needs root and `unshare --mount` (util-linux) to give each process its disk"
)


class Item:
    def __init__(self, i):
        self.i, self.key = i, f"item{i}"


ITEMS = [Item(i) for i in range(7)]
EXPECTED = [{"key": f"item{i}", "value": i * i} for i in range(7)]

STORE_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
from tests.test_shared_disk import ITEMS, EXPECTED
from trl_retmask.distributed import process_state
from trl_retmask.scripts import run_stage
from trl_retmask.store import run_resumable

calls = []

def square(item):
    calls.append(item.i)
    return {{"value": item.i ** 2}}

def main():
    out = run_resumable(ITEMS, square, sys.argv[1], name="t", fingerprint="f", show_progress=False)
    assert out == EXPECTED, out
    print(json.dumps({{"rank": process_state().process_index, "calls": calls}}), flush=True)

code = run_stage("store", main)
import torch.distributed as dist
print("process group left:", not dist.is_initialized(), flush=True)
sys.exit(code)
"""

SAVED_PAIRS_SCRIPT = """
import sys
from types import SimpleNamespace
sys.path.insert(0, {repo!r})
from datasets import Dataset
from trl_retmask.scripts import run_stage
from trl_retmask.trainer import RetMaskTrainer

def main():
    pairs = Dataset.from_dict({{"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", "w"]}})
    saved = RetMaskTrainer._on_shared_disk(None, pairs, SimpleNamespace(pairs_dir=sys.argv[1]))
    assert saved["chosen"] == ["x", "y"] and saved.cache_files, saved
    print("saved pairs ok", flush=True)

code = run_stage("train", main)
import torch.distributed as dist
print("process group left:", not dist.is_initialized(), flush=True)
sys.exit(code)
"""


def run_two_nodes(cmd, tmp_path, private=None, seed_rank0=None, deadline=DEADLINE):
    """Run `cmd` as ranks 0 and 1 of a 2-process gloo job (one process per "node"); with `private`, each in its own
    mount namespace with a fresh tmpfs over that path (rank 0's filled from `seed_rank0`). Returns
    [(returncode, stdout, stderr)] per rank; a process still running at the deadline fails the test (all killed)."""
    port, procs, logs = free_port(), [], []
    for rank in (0, 1):
        env = worker_env(
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            ACCELERATE_USE_CPU="true",
            CUDA_VISIBLE_DEVICES="",
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        argv = [str(a) for a in cmd]
        if private is not None:
            setup = f"mount -t tmpfs tmpfs {shlex.quote(str(private))}"
            if seed_rank0 is not None and rank == 0:
                setup += f" && cp -a {shlex.quote(str(seed_rank0))}/. {shlex.quote(str(private))}/"
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup + ' && exec "$@"', "sh", *argv]
        out, err = open(tmp_path / f"rank{rank}.out", "w+"), open(tmp_path / f"rank{rank}.err", "w+")
        logs.append((out, err))
        procs.append(subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=out, stderr=err, start_new_session=True))
    end = time.monotonic() + deadline
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a process was still running after {deadline} s (a hang): {_texts(logs)}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return [(proc.returncode, *texts) for proc, texts in zip(procs, _texts(logs))]


def _texts(logs):
    texts = []
    for out, err in logs:
        out.seek(0), err.seek(0)
        texts.append((out.read(), err.read()))
    return texts


def assert_both_stop_with_one_line(results, stage: str, reports_group: bool = True) -> str:
    """Every rank exits 2 with the same single `trl-retmask STAGE: error:` line and no traceback, having left the
    process group before exiting: a rank that left it to interpreter exit aborted there in about one run out of
    four (exit -6, "terminate called without an active exception": a gloo worker thread asked for the GIL while
    Python finalized), failing CI although the one line was printed. `reports_group`: the script prints whether it
    left (the test scripts here; the CLI does not)."""
    lines = []
    for code, out, err in results:
        errors = [line for line in err.splitlines() if line.startswith(f"trl-retmask {stage}: error:")]
        assert not reports_group or "process group left: True" in out, (code, out, err[-3000:])
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, out, err[-3000:])
        lines.append(errors[0])
    assert lines[0] == lines[1]
    return lines[0]


def _reports(results) -> list[dict]:
    """What each rank's store script printed (its rank and the items it computed), by rank."""
    found = [json.loads(line) for _, out, _ in results for line in out.splitlines() if line.startswith("{")]
    return sorted(found, key=lambda r: r["rank"])


def _seed(path: Path, items) -> Path:
    """A store directory holding the records of `items` (a run of the same fingerprint that was cut short)."""
    run_resumable(items, lambda it: {"value": it.i**2}, path, name="t", fingerprint="f", show_progress=False)
    return path


# ------------------------------------------------------------------------------------------- resumable stores
@needs_private_mounts
def test_a_store_on_private_disks_stops_both_processes_with_one_line(tmp_path):
    """Only the main process created the directory: rank 1 appended into a path it did not have (a traceback there,
    rank 0 left waiting in the gather)."""
    script = tmp_path / "store.py"
    script.write_text(STORE_SCRIPT.format(repo=str(REPO)))
    disk = tmp_path / "disk"
    disk.mkdir()
    start = time.monotonic()
    results = run_two_nodes([sys.executable, script, disk / "out"], tmp_path, private=disk)
    line = assert_both_stop_with_one_line(results, "store")
    assert f"The t directory {disk / 'out'} is not on a disk shared by all 2 processes" in line
    assert "process(es) 1 (on " in line and "NFS" in line
    assert time.monotonic() - start < DEADLINE / 2
    assert not (disk / "out").exists()  # the private disks went with their processes; nothing on the real one


@needs_private_mounts
def test_a_store_resumed_from_private_disks_stops_both_processes_with_one_line(tmp_path):
    """Each rank read its own node's records: rank 0 saw items 0-3 done, rank 1 none, they shared out different
    lists, and rank 1 ended in a KeyError (its result missed items only rank 0 had)."""
    script = tmp_path / "store.py"
    script.write_text(STORE_SCRIPT.format(repo=str(REPO)))
    seed = _seed(tmp_path / "seed", ITEMS[:4])
    disk = tmp_path / "disk"
    disk.mkdir()
    results = run_two_nodes([sys.executable, script, disk], tmp_path, private=disk, seed_rank0=seed)
    assert "is not on a disk shared by all 2 processes" in assert_both_stop_with_one_line(results, "store")


@needs_private_mounts
def test_a_complete_store_on_the_main_disk_only_is_every_process_result(tmp_path):
    """Nothing to write: the main process's complete records are handed to every process, so rank 1 (which sees an
    empty directory) neither redoes items nor misses any."""
    script = tmp_path / "store.py"
    script.write_text(STORE_SCRIPT.format(repo=str(REPO)))
    seed = _seed(tmp_path / "seed", ITEMS)
    disk = tmp_path / "disk"
    disk.mkdir()
    results = run_two_nodes([sys.executable, script, disk], tmp_path, private=disk, seed_rank0=seed)
    for code, _out, err in results:
        assert code == 0, err[-3000:]
    assert _reports(results) == [{"rank": 0, "calls": []}, {"rank": 1, "calls": []}]


def test_a_store_on_one_disk_works_and_resumes_with_two_processes(tmp_path):
    """The same launch on one disk: a run cut short after items 0-3 is finished by the two processes together,
    each item once, and both return every record."""
    script = tmp_path / "store.py"
    script.write_text(STORE_SCRIPT.format(repo=str(REPO)))
    store = _seed(tmp_path / "store", ITEMS[:4])
    results = run_two_nodes([sys.executable, script, store], tmp_path)
    for code, _out, err in results:
        assert code == 0, err[-3000:]
    reports = _reports(results)
    assert [r["rank"] for r in reports] == [0, 1]
    assert sorted(i for r in reports for i in r["calls"]) == [4, 5, 6]
    assert not list(store.glob(".trl_retmask.shared.*"))  # the probe is removed
    keys = [json.loads(line)["key"] for f in store.glob("t.rank*.jsonl") for line in f.read_text().splitlines()]
    assert sorted(keys) == sorted(it.key for it in ITEMS)  # no item twice


# -------------------------------------------------------------------------------- the trainer's saved pairs
@needs_private_mounts
def test_the_trainers_saved_pairs_on_private_disks_stop_both_processes_with_one_line(tmp_path):
    """`precompute_ref_log_probs` saves the pairs on rank 0 for every rank to read: rank 1 failed alone ("do not
    read back") while rank 0 went on to its next collective."""
    script = tmp_path / "saved.py"
    script.write_text(SAVED_PAIRS_SCRIPT.format(repo=str(REPO)))
    disk = tmp_path / "disk"
    disk.mkdir()
    results = run_two_nodes([sys.executable, script, disk / "pairs"], tmp_path, private=disk)
    line = assert_both_stop_with_one_line(results, "train")
    assert "pair cache (`pairs_cache_dir`)" in line and "precompute_ref_log_probs" in line


def test_the_trainers_saved_pairs_on_one_disk_are_read_by_both(tmp_path):
    script = tmp_path / "saved.py"
    script.write_text(SAVED_PAIRS_SCRIPT.format(repo=str(REPO)))
    results = run_two_nodes([sys.executable, script, tmp_path / "pairs"], tmp_path)
    for code, out, err in results:
        assert code == 0 and "saved pairs ok" in out, err[-3000:]


# ----------------------------------------------------------------------------------------------- train stage
@needs_private_mounts
@pytest.mark.slow
def test_train_on_private_disks_stops_both_processes_before_loading_the_model(tmp_path):
    """`train` found out only when a store opened (detection, NIAH before training) or, with
    `--niah_eval False`, not before the pair cache: now every rank stops with one line before the model loads."""
    from tests.recipe_utils import save_tiny_model, tiny_overrides, write_chat_log, write_head_scores

    model = save_tiny_model(tmp_path / "model")
    data = write_chat_log(tmp_path / "prompts.jsonl")
    scores = write_head_scores(tmp_path / "scores.json")
    disk = tmp_path / "disk"
    disk.mkdir()
    argv = [
        "train",
        "--recipe",
        "smollm2",
        *tiny_overrides(model, data, scores, disk / "out"),
        "--max_steps",
        "1",
        "--niah_context_lengths",
        "96",
        "--niah_depths",
        "50",
        "--niah_max_new_tokens",
        "4",
    ]
    results = run_two_nodes([sys.executable, "-m", "trl_retmask.cli", *argv], tmp_path, private=disk)
    line = assert_both_stop_with_one_line(results, "train", reports_group=False)
    assert f"The `output_dir` {disk / 'out'} is not on a disk shared by all 2 processes" in line
    assert "--niah_eval False" in line
    assert not any("Loading weights" in err for _, _, err in results)


HOLD = """
import sys, time
from trl_retmask.locks import directory_lock
with directory_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_trainers_saved_pairs_in_a_busy_cache_stop_both_processes_with_one_line(tmp_path):
    """Rank 0 saved the pairs inside `main_process_first`: refused there (another run holds the cache), it raised
    before the barrier and rank 1 waited in it for good."""
    script = tmp_path / "saved.py"
    script.write_text(SAVED_PAIRS_SCRIPT.format(repo=str(REPO)))
    cache = tmp_path / "pairs"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(cache)], cwd=REPO, stdout=subprocess.PIPE, text=True, env=worker_env()
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        results = run_two_nodes([sys.executable, script, cache], tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    line = assert_both_stop_with_one_line(results, "train")
    assert f"{cache} is in use by another run (pid {holder.pid} on " in line
