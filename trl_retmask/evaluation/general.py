"""General-ability check: did training harm anything outside long-context retrieval?

Two cheap signals, both offline: perplexity on held-out book text (`data/eval/heldout_pg19.txt`, the tail of
Dracula: neither the detection haystack, the suite's text nor the training prompts contain it, so RetMask
training never sees it) and accuracy on a 50-question short-answer set (world facts and arithmetic a small
instruct model mostly knows). Both also return their per-item values, for confidence intervals (`stats`).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from .metrics import load_metric
from .metrics.substring_match.substring_match import match_any

EVAL_DATA = Path(__file__).resolve().parent.parent / "data" / "eval"
HELDOUT_TEXT = EVAL_DATA / "heldout_pg19.txt"
SHORT_ANSWER = EVAL_DATA / "short_answer.jsonl"


@torch.no_grad()
def heldout_perplexity(
    model,
    tokenizer,
    text: str | None = None,
    window: int = 512,
    max_tokens: int = 4096,
    batch_size: int = 4,
    return_chunks: bool = False,
):
    """Perplexity over non-overlapping `window`-token chunks of the first `max_tokens` tokens of the text.

    With `return_chunks=True`, returns `(perplexity, [[summed NLL, predicted tokens] per chunk])`, the units a
    bootstrap interval resamples (`stats.perplexity_ci`).
    """
    text = HELDOUT_TEXT.read_text() if text is None else text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    chunks = [ids[i : i + window] for i in range(0, len(ids) - 1, window) if len(ids[i : i + window]) > 1]
    if not chunks:
        raise ValueError("The held-out text is shorter than two tokens; pass a longer `text`.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_chunk = []
    try:
        for i in range(0, len(chunks), batch_size):
            batch = chunks[i : i + batch_size]
            width = max(map(len, batch))
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for j, c in enumerate(batch):
                input_ids[j, : len(c)] = torch.tensor(c)
                mask[j, : len(c)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            target, keep = input_ids[:, 1:], mask[:, 1:].bool()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            per_chunk += [[row.item(), n.item()] for row, n in zip((losses * keep).sum(1), keep.sum(1))]
    finally:
        model.train(was_training)
    ppl = math.exp(sum(c[0] for c in per_chunk) / sum(c[1] for c in per_chunk))
    return (ppl, per_chunk) if return_chunks else ppl


def load_short_answer(path=None) -> list[dict]:
    """The shipped short-answer set: `{"question": ..., "answers": [aliases]}` per line."""
    with open(path or SHORT_ANSWER) as f:
        return [json.loads(line) for line in f if line.strip()]


def short_answer_accuracy(
    model,
    tokenizer,
    questions: list[dict] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    return_outputs: bool = False,
):
    """Fraction of questions whose greedy answer contains one of the aliases as whole words."""
    from .suite import generate

    questions = load_short_answer() if questions is None else questions
    prompts = [f"{q['question']} Answer in a few words." for q in questions]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    acc = load_metric("substring_match").compute(
        predictions=outputs, references=[q["answers"] for q in questions], aliases=True
    )["recall"]
    return (acc, outputs) if return_outputs else acc


def general_ability(model, tokenizer, heads=None, max_tokens: int = 4096, questions: list[dict] | None = None) -> dict:
    """`{"heldout_ppl", "short_answer", "heldout_chunks", "short_answer_correct"}` for the model (optionally with
    `heads` masked; `questions`: a subset of the short-answer set); the last two are the per-item values (per
    chunk `[NLL, tokens]`, per question 0/1)."""
    from ..masking import mask_heads

    with mask_heads(model, heads) if heads else contextlib.nullcontext():
        ppl, chunks = heldout_perplexity(model, tokenizer, max_tokens=max_tokens, return_chunks=True)
        questions = load_short_answer() if questions is None else questions
        acc, outputs = short_answer_accuracy(model, tokenizer, questions, return_outputs=True)
    correct = [match_any(o, q["answers"]) for o, q in zip(outputs, questions)]
    return {"heldout_ppl": ppl, "short_answer": acc, "heldout_chunks": chunks, "short_answer_correct": correct}
