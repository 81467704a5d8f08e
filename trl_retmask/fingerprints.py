"""Fingerprints: what a stored result depends on (settings as canonical JSON, a model's class, config, generation
config and weights), so a cache is reused only for the same inputs."""

from __future__ import annotations

import contextlib
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
    with contextlib.ExitStack() as onloaded:  # one offloaded module's weights on the CPU at a time
        onloaded_owner = None
        for name, t in sorted(model.state_dict().items()):  # a module's weights are contiguous in this order
            param = params.get(name)
            zero3 = getattr(param, "ds_id", None) is not None  # ZeRO-3: this process holds a partition
            owner = None if zero3 else _offload_owner(name, t, offloaded)
            h.update(f"{name}|{t.dtype}|{tuple(param.ds_shape if zero3 else t.shape)}".encode())
            key = _storage_key(name, t, param, zero3, owner)
            if key in seen or (t.numel() == 0 and not zero3 and owner is None):
                h.update(f"={seen.get(key, '')}".encode())
                continue
            seen[key] = name
            if owner is not None and owner != onloaded_owner:
                onloaded.close()
                onloaded.enter_context(align_module_device(offloaded[owner], "cpu"))
                onloaded_owner = owner
            h.update(_weight_bytes(name, t, param, zero3, owner, offloaded))
    return h.hexdigest()


def _offload_owner(name: str, t: torch.Tensor, offloaded: dict) -> str | None:
    """The offloaded module behind weight `name` when the module holds only its meta placeholder; else None."""
    if t.device.type != "meta":
        return None
    owner = max((n for n in offloaded if name.startswith(f"{n}.") or n == ""), key=len, default=None)
    if owner is None:
        raise ValueError(
            f"Weight {name!r} is on the meta device with no offloaded copy behind it (the model was "
            "built without loading its weights): load the checkpoint first."
        )
    return owner


def _storage_key(name: str, t: torch.Tensor, param, zero3: bool, owner: str | None) -> tuple:
    """What identifies a weight's storage, so tied weights are hashed once."""
    if zero3:
        return ("zero3", id(param))
    if owner is not None:
        return ("offloaded", id(param) if param is not None else name)
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _weight_bytes(name: str, t: torch.Tensor, param, zero3: bool, owner: str | None, offloaded: dict) -> bytes:
    """The full weight's bytes: a ZeRO-3 partition gathered, an offloaded weight read from its (onloaded) module.

    A ZeRO-3 weight already gathered by the caller (pair generation hashes inside its full-model gather) is read as
    it is: DeepSpeed 0.19.8 refuses a nested `GatheredParameters` over it ("Nested GatheredParameters contexts cannot
    overlap parameters", deepspeed/runtime/zero/partition_parameters.py:2468-2473), and older releases re-partition
    it at the inner exit, which would leave the caller generating with empty weights."""
    if zero3 and not _zero3_gathered(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            t = param.detach().contiguous().cpu().clone()
    elif zero3:
        t = param.detach()
    elif owner is not None:
        t = offloaded[owner].state_dict()[name[len(owner) + 1 :] if owner else name]
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _zero3_gathered(param) -> bool:
    """A ZeRO-3 parameter whose full tensor is present on this process (inside a `GatheredParameters`)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE


def model_fingerprint(model) -> str:
    """The model's identity: class, config, attention implementation, weights, and its generation config (whose
    defaults, e.g. `eos_token_id` or `repetition_penalty`, change what it generates)."""
    config = getattr(model, "config", None)
    return fingerprint(
        cls=f"{type(model).__module__}.{type(model).__qualname__}",
        config=config,
        attn=getattr(config, "_attn_implementation", None),
        weights=hash_weights(model),
        generation=getattr(model, "generation_config", None),
    )
