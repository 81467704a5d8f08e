"""Checks of user-set values, shared by the config dataclasses: a wrong type or a non-finite number must fail with
its field name at construction, not as a strange result (NaN temperature decodes greedily) minutes later."""

from __future__ import annotations

import math
from numbers import Integral, Real


def check_int(name: str, value, *, minimum: int | None = None, optional: bool = False) -> None:
    """`value` is an integer (bools and floats like 2.0 are refused) and at least `minimum`."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"`{name}` must be an integer{' or None' if optional else ''}, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}.")


SEED_MAX = 2**32 - 1
"""Largest accepted seed: numpy's and most tools' seed range; pair generation derives per-batch torch seeds from it
(seed * 1,000,003 + 2 * batch + role), which stays far inside torch's 64-bit range."""


def check_seed(name: str, value, *, optional: bool = False) -> None:
    """`value` is an integer seed in [0, SEED_MAX]: a negative or huge seed would only fail later, inside a library,
    after the model has loaded (or wrap around silently)."""
    check_int(name, value, optional=optional)
    if value is not None and not 0 <= value <= SEED_MAX:
        raise ValueError(f"`{name}` must be a seed in [0, 2**32 - 1], got {value!r}.")


def check_number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    optional: bool = False,
) -> None:
    """`value` is a finite real number (no bool, NaN or inf) in [low, high] (or (low, high] when `low_open`)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number{' or None' if optional else ''}, got {value!r}.")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"`{name}` must be in {'(' if low_open else '['}{lo}, {hi}], got {value!r}.")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(str, choices))}; got {value!r}.")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_pair_columns(what: str, columns) -> None:
    """A dataset holds both `chosen` and `rejected` (preference pairs, used as they are) or neither (prompts, completed
    with generated pairs): half a pair would reach TRL as `KeyError: 'rejected'`."""
    half = {"chosen", "rejected"} & set(columns)
    if len(half) == 1:
        (present,) = half
        (missing,) = {"chosen", "rejected"} - half
        raise ValueError(
            f"{what} has a `{present}` column but no `{missing}` column. Accepted: a `prompt` column (pairs are "
            f"generated), or `chosen` and `rejected` (preference pairs, `prompt` optional); add `{missing}` or drop "
            f"`{present}` (`dataset.remove_columns('{present}')`)."
        )
