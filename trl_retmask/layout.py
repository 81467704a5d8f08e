"""A model's head layout: how many layers and query heads it has, each head's width, and where each layer's
attention output projection (`o_proj`) is.

The one place a model family is read: the head vocabulary (`heads.validate_heads`), the scores (`scores.HeadScores`),
masking, detection and the generation backends all ask here, so a family that names these otherwise is taught once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["SUPPORTED", "attention_modules", "head_layout"]

SUPPORTED = (
    "Llama, Qwen2, Qwen3, Mistral, OLMo2/OLMo3, Gemma/Gemma2/Gemma3, Phi3 and other decoders whose attention "
    "modules have an `o_proj` output projection and a `layer_idx`"
)


def _config_of(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    get_text = getattr(config, "get_text_config", None)
    return get_text(decoder=True) if callable(get_text) else config


def head_layout(model_or_config) -> tuple[int, int, int]:
    """(num_layers, num_query_heads, head_dim) of a model or config."""
    config = _config_of(model_or_config)
    try:
        num_layers, num_heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    except AttributeError as e:
        raise ValueError(
            f"{type(config).__name__} has no num_hidden_layers/num_attention_heads: cannot locate "
            f"attention heads. Supported: {SUPPORTED}."
        ) from e
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return num_layers, num_heads, int(head_dim)


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder attention modules by layer index (PEFT wrappers included); ValueError if none can be masked."""
    from torch import nn  # here, not at the top: the head vocabulary reads layouts of configs without torch

    found: dict[int, nn.Module] = {}
    for module in model.modules():
        o_proj, layer_idx = getattr(module, "o_proj", None), getattr(module, "layer_idx", None)
        if isinstance(o_proj, nn.Module) and isinstance(layer_idx, int):
            found.setdefault(layer_idx, module)
    if not found:
        raise ValueError(
            f"Cannot mask heads of {type(model).__name__}: it has no attention module with an `o_proj` "
            f"output projection and a `layer_idx`. Supported: {SUPPORTED}."
        )
    return found
