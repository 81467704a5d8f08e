"""Benchmark section `vllm`: pair generation on the embedded model, vLLM vs transformers `generate`, in one run.

Both sides run `generate_pairs` (encoding, batching, decoding, the head mask) on the same shipped chat prompts with
the authors' sampling (temperature 0.6, top-p 1), each with its best batch layout (vLLM: every prompt in one call, it
schedules them itself; `generate`: batches of 16). Tokens/s = generated tokens / wall seconds. The machine's load
average is recorded before and after (on a shared CPU only the ratio in one run counts). The engine's start (build
from the config, weights pushed) is timed apart, then greedy pairs of both backends are compared token for token.
Usage: python scripts/bench.py --only vllm [--quick]

`python scripts/bench_vllm.py --main_command` instead runs the README's main command (`recipes/smollm2.py`) twice,
`--generation_backend generate` then `vllm`, each in a fresh process whose process tree's resident memory is
sampled every 0.2 s (peak = the largest sum over the tree), and prints wall time, peak memory, pair-generation
tokens/s and the phase timings of each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args):
    import torch

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
        pairs = generate_pairs(
            model, tokenizer, chats, heads, seed=seed, backend=backend, batch_size=batch_size, **{**sampled, **kw}
        )
        return pairs, time.perf_counter() - t

    t = time.perf_counter()
    VLLMBackend().engine(model)  # build the engine and push the weights (once per process)
    start_s = time.perf_counter() - t
    threads = torch.get_num_threads()
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
        {
            "name": "load average (1 min) before / after",
            "value": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}",
            "unit": "",
            "goal": "",
        },
        {"name": "vLLM engine start (config, weights pushed)", "value": start_s, "unit": "s", "goal": ""},
        {
            "name": "torch threads (both backends, after the engine's CPU binding)",
            "value": threads,
            "unit": "",
            "goal": "",
        },
        {
            "name": f"generate_pairs, backend vllm ({n} prompts x 2 roles, one call)",
            "value": vllm_tps,
            "unit": "tok/s",
            "goal": "",
        },
        {
            "name": f"generate_pairs, backend generate ({n} prompts x 2 roles, batches of 16)",
            "value": plain_tps,
            "unit": "tok/s",
            "goal": "",
        },
        {"name": "generate_pairs vllm / generate", "value": vllm_tps / plain_tps, "unit": "x", "goal": ">= 4"},
        {
            "name": f"greedy pairs identical, vllm vs generate ({n} prompts, 16 tokens)",
            "value": f"{same}/{n}",
            "unit": "",
            "goal": f"{n}/{n}",
        },
    ]


def main_command(backend: str, out_dir: Path, extra: list[str]) -> dict:
    """One run of the main command with `backend`: wall seconds, peak RSS of its process tree, its summary."""
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        str(REPO / "recipes" / "smollm2.py"),
        "--output_dir",
        str(out_dir),
        "--generation_backend",
        backend,
        *extra,
    ]
    with open(out_dir.with_suffix(".log"), "w") as log:
        start = time.perf_counter()
        proc = psutil.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.2)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} run failed (exit {proc.returncode}); see {out_dir.with_suffix('.log')}")
    summary = json.loads((out_dir / "retmask_recipe_summary.json").read_text())
    return {
        "wall_s": wall,
        "peak_gib": peak / 2**30,
        "pairs_tok_s": summary["pair_stats"]["train"]["tokens_per_second"],
        "timings_s": summary["timings_s"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main_command", action="store_true", help="time the README's main command, both backends")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("extra", nargs="*", help="recipe overrides for --main_command (after --)")
    args = parser.parse_args(argv)
    if not args.main_command:
        for row in run(args):
            print(row)
        return 0
    print(f"# load average before: {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_vllm_main_") as tmp:
        for backend in ("generate", "vllm"):
            result = main_command(backend, Path(tmp) / backend, args.extra)
            print(json.dumps({"backend": backend, **result}), flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
