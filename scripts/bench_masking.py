"""Masking overhead: forward time with a 10-head mask / without, interleaved; parameter bytes added."""

from __future__ import annotations

import statistics
import time

import torch


def _param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def run(args):
    from trl_retmask import HeadScores, load_model_and_tokenizer, mask_heads

    model, _ = load_model_and_tokenizer(args.model)
    model.eval()
    try:
        heads = HeadScores.from_pretrained(args.model).select(top_k=10)
    except ValueError:  # no bundled scores for this model: any 10 heads cost the same
        heads = [(l, 0) for l in range(10)]
    seq = 512 if args.quick else 2048
    x = torch.randint(100, 10000, (1, seq))
    repeats = 3 if args.quick else 7
    plain, masked = [], []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(repeats):  # interleave so machine noise hits both sides alike
            t = time.perf_counter()
            model(x)
            plain.append(time.perf_counter() - t)
            with mask_heads(model, heads):
                t = time.perf_counter()
                model(x)
                masked.append(time.perf_counter() - t)
                during = _param_bytes(model)
    added = during - _param_bytes(model)
    return [
        {
            "name": f"forward {seq} tok: 10-head mask / none (median of {repeats})",
            "value": statistics.median(m / p for m, p in zip(masked, plain)),
            "unit": "x",
            "goal": "<= 1.05",
        },
        {"name": "forward time without mask (median)", "value": statistics.median(plain), "unit": "s", "goal": ""},
        {"name": "parameter+buffer bytes added by masking", "value": added, "unit": "B", "goal": "0"},
    ]
