"""Tiny randomly initialised decoders (grouped KV heads) and a small local tokenizer, built offline."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

from trl_retmask.checkpointing import is_checkpointing

# Every family whose attention `mask_heads` must serve. All use 4 query heads over 2 KV heads (GQA).
TINY_ARCHS = ["llama", "qwen2", "qwen3", "mistral", "olmo2", "olmo3", "gemma2", "gemma3_text", "phi3"]

VOCAB = 384


def tiny_config(arch: str = "llama", **overrides):
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if arch in ("gemma2", "gemma3_text"):
        kw.update(sliding_window=8, query_pre_attn_scalar=16)
    if arch == "gemma3_text":
        kw.update(layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if arch == "mistral":
        kw.update(sliding_window=None)
    if arch == "phi3":
        kw.pop("head_dim")
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def make_tiny_model(arch: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A float32, eval-mode, randomly initialised causal LM of the given family."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    except ValueError:  # e.g. Gemma2 (logit softcapping) has no sdpa path: it runs eager
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init leaves some norms at 0/1 and biases at 0; perturb everything so that no head is trivially silent.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.float().eval()


def make_tiny_tokenizer(save_dir):
    """A word-level tokenizer over a small vocabulary (ids < VOCAB), with a chat template; no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    words += [
        w
        for w in (
            "the a an is of to and in that it was for on are as with his they at be this from have or by one had "
            "not but what all were when we there can your which their said if do will each about how up out them "
            "then she many some so these would other into has more her two like him see time could no make than "
            "first been its who now people my made over did down only way find use may water long little very "
            "after words called just where most know get through back much go good new write our me man too any "
            "day same right look think also around another came come work three word must because does part even "
            "place well such here take why things help put years different away again off went old number great "
            "tell men say small every found still between name should home big give air line set own under read "
            "last never us left end along while might next sound below saw something thought both few those "
            "always looked show large often together asked house don world going want school important until form "
            "food keep children feet land side without boy once animals life enough took sometimes four head above "
            "kind began almost live page got earth need far hand high year mother light parts country father let "
            "night following picture being study second eyes soon times story boys since white days ever paper hard "
            "near sentence better best across during today others sure means knew its try told young miles sun ways "
            "thing whole hear example heard several change answer room sea against top turned learn point city play "
            "toward five using himself usually magic number secret ? . ,"
        ).split()
        if w not in words
    ]
    words = words[:VOCAB]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ '<|user|> ' if m['role'] == 'user' else '<|assistant|> ' }}{{ m['content'] }} "
        "{% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    fast.save_pretrained(save_dir)
    return PreTrainedTokenizerFast.from_pretrained(save_dir)


# A haystack and needles inside the tiny tokenizer's vocabulary, for NIAH and detection tests.
HAYSTACK = ("the man went home . she said that it was a long day . they found the old house near the sea . ") * 4
NEEDLE = {"needle": "the secret number is five .", "question": "what is the secret number ?", "real_needle": "five"}
OTHER_NEEDLE = {"needle": "the magic word is water .", "question": "what is the magic word ?", "real_needle": "water"}

# A one-row preference dataset: a trainer given it generates nothing.
PREFS = Dataset.from_dict({"prompt": ["a"], "chosen": ["the"], "rejected": ["sea"]})


def make_greedy(model, token_id: int):
    """Make `token_id` the greedy token at every step (a forward hook on `lm_head`); returns the hook's handle."""

    def hook(module, inputs, logits):
        logits[..., token_id] += 1e4
        return logits

    return model.lm_head.register_forward_hook(hook)


class CheckpointingProbe(TrainerCallback):
    """Records, at the start of each step, whether activation checkpointing is on and the kwargs its function was
    built with: `seen[step] = (on, kwargs)` (mid-training generation turns it off and must restore it)."""

    def __init__(self):
        self.seen: dict[int, tuple] = {}

    def on_step_begin(self, args, state, control, model=None, **kw):
        func = model.model.layers[0]._gradient_checkpointing_func
        self.seen[state.global_step] = (is_checkpointing(model), getattr(func, "keywords", None))
