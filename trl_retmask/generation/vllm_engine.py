"""The process's colocated vLLM engine: its settings, how it is built, sized, kept and closed.

One `vllm.LLM` per process, built from the policy's config alone (`load_format="dummy"`, no tokenizer) and reused
while the model's config and the settings stay the same (`engine_for`). Built as TRL's colocate mode builds it
(`trl/generation/vllm_generation.py:346-362`): `external_launcher` under `accelerate launch`, the seed of the
process, `max_num_batched_tokens=4096` on CUDA (vLLM's memory profiler is misled by its larger default), the
checkpoint's dtype on CUDA (TRL loads the engine from the checkpoint: `dtype="auto"`); on a CPU the parameters' dtype
(fp32 there, where greedy pairs equal `generate`'s exactly). vLLM's V1 model runner always
(`VLLM_USE_V2_MODEL_RUNNER=0` while it is built, see `ENGINE_ENVIRONMENT`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..distributed import process_state, return_freed_memory
from ..fingerprints import fingerprint
from ..validation import check_bool, check_choice, check_int, check_number
from .batch import model_device
from .vllm_sizing import cpu_kv_cache_bytes, cpu_kv_cache_tokens, engine_dtype, engine_window

logger = logging.getLogger(__name__)

VLLM_MODES = ("colocate", "server")
VLLM_MODEL_IMPLS = ("auto", "vllm", "transformers")
CUDA_MAX_NUM_BATCHED_TOKENS = 4096
"""Tokens per engine step on CUDA: TRL's value (`trl/generation/vllm_generation.py:358`)."""

ENGINE_ENVIRONMENT = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
"""Set before every engine is built. vLLM 0.31 runs Model Runner V2 by default on CUDA where Triton is installed
(`vllm/config/vllm.py:701-758`); its logits-processor loader takes only subclasses of its own V2 interface
(`vllm/v1/worker/gpu/sample/logits_processor/loader.py:88-94`), so `SeededSampler` (the V1 interface, which the CPU
runner uses) would be refused at `LLM(...)`, and V2 has none of the runner internals `vllm_heads` reads. vLLM reads
the variable in `vllm/envs.py` (cached once an engine has started: the cache is dropped first)."""

DIR_PREFIX = "trl_retmask_vllm_"
"""Prefix of an engine's config directory under the system's temporary directory. Each holds an `owner` file (host and
pid): a directory whose owner is dead on this host (a killed run) is removed when the next engine starts."""

STALE_UNOWNED_SECONDS = 3600
"""A directory without an `owner` file (made by an older version, or killed between creating it and writing the
file) is removed once it is this old."""


@dataclass
class VLLMSettings:
    """The engine's settings, in the words (and with the meaning) of TRL's `GRPOConfig` `vllm_*` fields.

    Checked at construction, before any model loads. `enforce_eager=None`: eager on a CPU (compiling the model takes
    minutes there), CUDA graphs on a GPU. Every field is in the pair cache's fingerprint (`VLLMBackend.cache_key`).
    """

    mode: str = "colocate"
    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    max_model_length: int | None = None
    enable_sleep_mode: bool = False
    model_impl: str = "vllm"
    enforce_eager: bool | None = None

    def __post_init__(self):
        check_choice("vllm_mode", self.mode, VLLM_MODES)
        if self.mode == "server":
            raise ValueError(
                "`vllm_mode='server'` is not supported: the rejected responses come from the policy's "
                "engine with its retrieval heads masked in place, which a separate server cannot do. "
                "Use `vllm_mode='colocate'` (one engine in each training process)."
            )
        check_number("vllm_gpu_memory_utilization", self.gpu_memory_utilization, low=0, high=1, low_open=True)
        check_int("vllm_tensor_parallel_size", self.tensor_parallel_size, minimum=1)
        check_int("vllm_max_model_length", self.max_model_length, minimum=1, optional=True)
        check_bool("vllm_enable_sleep_mode", self.enable_sleep_mode)
        check_choice("vllm_model_impl", self.model_impl, VLLM_MODEL_IMPLS)
        if self.enforce_eager is not None:
            check_bool("vllm_enforce_eager", self.enforce_eager)
        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"`vllm_tensor_parallel_size={self.tensor_parallel_size}` is not supported: each process runs its "
                "own engine on its own device (the pairs are shared out by batch, the masked rows need the engine "
                "in the process), so set it to 1; a model too large for one device's engine needs "
                "`generation_backend='generate'`."
            )
        if self.enable_sleep_mode and not torch.cuda.is_available():
            raise ValueError(
                "`vllm_enable_sleep_mode=True` frees GPU memory between generations and needs CUDA; "
                "set it to False on this machine."
            )


