"""Activation checkpointing on both sides of transformers' rename.

transformers 5.23 renamed `gradient_checkpointing*` (the TrainingArguments fields and the model's methods and
property) to `activation_checkpointing*`, keeping the old names as deprecated aliases until v6 that warn when used.
The package supports transformers from 5.17 (vLLM 0.31 caps it below 5.18), where only the old names exist, so it
reads and calls whichever names the installed transformers defines as its own, and never a deprecated one.
"""

from __future__ import annotations

from transformers import TrainingArguments

RENAMED = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
"""True on transformers >= 5.23: `activation_checkpointing*` are the real names, `gradient_checkpointing*` warn."""

ARG = "activation_checkpointing" if RENAMED else "gradient_checkpointing"
"""The installed transformers' own name of the TrainingArguments switch (`ARG + "_kwargs"`: its keyword arguments)."""

TWINS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}
"""Each training argument's name on the other side of the rename."""


def checkpointing_kwargs(args) -> dict | None:
    """The keyword arguments the Trainer enables checkpointing with (any `TrainingArguments`)."""
    return getattr(args, ARG + "_kwargs")


def is_checkpointing(model) -> bool:
    """Whether checkpointing is on for `model` (a `PreTrainedModel`, or a PEFT model that forwards to one)."""
    return model.is_activation_checkpointing if RENAMED else model.is_gradient_checkpointing


def enable_checkpointing(model, kwargs: dict | None) -> None:
    """Turn checkpointing on for `model` with `kwargs` (`use_reentrant`, ...)."""
    if RENAMED:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
