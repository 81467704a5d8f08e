"""Settings without their secrets: no token or password the user passed (`--hub_token`, a `token` in
`model_init_kwargs`) is ever written to disk.

transformers' `Trainer._save` pickles the whole `TrainingArguments` into `training_args.bin` beside the model and in
every checkpoint (`torch.save(self.args, ...)`, transformers/trainer.py `_save` and `_push_from_checkpoint`), so
`hub_token` landed there verbatim; its `to_dict`/`str` hide top-level `*_token` fields only, the pickle and a
dataclass `repr` nothing. `RedactedArguments` sets every secret to None in all of them (copies in memory keep them).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

from transformers import PreTrainedTokenizerBase

_SECRET_NAME = re.compile(r"(^|_)(token|api_key|credentials?)$|password|secret", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """A setting whose value can be a secret: `token`, `*_token` (transformers' rule in `TrainingArguments.to_dict`),
    `*password*`, `*secret*`, `*api_key`, `*credential(s)`; not a tokenizer's special tokens (`pad_token`, ...)."""
    return bool(_SECRET_NAME.search(name)) and name not in PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES


def without_secrets(value: Any) -> Any:
    """`value` with every secret entry of its mappings (nested ones too) set to None; the input is not changed."""
    if isinstance(value, dict):
        return {k: None if isinstance(k, str) and is_secret_name(k) else without_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(without_secrets(v) for v in value)
    return value


class RedactedArguments:
    """For `TrainingArguments` subclasses (declared with `@dataclass(repr=False)`, so this `repr` is theirs): pickled
    (`training_args.bin`), shown (`str`, `repr`) and serialised (`to_dict`, hence `to_json_string` and the loggers'
    configs) without their secrets, nested ones too (transformers hides top-level `*_token` fields in `str` and
    `to_dict` only, a dataclass `repr` none). `copy.copy` and `copy.deepcopy` keep them: they would otherwise go
    through the pickling reduction, and `push_to_hub` needs the token."""

    def __getstate__(self) -> dict:
        return without_secrets(dict(self.__dict__))

    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def to_dict(self) -> dict:
        return without_secrets(super().to_dict())

    def __repr__(self) -> str:
        shown = without_secrets({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr})
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    __str__ = __repr__


__all__ = ["RedactedArguments", "is_secret_name", "without_secrets"]
