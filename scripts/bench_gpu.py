"""Benchmark section `gpu`: random-weight models of the recipe shapes, built on the GPU (no downloaded weights).

Rows (each time-boxed; an error becomes a row, the others still run):
1. pair generation tokens/s through `generate_pairs` (what users get: encoding, batching, decoding included) with
   each backend: `vllm` (the colocated engine, the masked layers' o_proj weights swapped in for the rejected rows)
   vs `static` (one batch of chosen + rejected rows, static cache, compiled decode) vs `generate` (two
   `model.generate` calls, the second under `mask_heads`) vs bare `generate`, and the fraction of the bandwidth
   limit (rows per step x HBM bandwidth / weight bytes); the vLLM rows only where vLLM can serve the model;
2. mask overhead (forward with `mask_heads` / without; per-row mask active / inactive);
3. detection vs plain greedy generation at 8K and 32K tokens (time, peak memory);
4. a DPO step (TRL's DPOTrainer.training_step + optimizer step) with and without Liger;
5. the longest sequence per GPU for full and LoRA DPO of the 8B shape at batch 1 (bisection with OOM catch).

Shapes: trl_retmask/data/model_configs/*.json (Llama-3.1-8B-Instruct, Qwen3-8B, Olmo-3-7B: the published
config.json values; llama-1b-smollm2-vocab: a 1.17B shape). `--tiny` shrinks every shape and length so
that all rows run on a CPU in about a minute (how the script is tested). Through scripts/bench.py the section skips
without CUDA. Usage:
    python scripts/bench_gpu.py [--tiny] [--only generation,mask,detection,dpo,longest] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "trl_retmask" / "data" / "model_configs"
NOMINAL_TBPS = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "L40S": 0.864, "A10": 0.6}  # HBM/GDDR, spec sheets
ROWS = ("generation", "mask", "detection", "dpo", "longest")


# ------------------------------------------------------------------------------------------------- set-up
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_config(name: str, tiny: bool):
    """The shipped config of `name`; with `tiny`, the same family shrunk to a few thousand parameters."""
    from transformers import AutoConfig

    values = json.loads((CONFIGS / f"{name}.json").read_text())
    if tiny:
        kv_ratio = values["num_attention_heads"] // values.get("num_key_value_heads", values["num_attention_heads"])
        values.update(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=max(1, 4 // kv_ratio),
            head_dim=16,
            vocab_size=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        if "layer_types" in values:
            values["layer_types"] = values["layer_types"][:4]
        if values.get("sliding_window"):
            values["sliding_window"] = 32
    return AutoConfig.for_model(**values)


def build(name: str, tiny: bool, attn: str = "sdpa"):
    """A random-weight bf16 (fp32 on CPU) model of the shape, built directly on the device."""
    config = load_config(name, tiny)
    dtype = torch.bfloat16 if device().type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device()):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def bandwidth_tbps() -> tuple[float, str]:
    """(TB/s, source): a device-to-device copy of 2 GiB (read + write), or the spec sheet where it is higher."""
    if not torch.cuda.is_available():
        return 0.02, "CPU placeholder"
    x = torch.empty(2**30, dtype=torch.int16, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync()
    measured = 5 * 2 * x.numel() * x.element_size() / (time.perf_counter() - t) / 1e12
    del x, y
    name = torch.cuda.get_device_name()
    nominal = next((v for k, v in NOMINAL_TBPS.items() if k in name), None)
    return measured, f"measured copy ({name}; spec {nominal} TB/s)"


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (length - 1 - (i % 7),), generator=g).tolist() for i in range(n)]


def some_heads(model, k: int = 10) -> list[tuple[int, int]]:
    from trl_retmask.layout import head_layout

    layers, heads, _ = head_layout(model)
    return [((i * 7) % layers, (i * 5) % heads) for i in range(k)]


def row(name, value, unit="", goal="", **extra):
    return {"name": name, "value": value, "unit": unit, "goal": goal, **extra}


# ------------------------------------------------------------------------------------------------- rows
def text_prompts(tokenizer, n: int, length: int) -> list[str]:
    """`n` plain-text prompts of about `length` tokens (a few shorter), from the tokenizer's own words."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha()]
    g = torch.Generator().manual_seed(0)
    return [
        " ".join(words[j] for j in torch.randint(len(words), (length - 1 - i % 7,), generator=g).tolist())
        for i in range(n)
    ]


