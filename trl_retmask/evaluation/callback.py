"""`LongContextEvalCallback`: a small slice of the suite every N steps, logged through the trainer's loggers."""

from __future__ import annotations

from transformers import TrainerCallback

from ..distributed import unwrapped_for_generation
from .registry import TASKS, build_suite
from .suite import generate_suite, score_suite


class LongContextEvalCallback(TrainerCallback):
    """Runs a fixed slice of the long-context suite during training so a run shows its long-context curve.

    Logs `{prefix}/{category}/{length}` (primary score) and what each task's registry entry names (`Task.logged`:
    `{prefix}/{task}/{length}` for the recall tasks, `{prefix}/cite_{metric}/{length}` for the citation components)
    with `trainer.log`, i.e. to every logger the trainer reports to (TensorBoard, W&B, log_history...).
    Under ZeRO-3 each process decodes its share with the gathered weights (TRL's `unwrap_model_for_generation`);
    under FSDP it is refused (the sharded forward's all-gathers would hang).
    The samples are built once, so every evaluation scores the same prompts. Usage, as TRL's callbacks:

    ```python
    trainer = RetMaskTrainer(...)
    trainer.add_callback(LongContextEvalCallback(trainer, lengths=(1024,), categories=("recall",), every_n_steps=50))
    ```
    """

    def __init__(
        self,
        trainer,
        lengths=(1024,),
        categories=("recall",),
        n_per_task: int = 2,
        seed: int = 0,
        every_n_steps: int | None = None,
        on_start: bool = True,
        batch_size: int = 4,
        prefix: str = "longctx",
        max_new_tokens: int | None = None,
    ):
        self.trainer = trainer
        tokenizer = trainer.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
        if tokenizer is None:
            raise ValueError("LongContextEvalCallback needs the trainer's `processing_class` (a tokenizer).")
        if getattr(trainer, "is_fsdp_enabled", False):
            raise ValueError(
                "LongContextEvalCallback cannot run under FSDP: it would decode through the sharded model, whose "
                "all-gathers hang when processes decode different samples. Evaluate saved checkpoints with "
                "`trl-retmask eval` instead."
            )
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        self.tokenizer = tokenizer
        self.samples = build_suite(tokenizer, lengths, categories, n_per_task, seed)
        self.every_n_steps, self.on_start, self.batch_size, self.prefix = every_n_steps, on_start, batch_size, prefix
        self.max_new_tokens = max_new_tokens
        self._last_step = -1
        self.history: list[dict] = []

    def _freq(self, args) -> int:
        return self.every_n_steps or args.eval_steps or args.logging_steps or 1

    def evaluate(self, step: int) -> dict:
        """Generate (each process its share of the samples, gathered), score, and log on the trainer."""
        with unwrapped_for_generation(self.trainer) as model:  # shards gathered, checkpointing off meanwhile
            outputs = generate_suite(
                model, self.tokenizer, self.samples, self.batch_size, max_new_tokens=self.max_new_tokens
            )
        result = score_suite(self.samples, outputs)
        logs = {f"{self.prefix}/{cat}/{n}": v for cat, by_len in result["scores"].items() for n, v in by_len.items()}
        for task, by_len in result["tasks"].items():
            for n, metrics in by_len.items():
                for log_name, key in TASKS[task].logged.items():
                    logs[f"{self.prefix}/{log_name}/{n}"] = metrics[key]
        self.history.append({"step": step, **logs})
        self.trainer.log(logs)
        self._last_step = step
        return logs

    def on_train_begin(self, args, state, control, **kwargs):
        if self.on_start and state.global_step == 0:
            self.evaluate(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self._last_step and state.global_step % self._freq(args) == 0:
            self.evaluate(state.global_step)
