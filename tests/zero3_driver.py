"""RetMaskTrainer under real DeepSpeed ZeRO-3 on CPU processes (gloo), launched by tests/test_deepspeed.py.

`python -m torch.distributed.run --nproc_per_node 2 tests/zero3_driver.py MODEL_DIR OUT_DIR REPORT_DIR`. The model
is loaded by transformers under `zero.Init` (partitioned), one weight is then changed on the partitions (so a
reference reloaded from the checkpoint would differ from the policy), and an online run of 3 steps is trained with
the default pair cache: at step 1 every regenerated pair is empty (the policy is made to answer EOS at once), so the
run keeps its previous pairs; at step 2 it regenerates from the current policy. Each rank writes
REPORT_DIR/rank<k>.json; rank 0 saves the policy's weights at step 2 (gathered) for the test's one-process rerun.
"""

import faulthandler
import json
import sys
from pathlib import Path

faulthandler.dump_traceback_later(150, exit=True)  # a hang fails with the stacks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.launch import deepspeed_cpu_state  # noqa: E402  (before transformers builds any process state)

state = deepspeed_cpu_state()

import deepspeed  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled  # noqa: E402

from tests.launch import ZERO3_CONFIG  # noqa: E402
from trl_retmask import RetMaskConfig, RetMaskTrainer  # noqa: E402
from trl_retmask.distributed import gathered_for_generation  # noqa: E402
from trl_retmask.evaluation.callback import LongContextEvalCallback  # noqa: E402
from trl_retmask.fingerprints import hash_weights  # noqa: E402

ZERO3_PROMPTS = [
    "the secret number is",
    "tell me a story about the sea",
    "how many boys went to school ?",
    "the man",
    "what is the magic word ?",
]  # 3 batches of 2: one process decodes twice as many as the other
ZERO3_HEADS = ["0-1", "2-3"]
PERTURBED = "model.layers.0.self_attn.q_proj.weight"  # + 0.5 after loading
EOS = 2

model_dir, out_dir, report_dir = (Path(a) for a in sys.argv[1:4])
rank = state.process_index
report_dir.mkdir(parents=True, exist_ok=True)


def gathered(module) -> dict:
    """Every weight of a partitioned `module`, full, on the CPU (a collective: all ranks call it)."""
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


class Steps(TrainerCallback):
    """Step 1: the policy answers EOS at once (every new pair is empty and dropped). Step 2: its weights are saved,
    then the regeneration that follows makes the pairs recorded at the start of step 3."""

    def __init__(self):
        self.hook, self.pairs, self.hooks = None, {}, {}

    def on_step_begin(self, args, state, control, model=None, **kw):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.pairs[state.global_step] = rows(trainer.train_dataset.current)
        self.hooks[state.global_step] = len(trainer.model_wrapped.optimizer.parameter_offload.forward_hooks)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == 1:
            self.hook = model.lm_head.register_forward_hook(lambda m, i, out: out.index_fill(-1, eos_id, 1e4))
        if state.global_step == 2:
            weights = gathered(model)
            if rank == 0:
                torch.save(weights, report_dir / "policy_step2.pt")


def rows(dataset) -> list[dict]:
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in dataset]


eos_id = torch.tensor([EOS])
args = RetMaskConfig(
    str(out_dir),
    deepspeed=ZERO3_CONFIG,
    accelerator_config={"use_configured_state": True},  # the DeepSpeed state built above (see tests/launch.py)
    heads=ZERO3_HEADS,
    temperature=0.0,
    max_new_tokens=5,
    generation_batch_size=2,
    per_device_train_batch_size=1,
    max_steps=3,
    regenerate_pairs_steps=1,
    learning_rate=5e-2,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
    bf16=False,
    logging_steps=1,
    seed=0,
)
record = {
    "rank": rank,
    "num_processes": state.num_processes,
    "distributed_type": str(state.distributed_type),
    "zero3": is_deepspeed_zero3_enabled(),
}
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
record["partitioned"] = all(p.numel() == 0 for p in model.parameters())
weight = dict(model.named_parameters())[PERTURBED]
with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
    if rank == 0:
        with torch.no_grad():
            weight.add_(0.5)
initial = gathered(model)
record["hash_partitioned"] = hash_weights(model)  # each weight gathered for the hash
with gathered_for_generation(model):  # as pair generation hashes: inside the full-model gather
    record["hash_gathered"] = hash_weights(model)
record["partitioned_after_hash"] = all(p.numel() == 0 for p in model.parameters())
tokenizer = AutoTokenizer.from_pretrained(model_dir)
steps = Steps()
trainer = RetMaskTrainer(
    model=model,
    args=args,
    train_dataset=Dataset.from_dict({"prompt": ZERO3_PROMPTS}),
    processing_class=tokenizer,
    callbacks=[steps],
)
# The long-context callback at step 3: 12 samples (batches of 5) shared by the 2 processes.
longctx = LongContextEvalCallback(
    trainer, lengths=(128,), categories=("recall",), n_per_task=3, every_n_steps=3, on_start=False, batch_size=5
)
trainer.add_callback(longctx)
reference = gathered(trainer.ref_model.module)
record["reference_max_diff"] = max((reference[n] - initial[n]).abs().max().item() for n in initial)
record["reference_dtypes"] = sorted({str(t.dtype) for t in reference.values()})
record["policy_dtypes"] = sorted({str(t.dtype) for t in initial.values()})
trainer.train()
record["pairs"] = steps.pairs
record["history"] = trainer.pair_stats_history
record["zero3_hooks"] = steps.hooks  # DeepSpeed's module hooks at the start of each step
record["longctx"] = longctx.history
record["longctx_samples"] = len(longctx.samples)
record["global_step"] = trainer.state.global_step
record["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
record["cache_files"] = sorted(str(p.relative_to(out_dir)) for p in Path(args.pairs_dir).rglob("*.meta.json"))
(report_dir / f"rank{rank}.json").write_text(json.dumps(record))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