def bench_generation(args) -> list[dict]:
    from trl_retmask.generation import StaticCacheBackend
    from trl_retmask.generation.vllm import VLLMBackend, can_serve, close_engine
    from trl_retmask.pairs import generate_pairs

    tiny = args.tiny
    batch, prompt_len, new = (4, 12, 6) if tiny else (64, 128, 128)
    model = build("llama-1b-smollm2-vocab", tiny)
    tok = _tokenizer()
    heads = some_heads(model)
    prompts = text_prompts(tok, batch, prompt_len)
    # Sampled, fixed-length responses (min_new_tokens = max_new_tokens) so that every path does the same work.
    settings = dict(
        max_new_tokens=new,
        temperature=0.6,
        top_p=1.0,
        top_k=0,
        batch_size=batch,
        show_progress=False,
        generation_kwargs={"min_new_tokens": new},
    )

    def timed(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t

    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(device())
    bare_kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=0.6, top_k=0, pad_token_id=0)
    with torch.no_grad():
        timed(lambda: model.generate(**enc, **bare_kw))  # warm-up (kernels, allocator)
        _, bare_s = timed(lambda: model.generate(**enc, **bare_kw))

    def pairs_s(backend, seed):
        pairs, seconds = timed(
            lambda: generate_pairs(model, tok, prompts, heads, seed=seed, backend=backend, **settings)
        )
        tokens = pairs.stats.generated_tokens
        assert tokens == 2 * batch * new, f"fixed-length generation expected, got {tokens} tokens"
        return seconds

    pairs_s("generate", 0)  # warm-up
    plain_s = pairs_s("generate", 1)
    # One backend for all calls, as in one `generate_pairs` over a whole dataset: the first call compiles.
    with StaticCacheBackend() as static:
        first_s = pairs_s(static, 0)
        static_s = min(pairs_s(static, seed) for seed in (1, 2))
    vllm_rows = [
        row(
            "generate_pairs, backend vllm: skipped (vLLM not installed, or it cannot serve this shape here)",
            float("nan"),
            "tok/s",
        )
    ]
    if can_serve(model):  # the engine is built from the config and gets the model's random weights pushed
        vllm = VLLMBackend()
        vllm_first_s = pairs_s(vllm, 0)  # builds the engine (CUDA graphs), pushes the weights
        vllm_s = min(pairs_s(vllm, seed) for seed in (1, 2))
        close_engine()
        vllm_rows = [
            row(
                f"generate_pairs, backend vllm ({batch} prompts x 2 roles, colocated engine, o_proj swapped)",
                2 * batch * new / vllm_s,
                "tok/s",
                ">= 25,790 (10x the issue's 2,579) on an H200",
            ),
            row("generate_pairs vllm / generate", plain_s / vllm_s, "x"),
            row("generate_pairs vllm / static", static_s / vllm_s, "x"),
            row("generate_pairs vllm: first call (engine start, weights pushed)", vllm_first_s, "s"),
        ]
    tbps, source = bandwidth_tbps()
    limit = 2 * batch / (weight_bytes(model) / (tbps * 1e12))
    fast = 2 * batch * new / static_s
    return vllm_rows + [
        row(f"bare generate, batch {batch}, {new} new tokens (1 role)", batch * new / bare_s, "tok/s"),
        row("generate_pairs, backend generate (2 calls, the 2nd under mask_heads)", 2 * batch * new / plain_s, "tok/s"),
        row(
            f"generate_pairs, backend static ({2 * batch} rows in one loop, static cache, compiled on CUDA)",
            fast,
            "tok/s",
            ">= 25,790 (10x a 2,579 tok/s baseline) on an H200",
        ),
        row("generate_pairs static / generate", plain_s / static_s, "x"),
        row("generate_pairs static: first call (compiles)", 2 * batch * new / first_s, "tok/s"),
        row(f"bandwidth limit at {2 * batch} rows ({source}: {tbps:.2f} TB/s)", limit, "tok/s"),
        row("generate_pairs static / bandwidth limit", fast / limit, "fraction"),
    ]


def _interleaved(fa, fb, repeats):
    a, b = [], []
    for _ in range(repeats):
        for fn, acc in ((fa, a), (fb, b)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            acc.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b)


