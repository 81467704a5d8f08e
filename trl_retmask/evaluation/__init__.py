"""Offline long-context evaluation in the spirit of HELMET (synthetic recall, re-ranking, citation) and a
general-ability check, for measuring what RetMask training gains and what it costs."""

from .callback import LongContextEvalCallback
from .general import general_ability, heldout_perplexity, short_answer_accuracy
from .metrics import load_metric, metric_path
from .suite import evaluate_long_context, format_table, generate_suite, plot_results, save_results, score_suite
from .tasks import CATEGORIES, TASKS, build_suite

__all__ = ["CATEGORIES", "LongContextEvalCallback", "TASKS", "build_suite", "evaluate_long_context", "format_table",
           "general_ability", "generate_suite", "heldout_perplexity", "load_metric", "metric_path", "plot_results",
           "save_results", "score_suite", "short_answer_accuracy"]
