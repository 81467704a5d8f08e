"""The resumable sharded runner and the JSON cache."""

import json
import warnings
from pathlib import Path

import pytest

from tests.launch import launch_two_cpu_processes
from trl_retmask.store import cached_json, run_resumable

REPO = Path(__file__).resolve().parents[1]
HEADS = [(0, 1), (1, 2), (2, 0)]


class Item:
    def __init__(self, i):
        self.i, self.key = i, f"item{i}"


ITEMS = [Item(i) for i in range(7)]


def square(item):
    return {"value": item.i**2}


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    calls = []

    def dies_at_4(item):
        calls.append(item.i)
        if len(calls) == 4 and interrupt:
            raise KeyboardInterrupt
        return square(item)

    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        run_resumable(ITEMS, dies_at_4, tmp_path, name="t", fingerprint="f")
    interrupt, calls = False, []
    resumed = run_resumable(ITEMS, dies_at_4, tmp_path, name="t", fingerprint="f")
    assert calls == [3, 4, 5, 6]
    assert (
        resumed
        == run_resumable(ITEMS, square, None, name="t")
        == [{"key": f"item{i}", "value": i * i} for i in range(7)]
    )


def test_other_fingerprint_is_refused_or_redone_with_overwrite(tmp_path):
    run_resumable(ITEMS, square, tmp_path, name="t", fingerprint="f", info={"needles": ["a"]})
    with pytest.raises(
        ValueError,
        match=f"{tmp_path} holds t results of another run.*needles differ.*fresh output directory.*overwrite=True",
    ):
        run_resumable(ITEMS, square, tmp_path, name="t", fingerprint="g", info={"needles": ["b"]})
    calls = []
    redone = run_resumable(
        ITEMS, lambda it: calls.append(it.i) or {"value": -it.i}, tmp_path, name="t", fingerprint="g", overwrite=True
    )
    assert calls == list(range(7)) and [r["value"] for r in redone] == [-i for i in range(7)]
    assert json.loads((tmp_path / "t.meta.json").read_text())["fingerprint"] == "g"
    # Records without their metadata cannot be trusted either.
    (tmp_path / "t.meta.json").unlink()
    with pytest.raises(ValueError, match="t.meta.json is missing or unreadable"):
        run_resumable(ITEMS, square, tmp_path, name="t", fingerprint="g")


def test_a_matching_fingerprint_is_resumed_even_with_overwrite_and_a_bare_meta_file_is_refused(tmp_path):
    run_resumable(ITEMS, square, tmp_path / "a", name="t", fingerprint="f")
    # same run: records reused, overwrite or not (overwrite discards only another run's records)
    assert run_resumable(ITEMS, _never, tmp_path / "a", name="t", fingerprint="f", overwrite=True) == run_resumable(
        ITEMS, square, None, name="t"
    )
    # another run's metadata alone (no records yet) is refused too: the directory belongs to that run
    run_resumable([], square, tmp_path / "b", name="t", fingerprint="f")
    assert not list((tmp_path / "b").glob("t.rank*.jsonl"))
    with pytest.raises(ValueError, match="another run"):
        run_resumable(ITEMS, square, tmp_path / "b", name="t", fingerprint="g")


def _never(item):
    raise AssertionError(f"{item.key} was recomputed")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_fields", "unknown_key", "binary"])
