"""Retrieval-head detection: the authors' scoring loop re-implemented independently, argmax recording against eager
attention, hand-computed scores, span boundaries, resume, sharding."""

import inspect
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import trl_retmask.detection as detection
from tests.launch import launch_two_cpu_processes
from tests.test_niah import LEADIN_NEEDLE, make_book_tokenizer
from tests.tiny import NEEDLE, make_greedy, make_tiny_model
from tests.tiny import OTHER_NEEDLE as OTHER
from trl_retmask.detection import (
    DETECTION_PRESETS,
    copy_scores,
    detect_retrieval_heads,
    last_row_argmax,
    record_attention_argmax,
)
from trl_retmask.generation import make_generation_config
from trl_retmask.niah import generate_answer
from trl_retmask.niah_samples import NIAHSample, build_niah_samples

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return make_book_tokenizer(tmp_path_factory.mktemp("book_tok"))


def forced_generation(
    tokenizer, answers: dict, calls: list | None = None, fail_after: int | None = None, on_sample=None
):
    """A `generate_answer` that runs the real model forward passes but emits the given answer text per needle
    (`answers[needle_index]`, or `answers(sample)`)."""

    def generate(model, tok, sample, max_new_tokens, heads=None, *, stop_at_eos=True):
        if calls is not None:
            calls.append(sample.key)
            if fail_after is not None and len(calls) > fail_after:
                raise KeyboardInterrupt  # killed mid-run
        if on_sample is not None:
            on_sample(sample)
        text = answers(sample) if callable(answers) else answers[sample.needle_index]
        target = tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
        ids = torch.tensor([sample.input_ids])
        p = ids.shape[1]
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=make_generation_config(model, len(target)),
            prefix_allowed_tokens_fn=lambda _, x: [target[len(x) - p]],
        )
        return out[0, p:].tolist()

    return generate


def test_copy_scores_by_hand():
    sequence = torch.tensor([5, 6, 7, 8, 9, 10, 6, 7, 99])
    generated = torch.tensor([6, 7, 99])  # sequence[6:] = prompt (6 tokens) + generated
    span = (1, 4)  # needle tokens 6, 7, 8
    positions = torch.tensor(
        [  # [steps, layers=1, heads=4]
            [[1, 6, 2, 0]],  # step 0 (generates 6): head0 copies; head1 points at a 6 outside the needle; head2 at a 7
            [[2, 7, 2, 2]],  # step 1 (generates 7): head0, head2, head3 copy; head1 points at a 7 outside the needle
            [[1, 8, 3, 8]],  # step 2 (generates 99): nobody copies (99 is not in the needle)
        ]
    )
    expected = torch.tensor([[2 / 3, 0.0, 1 / 3, 1 / 3]])
    assert torch.allclose(copy_scores(positions, generated, sequence, span), expected)


def test_copy_span_boundaries():
    """`start <= pos < end`: a hit at start and at end-1 counts, at end and at start-1 does not."""
    sequence = torch.tensor([7, 7, 7, 7, 7, 0, 7])  # every prompt position holds the generated token 7
    generated = torch.tensor([7])
    positions = torch.tensor([[[1, 2, 3, 4]]])  # heads point at start-1, start, end-1, end
    scores = copy_scores(positions, generated, sequence, (2, 4))
    assert scores.tolist() == [[0.0, 0.5, 0.5, 0.0]]  # worth 1/(end - start) each


def test_copy_span_at_the_ends_of_the_sequence():
    """Spans touching position 0 and the last position: hits there count like anywhere else."""
    sequence = torch.tensor([4, 5, 6, 4, 5])
    generated = torch.tensor([4, 5])
    positions = torch.tensor([[[0, 3, 4, 1]], [[1, 4, 0, 4]]])  # [steps=2, layers=1, heads=4]
    for span in ((0, 2), (3, 5)):
        expected = [
            [
                sum(
                    span[0] <= int(positions[t, 0, h]) < span[1]
                    and int(sequence[positions[t, 0, h]]) == int(generated[t])
                    for t in range(2)
                )
                / (span[1] - span[0])
                for h in range(4)
            ]
        ]
        assert copy_scores(positions, generated, sequence, span).tolist() == expected
    assert copy_scores(positions, generated, sequence, (0, 2)).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert copy_scores(positions, generated, sequence, (3, 5)).tolist() == [[0.0, 1.0, 0.0, 0.5]]


