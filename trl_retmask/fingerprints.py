"""Fingerprints: what a stored result depends on (settings as canonical JSON, a model's class, config, generation
config and weights), so a cache is reused only for the same inputs."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass

import torch

__all__ = ["fingerprint", "hash_weights", "model_fingerprint"]

_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "_commit_hash", "_from_model_config", "transformers_version"})
"""Config fields that say where a model came from, not what it computes (the weights hash covers identity)."""


def _canonical(obj):
    """The JSON form of a fingerprint part. Unknown types are refused: their repr may hold a memory address."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_canonical(v) for v in obj), key=json.dumps)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    if hasattr(obj, "to_diff_dict"):  # transformers' PretrainedConfig and GenerationConfig
        return _canonical({k: v for k, v in obj.to_diff_dict().items() if k not in _VOLATILE_CONFIG_KEYS})
    if is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(asdict(obj))
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"Cannot fingerprint a {type(obj).__name__}; pass JSON-like values (dict, list, str, numbers).")


def fingerprint(**parts) -> str:
    """SHA-256 of the canonical JSON of `parts` (sorted keys, tuples as lists, configs as their non-default fields)."""
    text = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def hash_weights(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the state dict (names, dtypes, shapes, bytes).

    Reads every weight once (about a second per GB on a CPU core; a GPU model is copied to the CPU tensor by
    tensor), so fingerprinting is cheap next to generating with the model, but not free. Weights that are not
    in the module are read where they are: DeepSpeed ZeRO-3 partitions are gathered (every process hashes, in the
    same order), accelerate-offloaded weights (`device_map` with "cpu"/"disk", on the meta device in the module) are
    loaded module by module. A weight on the meta device with nothing behind it is refused: the hash would not
    depend on the weights.
    """
    from accelerate.utils.modeling import align_module_device, has_offloaded_params

    params = dict(model.named_parameters(remove_duplicate=False))
    offloaded = {n: m for n, m in model.named_modules() if has_offloaded_params(m)}
    h = hashlib.sha256()
    seen = {}  # tied weights (embeddings / LM head) are hashed once
    onloaded = None  # (name, context) of the offloaded module whose weights are loaded now
    try:
        for name, t in sorted(model.state_dict().items()):
            param = params.get(name)
            zero3 = getattr(param, "ds_id", None) is not None  # ZeRO-3: this process holds a partition
            h.update(f"{name}|{t.dtype}|{tuple(param.ds_shape if zero3 else t.shape)}".encode())
            owner = None
            if zero3:
                key = ("zero3", id(param))
            elif t.device.type == "meta":
                owner = max((n for n in offloaded if name.startswith(f"{n}.") or n == ""), key=len, default=None)
                if owner is None:
                    raise ValueError(f"Weight {name!r} is on the meta device with no offloaded copy behind it (the "
                                     "model was built without loading its weights): load the checkpoint first.")
                key = ("offloaded", id(param) if param is not None else name)
            else:
                key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            elsewhere = zero3 or owner is not None  # the full tensor is not this placeholder
            if key in seen or (t.numel() == 0 and not elsewhere):
                h.update(f"={seen.get(key, '')}".encode())
                continue
            seen[key] = name
            if zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    t = param.detach().contiguous().cpu().clone()
            elif owner is not None:
                if onloaded is None or onloaded[0] != owner:
                    if onloaded is not None:
                        onloaded[1].__exit__(None, None, None)
                    context = align_module_device(offloaded[owner], "cpu")
                    context.__enter__()
                    onloaded = (owner, context)
                t = offloaded[owner].state_dict()[name[len(owner) + 1:] if owner else name]
            t = t.detach().contiguous().cpu()
            h.update(t.view(torch.uint8).numpy().tobytes())
    finally:
        if onloaded is not None:
            onloaded[1].__exit__(None, None, None)
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """The model's identity: class, config, attention implementation, weights, and its generation config (whose
    defaults, e.g. `eos_token_id` or `repetition_penalty`, change what it generates)."""
    config = getattr(model, "config", None)
    return fingerprint(cls=f"{type(model).__module__}.{type(model).__qualname__}", config=config,
                       attn=getattr(config, "_attn_implementation", None), weights=hash_weights(model),
                       generation=getattr(model, "generation_config", None))
