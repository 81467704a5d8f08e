#!/usr/bin/env bash
# The GPU check: one command that, on one GPU, installs what the tests need from carried wheels, runs the GPU tests
# (tests/test_gpu.py: static backend, `generate`, Liger, training steps, vLLM's pairs on CUDA where vLLM is installed)
# and scripts/bench_gpu.py, and writes one JSON summary ($OUT/gpu_check.json: device, versions, each test's outcome
# with its reason, the bench rows, each step's time). Every step has a time limit and the whole stays under
# GPU_CHECK_BUDGET_S (default 450 s, under 8 minutes on an H100); it exits non-zero when anything failed or ran out of
# time. docs/benchmarks.md ("GPU check") gives the `run` call and how its figures are recorded.
#
#   bash scripts/gpu_wheels.sh                      # here, with network: .gpu_wheels/ (git-ignored, ~4.5 MiB)
#   bash scripts/gpu_check.sh                       # there, with `.gpu_wheels` carried; results in $OUT
#   GPU_CHECK_ALLOW_CPU=1 bash scripts/gpu_check.sh # rehearsal on a CPU: same steps, GPU tests skip, bench --tiny
#
# Environment: OUT (results folder; default outputs/gpu_check), GPU_WHEELS (default .gpu_wheels), PYTHON (default
# python3), GPU_CHECK_SITE (where the wheels go; default /tmp/gpu_check_site), GPU_CHECK_BUDGET_S.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/gpu_check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
wheels=${GPU_WHEELS:-.gpu_wheels}
site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
budget=${GPU_CHECK_BUDGET_S:-450}
cpu=${GPU_CHECK_ALLOW_CPU:-0}
start=$(date +%s)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
steps="$out/steps.tsv"  # name, exit status, seconds (read by the summary)
: >"$steps"

left() { echo $((budget - ($(date +%s) - start))); }

step() {  # step NAME LIMIT_S LOG CMD...: run CMD under a time limit, record its status and time
  local name=$1 limit=$2 log=$3 t0 rc
  shift 3
  t0=$(date +%s)
  echo "== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >>"$steps"
  tail -n 5 "$log"
  echo "== $name: exit $rc after $(($(date +%s) - t0)) s"
}

# 1. The device: CUDA, unless this is the CPU rehearsal.
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "$cpu" != 1 ]; then
    echo "no CUDA device: the GPU check needs one (GPU_CHECK_ALLOW_CPU=1 rehearses the steps on a CPU)" >&2
    printf 'device\t2\t0\n' >>"$steps"
  fi
fi

# 2. What the tests need, from the carried wheels (no index: that machine reaches no registry), then the package
#    itself, built from this working tree, into one folder put first on the path. Two steps: a failed package build
#    is reported, and the tests still run on the working tree (pytest and the bench import it from the repository).
wheels_step() {
  set -e
  rm -rf "$site"
  if ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "no wheels in $wheels (bash scripts/gpu_wheels.sh makes them): using what is installed"
    exit 0
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
  PYTHONPATH="$site" "$py" -c "import trl, datasets, liger_kernel, evaluate, rouge_score; print('trl', trl.__version__)"
}
package_step() {
  set -e
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$site" .
  cd /tmp  # away from the working tree: the installed package is the one imported
  PYTHONPATH="$site" "$py" -c "import trl_retmask.recipes, trl_retmask.generation; print(trl_retmask.__file__)"
}
export -f wheels_step package_step
export py site wheels
if grep -q '^device' "$steps"; then
  echo "skipping the install and the runs: no device"
else
  step wheels 90 "$out/install.log" bash -c wheels_step
  step package 90 "$out/package.log" bash -c package_step
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

  # 3. The GPU tests; each test bounded by pytest-timeout where it is installed, the run by what the budget leaves
  #    (at least 150 s are kept for the bench).
  # -v: each outcome is in the log as it happens (the summary reads it if a time limit stopped pytest before its XML)
  tests=(-m pytest -p no:cacheprovider -v -rs tests/test_gpu.py --junitxml "$out/tests.xml" -o junit_family=xunit1)
  if "$py" -c "import pytest_timeout" 2>/dev/null; then tests+=(-p timeout --timeout 200); fi
  limit=$(($(left) - 150))
  [ "$limit" -gt 260 ] && limit=260
  [ "$limit" -lt 60 ] && limit=60
  step tests "$limit" "$out/tests.log" "$py" "${tests[@]}"

  # 4. The bench: cheap rows first; it writes its JSON after each row, so a run stopped at its limit keeps the rows
  #    it finished. On the CPU rehearsal, --tiny.
  bench=(--only mask,dpo,detection,generation,longest --longest-budget 20 --json "$out/bench_gpu.json")
  [ "$cpu" = 1 ] && bench+=(--tiny)
  limit=$(($(left) - 15))
  [ "$limit" -lt 30 ] && limit=30
  step bench "$limit" "$out/bench.log" "$py" scripts/bench_gpu.py "${bench[@]}"
