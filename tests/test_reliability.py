"""Files whole or absent, one writer per directory, refusals before the model loads: each case fails on code that
writes in place, has no lock or checks late."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.recipe_utils import save_tiny_model, write_chat_log
from trl_retmask.atomic import atomic_directory, atomic_path, write_text
from trl_retmask.cli import main
from trl_retmask.locks import LOCK_NAME, DirectoryBusyError, directory_lock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliab")
    return {"model": save_tiny_model(root / "model"), "data": write_chat_log(root / "prompts.jsonl")}


def _user_error(capsys, argv) -> str:
    """A user error: exit code 2 and one line on stderr, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("trl-retmask")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _disk_full_after(nbytes: int):
    """A `write` that stores `nbytes` bytes, then fails as a full disk does."""

    def write(f, data):
        f.write(data[:nbytes])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


# ------------------------------------------------------------------------------------------------ atomic files
def test_a_write_cut_short_leaves_no_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    with pytest.raises(OSError, match="No space"):
        with atomic_path(target) as tmp, open(tmp, "w") as f:
            _disk_full_after(10)(f, '{"a": 1, "b": 2, "c": 3}')
    assert list(tmp_path.iterdir()) == []
    write_text(target, "whole")
    assert target.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_file_created_meanwhile_is_kept_without_overwrite(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(FileExistsError):
        with atomic_path(target, overwrite=False) as tmp:
            tmp.write_text("ours")
            target.write_text("the user's")  # appears while this run works
    assert target.read_text() == "the user's" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    with atomic_path(target) as tmp:  # overwrite (the default) replaces it
        tmp.write_text("ours")
    assert target.read_text() == "ours"


def test_a_directory_is_replaced_whole_or_kept(tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    (target / "state.json").write_text("{}")  # a damaged earlier copy
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "state.json").write_text('{"new": 1}')
            raise RuntimeError("killed")
    assert (target / "state.json").read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["ds"]
    with atomic_directory(target) as tmp:
        (tmp / "data.arrow").write_text("rows")
    assert sorted(p.name for p in target.iterdir()) == ["data.arrow"]
    with pytest.raises(FileExistsError):  # without overwrite, a non-empty directory is kept
        with atomic_directory(target, overwrite=False) as tmp:
            (tmp / "x").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["data.arrow"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_a_replaced_directory_is_never_missing_between_its_two_moves(tmp_path, monkeypatch):
    """The old copy was moved aside, then the new one in: a kill between the two renames left nothing at the path
    (the old copy under a hidden name). On Linux the two are swapped in one step: any separate rename is a "kill"
    here, and the path holds the new copy, nothing else left beside it."""
    from trl_retmask.atomic import _exchange

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    if not _exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this file system cannot swap two paths in one step")
    (tmp_path / "a").rmdir(), (tmp_path / "b").rmdir()
    target = tmp_path / "ds"
    target.mkdir()
    (target / "state.json").write_text("old")

    def killed(*args):
        raise RuntimeError("killed between the two renames")

    monkeypatch.setattr(os, "rename", killed)
    with atomic_directory(target) as tmp:
        (tmp / "state.json").write_text("new")
    assert (target / "state.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_figures_and_score_files_are_whole_or_absent(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from trl_retmask import HeadScores
    from trl_retmask.plotting import new_figure, save_figure

    def savefig(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG cut")
        raise OSError(errno.ENOSPC, "No space left on device")

    fig, _ = new_figure()
    monkeypatch.setattr(Figure, "savefig", savefig)
    with pytest.raises(OSError):
        save_figure(fig, tmp_path / "grid.png")
    monkeypatch.setattr(Path, "write_text", lambda *a, **k: pytest.fail("written in place"))
    monkeypatch.setattr("builtins.open", _failing_open(open))
    with pytest.raises(OSError):
        HeadScores({"0-0": [0.5]}, num_layers=1, num_heads=1).save(tmp_path / "scores.json")
    assert list(tmp_path.iterdir()) == []


def _failing_open(real_open):
    def fake(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            f.write("{")
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    return fake


# ------------------------------------------------------------------------------------------------ pairs --output
def _pairs_argv(tiny, output, *extra):
    return [
        "pairs",
        "--model_name_or_path",
        str(tiny["model"]),
        "--dataset_name",
        str(tiny["data"]),
        "--heads",
        "0-1,2-3",
        "--temperature",
        "0",
        "--max_new_tokens",
        "3",
        "--max_prompts",
        "4",
        "--output",
        str(output),
        "--output_dir",
        f"{Path(output).parent}-run",
        *extra,
    ]  # the pair cache, beside the output's directory


def test_pairs_output_cut_by_a_full_disk_is_not_left_behind(tiny, tmp_path, monkeypatch, capsys):
    """A full disk during the JSONL write leaves no cut file, so the rerun is not refused as if it were the user's;
    the user reads one line naming the file (a real full disk: tests/test_user_errors.py)."""
    from datasets import Dataset

    output = tmp_path / "pairs.jsonl"
    real = Dataset.to_json

    def to_json(self, path, **kwargs):
        Path(path).write_text('{"prompt": "cut')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Dataset, "to_json", to_json)
    line = _user_error(capsys, _pairs_argv(tiny, output))
    assert f"error: {output}: No space left on device" in line
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Dataset, "to_json", real)
    assert main(_pairs_argv(tiny, output)) == 0  # no --overwrite needed: nothing of the user's is there
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert rows and all({"prompt", "chosen", "rejected"} <= set(r) for r in rows)


def test_pairs_output_created_during_generation_is_not_replaced(tiny, tmp_path, monkeypatch, capsys):
    import trl_retmask.pairs

    output = tmp_path / "pairs.jsonl"
    real = trl_retmask.pairs.generate_pairs

    def generate_while_someone_writes(*args, **kwargs):
        output.write_text("the user's file\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(trl_retmask.pairs, "generate_pairs", generate_while_someone_writes)
    line = _user_error(capsys, _pairs_argv(tiny, output))
    assert "was created by someone else while the pairs were generated" in line and "--overwrite True" in line
    assert output.read_text() == "the user's file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]  # no temporary left
    assert main(_pairs_argv(tiny, output, "--overwrite", "True")) == 0
    assert output.read_text() != "the user's file\n"


# ------------------------------------------------------------------------------------------------ locks
HOLD = textwrap.dedent("""
    import sys, time
    from trl_retmask.locks import directory_lock
    with directory_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


def _holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_one_does_not_block(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(DirectoryBusyError, match=f"in use by another run \\(pid {proc.pid} on "):
            with directory_lock(tmp_path):
                pytest.fail("two writers")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # left behind by the killed run: it must not block
    with directory_lock(tmp_path):
        with directory_lock(tmp_path):  # reentrant within a process
            pass


WRITE_SLOWLY = textwrap.dedent("""
    import sys, time
    from trl_retmask.scripts import run_stage
    from trl_retmask.store import run_resumable

    class Item:
        def __init__(self, i):
            self.i, self.key = i, f"item{i}"

    def slow(item):
        if item.i == 3:
            print("three done", flush=True)
            time.sleep(600)
        return {"value": item.i ** 2}

    items = [Item(i) for i in range(7)]
    sys.exit(run_stage("niah", lambda: run_resumable(items, slow, sys.argv[1], name="t", fingerprint="f")))
""")


def _setpriv_drops_dac() -> bool:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return False
    probe = subprocess.run(["setpriv", *NO_DAC, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


NO_DAC = ["--bounding-set=-dac_override,-dac_read_search,-fowner"]  # root that file permissions stop


@pytest.mark.skipif(not _setpriv_drops_dac(), reason="needs root and setpriv (util-linux) to drop DAC overrides")
def test_a_lock_that_cannot_be_taken_refuses_the_run(tmp_path):
    """A lock file another account left in a shared directory (not ours to open for writing) meant no lock at all:
    `directory_lock` took EACCES for "read-only directory" and yielded, then both runs wrote their records there
    (duplicates). Each run now refuses with one line, and nothing is written."""
    lock = tmp_path / LOCK_NAME
    lock.write_text("")
    os.chown(lock, 65534, 65534)  # nobody's, mode 0644: readable, not writable by us
    lock.chmod(0o644)
    runs = [
        subprocess.Popen(
            ["setpriv", *NO_DAC, sys.executable, "-c", WRITE_SLOWLY, str(tmp_path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    try:
        outcomes = [run.communicate(timeout=120) for run in runs]
    except subprocess.TimeoutExpired:
        pytest.fail("a run went on writing without the lock")
    finally:
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    for run, (out, err) in zip(runs, outcomes):
        lines = [line for line in err.splitlines() if line.startswith("trl-retmask niah: error:")]
        assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
        assert f"Cannot lock {tmp_path} for writing" in lines[0] and "Permission denied" in lines[0]
        assert "three done" not in out
    assert not list(tmp_path.glob("t.*"))  # no records, no meta file


def test_a_directory_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        with directory_lock(tmp_path / "f"):
            pass


# ---------------------------------------------------------------------------------- refusals before loading
@pytest.fixture
def no_loading(monkeypatch):
    import trl_retmask.models
    import trl_retmask.scripts.common
    import trl_retmask.scripts.train  # imported before the patch, or it would bind the fake loader for good

    monkeypatch.setattr(trl_retmask.models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr("trl_retmask.scripts.common.load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr("trl_retmask.scripts.train.load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded"))


@pytest.mark.parametrize("stage", ["niah", "detect", "eval", "train"])
def test_an_output_dir_that_is_a_file_is_named_before_loading(stage, tiny, tmp_path, capsys, no_loading):
    file = tmp_path / "results"
    file.write_text("a file")
    extra = ["--dataset_name", str(tiny["data"])] if stage == "train" else []
    line = _user_error(capsys, [stage, "--model_name_or_path", str(tiny["model"]), "--output_dir", str(file), *extra])
    assert f"{str(file)!r} is a file, not a directory" in line
    assert "another run" not in line and "--overwrite" not in line  # advice that would not work


@pytest.mark.parametrize(
    "argv",
    [
        ["niah", "--output_dir", "{ro}/sub"],
        ["eval", "--output_dir", "{ro}/sub"],
        ["train", "--output_dir", "{ro}/out"],
        ["train", "--output_dir", "{ro}"],  # exists but cannot be written: training must write there
        ["train", "--output_dir", "{rw}/out", "--pairs_cache_dir", "{ro}/cache"],
        ["pairs", "--output", "{rw}/p.jsonl", "--pairs_cache_dir", "{ro}/cache"],
        ["export", "--output_dir", "{ro}/masked", "--heads", "0-1"],
    ],
)
def test_unwritable_directories_are_refused_before_loading(argv, tiny, tmp_path, capsys, monkeypatch, no_loading):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != ro and real(p, mode, **k))  # root ignores chmod
    argv = [a.format(ro=ro, rw=rw) for a in argv]
    line = _user_error(
        capsys,
        [argv[0], "--model_name_or_path", str(tiny["model"]), "--dataset_name", str(tiny["data"]), *argv[1:]]
        if argv[0] in ("train", "pairs")
        else [argv[0], "--model_name_or_path", str(tiny["model"]), *argv[1:]],
    )
    assert f"{str(ro)!r} is not a writable directory" in line


# ------------------------------------------------------------------------------------------------ parsing
def test_several_config_files_merge_in_order(tmp_path):
    from trl_retmask.scripts import heads, parse_stage_args

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"mask_top_k": 5, "show": 2, "env": {"RETMASK_A": "1", "RETMASK_B": "a"}}))
    b.write_text(yaml.safe_dump({"show": 4, "env": {"RETMASK_B": "b"}}))
    args, selection = parse_stage_args(heads.make_parser(), ["--config", str(a), f"--config={b}"])
    assert (selection.mask_top_k, args.show) == (5, 4)  # b's value wins, a's others stay
    assert (os.environ.pop("RETMASK_A"), os.environ.pop("RETMASK_B")) == ("1", "b")
    args, _ = parse_stage_args(heads.make_parser(), ["--config", str(a), "--config", str(b), "--show", "7"])
    assert args.show == 7  # the command line still wins
    for name in ("RETMASK_A", "RETMASK_B"):
        os.environ.pop(name, None)
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("trl_retmask_config_*"))  # removed after parsing


def test_several_config_files_are_merged_in_memory_never_on_disk(tmp_path, monkeypatch):
    """The merged file was a temporary file: with a `hub_token` in a config it put the secret on disk, where a
    kill -9 during parsing (or a long parse) left it."""
    import tempfile

    from trl_retmask.scripts import config_argv

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"hub_token": "hf_secret_in_a_config", "mask_top_k": 5}))
    b.write_text(yaml.safe_dump({"mask_top_k": 6}))
    with config_argv(["--config", str(a), "--config", str(b)]) as argv:
        merged = Path(argv[argv.index("--config") + 1])
        assert yaml.safe_load(merged.read_text()) == {"hub_token": "hf_secret_in_a_config", "mask_top_k": 6}
        written = [f for f in (tmp_path / "tmp").rglob("*") if f.is_file()]
        assert not written and str(merged).startswith("/proc/self/fd/"), written


def test_several_config_files_reach_train(tmp_path):
    from trl_retmask.scripts.train import parse_args

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"max_new_tokens": 7, "beta": 0.2}))
    b.write_text(yaml.safe_dump({"beta": 0.3}))
    _, training_args, _ = parse_args(["--config", str(a), "--config", str(b), "--output_dir", str(tmp_path / "o")])
    assert (training_args.max_new_tokens, training_args.beta) == (7, 0.3)


@pytest.mark.parametrize("name", ["./prompts-typo.jsonl", "data/prompts.jsonl", "~/nope/prompts", "a/b/c"])
def test_a_missing_local_dataset_is_one_line(name, tiny, capsys, no_loading, tmp_path):
    line = _user_error(
        capsys,
        [
            "pairs",
            "--model_name_or_path",
            str(tiny["model"]),
            "--dataset_name",
            name,
            "--output",
            str(tmp_path / "p.jsonl"),
            "--heads",
            "0-1",
        ],
    )
    assert f"`dataset_name` {name!r}: no such file or directory" in line


# ---------------------------------------------------------------------------------- saved datasets of the pair cache
@pytest.mark.parametrize("damage", ["empty_info", "cut_arrow", "full_disk"])
def test_a_damaged_saved_dataset_of_the_pair_cache_is_saved_again(damage, tiny_tokenizer, tmp_path, monkeypatch):
    """`precompute_ref_log_probs` saves the pairs under the pair cache. A copy cut short (a full disk: an empty
    `dataset_info.json`, a cut `.arrow`) is not trusted: the next run saves it again and trains on the same rows."""
    from datasets import Dataset

    from tests.test_trainer import SCORES, config, prompts
    from tests.tiny import make_tiny_model
    from trl_retmask.trainer import RetMaskTrainer

    def build():
        return RetMaskTrainer(
            model=make_tiny_model("llama"),
            args=config(tmp_path, precompute_ref_log_probs=True),
            train_dataset=prompts(),
            processing_class=tiny_tokenizer,
            head_scores=SCORES,
        )

    pairs_folder = tmp_path / "out" / "_retmask_pairs"
    if damage == "full_disk":
        real = Dataset.save_to_disk

        def save_to_disk(self, path, **kwargs):
            real(self, path, **kwargs)
            (Path(path) / "dataset_info.json").write_text("")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(Dataset, "save_to_disk", save_to_disk)
        with pytest.raises(ValueError, match=r"Cannot save the pairs in .*\(No space left on device\)"):
            build()
        monkeypatch.setattr(Dataset, "save_to_disk", real)
        assert not list(pairs_folder.glob("dataset-*")) and not list(pairs_folder.glob(".dataset-*"))
        first = None
    else:
        first = build().train_dataset
        (saved,) = pairs_folder.glob("dataset-*")
        if damage == "empty_info":
            (saved / "dataset_info.json").write_text("")
        else:
            (arrow,) = saved.glob("data-*.arrow")
            with open(arrow, "r+b") as f:
                f.truncate(arrow.stat().st_size // 2)
    again = build().train_dataset
    (saved,) = pairs_folder.glob("dataset-*")
    assert json.loads((saved / "dataset_info.json").read_text())  # whole again
    if first is not None:
        assert again["chosen"] == first["chosen"] and again["ref_chosen_logps"] == first["ref_chosen_logps"]


# ------------------------------------------------------------------------------------------ resumable stores
RUN_SLOWLY = textwrap.dedent("""
    import sys, time
    from trl_retmask.store import run_resumable

    class Item:
        def __init__(self, i):
            self.i, self.key = i, f"item{i}"

    def slow(item):
        if item.i == 3:
            print("three done", flush=True)
            time.sleep(600)
        return {"value": item.i ** 2}

    run_resumable([Item(i) for i in range(7)], slow, sys.argv[1], name="t", fingerprint="f", show_progress=False)
""")


class Item:
    def __init__(self, i):
        self.i, self.key = i, f"item{i}"


ITEMS = [Item(i) for i in range(7)]


def test_a_second_run_on_a_store_is_refused_and_a_killed_run_resumes(tmp_path):
    """Two runs on one directory both generated everything and appended duplicates: the second is now refused while
    the first runs; after the first is killed (-9) mid-run, the next run resumes its records, lock file or not."""
    from trl_retmask.store import run_resumable

    first = subprocess.Popen(
        [sys.executable, "-c", RUN_SLOWLY, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    calls = []

    def square(item):
        calls.append(item.i)
        return {"value": item.i**2}

    try:
        assert first.stdout.readline().strip() == "three done"
        with pytest.raises(DirectoryBusyError, match=f"in use by another run \\(pid {first.pid} on "):
            run_resumable(ITEMS, square, tmp_path, name="t", fingerprint="f")
        assert calls == []
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    out = run_resumable(ITEMS, square, tmp_path, name="t", fingerprint="f")
    assert out == [{"key": f"item{i}", "value": i * i} for i in range(7)]
    assert calls == [3, 4, 5, 6]  # 0-2 finished before the kill
    lines = (tmp_path / "t.rank0.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["key"] for line in lines) == [f"item{i}" for i in range(7)]  # no duplicates


def test_a_complete_store_is_read_without_taking_the_lock(tmp_path):
    from trl_retmask.store import run_resumable

    run_resumable(ITEMS, lambda it: {"value": it.i}, tmp_path, name="t", fingerprint="f")
    proc = _holder(tmp_path)  # another run holds the directory: reading a complete result still works
    try:
        assert len(run_resumable(ITEMS, lambda it: pytest.fail("redone"), tmp_path, name="t", fingerprint="f")) == 7
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_store_in_a_file_says_so(tmp_path):
    """`niah(output_dir=F)` where F is a file said "holds niah results of another run ... pass --overwrite True",
    and following that advice gave a FileExistsError traceback."""
    from trl_retmask.store import run_resumable

    (tmp_path / "F").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is a file, not a directory"):
            run_resumable(ITEMS, lambda it: {}, tmp_path / "F", name="niah", fingerprint="f", overwrite=overwrite)


@pytest.mark.parametrize("meta", ["missing", "unreadable", "empty"])
def test_the_pair_cache_redoes_a_damaged_meta_file_instead_of_refusing(meta, tmp_path):
    """An unreadable `chosen.meta.json` in the pair cache could not be overridden at all (`pairs`/`train` had no way
    to pass `--overwrite` to it): the cache's directories are named by their fingerprint, so it is damage, redone."""
    from trl_retmask.store import run_resumable

    run_resumable(ITEMS, lambda it: {"value": -1}, tmp_path, name="chosen", fingerprint="f", cache=True)
    path = tmp_path / "chosen.meta.json"
    if meta == "missing":
        path.unlink()
    else:
        path.write_text("" if meta == "empty" else "{not json")
    with pytest.warns(UserWarning, match="discarded and their items redone"):
        out = run_resumable(ITEMS, lambda it: {"value": it.i}, tmp_path, name="chosen", fingerprint="f", cache=True)
    assert [r["value"] for r in out] == list(range(7))
    with pytest.raises(ValueError, match="holds chosen results of another run"):  # outside the cache: refused
        path.write_text("{not json")
        run_resumable(ITEMS, lambda it: {"value": it.i}, tmp_path, name="chosen", fingerprint="f")


# ------------------------------------------------------------------------------------------ the model's window
def test_pairs_refuse_an_absurd_max_new_tokens_before_generating(tiny, tmp_path, capsys, monkeypatch):
    """`pairs --max_new_tokens 1000000000` ran until killed (and the static backend sizes its cache from it)."""
    from trl_retmask.generation import GenerateBackend

    monkeypatch.setattr(GenerateBackend, "__call__", lambda *a, **k: pytest.fail("generated"))
    line = _user_error(capsys, _pairs_argv(tiny, tmp_path / "p.jsonl", "--max_new_tokens", "1000000000"))
    assert "max_new_tokens=1000000000 leaves no room for a prompt in the model's window of 512 tokens" in line
    assert not (tmp_path / "p.jsonl").exists()


def test_pairs_and_the_trainer_refuse_prompts_beyond_the_window(tiny_tokenizer, tmp_path, monkeypatch):
    """A ~650-token prompt on a 512-token model generated past the window with only transformers' warning."""
    from datasets import Dataset

    from tests.test_trainer import SCORES, config
    from tests.tiny import make_tiny_model
    from trl_retmask.generation import GenerateBackend
    from trl_retmask.pairs import generate_pairs
    from trl_retmask.trainer import RetMaskTrainer

    model = make_tiny_model("llama")
    long_prompt = " ".join(["the"] * 508)
    prompts = ["tell me a story", long_prompt, "the sea"]
    n = len(tiny_tokenizer(text=long_prompt)["input_ids"])  # how DPOTrainer tokenizes a string prompt
    assert 506 < n < 512
    monkeypatch.setattr(GenerateBackend, "__call__", lambda *a, **k: pytest.fail("generated"))
    message = (
        rf"The longest prompt \({n} tokens\) \+ 6 new tokens exceeds the model's window of 512 tokens "
        r"\(prompt 1; 1 of 3 prompts do not fit\); drop or shorten the longest prompts"
    )
    with pytest.raises(ValueError, match=message):
        generate_pairs(model, tiny_tokenizer, prompts, [(0, 1)], max_new_tokens=6, show_progress=False)
    with pytest.raises(ValueError, match=message):
        RetMaskTrainer(
            model=model,
            args=config(tmp_path),
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tiny_tokenizer,
            head_scores=SCORES,
        )
    room = 512 - n
    monkeypatch.undo()
    pairs = generate_pairs(model, tiny_tokenizer, prompts, [(0, 1)], max_new_tokens=room, show_progress=False)
    assert len(pairs.chosen) == 3  # the prompt and its new tokens may fill the window exactly


def test_generate_batch_checks_every_batch_against_the_window(tiny_tokenizer):
    from tests.tiny import make_tiny_model
    from trl_retmask.generation import generate_batch, make_generation_config

    model = make_tiny_model("llama", max_position_embeddings=16)
    with pytest.raises(
        ValueError,
        match=r"The longest prompt \(12 tokens\) \+ 5 new tokens exceeds the model's "
        r"window of 16 tokens \(row 1",
    ):
        generate_batch(model, tiny_tokenizer, [[5] * 3, [5] * 12], make_generation_config(model, 5))
    assert len(generate_batch(model, tiny_tokenizer, [[5] * 3, [5] * 12], make_generation_config(model, 4))) == 2


def test_the_suite_checks_prompt_and_answer_budget_against_the_window(tiny_tokenizer):
    from tests.tiny import make_tiny_model
    from trl_retmask.evaluation.suite import _encode, build_suite, generate_suite

    samples = build_suite(tiny_tokenizer, (256,), ["recall"], 1, 0)
    need = max(
        len(ids) + s["max_new_tokens"]
        for ids, s in zip(_encode(tiny_tokenizer, [s["prompt"] for s in samples]), samples)
    )
    model = make_tiny_model("llama", max_position_embeddings=need - 1)  # every prompt fits; one answer budget not
    with pytest.raises(ValueError, match=rf"new tokens exceeds the model's window of {need - 1} tokens"):
        generate_suite(model, tiny_tokenizer, samples)


def test_a_second_pairs_run_on_one_cache_is_refused_and_resumes_after_a_kill(tiny_tokenizer, tmp_path):
    """Two identical pair runs on one cache both generated everything and appended duplicates (8 lines for 4
    batches). With the first run holding the cache, the second is refused; once the first is gone, the next run
    redoes only the missing batch."""
    from tests.tiny import make_tiny_model
    from trl_retmask.pairs import generate_pairs

    model = make_tiny_model("llama")
    prompts = [
        "tell me a story",
        "the man said",
        "what is the sea",
        "the old house",
        "she went home",
        "they found the",
        "the secret number is",
        "a long day",
    ]
    kw = dict(temperature=0.0, max_new_tokens=3, batch_size=2, cache_dir=tmp_path, show_progress=False)
    first = generate_pairs(model, tiny_tokenizer, prompts, [(0, 1), (2, 3)], **kw)
    (store,) = [d for d in tmp_path.iterdir() if d.is_dir() and not d.name.startswith("chosen-")]
    records = store / "pairs.rank0.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    records.write_text("".join(lines[:-1]))  # the last batch is missing: a run would write here
    proc = _holder(store)
    try:
        with pytest.raises(DirectoryBusyError, match=f"{store} is in use by another run \\(pid {proc.pid} on "):
            generate_pairs(model, tiny_tokenizer, prompts, [(0, 1), (2, 3)], **kw)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    again = generate_pairs(model, tiny_tokenizer, prompts, [(0, 1), (2, 3)], **kw)
    assert (again.chosen, again.rejected) == (first.chosen, first.rejected)
    assert again.stats.batches_generated == 1 and len(records.read_text().splitlines()) == 4


# ----------------------------------------------------------------------------------------- interrupted overwrite
EVAL_UNTIL_KILLED = textwrap.dedent("""
    import sys, time
    import trl_retmask.evaluation.suite as suite
    from trl_retmask.cli import main

    real, calls = suite.generate_batch, []

    def two_then_wait(*args, **kwargs):
        if len(calls) == 2:  # two records stored (each is appended once its batch returns)
            print("two stored", flush=True)
            time.sleep(600)
        calls.append(1)
        return real(*args, **kwargs)

    suite.generate_batch = two_then_wait
    sys.exit(main(sys.argv[1:]))
""")


def test_an_interrupted_eval_overwrite_leaves_no_old_results_beside_new_records(tiny, tmp_path, capsys):
    """`eval --eval_seed 1 --overwrite True` over a finished seed-0 directory, killed (-9) after 2 records, left
    seed 0's `tiny.json`/`tiny.png` beside seed 1's partial records: a result that no record set supports. The old
    run is now discarded whole before the new one writes; the interrupted one then resumes to seed 1's result."""
    out = tmp_path / "eval"
    argv = ["eval", "--model_name_or_path", str(tiny["model"]), "--lengths", "128", "--categories", "rerank"]
    argv += ["--n_per_task", "4", "--batch_size", "1", "--output_dir", str(out), "--name", "tiny"]
    assert main(argv) == 0
    assert json.loads((out / "tiny.json").read_text())["config"]["seed"] == 0 and (out / "tiny.png").is_file()
    capsys.readouterr()
    run = subprocess.Popen(
        [sys.executable, "-c", EVAL_UNTIL_KILLED, *argv, "--eval_seed", "1", "--overwrite", "True"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert run.stdout.readline().strip() == "two stored"
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert not (out / "tiny.json").exists() and not (out / "tiny.png").exists()
    assert len((out / "tiny.generations.rank0.jsonl").read_text().splitlines()) == 2
    # the directory is seed 1's alone: a run without the seed is refused in one line, the seed-1 run resumes
    assert "holds tiny.generations results of another run" in _user_error(capsys, argv)
    assert main([*argv, "--eval_seed", "1"]) == 0
    assert json.loads((out / "tiny.json").read_text())["config"]["seed"] == 1 and (out / "tiny.png").is_file()
    keys = [json.loads(line)["key"] for line in (out / "tiny.generations.rank0.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 4  # the 2 kept records were not redone


def test_an_interrupted_detection_overwrite_leaves_no_old_scores(tiny_tokenizer, hay_dir, monkeypatch, tmp_path):
    """The same for detection: an overwrite cut short left the old run's `retmask_head_scores.json` (which
    `--head_scores DIR` reads), `head_scores.json`, its plots and summary beside the new records."""
    from tests.test_detection import OTHER, _forced_detect
    from tests.tiny import make_tiny_model
    from trl_retmask.detection import DETECTION_OUTPUTS

    model = make_tiny_model("qwen2")
    out = tmp_path / "detect"
    _forced_detect(model, tiny_tokenizer, hay_dir, out, monkeypatch).save_pretrained(out)  # as the stages do
    assert all((out / name).is_file() for name in DETECTION_OUTPUTS)
    with pytest.raises(KeyboardInterrupt):
        _forced_detect(
            model, tiny_tokenizer, hay_dir, out, monkeypatch, needles=(OTHER,), overwrite=True, calls=[], fail_after=2
        )
    assert [name for name in DETECTION_OUTPUTS if (out / name).exists()] == []
    assert len((out / "detect.rank0.jsonl").read_text().splitlines()) == 2


def test_an_interrupted_niah_overwrite_leaves_no_old_accuracy(tiny_tokenizer, hay_dir, monkeypatch, tmp_path):
    import trl_retmask.niah as niah
    from tests.test_niah import NEEDLE, _answer_needle
    from tests.tiny import make_tiny_model
    from trl_retmask.niah import evaluate_niah

    monkeypatch.setattr(niah, "generate_answer", _answer_needle)
    model = make_tiny_model("llama")
    kw = dict(needles=[NEEDLE], context_lengths=[60], depths=[0, 50, 100], max_new_tokens=4, haystack_dir=hay_dir)
    evaluate_niah(model, tiny_tokenizer, output_dir=tmp_path, **kw)
    assert (tmp_path / "niah_summary.json").is_file() and (tmp_path / "niah_grid.png").is_file()
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _answer_needle(*args, **kwargs)

    monkeypatch.setattr(niah, "generate_answer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_niah(model, tiny_tokenizer, heads=[(0, 1)], output_dir=tmp_path, overwrite=True, **kw)
    assert not (tmp_path / "niah_summary.json").exists() and not (tmp_path / "niah_grid.png").exists()
    assert len((tmp_path / "niah.rank0.jsonl").read_text().splitlines()) == 1
