"""Batched generation (`generate_batch` through the plain `model.generate` backend), checked against unpadded
one-prompt-at-a-time generation."""

from pathlib import Path

import pytest
import torch

from tests.tiny import make_tiny_model
from trl_retmask.chat import check_prompts
from trl_retmask.generation import GenerateBackend, generate_batch, make_generation_config
from trl_retmask.masking import mask_heads

REPO = Path(__file__).resolve().parents[1]
HEADS = [(0, 1), (1, 2), (2, 0)]


PROMPT_IDS = [[1, 10, 11, 12, 13, 14, 15], [1, 20, 21], [1, 30, 31, 32, 33], [1, 40]]


def _one_by_one(model, prompt_ids, config, heads=None):
    """Independent reference: each prompt alone (no padding) through `model.generate`, cut after the first EOS."""
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        with torch.no_grad(), mask_heads(model, heads or []):
            new = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)[
                0, len(ids) :
            ]
        new = new.tolist()
        out.append(new[: new.index(2) + 1] if 2 in new else new)  # eos_token_id = 2
    return out


@pytest.mark.parametrize("heads", [None, HEADS])
def test_generate_batch_equals_unpadded_generation(tiny_tokenizer, heads):
    model = make_tiny_model("llama").train()  # left in training mode: the helper decodes in eval mode
    config = make_generation_config(model, 6)
    side = tiny_tokenizer.padding_side
    got = generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, heads=heads)
    assert model.training and tiny_tokenizer.padding_side == side  # both given back untouched
    model.eval()
    assert got == _one_by_one(model, PROMPT_IDS, config, heads)
    if heads:  # the mask is applied: the masked batch differs from the unmasked one somewhere
        assert got != generate_batch(model, tiny_tokenizer, PROMPT_IDS, config)


def test_generate_batch_works_without_a_pad_token(tiny_tokenizer):
    model = make_tiny_model("llama")
    config = make_generation_config(model, 4)
    tok = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tok.pad_token = None
    assert tok.pad_token_id is None
    assert generate_batch(model, tok, PROMPT_IDS, config) == _one_by_one(model, PROMPT_IDS, config)


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng(tiny_tokenizer):
    model = make_tiny_model("llama")
    config = make_generation_config(model, 8, temperature=1.5)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, seed=5)
    assert a != generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, seed=6)  # it does sample


def test_backend_is_pluggable_and_owns_the_mask(tiny_tokenizer):
    calls = []

    class Counting(GenerateBackend):
        def __call__(self, model, input_ids, attention_mask, generation_config, *, heads=(), masked):
            calls.append((list(heads), list(masked)))
            assert input_ids.shape == attention_mask.shape and (attention_mask[:, -1] == 1).all()  # left padding
            return super().__call__(model, input_ids, attention_mask, generation_config, heads=heads, masked=masked)

    model = make_tiny_model("llama")
    config = make_generation_config(model, 3)
    assert generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, heads=HEADS, backend=Counting()) == generate_batch(
        model, tiny_tokenizer, PROMPT_IDS, config, heads=HEADS
    )
    assert calls == [(HEADS, [True] * 4)]
    assert not any(m._forward_pre_hooks for m in model.modules())  # the default backend's mask is gone


def test_mixed_rows_equal_their_own_calls(tiny_tokenizer):
    """Rows flagged `masked` decode as in a masked call, the others as in a plain one, in any order."""
    model = make_tiny_model("llama")
    config = make_generation_config(model, 6)
    flags = [True, False, False, True]
    got = generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, heads=HEADS, masked=flags)
    plain, masked = _one_by_one(model, PROMPT_IDS, config), _one_by_one(model, PROMPT_IDS, config, HEADS)
    assert plain != masked
    assert got == [masked[i] if f else plain[i] for i, f in enumerate(flags)]
    with pytest.raises(ValueError, match="one flag per prompt"):
        generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, heads=HEADS, masked=[True])
    with pytest.raises(ValueError, match="no heads are given"):
        generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, masked=flags)


