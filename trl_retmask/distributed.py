"""Process and distributed helpers: the process state (rank, world size, device), agreement across processes, the
model ready to generate under ZeRO-3 / FSDP, the end of a launch, and CPU memory tuning for training."""

from __future__ import annotations

import ctypes
import os
import platform
from contextlib import contextmanager

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from .checkpointing import checkpointing_kwargs, enable_checkpointing, is_checkpointing

__all__ = [
    "end_processes",
    "from_main_process",
    "gathered_for_generation",
    "limit_cpu_training_memory",
    "process_state",
    "return_freed_memory",
    "unwrapped_for_generation",
]


def process_state() -> PartialState:
    """accelerate's process state: the one way the package reads rank, world size and device.

    Without CUDA (or with `ACCELERATE_USE_CPU`), a torchrun / `accelerate launch` job is multi-CPU (gloo).
    """
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=use_cpu)


def from_main_process(value):
    """The main process's `value` on every process (the processes then agree, e.g. on a cache directory)."""
    state = process_state()
    if state.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


@contextmanager
def unwrapped_for_generation(trainer):
    """The trainer's model ready to generate mid-training: TRL's `unwrap_model_for_generation` (gathers ZeRO-3 / FSDP
    shards, turns activation checkpointing off), with checkpointing restored with the user's kwargs (TRL's default
    would be transformers' own) and also when the body raises (TRL restores it only when the body returns, so an
    error caught by the caller would leave the rest of training without it)."""
    from trl.models.utils import unwrap_model_for_generation

    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    was_on = is_checkpointing(unwrapped)
    kwargs = checkpointing_kwargs(trainer.args)
    try:
        with unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator, gradient_checkpointing_kwargs=kwargs
        ) as model:
            yield model
    finally:
        if was_on and not is_checkpointing(unwrapped):
            enable_checkpointing(unwrapped, kwargs)


@contextmanager
def gathered_for_generation(model):
    """Full parameters for generation before training starts. Under ZeRO-3 transformers partitions them at load
    (`zero.Init`) and the DeepSpeed engine that would gather them does not exist yet, so they are gathered here, as
    `unwrap_model_for_generation` does during training."""
    if not is_deepspeed_zero3_enabled():
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        yield model


def end_processes() -> None:
    """Wait for every process, then tear down the process group (accelerate's `end_training`).

    A rank that leaves the interpreter with the group alive while another still works (rank 0 saving the model)
    can abort in the collective backend's destructor ("terminate called without an active exception", gloo), which
    fails the whole launch although the work is done. No-op without a process group.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        state = process_state()
        state.wait_for_everyone()
        state.destroy_process_group()


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def limit_cpu_training_memory(device: torch.device | str = "cpu", threshold: int = 128 * 1024) -> bool:
    """On a CPU `device`, make glibc return freed activation memory to the OS: `mallopt(M_MMAP_THRESHOLD, threshold)`.

    glibc serves large blocks with mmap, but after the first big free it raises that threshold (up to 32 MiB), so a
    CPU training step's activations then come from its heap and stay resident once freed (the README's main command:
    5.9 GB resident for 2.1 GB of live tensors after a DPO micro-batch). A fixed threshold turns that adjustment off.
    No-op (returns False) on accelerators, off glibc, or when the user set `MALLOC_MMAP_THRESHOLD_` (it wins).
    """
    if (
        torch.device(device).type != "cpu"
        or platform.libc_ver()[0] != "glibc"
        or "MALLOC_MMAP_THRESHOLD_" in os.environ
    ):
        return False
    return ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1


def return_freed_memory() -> bool:
    """Hand glibc's freed heap back to the OS now (`malloc_trim(0)`), e.g. after a large object (a vLLM engine) is
    freed: glibc keeps freed small blocks resident. No-op (returns False) off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    return ctypes.CDLL(None).malloc_trim(0) == 1
