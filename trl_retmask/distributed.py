"""Process and distributed helpers: the process state (rank, world size, device), agreement across processes, the
model ready to generate under ZeRO-3 / FSDP, the end of a launch, and CPU memory tuning for training."""

from __future__ import annotations

import copy
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
    "leave_process_group",
    "from_main_process",
    "gathered_for_generation",
    "limit_cpu_training_memory",
    "partitioned_copy",
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
    error caught by the caller would leave the rest of training without it).

    The body's error is held until TRL's context has closed as if the body returned: under ZeRO-3 that context
    removes DeepSpeed's parameter hooks and adds them back only after its `yield` (trl/models/utils.py:147-150, not in
    a `finally`), so an error caught by the caller (online regeneration keeping its previous pairs) would otherwise
    leave the engine training on partitioned weights without the hooks that gather them."""
    from trl.models.utils import unwrap_model_for_generation

    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    was_on = is_checkpointing(unwrapped)
    kwargs = checkpointing_kwargs(trainer.args)
    error = None
    try:
        with unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator, gradient_checkpointing_kwargs=kwargs
        ) as model:
            try:
                yield model
            except Exception as e:  # noqa: BLE001 - re-raised below, once TRL's exit has run
                error = e
        if error is not None:
            raise error
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


def partitioned_copy(model):
    """A ZeRO-3-partitioned copy of a ZeRO-3-partitioned `model`: same class, config, dtype, attention, weights,
    buffers and generation config. `copy.deepcopy` cannot copy a partitioned model, and TRL's fallback reloads the
    reference from `config._name_or_path` (trl/trainer/dpo_trainer.py:915-927) without the policy's revision or other
    load settings, and without changes made after loading. Built under `zero.Init` (transformers' `_from_config`),
    then each weight copied from the policy, one gathered pair at a time (rank 0 writes, DeepSpeed re-partitions)."""
    import deepspeed

    config = copy.deepcopy(model.config)
    ref = type(model)._from_config(config, dtype=model.dtype, attn_implementation=config._attn_implementation)
    ref.generation_config = copy.deepcopy(model.generation_config)
    rank0 = torch.distributed.get_rank() == 0
    targets = dict(ref.named_parameters())
    with torch.no_grad():
        for name, source in model.named_parameters():
            target = targets[name]
            with deepspeed.zero.GatheredParameters([source, target], modifier_rank=0):
                if rank0:
                    target.data.copy_(source.data)
        targets = dict(ref.named_buffers())
        for name, buffer in model.named_buffers():  # not partitioned: every rank copies its own
            targets[name].copy_(buffer)
    return ref.eval().requires_grad_(False)


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


def leave_process_group() -> None:
    """Tear down this process's side of a gloo process group now, without waiting for the others: the way out of a
    stage that failed (its other processes may have failed too, or may never reach a barrier).

    Left to interpreter exit, the group's gloo worker threads can still be finishing a collective's Python-held work
    while Python finalizes; a thread that then asks for the GIL is ended by Python with a forced unwind through
    C++ that cannot unwind, and the process aborts ("terminate called without an active exception", exit -6) after
    printing its one-line error (torch's `destroy_process_group` waits for that work, see its comment there). Gloo's
    teardown is local (it joins its own threads, as its destructor would at exit). NCCL's is not: its `shutdown()`
    flushes the communicators, which waits on the other ranks; at exit its destructor aborts them instead, so an NCCL
    group is left to it. No-op without a process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and "nccl" not in str(dist.get_backend()).lower():
        dist.destroy_process_group()


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
