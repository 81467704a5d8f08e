"""Benchmark section `vllm`: pair generation on the embedded model, vLLM vs transformers `generate`, in one run.

Both sides run `generate_pairs` (encoding, batching, decoding, the head mask) on the same shipped chat prompts with
the authors' sampling (temperature 0.6, top-p 1), each with its best batch layout (vLLM: every prompt in one call, it
schedules them itself; `generate`: batches of 16). Tokens/s = generated tokens / wall seconds. The machine's load
average is recorded before and after (on a shared CPU only the ratio in one run counts). The engine's start (build
from the config, weights pushed) is timed apart, then greedy pairs of both backends are compared token for token.
Usage: python scripts/bench.py --only vllm [--quick]
"""

from __future__ import annotations

import os
import time
import warnings


def run(args):
    from trl_retmask import HeadScores, load_model_and_tokenizer
    from trl_retmask.generation.vllm import VLLMBackend, can_serve, close_engine
    from trl_retmask.pairs import generate_pairs
    from trl_retmask.prompts import shipped_prompts

    warnings.filterwarnings("ignore")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    if not can_serve(model):
        print("# vllm: skipped (vLLM is not installed here or cannot serve this model)")
        return []
    heads = HeadScores.from_pretrained(args.model).select(top_k=20)
    n, new = (16, 32) if args.quick else (32, 64)
    chats = [[{"role": "user", "content": p}] for p in shipped_prompts()["prompt"][:n]]
    sampled = dict(max_new_tokens=new, temperature=0.6, top_p=1.0, show_progress=False)
    load_before = os.getloadavg()[0]

    def timed(backend, batch_size, seed, **kw):
        t = time.perf_counter()
        pairs = generate_pairs(model, tokenizer, chats, heads, seed=seed, backend=backend, batch_size=batch_size,
                               **{**sampled, **kw})
        return pairs, time.perf_counter() - t

    t = time.perf_counter()
    VLLMBackend().engine(model)  # build the engine and push the weights (once per process)
    start_s = time.perf_counter() - t
    vllm_pairs, vllm_s = timed(VLLMBackend(), n, 1)
    plain_pairs, plain_s = timed("generate", 16, 1)
    vllm_tps = vllm_pairs.stats.generated_tokens / vllm_s
    plain_tps = plain_pairs.stats.generated_tokens / plain_s
    greedy = dict(temperature=0.0, max_new_tokens=16)
    g_vllm, _ = timed("vllm", 8, 0, **greedy)
    g_plain, _ = timed("generate", 8, 0, **greedy)
    same = sum(a == b for a, b in zip(zip(g_vllm.chosen, g_vllm.rejected), zip(g_plain.chosen, g_plain.rejected)))
    close_engine()
    return [
        {"name": "load average (1 min) before / after", "value": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}",
         "unit": "", "goal": ""},
        {"name": "vLLM engine start (config, weights pushed)", "value": start_s, "unit": "s", "goal": ""},
        {"name": f"generate_pairs, backend vllm ({n} prompts x 2 roles, one call)", "value": vllm_tps,
         "unit": "tok/s", "goal": ""},
        {"name": f"generate_pairs, backend generate ({n} prompts x 2 roles, batches of 16)", "value": plain_tps,
         "unit": "tok/s", "goal": ""},
        {"name": "generate_pairs vllm / generate", "value": vllm_tps / plain_tps, "unit": "x", "goal": ">= 4"},
        {"name": f"greedy pairs identical, vllm vs generate ({n} prompts, 16 tokens)", "value": f"{same}/{n}",
         "unit": "", "goal": f"{n}/{n}"},
    ]