# ------------------------------------------------------------------------------------------- directories
def _owner() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_engine_dirs(root: str | os.PathLike | None = None) -> list[str]:
    """Remove the engine directories (`DIR_PREFIX`) under `root` (the temporary directory) left by runs that died
    (kill -9): their owner's pid is gone on this host, or they have no owner and are older than
    `STALE_UNOWNED_SECONDS`. Directories of live processes and of other hosts (a shared /tmp) are kept. Returns the
    removed paths."""
    removed = []
    host = socket.gethostname()
    for path in Path(root or tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        try:
            if not path.is_dir() or path.is_symlink():
                continue
            owner = path / "owner"
            if owner.is_file():
                owner_host, _, pid = owner.read_text().strip().rpartition(" ")
                stale = owner_host == host and pid.isdigit() and not _alive(int(pid))
            else:
                stale = time.time() - path.stat().st_mtime > STALE_UNOWNED_SECONDS
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    if removed:
        logger.info("Removed %d vLLM engine directories left by killed runs.", len(removed))
    return removed


@contextlib.contextmanager
def engine_environment(extra: dict[str, str] | None = None) -> Iterator[None]:
    """`ENGINE_ENVIRONMENT` (and `extra`) in `os.environ` while an engine is built, with vLLM's cache of its variables
    dropped so it reads them again; the user's values come back afterwards (a TRL vLLM engine built later in the same
    process gets its own defaults). The engine keeps what it read: its core caches vLLM's variables at start-up
    (`vllm/v1/engine/core.py:252`, `enable_envs_cache`)."""
    from vllm import envs

    values = {**(extra or {}), **ENGINE_ENVIRONMENT}
    saved = {k: os.environ.get(k) for k in values}
    if saved["VLLM_USE_V2_MODEL_RUNNER"] not in (None, ENGINE_ENVIRONMENT["VLLM_USE_V2_MODEL_RUNNER"]):
        logger.warning(
            "VLLM_USE_V2_MODEL_RUNNER=%s replaced by 0 for this engine: pair generation needs vLLM's V1 model runner.",
            saved["VLLM_USE_V2_MODEL_RUNNER"],
        )
    os.environ.update(values)
    envs.disable_envs_cache()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def empty_device_cache(device: torch.device) -> None:
    """Give the CUDA caching allocator's free blocks back: vLLM's start-up check counts them as used by others
    (`torch.cuda.empty_cache()` as TRL calls it around its engine)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------- engine
class _Engine:
    """The process's colocated `vllm.LLM`, built from a model's config (dummy weights until pushed)."""

    def __init__(self, model, settings: VLLMSettings, key: str, dtype: str, tokens: int = 0, longest: int = 0):
        from vllm import LLM

        from .vllm_sampler import SeededSampler

        self.key = key
        self.sleeping = False
        remove_stale_engine_dirs()
        self._dir = tempfile.TemporaryDirectory(prefix=DIR_PREFIX)
        (Path(self._dir.name) / "owner").write_text(_owner())
        model.config.save_pretrained(self._dir.name)  # config only: the weights come from memory
        self.device = device = model_device(model)
        state = process_state()
        kwargs = {}
        if state.num_processes > 1:  # one engine per rank on its own device, as TRL's colocate mode
            environment = {
                "RANK": str(state.process_index),
                "LOCAL_RANK": str(state.local_process_index),
                "WORLD_SIZE": str(state.num_processes),
            }
            kwargs["distributed_executor_backend"] = "external_launcher"
        else:
            environment = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # in-process: tensors reach the worker by reference
        self.kv_tokens = None  # the tokens its CPU KV cache was sized for, where this package sized it
        if device.type == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            self.kv_tokens = cpu_kv_cache_tokens(model, settings.max_model_length, tokens)
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(model, settings.max_model_length, tokens)
        if device.type == "cuda":
            kwargs["max_num_batched_tokens"] = CUDA_MAX_NUM_BATCHED_TOKENS
        self.window = engine_window(model, settings, longest, device.type)
        eager = device.type != "cuda" if settings.enforce_eager is None else settings.enforce_eager
        empty_device_cache(device)
        with engine_environment(environment):
            self.llm = LLM(
                model=self._dir.name,
                skip_tokenizer_init=True,
                load_format="dummy",
                dtype=dtype,
                tensor_parallel_size=settings.tensor_parallel_size,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                max_model_len=self.window,
                enable_sleep_mode=settings.enable_sleep_mode,
                model_impl=settings.model_impl,
                seed=state.process_index,
                enforce_eager=eager,
                logits_processors=[SeededSampler],
                **kwargs,
            )
        # Hooks see every step only without CUDA graphs, and reach the runner only when it lives in this process
        self.masks_requests = eager and settings.tensor_parallel_size == 1

    def load(self, weights, partial: bool = False) -> None:
        """Load checkpoint-format `(name, tensor)` pairs in place (vLLM re-runs each layer's processing). `partial`:
        only some layers' weights (the masked `o_proj`s); vLLM keeps the others' as they are
        (`reload/layerwise.py:258-266`) and warns for each, which is expected here and not shown."""
        with _quiet_partial_reload() if partial else contextlib.nullcontext():
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
        self.llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence) -> list[list[int]]:
        """New token ids per prompt; a masked row's prompt is salted with its heads' key (`vllm_heads.MASKED_ARG`),
        so its KV blocks are never shared with rows decoded under other weights."""
        from .vllm_heads import MASKED_ARG

        if not prompts:
            return []
        inputs = []
        for p, param in zip(prompts, params):
            salt = (param.extra_args or {}).get(MASKED_ARG)
            inputs.append({"prompt_token_ids": list(p), **({"cache_salt": salt} if salt else {})})
        outputs = self.llm.generate(inputs, list(params), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    @contextlib.contextmanager
    def heads_per_request(self, columns: dict[str, torch.Tensor]):
        """`columns` ({`o_proj` name: masked features}) masked in the requests flagged masked, for the duration;
        yields False (nothing installed) where this engine cannot (`masks_requests`), its model lacks a layer or its
        runner lacks the internals the hooks read."""
        from .vllm_heads import RequestHeadMask

        if not self.masks_requests:
            yield False
            return
        try:
            yield all(self.llm.collective_rpc(RequestHeadMask.install, args=(columns,)))
        finally:
            self.llm.collective_rpc(RequestHeadMask.remove)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        with _keeping_default_process_group():
            del llm  # the engine shuts down when collected
            _release_reload_state()
            gc.collect()
        return_freed_memory()  # the training that follows would count glibc's freed blocks as resident
        empty_device_cache(self.device)
        self._dir.cleanup()


def _layerwise():
    """vLLM's layer-wise reload module (`reload_weights`), None in versions without one."""
    try:
        from vllm.model_executor.model_loader.reload import layerwise
    except ImportError:
        return None
    return layerwise


class _DropFailedLoads(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load weights" not in str(record.msg)


@contextlib.contextmanager
def _quiet_partial_reload():
    """vLLM's "<Layer>: Failed to load weights" warnings dropped for the duration: a partial reload names only the
    masked `o_proj`s, and vLLM puts every other layer's current weights back (`_place_kernel_tensors`), warning once
    per such layer and swap (a screen of warnings per pair batch)."""
    layerwise = _layerwise()
    if layerwise is None:
        yield
        return
    drop = _DropFailedLoads()
    layerwise.logger.addFilter(drop)
    try:
        yield
    finally:
        layerwise.logger.removeFilter(drop)


@contextlib.contextmanager
def _keeping_default_process_group():
    """vLLM's engine shutdown ends with `torch.distributed.destroy_process_group()`. Under `accelerate launch` that
    group is the training job's (the colocated engines join it through `external_launcher`): destroying it made the
    next collective fail (found by the 2-process test). Other groups, vLLM's own, are still destroyed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    destroy = dist.destroy_process_group

    def keep_default(group=None):
        if group is not None and group is not dist.GroupMember.WORLD:
            destroy(group)

    dist.destroy_process_group = keep_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def _release_reload_state() -> None:
    """Drop what vLLM's in-place reload keeps of a closed engine's layers.

    `reload_weights` records each layer's tensors in a module-level `WeakKeyDictionary` keyed by the layer; the
    recorded parameters' `weight_loader`s are bound to the layer, so the value keeps its own key alive and the engine's
    weights are never freed (0.7 GiB on the embedded model, measured; it raised the main command's training peak by
    as much). One engine per process: once it is closed, nothing else in the process has entries there."""
    layerwise = _layerwise()
    if layerwise is None:  # vLLM versions without layer-wise reload keep no such state
        return
    info = getattr(layerwise, "LAYERWISE_INFO", None)
    if info is not None:
        info.clear()


_ENGINE: _Engine | None = None


def engine_for(model, settings: VLLMSettings, tokens: int = 0, longest: int = 0) -> _Engine:
    """The process's engine for `model`'s architecture and `settings`: reused while they stay the same, else
    replaced (one engine per process: its KV cache and weights take memory); on a CPU also replaced when its KV cache
    is smaller than `tokens` asks (`cpu_kv_cache_bytes`), on CUDA when its window is shorter than `longest` (the
    longest row to come). Every rank passes the same numbers, so they agree on a rebuild."""
    global _ENGINE
    config = {
        k: v
        for k, v in model.config.to_dict().items()  # what the engine's model is built from
        if not k.startswith("_") and k not in ("transformers_version", "use_cache")
    }
    device = model_device(model)
    dtype = engine_dtype(model, device.type)
    key = fingerprint(config=config, settings=settings, device=str(device), dtype=dtype)
    if _ENGINE is not None and _ENGINE.key != key:
        changed = sorted(k for k in set(config) | set(_ENGINE.config) if config.get(k) != _ENGINE.config.get(k))
        logger.warning(
            "Replacing the vLLM engine: the model or its settings changed (%s).",
            ", ".join(changed) or "settings, device or dtype",
        )
        close_engine()
    elif _ENGINE is not None and _ENGINE.kv_tokens is not None:
        needed = cpu_kv_cache_tokens(model, settings.max_model_length, tokens)
        if needed > _ENGINE.kv_tokens:  # decided on tokens, not on free memory: every rank decides alike
            logger.info("Rebuilding the vLLM engine with a KV cache of %d tokens for a whole batch.", needed)
            close_engine()
    elif _ENGINE is not None and _ENGINE.window is not None and longest > _ENGINE.window:
        logger.info("Rebuilding the vLLM engine for rows of %d tokens (its window: %d).", longest, _ENGINE.window)
        close_engine()
    if _ENGINE is None:
        _ENGINE = _Engine(model, settings, key, dtype, tokens, longest)
        _ENGINE.config = config
    return _ENGINE


def close_engine() -> None:
    """Release the process's engine (memory); the next vLLM generation builds a new one."""
    global _ENGINE
    if _ENGINE is not None:
        _ENGINE.close()
        _ENGINE = None


def keeps_engine_through_training(device_type: str, online: bool, sleeping: bool) -> bool:
    """Whether an engine stays built while the trainer trains: only on a CPU for an online run (rebuilding per
    regeneration costs more than its memory there), or asleep (sleep mode: weights and KV cache already freed).
    On CUDA its memory is what training needs."""
    return sleeping or (online and device_type != "cuda")


def release_engine_for_training(online: bool) -> None:
    """Before training: the engine closed unless `keeps_engine_through_training` (an online CUDA run rebuilds it per
    regeneration, or sleeps with `vllm_enable_sleep_mode`)."""
    if _ENGINE is not None and not keeps_engine_through_training(_ENGINE.device.type, online, _ENGINE.sleeping):
        close_engine()


__all__ = [
    "ENGINE_ENVIRONMENT",
    "VLLMSettings",
    "close_engine",
    "engine_for",
    "keeps_engine_through_training",
    "release_engine_for_training",
    "remove_stale_engine_dirs",
]
