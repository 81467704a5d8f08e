"""The static-cache generation backend: static KV cache, compiled decode step, and a per-row head mask, so that one
decode loop serves chosen (policy) and rejected (masked policy) rows.

Decoding is memory-bound: every step reads all weights once, whatever the batch. Decoding chosen and rejected rows in
one batch halves the weight reads of two separate `generate` calls, and a static KV cache with a compiled decode step
(transformers' `cache_implementation="static"` + `compile_config`, CUDA graphs under `mode="reduce-overhead"`)
removes the per-step Python and launch overhead that dominates `generate` with a dynamic cache. The decoding loop is
transformers' own (same generation config, logits processors and sampling): only the batch layout changes, so greedy
decoding gives the tokens of `GenerateBackend`. `generate_batch` pads, seeds and cuts at EOS for both.

Why the pieces look as they do:
- `RowHeadMask` hooks every attention `o_proj` once for the backend's lifetime and changes only the contents of
  fixed buffers (the heads' feature mask per layer, the rows' flags per batch size): a compiled decode step keeps its
  graph across batches, roles and head sets (adding or removing hooks per call, as `mask_heads` does, would
  invalidate dynamo's guards and recompile). When `active` is False the hooks return at once.
- When compiling, prompts are left-padded to a multiple of `length_multiple`, a batch is padded (its last row
  repeated, the copies dropped) to the smallest batch size already decoded that holds it, and the static cache only
  grows, so the decode step sees few shapes.
- Sampled rows depend on the batch layout (the noise is drawn for the whole batch), not on other rows' masks: for a
  fixed layout and seed, chosen rows are the same whatever heads the rejected rows mask.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers.generation.configuration_utils import CompileConfig

from ..layout import attention_modules, head_layout
from ..masking import head_feature_masks
from ..validation import check_int
from .batch import GenerateBackend, model_device

__all__ = ["RowHeadMask", "StaticCacheBackend"]


class RowHeadMask:
    """Zero the outputs of `heads` before `o_proj`, but only in the batch rows flagged True.

    `set(heads, rows)` updates buffers in place (rows: one bool per batch row); the hooks read them with no
    data-dependent Python, so the forward is CUDA-graph friendly. Use as a context manager, or call `remove()`.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.active = False
        _, num_heads, head_dim = head_layout(model)
        self._width = num_heads * head_dim
        self._drop: dict[nn.Module, torch.Tensor] = {}  # o_proj -> bool [F]: features of masked heads
        self._rows: dict[int, torch.Tensor] = {}  # batch size -> bool [B]
        self._device = model_device(model)
        self._handles = []
        for module in attention_modules(model).values():
            o_proj = module.o_proj
            weight = getattr(getattr(o_proj, "base_layer", o_proj), "weight", None)
            device = weight.device if weight is not None else self._device
            self._drop[o_proj] = torch.zeros(self._width, dtype=torch.bool, device=device)
            self._handles.append(o_proj.register_forward_pre_hook(self._make_hook(self._drop[o_proj])))

    def _make_hook(self, drop: torch.Tensor):
        def hook(module, args):
            if not self.active:
                return None
            x = args[0]
            rows = self._rows.get(x.shape[0])
            if rows is None:
                raise RuntimeError(
                    f"RowHeadMask has no row flags for a batch of {x.shape[0]} rows; call "
                    f"set(heads, rows) with one flag per row of the batch being run."
                )
            mask = rows.to(x.device).view(-1, *([1] * (x.dim() - 1))) & drop
            return (x.masked_fill(mask, 0),) + tuple(args[1:])

        return hook

    @torch.no_grad()
    def set(self, heads: Iterable, rows: Sequence[bool]) -> None:
        """Mask `heads` in the rows flagged True (in place: no new tensors, no recompilation)."""
        new = head_feature_masks(self.model, heads)
        for o_proj, drop in self._drop.items():
            drop.copy_(new[o_proj].to(drop.device) if o_proj in new else torch.zeros_like(drop))
        flags = torch.as_tensor(list(rows), dtype=torch.bool)
        buf = self._rows.get(len(flags))
        if buf is None:
            buf = self._rows[len(flags)] = torch.zeros(len(flags), dtype=torch.bool, device=self._device)
        buf.copy_(flags.to(buf.device))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class StaticCacheBackend(GenerateBackend):
    """Decode chosen and masked rows in one loop: static KV cache, compiled decode step, per-row head mask.

    Args:
        compile: compile the decode step (`CompileConfig(mode="reduce-overhead")`, CUDA graphs). Default: on CUDA.
            Elsewhere it compiles too when asked (slow; for tests).
        length_multiple: when compiling, left-pad prompts to a multiple of this.
        max_cache_len: static cache length; default: the padded prompt length + `max_new_tokens`, never shrinking
            on a model (transformers keeps the largest); a longer call recompiles: give the longest padded prompt +
            `max_new_tokens` to avoid it.
        compile_config: transformers' `CompileConfig` (overrides `mode="reduce-overhead"`).

    It hooks the model on its first call and keeps the hooks until `close()` (use it as a context manager).
    """

    name = "static"
    joint = True

    def __init__(
        self,
        *,
        compile: bool | None = None,
        length_multiple: int = 64,
        max_cache_len: int | None = None,
        compile_config: CompileConfig | None = None,
    ):
        check_int("length_multiple", length_multiple, minimum=1)
        check_int("max_cache_len", max_cache_len, minimum=1, optional=True)
        self.compile, self.length_multiple, self.max_cache_len = compile, length_multiple, max_cache_len
        self.compile_config = compile_config or CompileConfig(mode="reduce-overhead")
        self.row_mask: RowHeadMask | None = None
        self.batch_sizes: set[int] = set()  # batch shapes decoded so far (compiled)

    def _hooks(self, model) -> RowHeadMask:
        if self.row_mask is None or self.row_mask.model is not model:
            self.close()
            self.row_mask = RowHeadMask(model)
        return self.row_mask

    def _config(self, model, config, prompt_len: int, compile: bool):
        if config.max_new_tokens is None:
            raise ValueError("Set `max_new_tokens` in the generation config: the static cache is sized from it.")
        config = copy.deepcopy(config)
        config.update(
            cache_implementation="static",
            max_cache_len=max(self.max_cache_len or 0, prompt_len + config.max_new_tokens),
            return_dict_in_generate=False,
        )
        if compile:
            config.compile_config = self.compile_config
            if model_device(model).type != "cuda":  # transformers compiles on accelerators only unless told otherwise
                config.compile_config._compile_all_devices = True
        else:
            config.disable_compile = True
        return config

    def __call__(self, model, input_ids, attention_mask, generation_config, *, heads=(), masked):
        n, length = input_ids.shape
        compile = model_device(model).type == "cuda" if self.compile is None else self.compile
        rows = n
        if compile:  # few shapes: prompt lengths in buckets, batches padded to a size already compiled
            pad = math.ceil(length / self.length_multiple) * self.length_multiple - length
            value = generation_config.pad_token_id or 0
            input_ids = torch.nn.functional.pad(input_ids, (pad, 0), value=value)
            attention_mask = torch.nn.functional.pad(attention_mask, (pad, 0), value=0)
            rows = min((b for b in self.batch_sizes if b >= n), default=n)
            self.batch_sizes.add(rows)
            input_ids = torch.cat([input_ids, input_ids[-1:].expand(rows - n, -1)])
            attention_mask = torch.cat([attention_mask, attention_mask[-1:].expand(rows - n, -1)])
        flags = list(masked) + [masked[-1]] * (rows - n)
        row_mask = self._hooks(model)
        row_mask.set(heads if any(flags) else (), flags)
        row_mask.active = any(flags)
        config = self._config(model, generation_config, input_ids.shape[1], compile)
        try:
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        finally:
            row_mask.active = False
        return out[:n, input_ids.shape[1] :].tolist()

    def close(self) -> None:
        """Remove the hooks from the model."""
        if self.row_mask is not None:
            self.row_mask.remove()
            self.row_mask = None
