"""Peak resident memory and wall time of the README's main command (`recipes/smollm2.py`), baseline vs the fix.

Each variant runs as its own process under a small watcher whose only child is the run, so
`getrusage(RUSAGE_CHILDREN).ru_maxrss` is that run's peak RSS alone (no /usr/bin/time needed). Both variants run
one after the other in this one call, with the same prompts, seeds and sizes:

- baseline: the settings shipped before the memory fix: DPO micro-batches of 4 pairs (8 sequences padded to the longest)
  x 2 accumulation steps, a deep-copied reference model, no activation checkpointing, glibc's default (dynamic)
  mmap threshold;
- fix: the recipe as shipped: micro-batches of 1 pair x 8 accumulation steps (the same 8 pairs per optimizer step),
  reference log-probs precomputed before training (no reference copy), activation checkpointing, and
  `distributed.limit_cpu_training_memory` (glibc's mmap threshold fixed at 128 KiB, so freed activations go back to the
  OS instead of staying in its heap).

Default size: the whole main command (detection, NIAH, 32 prompts); `--quick`: 16 prompts, bundled head scores, no
NIAH. Standalone: `python scripts/bench_memory.py [--repeats 2] [--max_prompts N] [--no_detection] ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What differs between the two variants: the baseline restores the old flags and skips the allocator setting (a
# stub replaces it before the recipe imports it); the fix is the recipe's own defaults.
VARIANTS = {
    "baseline": {
        "args": [
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "2",
            "--precompute_ref_log_probs",
            "False",
            "--activation_checkpointing",
            "False",
        ],
        "preamble": "import trl_retmask.distributed as r; r.limit_cpu_training_memory = lambda *a, **k: False",
    },
    "fix": {"args": []},
}
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
"""Dropped from both runs' environment: a caller's allocator setting would bias the comparison."""
# Runs the recipe script as `__main__` after an optional preamble (the baseline's allocator stub).
LAUNCH = (
    "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); exec(sys.argv.pop(1)); sys.argv.pop(0); "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)

# Runs the command it is given and prints its peak RSS (KiB) and wall time: the watcher's only child is the run.
WATCHER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); wall = time.perf_counter() - t\n"
    "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'rc': rc, 'wall_s': wall, 'maxrss_kib': rss}))"
)
FIRST_LOSS = re.compile(r"'loss': '?([-0-9.e]+)")


def sizes(args) -> list[str]:
    """Recipe overrides for the requested size (defaults: the whole main command)."""
    quick = getattr(args, "quick", False)
    max_prompts = getattr(args, "max_prompts", None) or (16 if quick else 32)
    out = ["--max_prompts", str(max_prompts)]
    if getattr(args, "max_new_tokens", None):
        out += ["--max_new_tokens", str(args.max_new_tokens)]
    if quick or getattr(args, "no_detection", False):
        out += ["--detect_heads", "False"]  # bundled head scores of the embedded model
    if quick or getattr(args, "no_niah", False):
        out += ["--niah_eval", "False"]
    return out


def measure(variant: str, extra: list[str], out_dir: Path) -> dict:
    """One run of the main command in a fresh process: peak RSS (GiB), wall time, the recipe's own timings, the first
    logged DPO loss (ln 2 = 0.693 when the reference equals the initial policy) and the NIAH accuracies."""
    spec = VARIANTS[variant]
    cmd = [
        sys.executable,
        "-c",
        LAUNCH,
        str(REPO),
        spec.get("preamble", "pass"),
        str(REPO / "recipes" / "smollm2.py"),
        "--output_dir",
        str(out_dir),
        *extra,
        *spec["args"],
    ]
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", WATCHER, *cmd], env=env, capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{variant} run failed (exit {result['rc']}): {proc.stderr[-3000:]}")
    summary = json.loads((out_dir / "retmask_recipe_summary.json").read_text())
    timings = summary["timings_s"]
    loss = FIRST_LOSS.search(proc.stdout + proc.stderr)
    return {
        "peak_gib": result["maxrss_kib"] / 1024**2,
        "wall_s": result["wall_s"],
        "train_s": timings.get("train"),
        "dpo_s": (timings.get("pairs_and_setup") or 0) + (timings.get("train") or 0),
        "first_loss": float(loss.group(1)) if loss else None,
        **{k: summary[k]["accuracy"] for k in ("niah_before", "niah_before_masked", "niah_after") if k in summary},
    }


def run(args) -> list[dict]:
    """Baseline then fix, `--repeats` times (back to back, so both see the same machine load); ratios per pair."""
    extra = sizes(args)
    keep = getattr(args, "keep_dir", None)
    repeats = getattr(args, "repeats", None) or 1
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        workdir = Path(keep) if keep else Path(tmp)
        runs = [{name: measure(name, extra, workdir / f"{name}{i}") for name in VARIANTS} for i in range(repeats)]
    size = " ".join(extra) or "the recipe's defaults"
    rows = []
    for i, pair in enumerate(runs):
        base, fix = pair["baseline"], pair["fix"]
        tag = f" (run {i + 1})" if repeats > 1 else ""
        rows += [
            {
                "name": f"main command peak RSS, baseline{tag} ({size})",
                "value": base["peak_gib"],
                "unit": "GiB",
                "goal": "-",
            },
            {"name": f"main command peak RSS, fix{tag}", "value": fix["peak_gib"], "unit": "GiB", "goal": "< 4"},
            {"name": f"main command wall time, baseline{tag}", "value": base["wall_s"], "unit": "s", "goal": "-"},
            {"name": f"main command wall time, fix{tag}", "value": fix["wall_s"], "unit": "s", "goal": "-"},
            {
                "name": f"main command wall time fix / baseline{tag}",
                "value": fix["wall_s"] / base["wall_s"],
                "unit": "x",
                "goal": "<= 1.10",
            },
            {
                "name": f"DPO phases (pairs, setup, train) fix / baseline{tag}",
                "value": fix["dpo_s"] / base["dpo_s"],
                "unit": "x",
                "goal": "-",
            },
            {
                "name": f"DPO train() fix / baseline{tag}",
                "value": fix["train_s"] / base["train_s"],
                "unit": "x",
                "goal": "-",
            },
        ]
        for key in ("first_loss", "niah_before", "niah_before_masked", "niah_after"):
            for name, res in pair.items():
                if res.get(key) is not None:
                    rows.append(
                        {
                            "name": f"{key}, {name}{tag}",
                            "value": res[key],
                            "unit": "",
                            "goal": "0.693" if key == "first_loss" else "-",
                        }
                    )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 prompts, bundled scores, no NIAH")
    parser.add_argument("--repeats", type=int, default=1, help="baseline+fix pairs to run back to back")
    parser.add_argument("--max_prompts", type=int, default=None, help="prompts (default 32, the recipe's)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="response length (default: the recipe's)")
    parser.add_argument("--no_detection", action="store_true", help="use the bundled head scores")
    parser.add_argument("--no_niah", action="store_true", help="skip the NIAH evaluations")
    parser.add_argument("--keep_dir", default=None, help="keep the runs' output directories here")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    from bench import print_row, write_rows  # scripts/bench.py, the benchmark entry point (same folder)

    write_rows([print_row("memory", row) for row in run(args)], args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
