"""RetMask for TRL: detect retrieval heads, mask them, and train the policy to prefer its unmasked answers."""

from importlib import import_module
from typing import TYPE_CHECKING

from ._warnings import filter_dependency_noise

__version__ = "0.1.0"

filter_dependency_noise()  # known warnings of dependencies, each filtered where it is issued (_warnings.py)

# Every public name imports on first use: `import trl_retmask` (and so `trl-retmask --help`) loads neither torch nor
# TRL; `from trl_retmask import RetMaskTrainer` imports only what that name needs.
_LAZY = {
    "DEFAULT_MODEL": "models",
    "load_model_and_tokenizer": "models",
    "export_masked_model": "masking",
    "head_layout": "layout",
    "mask_heads": "masking",
    "validate_heads": "heads",
    "STRATEGIES": "heads",
    "HeadScores": "scores",
    "HeadSelectionArguments": "heads",
    "resolve_head_scores": "scores",
    "select_heads": "selection",
    "RetMaskConfig": "config",
    "RetMaskTrainer": "trainer",
    "generate_pairs": "pairs",
    "detect_retrieval_heads": "detection",
    "evaluate_niah": "niah",
    "evaluate_long_context": "evaluation",
    "LongContextEvalCallback": "evaluation",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:  # pragma: no cover
    from .config import RetMaskConfig  # noqa: F401
    from .detection import detect_retrieval_heads  # noqa: F401
    from .evaluation import LongContextEvalCallback, evaluate_long_context  # noqa: F401
    from .heads import STRATEGIES, HeadSelectionArguments, validate_heads  # noqa: F401
    from .layout import head_layout  # noqa: F401
    from .masking import export_masked_model, mask_heads  # noqa: F401
    from .models import DEFAULT_MODEL, load_model_and_tokenizer  # noqa: F401
    from .niah import evaluate_niah  # noqa: F401
    from .pairs import generate_pairs  # noqa: F401
    from .scores import HeadScores, resolve_head_scores  # noqa: F401
    from .selection import select_heads  # noqa: F401
    from .trainer import RetMaskTrainer  # noqa: F401
