"""`RetMaskTrainer`: TRL's DPOTrainer fed with pairs it generates itself from prompts.

chosen = the policy as it is, rejected = the same policy with its retrieval heads masked (`mask_heads`, no second
model). Generation happens before DPOTrainer's dataset processing; everything after is ordinary DPO.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import DPOTrainer
from trl.trainer.utils import create_model_from_path, get_config_model_id

from .config import RetMaskConfig
from .model_card import PAPER, write_retmask_files
from .models import hub_id_of, resolve_model_path
from .pairs import PairStats, complete_prompt_dataset, is_prompt_only
from .scores import HeadScores

logger = logging.getLogger(__name__)


class _LogPairStats(TrainerCallback):
    """Sends the pair statistics to every logger (W&B, TensorBoard, ...) once they are set up."""

    def __init__(self, trainer: RetMaskTrainer):
        self.trainer = trainer
        self.logged = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.logged and self.trainer.pair_stats:
            self.logged = True
            logs = {}
            for split, stats in self.trainer.pair_stats.items():
                logs.update(stats.to_logs(prefix=f"pairs/{split}/"))
            self.trainer.log(logs)


class _OnlinePairs(torch.utils.data.Dataset):
    """Fixed-length view of the current training pairs: the dataloader keeps its sampler while regenerations swap
    the rows underneath (index i reads row i mod the current row count)."""

    def __init__(self, dataset):
        self.current, self.length = dataset, len(dataset)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.current[i % len(self.current)]


class _OnlineRegeneration(TrainerCallback):
    """Regenerates the training pairs from the current policy every N steps and/or at each new epoch."""

    def __init__(self, trainer: RetMaskTrainer):
        self.trainer, self.epochs_begun = trainer, 0

    def on_step_end(self, args, state, control, **kwargs):
        n = args.regenerate_pairs_steps
        if n and state.global_step % n == 0 and state.global_step < state.max_steps:
            self.trainer.regenerate_train_pairs(state.global_step)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epochs_begun += 1
        if args.regenerate_pairs_each_epoch and self.epochs_begun > 1:
            self.trainer.regenerate_train_pairs(state.global_step)


class RetMaskTrainer(DPOTrainer):
    """DPO on (policy, retrieval-head-masked policy) pairs generated from a prompt-only dataset.

    Arguments are those of [`~trl.DPOTrainer`], plus `head_scores`: a `HeadScores`, a score-file path or a model id
    with bundled scores. It may instead come from `args.head_scores`; failing both, the scores bundled for the
    policy's own name are used. Prompt-only datasets (`{"prompt": str}` or `{"prompt": [messages]}`), train and eval,
    are completed with generated pairs; preference datasets (with `chosen`/`rejected`) pass through untouched.

    Example:

    ```python
    >>> from trl_retmask import RetMaskConfig, RetMaskTrainer
    >>> trainer = RetMaskTrainer(model=model, args=RetMaskConfig("out", mask_top_k=20), train_dataset=prompts,
    ...                          processing_class=tokenizer, head_scores="Llama-3.1-8B-Instruct")
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "dpo", "retmask"]
    _name = "RetMask"
    _paper = PAPER

    def __init__(
        self,
        model,
        ref_model=None,
        args: RetMaskConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        head_scores: HeadScores | str | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = RetMaskConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-RetMask")
        elif not isinstance(args, RetMaskConfig):
            raise TypeError(f"`args` must be a RetMaskConfig (it adds the masking and generation settings), got "
                            f"{type(args).__name__}. Build it with RetMaskConfig(**your_dpo_config.to_dict()).")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: prompts (`{'prompt': ...}`) or preference pairs.")
        if args.online and not is_prompt_only(train_dataset):
            raise ValueError("Online RetMask regenerates pairs from prompts: `train_dataset` must be prompt-only "
                             "(`{'prompt': ...}` without chosen/rejected).")
        if args.online and is_deepspeed_zero3_enabled():
            raise ValueError("Online RetMask generates with the policy during training, which ZeRO-3's sharded "
                             "parameters do not allow here; use ZeRO-1/2, DDP or FSDP, or turn online mode off.")
        if head_scores is not None and args.head_scores is not None:
            raise ValueError("Head scores were given twice (the `head_scores` argument and `args.head_scores`); "
                             "keep one.")

        # Head scores before any loading or generation: a wrong path or model id fails in a second, not minutes.
        scores = self._resolve_head_scores(head_scores, args, model)

        # The model is needed as an instance to generate the pairs before DPOTrainer processes the data.
        if isinstance(model, str):
            init_kwargs = dict(args.model_init_kwargs or {})
            if quantization_config is not None:
                init_kwargs["quantization_config"] = quantization_config
                quantization_config = None
            if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
                init_kwargs["device_map"] = None
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            model = create_model_from_path(resolve_model_path(model), **init_kwargs)
            args.model_init_kwargs = None  # consumed here
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(get_config_model_id(model.config),
                                                             trust_remote_code=args.trust_remote_code)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError("`processing_class` must be a tokenizer (or a processor holding one).")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        # Heads (cheap, and every mistake here must surface before minutes of generation).
        self.head_scores = scores
        self.head_scores.validate(model)
        self.masked_heads = self.head_scores.select(**args.selection)
        self.pair_stats: dict[str, PairStats] = {}
        self.pair_stats_history: list[dict] = []
        self._train_prompts = train_dataset if args.online else None

        # Pairs (train, then eval) from the initial policy.
        needs_pairs = is_prompt_only(train_dataset) or (
            eval_dataset is not None and any(is_prompt_only(d) for d in _as_dict(eval_dataset).values()))
        if needs_pairs:
            if getattr(model, "hf_device_map", None) is None and not is_deepspeed_zero3_enabled():
                model.to(args.device)  # where Trainer would put it anyway; generation is much faster there
            train_dataset = self._complete(train_dataset, model, tokenizer, args, "train")
            if eval_dataset is not None:
                if isinstance(eval_dataset, dict):
                    eval_dataset = {k: self._complete(d, model, tokenizer, args, f"eval_{k}")
                                    for k, d in eval_dataset.items()}
                else:
                    eval_dataset = self._complete(eval_dataset, model, tokenizer, args, "eval")

        # Reference = the initial, unmasked policy. TRL would reload it from `config._name_or_path`, which fails for a
        # model built in memory and silently differs from one modified after loading; a copy is exact. With PEFT
        # the adapter-disabled base serves (TRL), and precomputed reference log-probs need no model.
        if (ref_model is None and peft_config is None and not is_peft_model(model)
                and not args.precompute_ref_log_probs and not is_deepspeed_zero3_enabled()):
            ref_model = copy.deepcopy(model).eval()
            ref_model.requires_grad_(False)

        super().__init__(
            model=model, ref_model=ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers, quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self.add_callback(_LogPairStats(self))
        if args.online:
            self.train_dataset = _OnlinePairs(self.train_dataset)
            self.add_callback(_OnlineRegeneration(self))

    def _get_train_sampler(self, train_dataset=None):
        """transformers' `train_sampling_strategy="group_by_length"` needs an `input_ids` column, which DPO rows do not
        have: here a row's length is its prompt plus its longer completion, what it costs in the padded batch of
        chosen and rejected sequences. On a CPU this halves the step time of a mixed prompt set (docs/training.md)."""
        dataset = self.train_dataset
        if (self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, Dataset)
                and {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names)):
            lengths = [len(p) + max(len(c), len(r))
                       for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=lengths)
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------------------------------------ set-up
    @staticmethod
    def _resolve_head_scores(head_scores, args: RetMaskConfig, model) -> HeadScores:
        source = head_scores if head_scores is not None else args.head_scores
        if isinstance(source, HeadScores):
            return source
        if source is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            try:
                return HeadScores.from_pretrained(name)
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(
                    f"No head scores given and none bundled for the policy {name!r}. Pass `head_scores=` (a "
                    "HeadScores, a score file, or a model id with bundled scores) or set `RetMaskConfig.head_scores`; "
                    "detect them with `trl-retmask detect`."
                ) from e
        return HeadScores.from_pretrained(str(source))

    def _cache_dir(self, args: RetMaskConfig):
        if not args.cache_pairs:
            return None
        return args.pairs_cache_dir or str(Path(args.output_dir) / "_retmask_pairs")  # push_to_hub skips "_*"

    def _complete(self, dataset, model, tokenizer, args: RetMaskConfig, name: str):
        dataset, stats = complete_prompt_dataset(
            dataset, model, tokenizer, self.masked_heads, name=name,
            batch_size=args.generation_batch_size, cache_dir=self._cache_dir(args), **args.generation_settings,
        )
        if stats is not None:
            self.pair_stats[name] = stats
            logger.warning(
                "RetMask %s pairs: kept %d of %d (dropped %d identical, %d empty); mean chosen/rejected tokens "
                "%.1f/%.1f; %.1f generated tokens/s%s", name, stats.kept, stats.prompts, stats.dropped_identical,
                stats.dropped_empty, stats.mean_chosen_tokens, stats.mean_rejected_tokens, stats.tokens_per_second,
                " (from cache)" if stats.batches_generated == 0 else "",
            )
        return dataset

    def regenerate_train_pairs(self, step: int) -> None:
        """Online RetMask: new pairs from the current policy replace the training pairs (same row count)."""
        model = self.accelerator.unwrap_model(self.model)
        settings = {**self.args.generation_settings, "seed": self.args.generation_seed + step}
        try:
            dataset, stats = complete_prompt_dataset(
                self._train_prompts, model, self._tokenizer, self.masked_heads, name=f"train@{step}",
                batch_size=self.args.generation_batch_size, cache_dir=self._cache_dir(self.args), **settings,
            )
        except ValueError as e:  # every new pair dropped: keep training on the previous ones
            logger.warning("Online RetMask at step %d kept the previous pairs: %s", step, e)
            return
        self.train_dataset.current = self._prepare_dataset(dataset, self.processing_class, self.args, "train")
        self.pair_stats["train"] = stats
        self.pair_stats_history.append({"step": step, **stats.to_dict()})
        self.log(stats.to_logs(prefix="pairs/train/"))

    # ---------------------------------------------------------------------------------------------- saving
    @property
    def retmask_info(self) -> dict:
        """What the card and `retmask.json` record about how this model was made."""
        means = self.head_scores.mean_scores()
        args = self.args
        return {
            "masked_heads": [list(h) for h in self.masked_heads],
            "head_scores": {f"{layer}-{head}": means[(layer, head)] for layer, head in self.masked_heads},
            "selection": {**args.selection,
                          "source": args.head_scores if isinstance(args.head_scores, str) else None},
            "sparsity": self.head_scores.sparsity(),
            "generation": {**{k: v for k, v in args.generation_settings.items() if k != "generation_kwargs"},
                           **(args.generation_kwargs or {}), "batch_size": args.generation_batch_size},
            "pair_stats": {split: s.to_dict() for split, s in self.pair_stats.items()},
            "online": {"regenerate_pairs_steps": args.regenerate_pairs_steps,
                       "regenerate_pairs_each_epoch": args.regenerate_pairs_each_epoch,
                       "regenerations": self.pair_stats_history} if args.online else None,
        }

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card plus the RetMask section; the head-score file and `retmask.json` go beside it.

        Two gaps of TRL's card are filled for local work: the embedded model's converted checkpoint is a local
        directory, which TRL drops as base model, so its Hub id is named; and without a Hub repository the quick
        start loads the saved directory instead of `model="None"`."""
        config = self.model.config
        local_path = getattr(config, "_name_or_path", None)
        hub_id = hub_id_of(local_path) if local_path else None
        no_repo = self.hub_model_id is None
        try:
            if hub_id:
                config._name_or_path = hub_id
            if no_repo:
                self.hub_model_id = str(getattr(self, "_card_save_dir", None) or self.args.output_dir)
            super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        finally:
            if hub_id:
                config._name_or_path = local_path
            if no_repo:
                self.hub_model_id = None
        if self.is_world_process_zero():
            write_retmask_files(self.args.output_dir, self.retmask_info, self.head_scores)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self._card_save_dir = output_dir
            self.create_model_card(model_name=Path(output_dir).name)
            if self.is_world_process_zero() and Path(output_dir).resolve() != Path(self.args.output_dir).resolve():
                shutil.copyfile(Path(self.args.output_dir) / "README.md", Path(output_dir) / "README.md")
                write_retmask_files(output_dir, self.retmask_info, self.head_scores)


def _as_dict(eval_dataset) -> dict:
    return eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
