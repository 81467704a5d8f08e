"""NIAH sample building, scoring, resumable sharded running and evaluation under masks."""

import json
import warnings

import pytest
import torch

from tests.tiny import HAYSTACK, NEEDLE, OTHER_NEEDLE, VOCAB, make_tiny_model, make_tiny_tokenizer
from trl_retmask.masking import mask_heads
from trl_retmask.niah import (
    accuracy_grid,
    evaluate_niah,
    generate_answer,
    is_correct,
    plot_accuracy_grid,
    rouge1_recall,
    run_niah_samples,
    score_answer,
)
from trl_retmask.niah_samples import (
    PROMPT_TEMPLATE,
    _locate_needle,
    build_niah_sample,
    build_niah_samples,
    format_prompt,
    load_haystack,
    load_haystacks,
    load_needles,
)

# A needle whose question repeats its lead-in ("the best thing to do in the city"); the answer part follows it.
LEADIN_NEEDLE = {
    "needle": "the best thing to do in the city is to read a story with your mother .",
    "question": "what is the best thing to do in the city ?",
    "real_needle": "read a story with your mother",
}


def make_book_tokenizer(save_dir):
    """The tiny tokenizer, which splits on whitespace only, with the prompt's <book> tags split off as tokens of
    their own (as real tokenizers do): "<book>the" would otherwise be one unknown word."""
    from tokenizers import Regex, models, pre_tokenizers

    tok = make_tiny_tokenizer(save_dir)
    backend = tok.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=False)
    backend.model = models.WordLevel(vocab={**vocab, "<book>": VOCAB - 2, "</book>": VOCAB - 1}, unk_token="<unk>")
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("</?book>"), "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    return tok


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return make_book_tokenizer(tmp_path_factory.mktemp("book_tok"))


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
    bad.write_text(json.dumps(NEEDLE) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"n.jsonl:2 is not valid JSON"):
        load_needles(bad)
    bad.write_bytes(json.dumps(NEEDLE).encode() + b"\n\xff\xfe latin-1 \xe9\n")  # the error named no file
    with pytest.raises(ValueError, match=r"^Needle file .*n\.jsonl is not UTF-8 text \(.*\); save it as UTF-8"):
        load_needles(bad)


def test_large_haystack_is_read_only_as_far_as_needed(tiny_tokenizer, tmp_path):
    (tmp_path / "big.txt").write_text(HAYSTACK * 2000)  # ~200K tokens; the samples need 60
    (tmp_path / "dense.txt").write_text(("x" * 100 + " ") * 300)  # 1 token per 101 characters
    texts = load_haystacks(tmp_path, tokenizer=tiny_tokenizer, max_tokens=60)
    assert len(texts[0]) < 3000 and texts[1] == (tmp_path / "dense.txt").read_text().strip()  # dense: whole file
    samples = build_niah_samples(tiny_tokenizer, [60], [0, 50, 100], [NEEDLE, OTHER_NEEDLE], tmp_path)
    full = load_haystack(tmp_path)
    assert [s.input_ids for s in samples] == [
        build_niah_sample(tiny_tokenizer, full, n, 60, d, needle_index=i).input_ids
        for d in (0, 50, 100)
        for i, n in enumerate([NEEDLE, OTHER_NEEDLE])
    ]


@pytest.mark.parametrize("depth", [0, 50, 100])
def test_sample_places_needle(tiny_tokenizer, depth):
    s = build_niah_sample(tiny_tokenizer, HAYSTACK, NEEDLE, 120, depth)
    # The spans hold exactly the needle's and its answer's tokens; the prompt is (close to) the requested length.
    assert tiny_tokenizer.decode(s.input_ids[s.needle_start : s.needle_end]) == NEEDLE["needle"]
    assert tiny_tokenizer.decode(s.input_ids[s.answer_start : s.answer_end]) == "five"
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


