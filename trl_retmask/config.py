"""`RetMaskConfig`: TRL's `DPOConfig` plus where the masked heads come from and how pairs are generated."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DPOConfig

MASK_STRATEGIES = ("retrieval", "random_non_retrieval", "random")


def accelerator_available() -> bool:
    """True when training would run on a GPU-class device (CUDA, XPU, NPU, MPS) rather than the CPU."""
    if torch.cuda.is_available():
        return True
    for name in ("xpu", "npu", "mps"):
        backend = getattr(torch, name, None) or getattr(torch.backends, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return True
    return False


@dataclass
class RetMaskConfig(DPOConfig):
    r"""
    Configuration class for the [`RetMaskTrainer`].

    Everything of [`~trl.DPOConfig`] applies; the fields below choose the retrieval heads to mask and how the
    contrastive pairs are generated (chosen = the policy, rejected = the same policy with those heads masked).

    Parameters:
        > Parameters that choose the masked heads

        head_scores (`str`, *optional*):
            Where the retrieval scores come from: a JSON file in the `{"LAYER-HEAD": [scores]}` format, or a model id
            with bundled scores (see `HeadScores.from_pretrained`). If `None`, the trainer uses its `head_scores`
            argument, and failing that the scores bundled for the policy's own name.
        mask_threshold (`float`, *optional*, defaults to `0.1`):
            Mask the heads whose mean retrieval score is at least this value (ignored when `mask_top_k` is set).
        mask_top_k (`int`, *optional*):
            Mask the `k` highest-scoring heads instead of thresholding.
        mask_strategy (`str`, *optional*, defaults to `"retrieval"`):
            `"retrieval"` masks the selected retrieval heads; `"random_non_retrieval"` masks as many random heads
            outside them and `"random"` as many random heads of any kind (the paper's controls).
        mask_seed (`int`, *optional*, defaults to `0`):
            Seed of the random strategies.

        > Parameters that control pair generation

        max_new_tokens (`int`, *optional*, defaults to `256`):
            Maximum number of tokens generated per response (chosen and rejected).
        temperature (`float`, *optional*, defaults to `0.6`):
            Sampling temperature (the paper's setting). `0.0` means greedy decoding.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling probability (the paper's setting: no nucleus cut).
        top_k (`int`, *optional*, defaults to `0`):
            Top-k cut; `0` disables it, as the paper's vLLM sampling does (transformers' own default is 50).
        generation_batch_size (`int`, *optional*, defaults to `8`):
            Prompts generated together (left-padded, with the KV cache), per process.
        generation_seed (`int`, *optional*):
            Seed of the sampling; each batch is seeded from it and its index, so a resumed or sharded generation
            yields the same pairs. Defaults to `seed`.
        generation_kwargs (`dict[str, Any]`, *optional*):
            Extra keyword arguments for `model.generate` (e.g. `{"repetition_penalty": 1.1}`).
        cache_pairs (`bool`, *optional*, defaults to `True`):
            Cache the generated pairs on disk, keyed by a fingerprint of (model weights, heads, generation settings,
            prompts), batch by batch: a rerun skips generation and an interrupted one resumes.
        pairs_cache_dir (`str`, *optional*):
            Where the pairs are cached. Defaults to `<output_dir>/_retmask_pairs` (`push_to_hub` skips `_*` paths,
            so cached generations are not uploaded). Runs that share it and differ only in the masked heads (RetMask
            and its random-head control) generate the chosen responses once.

        > Parameters that control online (iterative) RetMask

        regenerate_pairs_steps (`int`, *optional*):
            Regenerate the training pairs from the current policy every this many optimizer steps; the new pairs
            replace the data for the rest of training (same number of rows). `None` (the paper) keeps the pairs of
            the initial policy. The reference model stays the initial policy.
        regenerate_pairs_each_epoch (`bool`, *optional*, defaults to `False`):
            Regenerate the training pairs from the current policy at the start of every epoch after the first.

    > [!NOTE]
    > CPU defaults. TRL defaults to bf16 autocast and gradient checkpointing, GPU memory savers. Here `bf16` and
    > `gradient_checkpointing` default to `None`: on a CUDA/XPU/NPU/MPS machine they become TRL's `True`; without
    > one they become `False` (fp32, no checkpointing) with a warning, since fp32 is exact and fast on every CPU
    > while bf16 autocast is fast only on CPUs with native bf16 (avx512_bf16 / AMX). Set them explicitly to
    > override either way (docs/training.md has the measured step times).
    """

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["generation_kwargs"]

    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Enable gradient checkpointing. Defaults to True on a GPU and False on a CPU, where memory is "
            "rarely the limit."
        },
    )

    # Head selection
    head_scores: str | None = field(
        default=None,
        metadata={
            "help": "Retrieval-score JSON file or a model id with bundled scores. Defaults to the trainer's "
            "`head_scores` argument, then to the scores bundled for the policy's name."
        },
    )
    mask_threshold: float | None = field(
        default=0.1,
        metadata={"help": "Mask the heads whose mean retrieval score is at least this value (unless mask_top_k)."},
    )
    mask_top_k: int | None = field(
        default=None,
        metadata={"help": "Mask the k highest-scoring heads (replaces the threshold)."},
    )
    mask_strategy: str = field(
        default="retrieval",
        metadata={
            "help": "Which heads to mask: the retrieval heads, or the same number of random non-retrieval / random "
            "heads (controls).",
            "choices": list(MASK_STRATEGIES),
        },
    )
    mask_seed: int = field(default=0, metadata={"help": "Seed of the random masking strategies."})

    # Generation
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum tokens generated per response."})
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature; 0 means greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling probability."})
    top_k: int = field(default=0, metadata={"help": "Top-k cut; 0 disables it (the paper's vLLM setting)."})
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts generated together per process."})
    generation_seed: int | None = field(
        default=None, metadata={"help": "Seed of the sampling (per batch). Defaults to `seed`."}
    )
    generation_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Extra keyword arguments for `model.generate`."}
    )
    cache_pairs: bool = field(default=True, metadata={"help": "Cache generated pairs on disk (resumable)."})
    pairs_cache_dir: str | None = field(
        default=None, metadata={"help": "Directory of the pair cache. Defaults to `<output_dir>/_retmask_pairs`."}
    )

    # Online RetMask
    regenerate_pairs_steps: int | None = field(
        default=None,
        metadata={"help": "Regenerate the training pairs from the current policy every N optimizer steps."},
    )
    regenerate_pairs_each_epoch: bool = field(
        default=False,
        metadata={"help": "Regenerate the training pairs from the current policy at the start of each epoch."},
    )

    def __post_init__(self):
        # Cheap checks first: a bad value must fail here, not after minutes of generation.
        if self.mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"`mask_strategy` must be one of {MASK_STRATEGIES}, got {self.mask_strategy!r}.")
        if self.mask_threshold is None and self.mask_top_k is None:
            raise ValueError("Set `mask_threshold` or `mask_top_k` (or both) to choose the heads to mask.")
        if self.mask_top_k is not None and self.mask_top_k < 1:
            raise ValueError(f"`mask_top_k` must be >= 1, got {self.mask_top_k}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"`temperature` must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p}.")
        if self.generation_batch_size < 1:
            raise ValueError(f"`generation_batch_size` must be >= 1, got {self.generation_batch_size}.")
        if self.regenerate_pairs_steps is not None and self.regenerate_pairs_steps < 1:
            raise ValueError(f"`regenerate_pairs_steps` must be >= 1, got {self.regenerate_pairs_steps}.")
        if self.online and self.precompute_ref_log_probs:
            raise ValueError("Online RetMask (`regenerate_pairs_steps` / `regenerate_pairs_each_epoch`) regenerates "
                             "the pairs, so precomputed reference log-probs would go stale: set "
                             "`precompute_ref_log_probs=False`.")
        if self.online and self.train_sampling_strategy == "group_by_length":
            raise ValueError("Online RetMask swaps the training pairs in place, so lengths measured at the start would "
                             "go stale: use `train_sampling_strategy=\"random\"` with `regenerate_pairs_*`.")
        if self.online and self.dataloader_num_workers:
            raise ValueError("Online RetMask swaps the training pairs in place, which dataloader worker processes "
                             "would not see: set `dataloader_num_workers=0`.")
        if self.use_liger_kernel and not torch.cuda.is_available():
            raise ValueError(
                "`use_liger_kernel=True` needs CUDA: Liger's kernels are Triton GPU kernels and would crash when "
                "training starts on this CUDA-less machine. Set `use_liger_kernel=False` (the DPO loss still uses "
                "TRL's chunked fused LM head, which runs on the CPU)."
            )
        self._resolve_device_defaults()
        super().__post_init__()
        if self.generation_seed is None:
            self.generation_seed = self.seed

    def _resolve_device_defaults(self):
        """TRL's bf16 + gradient checkpointing on a GPU; fp32 without checkpointing on a CPU, loudly."""
        # transformers 5 renamed gradient_checkpointing to activation_checkpointing; either set explicitly wins.
        ckpt = self.activation_checkpointing if self.activation_checkpointing is not None else self.gradient_checkpointing
        if self.use_cpu or not accelerator_available():
            chosen = []
            if self.bf16 is None and not self.fp16:
                self.bf16 = False
                chosen.append("bf16=False (fp32)")
            if ckpt is None:
                self.activation_checkpointing = ckpt = False
                chosen.append("gradient_checkpointing=False")
            if chosen:
                warnings.warn(
                    f"No GPU found: RetMaskConfig uses CPU settings {', '.join(chosen)} instead of TRL's GPU defaults "
                    "(bf16 autocast, gradient checkpointing): fp32 is exact and fast on every CPU. Set them "
                    "explicitly to override (`bf16=True` is faster on CPUs with avx512_bf16 or AMX).",
                    UserWarning,
                    stacklevel=4,
                )
        elif ckpt is None:
            self.activation_checkpointing = True

    @property
    def online(self) -> bool:
        """Whether the pairs are regenerated from the current policy during training."""
        return self.regenerate_pairs_steps is not None or self.regenerate_pairs_each_epoch

    @property
    def selection(self) -> dict[str, Any]:
        """Keyword arguments of `HeadScores.select` (top-k, when set, replaces the threshold)."""
        threshold = None if self.mask_top_k is not None else self.mask_threshold
        return {"threshold": threshold, "top_k": self.mask_top_k, "strategy": self.mask_strategy,
                "seed": self.mask_seed}

    @property
    def generation_settings(self) -> dict[str, Any]:
        """The settings that decide the generated pairs (part of the cache fingerprint)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.generation_seed,
            "generation_kwargs": dict(self.generation_kwargs or {}),
        }
