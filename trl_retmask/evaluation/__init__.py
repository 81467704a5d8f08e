"""Offline long-context evaluation in the spirit of HELMET (synthetic recall, re-ranking, citation) and a
general-ability check, for measuring what RetMask training gains and what it costs."""

from .callback import LongContextEvalCallback
from .general import general_ability, heldout_perplexity, short_answer_accuracy
from .metrics import load_metric, metric_path
from .registry import CATEGORIES, TASKS, build_suite
from .stats import bootstrap_ci, paired_comparison, perplexity_ci, suite_comparison, suite_summary
from .suite import (
    evaluate_long_context,
    format_table,
    generate_suite,
    plot_results,
    sample_score,
    save_results,
    score_suite,
)

__all__ = [
    "CATEGORIES",
    "LongContextEvalCallback",
    "TASKS",
    "bootstrap_ci",
    "build_suite",
    "evaluate_long_context",
    "format_table",
    "general_ability",
    "generate_suite",
    "heldout_perplexity",
    "load_metric",
    "metric_path",
    "paired_comparison",
    "perplexity_ci",
    "plot_results",
    "sample_score",
    "save_results",
    "score_suite",
    "short_answer_accuracy",
    "suite_comparison",
    "suite_summary",
]