def test_needle_spans_cover_merged_tokens(tiny_tokenizer):
    needle = "the secret number is five ."
    ids, span, answer = _locate_needle(tiny_tokenizer, "a man the secret number is five . end", needle, "five")
    assert span == (2, 8) and answer == (6, 7) and len(ids) == 9
    # "xxthe" is one (unknown) token straddling the needle's start: it belongs to the span, as a boundary token
    # merged with the neighbouring text does in the authors' window search.
    ids, span, answer = _locate_needle(tiny_tokenizer, "a man xxthe secret number is five . end", needle, "five")
    assert span == (2, 8) and answer == (6, 7) and tiny_tokenizer.convert_ids_to_tokens(ids[2]) == "<unk>"
    # The answer is found case-insensitively (the bundled third needle says "because", its answer "Because").
    _, _, answer = _locate_needle(tiny_tokenizer, "a man the secret number is five . end", needle, "Number is")
    assert answer == (4, 6)
    assert _locate_needle(tiny_tokenizer, "a man the secret number is five . end", needle, "six")[2] is None


def test_prompt_is_the_authors(tiny_tokenizer, tmp_path):
    text = PROMPT_TEMPLATE.format(context="C", question="Q")
    assert text == "<book>C</book>\nBased on the content of the book, Question: Q\nAnswer:"
    assert format_prompt(tiny_tokenizer, "C", "Q") == f"<|user|> {text} <|assistant|> "  # the user turn
    thinking = make_tiny_tokenizer(tmp_path / "think")
    thinking.chat_template = (
        "{{ messages[0]['content'] }}{% if enable_thinking is defined and not enable_thinking %}"
        "<think></think>{% endif %}"
    )
    assert format_prompt(thinking, "C", "Q") == text + "<think></think>"  # Qwen3-style: enable_thinking=False
    thinking.chat_template = None
    assert format_prompt(thinking, "C", "Q") == text  # plain-text models: the same text


def test_length_buffer_counts_the_context(tiny_tokenizer):
    """Detection's lengths: context (haystack + needle) = L - buffer tokens; at most buffer + needle: the needle."""
    n_needle = len(tiny_tokenizer(NEEDLE["needle"], add_special_tokens=False)["input_ids"])
    bare = build_niah_sample(tiny_tokenizer, HAYSTACK, NEEDLE, 0, 50, length_buffer=200)
    assert (
        bare.input_ids
        == tiny_tokenizer(
            format_prompt(tiny_tokenizer, NEEDLE["needle"], NEEDLE["question"]), add_special_tokens=False
        )["input_ids"]
    )
    assert (
        build_niah_sample(tiny_tokenizer, HAYSTACK, NEEDLE, 200 + n_needle, 50, length_buffer=200).input_ids
        == bare.input_ids
    )
    for haystack_tokens in (1, 30, 150):  # 150: the ~100-token haystack repeats
        s = build_niah_sample(tiny_tokenizer, HAYSTACK, NEEDLE, 200 + n_needle + haystack_tokens, 50, length_buffer=200)
        assert len(s.input_ids) - len(bare.input_ids) == haystack_tokens
    whole = build_niah_sample(tiny_tokenizer, HAYSTACK, NEEDLE, 120, 50)  # evaluation: the whole prompt
    assert abs(len(whole.input_ids) - 120) <= 2
    with pytest.raises(ValueError, match="window"):
        build_niah_sample(tiny_tokenizer, HAYSTACK, NEEDLE, 800, 50, length_buffer=200, max_length=512)


def test_haystack_per_needle(tiny_tokenizer, tmp_path):
    """Needle i reads haystack file i (the authors' part{i}); False joins the files; None: per needle if several."""
    (tmp_path / "part1.txt").write_text("the man went home . " * 10)
    (tmp_path / "part2.txt").write_text("she said that it was a long day . " * 10)
    needles = [NEEDLE, OTHER_NEEDLE, NEEDLE]

    def words(s):
        return set(tiny_tokenizer.decode(s.input_ids[: s.needle_start]).split()) - {"<|user|>", "<book>"}

    per = build_niah_samples(tiny_tokenizer, [60], [100], needles, tmp_path, haystack_per_needle=None)
    assert [words(s) for s in per] == [
        {"the", "man", "went", "home", "."},
        {"she", "said", "that", "it", "was", "a", "long", "day", "."},
        {"the", "man", "went", "home", "."},
    ]
    joined = build_niah_samples(tiny_tokenizer, [60], [100], needles, tmp_path, haystack_per_needle=False)
    assert words(joined[1]) == {"the", "man", "went", "home", "."}  # the first 60 tokens are all from part1
    (tmp_path / "part2.txt").unlink()
    one = build_niah_samples(tiny_tokenizer, [60], [100], needles, tmp_path, haystack_per_needle=None)
    assert [s.input_ids for s in one] == [
        s.input_ids
        for s in build_niah_samples(tiny_tokenizer, [60], [100], needles, tmp_path, haystack_per_needle=False)
    ]


