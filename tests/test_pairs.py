"""Pair generation: exact agreement with independent `generate` calls, filtering, statistics and the on-disk cache."""

import json

import pytest
import torch

from tests.tiny import make_tiny_model
from trl_retmask import mask_heads
from trl_retmask.chat import encode_prompts
from trl_retmask.fingerprints import hash_weights
from trl_retmask.generation.batch import GenerateBackend
from trl_retmask.pairs import PairStats, complete_prompt_dataset, generate_pairs

HEADS = [(0, 1), (1, 2), (2, 0)]
PROMPTS = [
    "the secret number is",
    "what is the magic word ?",
    "tell me a story about the sea",
    "how many boys went to school ?",
    "the man said",
    "where is the water",
]
CHATS = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]


def independent(model, tokenizer, prompt, heads=None, max_new_tokens=6, seed=None, **generate_kwargs):
    """One unbatched greedy generate call, built here without the pairs module. A string prompt's response is the
    text that decoding prompt+response adds to decoding the prompt (what DPO's `prompt + chosen` must re-tokenize
    to); a chat response is decoded alone."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        ids = tokenizer(prompt, return_tensors="pt")
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad(), mask_heads(model, heads or []):
        out = model.generate(**ids, max_new_tokens=max_new_tokens, **{"do_sample": False, **generate_kwargs})
    n = ids["input_ids"].shape[1]
    if isinstance(prompt, list):
        return tokenizer.decode(out[0, n:], skip_special_tokens=True)
    return tokenizer.decode(out[0], skip_special_tokens=True)[
        len(tokenizer.decode(out[0, :n], skip_special_tokens=True)) :
    ]


class CountingGenerate:
    """Wraps `model.generate` to count calls and optionally fail on the n-th one (a simulated interruption)."""

    def __init__(self, model, fail_on=None):
        self.model, self.inner, self.calls, self.fail_on, self.rows = model, model.generate, 0, fail_on, []
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.rows.append(len(kwargs["input_ids"]))
        if self.fail_on is not None and self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def greedy_pairs(model, tiny_tokenizer):
    return generate_pairs(
        model, tiny_tokenizer, PROMPTS, HEADS, temperature=0.0, max_new_tokens=6, batch_size=4, show_progress=False
    )


def test_greedy_pairs_match_independent_generation(model, tiny_tokenizer, greedy_pairs):
    chosen = [independent(model, tiny_tokenizer, p) for p in PROMPTS]
    rejected = [independent(model, tiny_tokenizer, p, HEADS) for p in PROMPTS]
    assert greedy_pairs.chosen == chosen
    assert greedy_pairs.rejected == rejected
    # The test can only catch a missing mask if masking changes some answer.
    assert any(c != r for c, r in zip(chosen, rejected))


def test_prompt_plus_response_retokenizes_to_the_generated_tokens(model, tiny_tokenizer, greedy_pairs):
    """What DPO trains on (`prompt + chosen` tokenized) must be the tokens the policy generated."""
    special = set(tiny_tokenizer.all_special_ids)
    checked = 0
    for prompt, text in zip(PROMPTS, greedy_pairs.chosen):
        ids = tiny_tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            new = model.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1] :].tolist()
        if any(t in special or t >= len(tiny_tokenizer) for t in new):
            continue  # special or out-of-vocabulary ids vanish in decoding; nothing to compare
        assert tiny_tokenizer(prompt + text)["input_ids"] == ids["input_ids"][0].tolist() + new
        checked += 1
    assert checked >= 2


def test_conversational_prompts_use_the_chat_template(model, tiny_tokenizer):
    pairs = generate_pairs(
        model, tiny_tokenizer, CHATS, HEADS, temperature=0.0, max_new_tokens=6, batch_size=3, show_progress=False
    )
    assert pairs.chosen == [independent(model, tiny_tokenizer, c) for c in CHATS]
    assert pairs.rejected == [independent(model, tiny_tokenizer, c, HEADS) for c in CHATS]
    ds = pairs.to_dataset()
    for row in ds:
        assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
        assert isinstance(row["prompt"], list)


def test_filtering_and_stats(model, greedy_pairs, tiny_tokenizer):
    p = greedy_pairs
    same = [c.strip() == r.strip() for c, r in zip(p.chosen, p.rejected)]  # the authors' rule: identical only
    s = p.stats
    assert (s.prompts, s.dropped_empty, s.dropped_identical) == (len(PROMPTS), 0, sum(same))
    assert s.kept == len(PROMPTS) - sum(same) == len(p.to_dataset())
    assert p.keep == [not d for d in same]
    strict = generate_pairs(
        model,
        tiny_tokenizer,
        PROMPTS,
        HEADS,
        temperature=0.0,
        max_new_tokens=6,
        batch_size=4,
        show_progress=False,
        drop_empty=True,
    )
    empty = [not c.strip() or not r.strip() for c, r in zip(p.chosen, p.rejected)]
    assert strict.keep == [not (e or d) for e, d in zip(empty, same)]
    assert (strict.stats.dropped_empty, strict.stats.dropped_identical) == (
        sum(empty),
        sum(d and not e for e, d in zip(empty, same)),
    )
    # Token lengths: count the generated tokens up to the first EOS, independently of the module.
    kept = p.kept_indices
    lens = p.extra["chosen_tokens"]
    for i in kept:
        assert lens[i] <= 6
        assert len(tiny_tokenizer(p.chosen[i], add_special_tokens=False)["input_ids"]) <= lens[i]
    assert s.mean_chosen_tokens == pytest.approx(sum(lens[i] for i in kept) / len(kept))
    # Every generated token is counted, dropped pairs included (the throughput is of the generation, not the kept).
    assert s.generated_tokens == sum(p.extra["chosen_tokens"]) + sum(p.extra["rejected_tokens"])
    assert s.tokens_per_second == pytest.approx(s.generated_tokens / s.generation_seconds)
    assert set(s.to_logs()) == {f"pairs/{k}" for k in PairStats().to_dict()}


SAMPLE = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)  # top_k=None -> the model's (none): off


def test_sampled_pairs_follow_the_documented_seeds_longest_prompt_first(model, tiny_tokenizer):
    """Batches run longest prompt first; batch b's chosen rows are sampled from seed * 1_000_003 + 2b and its
    rejected rows (heads masked) from seed * 1_000_003 + 2b + 1: hand-seeded single `generate` calls agree."""
    prompts = ["the man said", "tell me a story about the sea"]  # the longer one second: its batch is b = 0
    lengths = [len(tiny_tokenizer(text=p)["input_ids"]) for p in prompts]
    assert lengths[1] > lengths[0]
    pairs = generate_pairs(
        model,
        tiny_tokenizer,
        prompts,
        HEADS,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=6,
        batch_size=1,
        seed=5,
        show_progress=False,
        backend="generate",
    )
    for b, i in enumerate([1, 0]):
        base = 5 * 1_000_003 + 2 * b
        assert pairs.chosen[i] == independent(model, tiny_tokenizer, prompts[i], seed=base, **SAMPLE)
        assert pairs.rejected[i] == independent(model, tiny_tokenizer, prompts[i], HEADS, seed=base + 1, **SAMPLE)
    other = [independent(model, tiny_tokenizer, prompts[1], seed=s, **SAMPLE) for s in range(4)]
    assert len(set(other)) > 1  # the seed decides the sample here: the test can fail


def test_generation_settings_reach_the_decoder_and_timing_is_per_decode(model, tiny_tokenizer, monkeypatch):
    """`top_p`, `top_k` and `generation_kwargs` reach the generation config; each decode's time is measured around
    it (a fake clock: 1 s per decode) and summed into the stats."""
    import types

    import trl_retmask.pairs as pairs_module

    configs = []
    real = pairs_module.generate_batch

    def spy(model, tokenizer, prompt_ids, config, **kw):
        configs.append(config)
        return real(model, tokenizer, prompt_ids, config, **kw)

    ticks = iter(range(1000))
    monkeypatch.setattr(pairs_module, "generate_batch", spy)
    monkeypatch.setattr(pairs_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    pairs = generate_pairs(
        model,
        tiny_tokenizer,
        PROMPTS[:4],
        HEADS,
        temperature=0.8,
        top_p=0.9,
        top_k=7,
        generation_kwargs={"repetition_penalty": 1.3},
        max_new_tokens=3,
        batch_size=2,
        show_progress=False,
        backend="generate",
    )
    assert len(configs) == 4 and all(
        (c.top_p, c.top_k, c.repetition_penalty, c.temperature, c.max_new_tokens) == (0.9, 7, 1.3, 0.8, 3)
        for c in configs
    )
    assert pairs.stats.generation_seconds == 4.0  # 2 batches x (chosen, rejected), 1 s each
    assert pairs.stats.tokens_per_second == pairs.stats.generated_tokens / 4.0


def test_special_tokens_never_reach_the_responses(model, tiny_tokenizer):
    """A special token generated inside a response (here BOS, made the likeliest token by a `sequence_bias`) is not
    part of the response text, for string prompts (prompt + response decoded) and chat prompts (response decoded
    alone)."""
    bos = tiny_tokenizer.bos_token_id
    prompts = [PROMPTS[0], CHATS[1]]
    pairs = generate_pairs(
        model,
        tiny_tokenizer,
        prompts,
        HEADS,
        temperature=0.0,
        max_new_tokens=4,
        batch_size=2,
        show_progress=False,
        generation_kwargs={"sequence_bias": [[[bos], 50.0]]},
    )
    for i, prompt in enumerate(prompts):
        assert pairs.extra["chosen_tokens"][i] >= 2
        assert pairs.chosen[i] == independent(
            model, tiny_tokenizer, prompt, max_new_tokens=4, sequence_bias=[[[bos], 50.0]]
        )
        assert "<s>" not in pairs.chosen[i] and "<s>" not in pairs.rejected[i]
    ids = tiny_tokenizer(text=PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        raw = model.generate(**ids, max_new_tokens=4, do_sample=False, sequence_bias=[[[bos], 50.0]])
    assert tiny_tokenizer.decode(raw[0, ids["input_ids"].shape[1] :]).startswith("<s>")  # it was generated


def test_cache_skips_regenerates_on_change(model, tiny_tokenizer, tmp_path):
    kw = dict(temperature=0.0, max_new_tokens=4, batch_size=2, cache_dir=tmp_path, show_progress=False)
    counter = CountingGenerate(model)
    try:
        first = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, **kw)
        assert counter.calls == 4  # 2 batches x (chosen, rejected)
        again = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, **kw)
        assert counter.calls == 4, "a second run on the same inputs must not generate"
        assert (again.chosen, again.rejected) == (first.chosen, first.rejected)
        assert again.stats.batches_from_cache == 2 and again.stats.batches_generated == 0
        generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS[:2], **kw)
        assert counter.calls == 6, "other heads must regenerate the rejected responses (and only those)"
        generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, **{**kw, "max_new_tokens": 5})
        assert counter.calls == 10, "other generation settings must regenerate"
        generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, **{**kw, "temperature": 0.7})
        assert counter.calls == 14
        generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, **{**kw, "seed": 1})
        assert counter.calls == 18, "another seed must regenerate"
        generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, **{**kw, "batch_size": 4})
        assert counter.calls == 20, "another batching must regenerate (1 batch x 2 roles)"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("chosen-")) and all(
            len(p.name) == len("chosen-") + 20 for p in tmp_path.iterdir() if p.name.startswith("chosen-")
        )
    finally:
        model.generate = counter.inner


def test_runs_with_other_heads_share_the_chosen_responses(model, tiny_tokenizer, tmp_path):
    """RetMask and its random-head control (same seed) have the same chosen responses: the second run generates only
    its rejected ones, and its pairs equal those of a run without any cache."""
    kw = dict(temperature=0.9, top_k=0, seed=3, max_new_tokens=4, batch_size=2, show_progress=False)
    other_heads = [(0, 0), (2, 3)]
    uncached = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], other_heads, **kw)
    retmask = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, cache_dir=tmp_path, **kw)
    counter = CountingGenerate(model)
    try:
        control = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], other_heads, cache_dir=tmp_path, **kw)
    finally:
        model.generate = counter.inner
    assert counter.calls == 2, "2 batches x rejected only"
    assert (control.chosen, control.rejected) == (uncached.chosen, uncached.rejected)
    assert control.chosen == retmask.chosen and control.rejected != retmask.rejected
    assert control.stats.generated_tokens == uncached.stats.generated_tokens


def test_static_backend_greedy_pairs_equal_generate_backend(model, tiny_tokenizer, greedy_pairs, tmp_path):
    """The static backend decodes chosen + rejected rows of a batch in one call (rejected rows alone when the chosen
    are cached) and gives the greedy pairs of the `generate` backend (itself checked against unbatched calls)."""
    kw = dict(temperature=0.0, max_new_tokens=6, batch_size=4, show_progress=False, backend="static")
    counter = CountingGenerate(model)
    try:
        static = generate_pairs(model, tiny_tokenizer, PROMPTS, HEADS, cache_dir=tmp_path, **kw)
        assert counter.rows == [8, 4], "one call per batch, chosen and rejected rows together"
        other = generate_pairs(model, tiny_tokenizer, PROMPTS, HEADS[:1], cache_dir=tmp_path, **kw)
        assert counter.rows[2:] == [4, 2], "chosen from the cache: rejected rows only"
    finally:
        model.generate = counter.inner
    assert (static.chosen, static.rejected) == (greedy_pairs.chosen, greedy_pairs.rejected)
    assert static.stats.generated_tokens == greedy_pairs.stats.generated_tokens
    plain = generate_pairs(model, tiny_tokenizer, PROMPTS, HEADS[:1], **{**kw, "backend": "generate"})
    assert (other.chosen, other.rejected) == (plain.chosen, plain.rejected)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the backend made here released its hooks


def test_backend_is_part_of_the_cache_fingerprint(model, tiny_tokenizer, tmp_path):
    kw = dict(temperature=0.9, top_k=0, seed=3, max_new_tokens=4, batch_size=2, show_progress=False, cache_dir=tmp_path)
    plain = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, backend="generate", **kw)
    static = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, backend="static", **kw)
    assert static.fingerprint != plain.fingerprint and static.stats.batches_from_cache == 0
    again = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, backend="static", **kw)
    assert again.stats.batches_from_cache == 2 and (again.chosen, again.rejected) == (static.chosen, static.rejected)
    assert (
        generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, backend="auto", **kw).fingerprint == plain.fingerprint
    )  # auto is `generate` without CUDA


def test_a_backends_sampling_stream_is_part_of_the_cache_fingerprint(model, tiny_tokenizer, tmp_path):
    """A backend whose sampled draws changed under the same name (vLLM's did: its per-request generators, then
    `SeededSampler`) names its new stream, and pairs cached from the old stream are not reused."""

    class Redrawn(GenerateBackend):
        sampling_stream = "another_draw"

    kw = dict(temperature=0.9, top_k=0, seed=3, max_new_tokens=4, batch_size=2, show_progress=False, cache_dir=tmp_path)
    plain = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, backend=GenerateBackend(), **kw)
    redrawn = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, backend=Redrawn(), **kw)
    assert redrawn.fingerprint != plain.fingerprint and redrawn.stats.batches_from_cache == 0
    again = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, backend="generate", **kw)
    assert again.fingerprint == plain.fingerprint and again.stats.batches_from_cache == 2


def test_cache_fingerprint_tracks_weights(tiny_tokenizer, tmp_path):
    a, b = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=0)
    assert hash_weights(a) == hash_weights(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert hash_weights(a) != hash_weights(b)
    kw = dict(temperature=0.0, max_new_tokens=3, batch_size=4, cache_dir=tmp_path, show_progress=False)
    generate_pairs(a, tiny_tokenizer, PROMPTS[:2], HEADS, **kw)
    counter = CountingGenerate(b)
    generate_pairs(b, tiny_tokenizer, PROMPTS[:2], HEADS, **kw)
    assert counter.calls == 2


def test_interrupted_generation_resumes_to_identical_pairs(model, tiny_tokenizer, tmp_path):
    prompts = PROMPTS[:4]
    kw = dict(temperature=0.8, top_k=0, seed=7, max_new_tokens=4, batch_size=2, show_progress=False)
    reference = generate_pairs(model, tiny_tokenizer, prompts, HEADS, cache_dir=tmp_path / "a", **kw)
    counter = CountingGenerate(model, fail_on=3)  # dies in the second batch
    try:
        with pytest.raises(KeyboardInterrupt):
            generate_pairs(model, tiny_tokenizer, prompts, HEADS, cache_dir=tmp_path / "b", **kw)
        [records] = (tmp_path / "b").glob("*/pairs.rank0.jsonl")
        assert len(records.read_text().splitlines()) == 1, "the finished batch must be on disk"
        counter.fail_on = None
        resumed = generate_pairs(model, tiny_tokenizer, prompts, HEADS, cache_dir=tmp_path / "b", **kw)
        assert counter.calls == 3 + 2, "only the unfinished batch is generated again"
        assert resumed.stats.batches_from_cache == 1
    finally:
        model.generate = counter.inner
    assert (resumed.chosen, resumed.rejected) == (reference.chosen, reference.rejected)
    # Sampling really happened (another seed gives other text), so the equality above is meaningful.
    other = generate_pairs(model, tiny_tokenizer, prompts, HEADS, **{**kw, "seed": 8})
    assert (other.chosen, other.rejected) != (reference.chosen, reference.rejected)
    meta = json.loads(next((tmp_path / "b").glob("*/pairs.meta.json")).read_text())
    assert meta["info"]["heads"] == [f"{layer}-{head}" for layer, head in HEADS]
    assert meta["info"]["num_prompts"] == len(prompts)


def test_model_generation_config_is_part_of_the_fingerprint(tiny_tokenizer, tmp_path):
    """Changing the model's own generation defaults (repetition_penalty, eos_token_id) changes the pairs: the cache
    must not serve the old ones."""
    model = make_tiny_model("llama")
    kw = dict(temperature=0.0, max_new_tokens=3, batch_size=4, cache_dir=tmp_path, show_progress=False)
    counter = CountingGenerate(model)
    try:
        generate_pairs(model, tiny_tokenizer, PROMPTS[:2], HEADS, **kw)
        assert counter.calls == 2
        generate_pairs(model, tiny_tokenizer, PROMPTS[:2], HEADS, **kw)
        assert counter.calls == 2
        model.generation_config.repetition_penalty = 1.3
        generate_pairs(model, tiny_tokenizer, PROMPTS[:2], HEADS, **kw)
        assert counter.calls == 4
        model.generation_config.eos_token_id = 5
        generate_pairs(model, tiny_tokenizer, PROMPTS[:2], HEADS, **kw)
        assert counter.calls == 6
    finally:
        model.generate = counter.inner


def _batch_files(root):
    return sorted(root.glob("*/pairs.rank*.jsonl")) + sorted(root.glob("chosen-*/chosen.rank*.jsonl"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edited"])
def test_damaged_cache_files_are_named_and_regenerated(model, tiny_tokenizer, tmp_path, damage):
    kw = dict(temperature=0.8, top_k=0, seed=2, max_new_tokens=4, batch_size=2, show_progress=False)
    reference = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, cache_dir=tmp_path, **kw)
    [path] = sorted(tmp_path.glob("*/pairs.rank0.jsonl"))
    lines = path.read_text().splitlines(keepends=True)
    if damage == "truncate":  # killed mid-write: the last line is cut short
        path.write_text(lines[0] + lines[1][:25])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xffnot json at all\n" + lines[1].encode())
    else:  # valid JSON, but the record no longer fits its batch (one response too few)
        record = json.loads(lines[0])
        record["rejected"] = record["rejected"][:1]
        path.write_text(json.dumps(record) + "\n" + lines[1])
    counter = CountingGenerate(model)
    try:
        if damage == "truncate":
            again = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, cache_dir=tmp_path, **kw)
        else:
            with pytest.warns(UserWarning, match=str(path.name)):
                again = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, cache_dir=tmp_path, **kw)
    finally:
        model.generate = counter.inner
    assert counter.calls == 1, "only the damaged batch's rejected responses are generated again"
    assert (again.chosen, again.rejected) == (reference.chosen, reference.rejected)
    # The file was repaired: a third run reads it cleanly and generates nothing.
    counter = CountingGenerate(model)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            third = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, cache_dir=tmp_path, **kw)
    finally:
        model.generate = counter.inner
    assert counter.calls == 0 and third.rejected == reference.rejected


def _snapshot(root):
    """Every path under `root` with its modification time and bytes: any write shows."""
    return {p: (p.stat().st_mtime_ns, None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def test_read_only_complete_cache_is_read_without_writing(model, tiny_tokenizer, tmp_path):
    kw = dict(temperature=0.0, max_new_tokens=3, batch_size=2, cache_dir=tmp_path, show_progress=False)
    first = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, **kw)
    before = _snapshot(tmp_path)
    for p in [tmp_path, *tmp_path.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    counter = CountingGenerate(model)
    try:
        again = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, **kw)
    finally:
        model.generate = counter.inner
        for p in [tmp_path, *tmp_path.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert counter.calls == 0 and (again.chosen, again.rejected) == (first.chosen, first.rejected)
    assert _snapshot(tmp_path) == before  # also as root, whom chmod does not stop: nothing was written


@pytest.mark.parametrize("bad", ["", "   ", [{"role": "user", "content": " "}], []])
@pytest.mark.parametrize("alone", [True, False])
def test_empty_prompts_are_refused_before_generation(model, tiny_tokenizer, bad, alone):
    """Alone in a batch or among others, an empty prompt is named by its index before anything is generated."""
    prompts = [bad] if alone else [CHATS[0] if isinstance(bad, list) else PROMPTS[0], bad, PROMPTS[1]]
    counter = CountingGenerate(model)
    try:
        with pytest.raises(ValueError, match=f"Prompt {0 if alone else 1} is empty"):
            generate_pairs(
                model,
                tiny_tokenizer,
                prompts,
                HEADS,
                temperature=0.0,
                max_new_tokens=2,
                batch_size=4,
                show_progress=False,
            )
    finally:
        model.generate = counter.inner
    assert counter.calls == 0


def test_prompts_are_encoded_as_dpo_trainer_encodes_them(tiny_tokenizer):
    """TRL 1.16's DPOTrainer tokenizes a chat prompt with `apply_chat_template(..., add_generation_prompt=True,
    tokenize=True)` and a string prompt with `tokenizer(text=...)`; pair generation must see the same ids."""
    expected = [
        tiny_tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for c in CHATS
    ]
    expected += [tiny_tokenizer(text=p)["input_ids"] for p in PROMPTS]
    assert encode_prompts(tiny_tokenizer, CHATS + PROMPTS) == [list(x) for x in expected]


TOOLED_TEMPLATE = (  # renders `tools` and a `mood` template argument, as a tool-calling or reasoning template would
    "{% if tools %}<|user|> {% for t in tools %}{{ t['name'] }} {% endfor %}{% endif %}"
    "{% for m in messages %}{{ '<|user|> ' if m['role'] == 'user' else '<|assistant|> ' }}{{ m['content'] }} "
    "{% endfor %}{% if mood %}{{ mood }} {% endif %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def test_rows_tools_and_template_kwargs_shape_the_prompt_as_in_dpo(model, tiny_tokenizer):
    """A row's `tools` (list or JSON string) and `chat_template_kwargs` are rendered into the prompt the responses are
    generated after, as TRL 1.16's DPOTrainer renders that row for training (kept columns); other rows are not."""
    import copy
    import json

    from datasets import Dataset

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TOOLED_TEMPLATE
    rows = {
        "prompt": CHATS[:3],
        "tools": [json.dumps([{"name": "water"}]), None, None],
        "chat_template_kwargs": [{}, {"mood": "very good"}, {}],
    }
    ds = Dataset.from_dict(rows)
    out, _ = complete_prompt_dataset(
        ds, model, tok, HEADS, temperature=0.0, max_new_tokens=6, batch_size=4, show_progress=False, drop_empty=False
    )
    assert out.column_names == ["prompt", "tools", "chat_template_kwargs", "chosen", "rejected"]

    def dpo_prompt_ids(row):  # trl/trainer/dpo_trainer.py (1.16) `tokenize_fn`, verbatim kwargs
        tools = json.loads(row["tools"]) if isinstance(row["tools"], str) else row["tools"]
        kwargs = {"tools": tools, **(row.get("chat_template_kwargs") or {})}
        return tok.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs
        )["input_ids"]

    expected_ids = [list(dpo_prompt_ids(r)) for r in ds]
    assert expected_ids[0][:2] == tok("<|user|> water", add_special_tokens=False)["input_ids"]
    assert expected_ids[1][-3:] == tok("very good <|assistant|>", add_special_tokens=False)["input_ids"]
    kwargs = [{"tools": [{"name": "water"}]}, {"mood": "very good"}, None]
    assert encode_prompts(tok, CHATS[:3], kwargs) == expected_ids
    assert encode_prompts(tok, CHATS[:3])[:2] != expected_ids[:2]  # without them, other prompts

    def greedy(ids, heads=()):
        with torch.no_grad(), mask_heads(model, list(heads)):
            new = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :]
        return tok.decode(new, skip_special_tokens=True)

    by_prompt = {json.dumps(r["prompt"]): r for r in out}
    for row, ids in zip(ds, expected_ids):
        got = by_prompt.get(json.dumps(row["prompt"]))
        if got is not None:  # kept: both responses follow exactly DPO's prompt
            assert got["chosen"][0]["content"] == greedy(ids)
            assert got["rejected"][0]["content"] == greedy(ids, HEADS)
        else:
            assert greedy(ids).strip() == greedy(ids, HEADS).strip()
    only_kwargs = Dataset.from_dict({"prompt": CHATS[1:2], "chat_template_kwargs": [{"mood": "very good"}]})
    out2, _ = complete_prompt_dataset(
        only_kwargs, model, tok, HEADS, temperature=0.0, max_new_tokens=6, show_progress=False
    )
    assert out2[0]["chosen"][0]["content"] == greedy(expected_ids[1])  # (all dropped would have raised)
    with pytest.raises(ValueError, match="`tools` column holds a string that is not JSON"):
        complete_prompt_dataset(Dataset.from_dict({"prompt": CHATS[:1], "tools": ["[{"]}), model, tok, HEADS)
    with pytest.raises(ValueError, match=r"^The `chat_template_kwargs` column must hold dicts, got str: 'mood'$"):
        complete_prompt_dataset(
            Dataset.from_dict({"prompt": CHATS[:1], "chat_template_kwargs": ["mood"]}), model, tok, HEADS
        )


@pytest.mark.filterwarnings("ignore:.*plain strings")  # string prompts on purpose
def test_prompt_dataset_completion_keeps_columns_and_passes_preferences(model, tiny_tokenizer):
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": PROMPTS, "id": list(range(len(PROMPTS)))})
    out, stats = complete_prompt_dataset(
        ds, model, tiny_tokenizer, HEADS, temperature=0.0, max_new_tokens=6, batch_size=4, show_progress=False
    )
    assert out.column_names == ["prompt", "id", "chosen", "rejected"]
    for row in out:
        assert row["prompt"] == PROMPTS[row["id"]]
        assert row["chosen"] == independent(model, tiny_tokenizer, row["prompt"])
        assert row["rejected"] == independent(model, tiny_tokenizer, row["prompt"], HEADS)
    assert len(out) == stats.kept
    prefs = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
    same, none = complete_prompt_dataset(prefs, model, tiny_tokenizer, HEADS)
    assert same is prefs and none is None


def test_errors_before_generation(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="out of range"):
        generate_pairs(model, tiny_tokenizer, PROMPTS, [(5, 0)])
    with pytest.raises(ValueError, match=r"^No prompts to generate pairs for: the prompt dataset is empty\.$"):
        generate_pairs(model, tiny_tokenizer, [], HEADS)
    with pytest.raises(
        ValueError,
        match=r"^No heads to mask: the selection is empty\. Lower `mask_threshold` or set "
        r"`mask_top_k`\.$",
    ):
        generate_pairs(model, tiny_tokenizer, PROMPTS, [])
    with pytest.raises(ValueError, match=r"^template_kwargs has 1 entries for 2 prompts\.$"):
        generate_pairs(model, tiny_tokenizer, PROMPTS[:2], HEADS, template_kwargs=[{}])
    with pytest.raises(ValueError, match="`backend` must be one of auto, generate, static, vllm"):
        generate_pairs(model, tiny_tokenizer, PROMPTS, HEADS, backend="tgi")


@pytest.mark.real_model
def test_real_model_pairs(smollm2):
    model, tokenizer = smollm2
    heads = [(layer, 0) for layer in range(0, 30, 3)]
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Name a colour of the sky."}],
    ]
    pairs = generate_pairs(
        model,
        tokenizer,
        chats,
        heads,
        temperature=0.0,
        max_new_tokens=5,
        batch_size=2,
        show_progress=False,
        backend="generate",
    )  # "auto" may pick vLLM: tests/test_vllm.py

    def one(chat, masked):
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad(), mask_heads(model, heads if masked else []):
            out = model.generate(**ids, max_new_tokens=5, do_sample=False)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    assert pairs.chosen == [one(c, False) for c in chats]
    assert pairs.rejected == [one(c, True) for c in chats]


def test_plain_string_prompts_for_a_chat_model_warn(model, tiny_tokenizer):
    """A chat model given raw strings would train on text continuations: warn; chat messages and strings already
    rendered through the template pass silently."""
    import warnings

    from datasets import Dataset

    kw = dict(temperature=0.0, max_new_tokens=2, batch_size=4, show_progress=False)
    assert tiny_tokenizer.chat_template
    with pytest.warns(UserWarning) as record:
        complete_prompt_dataset(Dataset.from_dict({"prompt": PROMPTS[:2]}), model, tiny_tokenizer, HEADS, **kw)
    assert str(record[0].message) == (
        "2 of 2 prompts of the train dataset are plain strings although the tokenizer has a chat template: pairs are "
        "generated (and DPO trains) on raw text continuations, not chat answers. Pass conversational prompts "
        '({"prompt": [{"role": "user", "content": ...}]}) or render them with '
        "`tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)`."
    )
    # Rendered without the generation prompt: a user turn the model would continue, not answer.
    open_turns = [tiny_tokenizer.apply_chat_template(c, tokenize=False) for c in CHATS[:2]]
    assert all("<|user|>" in t and "<|assistant|>" not in t for t in open_turns)
    with pytest.warns(UserWarning, match="^2 of 2 prompts of the eval dataset"):
        complete_prompt_dataset(
            Dataset.from_dict({"prompt": open_turns}), model, tiny_tokenizer, HEADS, name="eval", **kw
        )
    rendered = [tiny_tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CHATS[:2]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        complete_prompt_dataset(Dataset.from_dict({"prompt": CHATS[:2]}), model, tiny_tokenizer, HEADS, **kw)
        complete_prompt_dataset(Dataset.from_dict({"prompt": rendered}), model, tiny_tokenizer, HEADS, **kw)
    # A strict template (as Mistral's) refuses any message that is not a user turn: the probe must be one.
    import copy

    strict = copy.deepcopy(tiny_tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'user' %}{{ raise_exception('user turns "
        "only') }}{% endif %}<|user|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    with pytest.warns(UserWarning, match="^2 of 2 prompts of the train dataset are plain strings"):
        complete_prompt_dataset(Dataset.from_dict({"prompt": PROMPTS[:2]}), model, strict, HEADS, **kw)


# ------------------------------------------------------------------ mutation-tested edges (docs/testing.md)
def _record(indices, chosen, rejected, chosen_tokens, rejected_tokens, seconds):
    return {
        "indices": indices,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_tokens": chosen_tokens,
        "rejected_tokens": rejected_tokens,
        "seconds": seconds,
    }


RECORDS = [  # two batches, out of input order, as the runner returns them
    _record([3, 0], ["a", " b "], ["a ", "c"], [2, 4], [3, 5], 1.5),
    _record([1, 2, 4], ["", "x", " "], ["", "", "y"], [0, 1, 1], [0, 0, 2], 0.5),
]


def test_assemble_places_responses_and_applies_the_drop_rules():
    from trl_retmask.pairs import _assemble

    prompts = [f"p{i}" for i in range(5)]
    p = _assemble(prompts, RECORDS, "fp", 1, drop_empty=False)
    assert (p.chosen, p.rejected) == ([" b ", "", "x", "a", " "], ["c", "", "", "a ", "y"])
    assert p.keep == [True, False, True, False, True]  # identical after stripping (two empty ones too): dropped
    assert p.extra == {"chosen_tokens": [4, 0, 1, 2, 1], "rejected_tokens": [5, 0, 0, 3, 2]}
    s = p.stats
    assert (s.prompts, s.kept, s.dropped_identical, s.dropped_empty) == (5, 3, 2, 0)
    assert (s.batches_generated, s.batches_from_cache, p.fingerprint) == (1, 1, "fp")
    assert (s.mean_chosen_tokens, s.mean_rejected_tokens) == (pytest.approx(6 / 3), pytest.approx(7 / 3))
    assert (s.generated_tokens, s.generation_seconds, s.tokens_per_second) == (18, 2.0, 9.0)
    assert p.to_dataset().to_dict() == {
        "prompt": ["p0", "p2", "p4"],
        "chosen": [" b ", "x", " "],
        "rejected": ["c", "", "y"],
    }

    strict = _assemble(prompts, RECORDS, "", 2, drop_empty=True)  # an empty side is dropped before identity
    assert strict.keep == [True, False, False, False, False]
    assert (strict.stats.dropped_empty, strict.stats.dropped_identical, strict.stats.kept) == (3, 1, 1)
    assert (strict.stats.mean_chosen_tokens, strict.stats.mean_rejected_tokens) == (4.0, 5.0)
    assert (strict.stats.batches_generated, strict.stats.batches_from_cache) == (2, 0)


def test_assemble_without_time_or_kept_pairs():
    from trl_retmask.pairs import _assemble

    p = _assemble(["q"], [_record([0], ["same"], [" same"], [3], [4], 0)], "", 0, drop_empty=False)
    s = p.stats
    assert (s.kept, s.mean_chosen_tokens, s.mean_rejected_tokens, s.tokens_per_second) == (0, 0.0, 0.0, 0.0)
    assert (s.generated_tokens, s.batches_from_cache) == (7, 1)
    assert s.to_logs(prefix="x/")["x/generated_tokens"] == 7.0 and p.kept_indices == []


def test_stored_batch_records_are_checked_field_by_field():
    from trl_retmask.pairs import _batch_key, _valid_part

    good = _record([4, 7], ["a", "b"], ["c", "d"], [1, 2], [3, 4], 0.25)
    assert _valid_part(good, "chosen", [4, 7]) and _valid_part(good, "rejected", [4, 7])
    assert _valid_part({**good, "seconds": 1}, "chosen", [4, 7])  # an int time is a time
    assert not _valid_part(good, "chosen", None)  # a batch the run does not have
    assert not _valid_part(good, "chosen", [7, 4])
    for damage in (
        {"chosen": "ab"},
        {"chosen_tokens": (1, 2)},
        {"chosen": ["a"]},
        {"chosen_tokens": [1]},
        {"chosen": ["a", 2]},
        {"chosen_tokens": [1, 2.0]},
    ):
        assert not _valid_part({**good, **damage}, "chosen", [4, 7]), damage
        assert _valid_part({**good, **damage}, "rejected", [4, 7])  # the other role is untouched
    for damage in ({"seconds": "0.25"}, {"seconds": None}, {"indices": None}):
        assert not _valid_part({**good, **damage}, "chosen", [4, 7]), damage
    assert _batch_key((12, [0])) == "batch_000012"


def test_prompt_forms(tiny_tokenizer):
    from datasets import Dataset, IterableDataset

    from trl_retmask.chat import is_conversational_prompt
    from trl_retmask.pairs import as_completion, is_prompt_only

    chat = [{"role": "user", "content": "hi"}]
    assert is_conversational_prompt(chat) and not is_conversational_prompt([]) and not is_conversational_prompt("hi")
    assert as_completion(chat, "yes") == [{"role": "assistant", "content": "yes"}] and as_completion("q", "a") == "a"
    assert is_prompt_only(Dataset.from_dict({"prompt": ["a"]}))
    assert not is_prompt_only(Dataset.from_dict({"prompt": ["a"], "chosen": ["b"]}))
    assert not is_prompt_only(Dataset.from_dict({"prompt": ["a"], "rejected": ["b"]}))
    assert not is_prompt_only(Dataset.from_dict({"question": ["a"]}))
    streamed = IterableDataset.from_generator(lambda: iter([{"prompt": "a"}]))
    assert is_prompt_only(streamed)  # columns read from the first row when unknown
    with pytest.raises(
        ValueError,
        match=r"^The train dataset is a prompt-only IterableDataset; pair generation "
        r"needs a map-style `datasets.Dataset` \(e.g. load it without "
        r"`streaming=True`\)\.$",
    ):
        complete_prompt_dataset(streamed, None, tiny_tokenizer, HEADS)
    with pytest.raises(ValueError, match="A prompt must be a string or a list of chat messages, got int: 3"):
        encode_prompts(tiny_tokenizer, [3])


def test_batch_size_edge(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        generate_pairs(model, tiny_tokenizer, PROMPTS, HEADS, batch_size=0)
    one = generate_pairs(
        model, tiny_tokenizer, PROMPTS[:2], HEADS, temperature=0.0, max_new_tokens=3, batch_size=1, show_progress=False
    )
    assert one.chosen == [independent(model, tiny_tokenizer, p, max_new_tokens=3) for p in PROMPTS[:2]]
    assert one.stats.batches_generated == 2


@pytest.mark.filterwarnings("ignore:.*plain strings")
def test_all_pairs_dropped_is_an_error(model, tiny_tokenizer, monkeypatch):
    from datasets import Dataset

    import trl_retmask.pairs

    monkeypatch.setattr(trl_retmask.pairs, "generate_batch", lambda m, t, ids, *a, **k: [[5, 6]] * len(ids))
    ds = Dataset.from_dict({"prompt": PROMPTS[:2]})
    with pytest.raises(
        ValueError,
        match=r"^All 2 generated pairs of the train dataset were dropped \(2 identical, 0 "
        r"empty\): masking these heads does not change the model's answers\. Mask "
        r"more or other heads \(`mask_threshold` / `mask_top_k`\), sample "
        r"\(`temperature` > 0\), or raise `max_new_tokens`\.$",
    ):
        complete_prompt_dataset(
            ds, model, tiny_tokenizer, HEADS, temperature=0.0, max_new_tokens=2, show_progress=False
        )


def test_generate_pairs_defaults_are_the_documented_ones():
    """The keyword defaults the docstring and docs/fidelity.md state (the authors' temperature 0.6, top_p 1.0)."""
    import inspect

    params = inspect.signature(generate_pairs).parameters
    assert {
        k: params[k].default
        for k in (
            "max_new_tokens",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "batch_size",
            "show_progress",
            "desc",
            "backend",
            "drop_empty",
        )
    } == {
        "max_new_tokens": 256,
        "temperature": 0.6,
        "top_p": 1.0,
        "top_k": None,
        "seed": 0,
        "batch_size": 8,
        "show_progress": True,
        "desc": "RetMask pairs",
        "backend": "auto",
        "drop_empty": False,
    }


def test_a_damaged_shared_chosen_part_is_generated_again(model, tiny_tokenizer, tmp_path):
    """The chosen responses shared between head sets are reused only when their record fits its batch: a run with
    other heads regenerates a damaged one (and its rejected responses), and its pairs equal an uncached run's."""
    kw = dict(temperature=0.8, top_k=0, seed=2, max_new_tokens=4, batch_size=2, show_progress=False)
    generate_pairs(model, tiny_tokenizer, PROMPTS[:4], HEADS, cache_dir=tmp_path, **kw)
    [path] = sorted(tmp_path.glob("chosen-*/chosen.rank0.jsonl"))
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[0])
    record["chosen"] = record["chosen"][:1]  # one response too few
    path.write_text(json.dumps(record) + "\n" + "".join(lines[1:]))
    other_heads = [(0, 0), (2, 3)]
    counter = CountingGenerate(model)
    try:
        with pytest.warns(UserWarning, match="chosen.rank0.jsonl"):
            other = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], other_heads, cache_dir=tmp_path, **kw)
    finally:
        model.generate = counter.inner
    assert counter.calls == 3  # rejected of both batches (new heads), chosen of the damaged batch only
    fresh = generate_pairs(model, tiny_tokenizer, PROMPTS[:4], other_heads, **kw)
    assert (other.chosen, other.rejected) == (fresh.chosen, fresh.rejected)


def test_chat_prompts_get_no_second_bos_and_auto_backend_sees_the_model(model, tiny_tokenizer, monkeypatch):
    """With a tokenizer that adds BOS itself, a rendered chat prompt is tokenized without special tokens (its
    template already holds them; DPOTrainer does the same) and a plain string as is; the `auto` backend is chosen
    from the model's device, so the model must reach it."""
    import copy

    from tokenizers.processors import TemplateProcessing
    from trl.data_utils import maybe_apply_chat_template

    import trl_retmask.pairs as pairs_module

    bos_tok = copy.deepcopy(tiny_tokenizer)
    bos_tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_tok.bos_token_id)]
    )
    chat, text = [{"role": "user", "content": "the man said"}], "the man said"
    rendered = maybe_apply_chat_template({"prompt": chat}, bos_tok)["prompt"]
    assert bos_tok(rendered)["input_ids"][0] == bos_tok.bos_token_id  # the tokenizer adds BOS on its own
    assert encode_prompts(bos_tok, [chat, text]) == [
        bos_tok(rendered, add_special_tokens=False)["input_ids"],
        bos_tok(text)["input_ids"],
    ]
    seen = []
    real = pairs_module.make_backend
    monkeypatch.setattr(
        pairs_module,
        "make_backend",
        lambda choice, m=None, vllm=None: seen.append((choice, m)) or real(choice, m, vllm),
    )
    generate_pairs(model, tiny_tokenizer, PROMPTS[:1], HEADS, temperature=0.0, max_new_tokens=2, show_progress=False)
    assert seen == [("auto", model)]
