"""mask_heads / export_masked_model against an independent reference: a deep copy whose o_proj input columns
of the masked heads are zeroed by hand (the paper's ablation)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny import TINY_ARCHS, make_tiny_model
from trl_retmask import export_masked_model, head_layout, mask_heads, validate_heads
from trl_retmask.layout import attention_modules

HEADS = [(0, 1), (1, 0), (1, 3), (2, 2)]  # 4 query heads per layer over 2 KV heads: masks both heads of a KV group


def zeroed_copy(model, heads):
    ref = copy.deepcopy(model)
    _, _, head_dim = head_layout(ref)
    with torch.no_grad():
        for layer, head in heads:
            ref.model.layers[layer].self_attn.o_proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0
    return ref


def ids(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (batch, length), generator=g)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_mask_matches_zeroed_columns_and_restores(arch, tmp_path):
    model = make_tiny_model(arch)
    ref = zeroed_copy(model, HEADS)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
        with mask_heads(model, HEADS):
            masked = model(x).logits
        after = model(x).logits
        expected = ref(x).logits
    assert (masked - expected).abs().max().item() <= 1e-5
    assert (masked - before).abs().max().item() > 1e-3  # the mask does something
    assert torch.equal(after, before)

    export_masked_model(model, HEADS, tmp_path / "masked")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "masked", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (reloaded(x).logits - expected).abs().max().item() <= 1e-5
        assert torch.equal(model(x).logits, before)  # export restored the live weights


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_generate_with_kv_cache(arch):
    model = make_tiny_model(arch)
    ref = zeroed_copy(model, HEADS)
    x = ids(batch=1, length=8)
    kw = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    plain = copy.deepcopy(model).generate(x, **kw)
    with mask_heads(model, HEADS):
        out = model.generate(x, **kw)
    assert torch.equal(out, ref.generate(x, **kw))
    assert torch.equal(model.generate(x, **kw), plain)  # unmasked again after exit


def test_eager_and_sdpa_agree():
    x = ids()
    outs = []
    for impl in ("eager", "sdpa"):
        model = make_tiny_model("llama", attn_implementation=impl)
        with torch.no_grad(), mask_heads(model, HEADS):
            outs.append(model(x).logits)
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5


def test_kv_heads_untouched_and_other_heads_unchanged():
    """Masking query head h leaves every other head's output (the o_proj input slices) bit-identical."""
    model = make_tiny_model("qwen3")
    _, num_heads, head_dim = head_layout(model)
    seen = {}
    o_proj = attention_modules(model)[1].o_proj
    handle = o_proj.register_forward_hook(lambda m, a, o: seen.__setitem__(len(seen), a[0].detach().clone()))
    with torch.no_grad():
        model(ids())
        with mask_heads(model, [(1, 2)]):
            model(ids())
    handle.remove()
    plain, masked = seen[0], seen[1]
    for h in range(num_heads):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        if h == 2:
            assert masked[..., sl].abs().max() == 0 and plain[..., sl].abs().max() > 0
        else:
            assert torch.equal(masked[..., sl], plain[..., sl])


def test_restores_on_exception_and_adds_no_parameters():
    model = make_tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_params, n_buffers = sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers())
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    with pytest.raises(RuntimeError, match="boom"):
        with mask_heads(model, HEADS):
            assert sum(p.numel() for p in model.parameters()) == n_params
            assert sum(b.numel() for b in model.buffers()) == n_buffers
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_gradients_flow_and_match_zeroed_copy():
    model = make_tiny_model("mistral").train()
    ref = zeroed_copy(model, HEADS).train()
    x = ids()
    with mask_heads(model, HEADS):
        model(x, labels=x).loss.backward()
    ref(x, labels=x).loss.backward()
    q = model.model.layers[1].self_attn.q_proj.weight.grad
    assert (q - ref.model.layers[1].self_attn.q_proj.weight.grad).abs().max() <= 1e-5
    # the masked heads receive no gradient through o_proj: their q rows get exactly zero
    _, _, d = head_layout(model)
    assert q[0:d].abs().max() == 0 and q[3 * d : 4 * d].abs().max() == 0 and q[d : 2 * d].abs().max() > 0


@pytest.mark.parametrize("target_modules", [["o_proj"], ["q_proj", "v_proj"]])
def test_peft_lora(target_modules):
    from peft import LoraConfig, get_peft_model

    base = make_tiny_model("llama")
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    )
    x = ids()
    # reference: merge the (non-trivial) adapter into a copy, then zero the columns of the merged o_proj
    merged = copy.deepcopy(peft_model).merge_and_unload()
    ref = zeroed_copy(merged, HEADS)
    with torch.no_grad():
        before = peft_model(x).logits
        with mask_heads(peft_model, HEADS):
            masked = peft_model(x).logits
        assert (masked - ref(x).logits).abs().max().item() <= 1e-5
        assert torch.equal(peft_model(x).logits, before)
    # with gradients: adapter weights get gradients under the mask
    peft_model.train()
    with mask_heads(peft_model, HEADS):
        peft_model(x, labels=x).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)
    with pytest.raises(ValueError, match="merge the adapter"):
        export_masked_model(peft_model, HEADS, "/nonexistent")


