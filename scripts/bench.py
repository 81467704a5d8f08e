"""The project's benchmark entry point: every section measures its ratios side by side in this one run.

Sections live in scripts/bench_<name>.py and expose `run(args) -> list[dict(name, value, unit, goal)]`.
Usage: python scripts/bench.py [--only masking,detection,trainer] [--quick] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))


def sections() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated sections (all: {', '.join(sections())})")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or path")
    parser.add_argument("--quick", action="store_true", help="fewer repeats / shorter inputs")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    chosen = [s for s in args.only.split(",") if s] or list(sections())
    unknown = set(chosen) - set(sections())
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; available: {', '.join(sections())}")
    import torch

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}")
    rows = []
    for name in chosen:
        t0 = time.time()
        for row in load(sections()[name]).run(args):
            rows.append(print_row(name, row))
        print(f"# section {name} took {time.time() - t0:.0f} s", flush=True)
    write_rows(rows, args.json)
    return 0


def print_row(section: str, row: dict) -> dict:
    """Print one result row as it arrives (long runs show progress); returns it tagged with its section."""
    value = row["value"]
    shown = f"{value:.3f}" if isinstance(value, float) else str(value)
    print(
        f"{section:10s} {row['name']:60s} {shown:>12s} {row.get('unit', ''):8s} goal {row.get('goal', '')}", flush=True
    )
    return {"section": section, **row}


def write_rows(rows: list[dict], path) -> None:
    if path:
        Path(path).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
