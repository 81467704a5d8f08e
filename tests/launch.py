"""Running a test script as 2 CPU processes under `accelerate launch` (gloo), as a user's multi-process job runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker_env(**overrides) -> dict[str, str]:
    """The parent's environment for launched workers, with this interpreter's import path in front of PYTHONPATH.

    Workers run `sys.executable` (torchrun's default) but start with a fresh `sys.path`: packages the parent reaches
    through its own path (a `--target` install, a user site, an un-activated venv) would be missing, and a PYTHONPATH
    replaced by the repository alone hides them too. Putting the repository and the parent's `sys.path` first keeps
    `trl` and `trl_retmask` importable on any machine."""
    paths = [str(REPO), *(p for p in sys.path if p and os.path.isdir(p))]
    previous = os.environ.get("PYTHONPATH")
    if previous:
        paths.append(previous)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), **overrides}


def launch_two_cpu_processes(script, *args, cwd=None, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run `script args...` as 2 CPU processes and check that the launch succeeded.

    `--cpu --num_processes 2` would need mpirun; torchrun through `--multi_gpu` with ACCELERATE_USE_CPU gives gloo.
    Offline, one thread per process (two processes share the cores).
    """
    env = worker_env(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        ACCELERATE_USE_CPU="true",
        CUDA_VISIBLE_DEVICES="",
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(script),
        *map(str, args),
    ]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc
