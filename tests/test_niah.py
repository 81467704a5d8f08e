"""NIAH sample building, scoring, resumable sharded running and evaluation under masks."""

import json

import pytest
import torch

from tests.tiny import HAYSTACK, NEEDLE, make_tiny_model
from trl_retmask.masking import mask_heads
from trl_retmask.niah import (
    _locate_needle,
    accuracy_grid,
    build_niah_sample,
    build_niah_samples,
    evaluate_niah,
    generate_answer,
    load_haystack,
    load_needles,
    plot_accuracy_grid,
    read_records,
    rouge1_recall,
    run_samples,
)


def test_bundled_data():
    assert len(load_haystack().split()) > 50_000
    needles = load_needles()
    assert len(needles) == 3 and all({"needle", "question", "real_needle"} <= n.keys() for n in needles)


def test_bad_data_files(tmp_path):
    with pytest.raises(ValueError, match="no text"):
        load_haystack(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_haystack(tmp_path / "missing")
    bad = tmp_path / "n.jsonl"
    bad.write_text(json.dumps({"needle": "x"}) + "\n")
    with pytest.raises(ValueError, match="question"):
        load_needles(bad)


@pytest.mark.parametrize("depth", [0, 50, 100])
def test_sample_places_needle(tiny_tokenizer, depth):
    s = build_niah_sample(tiny_tokenizer, HAYSTACK, NEEDLE, 120, depth)
    # The span holds exactly the needle's tokens, and the prompt is (close to) the requested length.
    assert tiny_tokenizer.decode(s.input_ids[s.needle_start:s.needle_end]) == NEEDLE["needle"]
    assert abs(len(s.input_ids) - 120) <= 2
    assert s.answer == "five" and s.key == f"120-{depth}-0"
    # Depth in percent of the haystack; the needle lands at a sentence boundary ("." precedes it).
    frac = s.needle_start / len(s.input_ids)
    assert {0: frac < 0.2, 50: 0.3 < frac < 0.6, 100: frac > 0.6}[depth]
    if depth == 50:
        assert tiny_tokenizer.decode([s.input_ids[s.needle_start - 1]]) == "."


def test_long_context_repeats_haystack_and_window_is_enforced(tiny_tokenizer):
    s = build_niah_sample(tiny_tokenizer, HAYSTACK, NEEDLE, 400, 50)  # the haystack has ~100 tokens
    assert abs(len(s.input_ids) - 400) <= 2
    with pytest.raises(ValueError, match="window"):
        build_niah_sample(tiny_tokenizer, HAYSTACK, NEEDLE, 600, 50, max_length=512)
    with pytest.raises(ValueError, match="longer context"):
        build_niah_sample(tiny_tokenizer, HAYSTACK, NEEDLE, 10, 50)
    with pytest.raises(ValueError, match="depth"):
        build_niah_sample(tiny_tokenizer, HAYSTACK, NEEDLE, 100, 150)


def test_merged_needle_is_refused(tiny_tokenizer):
    # "xxthe" is one (unknown) token straddling the needle's start: the needle is not whole tokens.
    with pytest.raises(ValueError, match="merged"):
        _locate_needle(tiny_tokenizer, "a man xxthe secret number is five . end", "the secret number is five .")
    ids, start, end = _locate_needle(tiny_tokenizer, "a man the secret number is five . end", "the secret number is five .")
    assert (start, end) == (2, 8) and len(ids) == 9


def test_grid_checks_window_before_work(tiny_tokenizer, hay_dir):
    samples = build_niah_samples(tiny_tokenizer, [60, 100], [0, 100], [NEEDLE, NEEDLE], hay_dir)
    assert [s.key for s in samples][:3] == ["60-0-0", "60-0-1", "60-100-0"] and len(samples) == 8
    with pytest.raises(ValueError, match="window"):
        build_niah_samples(tiny_tokenizer, [500], [0], [NEEDLE], hay_dir, max_length=512, max_new_tokens=32)


def test_rouge1_recall_by_hand():
    # reference words: take a walk in the park (6); the prediction contains walk, in, park -> 3/6
    assert rouge1_recall("take a walk in the park", "Walk in park!") == pytest.approx(0.5)
    assert rouge1_recall("five", "The number is five.") == 1.0
    assert rouge1_recall("five", "six") == 0.0


def _samples(tok, hay_dir):
    return build_niah_samples(tok, [60], [0, 50, 100], [NEEDLE, NEEDLE], hay_dir)


def test_run_samples_resumes_without_redoing(tiny_tokenizer, hay_dir, tmp_path):
    samples = _samples(tiny_tokenizer, hay_dir)
    calls = []

    def fn(s):
        calls.append(s.key)
        if len(calls) == 3 and interrupt:
            raise KeyboardInterrupt  # the job is killed while working on its third sample
        return {"value": s.needle_start * 10 + s.needle_index}

    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        run_samples(samples, fn, tmp_path / "run", settings={"a": 1})
    assert len(read_records(tmp_path / "run")) == 2
    interrupt, calls = False, []
    resumed = run_samples(samples, fn, tmp_path / "run", settings={"a": 1})
    assert calls == [s.key for s in samples[2:]]  # only the unfinished samples ran
    full = run_samples(samples, fn, None)
    assert [r["value"] for r in resumed] == [r["value"] for r in full]
    assert [r["key"] for r in resumed] == [s.key for s in samples]
    with pytest.raises(ValueError, match="other settings"):
        run_samples(samples, fn, tmp_path / "run", settings={"a": 2})


def test_accuracy_grid_and_plot(tmp_path):
    records = [{"context_length": 512, "depth": 0.0, "correct": True},
               {"context_length": 512, "depth": 0.0, "correct": False},
               {"context_length": 1024, "depth": 50.0, "correct": True}]
    grid = accuracy_grid(records)
    assert grid == {(512, 0.0): 0.5, (1024, 50.0): 1.0}
    plot_accuracy_grid(grid, tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_niah_masks_heads(tiny_tokenizer, hay_dir, tmp_path):
    model = make_tiny_model("llama")
    samples = _samples(tiny_tokenizer, hay_dir)[:2]
    heads = [(0, 1), (2, 3)]
    result = evaluate_niah(model, tiny_tokenizer, heads=heads, samples=samples, max_new_tokens=6,
                           output_dir=tmp_path / "ev")
    # Independent check: the same greedy answers come from generating under mask_heads by hand.
    for s, rec in zip(samples, result["records"]):
        with mask_heads(model, heads):
            expected = tiny_tokenizer.decode(generate_answer(model, tiny_tokenizer, s, 6), skip_special_tokens=True)
        assert rec["response"] == expected
        assert rec["correct"] == (rouge1_recall(s.answer, expected) > 0.5)
    unmasked = evaluate_niah(model, tiny_tokenizer, samples=samples, max_new_tokens=6)
    assert [r["response"] for r in unmasked["records"]] != [r["response"] for r in result["records"]]
    assert result["num_samples"] == 2 and 0 <= result["accuracy"] <= 1
    assert (tmp_path / "ev" / "niah_grid.png").is_file() and (tmp_path / "ev" / "niah_summary.json").is_file()
    with pytest.raises(ValueError, match="out of range"):
        evaluate_niah(model, tiny_tokenizer, heads=[(9, 0)], samples=samples)


@pytest.mark.real_model
def test_real_tokenizer_needle_spans(smollm2):
    _, tok = smollm2
    haystack = load_haystack()
    for i, needle in enumerate(load_needles()):
        for length, depth in [(512, 0), (1024, 40), (2048, 100)]:
            s = build_niah_sample(tok, haystack, needle, length, depth, needle_index=i)
            assert tok.decode(s.input_ids[s.needle_start:s.needle_end]).strip() == needle["needle"]
            assert abs(len(s.input_ids) - length) <= 8
    assert torch.tensor(s.input_ids).max() < len(tok)


def test_cli_help_and_niah_run(tiny_tokenizer, hay_dir, tmp_path, capsys):
    from trl_retmask.cli import main

    for command in ("detect", "niah"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--context-lengths" in capsys.readouterr().out
    model_dir = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    assert main(["niah", str(model_dir), "--context-lengths", "60", "--depths", "0,100", "--haystack-dir",
                 str(hay_dir), "--max-new-tokens", "3", "--heads", "0-1,2-3", "--output-dir",
                 str(tmp_path / "ev")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_samples"] == 6 and printed["masked_heads"] == 2
    assert sorted(printed["grid"]) == ["60@0", "60@100"]
    assert len(read_records(tmp_path / "ev", "niah")) == 6