def test_bad_heads_raise_before_model_work():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        with mask_heads(model, [(3, 0)]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        validate_heads(model, [(0, 4)])
    with pytest.raises(ValueError, match="Malformed head key"):
        validate_heads(model, ["zero-one"])
    with pytest.raises(ValueError) as e:  # the message names the valid ranges and lists the first 8 bad heads
        validate_heads(model, [(3, h) for h in range(4)] + [(0, h) for h in range(4, 9)])
    bad = sorted([(3, h) for h in range(4)] + [(0, h) for h in range(4, 9)])
    assert str(e.value).startswith(
        f"Heads {bad[:8]} are out of range: the model has layers 0..2 and query heads "
        "0..3. Check that the head scores belong to this model."
    )
    assert validate_heads(model, ["2-1", (0, 3), [0, 3]]) == [(0, 3), (2, 1)]


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match="Cannot mask heads of GPT2LMHeadModel"):
        with mask_heads(gpt2, [(0, 0)]):
            pass


def test_export_refuses_to_destroy_checkpoints(tmp_path):
    model = make_tiny_model("llama")
    source = tmp_path / "source"
    model.save_pretrained(source)
    original = (source / "model.safetensors").read_bytes()
    loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    for overwrite in (False, True):  # its own source directory: never, even with overwrite
        with pytest.raises(ValueError, match="loaded from there"):
            export_masked_model(loaded, HEADS, str(source) + "/", overwrite=overwrite)
    assert (source / "model.safetensors").read_bytes() == original

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "model.safetensors").write_bytes(b"other checkpoint")
    with pytest.raises(ValueError, match="non-empty directory.*overwrite=True"):
        export_masked_model(loaded, HEADS, busy)
    assert (busy / "model.safetensors").read_bytes() == b"other checkpoint"
    export_masked_model(loaded, HEADS, busy, overwrite=True)
    assert json.loads((busy / "retmask_masked_heads.json").read_text())["masked_heads"] == ["0-1", "1-0", "1-3", "2-2"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export_masked_model(loaded, HEADS, tmp_path / "file", overwrite=True)
    with pytest.raises(ValueError, match="'.*file' is a file"):  # was NotADirectoryError after loading, in save
        export_masked_model(loaded, HEADS, tmp_path / "file" / "sub")
    export_masked_model(loaded, HEADS, tmp_path / "new")  # a new (or empty) directory needs no flag
    assert (tmp_path / "new" / "model.safetensors").is_file()


# ------------------------------------------------------------------ mutation-tested edges (docs/testing.md)
class _WrappedProj(torch.nn.Module):
    """An o_proj wrapper without `in_features` of its own (as some adapter/quantisation wrappers): the width comes
    from its `base_layer`."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base

    def forward(self, x):
        return self.base_layer(x)


class _BareProj(torch.nn.Module):
    """An o_proj holding only a weight (no `in_features`, no `base_layer`): the width is the weight's columns."""

    def __init__(self, linear):
        super().__init__()
        self.weight = linear.weight

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


@pytest.mark.parametrize("wrap", [_WrappedProj, _BareProj])
def test_o_proj_width_read_through_wrappers(wrap):
    model = make_tiny_model("llama")
    ref = zeroed_copy(model, HEADS)
    for layer in model.model.layers:
        layer.self_attn.o_proj = wrap(layer.self_attn.o_proj)
    x = ids()
    with torch.no_grad(), mask_heads(model, HEADS):
        assert (model(x).logits - ref(x).logits).abs().max().item() <= 1e-5


def test_unmaskable_o_proj_and_layers_are_clear_errors():
    model = make_tiny_model("llama")
    model.model.layers[0].self_attn.o_proj = torch.nn.Identity()
    with pytest.raises(ValueError, match="Cannot read the input width of Identity; supported: Llama"):
        with mask_heads(model, [(0, 0)]):
            pass
    model = make_tiny_model("llama")
    model.model.layers[1].self_attn.o_proj = torch.nn.Linear(32, 64, bias=False)  # 4 heads x 16 = 64 expected
    with pytest.raises(
        ValueError, match=r"^LlamaAttention\.o_proj takes 32 features, not num_heads x head_dim = 4 x 16"
    ):
        with mask_heads(model, [(1, 0)]):
            pass
    with mask_heads(model, [(0, 0), (2, 3)]):  # other layers still mask
        pass
    model = make_tiny_model("llama")
    model.model.layers[2].self_attn.layer_idx = None  # not recognised as an attention module
    with pytest.raises(ValueError, match=r"Layer 2 has no maskable attention module \(found layers \[0, 1\]"):
        with mask_heads(model, [(2, 0)]):
            pass
    model = make_tiny_model("llama", num_hidden_layers=7)
    model.model.layers[6].self_attn.layer_idx = None
    with pytest.raises(ValueError) as e:  # a long list of layers is cut to its first 5
        with mask_heads(model, [(6, 0)]):
            pass
    assert str(e.value) == "Layer 6 has no maskable attention module (found layers [0, 1, 2, 3, 4]...)."


def test_check_export_dir_messages_name_the_directory_and_the_fix(tmp_path):
    from trl_retmask.masking import check_export_dir

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(ValueError) as e:
        check_export_dir(busy)  # overwrite defaults to False
    assert str(e.value) == (
        f"Refusing to export into the non-empty directory {str(busy)!r}: its checkpoint files "
        "would be replaced. Choose a new directory, or pass overwrite=True (--overwrite True)."
    )
    assert check_export_dir(busy, overwrite=True) == busy
    with pytest.raises(ValueError) as e:
        check_export_dir(busy, overwrite=True, source=str(busy))
    assert str(e.value) == (
        f"Refusing to export into {str(busy)!r}: the model was loaded from there, and the masked "
        "weights would replace its only unmasked copy. Export to another directory."
    )
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError) as e:
        check_export_dir(tmp_path / "f" / "sub")
    assert str(e.value) == (
        f"Cannot export into {str(tmp_path / 'f' / 'sub')!r}: {str(tmp_path / 'f')!r} is a file. Choose a directory."
    )
    assert check_export_dir(tmp_path / "new" / "dir", source=str(busy)) == tmp_path / "new" / "dir"


