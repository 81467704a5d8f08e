"""Liger kernels through liger-kernel's own API.

TRL 1.16 deprecates `use_liger_kernel` in every trainer (removed in 2.0), so `RetMaskConfig(liger_kernels=True)`
patches the policy with `liger_kernel.transformers._apply_liger_kernel_to_instance`, the call transformers' Trainer
makes for that flag; it keeps working once TRL drops the flag.
"""

from __future__ import annotations

import importlib.util

import torch
from accelerate.utils import is_peft_model


def check_liger(name: str = "liger_kernels") -> None:
    """Refuse Liger where it cannot run, before any model work: the package is missing, or there is no CUDA."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(
            f"`{name}=True` needs the `liger-kernel` package, which is not installed: "
            f"pip install 'trl_retmask[liger]' (CUDA only), or set `{name}=False`."
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"`{name}=True` needs CUDA: Liger's kernels are Triton GPU kernels and would crash when "
            f"training starts on this CUDA-less machine. Set `{name}=False` (the DPO loss still uses "
            "TRL's chunked fused LM head, which runs on the CPU)."
        )


def apply_liger_kernels(model, kernel_config: dict | None = None) -> None:
    """Liger's layer kernels (RMSNorm, RoPE, SwiGLU, ...) patched into `model` (the base model under PEFT).

    Liger's fused linear cross-entropy stays off, as TRL sets it for `use_liger_kernel`: it replaces the model's
    forward, which TRL's DPO loss patches with its own chunked fused LM head. `kernel_config` (`liger_kernel_config`)
    passes other switches through."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    kernel_config = dict(kernel_config or {})
    if kernel_config.get("fused_linear_cross_entropy"):
        raise ValueError(
            '`liger_kernel_config={"fused_linear_cross_entropy": True}` is not supported: it replaces '
            "the model's forward, which TRL's DPO loss patches with its fused LM head. Remove it."
        )
    base = model.get_base_model() if is_peft_model(model) else model
    _apply_liger_kernel_to_instance(model=base, **{**kernel_config, "fused_linear_cross_entropy": False})