@pytest.mark.parametrize("mask_kind", ["none", "2d", "4d_bool", "4d_float"])
def test_last_row_argmax_matches_a_per_head_loop(mask_kind):
    """Batch of 2, GQA (4 query heads on 2 KV heads), one padded key per row placed where the logit is largest:
    every mask form excludes it; the result equals an explicit per-head loop."""
    torch.manual_seed(0)
    b, hq, hkv, q_len, kv, d = 2, 4, 2, 3, 6, 8
    query, key = torch.randn(b, hq, q_len, d), torch.randn(b, hkv, kv, d)
    logits = torch.stack([torch.stack([key[i, h // 2] @ query[i, h, -1] for h in range(hq)]) for i in range(b)])
    padded = [int(logits[0, 0].argmax()), int(logits[1, 3].argmax())]  # row i hides its head's favourite key
    keep = torch.ones(b, kv, dtype=torch.bool)
    for i, j in enumerate(padded):
        keep[i, j] = False
    mask = {
        "none": None,
        "2d": keep.long(),
        "4d_bool": keep[:, None, None, :].expand(b, 1, q_len, kv),
        "4d_float": torch.where(keep, 0.0, float("-inf"))[:, None, None, :].expand(b, 1, q_len, kv),
    }[mask_kind]
    expected = torch.tensor(
        [
            [
                int(
                    torch.where(
                        keep[i] if mask is not None else torch.ones(kv, dtype=torch.bool), logits[i, h], float("-inf")
                    ).argmax()
                )
                for h in range(hq)
            ]
            for i in range(b)
        ]
    )
    got = last_row_argmax(query, key, mask)
    assert torch.equal(got, expected)
    if mask is not None:
        assert got[0, 0] != padded[0] and got[1, 3] != padded[1]


# ------------------------------------------------------------------------ the authors' loop, independently
def authors_scores(
    model,
    tokenizer,
    prompt_ids: list[int],
    real_needle: str,
    output_ids: list[int],
    span: tuple[int, int] | None = None,
) -> list[list[float]]:
    """Their `find_needle_idx` + `decode` + `retrieval_calculate` (YoumiMa/RetMask, retrieval_head_detection.py):
    eager attention with `output_attentions`, prefill all but the last prompt token, then one step per output token
    feeding the previous one, and per layer and head `attn[layer][0][head][-1].topk(1)`. `output_ids` are the tokens
    the detector generated (their loop takes the argmax; here the answers are forced). `span` overrides the span
    search (to score the old whole-needle span)."""
    if span is None:
        needle_ids = tokenizer(real_needle, add_special_tokens=False)["input_ids"]
        span = (-1, -1)
        for i in range(len(prompt_ids)):
            overlap = len(set(prompt_ids[i : i + len(needle_ids)]) & set(needle_ids)) / len(set(needle_ids))
            if overlap > 0.9:
                span = (i, i + len(needle_ids))
                break
    start, end = span
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    score = [[0.0] * heads for _ in range(layers)]
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], use_cache=True)
        past, inp = out.past_key_values, ids[:, -1]
        for token in output_ids:
            out = model(input_ids=inp.view(1, 1), past_key_values=past, use_cache=True, output_attentions=True)
            past, inp = out.past_key_values, torch.tensor(token)
            for layer in range(layers):
                for head in range(heads):
                    values, idx = out.attentions[layer][0][head][-1].topk(1)
                    for _, i in zip(values, idx):
                        if start <= i < end and inp.item() == prompt_ids[i]:
                            score[layer][head] += 1 / (end - start)
                            break
    return score


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "olmo3", "phi3", "gemma2"])
def test_scores_equal_the_authors_loop(arch, tiny_tokenizer, hay_dir, monkeypatch):
    """Per-head, per-sample scores of `detect_retrieval_heads` (defaults: 200-token buffer, real_needle span) equal
    the reference loop's. The answers copy the whole needle, lead-in included, and the lead-in copies that the old
    whole-needle span counted are there and are not counted."""
    overrides = {"sliding_window": 512} if arch == "gemma2" else {}  # reference indices assume an uncropped cache
    model = make_tiny_model(arch, attn_implementation="eager", **overrides)
    needles = [LEADIN_NEEDLE, OTHER]
    answers = {i: n["needle"] for i, n in enumerate(needles)}  # correct (ROUGE recall 1), lead-in copied
    monkeypatch.setattr(detection, "generate_answer", forced_generation(tiny_tokenizer, answers))
    grid = dict(context_lengths=[0, 230, 260], depths=[0, 50, 100], haystack_dir=hay_dir)
    scores = detect_retrieval_heads(model, tiny_tokenizer, needles=needles, max_new_tokens=20, **grid)
    samples = build_niah_samples(tiny_tokenizer, needles=needles, length_buffer=200, **grid)
    assert len(scores.scores[(0, 0)]) == len(samples) == 18
    ours = torch.tensor([scores.scores[(layer, head)] for layer in range(3) for head in range(4)]).T
    lead_in_hits = 0
    for k, s in enumerate(samples):
        output = tiny_tokenizer(answers[s.needle_index], add_special_tokens=False)["input_ids"][:20]
        reference = torch.tensor(authors_scores(model, tiny_tokenizer, s.input_ids, s.answer, output)).flatten()
        assert torch.allclose(ours[k], reference, atol=1e-6), (s.key, ours[k], reference)
        old = torch.tensor(
            authors_scores(model, tiny_tokenizer, s.input_ids, s.answer, output, span=s.needle_span)
        ).flatten()
        needle_len, answer_len = s.needle_end - s.needle_start, s.answer_end - s.answer_start
        lead_in_hits += (old * needle_len - reference * answer_len).round().sum().item()
    assert ours.max() > 0 and lead_in_hits > 0  # both kinds of copying happened: the comparison means something


def test_defaults_are_the_authors():
    authors = DETECTION_PRESETS["authors"]
    assert list(authors["context_lengths"]) == [
        0,
        263,
        526,
        789,
        1053,
        1316,
        1579,
        1842,
        2105,
        2368,
        2632,
        2895,
        3158,
        3421,
        3684,
        3947,
        4211,
        4474,
        4737,
        5000,
    ]
    assert list(authors["context_lengths"]) == np.round(np.linspace(0, 5000, 20)).astype(int).tolist()
    assert list(authors["depths"]) == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
    assert authors["max_new_tokens"] == 50 and authors["length_buffer"] == 200
    defaults = {k: p.default for k, p in inspect.signature(detect_retrieval_heads).parameters.items()}
    assert {k: defaults[k] for k in authors} == authors and defaults["haystack_per_needle"] is None
    cpu = DETECTION_PRESETS["cpu"]
    assert set(cpu["context_lengths"]) <= set(authors["context_lengths"])
    assert set(cpu["depths"]) <= set(authors["depths"])
    assert {k: cpu[k] for k in ("max_new_tokens", "length_buffer")} == {"max_new_tokens": 50, "length_buffer": 200}


def test_detection_decodes_past_eos(tiny_tokenizer, hay_dir, tmp_path):
    """50 greedy tokens whatever EOS does (their loop has no EOS stop); the response skips special tokens."""
    model = make_tiny_model("llama")
    eos = tiny_tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == eos  # so that an EOS stop would end the decode at once
    make_greedy(model, eos)  # EOS is the greedy token at every step
    with pytest.raises(ValueError, match="none of the"):
        detect_retrieval_heads(
            model,
            tiny_tokenizer,
            context_lengths=[0],
            depths=[0],
            needles=[NEEDLE],
            max_new_tokens=7,
            haystack_dir=hay_dir,
            output_dir=tmp_path,
        )
    record = json.loads((tmp_path / "detect.rank0.jsonl").read_text().splitlines()[0])
    assert record["num_new_tokens"] == 7 and record["response"] == ""
    assert len(record["scores"]) == 3 * 4 and (tmp_path / "niah_grid.png").is_file()  # the grid even on failure


def test_real_needle_outside_the_needle_is_refused(tiny_tokenizer, hay_dir):
    needle = {**NEEDLE, "real_needle": "water"}
    with pytest.raises(
        ValueError,
        match=r"^The real_needle of needle\(s\) \[0\] does not occur in its needle "
        r"\(case-insensitive\): detection scores copies of the real_needle's tokens, "
        r"so it must be part of the needle\.$",
    ):
        detect_retrieval_heads(
            make_tiny_model("llama"),
            tiny_tokenizer,
            context_lengths=[0],
            depths=[0],
            needles=[needle],
            haystack_dir=hay_dir,
        )


def _reference_argmax(model, prompt: list[int], new: list[int]) -> torch.Tensor:
    """The original algorithm's attention rows: eager attention over the sequence, every head's weights."""
    base = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(torch.tensor([prompt + new[:-1]]), output_attentions=True)
    finally:
        model.set_attn_implementation(base)
    rows = slice(len(prompt) - 1, len(prompt) - 1 + len(new))
    return torch.stack([a[0, :, rows, :].transpose(0, 1) for a in out.attentions], dim=1)  # [steps, L, H, kv]


def test_recorded_argmax_matches_eager_attention(tiny_arch, tiny_tokenizer):
    """Across families (GQA, sliding windows with cropped caches, soft-capping), sdpa or eager."""
    model = make_tiny_model(tiny_arch)
    torch.manual_seed(1)
    prompt = torch.randint(6, 380, (40,)).tolist()  # longer than the sliding windows (8) of the Gemma configs
    sample = NIAHSample(prompt, 10, 20, "x", "q", "n", 40, 50.0)
    impl = model.config._attn_implementation
    with record_attention_argmax(model) as recorder:
        assert model.config._attn_implementation != impl
        new = generate_answer(model, tiny_tokenizer, sample, 8)
        positions = recorder.positions(len(prompt) - 1, len(new))
    assert model.config._attn_implementation == impl  # restored
    weights = _reference_argmax(model, prompt, new)  # [steps, layers, heads, kv]
    picked = weights.gather(-1, positions[..., None]).squeeze(-1)
    best = weights.max(-1)
    # The recorded key has the largest weight (up to float noise between sdpa and eager) ...
    assert torch.all(picked >= best.values - 1e-6), (picked - best.values).min()
    # ... and is the same position nearly everywhere (differences are exact ties only).
    assert (positions == best.indices).float().mean() > 0.97
    assert positions.shape == (len(new), 3, 4)


def test_recording_leaves_outputs_unchanged(tiny_llama):
    ids = torch.randint(6, 380, (1, 30))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        with record_attention_argmax(tiny_llama):
            rec = tiny_llama(ids).logits
    assert torch.equal(ref, rec)


def test_detect_scores_match_hand_computation(tiny_tokenizer, hay_dir, monkeypatch, tmp_path):
    """Stub the argmax so that the copying is known, force the answers, and compare with scores by hand."""
    current = {}

    def stub_argmax(query, key, attention_mask=None):
        b, hq = query.shape[:2]
        s = current["sample"]
        t = key.shape[2] - len(s.input_ids)  # the step: 0 for the prefill, then one per generated token
        pos = torch.zeros(b, hq, dtype=torch.long)
        pos[:, 0] = s.needle_start + t  # copies needle token t: a hit every step (lead-in and answer)
        pos[:, 1] = s.needle_start + t + 1  # one ahead: never the token being generated
        pos[:, 2] = s.needle_start + t if t % 2 == 0 else 0  # copies on even steps only
        pos[:, 3] = s.needle_start + t if s.needle_start + t < s.answer_start else 0  # copies the lead-in only
        return pos

    monkeypatch.setattr(detection, "last_row_argmax", stub_argmax)
    # The lead-in needle is answered with the whole needle (correct); the other with a wrong answer (excluded).
    monkeypatch.setattr(
        detection,
        "generate_answer",
        forced_generation(
            tiny_tokenizer,
            {0: LEADIN_NEEDLE["needle"], 1: "the man went home . it"},
            on_sample=lambda s: current.update(sample=s),
        ),
    )
    model = make_tiny_model("llama")
    scores = detect_retrieval_heads(
        model,
        tiny_tokenizer,
        context_lengths=[260],
        depths=[0, 50],
        needles=[LEADIN_NEEDLE, OTHER],
        max_new_tokens=17,
        haystack_dir=hay_dir,
        output_dir=tmp_path / "out",
    )
    # 17 needle tokens generated: 11 of the lead-in ("the best ... is to"), then the 6 of the answer
    # ("read a story with your mother"), the span. head0 copies 6/6 of it, head2 the even steps 12, 14, 16 (3/6),
    # head3 only lead-in tokens: 0 (the whole-needle span gave it 11/17).
    for layer in range(3):
        assert scores.scores[(layer, 0)] == [1.0, 1.0]  # two correct samples (depths 0 and 50 of needle 0)
        assert scores.scores[(layer, 1)] == [0.0, 0.0]
        assert scores.scores[(layer, 2)] == [0.5, 0.5]
        assert scores.scores[(layer, 3)] == [0.0, 0.0]
    out = tmp_path / "out"
    assert json.loads((out / "head_scores.json").read_text())["0-2"] == [0.5, 0.5]
    for name in ("head_scores.png", "niah_grid.png", "sparsity.json"):
        assert (out / name).is_file()
    assert json.loads((out / "sparsity.json").read_text())["num_correct"] == 2


def _forced_detect(
    model,
    tok,
    hay_dir,
    out,
    monkeypatch,
    needles=(LEADIN_NEEDLE, OTHER),
    overwrite=False,
    max_new_tokens=6,
    length_buffer=0,
    **kw,
):
    monkeypatch.setattr(
        detection, "generate_answer", forced_generation(tok, {i: n["real_needle"] for i, n in enumerate(needles)}, **kw)
    )
    return detect_retrieval_heads(
        model,
        tok,
        context_lengths=[50, 80],
        depths=[0, 50, 100],
        needles=list(needles),
        max_new_tokens=max_new_tokens,
        haystack_dir=hay_dir,
        output_dir=out,
        overwrite=overwrite,
        length_buffer=length_buffer,
    )


def test_detect_resumes_after_kill(tiny_tokenizer, hay_dir, monkeypatch, tmp_path):
    model = make_tiny_model("qwen2")
    full = _forced_detect(model, tiny_tokenizer, hay_dir, tmp_path / "full", monkeypatch)
    calls = []
    with pytest.raises(KeyboardInterrupt):
        _forced_detect(model, tiny_tokenizer, hay_dir, tmp_path / "cut", monkeypatch, calls=calls, fail_after=5)
    assert len((tmp_path / "cut" / "detect.rank0.jsonl").read_text().splitlines()) == 5
    calls.clear()
    resumed = _forced_detect(model, tiny_tokenizer, hay_dir, tmp_path / "cut", monkeypatch, calls=calls)
    assert len(calls) == 12 - 5  # only the unfinished samples ran again
    assert resumed.scores == full.scores
    assert max(max(v) for v in full.scores.values()) > 0  # real copying happened, so the comparison means something


def test_detect_refuses_a_directory_of_other_needles(tiny_tokenizer, hay_dir, monkeypatch, tmp_path):
    """Another needle set (or haystack, model...) must not reuse the records of a detection directory."""
    model = make_tiny_model("qwen2")
    _forced_detect(model, tiny_tokenizer, hay_dir, tmp_path / "d", monkeypatch)
    calls = []
    with pytest.raises(ValueError, match="needles.*differ.*overwrite=True"):
        _forced_detect(model, tiny_tokenizer, hay_dir, tmp_path / "d", monkeypatch, needles=(OTHER,), calls=calls)
    assert calls == []  # refused before any work
    redone = _forced_detect(
        model, tiny_tokenizer, hay_dir, tmp_path / "d", monkeypatch, needles=(OTHER,), overwrite=True
    )
    fresh = _forced_detect(model, tiny_tokenizer, hay_dir, tmp_path / "fresh", monkeypatch, needles=(OTHER,))
    assert redone.scores == fresh.scores
    assert json.loads((tmp_path / "d" / "head_scores.json").read_text()) == json.loads(
        (tmp_path / "fresh" / "head_scores.json").read_text()
    )


@pytest.mark.parametrize("damage", ["one head short", "no scores"])
def test_detect_redoes_a_record_of_the_wrong_layout(tiny_tokenizer, hay_dir, monkeypatch, tmp_path, damage):
    model = make_tiny_model("qwen2")
    full = _forced_detect(model, tiny_tokenizer, hay_dir, tmp_path / "d", monkeypatch)
    path = tmp_path / "d" / "detect.rank0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[0])
    if damage == "no scores":
        del record["scores"]
    else:
        record["scores"] = record["scores"][:-1]  # an edited file
    path.write_text(json.dumps(record) + "\n" + "".join(lines[1:]))
    calls = []
    with pytest.warns(UserWarning, match="detect.rank0.jsonl: 1 unusable record"):
        again = _forced_detect(model, tiny_tokenizer, hay_dir, tmp_path / "d", monkeypatch, calls=calls)
    assert calls == [record["key"]] and again.scores == full.scores


@pytest.mark.parametrize(
    "change,named",
    [
        ({"model": {"seed": 1}}, r"\(model weights, data or settings differ\)"),  # same layout and name, other weights
        ({"model": {"num_hidden_layers": 2}}, r"\(layout differ\)"),
        ({"max_new_tokens": 5}, r"\(max_new_tokens differ\)"),
        ({"length_buffer": 8}, r"\(length_buffer, samples differ\)"),
    ],
)
def test_detect_refuses_a_directory_of_another_model_or_settings(
    tiny_tokenizer, hay_dir, monkeypatch, tmp_path, change, named
):
    """Records are reused only for the same weights, layout, decode budget and prompts; the refusal names what
    changed and comes before any sample runs."""
    _forced_detect(make_tiny_model("qwen2"), tiny_tokenizer, hay_dir, tmp_path / "d", monkeypatch)
    change = dict(change)  # the parametrized dict is shared: leave it whole for a rerun
    model = make_tiny_model("qwen2", **change.pop("model", {}))
    calls = []
    with pytest.raises(ValueError, match=named + r"\. Use a fresh output"):
        _forced_detect(model, tiny_tokenizer, hay_dir, tmp_path / "d", monkeypatch, calls=calls, **change)
    assert calls == []
    if "max_new_tokens" in change:  # the default is to refuse, not to overwrite
        with pytest.raises(ValueError, match=named):
            detect_retrieval_heads(
                model,
                tiny_tokenizer,
                context_lengths=[50, 80],
                depths=[0, 50, 100],
                needles=[LEADIN_NEEDLE, OTHER],
                haystack_dir=hay_dir,
                output_dir=tmp_path / "d",
                length_buffer=0,
                **change,
            )


def test_max_new_tokens_bounds_and_the_window_edge(tiny_tokenizer, hay_dir, monkeypatch):
    """max_new_tokens: 0 refused, 1 scores; the longest prompt plus the new tokens may fill the window exactly."""
    model = make_tiny_model("llama")
    kw = dict(needles=[NEEDLE], haystack_dir=hay_dir, length_buffer=0)
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1, got 0\."):
        detect_retrieval_heads(model, tiny_tokenizer, context_lengths=[50], depths=[50], max_new_tokens=0, **kw)
    monkeypatch.setattr(detection, "generate_answer", forced_generation(tiny_tokenizer, {0: "five"}))
    one = detect_retrieval_heads(model, tiny_tokenizer, context_lengths=[50], depths=[50], max_new_tokens=1, **kw)
    assert len(one.scores[(0, 0)]) == 1  # one correct sample, scored from a single generated token

    window = model.config.max_position_embeddings
    longest = max(
        len(s.input_ids)
        for s in build_niah_samples(tiny_tokenizer, [400], [0, 100], [NEEDLE], hay_dir, length_buffer=0)
    )
    room = window - longest
    assert 0 < room < 200
    detect_retrieval_heads(model, tiny_tokenizer, context_lengths=[400], depths=[0, 100], max_new_tokens=room, **kw)
    with pytest.raises(
        ValueError,
        match=rf"The longest prompt \({longest} tokens\) \+ {room + 1} new tokens exceeds "
        rf"the model's window of {window} tokens",
    ):
        detect_retrieval_heads(
            model, tiny_tokenizer, context_lengths=[400], depths=[0, 100], max_new_tokens=room + 1, **kw
        )


def test_haystack_per_needle_reaches_the_prompts(tiny_tokenizer, hay_dir, monkeypatch):
    """Two haystack files: needle i reads file i by default (the authors' part{i}), the joined text when False."""
    (hay_dir / "b.txt").write_text("the boy saw a big white house . the children play in the school . " * 6)
    needles = [NEEDLE, OTHER]
    kw = dict(context_lengths=[60], depths=[0, 100], needles=needles, max_new_tokens=3, length_buffer=0)

    def prompts(**extra):
        seen = {}
        monkeypatch.setattr(
            detection,
            "generate_answer",
            forced_generation(
                tiny_tokenizer, {0: "five", 1: "water"}, on_sample=lambda s: seen.update({s.key: s.input_ids})
            ),
        )
        detect_retrieval_heads(make_tiny_model("llama"), tiny_tokenizer, haystack_dir=hay_dir, **kw, **extra)
        return seen

    def built(per_needle):
        return {
            s.key: s.input_ids
            for s in build_niah_samples(
                tiny_tokenizer,
                kw["context_lengths"],
                kw["depths"],
                needles,
                hay_dir,
                max_length=512,
                max_new_tokens=3,
                length_buffer=0,
                haystack_per_needle=per_needle,
            )
        }

    assert built(True) != built(False)  # the setting changes the prompts
    assert prompts() == built(True)
    assert prompts(haystack_per_needle=False) == built(False)


@pytest.mark.parametrize("depths,warned", [([0, 100], False), ([0, 25, 50, 75, 100], True)])
def test_few_correct_samples_warn_below_a_quarter(tiny_tokenizer, hay_dir, monkeypatch, depths, warned):
    """One correct sample: of 4 (exactly a quarter) no warning; of 5 a warning."""
    needles = [NEEDLE] if warned else [NEEDLE, OTHER]
    monkeypatch.setattr(
        detection,
        "generate_answer",
        forced_generation(
            tiny_tokenizer, lambda s: "five" if s.depth == 0 and s.needle_index == 0 else "the man went home"
        ),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = detect_retrieval_heads(
            make_tiny_model("llama"),
            tiny_tokenizer,
            context_lengths=[60],
            depths=depths,
            needles=needles,
            max_new_tokens=3,
            haystack_dir=hay_dir,
            length_buffer=0,
        )
    assert len(scores.scores[(0, 0)]) == 1
    few = [w for w in caught if "answered correctly" in str(w.message)]
    if not warned:
        assert few == []
    else:
        assert [str(w.message) for w in few] == [
            "Only 1/5 NIAH samples were answered correctly; the scores rest on few samples. Shorter contexts give more."
        ]
        assert few[0].category is UserWarning  # (its stacklevel is not checked: a mutation tool's wrapper shifts it)


def test_finished_outputs_are_not_rewritten_and_damaged_ones_are(tiny_tokenizer, hay_dir, monkeypatch, tmp_path):
    """A resumed, finished directory rewrites nothing; a missing plot or a damaged score file is made again."""
    model = make_tiny_model("qwen2")
    out = tmp_path / "d"
    scores = _forced_detect(model, tiny_tokenizer, hay_dir, out, monkeypatch)
    names = ("head_scores.json", "head_scores.png", "niah_grid.png", "sparsity.json")
    assert json.loads((out / "sparsity.json").read_text()) == {
        **scores.sparsity(),
        "num_samples": 12,
        "num_correct": 12,
    }
    expected = (out / "head_scores.json").read_text()
    assert json.loads(expected) == {f"{l}-{h}": v for (l, h), v in scores.scores.items()}

    def stamps():
        return {n: (out / n).stat().st_mtime_ns for n in names}

    before = stamps()
    calls = []
    _forced_detect(model, tiny_tokenizer, hay_dir, out, monkeypatch, calls=calls)
    assert calls == [] and stamps() == before
    (out / "head_scores.png").unlink()
    _forced_detect(model, tiny_tokenizer, hay_dir, out, monkeypatch)
    assert (out / "head_scores.png").is_file()
    for damaged in ("{", json.dumps({k: [0.0] * len(v) for k, v in json.loads(expected).items()})):
        (out / "head_scores.json").write_text(damaged)
        _forced_detect(model, tiny_tokenizer, hay_dir, out, monkeypatch)
        assert (out / "head_scores.json").read_text() == expected


def test_unsupported_attention_is_refused_before_anything_changes(tiny_tokenizer):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    with pytest.raises(ValueError, match=r"^Linear has no eager_attention_forward; load the model with sdpa\.$"):
        detection._inner_attention("eager", torch.nn.Linear(1, 1))
    model = make_tiny_model("llama")
    assert "flex_attention" in ALL_MASK_ATTENTION_FUNCTIONS  # refused although it has a mask function
    for impl in ("flex_attention", "no_such_attention"):
        model.config._attn_implementation = impl
        with pytest.raises(
            ValueError,
            match=rf"supports sdpa, eager and flash attention, not '{impl}'; load the "
            r"model with attn_implementation='sdpa'\.",
        ):
            with record_attention_argmax(model):
                pass
        assert model.config._attn_implementation == impl
        assert not any(hasattr(m, detection._RECORDER_ATTR) for m in model.modules())


SHARD_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import pytest
from tests.tiny import make_tiny_model
from tests.test_niah import make_book_tokenizer
from tests.test_detection import _forced_detect
from trl_retmask.distributed import end_processes
from pathlib import Path
tok = make_book_tokenizer(Path(sys.argv[1]) / "tok")
mp = pytest.MonkeyPatch()
_forced_detect(make_tiny_model("qwen2"), tok, Path(sys.argv[2]), Path(sys.argv[1]) / "out", mp)
end_processes()  # leaving with the group alive can abort in gloo's destructor (seen in CI: SIGABRT at exit)
"""


def test_two_processes_match_one(tiny_tokenizer, hay_dir, monkeypatch, tmp_path):
    # Same thread count as the shards (OMP_NUM_THREADS=1 below): float reduction order, hence argmax near-ties,
    # depends on it, and exact equality of scores is the point of the test.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _forced_detect(make_tiny_model("qwen2"), tiny_tokenizer, hay_dir, tmp_path / "one", monkeypatch)
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT.format(repo=str(REPO)))
    launch_two_cpu_processes(script, tmp_path, hay_dir)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("detect.rank*.jsonl")) == ["detect.rank0.jsonl", "detect.rank1.jsonl"]
    sharded = json.loads((out / "head_scores.json").read_text())
    assert sharded == json.loads((tmp_path / "one" / "head_scores.json").read_text())
    assert sharded == {f"{l}-{h}": v for (l, h), v in single.scores.items()}


def test_zero_correct_samples_is_an_error(tiny_tokenizer, hay_dir):
    model = make_tiny_model("llama")  # random weights never answer
    with pytest.raises(
        ValueError,
        match=r"^The model answered none of the 1 NIAH samples correctly \(ROUGE-1 recall "
        r"> 0\.5\), so no retrieval score can be computed\. Use shorter contexts "
        r"\(context_lengths\) or more new tokens\.$",
    ):
        detect_retrieval_heads(
            model,
            tiny_tokenizer,
            context_lengths=[50],
            depths=[50],
            needles=[NEEDLE],
            max_new_tokens=3,
            haystack_dir=hay_dir,
        )


def test_bad_input_fails_before_work(tiny_tokenizer, hay_dir, tmp_path):
    model = make_tiny_model("llama")  # window 512
    with pytest.raises(ValueError, match="window"):  # 600 context tokens after the 200-token buffer
        detect_retrieval_heads(
            model,
            tiny_tokenizer,
            context_lengths=[800],
            depths=[50],
            needles=[NEEDLE],
            max_new_tokens=32,
            haystack_dir=hay_dir,
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text"):
        detect_retrieval_heads(model, tiny_tokenizer, haystack_dir=tmp_path / "empty")


@pytest.mark.real_model
def test_real_model_argmax_matches_eager(smollm2):
    model, tok = smollm2
    sample = build_niah_samples(tok, [512], [50], None, length_buffer=200, haystack_per_needle=None)[1]
    with record_attention_argmax(model) as recorder:
        new = generate_answer(model, tok, sample, 12, stop_at_eos=False)
        positions = recorder.positions(len(sample.input_ids) - 1, len(new))
    weights = _reference_argmax(model, sample.input_ids, new)
    picked = weights.gather(-1, positions[..., None]).squeeze(-1)
    assert torch.all(picked >= weights.max(-1).values - 1e-5)
    assert (positions == weights.argmax(-1)).float().mean() > 0.99
    # Some head copies the answer from the needle: the mechanism the score counts exists in this model.
    scores = copy_scores(positions, torch.tensor(new), torch.tensor(sample.input_ids + new), sample.answer_span)
    assert scores.max() >= 3 / (sample.answer_end - sample.answer_start)  # >= 3 copied answer tokens
