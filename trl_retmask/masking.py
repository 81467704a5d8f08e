"""Masking retrieval heads: a switch on the policy itself, not a second model.

A query head's output enters the attention output projection (`o_proj`) as one contiguous slice of
`head_dim` input features. Zeroing that slice is exactly what zeroing the head's input columns of `o_proj`
does (the paper's ablation), so `mask_heads` registers a forward pre-hook on each affected `o_proj` that zeroes
those features. See docs/design.md for why hooks rather than a custom attention function.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_directory, write_text
from .heads import format_heads, validate_heads
from .layout import SUPPORTED, attention_modules, head_layout  # the latter two also imported from here, as before


def _in_features(o_proj: nn.Module) -> int:
    for m in (o_proj, getattr(o_proj, "base_layer", None)):
        if m is not None and isinstance(getattr(m, "in_features", None), int):
            return m.in_features
    weight = getattr(o_proj, "weight", None)
    if weight is None:
        raise ValueError(f"Cannot read the input width of {type(o_proj).__name__}; supported: {SUPPORTED}.")
    return weight.shape[1]


def head_feature_masks(model: nn.Module, heads) -> dict[nn.Module, torch.Tensor]:
    """For each affected o_proj, a boolean vector over its input features: True where a masked head writes."""
    heads = validate_heads(model, heads)
    num_layers, num_heads, head_dim = head_layout(model)
    modules = attention_modules(model)
    targets = {}
    for layer in sorted({l for l, _ in heads}):
        if layer not in modules:
            raise ValueError(f"Layer {layer} has no maskable attention module (found layers {sorted(modules)[:5]}...).")
        o_proj = modules[layer].o_proj
        width = _in_features(o_proj)
        if width != num_heads * head_dim:
            raise ValueError(
                f"{type(modules[layer]).__name__}.o_proj takes {width} features, not num_heads x head_dim "
                f"= {num_heads} x {head_dim}: its heads cannot be masked by slicing."
            )
        drop = torch.zeros(width, dtype=torch.bool)
        for l, h in heads:
            if l == layer:
                drop[h * head_dim : (h + 1) * head_dim] = True
        targets[o_proj] = drop
    return targets


@contextlib.contextmanager
def mask_heads(model: nn.Module, heads: Iterable):
    """Zero the outputs of `heads` ((layer, head) pairs) before the attention output projection, inside the block.

    Adds no parameters and touches no weights: forward pre-hooks on `o_proj` zero the heads' input slices, and
    are removed on exit (also on an exception). Works with any attention implementation, GQA/MQA (query heads are
    masked; shared KV heads are untouched), generate() and the KV cache, gradients, and PEFT (a hook on a LoRA
    `o_proj` zeroes the input of both the base and the adapter branch, i.e. of the merged projection).
    """
    targets = head_feature_masks(model, heads)
    handles = []

    def make_hook(drop: torch.Tensor):
        cache: dict = {}

        def hook(module, args):
            x = args[0]
            mask = cache.get(x.device)
            if mask is None:
                mask = cache[x.device] = drop.to(x.device)
            return (x.masked_fill(mask, 0),) + tuple(args[1:])

        return hook

    try:
        for o_proj, drop in targets.items():
            handles.append(o_proj.register_forward_pre_hook(make_hook(drop)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def check_export_dir(save_dir, overwrite: bool = False, source=None) -> Path:
    """Refuse writes that would destroy data, before any loading: `source` (the directory the weights come from;
    always refused, since its unmasked checkpoint is the only copy and an export never means replacing it), a file,
    and a non-empty directory unless `overwrite=True`. Returns the directory as a Path."""
    save_dir = Path(save_dir).expanduser()
    if source and Path(source).expanduser().is_dir() and Path(source).expanduser().resolve() == save_dir.resolve():
        raise ValueError(
            f"Refusing to export into {str(save_dir)!r}: the model was loaded from there, and the masked "
            "weights would replace its only unmasked copy. Export to another directory."
        )
    blocking = next((p for p in (save_dir, *save_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"Cannot export into {str(save_dir)!r}: {str(blocking)!r} is a file. Choose a directory.")
    if save_dir.is_dir() and any(save_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"Refusing to export into the non-empty directory {str(save_dir)!r}: its checkpoint files "
            "would be replaced. Choose a new directory, or pass overwrite=True (--overwrite True)."
        )
    return save_dir


@torch.no_grad()
def export_masked_model(
    model: nn.Module, heads: Iterable, save_dir, tokenizer=None, *, overwrite: bool = False, **save_kwargs
) -> Path:
    """Write a standard checkpoint with `heads`' input columns of `o_proj` zeroed, for weight-only tools (vLLM...).

    The columns are zeroed in place, saved, and restored, so no second copy of the model is made. A non-empty
    `save_dir` is refused unless `overwrite=True`; the directory the model was loaded from is always refused.
    """
    if hasattr(model, "peft_config"):
        raise ValueError(
            "export_masked_model needs plain weights: merge the adapter first (model = model.merge_and_unload())."
        )
    targets = head_feature_masks(model, heads)
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    save_dir = check_export_dir(save_dir, overwrite, source=source)
    # Whole or absent, a replaced one too (`overwrite`): written aside, then renamed over the old directory, so a
    # kill never leaves old shards beside new ones.
    with atomic_directory(save_dir, overwrite=True) as target:
        saved = []
        try:
            for o_proj, drop in targets.items():
                cols = drop.nonzero().squeeze(1).to(o_proj.weight.device)
                saved.append((o_proj.weight, cols, o_proj.weight[:, cols].clone()))
                o_proj.weight[:, cols] = 0
            model.save_pretrained(target, **save_kwargs)
        finally:
            for weight, cols, values in saved:
                weight[:, cols] = values
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        write_text(
            Path(target) / "retmask_masked_heads.json",
            json.dumps({"masked_heads": format_heads(validate_heads(model, heads))}, indent=1),
        )
    return save_dir