def test_empty_prompts_refused_alone_and_in_a_batch(tiny_tokenizer):
    model = make_tiny_model("llama")
    model.generate = lambda *a, **k: pytest.fail("generated although a prompt is empty")
    for prompt_ids, index in (([[]], 0), ([[1, 5], [], [1, 6, 7]], 1)):
        with pytest.raises(ValueError, match=f"Prompt {index} encodes to no tokens"):
            generate_batch(model, tiny_tokenizer, prompt_ids, make_generation_config(model, 3))
    for prompts, index in (
        ([""], 0),
        (["a", " \n"], 1),
        ([[{"role": "user", "content": "x"}], []], 1),
        ([[{"role": "user", "content": [{"type": "text", "text": " "}]}]], 0),
    ):
        with pytest.raises(ValueError, match=f"Prompt {index} is empty"):
            check_prompts(prompts)
    with pytest.raises(ValueError, match="Prompt 0 must be a string"):
        check_prompts([3])
    check_prompts(["a", [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]])


def test_top_k_none_takes_the_model_value_or_off():
    """vLLM's rule: the model's generation config top_k, off (0) when it has none (transformers would use 50)."""
    model = make_tiny_model("llama")
    model.generation_config.top_k = None
    assert make_generation_config(model, 3, temperature=0.7, top_k=None).top_k == 0
    model.generation_config.top_k = 20
    assert make_generation_config(model, 3, temperature=0.7, top_k=None).top_k == 20
    assert make_generation_config(model, 3, temperature=0.7, top_k=5).top_k == 5
    assert make_generation_config(model, 3, top_k=None).top_k is None  # greedy: sampling fields cleared


def test_bad_generation_settings_are_refused():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="Unknown generation settings \\['temprature'\\]"):
        make_generation_config(model, 3, temprature=0.5)
    for kwargs, name in (
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ):
        with pytest.raises(ValueError, match=f"`{name}` must"):
            make_generation_config(model, **{"max_new_tokens": 3, **kwargs})


class Canned(GenerateBackend):
    """A backend that returns fixed rows: what `generate_batch` does after decoding, checked exactly."""

    def __init__(self, rows):
        self.rows = rows

    def __call__(self, model, input_ids, attention_mask, generation_config, *, heads=(), masked):
        return [list(r) for r in self.rows]


@pytest.mark.parametrize(
    "eos,rows,expected",
    [
        (2, [[5, 6, 2], [2, 7, 8], [5, 6, 7], [9, 2, 2]], [[5, 6, 2], [2], [5, 6, 7], [9, 2]]),  # last / first / none
        ([2, 7], [[5, 6, 7], [7, 2, 8], [5, 6, 9], [8, 2]], [[5, 6, 7], [7], [5, 6, 9], [8, 2]]),  # several EOS ids
        (None, [[5, 2, 7]], [[5, 2, 7]]),  # no EOS: nothing cut
    ],
)
def test_rows_are_cut_after_their_first_eos(eos, rows, expected):
    """An EOS at the last position keeps the whole row (EOS included); at the first, the row is the EOS alone."""
    model = make_tiny_model("llama")
    config = make_generation_config(model, 3)
    config.eos_token_id = eos
    tok = type("Tok", (), {"pad_token_id": 0})()
    assert generate_batch(model, tok, PROMPT_IDS[: len(rows)], config, backend=Canned(rows)) == expected


def test_temperature_zero_is_greedy_and_any_positive_temperature_samples():
    model = make_tiny_model("llama")
    greedy, hot = make_generation_config(model, 3, temperature=0.0), make_generation_config(model, 3, temperature=1e-6)
    assert (greedy.do_sample, greedy.temperature, greedy.top_k) == (False, None, None)
    assert (hot.do_sample, hot.temperature, hot.top_k) == (True, 1e-6, 0)
    assert make_generation_config(model, 1).max_new_tokens == 1  # the smallest budget is accepted
