"""What a user can cause gets one line, not a traceback (issue 28 item 6), and published files get ordinary modes
(item 7): a disk that fills while a stage writes, malformed or non-UTF-8 input files, half a preference pair, names
too long for the file system, rows without a prompt, a run that keeps no pair, scores that are not retrieval scores.

The full disk is real: a 64 KiB tmpfs (tests run as root; skipped where mounting is not permitted), filled when the
stage is about to write."""

import errno
import gc
import gzip
import json
import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests.recipe_utils import PROMPT_TEXTS, save_tiny_model, write_chat_log, write_head_scores
from trl_retmask.cli import main
from trl_retmask.scores import HeadScores, bundled_models, bundled_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    return {
        "model": save_tiny_model(root / "model"),
        "data": write_chat_log(root / "prompts.jsonl"),
        "scores": write_head_scores(root / "scores.json"),
    }


def _user_error(capsys, argv) -> str:
    """Exit code 2 and exactly one `trl-retmask <stage>: error:` line on stderr, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("trl-retmask")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"trl-retmask {argv[0]}: error: ")
    return lines[0]


def _no_model_loading(monkeypatch):
    from trl_retmask.scripts import common

    monkeypatch.setattr(common, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded a model"))


# --------------------------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: a real file system that runs out of space."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")
    yield mount
    gc.collect()  # a file object left open by a failed library write keeps the mount busy
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> None:
    """Fill `disk` to the last byte."""
    with open(disk / "filler", "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _left_on(disk: Path) -> list[str]:
    return sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if p.name != "filler" and not p.is_dir())


@pytest.mark.parametrize(
    "case", ["pairs", "heads_plot", "heads_save", "export", "export_weights", "eval_results", "pair_records"]
)
def test_a_full_disk_is_one_line_naming_the_file(case, capsys, tiny, small_disk, tmp_path, monkeypatch):
    """Each stage's output on a disk that fills: one line with the file the user named and the reason; nothing cut
    (and no hidden temporary file) is left there."""
    pairs = [
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
        "4",
        "--generation_batch_size",
        "8",
    ]
    left: list[str] = []
    if case == "pairs":
        fill(small_disk)
        target = small_disk / "pairs.jsonl"
        argv = [*pairs, "--output", str(target), "--output_dir", str(tmp_path / "run")]
    elif case == "pair_records":  # the disk fills while the pair cache appends its first record
        from trl_retmask.store import ResultStore

        append = ResultStore.append

        def filling_append(self, record):
            if not (small_disk / "filler").exists():
                fill(small_disk)
            append(self, record)

        monkeypatch.setattr(ResultStore, "append", filling_append)
        argv = [*pairs, "--output", str(tmp_path / "pairs.jsonl"), "--pairs_cache_dir", str(small_disk / "cache")]
        target = None
    elif case in ("heads_plot", "heads_save"):
        fill(small_disk)
        target = small_disk / ("heads.png" if case == "heads_plot" else "heads.json")
        argv = ["heads", "--plot" if case == "heads_plot" else "--save_heads", str(target)]
    elif case.startswith("export"):
        if case == "export":
            fill(small_disk)  # else: config.json fits, the 570 kB of weights do not (a safetensors error)
        target = small_disk / "masked"
        argv = ["export", "--model_name_or_path", str(tiny["model"]), "--heads", "0-1", "--output_dir", str(target)]
    else:  # eval: the records fit, the disk fills as the results are written
        from trl_retmask.evaluation import suite

        write_json = suite.write_json

        def filling_write_json(path, obj):
            fill(small_disk)
            return write_json(path, obj)

        monkeypatch.setattr(suite, "write_json", filling_write_json)
        target = small_disk / "eval" / "tiny.json"
        argv = ["eval", "--model_name_or_path", str(tiny["model"]), "--lengths", "256", "--n_per_task", "1"]
        argv += ["--categories", "rerank", "--batch_size", "1", "--output_dir", str(target.parent), "--name", "tiny"]
        left = ["eval/.trl_retmask.lock", "eval/tiny.generations.meta.json", "eval/tiny.generations.rank0.jsonl"]
    line = _user_error(capsys, argv)
    assert "no space left on device" in line.lower(), line
    if target is None:  # the first records file (chosen responses), cut at most in its last line (dropped on resume)
        record_files = sorted((small_disk / "cache").glob("*/*.rank0.jsonl"))
        assert len(record_files) == 1 and f"error: {record_files[0]}: " in line, line
        assert all(not p.name.startswith(".") or p.name == ".trl_retmask.lock" for p in small_disk.rglob("*"))
        return
    assert f"error: {target}: " in line, line
    assert _left_on(small_disk) == left


# ------------------------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_published_files_get_the_mode_of_ordinary_files(umask, tmp_path):
    """A library writing through its own 0600 temporary file (safetensors) or creating a 0600 file: what is
    published has the mode `open()` gives under the umask, like every file beside it."""
    from trl_retmask.atomic import atomic_directory, atomic_path

    old = os.umask(umask)
    try:
        ordinary = tmp_path / "ordinary.txt"
        ordinary.write_text("x")
        expected = stat.S_IMODE(ordinary.stat().st_mode)
        with atomic_path(tmp_path / "private.bin") as tmp:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
        with atomic_directory(tmp_path / "checkpoint") as tmp:
            from safetensors.torch import save_file

            save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")
            (tmp / "config.json").write_text("{}")
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "run.sh").write_text("")
            (tmp / "sub" / "run.sh").chmod(0o700)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private.bin").stat().st_mode) == expected
    checkpoint = tmp_path / "checkpoint"
    assert stat.S_IMODE((checkpoint / "model.safetensors").stat().st_mode) == expected
    assert stat.S_IMODE((checkpoint / "config.json").stat().st_mode) == expected
    assert stat.S_IMODE((checkpoint / "sub").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((checkpoint / "sub" / "run.sh").stat().st_mode) == 0o777 & ~umask  # execute bits kept


def test_export_writes_every_file_with_the_same_mode(capsys, tiny, tmp_path):
    """Issue 28 item 7: `export` wrote model.safetensors 0600 beside 0644 files."""
    target = tmp_path / "masked"
    old = os.umask(0o022)
    try:
        assert (
            main(["export", "--model_name_or_path", str(tiny["model"]), "--heads", "0-1", "--output_dir", str(target)])
            == 0
        )
    finally:
        os.umask(old)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in target.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_writes_into_an_existing_directory_get_ordinary_modes_and_leave_other_files(capsys, tiny, tmp_path):
    """`export --overwrite True` replaces a non-empty directory whole (its files all get the ordinary mode); the
    trainer's `save_model` writes through `save_pretrained` in place: the files it writes get the ordinary mode."""
    from tests.tiny import PREFS
    from trl_retmask import RetMaskConfig, RetMaskTrainer

    old = os.umask(0o022)
    try:
        target = tmp_path / "masked"
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        (target / "notes.txt").chmod(0o600)
        argv = ["export", "--model_name_or_path", str(tiny["model"]), "--heads", "0-1", "--output_dir", str(target)]
        assert main([*argv, "--overwrite", "True"]) == 0
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(tiny["model"])
        args = RetMaskConfig(str(tmp_path / "run"), heads="0-1", report_to="none", max_steps=1)
        trainer = RetMaskTrainer(
            model=model, args=args, train_dataset=PREFS, processing_class=AutoTokenizer.from_pretrained(tiny["model"])
        )
        trainer.save_model(str(tmp_path / "trained"))
    finally:
        os.umask(old)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in target.iterdir()}
    assert "notes.txt" not in modes and "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (tmp_path / "trained").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