def test_generation_can_run_past_eos(tiny_tokenizer):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[2] += 5.0  # EOS (id 2) is now the greedy token
    sample = build_niah_sample(tiny_tokenizer, HAYSTACK, NEEDLE, 60, 50)
    assert generate_answer(model, tiny_tokenizer, sample, 12) == [2]
    ran = generate_answer(model, tiny_tokenizer, sample, 12, stop_at_eos=False)
    assert len(ran) == 12 and ran[0] == 2


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


def _records(out, name):
    return [json.loads(line) for p in sorted(out.glob(f"{name}.rank*.jsonl")) for line in p.read_text().splitlines()]


def test_run_niah_samples_resumes_without_redoing(tiny_tokenizer, hay_dir, tmp_path):
    samples = _samples(tiny_tokenizer, hay_dir)
    calls = []

    def fn(s):
        calls.append(s.key)
        if len(calls) == 3 and interrupt:
            raise KeyboardInterrupt  # the job is killed while working on its third sample
        return {"response": "x", "rouge1_recall": 0.0, "correct": False, "value": s.needle_start * 10 + s.needle_index}

    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        run_niah_samples(samples, fn, tmp_path / "run", name="t", fingerprint="a")
    assert len(_records(tmp_path / "run", "t")) == 2
    interrupt, calls = False, []
    resumed = run_niah_samples(samples, fn, tmp_path / "run", name="t", fingerprint="a")
    assert calls == [s.key for s in samples[2:]]  # only the unfinished samples ran
    full = run_niah_samples(samples, fn, None, name="t")
    assert [r["value"] for r in resumed] == [r["value"] for r in full]
    assert [r["key"] for r in resumed] == [s.key for s in samples]
    assert [(r["context_length"], r["depth"], r["prompt_tokens"]) for r in resumed] == [
        (s.context_length, s.depth, len(s.input_ids)) for s in samples
    ]
    with pytest.raises(ValueError, match="another run.*overwrite=True"):
        run_niah_samples(samples, fn, tmp_path / "run", name="t", fingerprint="b")


def _answer_needle(model, tok, sample, max_new_tokens, heads=None):
    """A model that reads the needle perfectly: it answers with the needle's own answer tokens."""
    return tok(sample.answer, add_special_tokens=False)["input_ids"][:max_new_tokens]


@pytest.mark.parametrize("change", ["needles", "haystack", "model", "generation_config", "heads"])
def test_niah_resume_refuses_a_directory_of_other_inputs(tiny_tokenizer, hay_dir, tmp_path, monkeypatch, change):
    """Resuming into a directory made with other needles, another haystack, model, generation settings
    or heads must not reuse its records; it is refused, and `overwrite=True` redoes them."""
    import trl_retmask.niah as niah

    monkeypatch.setattr(niah, "generate_answer", _answer_needle)
    model = make_tiny_model("llama")
    kw = dict(context_lengths=[60], depths=[0, 100], max_new_tokens=4, haystack_dir=hay_dir, output_dir=tmp_path)
    first = evaluate_niah(model, tiny_tokenizer, needles=[NEEDLE], **kw)
    assert first["accuracy"] == 1.0
    other_hay = tmp_path.parent / f"{tmp_path.name}-hay"
    other_hay.mkdir()
    (other_hay / "b.txt").write_text("they found the old house near the sea . " * 12)
    needles, heads = [NEEDLE], None
    if change == "needles":
        needles = [OTHER_NEEDLE]
    elif change == "haystack":
        kw["haystack_dir"] = other_hay
    elif change == "model":
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    elif change == "generation_config":
        model.generation_config.repetition_penalty = 1.2
    else:
        heads = [(0, 1)]
    with pytest.raises(ValueError, match=f"{tmp_path}.*fresh output directory.*overwrite=True"):
        evaluate_niah(model, tiny_tokenizer, needles=needles, heads=heads, **kw)
    redone = evaluate_niah(model, tiny_tokenizer, needles=needles, heads=heads, overwrite=True, **kw)
    fresh = evaluate_niah(model, tiny_tokenizer, needles=needles, heads=heads, **{**kw, "output_dir": None})
    assert [r["response"] for r in redone["records"]] == [r["response"] for r in fresh["records"]]
    assert [r["prompt_tokens"] for r in redone["records"]] == [r["prompt_tokens"] for r in fresh["records"]]
    if change == "needles":
        assert {r["response"] for r in redone["records"]} == {"water"}


