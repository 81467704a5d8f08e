"""DPO step time under TRL's GPU defaults vs fp32, on whatever device runs the bench (here: the CPU).

RetMaskConfig resolves `bf16` / gradient checkpointing to False on a CPU (fp32: exact, and fast on every CPU); this
section measures what bf16 autocast and checkpointing would cost or save on this machine. Three RetMaskTrainers
(fp32; bf16 autocast; bf16 + gradient checkpointing) take `training_step` on the same batch of realistic pairs (the
shipped chat prompts, ~100-token responses), interleaved rep by rep with the order reversed every other rep.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import warnings

import torch

RESPONSE = (
    "The answer depends on several factors, and here is a careful explanation of each of them in turn, "
    "with an example. "
) * 4


def run(args):
    import time

    from datasets import Dataset

    from trl_retmask import RetMaskConfig, RetMaskTrainer, load_model_and_tokenizer
    from trl_retmask.prompts import load_prompts
    from trl_retmask.scripts.train import TrainScriptArguments

    warnings.filterwarnings("ignore")
    model, tokenizer = load_model_and_tokenizer(args.model)
    batch_size = 2 if args.quick else 4
    reps = 2 if args.quick else 4
    prompts = load_prompts(TrainScriptArguments()).shuffle(seed=0).select(range(batch_size))
    prefs = Dataset.from_list(
        [
            {
                "prompt": p["prompt"],
                "chosen": [{"role": "assistant", "content": RESPONSE}],
                "rejected": [{"role": "assistant", "content": RESPONSE[::-1]}],
            }
            for p in prompts
        ]
    )
    variants = {
        "fp32": dict(bf16=False, gradient_checkpointing=False),
        "bf16": dict(bf16=True, gradient_checkpointing=False),
        "bf16+ckpt": dict(bf16=True, gradient_checkpointing=True),
    }
    cpu = not torch.cuda.is_available()
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in variants.items():
            cfg = RetMaskConfig(
                f"{tmp}/{name}",
                max_steps=1,
                per_device_train_batch_size=batch_size,
                learning_rate=1e-6,
                report_to="none",
                save_strategy="no",
                disable_tqdm=True,
                max_length=512,
                seed=0,
                use_cpu=cpu,
                mask_top_k=10,
                **kw,
            )
            trainer = RetMaskTrainer(
                model=copy.deepcopy(model).train(), args=cfg, train_dataset=prefs, processing_class=tokenizer
            )
            if kw["gradient_checkpointing"]:  # done by `train()`, which the bench bypasses
                trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            trainer.current_gradient_accumulation_steps = 1
            trainers[name] = trainer
    batch = next(iter(trainers["fp32"].get_train_dataloader()))
    tokens = int(batch["attention_mask"].sum())

    def step(trainer):
        trainer.training_step(trainer.model, dict(batch))
        trainer.model.zero_grad(set_to_none=True)

    times = {k: [] for k in trainers}
    for rep in range(reps + 1):
        for name in list(trainers) if rep % 2 == 0 else list(trainers)[::-1]:
            t = time.perf_counter()
            step(trainers[name])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if rep > 0:  # the first rep warms up
                times[name].append(time.perf_counter() - t)
    n = reps
    rows = []
    for name in ("bf16", "bf16+ckpt"):
        rows.append(
            {
                "name": f"DPO step {name} / fp32 (batch {batch_size}, {tokens} tokens, median of {n})",
                "value": statistics.median(a / b for a, b in zip(times[name], times["fp32"])),
                "unit": "x",
                "goal": "(context: sets the CPU default)",
            }
        )
    rows.append(
        {"name": "DPO step fp32 time (median)", "value": statistics.median(times["fp32"]), "unit": "s", "goal": ""}
    )
    return rows
