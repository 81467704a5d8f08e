"""Benchmark section `detection`: retrieval-head detection vs plain greedy generation and vs the reference algorithm.

Rows: time per sample (detection / plain `generate`, same prompt and tokens), peak memory increase at 8K tokens
(detection / plain generation, each in a fresh process, RSS sampled every 2 ms), and the speed-up over the
original retrieval-head algorithm (eager attention with `output_attentions` over the whole sequence, then a
Python loop over every head with `topk`), which is implemented here only. Run through scripts/bench.py, or alone:
    python scripts/bench_detection.py [--quick] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NEW_TOKENS = 50  # the authors' budget


def _setup(model_name: str, length: int, attn: str | None = None):
    import torch

    from trl_retmask.models import load_model_and_tokenizer
    from trl_retmask.niah_samples import build_niah_samples

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(model_name, attn_implementation=attn)
    sample = build_niah_samples(tok, [length], [50], None)[1]
    return model.eval(), tok, sample


def _fixed_length_generate(model, tok, sample, n: int):
    """Greedy generation of exactly n tokens (no EOS stop, as detection decodes), so both sides do the same work."""
    import torch

    from trl_retmask.niah import niah_generation_config

    config = niah_generation_config(model, n, stop_at_eos=False)
    ids = torch.tensor([sample.input_ids])
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)[
            0, ids.shape[1] :
        ]


def _detect_one(model, tok, sample, n: int):
    """Detection's per-sample work: recorded generation + vectorised scoring."""
    import torch

    from trl_retmask.detection import copy_scores, record_attention_argmax

    with record_attention_argmax(model) as recorder:
        new = _fixed_length_generate(model, tok, sample, n)
        positions = recorder.positions(len(sample.input_ids) - 1, len(new))
    seq = torch.tensor(sample.input_ids + new.tolist())
    return positions, copy_scores(positions, new, seq, sample.answer_span)


def _reference_one(model, sample, n: int):
    """The original retrieval-head code: eager attention, attentions of every layer, a loop over heads with topk."""
    import torch

    ids = torch.tensor([sample.input_ids])
    start, end = sample.answer_span
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    score = [[0.0] * heads for _ in range(layers)]
    positions = []
    with torch.inference_mode():
        out = model(input_ids=ids[:, :-1], use_cache=True)
        cache, inp = out.past_key_values, ids[:, -1:]
        for _ in range(n):
            out = model(input_ids=inp, past_key_values=cache, use_cache=True, output_attentions=True)
            cache, inp = out.past_key_values, out.logits[:, -1:].argmax(-1)
            step = torch.zeros(layers, heads, dtype=torch.long)
            for layer in range(layers):
                for head in range(heads):
                    _, idx = out.attentions[layer][0][head][-1].topk(1)
                    i = idx.item()
                    step[layer, head] = i
                    if start <= i < end and inp.item() == ids[0, i].item():
                        score[layer][head] += 1 / (end - start)
            positions.append(step)
    return torch.stack(positions), score


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _memory_child(model_name: str, length: int, mode: str) -> None:
    """In a fresh process: RSS increase (MiB) over the idle loaded model while running `mode`."""
    model, tok, sample = _setup(model_name, length)
    _fixed_length_generate(model, tok, type(sample)(**{**sample.__dict__, "input_ids": sample.input_ids[:64]}), 2)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    base, peak, done = rss(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    if mode == "detect":
        _detect_one(model, tok, sample, 8)
    else:
        _fixed_length_generate(model, tok, sample, 8)
    done.set()
    thread.join()
    print(json.dumps({"peak_increase_mib": (peak[0] - base) / 2**20}))


def _memory(model_name: str, length: int, mode: str) -> float:
    cmd = [sys.executable, __file__, "--memory-child", mode, "--length", str(length), "--model", model_name]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_increase_mib"]


def run(args) -> list[dict]:
    import torch

    model_name = getattr(args, "model", None) or "smollm2-135m-instruct"
    quick = bool(getattr(args, "quick", False))
    length = 1024 if quick else 2048
    mem_length = 2048 if quick else 8192
    repeats = 1 if quick else 2
    rows = []

    model, tok, sample = _setup(model_name, length)
    _fixed_length_generate(model, tok, sample, 2)  # warm-up
    plain = _timed(lambda: _fixed_length_generate(model, tok, sample, NEW_TOKENS), repeats)
    ours = _timed(lambda: _detect_one(model, tok, sample, NEW_TOKENS), repeats)
    rows.append(
        {
            "name": f"detection time / plain generate ({length} tok, {NEW_TOKENS} new)",
            "value": ours / plain,
            "unit": "x",
            "goal": "<= 1.25",
        }
    )
    rows.append(
        {"name": f"detection time per sample ({length} tok, {NEW_TOKENS} new)", "value": ours, "unit": "s", "goal": "-"}
    )

    model.set_attn_implementation("eager")
    t0 = time.perf_counter()
    ref_positions, ref_score = _reference_one(model, sample, NEW_TOKENS)
    reference = time.perf_counter() - t0
    model.set_attn_implementation("sdpa")
    positions, scores = _detect_one(model, tok, sample, NEW_TOKENS)
    rows.append(
        {
            "name": f"speed-up over reference algorithm (eager + head loop, {length} tok)",
            "value": reference / ours,
            "unit": "x",
            "goal": "> 1",
        }
    )
    rows.append(
        {
            "name": "argmax agreement with reference (positions)",
            "value": float((positions == ref_positions).float().mean()),
            "unit": "frac",
            "goal": "~1",
        }
    )
    rows.append(
        {
            "name": "max |score - reference score|",
            "value": float((scores - torch.tensor(ref_score)).abs().max()),
            "unit": "",
            "goal": "0",
        }
    )

    mem_plain = _memory(model_name, mem_length, "plain")
    mem_ours = _memory(model_name, mem_length, "detect")
    rows.append(
        {
            "name": f"peak memory increase, detection / plain generation ({mem_length} tok)",
            "value": mem_ours / mem_plain,
            "unit": "x",
            "goal": "<= 1.2",
        }
    )
    rows.append(
        {
            "name": f"peak memory increase of plain generation ({mem_length} tok)",
            "value": mem_plain,
            "unit": "MiB",
            "goal": "-",
        }
    )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", default=None, choices=["plain", "detect"])
    parser.add_argument("--length", type=int, default=8192)
    cli = parser.parse_args()
    if cli.memory_child:
        _memory_child(cli.model, cli.length, cli.memory_child)
    else:
        for row in run(cli):
            print(row)
