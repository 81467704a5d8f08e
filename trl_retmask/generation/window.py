"""The model's context window, checked before anything is generated.

Every stage that generates (pairs, the trainer's online regeneration, NIAH, detection, the evaluation suite) asks
`check_window` before its first decode, and `generate_batch` asks again per batch: a prompt that with its
`max_new_tokens` does not fit the window is refused with the numbers, instead of generating past the positions the
model was trained on (transformers only warns) or sizing a static KV cache from an absurd `max_new_tokens`.
Over-long prompts are refused, not truncated: a cut prompt would be a different question, answered and trained on
silently.
"""

from __future__ import annotations

from collections.abc import Sequence


def model_window(model) -> int | None:
    """The model's context window (`max_position_embeddings` of its text config); None when the config has none."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    window = getattr(config, "max_position_embeddings", None)
    return window if isinstance(window, int) and window > 0 else None


def check_window(
    prompt_lengths: Sequence[int],
    max_new_tokens: int,
    window: int | None,
    name: str = "the model's window",
    *,
    what: str = "prompt",
    fix: str = "drop or shorten the longest prompts (e.g. `dataset.filter(...)`), or lower `max_new_tokens`",
) -> None:
    """Refuse generation that does not fit `window` tokens: `max_new_tokens` alone, or the longest prompt plus
    `max_new_tokens` (the message names that prompt as `what` and its index, and how many prompts do not fit);
    `name` says which window (the model's, or a generation engine's); `fix` ends the message. No-op when the window
    is unknown."""
    if window is None:
        return
    if max_new_tokens >= window:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {name} of "
            f"{window} tokens; lower `max_new_tokens` below {window}."
        )
    over = [i for i, n in enumerate(prompt_lengths) if n + max_new_tokens > window]
    if over:
        i = max(over, key=lambda j: prompt_lengths[j])
        which = f"{what} {i}" + (
            f"; {len(over)} of {len(prompt_lengths)} prompts do not fit" if len(prompt_lengths) > 1 else ""
        )
        raise ValueError(
            f"The longest prompt ({prompt_lengths[i]} tokens) + {max_new_tokens} new tokens exceeds "
            f"{name} of {window} tokens ({which}); {fix}."
        )


__all__ = ["check_window", "model_window"]
