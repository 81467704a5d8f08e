"""Checkpointing under both of transformers' names (trl_retmask/checkpointing.py): `RetMaskConfig` takes the authors'
`gradient_checkpointing` and transformers 5.23's `activation_checkpointing` on every supported transformers, warns
about neither, and keeps the two one setting after construction, so TRL's later writes reach the Trainer."""

import warnings

import pytest
import transformers
from transformers import TrainingArguments

from tests.tiny import make_tiny_model
from trl_retmask.checkpointing import ARG, RENAMED, checkpointing_kwargs, enable_checkpointing, is_checkpointing
from trl_retmask.config import RetMaskConfig


def make(tmp_path, **kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        args = RetMaskConfig(str(tmp_path), report_to="none", use_cpu=True, mask_top_k=2, bf16=False, **kw)
    deprecations = [str(w.message) for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    return args, deprecations


def test_the_installed_transformers_decides_the_names():
    fields = TrainingArguments.__dataclass_fields__
    assert RENAMED == ("activation_checkpointing" in fields)
    assert ARG in fields and ARG + "_kwargs" in fields
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    assert RENAMED == ((major, minor) >= (5, 23))  # transformers 5.23 renamed it


@pytest.mark.parametrize("name", ["activation_checkpointing", "gradient_checkpointing"])
def test_either_name_sets_checkpointing_without_a_deprecation(tmp_path, name):
    args, deprecations = make(tmp_path, **{name: True, name + "_kwargs": {"use_reentrant": True}})
    assert deprecations == []  # transformers >= 5.23 warns when only the old name is set
    assert args.activation_checkpointing is args.gradient_checkpointing is True
    assert args.activation_checkpointing_kwargs == args.gradient_checkpointing_kwargs == {"use_reentrant": True}
    assert getattr(args, ARG) is True and checkpointing_kwargs(args) == {"use_reentrant": True}  # what Trainer reads


def test_the_new_name_wins_and_json_kwargs_parse(tmp_path):
    args, deprecations = make(
        tmp_path,
        activation_checkpointing=False,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs='{"use_reentrant": false}',  # as the CLI passes it
    )
    assert deprecations == []
    assert args.activation_checkpointing is args.gradient_checkpointing is False
    assert checkpointing_kwargs(args) == args.activation_checkpointing_kwargs == {"use_reentrant": False}


@pytest.mark.parametrize("written", ["gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"])
def test_a_write_after_construction_reaches_the_trainers_name(tmp_path, written):
    """TRL 1.16 forces reentrant checkpointing for PEFT + ZeRO-3 after the config is built, by writing
    `args.gradient_checkpointing_kwargs` (trl/trainer/dpo_trainer.py:699-713); transformers >= 5.23 reads only
    `activation_checkpointing_kwargs`, copied from the old name inside `__post_init__` alone."""
    args, _ = make(tmp_path, activation_checkpointing=True)
    # TRL's statements, verbatim but for the name
    setattr(args, written, getattr(args, written) or {})
    getattr(args, written)["use_reentrant"] = True
    assert checkpointing_kwargs(args) == {"use_reentrant": True}
    assert args.activation_checkpointing_kwargs == args.gradient_checkpointing_kwargs == {"use_reentrant": True}
    args.gradient_checkpointing = False
    assert getattr(args, ARG) is False and args.activation_checkpointing is False


def test_model_side_helpers_use_transformers_own_names():
    model = make_tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a deprecated name would raise here
        assert not is_checkpointing(model)
        enable_checkpointing(model, {"use_reentrant": False})
        assert is_checkpointing(model)
    assert model.model.layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}


PEFT_ZERO3 = """
import json, os, sys
from datasets import Dataset
from peft import LoraConfig
from tests.test_trainer import PROMPTS, SCORES
from tests.tiny import make_tiny_model, make_tiny_tokenizer
from trl_retmask.checkpointing import checkpointing_kwargs
from trl_retmask.config import RetMaskConfig
from trl_retmask.trainer import RetMaskTrainer

out = sys.argv[1]
zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
         "gradient_accumulation_steps": "auto"}
args = RetMaskConfig(out, deepspeed=zero3, activation_checkpointing=True, use_cpu=True, bf16=False, report_to="none",
    max_steps=1, per_device_train_batch_size=2, temperature=0.0, max_new_tokens=2, cache_pairs=False)
trainer = RetMaskTrainer(model=make_tiny_model("llama"), args=args,
    train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    processing_class=make_tiny_tokenizer(out + "/tok"), head_scores=SCORES,
    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
print("KWARGS", json.dumps(checkpointing_kwargs(trainer.args)))
"""


@pytest.mark.slow
def test_trls_reentrant_checkpointing_for_peft_zero3_reaches_the_trainer(tmp_path):
    """Real DeepSpeed ZeRO-3 (CPU accelerator, one process) and a PEFT model: TRL's DPOTrainer forces
    `use_reentrant=True` (trl/trainer/dpo_trainer.py:699-713) and the Trainer must enable checkpointing with it,
    reading transformers' own name (`activation_checkpointing_kwargs` from 5.23: transformers/trainer.py:1518-1530 in
    5.25). Fails on transformers >= 5.23 without the paired names (TRL's write went to the deprecated alias only)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'trl_retmask[deepspeed]')")
    from tests.launch import deepspeed_extensions_dir, worker_env

    env = worker_env(
        TORCH_EXTENSIONS_DIR=deepspeed_extensions_dir(),
        DS_ACCELERATOR="cpu",
        ACCELERATE_USE_CPU="true",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(29500 + os.getpid() % 1000),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
    )
    proc = subprocess.run(
        [sys.executable, "-c", PEFT_ZERO3, str(tmp_path)], env=env, capture_output=True, text=True, timeout=900
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("KWARGS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert lines[-1] == 'KWARGS {"use_reentrant": true}'
