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


# ------------------------------------------------------------------------------------------------ DeepSpeed on CPUs
ZERO3_CONFIG = {
    # Every weight partitioned, as in a large model (DeepSpeed keeps weights under 1e5 elements whole by default,
    # deepspeed/runtime/zero/parameter_offload.py `mark_persistent_parameters`: all of a tiny model's).
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
}
"""A ZeRO-3 config in the shape of recipes/accelerate/zero3.yaml's (the Trainer fills the "auto" fields)."""


def deepspeed_cpu_state():
    """DeepSpeed's process group (gloo) and accelerate's state for it, in a process started by torchrun on CPUs.

    `accelerate launch` with a DeepSpeed config cannot run on CPUs: accelerate's `PartialState` picks its backend
    from the torch accelerator, and a CPU-only torch has none (accelerate/utils/imports.py:473-522), so the state
    falls back to a single process (`backend is None`, accelerate/state.py:284-289) and every rank reports
    `process_index` 0 although DeepSpeed did join the group (state.py:199-214); with `--cpu` (or
    ACCELERATE_USE_CPU) DeepSpeed is skipped altogether (`not cpu`, state.py:198 and 935). Naming the backend
    (`PartialState(backend="gloo")` with ACCELERATE_USE_DEEPSPEED set) gives the real rank and world size and the
    DEEPSPEED type; training arguments then reuse it (`accelerator_config={"use_configured_state": True}`)."""
    import os

    import deepspeed
    from accelerate import PartialState

    deepspeed.init_distributed(dist_backend="gloo")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    return PartialState(backend="gloo")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_extensions_dir() -> str:
    """Where DeepSpeed's compiled CPU ops go: a directory of this torch's own (torch's default,
    ~/.cache/torch_extensions/py311_cpu, is shared by every environment of one Python: another torch rebuilding there
    would hold its lock while the launch waits), unless TORCH_EXTENSIONS_DIR names one."""
    import torch

    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path.home() / ".cache" / "torch_extensions" / f"trl_retmask-torch-{torch.__version__}"
    )


def _deepspeed_env() -> dict[str, str]:
    """Workers' environment, DeepSpeed's compiled CPU ops in `deepspeed_extensions_dir()`."""
    return worker_env(
        TORCH_EXTENSIONS_DIR=deepspeed_extensions_dir(),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
        DS_ACCELERATOR="cpu",
    )


def build_deepspeed_cpu_ops(timeout: int = 600) -> None:
    """Compile DeepSpeed's CPU shared-memory communication op once (a minute on a fresh machine), outside the timed
    launches: `deepspeed.init_distributed` builds it on every rank at once otherwise (deepspeed/comm/torch.py:47-53)."""
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_deepspeed_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def launch_two_deepspeed_cpu_processes(script, *args, cwd=None, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run `script args...` as 2 CPU processes under torchrun, DeepSpeed on its CPU accelerator (`DS_ACCELERATOR`),
    gloo; the script calls `deepspeed_cpu_state()` first. Checks that the launch succeeded."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
        *map(str, args),
    ]
    proc = subprocess.run(cmd, env=_deepspeed_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return proc
