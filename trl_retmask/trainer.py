"""`RetMaskTrainer`: TRL's DPOTrainer fed with pairs it generates itself from prompts.

chosen = the policy as it is, rejected = the same policy with its retrieval heads masked (`mask_heads`, no second
model). Generation happens before DPOTrainer's dataset processing; everything after is ordinary DPO.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path

from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, is_wandb_available
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import (
    create_model_from_path,
    generate_model_card,
    get_comet_experiment_url,
    get_config_model_id,
    get_trackio_space_url,
)

from .atomic import atomic_directory, atomic_path, ordinary_modes_of_new_files
from .config import RetMaskConfig
from .distributed import (
    from_main_process,
    gathered_for_generation,
    partitioned_copy,
    process_state,
    unwrapped_for_generation,
)
from .generation.vllm_engine import release_engine_for_training
from .heads import format_head, format_heads, validate_heads
from .liger import apply_liger_kernels
from .locks import directory_lock
from .model_card import PAPER, retmask_section, write_retmask_files
from .models import hub_id_of, resolve_model_path
from .pairs import PairStats, complete_prompt_dataset, is_prompt_only
from .scores import HeadScores, resolve_head_scores
from .selection import select_heads
from .shared_disk import check_shared_directory
from .trainer_callbacks import LogPairStats, OnlinePairs, OnlineRegeneration
from .trainer_data import check_columns, eval_splits, saved_dataset
from .truncation import TruncatingCollator, trl_truncation_off, truncate_prompt

if is_wandb_available():
    import wandb

logger = logging.getLogger(__name__)


class RetMaskTrainer(DPOTrainer):
    """DPO on (policy, retrieval-head-masked policy) pairs generated from a prompt-only dataset.

    Arguments are those of [`~trl.DPOTrainer`], plus `head_scores`: a `HeadScores`, a score file, a directory or Hub
    repo holding `retmask_head_scores.json`, or a model id with bundled scores (`HeadScores.from_pretrained`). It may
    instead come from `args.head_scores`; failing both, the scores found for the policy's own name are used. The
    heads masked are `args.heads`, else the selection of `args` from those scores (`select_heads`), unless
    `masked_heads` hands in heads already selected (from `head_scores`) by the caller, which are then only checked.
    Prompt-only datasets (`{"prompt": str}` or `{"prompt": [messages]}`), train and eval, are completed with
    generated pairs; preference datasets (with `chosen`/`rejected`) pass through untouched.

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
        masked_heads: list | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = RetMaskConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-RetMask")
        elif not isinstance(args, RetMaskConfig):
            raise TypeError(
                f"`args` must be a RetMaskConfig (it adds the masking and generation settings), got "
                f"{type(args).__name__}. Build it with RetMaskConfig(**your_dpo_config.to_dict())."
            )
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: prompts (`{'prompt': ...}`) or preference pairs.")
        for split, dataset in {"train_dataset": train_dataset, **eval_splits(eval_dataset)}.items():
            check_columns(split, dataset)
        if args.online and not is_prompt_only(train_dataset):
            raise ValueError(
                "Online RetMask regenerates pairs from prompts: `train_dataset` must be prompt-only "
                "(`{'prompt': ...}` without chosen/rejected)."
            )
        if head_scores is not None and args.head_scores is not None and masked_heads is None:
            raise ValueError(
                "Head scores were given twice (the `head_scores` argument and `args.head_scores`); keep one."
            )
        if args.heads and (masked_heads is not None or head_scores is not None):
            raise ValueError("`args.heads` names the heads to mask: pass neither `masked_heads` nor `head_scores`.")

        # Head scores before any loading or generation: a wrong path or model id fails in a second, not minutes.
        source = head_scores if head_scores is not None else args.head_scores
        scores = None if args.heads else resolve_head_scores(source, model)

        # The model is needed as an instance to generate the pairs before DPOTrainer processes the data.
        if isinstance(model, str):
            init_kwargs = dict(args.model_init_kwargs or {})
            if quantization_config is not None:
                init_kwargs["quantization_config"] = quantization_config
                quantization_config = None
            # One full copy per process (TRL's rule, which names MULTI_GPU and DEEPSPEED only): with several processes
            # (DDP, ZeRO, FSDP; accelerate's PartialState says FSDP only once an Accelerator exists, state.py:974) a
            # "auto" map would spread every rank's copy over all GPUs.
            state = args.distributed_state
            if state.distributed_type in ["MULTI_GPU", "DEEPSPEED", "FSDP"] or state.num_processes > 1:
                init_kwargs["device_map"] = None
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            model = create_model_from_path(resolve_model_path(model), **init_kwargs)
            args.model_init_kwargs = None  # consumed here
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(
                get_config_model_id(model.config), trust_remote_code=args.trust_remote_code
            )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError("`processing_class` must be a tokenizer (or a processor holding one).")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        # Heads: validated against the loaded model, before minutes of generation.
        if masked_heads is not None:
            self.masked_heads = validate_heads(model, masked_heads)
            self.head_scores = resolve_head_scores(scores, model)
        else:
            self.masked_heads, self.head_scores = select_heads(args, model, scores)
        self.pair_stats: dict[str, PairStats] = {}
        self.pair_stats_history: list[dict] = []
        self._train_prompts = train_dataset if args.online else None

        # Pairs (train, then eval) from the initial policy.
        splits = {"train": train_dataset, **eval_splits(eval_dataset)}
        needs_pairs = any(is_prompt_only(d) for d in splits.values())
        if needs_pairs:
            if getattr(model, "hf_device_map", None) is None and not is_deepspeed_zero3_enabled():
                model.to(args.device)  # where Trainer would put it anyway; generation is much faster there
            with gathered_for_generation(model):
                train_dataset = self._complete(train_dataset, model, tokenizer, args, "train")
                if isinstance(eval_dataset, dict):
                    eval_dataset = {
                        k: self._complete(d, model, tokenizer, args, f"eval_{k}") for k, d in eval_dataset.items()
                    }
                elif eval_dataset is not None:
                    eval_dataset = self._complete(eval_dataset, model, tokenizer, args, "eval")
            release_engine_for_training(args.online)  # a vLLM engine's weights and KV cache, idle through training

        # Reference = the initial, unmasked policy. TRL would reload it from `config._name_or_path`, which fails for a
        # model built in memory and silently differs from one modified after loading or loaded at another revision; a
        # copy is exact (under ZeRO-3 a partitioned one). With PEFT the adapter-disabled base serves (TRL), and
        # precomputed reference log-probs need no model.
        if ref_model is None and peft_config is None and not is_peft_model(model) and not args.precompute_ref_log_probs:
            if is_deepspeed_zero3_enabled():
                ref_model = partitioned_copy(model)
            else:
                ref_model = copy.deepcopy(model).eval()
                ref_model.requires_grad_(False)

        if args.liger_kernels:
            apply_liger_kernels(model, args.liger_kernel_config)
        data_collator = self._truncating_collator(data_collator, model, tokenizer, args)
        with trl_truncation_off(args):
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        self.add_callback(LogPairStats(self))
        if args.online:
            self.train_dataset = OnlinePairs(self.train_dataset)
            self.add_callback(OnlineRegeneration(self))

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's precompute pass (every one: the splits given to `__init__`, a new dataset given to `evaluate`), on a
        dataset every process reads and without the inference engine TRL builds for it.

        TRL caches the log-probs beside the dataset's own files, written by rank 0 (trl/trainer/dpo_trainer.py:
        1175-1240); an in-memory dataset keeps those in a temporary directory of each process, so the other ranks
        failed to open rank 0's file: such a dataset is first saved on the shared disk (`_on_shared_disk`).
        Under DeepSpeed TRL wraps the policy in an inference engine (:1198-1201) and keeps it for later passes:
        under ZeRO-3 its module hooks stay on the policy beside those of the engine that then trains or evaluates
        it, and that engine's first forward fails in DeepSpeed's parameter trace ("pop from an empty deque"). The
        pass has its log-probs by the end, so the engine is destroyed (its hooks removed) after each pass."""
        if isinstance(dataset, Dataset) and not dataset.cache_files:
            dataset = self._on_shared_disk(dataset, self.args)
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            engine = getattr(self, "_precompute_engine", None)
            if engine is not None:
                engine.destroy()
                self._precompute_engine = None

    def evaluate(self, *args, **kwargs):
        """TRL's `evaluate`, whose preparation of a new eval dataset keeps every row (the collator truncates)."""
        with trl_truncation_off(self.args):
            return super().evaluate(*args, **kwargs)

    @staticmethod
    def _truncating_collator(data_collator, model, tokenizer, args: RetMaskConfig) -> TruncatingCollator:
        """The authors' truncation around TRL's preference collator (or the user's). Giving DPOTrainer a collator
        skips its pad-token set-up, so the model's configs get the tokenizer's pad id here, as TRL would."""
        if data_collator is None:
            if args.pad_token is not None:
                tokenizer.pad_token = args.pad_token
            model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            data_collator = DataCollatorForPreference(
                pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of
            )
        return TruncatingCollator(
            data_collator,
            args.max_prompt_length,
            args.max_length,
            args.truncation_side,
            tokenizer.pad_token_id,
            args.pad_to_multiple_of,
        )

    def _get_train_sampler(self, train_dataset=None):
        """transformers' `train_sampling_strategy="group_by_length"` needs an `input_ids` column, which DPO rows do not
        have: here a row's length is its prompt plus its longer completion, what it costs in the padded batch of
        chosen and rejected sequences. On a CPU this halves the step time of a mixed prompt set (docs/training.md)."""
        dataset = self.train_dataset
        if (
            self.args.train_sampling_strategy == "group_by_length"
            and isinstance(dataset, Dataset)
            and {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names)
        ):
            args = self.args
            lengths = [
                min(
                    len(truncate_prompt(p, args.max_prompt_length, args.max_length, args.truncation_side))
                    + max(len(c), len(r)),
                    args.max_length or float("inf"),
                )
                for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])
            ]
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=lengths
            )
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------------------------------------ pairs
    def _complete(self, dataset, model, tokenizer, args: RetMaskConfig, name: str):
        dataset, stats = complete_prompt_dataset(
            dataset, model, tokenizer, self.masked_heads, name=name, **args.pair_generation_kwargs
        )
        if stats is not None:
            self.pair_stats[name] = stats
            if process_state().is_main_process:
                logger.info(
                    "RetMask %s pairs: kept %d of %d (dropped %d identical, %d empty); mean chosen/rejected tokens "
                    "%.1f/%.1f; %.1f generated tokens/s%s",
                    name,
                    stats.kept,
                    stats.prompts,
                    stats.dropped_identical,
                    stats.dropped_empty,
                    stats.mean_chosen_tokens,
                    stats.mean_rejected_tokens,
                    stats.tokens_per_second,
                    " (from cache)" if stats.batches_generated == 0 else "",
                )
            if args.precompute_ref_log_probs:
                dataset = self._on_shared_disk(dataset, args)
        return dataset

    def _on_shared_disk(self, dataset: Dataset, args: RetMaskConfig) -> Dataset:
        """The generated pairs as a dataset backed by a file that every process reads.

        TRL 1.16 caches precomputed reference log-probs next to the dataset's own cache files, and rank 0 writes them;
        an in-memory dataset has no cache files, so each process would look in its own temporary directory and the
        other ranks fail with FileNotFoundError. Saved under the pair cache (shared like `output_dir`), all ranks
        read rank 0's copy. The copy is saved into a temporary directory renamed into place once complete, and a
        stored copy is reused only when it reads back whole (an older run cut short by a full disk left one whose
        `dataset_info.json` or `.arrow` file is damaged): anything else is saved again. Every process must see
        that directory (one disk), and a failure to save it (a busy directory, a full disk) stops every process
        with the main process's line, none left waiting."""
        state = process_state()
        check_shared_directory(args.pairs_dir, "pair cache (`pairs_cache_dir`)", "turn `precompute_ref_log_probs` off")
        path = Path(args.pairs_dir) / f"dataset-{from_main_process(dataset._fingerprint)}"
        saved, error = None, None
        if state.is_main_process and (saved := saved_dataset(path, len(dataset))) is None:
            if path.exists():
                logger.warning("The saved pairs in %s do not read back whole; saving them again.", path)
            try:
                with directory_lock(path.parent), atomic_directory(path) as tmp:
                    dataset.save_to_disk(str(tmp))
            except ValueError as e:
                error = e
            except OSError as e:
                error = ValueError(
                    f"Cannot save the pairs in {path} ({e.strerror or e}); free space or use another `pairs_cache_dir`."
                )
        error = from_main_process(error)  # the others wait here until the main process has saved (or failed)
        if error is not None:
            raise error
        if saved is None:  # just saved, or another process: read back (the main process read a reused copy whole)
            saved = saved_dataset(path, len(dataset))
        if saved is None:
            raise ValueError(f"The pairs saved in {path} do not read back; delete that directory and rerun.")
        return saved

    def regenerate_train_pairs(self, step: int) -> None:
        """Online RetMask: new pairs from the current policy replace the training pairs (same row count)."""
        settings = {**self.args.pair_generation_kwargs, "seed": self.args.generation_seed + step}
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        try:
            with unwrapped_for_generation(self) as model:
                dataset, stats = complete_prompt_dataset(
                    self._train_prompts, model, tokenizer, self.masked_heads, name=f"train@{step}", **settings
                )
        except ValueError as e:  # every new pair dropped: keep training on the previous ones
            logger.warning("Online RetMask at step %d kept the previous pairs: %s", step, e)
            return
        finally:
            release_engine_for_training(online=True)  # training resumes: on CUDA it needs the engine's memory
        with trl_truncation_off(self.args):
            self.train_dataset.current = self._prepare_dataset(dataset, self.processing_class, self.args, "train")
        self.pair_stats["train"] = stats
        self.pair_stats_history.append({"step": step, **stats.to_dict()})
        self.log(stats.to_logs(prefix="pairs/train/"))

    # ---------------------------------------------------------------------------------------------- saving
    @property
    def retmask_info(self) -> dict:
        """What the card and `retmask.json` record about how this model was made."""
        scores, args = self.head_scores, self.args
        means = scores.mean_scores() if scores is not None else {}
        return {
            "masked_heads": format_heads(self.masked_heads),
            "head_scores": {format_head(h): means[h] for h in self.masked_heads if h in means},
            "selection": {"heads": format_heads(args.heads)}
            if args.heads
            else {**args.selection, "source": args.head_scores},
            "sparsity": scores.sparsity() if scores is not None else None,
            "generation": {
                **{k: v for k, v in args.generation_settings.items() if k != "generation_kwargs"},
                **(args.generation_kwargs or {}),
                "batch_size": args.generation_batch_size,
            },
            "pair_stats": {split: s.to_dict() for split, s in self.pair_stats.items()},
            "online": {
                "regenerate_pairs_steps": args.regenerate_pairs_steps,
                "regenerate_pairs_each_epoch": args.regenerate_pairs_each_epoch,
                "regenerations": self.pair_stats_history,
            }
            if args.online
            else None,
        }

    @property
    def base_model_id(self) -> str | None:
        """The card's base model: the Hub id behind the embedded model's converted checkpoint, else TRL's rule (the
        model's name or path unless it is a local directory, which the Hub could not link)."""
        path = get_config_model_id(self.model.config)
        if not path:
            return None
        return hub_id_of(path) or (None if os.path.isdir(path) else path)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card (`generate_model_card`, base model named explicitly) plus the RetMask section, in
        `args.output_dir` as TRL writes it; `retmask.json` and the head-score file go beside it."""
        if self.is_world_process_zero():
            self._write_card(self.args.output_dir, model_name, dataset_name, tags)

    def _write_card(self, save_dir, model_name=None, dataset_name=None, tags=None) -> None:
        tags = {tags} if isinstance(tags, str) else set(tags or ())
        card = generate_model_card(
            base_model=self.base_model_id,
            model_name=model_name or Path(save_dir).name,
            hub_model_id=self.hub_model_id or str(save_dir),  # the quick start loads the saved directory
            dataset_name=dataset_name,
            tags=sorted(tags | set(self._tag_names)),
            wandb_url=wandb.run.url if is_wandb_available() and wandb.run is not None else None,
            trackio_url=get_trackio_space_url(),
            comet_url=get_comet_experiment_url(),
            trainer_name=self._name,
            trainer_citation=self._paper["citation"],
            template_file=self._template_file,
            paper_title=self._paper["title"],
            paper_id=self._paper["id"],
        )
        info = self.retmask_info
        card.text = card.text.rstrip("\n") + "\n\n" + retmask_section(info)
        write_retmask_files(save_dir, info, self.head_scores)
        with atomic_path(Path(save_dir) / "README.md") as tmp:  # whole or absent
            card.save(tmp)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        saving = self.args.should_save and self.is_world_process_zero()
        target = output_dir or self.args.output_dir
        with ordinary_modes_of_new_files(target) if saving else contextlib.nullcontext():  # safetensors' are 0600
            super().save_model(output_dir, _internal_call=_internal_call)
        if saving:
            self._write_card(target)  # titled after the directory
