"""Benchmark section `vllm`: pair generation on the embedded model, vLLM vs transformers `generate`, in one run.

Both sides run `generate_pairs` (encoding, batching, decoding, the head mask) on the same shipped chat prompts with
the authors' sampling (temperature 0.6, top-p 1), both in batches of 16 prompts, the main command's
`generation_batch_size` (vLLM decodes a batch's plain and masked rows in one call: 32 rows, which on a 2-core CPU
ran faster than 64, docs/benchmarks.md). Tokens/s = generated tokens / wall seconds. The machine's load average is
recorded before and after (on a shared CPU only the ratio in one run counts). The engine's start (build from the
config, weights pushed) is timed apart; then one cold call of each backend (vLLM's CPU kernels are made for each new
batch shape on first use: reported, it is what a short run pays), then two warm rounds, alternating, whose totals
give the ratio (what a run of many batches sees); then greedy pairs of both are compared token for token.
Usage: python scripts/bench.py --only vllm [--quick]

`python scripts/bench_vllm.py --engine_breakdown` times the bare engine (no pair logic, every response 64 tokens)
where its time goes: in-process vs vLLM's default multi-process engine, float32 vs bfloat16, per-request seeds vs
one engine seed vs greedy, and transformers `generate` (batches of 16, sampled) on the same prompts; each engine in
a fresh process (one engine per process), one JSON line per row.

`python scripts/bench_vllm.py --routes` times the engine's two ways of masking heads inside `generate_pairs`
(same prompts and sampling as the section, in one process, alternating, three rounds per batch size): per request
(a batch's plain and masked rows in one engine call, the CPU default) and weights swapped (two calls, the route of
engines with CUDA graphs), in batches of 16 and of 32 prompts. One JSON line per batch size.

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
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args):
    import torch

    from trl_retmask import HeadScores, load_model_and_tokenizer
    from trl_retmask.chat import encode_prompts
    from trl_retmask.generation.vllm import VLLMBackend, can_serve, close_engine
    from trl_retmask.pairs import generate_pairs
    from trl_retmask.prompts import shipped_prompts

    warnings.filterwarnings("ignore")
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

    ids = encode_prompts(tokenizer, chats)
    longest = sorted(range(n), key=lambda i: -len(ids[i]))  # generate_pairs' batches: longest prompts first
    calls = [[len(ids[i]) + new for i in longest[j : j + 16]] * 2 for j in range(0, n, 16)]  # both roles per call
    t = time.perf_counter()
    starter = VLLMBackend()
    starter.prepare(model, calls)  # the KV cache for the largest batch, as generate_pairs sizes it
    starter.engine(model)  # build the engine and push the weights (once per process)
    start_s = time.perf_counter() - t
    threads = torch.get_num_threads()
    # First (cold) call of each: vLLM's CPU kernels are created for every new batch shape, once per process.
    cold_pairs, cold_s = timed(VLLMBackend(), 16, 0)
    timed("generate", 16, 0)
    cold_tps = cold_pairs.stats.generated_tokens / cold_s
    tokens, seconds = {"vllm": 0, "generate": 0}, {"vllm": 0.0, "generate": 0.0}
    for seed in (1, 2):  # then warm, alternating, so drift of the machine hits both sides alike
        for name, backend, batch_size in (("vllm", VLLMBackend(), 16), ("generate", "generate", 16)):
            pairs, s = timed(backend, batch_size, seed)
            tokens[name] += pairs.stats.generated_tokens
            seconds[name] += s
    vllm_tps = tokens["vllm"] / seconds["vllm"]
    plain_tps = tokens["generate"] / seconds["generate"]
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
            "name": f"generate_pairs, backend vllm, first call ({n} prompts x 2 roles)",
            "value": cold_tps,
            "unit": "tok/s",
            "goal": "",
        },
        {
            "name": f"generate_pairs, backend vllm, warm ({n} prompts x 2 roles, batches of 16, one call each; 2 runs)",
            "value": vllm_tps,
            "unit": "tok/s",
            "goal": "",
        },
        {
            "name": f"generate_pairs, backend generate, warm ({n} prompts x 2 roles, batches of 16; 2 runs)",
            "value": plain_tps,
            "unit": "tok/s",
            "goal": "",
        },
        {"name": "generate_pairs vllm / generate, warm", "value": vllm_tps / plain_tps, "unit": "x", "goal": ">= 4"},
        {
            "name": f"greedy pairs identical, vllm vs generate ({n} prompts, 16 tokens)",
            "value": f"{same}/{n}",
            "unit": "",
            "goal": f"{n}/{n}",
        },
    ]


def engine_probe(engine: str, dtype: str, n: int = 32, new: int = 64) -> None:
    """One engine configuration (run in its own process): prints one JSON line per decode mode."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    warnings.filterwarnings("ignore")
    from transformers import AutoTokenizer

    from trl_retmask.models import resolve_model_path
    from trl_retmask.prompts import shipped_prompts

    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    chats = [[{"role": "user", "content": q}] for q in shipped_prompts()["prompt"][:n]]
    prompts = [
        list(tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"]) for c in chats
    ]
    if engine == "generate":
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        tokenizer.padding_side = "left"
        start, tokens = time.perf_counter(), 0
        for i in range(0, n, 16):
            batch = tokenizer.pad({"input_ids": prompts[i : i + 16]}, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(
                    **batch, max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=0.6, top_k=0
                )
            tokens += out[:, batch["input_ids"].shape[1] :].numel()
        rate = tokens / (time.perf_counter() - start)
        print(json.dumps({"engine": engine, "dtype": dtype, "mode": "sampled, batches of 16", "tok_s": rate}))
        return
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if engine == "multi-process" else "0"
    from vllm import LLM, SamplingParams

    from trl_retmask.generation.seeded import RowSampling
    from trl_retmask.generation.vllm_sampler import EXTRA_ARG, SeededSampler

    start = time.perf_counter()
    llm = LLM(
        model=path,
        enforce_eager=True,
        dtype=dtype,
        skip_tokenizer_init=True,
        seed=0,
        logits_processors=[SeededSampler],
    )
    print(json.dumps({"engine": engine, "dtype": dtype, "mode": "engine start", "s": time.perf_counter() - start}))
    modes = {
        "sampled, a seed per request": lambda i: dict(temperature=0.6, seed=i),
        "sampled, a seed per request, SeededSampler": lambda i: dict(
            temperature=0.0, extra_args={EXTRA_ARG: asdict(RowSampling(seed=i, temperature=0.6))}
        ),
        "sampled, the engine's seed": lambda i: dict(temperature=0.6),
        "greedy": lambda i: dict(temperature=0.0),
    }
    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], SamplingParams(max_tokens=8), use_tqdm=False)
    for mode, kw in modes.items():
        params = [SamplingParams(max_tokens=new, ignore_eos=True, detokenize=False, **kw(i)) for i in range(n)]
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        rate = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
        print(json.dumps({"engine": engine, "dtype": dtype, "mode": mode, "tok_s": rate}), flush=True)


