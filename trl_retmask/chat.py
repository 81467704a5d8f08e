"""Prompts as the model sees them: one user turn rendered through the chat template, prompts encoded as TRL's
DPOTrainer encodes them, and empty prompts refused before any generation."""

from __future__ import annotations

import json
from collections.abc import Sequence

from trl.data_utils import is_conversational, maybe_apply_chat_template

__all__ = [
    "check_prompt_ids",
    "check_prompts",
    "encode_prompts",
    "encode_rendered",
    "is_conversational_prompt",
    "render_user_prompt",
    "row_template_kwargs",
]


def render_user_prompt(tokenizer, content: str, plain_suffix: str = "", **template_kwargs) -> str:
    """One user turn as the model sees it: the chat template when the tokenizer has one (with `template_kwargs`, e.g.
    `enable_thinking`), else the plain text followed by `plain_suffix`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True, **template_kwargs
        )
    return content + plain_suffix


def encode_rendered(tokenizer, text: str, **kwargs):
    """Tokenize a prompt made by `render_user_prompt`: chat-rendered text already holds its special tokens, plain
    text gets the tokenizer's own (its BOS)."""
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None), **kwargs)


def _blank(content) -> bool:
    if content is None or isinstance(content, str):
        return not (content or "").strip()
    if isinstance(content, list):  # multimodal parts: blank when every part is blank text
        return all(isinstance(p, dict) and p.get("type", "text") == "text" and _blank(p.get("text")) for p in content)
    return False


def check_prompts(prompts: Sequence) -> None:
    """Refuse empty prompts before any generation: an empty or whitespace-only string, a chat prompt without
    messages, or one whose last message (the turn answered) has no content. Alone in a batch such a prompt crashes
    inside transformers; batched with others it silently yields a response to nothing."""
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            empty = not p.strip()
        elif isinstance(p, list) and all(isinstance(m, dict) for m in p):
            empty = not p or _blank(p[-1].get("content"))
        else:
            raise ValueError(
                f"Prompt {i} must be a string or a list of chat messages, got {type(p).__name__}: {p!r:.80}"
            )
        if empty:
            raise ValueError(
                f"Prompt {i} is empty ({p!r:.80}); remove empty prompts from the data "
                "(e.g. `dataset.filter(...)`) before generating."
            )


def check_prompt_ids(prompt_ids: Sequence[Sequence[int]]) -> None:
    """Refuse prompts that encode to no tokens, naming the first one, before any generation."""
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"Prompt {i} encodes to no tokens; remove empty prompts from the data before generating.")


def is_conversational_prompt(prompt) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and is_conversational({"prompt": prompt})


def encode_prompts(tokenizer, prompts: list, template_kwargs: Sequence[dict | None] | None = None) -> list[list[int]]:
    """Token ids of each prompt as TRL's DPOTrainer tokenizes it: a chat prompt rendered by
    `trl.data_utils.maybe_apply_chat_template` (generation prompt added after a user turn) and tokenized without
    special tokens (the template holds them), a string tokenized as is. A chat prompt ending on an assistant turn is
    continued (TRL's helper), where DPOTrainer would open a new turn.

    `template_kwargs[i]`: the chat-template arguments of prompt `i` (`tools` and the row's `chat_template_kwargs`,
    see `row_template_kwargs`), which DPOTrainer passes when it tokenizes that row: the response is then generated
    after exactly the prompt it is trained on."""
    out = []
    for i, p in enumerate(prompts):
        kwargs = dict((template_kwargs[i] if template_kwargs is not None else None) or {})
        if is_conversational_prompt(p):
            tools = kwargs.pop("tools", None)
            text = maybe_apply_chat_template({"prompt": p}, tokenizer, tools=tools, **kwargs)["prompt"]
            out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        elif isinstance(p, str):
            out.append(list(tokenizer(text=p)["input_ids"]))
        else:
            raise ValueError(f"A prompt must be a string or a list of chat messages, got {type(p).__name__}: {p!r:.80}")
    return out


def row_template_kwargs(row: dict) -> dict | None:
    """The chat-template arguments DPOTrainer (TRL 1.16) takes from a dataset row: `tools` (a list or its JSON
    string) and the `chat_template_kwargs` dict; None when the row has neither."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"The `tools` column holds a string that is not JSON ({e}): {tools!r:.80}") from None
    extra = row.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise ValueError(
            f"The `chat_template_kwargs` column must hold dicts, got {type(extra).__name__}: {extra!r:.80}"
        )
    kwargs = {**({"tools": tools} if tools is not None else {}), **extra}
    return kwargs or None