def bench_mask(args) -> list[dict]:
    from trl_retmask.generation import RowHeadMask
    from trl_retmask.masking import mask_heads

    length = 64 if args.tiny else 8192
    model = build("llama-1b-smollm2-vocab", args.tiny)
    heads = some_heads(model)
    x = torch.randint(3, model.config.vocab_size, (1, length), device=device())
    x2 = x.repeat(2, 1)

    def masked():
        with mask_heads(model, heads):
            model(x)

    with torch.no_grad():
        model(x)
        plain_s, masked_s = _interleaved(lambda: model(x), masked, 5)
        with RowHeadMask(model) as rm:
            rm.set(heads, [False, True])

            def active():
                rm.active = True
                model(x2)
                rm.active = False

            off_s, on_s = _interleaved(lambda: model(x2), active, 5)
    return [
        row(f"forward {length} tok: mask_heads / none", masked_s / plain_s, "x", "<= 1.05"),
        row(f"forward 2x{length} tok: per-row mask active / inactive", on_s / off_s, "x", "<= 1.05"),
    ]


def bench_detection(args) -> list[dict]:
    from transformers import GenerationConfig

    from trl_retmask.detection import record_attention_argmax

    lengths, new = ((64, 128), 4) if args.tiny else ((8192, 32768), 32)
    model = build("llama-1b-smollm2-vocab", args.tiny)
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=2)
    out = []
    for length in lengths:
        x = torch.randint(3, model.config.vocab_size, (1, length), device=device())
        results = {}
        for name in ("generate", "detect", "generate", "detect"):  # second round timed (first warms up)
            free()
            ctx = record_attention_argmax(model) if name == "detect" else contextlib.nullcontext()
            sync()
            t = time.perf_counter()
            with ctx, torch.no_grad():
                model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
            sync()
            results[name] = (time.perf_counter() - t, peak_gib())
        (g_s, g_m), (d_s, d_m) = results["generate"], results["detect"]
        out += [
            row(f"detection / greedy generation, {length} tok + {new} new: time", d_s / g_s, "x", "<= 1.2"),
            row(f"detection / greedy generation, {length} tok: peak memory", d_m / g_m, "x", "~1"),
            row(f"detection at {length} tok: peak memory", d_m, "GiB"),
        ]
    return out


# ---------------------------------------------------------------------------------------------------- DPO
def _tokenizer():
    from tests.tiny import make_tiny_tokenizer

    return make_tiny_tokenizer(tempfile.mkdtemp(prefix="bench_gpu_tok_"))