def test_niah_output_dir_read_only_when_complete(tiny_tokenizer, hay_dir, tmp_path):
    model = make_tiny_model("llama")
    kw = dict(
        needles=[NEEDLE],
        context_lengths=[60],
        depths=[0, 100],
        max_new_tokens=3,
        haystack_dir=hay_dir,
        output_dir=tmp_path / "ev",
    )
    first = evaluate_niah(model, tiny_tokenizer, **kw)
    files = sorted((tmp_path / "ev").iterdir())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    for p in files + [tmp_path / "ev"]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = evaluate_niah(model, tiny_tokenizer, **kw)
    finally:
        for p in files + [tmp_path / "ev"]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert again["records"] == first["records"]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((tmp_path / "ev").iterdir())} == before


def test_is_correct_is_the_threshold_everywhere():
    assert is_correct("take a walk in the park", "Walk in park!") is False  # recall 0.5 is not above 0.5
    assert score_answer("take a walk in the park", "Walk in park!") == {"rouge1_recall": 0.5, "correct": False}
    assert is_correct("take a walk in the park", "Walk in the park!") is True  # 4/6
    assert is_correct("five", "The number is five.") is True


def test_accuracy_grid_and_plot(tmp_path):
    records = [
        {"context_length": 512, "depth": 0.0, "correct": True},
        {"context_length": 512, "depth": 0.0, "correct": False},
        {"context_length": 1024, "depth": 50.0, "correct": True},
    ]
    grid = accuracy_grid(records)
    assert grid == {(512, 0.0): 0.5, (1024, 50.0): 1.0}
    plot_accuracy_grid(grid, tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_niah_masks_heads(tiny_tokenizer, hay_dir, tmp_path):
    model = make_tiny_model("llama")
    samples = _samples(tiny_tokenizer, hay_dir)[:2]
    heads = [(0, 1), (2, 3)]
    result = evaluate_niah(
        model, tiny_tokenizer, heads=heads, samples=samples, max_new_tokens=6, output_dir=tmp_path / "ev"
    )
    # Independent check: the same greedy answers come from generating under mask_heads by hand.
    for s, rec in zip(samples, result["records"]):
        with mask_heads(model, heads):
            expected = tiny_tokenizer.decode(generate_answer(model, tiny_tokenizer, s, 6), skip_special_tokens=True)
        assert rec["response"] == expected
        assert rec["correct"] == (rouge1_recall(s.answer, expected) > 0.5)
        assert rec["rouge1_recall"] == rouge1_recall(s.answer, expected)
    unmasked = evaluate_niah(model, tiny_tokenizer, samples=samples, max_new_tokens=6)
    assert [r["response"] for r in unmasked["records"]] != [r["response"] for r in result["records"]]
    assert result["num_samples"] == 2
    assert result["accuracy"] == sum(r["correct"] for r in result["records"]) / 2
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
            assert tok.decode(s.input_ids[s.needle_start : s.needle_end]).strip() == needle["needle"]
            answer = tok.decode(s.input_ids[s.answer_start : s.answer_end]).strip()
            assert answer.lower() == needle["real_needle"].lower()  # the third needle: "because" / "Because"
            assert abs(len(s.input_ids) - length) <= 8
    assert torch.tensor(s.input_ids).max() < len(tok)


def test_cli_help_and_niah_run(tiny_tokenizer, hay_dir, tmp_path, capsys):
    from trl_retmask.cli import main

    for command in ("detect", "niah"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--context_lengths" in capsys.readouterr().out
    model_dir = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    assert (
        main(
            [
                "niah",
                "--model_name_or_path",
                str(model_dir),
                "--context_lengths",
                "60",
                "--depths",
                "0",
                "100",
                "--haystack_dir",
                str(hay_dir),
                "--max_new_tokens",
                "3",
                "--heads",
                "0-1,2-3",
                "--output_dir",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_samples"] == 6 and printed["masked_heads"] == 2
    assert sorted(printed["grid"]) == ["60@0", "60@100"]
    assert len(_records(tmp_path / "ev", "niah")) == 6