def test_damaged_records_are_named_and_redone(tmp_path, damage):
    run_resumable(ITEMS, square, tmp_path, name="t", fingerprint="f")
    path = tmp_path / "t.rank0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    if damage == "truncated":  # kill -9 while writing the last line
        path.write_text("".join(lines[:-1]) + lines[-1][:9])
    elif damage == "garbage":
        path.write_text("".join(lines[:2]) + "{not json\n" + "".join(lines[3:]))
    elif damage == "wrong_fields":
        path.write_text("".join(lines[:2]) + json.dumps({"key": "item2", "valu": 4}) + "\n" + "".join(lines[3:]))
    elif damage == "unknown_key":
        path.write_text("".join(lines[:2]) + json.dumps({"key": "item99", "value": 4}) + "\n" + "".join(lines[3:]))
    else:
        path.write_bytes(b"\x00\xff\xfe\x80 PK garbage" + b"\n" + "".join(lines[3:]).encode())
    calls = []

    def redo(item):
        calls.append(item.i)
        return square(item)

    if damage == "truncated":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an expected outcome of a kill: no warning
            out = run_resumable(ITEMS, redo, tmp_path, name="t", fingerprint="f", verify=lambda it, r: "value" in r)
    else:
        with pytest.warns(UserWarning, match=f"{path}: 1 unusable record"):
            out = run_resumable(ITEMS, redo, tmp_path, name="t", fingerprint="f", verify=lambda it, r: "value" in r)
    assert calls == {"truncated": [6], "binary": [0, 1, 2]}.get(damage, [2])
    assert out == run_resumable(ITEMS, square, None, name="t")
    with warnings.catch_warnings():  # repaired: read cleanly, nothing redone
        warnings.simplefilter("error")
        assert run_resumable(ITEMS, _never, tmp_path, name="t", fingerprint="f") == out


def test_read_only_complete_directory_is_read_without_writing(tmp_path):
    out = tmp_path / "out"
    first = run_resumable(ITEMS, square, out, name="t", fingerprint="f")
    paths = [out, *out.iterdir()]
    before = {p: (p.stat().st_mtime_ns, None if p.is_dir() else p.read_bytes()) for p in paths}
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        again = run_resumable(ITEMS, _never, out, name="t", fingerprint="f")
    finally:
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert again == first
    # Also as root (whom chmod does not stop): nothing was touched.
    assert {p: (p.stat().st_mtime_ns, None if p.is_dir() else p.read_bytes()) for p in [out, *out.iterdir()]} == before


def test_duplicate_keys_are_refused():
    with pytest.raises(ValueError, match="distinct keys"):
        run_resumable([Item(1), Item(1)], square, None, name="t")


SHARD_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_store import ITEMS, square
import torch
from trl_retmask.distributed import end_processes, process_state
from trl_retmask.store import run_resumable

out = run_resumable(ITEMS, square, sys.argv[1], name="t", fingerprint="f")
assert out == [{{"key": f"item{{i}}", "value": i * i}} for i in range(7)], out
rank = process_state().process_index
end_processes()
assert not torch.distributed.is_initialized()
end_processes()  # a no-op once the group is gone
print(f"rank {{rank}} ok", flush=True)  # one write: the two ranks share stdout
"""


def test_two_processes_equal_one(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT.format(repo=str(REPO)))
    proc = launch_two_cpu_processes(script, tmp_path / "out")
    assert proc.stdout.count(" ok") == 2
    files = sorted(p.name for p in (tmp_path / "out").glob("t.rank*.jsonl"))
    assert files == ["t.rank0.jsonl", "t.rank1.jsonl"]
    # Each item was done once, by one process; one process resumes from both files without redoing anything.
    lines = [json.loads(line) for f in files for line in (tmp_path / "out" / f).read_text().splitlines()]
    assert sorted(r["key"] for r in lines) == sorted(it.key for it in ITEMS)
    assert run_resumable(ITEMS, _never, tmp_path / "out", name="t", fingerprint="f") == run_resumable(
        ITEMS, square, None, name="t"
    )


# ------------------------------------------------------------------------------------------------ JSON cache
def test_cached_json(tmp_path):
    path = tmp_path / "r.json"
    calls = []

    def compute():
        calls.append(1)
        return {"x": len(calls)}

    assert cached_json(path, "f", compute) == {"x": 1}
    assert cached_json(path, "f", compute) == {"x": 1} and len(calls) == 1
    with pytest.raises(ValueError, match=f"{path} holds a result of other inputs.*overwrite=True"):
        cached_json(path, "g", compute)
    assert cached_json(path, "g", compute, overwrite=True) == {"x": 2}
    path.write_text('{"x": 2, "fingerp')
    with pytest.warns(UserWarning, match=f"{path} is unreadable"):
        assert cached_json(path, "g", compute) == {"x": 3}
