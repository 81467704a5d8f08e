"""The callbacks `RetMaskTrainer` adds to TRL's loop: pair statistics to every logger, and online RetMask (pairs
regenerated from the current policy every N steps or each epoch, behind a fixed-length view the sampler keeps)."""

from __future__ import annotations

import torch
from transformers import TrainerCallback


class LogPairStats(TrainerCallback):
    """Sends the pair statistics to every logger (W&B, TensorBoard, ...) once they are set up."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.logged = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.logged and self.trainer.pair_stats:
            self.logged = True
            logs = {}
            for split, stats in self.trainer.pair_stats.items():
                logs.update(stats.to_logs(prefix=f"pairs/{split}/"))
            self.trainer.log(logs)


class OnlinePairs(torch.utils.data.Dataset):
    """Fixed-length view of the current training pairs: the dataloader keeps its sampler while regenerations swap
    the rows underneath (index i reads row i mod the current row count)."""

    def __init__(self, dataset):
        self.current, self.length = dataset, len(dataset)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.current[i % len(self.current)]


class OnlineRegeneration(TrainerCallback):
    """Regenerates the training pairs from the current policy every N steps and/or at each new epoch."""

    def __init__(self, trainer):
        self.trainer, self.epochs_begun = trainer, 0

    def on_step_end(self, args, state, control, **kwargs):
        n = args.regenerate_pairs_steps
        if n and state.global_step % n == 0 and state.global_step < state.max_steps:
            self.trainer.regenerate_train_pairs(state.global_step)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epochs_begun += 1
        if args.regenerate_pairs_each_epoch and self.epochs_begun > 1:
            self.trainer.regenerate_train_pairs(state.global_step)
