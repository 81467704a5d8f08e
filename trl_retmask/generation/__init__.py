"""Generation backends: how a batch of prompts is decoded with some rows' retrieval heads masked.

`batch.py` holds the backend protocol (`GenerateBackend`, plain `model.generate`) and `generate_batch`, which pads,
seeds and cuts at EOS for every backend; `static.py` the static-cache backend (`StaticCacheBackend`); `window.py` the
check of prompts + `max_new_tokens` against the model's window that every generating stage makes; `make_backend`
picks one by name. A new backend is a `GenerateBackend` subclass in its own file, named in `GENERATION_BACKENDS`.
"""

from __future__ import annotations

from ..validation import check_choice
from .batch import DEFAULT_BACKEND, GenerateBackend, eos_ids, generate_batch, make_generation_config, model_device
from .static import RowHeadMask, StaticCacheBackend
from .window import check_window, model_window

__all__ = ["DEFAULT_BACKEND", "GENERATION_BACKENDS", "GenerateBackend", "RowHeadMask", "StaticCacheBackend",
           "check_window", "eos_ids", "generate_batch", "make_backend", "make_generation_config", "model_device",
           "model_window"]

GENERATION_BACKENDS = ("auto", "generate", "static")
"""Names of the pair-generation backends: `generate` (`model.generate`, dynamic cache, masked rows apart), `static`
(`StaticCacheBackend`), `auto` (`static` on CUDA, `generate` elsewhere)."""


def make_backend(choice: str | GenerateBackend = "auto", model=None) -> GenerateBackend:
    """The backend for `choice`: a `GenerateBackend` as is, or a name of `GENERATION_BACKENDS` (`auto`: the static
    backend when `model` is on CUDA, plain `generate` elsewhere). A new static backend holds hooks: `close()` it."""
    if isinstance(choice, GenerateBackend):
        return choice
    check_choice("backend", choice, GENERATION_BACKENDS)
    if choice == "auto":
        choice = "static" if model is not None and model_device(model).type == "cuda" else "generate"
    return StaticCacheBackend() if choice == "static" else DEFAULT_BACKEND