# ----------------------------------------------------------------------------------------- prompt files
def _script_args(**kw):
    from trl_retmask.scripts.pairs import PairsScriptArguments

    return PairsScriptArguments(output=kw.pop("output", "unused.jsonl"), **kw)


BAD_LINE = '{"prompt": "three",\n'


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    "name,content,where",
    [
        ("p.jsonl", '{"prompt": "one"}\n\n{"prompt": "two"}\n' + BAD_LINE + '{"prompt": "four"}\n', "line 4"),
        ("p.jsonl.gz", '{"prompt": "one"}\n' + BAD_LINE, "line 2"),
        ("p.jsonl", BAD_LINE + '{"prompt": "two"}\n', "line 1"),
        ("p.json", '[\n  {"prompt": "one"},\n  {"prompt": "two"\n]\n', "line 4"),
        ("p.jsonl", b'{"prompt": "one"}\n{"prompt": "caf\xe9"}\n', "line 2 is not UTF-8"),
        ("p.csv", 'prompt,x\n"one,1\ntwo,2,3\n', "p.csv"),
    ],
)
def test_an_unreadable_prompt_file_names_the_file_and_line(tmp_path, name, content, where, streaming):
    path = tmp_path / name
    data = content if isinstance(content, bytes) else content.encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    from trl_retmask.prompts import load_prompts

    with pytest.raises(ValueError) as e:
        load_prompts(_script_args(dataset_name=str(path), dataset_streaming=streaming))
    message = str(e.value)
    assert type(e.value) is ValueError and f"Cannot read prompt file {path}: " in message and where in message


