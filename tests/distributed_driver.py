"""Run recipes/smollm2.py under `accelerate launch` (or torchrun with DeepSpeed on CPUs) and record, per process,
what it generated and trained on.

Used by tests/test_distributed.py: `accelerate launch --num_processes 2 --cpu tests/distributed_driver.py REPORT_DIR
<recipe arguments>`. Each rank writes REPORT_DIR/rank<k>.json with the prompts its own `generate` calls received,
the full preference dataset it trains on, and its training results.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("DS_ACCELERATOR") == "cpu":  # launched by tests/launch.py `launch_two_deepspeed_cpu_processes`
    from tests.launch import deepspeed_cpu_state

    deepspeed_cpu_state()  # before the training arguments, which reuse it (`use_configured_state`)
if os.environ.get("RETMASK_TEST_EVERY_ANSWER_CORRECT"):  # the tiny random model answers nothing right
    import trl_retmask.detection as detection

    detection.score_answer = lambda reference, response: {"rouge1_recall": 1.0, "correct": True}

import torch  # noqa: E402
import transformers  # noqa: E402

import trl_retmask.scripts.train as train  # noqa: E402
from tests.recipe_utils import RECIPES  # noqa: E402

report_dir = Path(sys.argv[1])
argv = sys.argv[2:]
rank = int(os.environ.get("RANK", "0"))
record = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "generated_prompts": []}

_generate = transformers.GenerationMixin.generate


def counting_generate(self, *args, **kwargs):
    """Record the (unpadded) prompts of every generate call made by this process once the trainer is built."""
    tokenizer = getattr(counting_generate, "tokenizer", None)
    if tokenizer is None:  # detection / NIAH before the trainer is built: not pair generation
        return _generate(self, *args, **kwargs)
    input_ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
    for i in range(input_ids.shape[0]):
        ids = input_ids[i][mask[i].bool()] if mask is not None else input_ids[i]
        record["generated_prompts"].append(tokenizer.decode(ids, skip_special_tokens=False))
    return _generate(self, *args, **kwargs)


transformers.GenerationMixin.generate = counting_generate
_build_trainer = train.build_trainer


def recording_build_trainer(script_args, training_args, model_args, model=None, tokenizer=None, **kwargs):
    counting_generate.tokenizer = tokenizer
    trainer = _build_trainer(script_args, training_args, model_args, model=model, tokenizer=tokenizer, **kwargs)
    ds = trainer.train_dataset
    record["pairs"] = [
        {"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(ds["prompt"], ds["chosen"], ds["rejected"])
    ]
    record["pair_stats"] = trainer.pair_stats["train"].to_dict()
    record["masked_heads"] = [list(h) for h in trainer.masked_heads]
    recording_build_trainer.trainer = trainer
    if os.environ.get("RETMASK_TEST_EVALUATE_FIRST"):  # a new eval dataset before training: reference log-probs
        from datasets import Dataset  # are precomputed for it through a new engine around the policy

        metrics = trainer.evaluate(eval_dataset=Dataset.from_list(record["pairs"][:2]))
        record["evaluate_first"] = {
            "eval_loss": metrics["eval_loss"],
            "precompute_engine_left": getattr(trainer, "_precompute_engine", None) is not None,
        }
    return trainer


train.build_trainer = recording_build_trainer  # `train.main` looks it up in its module at call time
_main = train.main


def recording_main(*args):
    recording_main.summary = _main(*args)
    return recording_main.summary


train.main = recording_main
# The CLI entry, as `recipes/smollm2.py` runs it: it ends the process group after the stage (see `end_processes`).
code = train.cli_main(argv, prog="distributed_driver", recipe=str(RECIPES / "smollm2.yaml"))
if code != 0:
    sys.exit(code)
summary = recording_main.summary
trainer = recording_build_trainer.trainer
record["global_step"] = trainer.state.global_step
record["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
record["num_processes"] = trainer.accelerator.num_processes
record["backend"] = trainer.accelerator.state.backend
record["device"] = str(trainer.accelerator.device)
record["summary_heads"] = summary["masked_heads"]
record["niah"] = {k: summary[k] for k in ("niah_before", "niah_before_masked", "niah_after") if k in summary}
record["process_group_ended"] = not torch.distributed.is_initialized()
report_dir.mkdir(parents=True, exist_ok=True)
(report_dir / f"rank{rank}.json").write_text(json.dumps(record))
