"""Pair generation: exact agreement with independent `generate` calls, filtering, statistics and the on-disk cache."""

import json

import pytest
import torch

from tests.tiny import make_tiny_model
from trl_retmask import mask_heads
from trl_retmask.pairs import PairStats, complete_prompt_dataset, generate_pairs, hash_weights

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


def independent(model, tokenizer, prompt, heads=None, max_new_tokens=6):
    """One unbatched greedy generate call, built here without the pairs module. A string prompt's response is the
    text that decoding prompt+response adds to decoding the prompt (what DPO's `prompt + chosen` must re-tokenize
    to); a chat response is decoded alone."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad(), mask_heads(model, heads or []):
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    n = ids["input_ids"].shape[1]
    if isinstance(prompt, list):
        return tokenizer.decode(out[0, n:], skip_special_tokens=True)
    return tokenizer.decode(out[0], skip_special_tokens=True)[len(tokenizer.decode(out[0, :n],
                                                                                     skip_special_tokens=True)):]


class CountingGenerate:
    """Wraps `model.generate` to count calls and optionally fail on the n-th one (a simulated interruption)."""

    def __init__(self, model, fail_on=None):
        self.model, self.inner, self.calls, self.fail_on = model, model.generate, 0, fail_on
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def greedy_pairs(model, tiny_tokenizer):
    return generate_pairs(model, tiny_tokenizer, PROMPTS, HEADS, temperature=0.0, max_new_tokens=6, batch_size=4,
                          show_progress=False)


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
            new = model.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
        if any(t in special or t >= len(tiny_tokenizer) for t in new):
            continue  # special or out-of-vocabulary ids vanish in decoding; nothing to compare
        assert tiny_tokenizer(prompt + text)["input_ids"] == ids["input_ids"][0].tolist() + new
        checked += 1
    assert checked >= 2


def test_conversational_prompts_use_the_chat_template(model, tiny_tokenizer):
    pairs = generate_pairs(model, tiny_tokenizer, CHATS, HEADS, temperature=0.0, max_new_tokens=6, batch_size=3,
                           show_progress=False)
    assert pairs.chosen == [independent(model, tiny_tokenizer, c) for c in CHATS]
    assert pairs.rejected == [independent(model, tiny_tokenizer, c, HEADS) for c in CHATS]
    ds = pairs.to_dataset()
    for row in ds:
        assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
        assert isinstance(row["prompt"], list)


def test_filtering_and_stats(greedy_pairs, tiny_tokenizer):
    p = greedy_pairs
    empty = [not c.strip() or not r.strip() for c, r in zip(p.chosen, p.rejected)]
    same = [not e and c.strip() == r.strip() for e, c, r in zip(empty, p.chosen, p.rejected)]
    s = p.stats
    assert (s.prompts, s.dropped_empty, s.dropped_identical) == (len(PROMPTS), sum(empty), sum(same))
    assert s.kept == len(PROMPTS) - sum(empty) - sum(same) == len(p.to_dataset())
    assert p.keep == [not (e or d) for e, d in zip(empty, same)]
    # Token lengths: count the generated tokens up to the first EOS, independently of the module.
    kept = p.kept_indices
    lens = p.extra["chosen_tokens"]
    for i in kept:
        assert lens[i] <= 6
        assert len(tiny_tokenizer(p.chosen[i], add_special_tokens=False)["input_ids"]) <= lens[i]
    assert s.mean_chosen_tokens == pytest.approx(sum(lens[i] for i in kept) / len(kept))
    assert s.tokens_per_second > 0 and s.generation_seconds > 0
    assert set(s.to_logs()) == {f"pairs/{k}" for k in PairStats().to_dict()}


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
        assert len(list((tmp_path / "b").glob("*/batch_*.json"))) == 1, "the finished batch must be on disk"
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
    meta = json.loads(next((tmp_path / "b").glob("*/meta.json")).read_text())
    assert meta["heads"] == [list(h) for h in HEADS] and meta["num_prompts"] == len(prompts)


@pytest.mark.filterwarnings("ignore:.*plain strings")  # string prompts on purpose
def test_prompt_dataset_completion_keeps_columns_and_passes_preferences(model, tiny_tokenizer):
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": PROMPTS, "id": list(range(len(PROMPTS)))})
    out, stats = complete_prompt_dataset(ds, model, tiny_tokenizer, HEADS, temperature=0.0, max_new_tokens=6,
                                         batch_size=4, show_progress=False)
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
    with pytest.raises(ValueError, match="empty"):
        generate_pairs(model, tiny_tokenizer, [], HEADS)
    with pytest.raises(ValueError, match="No heads"):
        generate_pairs(model, tiny_tokenizer, PROMPTS, [])


@pytest.mark.real_model
def test_real_model_pairs(smollm2):
    model, tokenizer = smollm2
    heads = [(layer, 0) for layer in range(0, 30, 3)]
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Name a colour of the sky."}]]
    pairs = generate_pairs(model, tokenizer, chats, heads, temperature=0.0, max_new_tokens=5, batch_size=2,
                           show_progress=False)

    def one(chat, masked):
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad(), mask_heads(model, heads if masked else []):
            out = model.generate(**ids, max_new_tokens=5, do_sample=False)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    assert pairs.chosen == [one(c, False) for c in chats]
    assert pairs.rejected == [one(c, True) for c in chats]


def test_plain_string_prompts_for_a_chat_model_warn(model, tiny_tokenizer):
    """A chat model given raw strings would train on text continuations: warn; chat messages and strings already
    rendered through the template pass silently."""
    import warnings

    from datasets import Dataset

    kw = dict(temperature=0.0, max_new_tokens=2, batch_size=4, show_progress=False)
    assert tiny_tokenizer.chat_template
    with pytest.warns(UserWarning, match="2 of 2 prompts of the train dataset are plain strings"):
        complete_prompt_dataset(Dataset.from_dict({"prompt": PROMPTS[:2]}), model, tiny_tokenizer, HEADS, **kw)
    rendered = [tiny_tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CHATS[:2]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        complete_prompt_dataset(Dataset.from_dict({"prompt": CHATS[:2]}), model, tiny_tokenizer, HEADS, **kw)
        complete_prompt_dataset(Dataset.from_dict({"prompt": rendered}), model, tiny_tokenizer, HEADS, **kw)