fi

# 5. One JSON summary; its exit status is the check's.
"$py" - "$out" "$cpu" "$start" <<'EOF'
import importlib.metadata as md
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

out, cpu, start = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    rc = int(rc)
    steps[name] = {"exit": rc, "seconds": int(seconds), "timed_out": rc in (124, 137)}
summary = {"cpu_rehearsal": cpu, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": steps}

versions = {}
for name in ("torch", "triton", "transformers", "trl", "accelerate", "peft", "datasets", "pyarrow", "liger-kernel",
             "vllm", "deepspeed", "flash-attn", "trl_retmask"):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
summary["versions"] = versions
try:
    import torch

    cuda = torch.cuda.is_available()
    summary["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    summary["cuda"] = torch.version.cuda
    if cuda:
        summary["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as e:  # the summary is written whatever broke
    summary["device"] = f"unknown ({type(e).__name__}: {e})"

tests = []
if (out / "tests.xml").is_file():
    for case in ET.parse(out / "tests.xml").getroot().iter("testcase"):
        outcome, reason = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                reason = (child.get("message") or child.text or "")[:500]
        name = f"{case.get('classname', '')}::{case.get('name')}".removeprefix("tests.test_gpu::")
        tests.append({"test": name, "outcome": outcome, "reason": reason, "seconds": float(case.get("time", 0))})
if not tests and (out / "tests.log").is_file():  # stopped before the XML: the outcomes pytest -v printed
    import re

    pattern = re.compile(r"^tests/test_gpu\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)(?: \((.*)\))?")
    for line in (out / "tests.log").read_text(errors="replace").splitlines():
        m = pattern.match(line)
        if m:
            outcome = {"FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped"}.get(m[2], "passed")
            tests.append({"test": m[1], "outcome": outcome, "reason": (m[3] or "")[:500], "seconds": None})
summary["tests"] = tests
counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
summary["test_counts"] = counts

rows = json.loads((out / "bench_gpu.json").read_text()) if (out / "bench_gpu.json").is_file() else []
summary["bench"] = rows
failed_rows = [r["name"] for r in rows if ": failed:" in r["name"]]

problems = [f"step {n}: exit {s['exit']}" + (" (time limit)" if s["timed_out"] else "") for n, s in steps.items()
            if s["exit"] != 0]
problems += [f"test {t['test']}: {t['outcome']}" for t in tests if t["outcome"] in ("failed", "error")]
problems += [f"bench row {n}" for n in failed_rows]
if "tests" in steps and not tests:
    problems.append("no test results (tests.xml missing)")
summary["seconds"] = int(time.time()) - start
summary["ok"] = not problems
summary["problems"] = problems


def plain(value):  # NaN (a bench row without a figure, e.g. memory on a CPU) as null: strict JSON
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return [plain(v) for v in value] if isinstance(value, list) else value


(out / "gpu_check.json").write_text(json.dumps(plain(summary), indent=1, default=str, allow_nan=False))
(out / "steps.tsv").unlink()  # in the summary now; the files that come back from a lent machine are few (8)
for t in tests:
    print(f"{t['outcome']:8s} {t['test']}" + (f"  ({t['reason'][:150]})" if t["reason"] else ""))
print("| measure | value | unit | goal |\n|---|---|---|---|")  # docs/benchmarks.md's table, ready to paste
for r in rows:
    v = r["value"]
    shown = "" if isinstance(v, float) and v != v else f"{v:,.3f}" if isinstance(v, float) else str(v)
    print(f"| {r['name'].strip()} | {shown} | {r['unit']} | {r['goal']} |")
print(f"device {summary['device']}; tests {counts}; bench rows {len(rows)}; {summary['seconds']} s")
print("OK" if not problems else "FAILED: " + "; ".join(problems))
sys.exit(0 if not problems else 1)
EOF
