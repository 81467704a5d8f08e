"""Generation backends: how a batch of prompts is decoded with some rows' retrieval heads masked.

`batch.py` holds the backend protocol (`GenerateBackend`, plain `model.generate`) and `generate_batch`, which pads,
seeds and cuts at EOS for every backend; `static.py` the static-cache backend (`StaticCacheBackend`); `vllm.py` the
vLLM backend (`VLLMBackend`: one colocated engine per process, heads masked inside it), with `vllm_heads.py` (heads
masked per request), `vllm_sampler.py` and `seeded.py` (its seeded draw); `window.py` the check of prompts +
`max_new_tokens` against the model's window that every generating stage makes; `make_backend` picks one by name. A
new backend is a `GenerateBackend` subclass in its own file, named in `GENERATION_BACKENDS`.
"""

from __future__ import annotations

from ..validation import check_choice
from .batch import DEFAULT_BACKEND, GenerateBackend, eos_ids, generate_batch, make_generation_config, model_device
from .static import RowHeadMask, StaticCacheBackend
from .vllm import VLLMBackend, VLLMSettings, auto_backend
from .window import check_window, model_window

__all__ = [
    "DEFAULT_BACKEND",
    "GENERATION_BACKENDS",
    "GenerateBackend",
    "RowHeadMask",
    "StaticCacheBackend",
    "VLLMBackend",
    "VLLMSettings",
    "check_window",
    "eos_ids",
    "generate_batch",
    "make_backend",
    "make_generation_config",
    "model_device",
    "model_window",
]

GENERATION_BACKENDS = ("auto", "generate", "static", "vllm")
"""Names of the pair-generation backends: `generate` (`model.generate`, dynamic cache, masked rows apart), `static`
(`StaticCacheBackend`), `vllm` (`VLLMBackend`), `auto` (`vllm` where it is installed, can serve the model and has
been verified on its device: the CPU, not yet CUDA; else `generate`). On the 2-core CPU vLLM's pairs run at 2.5x
`generate`'s tokens/s with the same greedy pairs, within the main command's 4 GB, also as 2 processes
(docs/benchmarks.md); the static backend runs only when asked for, until a GPU run has measured it."""


def make_backend(
    choice: str | GenerateBackend = "auto", model=None, vllm: VLLMSettings | dict | None = None
) -> GenerateBackend:
    """The backend for `choice`: a `GenerateBackend` as is, or a name of `GENERATION_BACKENDS` (`auto`:
    `vllm.auto_backend`). `vllm`: the engine's settings (`VLLMSettings` or its
    fields). A new static backend holds hooks: `close()` it."""
    if isinstance(choice, GenerateBackend):
        return choice
    check_choice("backend", choice, GENERATION_BACKENDS)
    if choice == "auto":
        choice = auto_backend(model)
    if choice == "vllm":
        return VLLMBackend(VLLMSettings(**vllm) if isinstance(vllm, dict) else vllm)
    return StaticCacheBackend() if choice == "static" else DEFAULT_BACKEND
