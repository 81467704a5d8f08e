"""How big the colocated vLLM engine is: its window (`max_model_len`), its KV cache on a CPU, its dtype on CUDA.

Each depends on the model and the rows to come only, so every rank reaches the same numbers (and the same decision to
rebuild); see `vllm_engine` for how the engine is built from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..layout import head_layout
from .window import model_window

CPU_KV_CACHE_WINDOWS = 1.25
"""Least KV cache of the engine on a CPU, in model windows (`cpu_kv_cache_bytes`), unless `VLLM_CPU_KVCACHE_SPACE`
(GiB) says otherwise."""

CPU_BLOCK_SIZE = 128
"""Tokens per KV block of vLLM's CPU engine (its default `block_size` there, vLLM 0.31; a test compares)."""

CUDA_WINDOW_STEP = 1024
"""On CUDA the engine's window (`max_model_len`) is the longest row to come, rounded up to this: a little longer
rows later reuse the engine instead of rebuilding it (CUDA graphs, minutes)."""


def kv_block_tokens(lengths: Sequence[int]) -> int:
    """KV cache tokens that rows of these total lengths (prompt + new tokens) hold when they all run at once: each
    row takes whole blocks."""
    return sum(-(-int(n) // CPU_BLOCK_SIZE) * CPU_BLOCK_SIZE for n in lengths)


def cpu_kv_cache_tokens(model, max_model_length: int | None = None, tokens: int = 0) -> int:
    """Tokens of KV cache the engine asks for on a CPU: `CPU_KV_CACHE_WINDOWS` of its window (vLLM refuses less than
    one), or `tokens` (`kv_block_tokens` of the largest batch of rows to come) if more. Depends on the model and the
    rows only, so every rank reaches the same number (and the same decision to rebuild)."""
    window = max_model_length or model_window(model) or 4096
    return max(int(window * CPU_KV_CACHE_WINDOWS), tokens)


def cpu_kv_cache_bytes(model, max_model_length: int | None = None, tokens: int = 0) -> int:
    """Bytes of KV cache for the engine on a CPU: `cpu_kv_cache_tokens`, the rows' share of it no more than half the
    machine's available memory. A cache that cannot hold a batch's rows at once makes vLLM run fewer of them at a time
    (measured: 64 rows per call at 154 instead of 184 tok/s, docs/benchmarks.md). vLLM's own CPU default takes a
    share of the machine's memory, and a fixed size either wastes it (small models) or cannot hold one window (long
    ones). Only the pages the decode touches become resident."""
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    layers, heads, head_dim = head_layout(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    size = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)
    per_token = 2 * layers * kv_heads * head_dim * size  # keys and values
    window = cpu_kv_cache_tokens(model, max_model_length)
    wanted = cpu_kv_cache_tokens(model, max_model_length, tokens)
    if wanted > window:
        import psutil

        return max(min(per_token * wanted, psutil.virtual_memory().available // 2), per_token * window, 64 << 20)
    return max(per_token * window, 64 << 20)


def engine_window(model, settings, longest: int, device_type: str) -> int | None:
    """The engine's `max_model_len`: `vllm_max_model_length` where set; on CUDA the longest row to come (prompt +
    new tokens, `VLLMBackend.prepare`) rounded up to `CUDA_WINDOW_STEP`, no more than the model's window (vLLM's
    default, the model's full context, sizes its profiling and start-up check for rows that never come); else None
    (the model's window)."""
    if settings.max_model_length is not None:
        return settings.max_model_length
    if device_type != "cuda" or longest <= 0:
        return None
    rounded = -(-int(longest) // CUDA_WINDOW_STEP) * CUDA_WINDOW_STEP
    window = model_window(model)
    return min(rounded, window) if window else rounded


_HALF = (torch.float16, torch.bfloat16)


def _saved_dtype(model) -> torch.dtype | None:
    """The dtype the model's checkpoint was saved in (its config.json, read from a local directory or the Hub cache
    only), where the model came from one; transformers sets the in-memory config's dtype to the loaded one."""
    path = getattr(model.config, "_name_or_path", "") or ""
    if not path:
        return None
    try:
        from transformers import PretrainedConfig

        saved, _ = PretrainedConfig.get_config_dict(path, local_files_only=True)
    except Exception:  # not a checkpoint (an in-memory model), or not cached here: fall back
        return None
    saved = saved.get("text_config", saved) if "dtype" not in saved and "torch_dtype" not in saved else saved
    value = saved.get("dtype") or saved.get("torch_dtype")
    return getattr(torch, value, None) if isinstance(value, str) else None


def engine_dtype(model, device_type: str) -> str:
    """The engine's dtype. On CUDA the checkpoint's 16-bit dtype, as TRL's engine (`dtype="auto"`) runs it: with fp32
    master weights (accelerate's bf16 mixed precision) an fp32 engine would take twice the weights and KV cache and
    no FlashAttention; the pushed weights are cast at load. Elsewhere the parameters' dtype (fp32 on a CPU, where the
    greedy pairs equal `generate`'s exactly)."""
    params = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if device_type == "cuda" and params not in _HALF:
        config = getattr(model.config, "get_text_config", lambda: model.config)()
        for dtype in (_saved_dtype(model), getattr(config, "dtype", None)):
            if dtype in _HALF:
                return str(dtype).removeprefix("torch.")
    return str(params).removeprefix("torch.")
