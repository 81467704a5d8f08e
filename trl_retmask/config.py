"""`RetMaskConfig`: TRL's `DPOConfig` plus where the masked heads come from and how pairs are generated."""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from trl import DPOConfig

from .checkpointing import ARG, TWINS
from .generation import GENERATION_BACKENDS
from .generation.vllm import VLLMSettings, require_vllm
from .heads import HeadSelectionArguments
from .liger import check_liger
from .redaction import RedactedArguments
from .truncation import SIDES
from .validation import check_bool, check_choice, check_int, check_number, check_seed


def accelerator_available() -> bool:
    """True when training would run on a GPU-class device (CUDA, XPU, NPU, MPS) rather than the CPU."""
    if torch.cuda.is_available():
        return True
    for name in ("xpu", "npu", "mps"):
        backend = getattr(torch, name, None) or getattr(torch.backends, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return True
    return False


PAIRS_SUBDIR = "_retmask_pairs"
"""The pair cache's folder under `output_dir` when `pairs_cache_dir` is not set."""
GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
"""Generation settings with a field of their own in `RetMaskConfig` (not to be repeated in `generation_kwargs`)."""
ONE_SEQUENCE = ("do_sample", "num_beams", "num_return_sequences")
"""Settings fixed by pair generation: one sequence per prompt, sampled iff `temperature > 0`."""


def check_generation_kwargs(kwargs: dict, config=None) -> None:
    """`generation_kwargs` may only add `GenerationConfig` fields that no `RetMaskConfig` field sets: a clash would
    fail after the model is loaded ("multiple values for max_new_tokens") or silently override the field."""
    from transformers import GenerationConfig

    for key, value in kwargs.items():
        own = getattr(config, key, None) if config is not None else None
        if key in GENERATION_FIELDS[:4] or (key in GENERATION_FIELDS and own is not None and own != value):
            raise ValueError(
                f"`generation_kwargs` sets {key!r}, which is a field of its own: set `{key}` "
                f"(--{key}) instead and remove it from `generation_kwargs`."
            )
        if key in ONE_SEQUENCE:
            raise ValueError(
                f"`generation_kwargs` sets {key!r}, but pair generation decodes one sequence per prompt, "
                "sampled when `temperature > 0` and greedy when `temperature=0`: remove it."
            )
    unknown = GenerationConfig().update(**copy.deepcopy(kwargs))
    if unknown:
        raise ValueError(
            f"`generation_kwargs` has keys {sorted(unknown)} that are not fields of "
            "transformers.GenerationConfig; check their spelling."
        )


def check_finite_fields(config) -> None:
    """No float field may be NaN or infinite (a NaN learning rate or beta trains to NaN without an error)."""
    for f in fields(config):
        value = getattr(config, f.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"`{f.name}` must be a finite number, got {value!r}.")


@dataclass(repr=False)  # RedactedArguments' repr: no `hub_token`
class RetMaskConfig(RedactedArguments, HeadSelectionArguments, DPOConfig):
    r"""
    Configuration class for the [`RetMaskTrainer`].

    Everything of [`~trl.DPOConfig`] applies; the fields below choose the retrieval heads to mask and how the
    contrastive pairs are generated (chosen = the policy, rejected = the same policy with those heads masked).

    Parameters:
        > Parameters that choose the masked heads: those of [`HeadSelectionArguments`] (`heads`, `head_scores`,
        `mask_threshold`, `mask_top_k`, `mask_strategy`, `mask_seed`). With `head_scores=None` the trainer uses its
        `head_scores` argument, and failing that the scores found for the policy's own name; explicit `heads` need
        no scores.

        > Parameters that control the DPO sequences (with `max_length` of `DPOConfig`, 1024). Their defaults are the
        truncation of the authors' runs (TRL 0.24's defaults), done by `RetMaskTrainer`'s collator around TRL's: no
        row is dropped, and TRL's own `truncation_mode` is not used (its `"keep_end"` is deprecated: refused here)

        max_prompt_length (`int`, *optional*, defaults to `512`):
            Keep only the last `max_prompt_length` tokens of each prompt (left truncation), as TRL 0.24 did. `None`
            keeps whole prompts.
        truncation_side (`str`, *optional*, defaults to `"left"`):
            Which end of a prompt + completion sequence longer than `max_length` is cut: `"left"` keeps its last
            `max_length` tokens (TRL 0.24's `truncation_mode="keep_end"`, the authors'); `"right"` keeps its first
            ones (TRL 1.x's `"keep_start"`), and a prompt that alone fills `max_length` keeps its last
            `max_length // 2` tokens (TRL 0.24's ratio) where TRL 1.x would drop the row.

        > Parameters that control pair generation

        max_new_tokens (`int`, *optional*, defaults to `256`):
            Maximum number of tokens generated per response (chosen and rejected). The authors used 2048 (Llama-3.1,
            Olmo-3) and 4096 (Qwen3): the recipes set those.
        temperature (`float`, *optional*, defaults to `0.6`):
            Sampling temperature (the authors' request). `0.0` means greedy decoding.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling probability (the authors' request: no nucleus cut, whatever the model's file says).
        top_k (`int`, *optional*):
            Top-k cut; `0` disables it. `None` takes the model's `generation_config` value, and no cut when it has
            none, as the authors' vLLM server did (Qwen3-8B: 20; Llama-3.1-8B-Instruct: none). transformers' own
            fallback of 50 never applies.
        min_p (`float`, *optional*):
            Min-p cut. `None` keeps the model's `generation_config` value (none: no cut), as vLLM does.
        repetition_penalty (`float`, *optional*):
            Repetition penalty. `None` keeps the model's `generation_config` value (none: 1.0), as vLLM does.
        generation_batch_size (`int`, *optional*, defaults to `8`):
            Prompts generated together (left-padded, with the KV cache), per process.
        generation_backend (`str`, *optional*, defaults to `"auto"`):
            How pairs are decoded: `"vllm"` (one colocated vLLM engine per process, the heads masked inside it;
            installed as `scripts/setup.sh` does), `"generate"` (`model.generate`, the rejected rows in a second call
            under the head mask), `"static"` (chosen and rejected rows in one decode loop with a static KV cache,
            compiled with CUDA graphs on CUDA; not yet measured on a GPU), or `"auto"` (`"vllm"` where it is
            installed and can serve the model, on a CPU too: 2.5x `generate`'s pair tokens/s there; else
            `"generate"`).
            Greedy pairs are the same under all; sampled pairs differ (other random streams), so the backend is part of
            the pair-cache fingerprint.
        generation_seed (`int`, *optional*):
            Seed of the sampling; each batch (each prompt under vLLM) is seeded from it and its index, so a resumed or
            sharded generation yields the same pairs. Defaults to `seed`.
        generation_kwargs (`dict[str, Any]`, *optional*):
            Extra keyword arguments for `model.generate` (e.g. `{"repetition_penalty": 1.1}`).
        drop_empty_responses (`bool`, *optional*, defaults to `False`):
            Drop pairs with an empty chosen or rejected response. `False` (the authors): only pairs with identical
            responses are dropped (two empty responses are identical).
        keep_reasoning (`bool`, *optional*, defaults to `True`):
            Train on a reasoning model's whole response, `<think>reasoning</think>answer` (Qwen3 with thinking on).
            `False` keeps only the answer after `</think>` (vLLM's reasoning parser split), which the chat template
            renders after an empty think block. The authors' `synthesize_assistant_response.py` stored the reasoning
            only when vLLM returned it as `reasoning_content`, a field later vLLM releases renamed and then removed,
            so which of the two their Qwen3 data held depends on their vLLM version: the default keeps the reasoning
            (what their code asked for); `False` is the other reading. Applied after the pair cache (no regeneration).
        liger_kernels (`bool`, *optional*, defaults to `False`):
            Patch the policy's layers with Liger's Triton kernels through liger-kernel's own API (`liger_kernel_config`
            passes its switches). CUDA only; refused with the reason elsewhere. It replaces `use_liger_kernel`, which
            TRL 1.16 deprecates (refused here).
        cache_pairs (`bool`, *optional*, defaults to `True`):
            Cache the generated pairs on disk, keyed by a fingerprint of (model weights, heads, generation settings,
            prompts), batch by batch: a rerun skips generation and an interrupted one resumes.
        pairs_cache_dir (`str`, *optional*):
            Where the pairs are cached. Defaults to `<output_dir>/_retmask_pairs` (`push_to_hub` skips `_*` paths,
            so cached generations are not uploaded). Runs that share it and differ only in the masked heads (RetMask
            and its random-head control) generate the chosen responses once.

        > Parameters of the vLLM engine (the names and meanings of TRL's `GRPOConfig`)

        use_vllm (`bool`, *optional*):
            `True`: generate the pairs with vLLM (`generation_backend="vllm"`; an error if vLLM is not installed).
            `False`: never (`"auto"` becomes `"generate"`). `None`: as `generation_backend` says.
        vllm_mode (`str`, *optional*, defaults to `"colocate"`):
            `"colocate"`: one engine inside each training process. `"server"` is refused: the rejected responses need
            the policy's engine with its heads masked in place, which a separate server does not offer.
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
            Share of the GPU memory the engine takes (weights, activations, KV cache). On a CPU the KV cache is
            `VLLM_CPU_KVCACHE_SPACE` GiB, by default room for pair generation's largest batch of rows at once, at
            least 1.25 times the engine's window (`cpu_kv_cache_bytes`).
        vllm_tensor_parallel_size (`int`, *optional*, defaults to `1`):
            GPUs per engine (tensor parallelism); 1 on a CPU.
        vllm_max_model_length (`int`, *optional*):
            The engine's context length (prompt + response); `None` takes the model's.
        vllm_enable_sleep_mode (`bool`, *optional*, defaults to `False`):
            Free the engine's GPU memory (weights and KV cache) between generations; CUDA only.
        vllm_model_impl (`str`, *optional*, defaults to `"vllm"`):
            `"vllm"` (vLLM's own model code), `"transformers"` (transformers' modeling in vLLM) or `"auto"`.
        vllm_enforce_eager (`bool`, *optional*):
            Decode without CUDA graphs / compilation. `None`: eager on a CPU (compiling takes minutes there), graphs
            on a GPU.

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

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + [
        name
        for name in ("generation_kwargs", "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
        if name not in DPOConfig._VALID_DICT_FIELDS
    ]

    # Checkpointing under both of transformers' names (checkpointing.py): `activation_checkpointing` (transformers
    # >= 5.23) and `gradient_checkpointing` (the authors' flag, transformers < 5.23), either accepted on any release.
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Enable activation checkpointing (alias: gradient_checkpointing). Defaults to True on a GPU and "
            "False on a CPU, where memory is rarely the limit.",
            "nargs": "?",
            "const": True,
        },
    )
    activation_checkpointing_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of checkpointing (e.g. `use_reentrant`); alias: gradient_checkpointing_kwargs."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Alias of activation_checkpointing (the authors' flag; transformers < 5.23's name).",
            "nargs": "?",
            "const": True,
        },
    )
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Alias of activation_checkpointing_kwargs."}
    )

    # DPO sequences
    max_prompt_length: int | None = field(
        default=512,
        metadata={
            "help": "Keep only the last N tokens of each prompt (TRL 0.24's left truncation, the authors' 512). "
            "None keeps whole prompts; prompts are truncated, never dropped."
        },
    )
    truncation_side: str = field(
        default="left",
        metadata={
            "help": "End of a sequence longer than max_length that is cut: `left` keeps its last tokens (TRL "
            "0.24's keep_end, the authors'), `right` its first ones.",
            "choices": list(SIDES),
        },
    )
    liger_kernels: bool = field(
        default=False,
        metadata={
            "help": "Patch the policy with Liger's Triton kernels (liger-kernel's API; CUDA only). Replaces "
            "TRL's deprecated `use_liger_kernel`."
        },
    )

    # Generation
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum tokens generated per response."})
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature; 0 means greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling probability."})
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "Top-k cut; 0 disables it. None: the model's generation_config value (no cut if it has "
            "none), as the authors' vLLM server did."
        },
    )
    min_p: float | None = field(
        default=None, metadata={"help": "Min-p cut. None: the model's generation_config value (none: off), as vLLM."}
    )
    repetition_penalty: float | None = field(
        default=None, metadata={"help": "Repetition penalty. None: the model's generation_config value (none: 1.0)."}
    )
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts generated together per process."})
    generation_backend: str = field(
        default="auto",
        metadata={
            "help": "Pair decoding: `vllm` (colocated engine, heads masked inside it), "
            "`generate`, `static` (static cache, compiled, chosen and rejected in one "
            "batch) or `auto` (`vllm` where installed and able, else `generate`).",
            "choices": list(GENERATION_BACKENDS),
        },
    )
    generation_seed: int | None = field(
        default=None, metadata={"help": "Seed of the sampling (per batch; per prompt under vLLM). Defaults to `seed`."}
    )
    generation_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Extra keyword arguments for `model.generate`."}
    )
    drop_empty_responses: bool = field(
        default=False,
        metadata={
            "help": "Drop pairs with an empty chosen or rejected response. False (the authors): "
            "only identical pairs are dropped."
        },
    )
    keep_reasoning: bool = field(
        default=True,
        metadata={
            "help": "Train on the whole `<think>reasoning</think>answer` response (True) or "
            "only the answer after `</think>` (False); see docs/fidelity.md."
        },
    )
    cache_pairs: bool = field(default=True, metadata={"help": "Cache generated pairs on disk (resumable)."})
    pairs_cache_dir: str | None = field(
        default=None, metadata={"help": "Directory of the pair cache. Defaults to `<output_dir>/_retmask_pairs`."}
    )

    # vLLM (TRL's GRPOConfig names)
    use_vllm: bool | None = field(
        default=None, metadata={"help": "True: generate pairs with vLLM; False: never; None: as generation_backend."}
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "`colocate`: one engine per training process (`server` is refused).",
            "choices": ["colocate", "server"],
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Share of the GPU memory the vLLM engine takes."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per vLLM engine (1 on a CPU)."})
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "vLLM context length (prompt + response); None: the model's."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "Free the engine's GPU memory between generations (CUDA only)."}
    )
    vllm_model_impl: str = field(
        default="vllm",
        metadata={
            "help": "vLLM model code: `vllm`, `transformers` or `auto`.",
            "choices": ["auto", "vllm", "transformers"],
        },
    )
    vllm_enforce_eager: bool | None = field(
        default=None, metadata={"help": "Decode eagerly (no CUDA graphs). None: eager on a CPU, graphs on a GPU."}
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
        # Cheap checks first: a bad value must fail here, not after minutes of generation (the selection fields by
        # `check_selection`, then DPOConfig's own).
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        check_number("temperature", self.temperature, low=0)
        check_number("top_p", self.top_p, low=0, high=1, low_open=True)
        check_int("top_k", self.top_k, minimum=0, optional=True)
        check_number("min_p", self.min_p, low=0, high=1, optional=True)
        check_number("repetition_penalty", self.repetition_penalty, low=0, low_open=True, optional=True)
        check_int("generation_batch_size", self.generation_batch_size, minimum=1)
        check_choice("generation_backend", self.generation_backend, GENERATION_BACKENDS)
        check_seed("generation_seed", self.generation_seed, optional=True)
        self._resolve_vllm()
        check_int("regenerate_pairs_steps", self.regenerate_pairs_steps, minimum=1, optional=True)
        check_int("max_prompt_length", self.max_prompt_length, minimum=1, optional=True)
        check_int("max_length", self.max_length, minimum=2, optional=True)
        for name in (
            "cache_pairs",
            "drop_empty_responses",
            "regenerate_pairs_each_epoch",
            "liger_kernels",
            "keep_reasoning",
        ):
            check_bool(name, getattr(self, name))
        if self.pairs_cache_dir is not None and not isinstance(self.pairs_cache_dir, str):
            self.pairs_cache_dir = str(self.pairs_cache_dir)
        if self.online and self.precompute_ref_log_probs:
            raise ValueError(
                "Online RetMask (`regenerate_pairs_steps` / `regenerate_pairs_each_epoch`) regenerates "
                "the pairs, so precomputed reference log-probs would go stale: set "
                "`precompute_ref_log_probs=False`."
            )
        if self.online and self.train_sampling_strategy == "group_by_length":
            raise ValueError(
                "Online RetMask swaps the training pairs in place, so lengths measured at the start would "
                'go stale: use `train_sampling_strategy="random"` with `regenerate_pairs_*`.'
            )
        if self.online and self.dataloader_num_workers:
            raise ValueError(
                "Online RetMask swaps the training pairs in place, which dataloader worker processes "
                "would not see: set `dataloader_num_workers=0`."
            )
        if self.use_liger_kernel:
            raise ValueError(
                "`use_liger_kernel` is deprecated by TRL (removed in 2.0); RetMask applies Liger through "
                "liger-kernel itself: set `liger_kernels=True` (--liger_kernels True) instead."
            )
        if self.liger_kernels:
            check_liger()
        check_choice("truncation_side", self.truncation_side, SIDES)
        if self.truncation_mode == "keep_end":
            raise ValueError(
                '`truncation_mode="keep_end"` is deprecated by TRL (removed in 2.0); RetMask cuts '
                'sequences itself: `truncation_side="left"` (the default) keeps their last `max_length` '
                "tokens, as TRL 0.24's keep_end did. Remove `truncation_mode`."
            )
        self._resolve_device_defaults()
        self.check_selection()
        if not self.masks:
            raise ValueError(
                "RetMask masks heads: set `mask_threshold` or `mask_top_k` (a selection from scores), or `heads`."
            )
        DPOConfig.__post_init__(self)
        self._pair_checkpointing_names()
        if isinstance(self.generation_kwargs, str):  # DPOConfig parsed it from JSON (CLI)
            raise ValueError(f"`generation_kwargs` must be a JSON object, got {self.generation_kwargs!r}.")
        if self.generation_kwargs is not None and not isinstance(self.generation_kwargs, dict):
            raise ValueError(f"`generation_kwargs` must be a dict, got {type(self.generation_kwargs).__name__}.")
        check_generation_kwargs(self.generation_kwargs or {}, self)
        check_finite_fields(self)
        self._warn_unreachable_max_length()
        if self.online and (self.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")):
            raise ValueError(
                "Online RetMask (`regenerate_pairs_steps` / `regenerate_pairs_each_epoch`) cannot run "
                "under FSDP: each rank generates its own prompts, and FSDP's all-gathers inside "
                "`generate` would hang once ranks stop at different lengths. Use DDP or DeepSpeed ZeRO "
                "(`--accelerate_config zero3`), or offline RetMask."
            )
        if self.generation_seed is None:
            self.generation_seed = self.seed
            check_seed("generation_seed (defaults to `seed`)", self.generation_seed)

    def _resolve_vllm(self):
        """Check the `vllm_*` settings and reconcile `use_vllm` with `generation_backend` (before any model loads)."""
        if self.use_vllm is not None:
            check_bool("use_vllm", self.use_vllm)
        self.vllm_settings  # noqa: B018 - VLLMSettings checks its fields
        backend = self.generation_backend
        if (self.use_vllm and backend not in ("auto", "vllm")) or (self.use_vllm is False and backend == "vllm"):
            raise ValueError(
                f"`use_vllm={self.use_vllm}` contradicts `generation_backend={backend!r}`: set one of them only."
            )
        if self.use_vllm is False and backend == "auto":
            self.generation_backend = "generate"
        if self.use_vllm:
            self.generation_backend = "vllm"
        if self.generation_backend == "vllm":
            require_vllm(
                "Pair generation with `use_vllm=True` / `generation_backend='vllm'`",
                "set `generation_backend='generate'`",
            )
        window, new = self.vllm_max_model_length, self.max_new_tokens  # max_new_tokens checked above
        if self.generation_backend in ("auto", "vllm") and window is not None and new >= window:
            raise ValueError(  # vLLM would cut every response at its window, silently
                f"`vllm_max_model_length={window}` leaves no room for a prompt and `max_new_tokens={new}`: raise it "
                "above the longest prompt + max_new_tokens, or leave it unset (the model's window)."
            )

    @property
    def vllm_settings(self) -> VLLMSettings:
        """The vLLM engine's settings (checked when made)."""
        return VLLMSettings(
            mode=self.vllm_mode,
            gpu_memory_utilization=self.vllm_gpu_memory_utilization,
            tensor_parallel_size=self.vllm_tensor_parallel_size,
            max_model_length=self.vllm_max_model_length,
            enable_sleep_mode=self.vllm_enable_sleep_mode,
            model_impl=self.vllm_model_impl,
            enforce_eager=self.vllm_enforce_eager,
        )

    def _resolve_device_defaults(self):
        """TRL's bf16 + gradient checkpointing on a GPU; fp32 without checkpointing on a CPU, loudly."""
        ckpt = self.activation_checkpointing
        if ckpt is None:
            ckpt = self.gradient_checkpointing
        if self.use_cpu or not accelerator_available():
            chosen = []
            if self.bf16 is None and not self.fp16:
                self.bf16 = False
                chosen.append("bf16=False (fp32)")
            if ckpt is None:
                ckpt = False
                chosen.append("gradient_checkpointing=False")
            # Pinned memory only speeds copies to an accelerator; without one torch warns at every DataLoader.
            self.dataloader_pin_memory = False
            if chosen:
                warnings.warn(
                    f"No GPU found: RetMaskConfig uses CPU settings {', '.join(chosen)} instead of TRL's GPU defaults "
                    "(bf16 autocast, gradient checkpointing): fp32 is exact and fast on every CPU. Set them "
                    "explicitly to override (`bf16=True` is faster on CPUs with avx512_bf16 or AMX).",
                    UserWarning,
                    stacklevel=4,
                )
        elif ckpt is None:
            ckpt = True
        # Both names hold the resolved values before transformers' own __post_init__, which then has no deprecated
        # name to warn about (>= 5.23) or reads its only name (< 5.23).
        kwargs = self.activation_checkpointing_kwargs
        if kwargs is None:
            kwargs = self.gradient_checkpointing_kwargs
        self.activation_checkpointing = self.gradient_checkpointing = ckpt
        self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs = kwargs

    def _warn_unreachable_max_length(self):
        """A `max_length` raised above DPOConfig's default that prompts cut to `max_prompt_length` plus responses of
        `max_new_tokens` cannot fill: long documents would lose all but their last `max_prompt_length` tokens."""
        default = DPOConfig.__dataclass_fields__["max_length"].default
        if self.max_length is None or self.max_prompt_length is None or self.max_length <= default:
            return
        longest = self.max_prompt_length + self.max_new_tokens
        if longest < self.max_length:
            warnings.warn(
                f"max_length={self.max_length} cannot be reached: prompts are cut to their last "
                f"max_prompt_length={self.max_prompt_length} tokens and responses to max_new_tokens="
                f"{self.max_new_tokens}, at most {longest} tokens; set --max_prompt_length "
                f"{self.max_length - self.max_new_tokens} (max_length - max_new_tokens) to train on long prompts.",
                UserWarning,
                stacklevel=4,
            )

    def _pair_checkpointing_names(self):
        """From here on the two names are one setting: writing either writes both (`__setattr__`), and the kwargs are
        one dict. TRL 1.16 forces `use_reentrant=True` for PEFT + ZeRO-3 by writing `gradient_checkpointing_kwargs`
        after this `__post_init__` (trl/trainer/dpo_trainer.py:699-713), which transformers >= 5.23 copies to
        `activation_checkpointing_kwargs`, the name its Trainer reads, only inside `__post_init__`
        (transformers/training_args.py:1533-1543 in 5.25): without the pairing TRL's setting would be lost."""
        for name in (ARG, ARG + "_kwargs"):  # the installed transformers' own names (checkpointing.ARG)
            object.__setattr__(self, TWINS[name], getattr(self, name))
        object.__setattr__(self, "_checkpointing_paired", True)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in TWINS and self.__dict__.get("_checkpointing_paired"):
            super().__setattr__(TWINS[name], value)

    @property
    def online(self) -> bool:
        """Whether the pairs are regenerated from the current policy during training."""
        return self.regenerate_pairs_steps is not None or self.regenerate_pairs_each_epoch

    @property
    def pairs_dir(self) -> str:
        """Where generated pairs live on disk, for every entry point (trainer, `trl-retmask pairs`, `train`):
        `pairs_cache_dir`, else `<output_dir>/_retmask_pairs` (`push_to_hub` skips `_*` paths)."""
        return self.pairs_cache_dir or str(Path(self.output_dir) / PAIRS_SUBDIR)

    @property
    def pair_generation_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `generate_pairs` this config decides: the generation settings, the batch size and
        the cache directory (`pairs_dir`, None without `cache_pairs`). The trainer and the `pairs` stage pass exactly
        these, so both make (and cache) the same pairs."""
        return {
            **self.generation_settings,
            "batch_size": self.generation_batch_size,
            "cache_dir": self.pairs_dir if self.cache_pairs else None,
        }

    @property
    def generation_settings(self) -> dict[str, Any]:
        """The settings that decide the generated pairs (part of the cache fingerprint)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.generation_seed,
            # min_p / repetition_penalty only when set: unset, the model's generation_config keeps its own (vLLM's rule)
            "generation_kwargs": {
                **{
                    name: getattr(self, name)
                    for name in ("min_p", "repetition_penalty")
                    if getattr(self, name) is not None
                },
                **(self.generation_kwargs or {}),
            },
            "backend": self.generation_backend,
            "vllm": asdict(self.vllm_settings),
            "drop_empty": self.drop_empty_responses,
            "keep_reasoning": self.keep_reasoning,
        }
