"""Fingerprints: canonical settings, the model's identity and its weights hash (offloaded and ZeRO-3 weights)."""

from pathlib import Path

import pytest
import torch

from tests.tiny import make_tiny_model
from trl_retmask.fingerprints import fingerprint, model_fingerprint

REPO = Path(__file__).resolve().parents[1]
HEADS = [(0, 1), (1, 2), (2, 0)]


def test_fingerprint_is_canonical_and_refuses_unknown_types():
    assert fingerprint(a=(1, 2), b={"y": 1, "x": [3]}) == fingerprint(b={"x": (3,), "y": 1}, a=[1, 2])
    assert fingerprint(a=1) != fingerprint(a=2) and fingerprint(a=1) != fingerprint(b=1)
    with pytest.raises(TypeError, match="Cannot fingerprint a object"):
        fingerprint(a=object())


def test_model_fingerprint_tracks_weights_and_generation_config_not_the_path():
    a, b = make_tiny_model("llama"), make_tiny_model("llama")
    assert model_fingerprint(a) == model_fingerprint(b)
    b.config._name_or_path = "/somewhere/else"  # where it was loaded from is no part of what it computes
    assert model_fingerprint(a) == model_fingerprint(b)
    b.generation_config.repetition_penalty = 1.3
    assert model_fingerprint(a) != model_fingerprint(b)
    c = make_tiny_model("llama")
    c.generation_config.eos_token_id = 7
    assert model_fingerprint(a) != model_fingerprint(c)
    with torch.no_grad():
        a.lm_head.weight[0, 0] += 1e-4
    assert model_fingerprint(a) != model_fingerprint(make_tiny_model("llama"))


def _independent_weight_hash(state: dict) -> str:
    """The documented format, by hand: sorted names; name|dtype|shape, then the bytes (a tied repeat: '=first')."""
    import hashlib

    h, first = hashlib.sha256(), {}
    for name, t in sorted(state.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.data_ptr() in first:
            h.update(f"={first[t.data_ptr()]}".encode())
            continue
        first[t.data_ptr()] = name
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("tie", [False, True])
def test_offloaded_weights_are_hashed_as_if_in_memory(tie, tmp_path):
    """accelerate's `device_map` offload leaves meta tensors in the module: they are read from their offload (disk
    or CPU), so the fingerprint is that of the same weights in memory, and the module is left offloaded."""
    from transformers import AutoModelForCausalLM

    from trl_retmask.fingerprints import hash_weights

    make_tiny_model("llama", tie_word_embeddings=tie).save_pretrained(tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert hash_weights(plain) == _independent_weight_hash(plain.state_dict())
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu" if tie else "disk",
        "model.rotary_emb": "cpu",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    on_meta = {n for n, p in offloaded.named_parameters() if p.device.type == "meta"}
    assert any(".layers.1." in n for n in on_meta)
    assert hash_weights(offloaded) == hash_weights(plain)
    assert {n for n, p in offloaded.named_parameters() if p.device.type == "meta"} == on_meta
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(plain.config)
    with pytest.raises(ValueError, match="is on the meta device with no offloaded copy.*load the checkpoint"):
        hash_weights(empty)