def make_trainer(model, liger: bool, lora: bool = False):
    """A TRL DPOTrainer around `model` (bf16 on CUDA, gradient checkpointing), and its optimizer."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = _tokenizer()
    cuda = device().type == "cuda"
    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_gpu_dpo_"),
        per_device_train_batch_size=1,
        gradient_checkpointing=True,
        bf16=cuda,
        use_cpu=not cuda,
        report_to=[],
        max_length=None,
        use_liger_kernel=liger,
        learning_rate=1e-6,
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
        )
    data = Dataset.from_dict({"prompt": ["the man"], "chosen": ["went home"], "rejected": ["the sea"]})
    # TRL would load the reference from the model's path; random weights have none: pass a copy (LoRA: the adapter
    # disabled is the reference).
    ref_model = None if lora else copy.deepcopy(model).eval().requires_grad_(False)
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=cfg, train_dataset=data, processing_class=tok, peft_config=peft_config
    )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which these single steps bypass
    return trainer


def dpo_step(trainer, prompt_len: int, completion_len: int) -> float:
    """One training step (policy fwd+bwd, reference fwd, loss, optimizer step) on a batch of 1 pair; seconds."""
    vocab = trainer.model.config.vocab_size
    g = torch.Generator().manual_seed(prompt_len + completion_len)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    batch = trainer.data_collator(
        [{"prompt_ids": ids(prompt_len), "chosen_ids": ids(completion_len), "rejected_ids": ids(completion_len)}]
    )
    batch = trainer._prepare_inputs(batch)
    trainer.model.train()
    sync()
    t = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t


def bench_dpo(args) -> list[dict]:
    prompt_len, completion = (8, 24) if args.tiny else (512, 3584)  # 2 x (prompt + completion) = 8K tokens
    out = []
    for liger in (False, True):
        if liger and device().type != "cuda":
            out.append(row("DPO step with Liger: skipped (Liger's kernels are Triton GPU kernels)", 0, "s"))
            continue
        free()
        trainer = make_trainer(build("llama-1b-smollm2-vocab", args.tiny), liger)
        dpo_step(trainer, prompt_len, completion)  # warm-up
        seconds = min(dpo_step(trainer, prompt_len, completion) for _ in range(2))
        tag = "with" if liger else "without"
        out += [
            row(f"DPO step, {2 * (prompt_len + completion)} tok, {tag} Liger", seconds, "s"),
            row(f"DPO step peak memory, {tag} Liger", peak_gib(), "GiB"),
        ]
        del trainer
    free()
    return out


def _fits(trainer, length: int) -> bool:
    try:
        dpo_step(trainer, 256 if length > 512 else 8, length)
        return True
    except torch.OutOfMemoryError:
        trainer.optimizer.zero_grad(set_to_none=True)
        free()
        return False


def longest_sequence(trainer, lo: int, hi: int, step: int, budget_s: float) -> tuple[int, float]:
    """Largest completion length in [lo, hi] (multiples of `step`) whose DPO step fits, doubling then bisecting
    until `budget_s` is spent; 0 if even `lo` does not fit. Returns (length, seconds of its step)."""
    start = time.time()
    if not _fits(trainer, lo):
        return 0, float("nan")
    best, n = lo, lo * 2
    while n <= hi and time.time() - start < budget_s and _fits(trainer, n):
        best, n = n, n * 2
    bad = min(n, hi + step)
    while bad - best > step and time.time() - start < budget_s:
        mid = (best + bad) // 2 // step * step
        if mid <= best:
            break
        best, bad = (mid, bad) if _fits(trainer, mid) else (best, mid)
    free()
    return best, dpo_step(trainer, 256 if best > 512 else 8, best)


def bench_longest(args) -> list[dict]:
    lo, hi, step, budget = (16, 256, 16, 20) if args.tiny else (1024, 131072, 1024, 120)
    out = []
    for lora in (False, True):
        free()
        try:
            trainer = make_trainer(build("Llama-3.1-8B-Instruct", args.tiny), liger=device().type == "cuda", lora=lora)
        except torch.OutOfMemoryError:
            out.append(row(f"{'LoRA' if lora else 'full'} DPO, 8B shape: the model does not fit", 0, "tok"))
            continue
        length, seconds = longest_sequence(trainer, lo, hi, step, budget)
        name = "LoRA r16 qkvo" if lora else "full"
        out += [
            row(f"longest completion per GPU, {name} DPO, 8B shape, batch 1 (x2: chosen+rejected)", length, "tok"),
            row(f"  its step time ({name})", seconds, "s"),
            row(f"  its peak memory ({name})", peak_gib(), "GiB"),
        ]
        del trainer
    free()
    return out


# ------------------------------------------------------------------------------------------------- driver
def run(args) -> list[dict]:
    """Entry point of scripts/bench.py: skipped without CUDA unless --tiny."""
    args.tiny = getattr(args, "tiny", False)
    if device().type != "cuda" and not args.tiny:
        print("# gpu: skipped (no CUDA; `python scripts/bench_gpu.py --tiny` runs every row on the CPU)")
        return []
    only = [s for s in (getattr(args, "only_rows", "") or "").split(",") if s] or list(ROWS)
    if device().type == "cuda":
        print(f"# gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for name in only:
        t = time.time()
        try:
            rows += globals()[f"bench_{name}"](args)
        except Exception as e:  # one row's failure must not lose the others' numbers
            rows.append(row(f"{name}: failed: {type(e).__name__}: {str(e)[:200]}", float("nan")))
        print(f"# gpu row {name} took {time.time() - t:.0f} s", flush=True)
        free()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and lengths on any device (CPU test)")
    parser.add_argument("--only", dest="only_rows", default="", help=f"comma-separated rows of {', '.join(ROWS)}")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    unknown = {s for s in args.only_rows.split(",") if s} - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; available: {', '.join(ROWS)}")
    rows = run(args)
    for r in rows:
        v = r["value"]
        shown = f"{v:.3f}" if isinstance(v, float) else str(v)
        print(f"{r['name']:80s} {shown:>12s} {r['unit']:8s} {r['goal']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