def test_pairs_with_a_malformed_prompt_line_is_one_line(capsys, tiny, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in PROMPT_TEXTS[:2]) + BAD_LINE)
    argv = ["pairs", "--model_name_or_path", str(tiny["model"]), "--dataset_name", str(path)]
    line = _user_error(capsys, [*argv, "--heads", "0-1", "--output", str(tmp_path / "out.jsonl")])
    assert str(path) in line and "line 3 is not valid JSON" in line


def test_rows_without_a_prompt_are_counted_at_warning(tmp_path, caplog):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": None}, {"other": 1}, {"prompt": "kept"}, {"prompt": "  "}, {"prompt": "also kept"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from trl_retmask.prompts import load_prompts

    with caplog.at_level(logging.WARNING, logger="trl_retmask.prompts"):
        prompts = load_prompts(_script_args(dataset_name=str(path)))
    assert [p["prompt"][0]["content"] for p in prompts] == ["kept", "also kept"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 row(s) without a prompt in column 'prompt'" in warnings[0].getMessage()


# ------------------------------------------------------------------------------------- half a preference pair
@pytest.mark.parametrize("present,missing", [("chosen", "rejected"), ("rejected", "chosen")])
def test_half_a_preference_pair_is_refused_up_front(tmp_path, tiny, present, missing):
    """`prompt` + `chosen` without `rejected` ended as `KeyError: 'rejected'` inside TRL."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_retmask import RetMaskConfig, RetMaskTrainer
    from trl_retmask.prompts import load_prompts

    rows = [{"prompt": t, present: "the sea"} for t in PROMPT_TEXTS[:2]]
    path = tmp_path / "half.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=f"`{present}` column but no `{missing}` column.*Accepted: a `prompt`"):
        load_prompts(_script_args(dataset_name=str(path)))
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    args = RetMaskConfig(str(tmp_path / "out"), heads="0-1", report_to="none", max_steps=1)
    with pytest.raises(ValueError, match=f"`train_dataset` has a `{present}` column but no `{missing}`"):
        RetMaskTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


# ------------------------------------------------------------------------------------------ score files
def test_a_non_utf8_score_file_names_the_file(tmp_path):
    path = tmp_path / "scores.json"
    path.write_bytes(b'{"0-0": [0.5], "0-1": [0.\xff]}')
    with pytest.raises(ValueError, match=f"Head-score file {path} is not UTF-8 text \\(byte 0xff at offset 25\\)"):
        HeadScores.load(path)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"0-0": [0.5], "0-1": [-0.25, 0.5]}, "Head '0-1' has a negative retrieval score \\(-0.25\\)"),
        ({"0-0": [1.5, 0.75], "0-1": [0.5]}, "Head '0-0' has a retrieval score .* of 1.125, above 1"),
        ({"0-0": -1, "0-1": [0.5]}, "Head '0-0' has a negative retrieval score \\(-1.0\\)"),
    ],
)
def test_scores_outside_zero_one_are_refused(tmp_path, values, message):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=message):
        HeadScores.load(path)
    with pytest.raises(ValueError, match=message):
        HeadScores(values)


def test_published_scores_are_within_range():
    """A sample may score above 1 (the answer copied twice: the authors' scoring, e.g. 361 samples of Qwen3-8B's
    file), a head's mean never does: every bundled file loads."""
    for name in bundled_models():
        raw = json.loads(bundled_path(name).read_text())
        means = [sum(v) / len(v) for v in raw.values()]
        assert min(min(v) for v in raw.values()) >= 0 and max(means) <= 1
        assert len(HeadScores.load(bundled_path(name)).scores) == len(raw)
    assert HeadScores({"0-0": [1.5, 0.25]}).mean_scores()[(0, 0)] == 0.875


# ---------------------------------------------------------------------------------------- long file names
def test_names_too_long_for_the_file_system_are_refused_before_work(capsys, tiny, tmp_path, monkeypatch):
    """`eval --name` of 300 characters was blamed on "results of another run"; a name that fits but whose derived
    files (`<name>.generations.rank0.jsonl`) do not is refused alike, and so is every other output name."""
    _no_model_loading(monkeypatch)
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    for name in ("n" * 300, "n" * (limit - len(".json"))):
        line = _user_error(capsys, ["eval", "--output_dir", str(tmp_path), "--name", name])
        assert "`name`" in line and f"beyond the {limit} its file system takes; use a shorter name" in line
    long = tmp_path / ("p" * 300 + ".jsonl")
    line = _user_error(capsys, ["pairs", "--model_name_or_path", str(tiny["model"]), "--output", str(long)])
    assert "`output`" in line and "shorter name" in line
    line = _user_error(capsys, ["heads", "--plot", str(tmp_path / ("h" * 300 + ".png"))])
    assert "`plot`" in line and "shorter name" in line
    line = _user_error(capsys, ["export", "--heads", "0-1", "--output_dir", str(tmp_path / ("d" * 300) / "x")])
    assert "`output_dir`" in line and "shorter name" in line
    assert not any(tmp_path.iterdir())


def test_a_long_name_the_file_system_takes_is_written_whole(tmp_path):
    """The hidden temporary name is never longer than the target's own, so a 250-byte name can be written."""
    from trl_retmask.atomic import write_text

    path = tmp_path / ("x" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 6) + ".json")
    write_text(path, "{}")
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and path.read_text() == "{}"


# ------------------------------------------------------------------------------------------ no pair kept
def test_pairs_that_keeps_no_pair_is_refused_like_the_trainer(capsys, tiny, tmp_path):
    """A model whose masked head is already silent answers the same masked or not: every pair is dropped. The
    trainer refuses that; `pairs` exited 0 with an empty file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    silent = tmp_path / "silent"
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 16:32] = 0  # head 1 of layer 0 (head_dim 16)
    model.save_pretrained(silent)
    AutoTokenizer.from_pretrained(tiny["model"]).save_pretrained(silent)
    output = tmp_path / "pairs.jsonl"
    argv = ["pairs", "--model_name_or_path", str(silent), "--dataset_name", str(tiny["data"]), "--heads", "0-1"]
    argv += ["--temperature", "0", "--max_new_tokens", "4", "--output", str(output), "--output_dir", str(tmp_path)]
    line = _user_error(capsys, argv)
    assert f"All {len(PROMPT_TEXTS)} generated pairs of the prompts were dropped ({len(PROMPT_TEXTS)} identical" in line
    assert not output.exists()
