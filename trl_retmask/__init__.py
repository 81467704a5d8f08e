"""RetMask for TRL: detect retrieval heads, mask them, and train the policy to prefer its unmasked answers."""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Light symbols import eagerly; the trainer (which pulls in TRL) and the stages import on first use.
from .masking import export_masked_model, head_layout, mask_heads, validate_heads  # noqa: E402
from .models import DEFAULT_MODEL, load_model_and_tokenizer  # noqa: E402
from .scores import HeadScores  # noqa: E402

_LAZY = {
    "RetMaskConfig": "config",
    "RetMaskTrainer": "trainer",
    "generate_pairs": "pairs",
    "detect_retrieval_heads": "detection",
    "evaluate_niah": "niah",
    "evaluate_long_context": "evaluation",
    "LongContextEvalCallback": "evaluation",
}

__all__ = ["DEFAULT_MODEL", "HeadScores", "export_masked_model", "head_layout", "load_model_and_tokenizer",
           "mask_heads", "validate_heads", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .config import RetMaskConfig  # noqa: F401
    from .detection import detect_retrieval_heads  # noqa: F401
    from .evaluation import LongContextEvalCallback, evaluate_long_context  # noqa: F401
    from .niah import evaluate_niah  # noqa: F401
    from .pairs import generate_pairs  # noqa: F401
    from .trainer import RetMaskTrainer  # noqa: F401
