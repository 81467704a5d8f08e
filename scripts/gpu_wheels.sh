#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels that scripts/gpu_check.sh installs on a lent GPU machine that has
# none (docs/benchmarks.md, "GPU check"). That machine has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17,
# accelerate, peft, pandas, pyarrow, xxhash, absl-py and nltk's own needs but not TRL, datasets, liger-kernel, evaluate
# or rouge-score, so those come as wheels, without dependencies (`--no-deps`), each pinned: two versions of one
# package in the folder would stop the install.
#
# datasets 4.8.5, not 5.x: 5.x needs pyarrow>=24, newer than the lent image may hold; 4.8.5 needs pyarrow>=21, the
# floor TRL 1.16 itself declares, and satisfies TRL's datasets>=4.7. rouge-score ships as an sdist only: it is built
# here into a pure-Python wheel. The package itself is built on the GPU machine from the working tree (no stale copy).
# vLLM (CUDA build, hundreds of MiB) does not fit the 64 MiB a call may carry: its tests skip with the reason there.
#
# Usage: bash scripts/gpu_wheels.sh [DIR]        (default .gpu_wheels, git-ignored; carry it with the `run` call)
#        PYVER=3.11 bash scripts/gpu_wheels.sh DIR  (the CPU rehearsal's interpreter; only multiprocess differs)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu_wheels}
pyver=${PYVER:-3.12}
rm -rf "$dir"
mkdir -p "$dir"
pip=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir")
"${pip[@]}" trl==1.16.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5 evaluate==0.4.6 \
  nltk==3.10.4 defusedxml==0.7.1
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$dir" rouge-score==0.1.2
ls "$dir"
bytes=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
echo "wheels: $((bytes / 1024)) KiB in $dir"
if [ "$bytes" -gt $((48 * 1024 * 1024)) ]; then  # the working tree (~8 MiB) travels in the same 64 MiB
  echo "too large to carry with the working tree (64 MiB a call)" >&2
  exit 1
fi