def test_head_layout_of_models_configs_and_composite_configs():
    from types import SimpleNamespace

    from transformers import LlavaConfig

    from tests.tiny import tiny_config

    model = make_tiny_model("llama")
    assert head_layout(model) == head_layout(model.config) == (3, 4, 16)
    assert head_layout(tiny_config("phi3")) == (3, 4, 16)  # no head_dim: hidden_size // heads
    # A multimodal config: the language model's layout (its text config), not the vision tower's 24 layers.
    llava = LlavaConfig(
        text_config={"model_type": "llama", "num_hidden_layers": 5, "num_attention_heads": 8, "hidden_size": 64}
    )
    assert head_layout(llava) == (5, 8, 8)
    # Any object with the fields will do (no get_text_config).
    assert head_layout(SimpleNamespace(num_hidden_layers=2, num_attention_heads=3, head_dim=None, hidden_size=12)) == (
        2,
        3,
        4,
    )
    # An explicit head_dim wins over hidden_size // heads (Qwen3, Gemma: head_dim * heads != hidden_size).
    assert head_layout(SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, head_dim=16, hidden_size=32)) == (
        2,
        4,
        16,
    )
    assert head_layout(tiny_config("qwen3", head_dim=24)) == (3, 4, 24)
    with pytest.raises(ValueError, match="SimpleNamespace has no num_hidden_layers/num_attention_heads: cannot locate"):
        head_layout(SimpleNamespace(num_hidden_layers=2))


def test_parse_head_accepts_exactly_two_non_negative_ints():
    from trl_retmask.heads import parse_head

    assert parse_head(" 12-3 ") == (12, 3) and parse_head((0, 0)) == (0, 0) and parse_head([4, 5]) == (4, 5)
    for bad in ((1, 2, 3), (1,), (1.5, 2), (2, 1.0), (True, 1), (1, False), (-1, 0), (0, -1), "1-2-3", "-1-2", 5, None):
        with pytest.raises(ValueError, match=r"Malformed head key .*: expected 'LAYER-HEAD' \(e.g. '12-3'\) or a"):
            parse_head(bad)


def test_an_interrupted_export_overwrite_leaves_the_old_export_whole(tmp_path, monkeypatch):
    """`export --overwrite` replaces the directory whole: a save that dies half-way (a kill, a full disk) leaves the
    old export as it was, with no new shard beside its files (issue 28's class: results of two runs mixed)."""
    model = make_tiny_model("llama")
    out = tmp_path / "masked"
    export_masked_model(model, HEADS, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def dies_half_way(self, save_directory, **kwargs):
        (Path(save_directory) / "model-00001-of-00002.safetensors").write_bytes(b"half of the new checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        export_masked_model(model, [(0, 1)], out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["masked"]  # nothing left beside it either