def engine_breakdown() -> None:
    """Every engine configuration, each in a fresh process, one after the other (side by side in one run)."""
    print(f"# load average before: {os.getloadavg()[0]:.1f}", flush=True)
    configs = [("generate", "float32"), ("in-process", "float32"), ("multi-process", "float32")]
    configs += [("in-process", "bfloat16"), ("generate", "float32")]  # generate again: the drift of the machine
    for engine, dtype in configs:
        out = subprocess.run(
            [sys.executable, __file__, "--engine_probe", engine, dtype],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        rows = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not rows:
            raise RuntimeError(f"{engine} {dtype} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        print("\n".join(rows), flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.1f}")


def routes(model_name: str, rounds: int = 3) -> None:
    """Per-request masking vs swapped weights in `generate_pairs`, side by side (see the module's docstring)."""
    from trl_retmask import HeadScores, load_model_and_tokenizer
    from trl_retmask.generation.vllm import VLLMBackend
    from trl_retmask.pairs import generate_pairs
    from trl_retmask.prompts import shipped_prompts

    warnings.filterwarnings("ignore")
    model, tokenizer = load_model_and_tokenizer(model_name)
    model.eval()
    heads = HeadScores.from_pretrained(model_name).select(top_k=20)
    chats = [[{"role": "user", "content": p}] for p in shipped_prompts()["prompt"][:32]]
    per_request = VLLMBackend().engine(model).masks_requests
    for batch_size in (16, 32):
        sampled = dict(max_new_tokens=64, temperature=0.6, top_p=1.0, show_progress=False)
        generate_pairs(model, tokenizer, chats, heads, seed=99, batch_size=batch_size, **sampled)  # sizes the engine
        engine = VLLMBackend().engine(model)
        load = os.getloadavg()[0]
        tokens, seconds = {}, {}
        for seed in range(rounds):
            for route in ("per_request", "weights"):
                engine.masks_requests = per_request and route == "per_request"
                t = time.perf_counter()
                pairs = generate_pairs(
                    model, tokenizer, chats, heads, seed=seed, backend=VLLMBackend(), batch_size=batch_size, **sampled
                )
                seconds[route] = seconds.get(route, 0.0) + time.perf_counter() - t
                tokens[route] = tokens.get(route, 0) + pairs.stats.generated_tokens
        rates = {route: round(tokens[route] / seconds[route], 1) for route in tokens}
        print(json.dumps({"batch_size": batch_size, "tok_s": rates, "load_before_after": [load, os.getloadavg()[0]]}))
        engine.masks_requests = per_request


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
        peak, buckets = 0, {}  # buckets: the peak of each 30 s, to see which phase sets the peak
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
            except psutil.Error:
                rss = 0
            peak = max(peak, rss)
            second = int((time.perf_counter() - start) // 30 * 30)
            buckets[second] = max(buckets.get(second, 0), rss)
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
        "peak_gib_by_30s": {t: round(v / 2**30, 2) for t, v in buckets.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main_command", action="store_true", help="time the README's main command, both backends")
    parser.add_argument("--engine_breakdown", action="store_true", help="time the bare engine's modes (see above)")
    parser.add_argument("--routes", action="store_true", help="time the two head-masking routes (see above)")
    parser.add_argument("--engine_probe", nargs=2, metavar=("ENGINE", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--backends", default="generate,vllm", help="--main_command: the backends to run, in order")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("extra", nargs="*", help="recipe overrides for --main_command (after --)")
    args = parser.parse_args(argv)
    if args.engine_probe:
        engine_probe(*args.engine_probe)
        return 0
    if args.engine_breakdown:
        engine_breakdown()
        return 0
    if args.routes:
        routes(args.model)
        return 0
    if not args.main_command:
        for row in run(args):
            print(row)
        return 0
    print(f"# load average before: {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_vllm_main_") as tmp:
        for backend in args.backends.split(","):
            result = main_command(backend, Path(tmp) / backend, args.extra)
            print(json.dumps({"backend": backend, **result}), flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
