"""RetMaskTrainer: pairs from prompts, ordinary DPO on them, reference = initial policy, PEFT, cache, saving."""

import copy
import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests.test_pairs import HEADS, CountingGenerate, independent
from tests.tiny import PREFS, CheckpointingProbe, make_tiny_model
from trl_retmask import HeadScores
from trl_retmask.config import RetMaskConfig
from trl_retmask.selection import select_heads
from trl_retmask.trainer import RetMaskTrainer
from trl_retmask.truncation import truncate_prompt

PROMPTS = ["the secret number is", "tell me a story about the sea", "how many boys went to school ?", "the man said"]
SCORES = HeadScores(
    {"0-1": [0.9, 0.7], "1-2": [0.5], "2-0": [0.3], "0-0": [0.01], "2-3": [0.02]}, num_layers=3, num_heads=4
)


def config(tmp_path, **kw):
    base = dict(
        max_steps=4,
        per_device_train_batch_size=2,
        temperature=0.0,
        max_new_tokens=6,
        report_to="none",
        logging_steps=1,
        learning_rate=2e-3,
        save_strategy="no",
        disable_tqdm=True,
        bf16=False,
        activation_checkpointing=False,
        seed=0,
    )
    return RetMaskConfig(str(tmp_path / "out"), **{**base, **kw})


def prompts(items=PROMPTS):
    return Dataset.from_dict({"prompt": list(items)})


def test_training_lowers_loss_reference_is_initial_policy_and_card(tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = RetMaskTrainer(
        model=model, args=config(tmp_path), train_dataset=prompts(), processing_class=tiny_tokenizer, head_scores=SCORES
    )
    assert trainer.masked_heads == SCORES.select(threshold=0.1) == HEADS
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert losses[-1] < losses[0] - 0.05

    # Reference: a separate, unmasked model holding the initial weights; the policy moved away from them.
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(v.cpu(), initial[k].cpu(), rtol=0, atol=0)
    assert not any(m._forward_pre_hooks for m in ref.modules())
    assert not any(p.requires_grad for p in ref.parameters())  # frozen: no gradients kept for it

    # ... in the direction DPO pushes: the policy's implicit reward margin (log-ratio to the reference of chosen
    # minus rejected), computed here from the models' own log-probs, is positive on the training pairs.
    def completion_logp(m, prompt, completion):
        p_ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + tiny_tokenizer(completion, add_special_tokens=False)["input_ids"]], device=m.device)
        with torch.no_grad():
            logp = m(ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        return logp[len(p_ids) - 1 :].sum().item()

    margins = [
        (completion_logp(trainer.model, r["prompt"], r["chosen"]) - completion_logp(ref, r["prompt"], r["chosen"]))
        - (
            completion_logp(trainer.model, r["prompt"], r["rejected"])
            - completion_logp(ref, r["prompt"], r["rejected"])
        )
        for r in trainer.train_dataset
    ]
    assert sum(margins) / len(margins) > 0.1, margins

    # Pair statistics reached the loggers (log history is what every reporting callback receives).
    pair_logs = next(h for h in trainer.state.log_history if "pairs/train/kept" in h)
    stats = trainer.pair_stats["train"]
    assert pair_logs["pairs/train/kept"] == stats.kept == len(trainer.train_dataset)
    assert pair_logs["pairs/train/dropped_identical"] == stats.dropped_identical

    # Saving writes TRL's card plus the RetMask section, the head-score file and retmask.json.
    save_dir = tmp_path / "saved"
    trainer.save_model(str(save_dir))
    card = (save_dir / "README.md").read_text()
    assert "## RetMask" in card and "TRL" in card and "2601.11020" in card
    for (layer, head), score in zip(HEADS, (0.8, 0.5, 0.3)):
        assert f"| {layer} | {head} | {score:.4f} |" in card
    assert f"| kept | {stats.kept} |" in card and f"| dropped_identical | {stats.dropped_identical} |" in card
    info = json.loads((save_dir / "retmask.json").read_text())
    assert info["masked_heads"] == [f"{layer}-{head}" for layer, head in HEADS]  # the one saved form
    assert info["pair_stats"]["train"]["kept"] == stats.kept
    trainer.create_model_card()
    trainer.create_model_card()  # regenerated, never spliced twice
    assert (tmp_path / "out" / "README.md").read_text().count("## RetMask") == 1
    assert card.index("## Citations") < card.index("## RetMask")  # TRL's card untouched, our section appended
    # What TRL's push_to_hub passes reaches the card's metadata (a string tag, or a list of them).
    from huggingface_hub import ModelCard

    for tags, expected in (("extra", {"extra"}), (["a", "b"], {"a", "b"})):
        trainer.create_model_card(model_name="my-retmask", dataset_name="org/prompts", tags=tags)
        data = ModelCard.load(tmp_path / "out" / "README.md").data
        assert data.model_name == "my-retmask" and data.datasets in ("org/prompts", ["org/prompts"])
        assert set(data.tags) == expected | {"generated_from_trainer", "trl", "dpo", "retmask"}

    # The saved directory gives back the scores (same layout, every head) and exactly the heads trained with.
    back = HeadScores.from_pretrained(save_dir)
    assert (back.num_layers, back.num_heads) == (3, 4) and back.mean_scores() == SCORES.mean_scores()
    assert back.trained_heads == HEADS
    heads, _ = select_heads(RetMaskConfig(str(tmp_path / "x"), report_to="none", bf16=False), model, save_dir)
    assert heads == HEADS


def test_heads_handed_in_are_not_selected_again_and_explicit_heads_need_no_scores(
    tiny_tokenizer, tmp_path, monkeypatch
):
    """A caller that selected the heads (the train script) hands them in with their scores: the trainer only checks
    them. Explicit `heads` in the config mask exactly those, with no scores, and the card says so."""
    import trl_retmask.trainer as trainer_module

    def never(*a, **k):
        raise AssertionError("selected twice")

    with monkeypatch.context() as m:
        m.setattr(trainer_module, "select_heads", never)
        trainer = RetMaskTrainer(
            model=make_tiny_model("llama"),
            args=config(tmp_path, mask_top_k=1),
            train_dataset=PREFS,
            processing_class=tiny_tokenizer,
            head_scores=SCORES,
            masked_heads=[(2, 3), "1-0"],
        )
    assert trainer.masked_heads == [(1, 0), (2, 3)] and trainer.head_scores is SCORES
    with pytest.raises(ValueError, match=r"Heads \[\(3, 0\)\] are out of range"):
        RetMaskTrainer(
            model=make_tiny_model("llama"),
            args=config(tmp_path),
            train_dataset=PREFS,
            processing_class=tiny_tokenizer,
            head_scores=SCORES,
            masked_heads=[(3, 0)],
        )

    trainer = RetMaskTrainer(
        model=make_tiny_model("llama"),
        args=config(tmp_path, heads="2-3,0-2"),
        train_dataset=PREFS,
        processing_class=tiny_tokenizer,
    )
    assert trainer.masked_heads == [(0, 2), (2, 3)] and trainer.head_scores is None
    trainer.save_model(str(tmp_path / "saved"))
    info = json.loads((tmp_path / "saved" / "retmask.json").read_text())
    assert info["masked_heads"] == ["0-2", "2-3"] and info["selection"] == {"heads": ["2-3", "0-2"]}
    assert info["sparsity"] is None and not (tmp_path / "saved" / "retmask_head_scores.json").exists()
    assert "2 heads, given explicitly." in (tmp_path / "saved" / "README.md").read_text()
    with pytest.raises(ValueError, match="`args.heads` names the heads to mask"):
        RetMaskTrainer(
            model=make_tiny_model("llama"),
            args=config(tmp_path, heads="2-3"),
            train_dataset=PREFS,
            processing_class=tiny_tokenizer,
            head_scores=SCORES,
        )


def test_card_of_the_embedded_checkpoint_names_its_hub_base_model(tiny_tokenizer, tmp_path, monkeypatch):
    """The embedded model loads from a local cache directory, which TRL's card drops ("fine-tuned version of None"):
    the card names the original Hub model instead, and the config keeps its local path."""
    monkeypatch.setenv("TRL_RETMASK_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    local.mkdir(parents=True)
    model = make_tiny_model("llama")
    model.config._name_or_path = str(local)
    prefs = Dataset.from_dict({"prompt": PROMPTS[:2], "chosen": [" yes", " no"], "rejected": [" no", " yes"]})
    trainer = RetMaskTrainer(
        model=model, args=config(tmp_path), train_dataset=prefs, processing_class=tiny_tokenizer, head_scores=SCORES
    )
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in card
    assert "None" not in card.split("## RetMask")[0]
    assert f'pipeline("text-generation", model="{tmp_path / "saved"}"' in card
    assert model.config._name_or_path == str(local) and trainer.hub_model_id is None  # nothing rewritten
    assert not hasattr(trainer, "_card_save_dir")


def test_card_links_the_run_trackers_and_cites_the_paper(tiny_tokenizer, tmp_path, monkeypatch):
    """TRL's card fields our `_write_card` fills: tracker links (W&B only while a run is active), the paper and its
    citation; the RetMask section follows TRL's text after exactly one blank line."""
    import types

    import trl_retmask.trainer as trainer_module
    from trl_retmask.model_card import PAPER

    trainer = RetMaskTrainer(
        model=make_tiny_model("llama"),
        args=config(tmp_path),
        train_dataset=PREFS,
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    links = {
        "wandb": "https://wandb.ai/me/p/runs/abc",
        "trackio": "https://huggingface.co/spaces/me/trackio",
        "comet": "https://www.comet.com/me/p/xyz",
    }
    monkeypatch.setattr(trainer_module, "get_trackio_space_url", lambda: links["trackio"])
    monkeypatch.setattr(trainer_module, "get_comet_experiment_url", lambda: links["comet"])
    monkeypatch.setattr(trainer_module, "is_wandb_available", lambda: True)
    for run, wandb_linked in ((types.SimpleNamespace(url=links["wandb"]), True), (None, False)):
        monkeypatch.setattr(trainer_module, "wandb", types.SimpleNamespace(run=run), raising=False)
        trainer.create_model_card()
        card = (tmp_path / "out" / "README.md").read_text()
        assert (links["wandb"] in card) is wandb_linked
        assert links["trackio"] in card and links["comet"] in card
        assert PAPER["citation"] in card and f"https://huggingface.co/papers/{PAPER['id']}" in card
        assert PAPER["title"] in card.split("## RetMask")[0]  # TRL's part names the paper
        head, tail = card.split("## RetMask")
        assert head.endswith("\n\n") and not head.endswith("\n\n\n") and tail.startswith("\n")


def test_save_model_writes_its_card_where_it_saves_and_pushes_only_for_the_user(tiny_tokenizer, tmp_path):
    """`save_model(dir)`: weights and card in `dir` (card titled after it), nothing in `output_dir`; the user's call
    pushes when `push_to_hub` is on, Trainer's internal calls do not; only the world's main process writes the
    card (with `save_on_each_node`, another node's local main saves weights, not a card)."""
    trainer = RetMaskTrainer(
        model=make_tiny_model("llama"),
        args=config(tmp_path),
        train_dataset=PREFS,
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    pushes = []
    trainer.push_to_hub = lambda **kw: pushes.append(kw)
    trainer.args.push_to_hub = True
    saved = tmp_path / "my-run"
    trainer.save_model(str(saved))
    assert (saved / "model.safetensors").is_file() and "# Model Card for my-run" in (saved / "README.md").read_text()
    assert (saved / "retmask.json").is_file() and not (tmp_path / "out" / "README.md").exists()
    assert len(pushes) == 1
    trainer.save_model(str(saved), _internal_call=True)
    assert len(pushes) == 1
    trainer.args.push_to_hub = False
    trainer.save_model()  # no directory: `output_dir`
    assert "# Model Card for out" in (tmp_path / "out" / "README.md").read_text()
    trainer.is_world_process_zero = lambda: False
    trainer.save_model(str(tmp_path / "node1"))
    assert (tmp_path / "node1" / "model.safetensors").is_file() and not (tmp_path / "node1" / "README.md").exists()


def test_peft_trains_adapter_and_keeps_base_weights(tiny_tokenizer, tmp_path):
    from peft import LoraConfig

    model = make_tiny_model("llama")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = RetMaskTrainer(
        model=model,
        args=config(tmp_path, max_steps=3),
        train_dataset=prompts(),
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]),
    )
    assert trainer.ref_model is None  # the adapter-disabled base is the reference, no copy
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    base = trainer.model.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            torch.testing.assert_close(param.detach().cpu(), initial[key].cpu(), rtol=0, atol=0)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n].cpu(), v.cpu()) for n, v in lora_before.items())


def test_second_trainer_reuses_cached_pairs_and_heads_change_regenerates(tiny_tokenizer, tmp_path):
    def build(**kw):
        model = make_tiny_model("llama")
        counter = CountingGenerate(model)
        trainer = RetMaskTrainer(
            model=model,
            args=config(tmp_path, **kw),
            train_dataset=prompts(),
            processing_class=tiny_tokenizer,
            head_scores=SCORES,
        )
        return trainer, counter.calls

    first, calls = build()
    assert calls == 2  # one batch: chosen + rejected
    second, calls = build()
    assert calls == 0, "same weights, heads, settings and prompts: no generation"
    assert second.train_dataset["chosen"] == first.train_dataset["chosen"]
    assert second.pair_stats["train"].batches_from_cache == 1
    _, calls = build(mask_top_k=1)
    assert calls == 1, "other heads must regenerate the rejected responses (the chosen ones are shared)"
    _, calls = build(max_new_tokens=5)
    assert calls == 2, "other generation settings must regenerate"


def test_conversational_prompts_and_eval_dataset(tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama")
    on_cpu = copy.deepcopy(model)  # the trainer moves `model` to the training device
    chats = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    expected = {
        p: (
            independent(model, tiny_tokenizer, [{"role": "user", "content": p}]),
            independent(model, tiny_tokenizer, [{"role": "user", "content": p}], HEADS),
        )
        for p in PROMPTS
    }
    trainer = RetMaskTrainer(
        model=model,
        args=config(tmp_path, max_steps=1, per_device_eval_batch_size=2),
        train_dataset=chats,
        eval_dataset=prompts(PROMPTS[::-1]),
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    assert set(trainer.pair_stats) == {"train", "eval"}
    for row in trainer.train_dataset:
        assert row["chosen"] == [{"role": "assistant", "content": expected[row["prompt"][0]["content"]][0]}]
        assert row["rejected"] == [{"role": "assistant", "content": expected[row["prompt"][0]["content"]][1]}]
    eval_rows = trainer.eval_dataset
    # Kept = the eval prompts whose greedy answers differ with the heads masked (computed here on the CPU copy).
    differ = [
        independent(on_cpu, tiny_tokenizer, p).strip() != independent(on_cpu, tiny_tokenizer, p, HEADS).strip()
        for p in PROMPTS
    ]
    assert len(eval_rows) == trainer.pair_stats["eval"].kept == sum(differ) > 0
    for row in eval_rows:
        assert row["chosen"] == independent(on_cpu, tiny_tokenizer, row["prompt"]) + tiny_tokenizer.eos_token
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])


def test_preference_dataset_passes_through_unchanged(tiny_tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    prefs = Dataset.from_dict(
        {"prompt": ["the man said", "where is the water"], "chosen": ["yes .", "here"], "rejected": ["no", "sea sea"]}
    )
    model = make_tiny_model("llama")
    counter = CountingGenerate(model)
    trainer = RetMaskTrainer(
        model=model, args=config(tmp_path), train_dataset=prefs, processing_class=tiny_tokenizer, head_scores=SCORES
    )
    assert counter.calls == 0 and trainer.pair_stats == {}
    plain = DPOTrainer(
        model=make_tiny_model("llama"),
        ref_model=make_tiny_model("llama"),
        args=DPOConfig(str(tmp_path / "plain"), report_to="none", bf16=False),
        train_dataset=prefs,
        processing_class=tiny_tokenizer,
    )
    assert trainer.train_dataset.to_dict() == plain.train_dataset.to_dict()


def test_head_sources_and_strategies(tiny_tokenizer, tmp_path):
    path = SCORES.save(tmp_path / "scores.json")
    t = RetMaskTrainer(
        model=make_tiny_model("llama"),
        args=config(tmp_path, head_scores=str(path), mask_top_k=2),
        train_dataset=PREFS,
        processing_class=tiny_tokenizer,
    )
    assert t.masked_heads == [(0, 1), (1, 2)]
    t = RetMaskTrainer(
        model=make_tiny_model("llama"),
        args=config(tmp_path, mask_strategy="random_non_retrieval"),
        train_dataset=PREFS,
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    assert len(t.masked_heads) == 3 and not set(t.masked_heads) & set(HEADS)
    assert t.masked_heads == SCORES.select(threshold=0.1, strategy="random_non_retrieval", seed=0)


def test_model_given_as_path(tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    t = RetMaskTrainer(
        model=str(tmp_path / "m"), args=config(tmp_path, max_new_tokens=4), train_dataset=prompts(), head_scores=SCORES
    )
    for k, v in t.ref_model.state_dict().items():
        torch.testing.assert_close(v.cpu(), model.state_dict()[k].cpu(), rtol=0, atol=0)
    row = t.train_dataset[0]
    assert row["rejected"] == independent(model, tiny_tokenizer, row["prompt"], HEADS, max_new_tokens=4) + "</s>"
    assert t.args.model_init_kwargs is None  # consumed by the load: DPOTrainer neither reloads nor warns
    # Scores of another layout are refused against the loaded model (a path has no layout before loading).
    with pytest.raises(ValueError, match="the score file belongs to another model"):
        RetMaskTrainer(
            model=str(tmp_path / "m"),
            args=config(tmp_path),
            train_dataset=prompts(),
            head_scores=HeadScores({"5-1": [0.9]}, num_layers=30, num_heads=9),
        )


class _Stop(Exception):
    """Raised by a stand-in to end a constructor once the step under test has run."""


def test_named_model_is_loaded_with_the_users_settings(tiny_tokenizer, tmp_path, monkeypatch):
    """`model_init_kwargs`, `trust_remote_code` and a `quantization_config` argument reach the loader (not
    DPOTrainer, which refuses a quantization config beside a loaded model); no `device_map` under DDP, DeepSpeed, FSDP
    or any multi-process job."""
    import types

    from accelerate.utils import DistributedType

    import trl_retmask.trainer as trainer_module

    loaded = []

    def create(path, **kwargs):
        loaded.append((path, kwargs))
        return make_tiny_model("llama")

    monkeypatch.setattr(trainer_module, "create_model_from_path", create)
    monkeypatch.setattr(trainer_module, "resolve_model_path", lambda name: f"/models/{name}")
    quant = object()  # stands for a BitsAndBytesConfig
    RetMaskTrainer(
        model="org/model",
        args=config(tmp_path, model_init_kwargs={"dtype": "float32"}, trust_remote_code=True),
        train_dataset=PREFS,
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
        quantization_config=quant,
    )
    assert loaded == [
        ("/models/org/model", {"dtype": "float32", "quantization_config": quant, "trust_remote_code": True})
    ]

    def stop(path, **kwargs):
        loaded.append((path, kwargs))
        raise _Stop

    monkeypatch.setattr(trainer_module, "create_model_from_path", stop)
    for kind, processes, device_map in (
        (DistributedType.NO, 1, "auto"),
        (DistributedType.MULTI_GPU, 2, None),
        (DistributedType.DEEPSPEED, 1, None),
        (DistributedType.FSDP, 1, None),  # one full copy per process, as under DDP/ZeRO
        (DistributedType.MULTI_XPU, 2, None),  # any multi-process job
    ):
        args = config(tmp_path, model_init_kwargs={"device_map": "auto"})
        args.distributed_state = types.SimpleNamespace(distributed_type=kind, num_processes=processes)
        with pytest.raises(_Stop):
            RetMaskTrainer(
                model="org/model", args=args, train_dataset=PREFS, processing_class=tiny_tokenizer, head_scores=SCORES
            )
        assert loaded[-1][1] == {"device_map": device_map, "trust_remote_code": False}


def test_tokenizer_from_the_model_or_a_processor_gets_a_pad_token(tiny_tokenizer, tmp_path, monkeypatch):
    """No `processing_class`: the model's own tokenizer (with `trust_remote_code`); a processor's tokenizer is used
    and, without a pad token, pads with EOS; a pad token already set is kept; anything else is refused."""
    import types

    import trl_retmask.trainer as trainer_module

    selected = []

    def stop(args, model, scores):
        selected.append(model)
        raise _Stop

    monkeypatch.setattr(trainer_module, "select_heads", stop)
    model = make_tiny_model("llama")
    model.config._name_or_path = "org/tiny"

    def build(processing_class, **kw):
        with pytest.raises(_Stop):
            RetMaskTrainer(
                model=model,
                args=config(tmp_path, **kw),
                train_dataset=prompts(),
                processing_class=processing_class,
                head_scores=SCORES,
            )
        assert selected[-1] is model  # heads are selected against the loaded model

    unpadded = copy.deepcopy(tiny_tokenizer)
    unpadded.pad_token = None
    build(types.SimpleNamespace(tokenizer=unpadded))
    assert unpadded.pad_token == unpadded.eos_token == "</s>"
    padded = copy.deepcopy(tiny_tokenizer)
    assert padded.pad_token not in (None, padded.eos_token)
    build(padded)
    assert padded.pad_token == tiny_tokenizer.pad_token
    requests = []
    monkeypatch.setattr(
        trainer_module,
        "AutoTokenizer",
        types.SimpleNamespace(
            from_pretrained=lambda name, **kw: requests.append((name, kw)) or copy.deepcopy(tiny_tokenizer)
        ),
    )
    build(None, trust_remote_code=True)
    assert requests == [("org/tiny", {"trust_remote_code": True})]
    with pytest.raises(TypeError, match=r"^`processing_class` must be a tokenizer \(or a processor holding one\)\.$"):
        RetMaskTrainer(
            model=model, args=config(tmp_path), train_dataset=prompts(), processing_class=object(), head_scores=SCORES
        )


def test_pairs_are_generated_on_the_training_device_unless_the_model_is_placed(tiny_tokenizer, tmp_path, monkeypatch):
    """Before generating, the policy moves to `args.device` (where Trainer would put it) unless it was placed by a
    `device_map` or is sharded by ZeRO-3; generation then runs on the (gathered) policy itself."""
    import trl_retmask.trainer as trainer_module

    gathered = []

    def stop(model):
        gathered.append(model)
        raise _Stop

    monkeypatch.setattr(trainer_module, "gathered_for_generation", stop)
    args = config(tmp_path)
    for placed, zero3, moved in ((False, False, True), (True, False, False), (False, True, False)):
        model = make_tiny_model("llama")
        if placed:
            model.hf_device_map = {"": "cpu"}
        monkeypatch.setattr(trainer_module, "is_deepspeed_zero3_enabled", lambda zero3=zero3: zero3)
        moves = []
        model.to = lambda *a, moves=moves, model=model, **kw: moves.append(a) or model
        with pytest.raises(_Stop):
            RetMaskTrainer(
                model=model, args=args, train_dataset=prompts(), processing_class=tiny_tokenizer, head_scores=SCORES
            )
        assert moves == ([(args.device,)] if moved else []) and gathered[-1] is model


def test_dpo_trainer_arguments_pass_through(tiny_tokenizer, tmp_path):
    """What RetMask does not use itself reaches DPOTrainer unchanged: metrics, callbacks, optimizers, and a
    quantization config beside an already loaded model (which TRL refuses); the collator, inside the truncation."""
    from transformers import TrainerCallback
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    model = make_tiny_model("llama")
    collator = DataCollatorForPreference(pad_token_id=tiny_tokenizer.pad_token_id)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    callback = TrainerCallback()

    def metrics(_):
        return {}

    t = RetMaskTrainer(
        model=model,
        args=config(tmp_path),
        train_dataset=PREFS,
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
        data_collator=collator,
        compute_metrics=metrics,
        callbacks=[callback],
        optimizers=(optimizer, scheduler),
    )
    assert t.data_collator.collator is collator and t.compute_metrics is metrics
    assert t.optimizer is optimizer and t.lr_scheduler is scheduler and callback in t.callback_handler.callbacks
    with pytest.raises(ValueError, match="your model is already instantiated"):
        RetMaskTrainer(
            model=model,
            args=config(tmp_path),
            train_dataset=PREFS,
            processing_class=tiny_tokenizer,
            head_scores=SCORES,
            quantization_config=object(),
        )


def test_prompt_only_eval_beside_a_preference_train_set_gets_pairs(tiny_tokenizer, tmp_path):
    prefs = Dataset.from_dict({"prompt": ["the man said"], "chosen": ["yes ."], "rejected": ["no"]})
    model = make_tiny_model("llama")
    t = RetMaskTrainer(
        model=model,
        args=config(tmp_path),
        train_dataset=prefs,
        eval_dataset=prompts(PROMPTS[:2]),
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    assert list(t.pair_stats) == ["eval"] and t.pair_stats["eval"].prompts == 2
    assert len(t.eval_dataset) == t.pair_stats["eval"].kept > 0


def test_clear_errors_before_generation(tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama")
    counter = CountingGenerate(model)
    wrong = HeadScores({"5-1": [0.9]}, num_layers=30, num_heads=9)
    with pytest.raises(ValueError, match="another model"):
        RetMaskTrainer(
            model=model,
            args=config(tmp_path),
            train_dataset=prompts(),
            processing_class=tiny_tokenizer,
            head_scores=wrong,
        )
    with pytest.raises(
        ValueError,
        match=r"^Head scores were given twice \(the `head_scores` argument and "
        r"`args.head_scores`\); keep one\.$",
    ):
        RetMaskTrainer(
            model=model,
            args=config(tmp_path, head_scores="x.json"),
            train_dataset=prompts(),
            processing_class=tiny_tokenizer,
            head_scores=SCORES,
        )
    with pytest.raises(ValueError, match="No head scores given and no model name to find them by"):
        RetMaskTrainer(model=model, args=config(tmp_path), train_dataset=prompts(), processing_class=tiny_tokenizer)
    model.config._name_or_path = "org/unknown"  # the scores are looked up by the policy's own name
    with pytest.raises(ValueError, match="No head scores given, and none found for the model 'org/unknown'"):
        RetMaskTrainer(model=model, args=config(tmp_path), train_dataset=prompts(), processing_class=tiny_tokenizer)
    with pytest.raises(
        TypeError,
        match=r"`args` must be a RetMaskConfig \(it adds the masking and generation "
        r"settings\), got DPOConfig\. Build it with RetMaskConfig\(",
    ):
        from trl import DPOConfig

        RetMaskTrainer(
            model=model,
            args=DPOConfig(str(tmp_path), bf16=False),
            train_dataset=prompts(),
            processing_class=tiny_tokenizer,
            head_scores=SCORES,
        )
    assert counter.calls == 0
    with pytest.raises(ValueError, match="^`train_dataset` has columns \\['question'\\].*needs a `prompt` column"):
        RetMaskTrainer(
            model=model,
            args=config(tmp_path),
            train_dataset=Dataset.from_dict({"question": ["a"]}),
            processing_class=tiny_tokenizer,
            head_scores=SCORES,
        )
    with pytest.raises(ValueError, match="eval_dataset` has columns"):
        RetMaskTrainer(
            model=model,
            args=config(tmp_path),
            train_dataset=prompts(),
            eval_dataset=Dataset.from_dict({"text": ["a"]}),
            processing_class=tiny_tokenizer,
            head_scores=SCORES,
        )
    with pytest.raises(
        ValueError,
        match=r"^`train_dataset` is required: prompts \(`\{'prompt': \.\.\.\}`\) or "
        r"preference pairs\.$",
    ):
        RetMaskTrainer(model=model, args=config(tmp_path), processing_class=tiny_tokenizer, head_scores=SCORES)
    assert counter.calls == 0


def test_default_output_dir_is_named_after_the_model(tiny_tokenizer, tmp_path, monkeypatch):
    """Without `args`, the run is "<last part of the model's name>-RetMask" in the working directory, as TRL names
    its default output directories."""
    monkeypatch.chdir(tmp_path)
    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "org" / "tiny-llamaX")
    tiny_tokenizer.save_pretrained(tmp_path / "org" / "tiny-llamaX")

    def output_dir(m):
        return RetMaskTrainer(
            model=m, train_dataset=PREFS, processing_class=tiny_tokenizer, head_scores=SCORES
        ).args.output_dir

    assert output_dir("org/tiny-llamaX/") == "tiny-llamaX-RetMask"  # a path given as a string, trailing slash
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert output_dir(model) == "SmolLM2-135M-Instruct-RetMask"  # a model instance: its config's name
    model.config._name_or_path = ""
    assert output_dir(model) == "model-RetMask"  # built in memory, no name


def test_all_pairs_dropped_is_an_error(tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama")
    # With one new token, masking these heads leaves this model's answer unchanged: every pair is identical.
    one = independent(model, tiny_tokenizer, "the man said", max_new_tokens=1)
    assert one == independent(model, tiny_tokenizer, "the man said", [(2, 3)], max_new_tokens=1)
    scores = HeadScores({"2-3": [0.9]}, num_layers=3, num_heads=4)
    with pytest.raises(ValueError, match=r"All 1 generated pairs of the train dataset were dropped \(1 identical"):
        RetMaskTrainer(
            model=model,
            args=config(tmp_path, max_new_tokens=1),
            train_dataset=prompts(["the man said"]),
            processing_class=tiny_tokenizer,
            head_scores=scores,
        )


def test_cpu_defaults_and_liger(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU policy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = RetMaskConfig(str(tmp_path), report_to="none")
    assert args.bf16 is False and args.gradient_checkpointing is False
    assert any("No GPU found" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:  # explicit values are kept, and only the unset one is named
        warnings.simplefilter("always")
        args = RetMaskConfig(str(tmp_path), report_to="none", activation_checkpointing=True)
    assert args.gradient_checkpointing is True and args.bf16 is False
    messages = [str(w.message) for w in caught if "No GPU found" in str(w.message)]
    assert len(messages) == 1 and "bf16=False" in messages[0] and "gradient_checkpointing=False" not in messages[0]
    args = RetMaskConfig(str(tmp_path), report_to="none", bf16=True, use_cpu=True, gradient_checkpointing=False)
    assert args.bf16 is True and args.gradient_checkpointing is False


# ------------------------------------------------------------------------- Liger (liger-kernel's own API)
def liger_stand_in(monkeypatch) -> list:
    """A `liger_kernel` package in sys.modules whose `_apply_liger_kernel_to_instance` records its calls."""
    import importlib.machinery
    import types

    calls = []
    package = types.ModuleType("liger_kernel")
    package.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None, is_package=True)
    transformers_module = types.ModuleType("liger_kernel.transformers")
    transformers_module._apply_liger_kernel_to_instance = lambda model, **kwargs: calls.append((model, kwargs))
    package.transformers = transformers_module
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers_module)
    return calls


def test_liger_is_refused_without_cuda_and_trls_flag_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"`use_liger_kernel` is deprecated by TRL.*liger_kernels=True"):
        RetMaskConfig(str(tmp_path), report_to="none", use_liger_kernel=True)
    liger_stand_in(monkeypatch)  # installed, so the next refusal is the real one: no CUDA here
    if torch.cuda.is_available():
        pytest.skip("the refusal is for CUDA-less machines")
    with pytest.raises(ValueError, match="`liger_kernels=True` needs CUDA"):
        RetMaskConfig(str(tmp_path), report_to="none", liger_kernels=True)


def test_liger_without_the_package_names_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"pip install 'trl_retmask\[liger\]'"):
        RetMaskConfig(str(tmp_path), report_to="none", liger_kernels=True)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_liger_kernels_patch_the_policy_through_liger_kernel(peft, tiny_tokenizer, tmp_path, monkeypatch):
    """The trainer hands the policy (the base model under PEFT) to liger-kernel's own instance patcher, with its
    fused cross-entropy off (TRL's fused LM head owns the forward) and `liger_kernel_config` passed through; TRL's
    deprecated flag stays off."""
    from peft import LoraConfig, get_peft_model

    calls = liger_stand_in(monkeypatch)
    args = config(tmp_path, liger_kernel_config={"rope": False})
    args.liger_kernels = True  # set after construction: the config refuses it on this CUDA-less machine
    model = make_tiny_model("llama")
    policy = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")) if peft else model
    trainer = RetMaskTrainer(
        model=policy, args=args, train_dataset=PREFS, processing_class=tiny_tokenizer, head_scores=SCORES
    )
    assert (
        len(calls) == 1 and calls[0][0] is model and calls[0][1] == {"rope": False, "fused_linear_cross_entropy": False}
    )
    assert trainer.args.use_liger_kernel is False
    with pytest.raises(ValueError, match="fused_linear_cross_entropy"):
        from trl_retmask.liger import apply_liger_kernels

        apply_liger_kernels(model, {"fused_linear_cross_entropy": True})


def test_online_retmask_is_refused_under_fsdp(tmp_path, monkeypatch):
    """Ranks generate different numbers of tokens; FSDP's all-gathers inside `generate` would hang."""
    with pytest.raises(ValueError, match="cannot run under FSDP"):
        RetMaskConfig(str(tmp_path), report_to="none", regenerate_pairs_steps=2, fsdp=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(ValueError, match="cannot run under FSDP"):
        RetMaskConfig(str(tmp_path), report_to="none", regenerate_pairs_each_epoch=True)
    assert RetMaskConfig(str(tmp_path), report_to="none").regenerate_pairs_steps is None  # offline: fine


def test_generation_kwargs_given_as_json_become_a_dict(tmp_path):
    args = RetMaskConfig(str(tmp_path), report_to="none", generation_kwargs='{"repetition_penalty": 1.1}')
    assert args.generation_kwargs == {"repetition_penalty": 1.1}
    assert args.generation_settings["generation_kwargs"]["repetition_penalty"] == 1.1


@pytest.mark.real_model
def test_real_model_one_step_with_bundled_scores(smollm2, tmp_path):
    """No head scores passed: the file bundled for the policy's own name (SmolLM2-135M-Instruct) is used."""
    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    chats = Dataset.from_dict(
        {
            "prompt": [
                [{"role": "user", "content": "What is the capital of France?"}],
                [{"role": "user", "content": "Name a colour of the sky."}],
            ]
        }
    )
    args = config(
        tmp_path,
        max_steps=1,
        max_new_tokens=4,
        temperature=0.6,
        mask_top_k=20,
        learning_rate=1e-6,
        cache_pairs=False,
        max_length=64,
    )
    trainer = RetMaskTrainer(model=model, args=args, train_dataset=chats, processing_class=tokenizer)
    assert trainer.masked_heads == HeadScores.from_pretrained("SmolLM2-135M-Instruct").select(top_k=20)
    trainer.train()
    assert math.isfinite(next(h["loss"] for h in trainer.state.log_history if "loss" in h))


def test_online_mode_regenerates_pairs_from_the_current_policy(tiny_tokenizer, tmp_path):
    from transformers import TrainerCallback

    snapshots = {}

    class Snapshot(TrainerCallback):  # runs before the trainer's own regeneration callback
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    model = make_tiny_model("llama")
    counter = CountingGenerate(model)
    trainer = RetMaskTrainer(
        model=model,
        args=config(tmp_path, regenerate_pairs_steps=2, learning_rate=2e-2),
        train_dataset=prompts(),
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
        callbacks=[Snapshot()],
    )
    initial_chosen = list(trainer.train_dataset.current["chosen"])
    assert counter.calls == 2
    trainer.train()
    assert counter.calls == 4, "one regeneration, at step 2 (none after the last step)"
    assert [h["step"] for h in trainer.pair_stats_history] == [2]

    # The regenerated pairs are exactly what the policy at step 2 generates, with and without the mask.
    policy = make_tiny_model("llama")
    policy.load_state_dict(snapshots[2])
    current = trainer.train_dataset.current
    assert len(current) == trainer.pair_stats["train"].kept
    for row in current:
        assert row["chosen"] == independent(policy, tiny_tokenizer, row["prompt"]) + "</s>"
        assert row["rejected"] == independent(policy, tiny_tokenizer, row["prompt"], HEADS) + "</s>"
    assert list(current["chosen"]) != initial_chosen, "the policy moved, so its answers (and the pairs) changed"
    assert any("pairs/train/kept" in h and h.get("step") == 2 for h in trainer.state.log_history)
    with pytest.raises(
        ValueError,
        match=r"^Online RetMask regenerates pairs from prompts: `train_dataset` must be "
        r"prompt-only \(`\{'prompt': \.\.\.\}` without chosen/rejected\)\.$",
    ):
        RetMaskTrainer(
            model=make_tiny_model("llama"),
            args=config(tmp_path, regenerate_pairs_each_epoch=True),
            train_dataset=Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}),
            processing_class=tiny_tokenizer,
            head_scores=SCORES,
        )


def test_group_by_length_sorts_by_prompt_plus_longer_completion(tiny_tokenizer, tmp_path):
    """`train_sampling_strategy="group_by_length"` works on DPO rows: transformers' length-grouped sampler gets each
    row's prompt + longer completion tokens (counted here with the tokenizer), and its groups come out sorted."""
    n_rows = 24
    prompts = [" ".join(["the man said"] * (1 + (7 * i) % 11)) for i in range(n_rows)]
    chosen = [" yes" * (1 + i % 3) for i in range(n_rows)]
    rejected = [" no" * (1 + (i + 1) % 4) for i in range(n_rows)]
    prefs = Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})
    args = config(
        tmp_path,
        max_steps=1,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=1,
        train_sampling_strategy="group_by_length",
    )
    trainer = RetMaskTrainer(
        model=make_tiny_model("llama"),
        args=args,
        train_dataset=prefs,
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    sampler = trainer._get_train_sampler()
    order = list(sampler)
    assert sorted(order) == list(range(n_rows))

    def n(text):
        return len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])

    bos = len(tiny_tokenizer("x")["input_ids"]) - n("x")  # special tokens the prompt gets
    eos = 1  # TRL appends EOS to each completion
    lengths = [bos + n(prompts[i]) + max(n(chosen[i]), n(rejected[i])) + eos for i in range(n_rows)]
    assert len(set(lengths)) > 3 and sampler.lengths == lengths
    mega = min(n_rows // (3 * 4), 50) * 3  # transformers' megabatch (6 rows here), each sorted longest first;
    for start in range(0, n_rows, mega):  # the overall longest row is swapped to the front, so skip the heads
        chunk = [lengths[i] for i in order[start + 1 : start + mega]]
        assert chunk == sorted(chunk, reverse=True)
    assert lengths[order[0]] == max(lengths)
    trainer.train()  # the grouped order feeds a real step
    trainer.args.train_sampling_strategy = "random"  # the default: transformers' own sampler, not ours
    assert isinstance(trainer._get_train_sampler(), torch.utils.data.RandomSampler)


def test_online_mode_refuses_length_grouping(tmp_path):
    """Regenerated pairs replace the rows in place, so lengths measured at the start would be stale: refused early."""
    with pytest.raises(ValueError, match="group_by_length|lengths measured at the start"):
        config(tmp_path, regenerate_pairs_steps=2, train_sampling_strategy="group_by_length")
    assert config(tmp_path, regenerate_pairs_steps=2).online


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mask_strategy": "best"}, "mask_strategy"),
        ({"mask_threshold": 0.0}, "mask_threshold"),
        ({"mask_threshold": float("nan")}, "mask_threshold"),
        ({"mask_top_k": 2.5}, "mask_top_k"),
        ({"mask_top_k": True}, "mask_top_k"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 8.0}, "max_new_tokens"),
        ({"generation_batch_size": 0}, "generation_batch_size"),
        ({"generation_seed": 1.5}, "generation_seed"),
        ({"regenerate_pairs_steps": 0}, "regenerate_pairs_steps"),
        ({"max_prompt_length": 0}, "max_prompt_length"),
        ({"truncation_mode": "keep_end"}, r"deprecated by TRL.*truncation_side=\"left\""),  # before TRL's FutureWarning
        ({"truncation_side": "middle"}, "`truncation_side` must be one of left, right"),
        ({"keep_reasoning": "yes"}, "keep_reasoning"),
        ({"max_length": 1}, "max_length"),
        ({"cache_pairs": "yes"}, "cache_pairs"),
        ({"generation_kwargs": ["top_k"]}, "generation_kwargs"),
        ({"generation_kwargs": {"max_new_tokens": 5}}, "field of its own"),  # failed after loading ("multiple values")
        ({"generation_kwargs": {"top_k": 5}}, "field of its own"),
        ({"generation_kwargs": {"num_return_sequences": 2}}, "one sequence per prompt"),
        ({"generation_kwargs": {"repetiton_penalty": 1.1}}, "not fields of transformers.GenerationConfig"),
        ({"beta": float("nan")}, "`beta` must be a finite number"),  # DPOConfig's own floats: NaN trained to NaN
        ({"learning_rate": float("inf")}, "`learning_rate` must be a finite number"),
    ],
)
def test_config_refuses_non_finite_and_wrong_types(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kwargs)


def test_config_is_one_vocabulary_with_the_selection_arguments(tmp_path):
    from trl import TrlParser

    from trl_retmask.heads import HeadSelectionArguments

    assert issubclass(RetMaskConfig, HeadSelectionArguments)
    (args,) = TrlParser((RetMaskConfig,)).parse_args_and_config(
        [
            "--output_dir",
            str(tmp_path),
            "--mask_top_k",
            "7",
            "--mask_strategy",
            "random",
            "--report_to",
            "none",
            "--max_prompt_length",
            "512",
            "--loss_type",
            "sigmoid",
        ]
    )
    assert args.selection == {"threshold": None, "top_k": 7, "strategy": "random", "seed": 0}
    assert args.max_prompt_length == 512 and args.loss_type == ["sigmoid"]  # DPOConfig.__post_init__ ran
    assert RetMaskConfig(str(tmp_path)).output_dir == str(tmp_path)  # positional output_dir, as in TRL
    help_text = TrlParser((RetMaskConfig,)).format_help()
    assert "Mask the k highest-scoring heads" in help_text and "{retrieval,random_non_retrieval,random}" in help_text


# ------------------------------------------------------------------------------- DPO truncation (TRL 0.24 parity)
def trl024_kept(prompt_ids, completion_ids, max_prompt_length, max_length):
    """What TRL 0.24 trains on (independent of TRL 1.x): `tokenize_row` keeps the prompt's last max_prompt_length
    tokens; `concatenated_forward` with truncation_mode="keep_end" keeps the sequence's last max_length tokens."""
    prompt = prompt_ids[len(prompt_ids) - max_prompt_length :] if len(prompt_ids) > max_prompt_length else prompt_ids
    sequence = prompt + completion_ids
    loss_mask = [0] * len(prompt) + [1] * len(completion_ids)
    start = max(0, len(sequence) - max_length)
    return sequence[start:], loss_mask[start:]


@pytest.mark.parametrize("pad_to_multiple_of", [None, 3])
def test_truncation_reproduces_trl_024_keep_end(pad_to_multiple_of, tiny_tokenizer, tmp_path):
    """RetMaskConfig's defaults cut as TRL 0.24 did, without TRL's deprecated keep_end (no FutureWarning)."""
    words = "the man said tell me a story about the sea how many boys went to school".split()
    rows = [(12, 2), (3, 9), (9, 7), (2, 2), (15, 1)]  # (prompt words, completion words): long and short of each
    prefs = Dataset.from_dict(
        {
            "prompt": [" ".join(words[:p]) for p, _ in rows],
            "chosen": [" " + " ".join(words[-c:]) for _, c in rows],
            "rejected": [" " + " ".join(words[:c]) for _, c in rows],
        }
    )
    max_prompt_length, max_length = 5, 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = config(
            tmp_path, max_prompt_length=max_prompt_length, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of
        )  # truncation_side="left", the default
    trainer = RetMaskTrainer(
        model=make_tiny_model("llama"),
        args=args,
        train_dataset=prefs,
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    assert len(trainer.train_dataset) == len(rows), "no row dropped"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    assert batch["input_ids"].shape[1] == (9 if pad_to_multiple_of else max_length)  # the longest rows fill it
    eos = [tiny_tokenizer.eos_token_id]
    for i, row in enumerate(prefs):
        prompt_ids = tiny_tokenizer(row["prompt"])["input_ids"]
        for half, role in enumerate(("chosen", "rejected")):
            full = tiny_tokenizer(row["prompt"] + row[role])["input_ids"]
            assert full[: len(prompt_ids)] == prompt_ids  # the tiny tokenizer splits on spaces: a clean boundary
            expected_ids, expected_mask = trl024_kept(
                prompt_ids, full[len(prompt_ids) :] + eos, max_prompt_length, max_length
            )
            r = half * len(rows) + i
            n = int(batch["attention_mask"][r].sum())
            assert batch["input_ids"][r][:n].tolist() == expected_ids, (i, role)
            assert batch["completion_mask"][r][:n].tolist() == expected_mask, (i, role)


def test_a_users_collator_is_wrapped_with_the_same_truncation(tiny_tokenizer, tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    seen, inner = [], DataCollatorForPreference(pad_token_id=tiny_tokenizer.pad_token_id)

    def collator(examples):
        seen.append([e["prompt_ids"] for e in examples])
        return inner(examples)

    prefs = Dataset.from_dict(
        {"prompt": ["the man said tell me"], "chosen": [" a story about the sea"], "rejected": [" no"]}
    )
    trainer = RetMaskTrainer(
        model=make_tiny_model("llama"),
        args=config(tmp_path, max_prompt_length=2, max_length=4),
        train_dataset=prefs,
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
        data_collator=collator,
    )
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    assert seen == [[row["prompt_ids"][-2:]]]  # prompts cut before the user's collator
    chosen = row["prompt_ids"][-2:] + row["chosen_ids"]
    assert batch["input_ids"][0].tolist() == chosen[-4:]  # sequences cut after it, keeping their end


def test_long_prompts_are_truncated_not_dropped_under_keep_start(tiny_tokenizer, tmp_path):
    long_prompt = " ".join(["the man said"] * 6)  # 18 words: fills max_length=10 alone
    prefs = Dataset.from_dict(
        {"prompt": [long_prompt, "the man"], "chosen": [" yes", " yes"], "rejected": [" no", " no"]}
    )
    trainer = RetMaskTrainer(
        model=make_tiny_model("llama"),
        args=config(tmp_path, max_length=10, truncation_side="right"),
        train_dataset=prefs,
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    assert len(trainer.train_dataset) == 2  # TRL alone drops the first row
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    prompt_ids = tiny_tokenizer(long_prompt)["input_ids"]
    eos = [tiny_tokenizer.eos_token_id]
    kept = prompt_ids[-5:] + tiny_tokenizer(" yes")["input_ids"] + eos  # its last max_length // 2 tokens, then yes
    assert batch["input_ids"][0][: len(kept)].tolist() == kept and int(batch["attention_mask"][0].sum()) == len(kept)
    short = tiny_tokenizer("the man yes")["input_ids"] + eos  # short: untouched
    assert batch["input_ids"][1][: len(short)].tolist() == short
    assert truncate_prompt(list(range(20)), 12, 10, "right") == list(range(15, 20))
    assert truncate_prompt(list(range(20)), 12, 10, "left") == list(range(8, 20))
    assert truncate_prompt(list(range(20)), None, None) == list(range(20))


def test_pair_statistics_logged_once_at_info(tiny_tokenizer, tmp_path, caplog):
    import logging

    def messages():
        caplog.clear()
        with caplog.at_level(logging.INFO):
            trainer = RetMaskTrainer(
                model=make_tiny_model("llama"),
                args=config(tmp_path),
                train_dataset=prompts(),
                processing_class=tiny_tokenizer,
                head_scores=SCORES,
            )
        records = [r for r in caplog.records if r.name.startswith("trl_retmask") and "pairs" in r.getMessage()]
        assert all(r.name == "trl_retmask.trainer" for r in records)  # one line, from the trainer (main process)
        assert all(r.levelno == logging.INFO for r in records)
        return [r.getMessage() for r in records], trainer.pair_stats["train"]

    # The line a user reads: every statistic, and whether the pairs were generated or read from the cache.
    (first,), s = messages()
    assert first == (
        f"RetMask train pairs: kept {s.kept} of 4 (dropped {s.dropped_identical} identical, 0 empty); "
        f"mean chosen/rejected tokens {s.mean_chosen_tokens:.1f}/{s.mean_rejected_tokens:.1f}; "
        f"{s.tokens_per_second:.1f} generated tokens/s"
    )
    (again,), s = messages()
    assert again.startswith(f"RetMask train pairs: kept {s.kept} of 4") and again.endswith(" (from cache)")


# ------------------------------------------------------------------ mutation-tested edges (docs/testing.md)
def test_truncate_prompt_boundaries():
    ids = list(range(10))
    assert truncate_prompt(ids, 10, None) == ids  # exactly max_prompt_length: kept whole
    assert truncate_prompt(ids, 9, None) == ids[1:]
    assert truncate_prompt(ids, None, 11, "right") == ids  # one short of filling max_length: kept
    assert truncate_prompt(ids, None, 10, "right") == ids[5:]  # fills max_length: its last max_length // 2
    assert truncate_prompt(ids, None, 7, "right") == ids[7:]  # 7 // 2 = 3 tokens
    assert truncate_prompt(ids, None, 10, "left") == ids  # keep_end never drops a row in TRL
    assert truncate_prompt(ids, 8, 8, "right") == ids[6:]  # both limits apply, in order
    assert truncate_prompt(ids, None, 10) == ids  # the default side, left (the authors' keep_end)


def test_online_regeneration_schedule():
    from types import SimpleNamespace

    from trl_retmask.trainer_callbacks import OnlineRegeneration

    calls = []
    trainer = SimpleNamespace(regenerate_train_pairs=calls.append)
    every2 = SimpleNamespace(regenerate_pairs_steps=2, regenerate_pairs_each_epoch=False)
    cb = OnlineRegeneration(trainer)
    for step in range(1, 7):
        cb.on_step_end(every2, SimpleNamespace(global_step=step, max_steps=6), None)
    assert calls == [2, 4]  # not at the last step: nothing would train on those pairs
    calls.clear()
    never = SimpleNamespace(regenerate_pairs_steps=None, regenerate_pairs_each_epoch=False)
    cb.on_step_end(never, SimpleNamespace(global_step=2, max_steps=6), None)
    epochs = SimpleNamespace(regenerate_pairs_steps=None, regenerate_pairs_each_epoch=True)
    cb = OnlineRegeneration(trainer)
    for step in (0, 3, 6):  # epochs begin at steps 0, 3, 6: the first has fresh pairs already
        cb.on_epoch_begin(epochs, SimpleNamespace(global_step=step), None)
    assert calls == [3, 6]
    calls.clear()
    cb = OnlineRegeneration(trainer)
    for step in (0, 3):
        cb.on_epoch_begin(never, SimpleNamespace(global_step=step), None)
    assert calls == [] and cb.epochs_begun == 2


def test_online_pairs_view_keeps_its_length():
    from trl_retmask.trainer_callbacks import OnlinePairs

    view = OnlinePairs(["a", "b", "c"])
    assert len(view) == 3 and [view[i] for i in range(3)] == ["a", "b", "c"]
    view.current = ["x", "y"]  # a regeneration that kept fewer pairs
    assert len(view) == 3 and [view[i] for i in range(3)] == ["x", "y", "x"]


def test_pair_statistics_callback_logs_each_split_once():
    from types import SimpleNamespace

    from trl_retmask.pairs import PairStats
    from trl_retmask.trainer_callbacks import LogPairStats

    logged = []
    trainer = SimpleNamespace(pair_stats={}, log=logged.append)
    cb = LogPairStats(trainer)
    cb.on_train_begin(None, None, None)
    assert logged == [] and not cb.logged  # nothing yet: a later call may still log
    trainer.pair_stats = {"train": PairStats(kept=3), "eval": PairStats(kept=1)}
    cb.on_train_begin(None, None, None)
    cb.on_train_begin(None, None, None)
    assert len(logged) == 1 and logged[0]["pairs/train/kept"] == 3.0 and logged[0]["pairs/eval/kept"] == 1.0
    assert len(logged[0]) == 2 * len(PairStats().to_dict())


def test_dataset_shapes_and_cache_location(tmp_path):

    from datasets import IterableDataset

    from trl_retmask.trainer_data import check_columns, eval_splits

    ds = prompts()
    assert eval_splits(None) == {} and eval_splits(ds) == {"eval_dataset": ds}
    assert eval_splits({"a": ds}) == {"a": ds}
    check_columns("x", ds)
    check_columns("x", Dataset.from_dict({"chosen": ["a"], "rejected": ["b"]}))
    check_columns("x", IterableDataset.from_generator(lambda: iter([{"prompt": "a"}])))
    for present, missing in (("chosen", "rejected"), ("rejected", "chosen")):  # half a pair: named as such
        with pytest.raises(ValueError, match=f"has a `{present}` column but no `{missing}` column"):
            check_columns("x", Dataset.from_dict({present: ["a"]}))
    for columns in ({"question": ["a"]},):
        with pytest.raises(ValueError) as error:
            check_columns("x", Dataset.from_dict(columns))
        assert str(error.value) == (
            f"`x` has columns {list(columns)}, but RetMask needs a `prompt` column (prompts to complete with pairs) or "
            "`chosen`/`rejected` columns (preference pairs). Rename the prompt column, e.g. "
            "`dataset.rename_column('question', 'prompt')`."
        )

    # The pair cache is decided in one place, the config, with one default for every entry point.
    def cache_dir(**kw):
        return RetMaskConfig(str(tmp_path), report_to="none", bf16=False, **kw).pair_generation_kwargs["cache_dir"]

    assert cache_dir() == str(tmp_path / "_retmask_pairs")  # `_*` is skipped by push_to_hub
    assert cache_dir(pairs_cache_dir="/c") == "/c"
    assert cache_dir(cache_pairs=False, pairs_cache_dir="/c") is None


def test_precomputed_reference_log_probs_are_the_initial_policys_and_live_on_shared_disk(tiny_tokenizer, tmp_path):
    """`precompute_ref_log_probs`: no reference copy is kept, TRL's precomputed log-probs are those of the initial
    (unmasked) policy on each row's tokens, and the pairs they extend are saved under the pair cache (TRL caches the
    log-probs beside the dataset's files, which every process must be able to read)."""
    model = make_tiny_model("llama")
    initial = copy.deepcopy(model).eval()
    trainer = RetMaskTrainer(
        model=model,
        args=config(tmp_path, precompute_ref_log_probs=True, max_steps=2),
        train_dataset=prompts(),
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    assert trainer.ref_model is None
    data = trainer.train_dataset
    files = [Path(f["filename"]) for f in data.cache_files]
    pairs_folder = tmp_path / "out" / "_retmask_pairs"
    assert files and all(pairs_folder in f.parents for f in files), files
    assert len(list(pairs_folder.glob("dataset-*/state.json"))) == 1

    def logp(prompt_ids, completion_ids):  # summed log-probs of the completion tokens, by hand
        ids = torch.tensor([prompt_ids + completion_ids])
        with torch.no_grad():
            lp = initial(ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        return lp[len(prompt_ids) - 1 :].sum().item()

    assert len(data) == trainer.pair_stats["train"].kept > 0
    for row in data:
        assert row["ref_chosen_logps"] == pytest.approx(logp(row["prompt_ids"], row["chosen_ids"]), abs=1e-4)
        assert row["ref_rejected_logps"] == pytest.approx(logp(row["prompt_ids"], row["rejected_ids"]), abs=1e-4)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # reference = the policy at step 0

    # A second trainer on the same pairs reads the saved dataset instead of writing it again.
    (saved,) = pairs_folder.glob("dataset-*/state.json")
    written = saved.stat().st_mtime_ns
    again = RetMaskTrainer(
        model=copy.deepcopy(initial),
        args=config(tmp_path, precompute_ref_log_probs=True),
        train_dataset=prompts(),
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    assert [Path(f["filename"]).parent for f in again.train_dataset.cache_files][0] == files[0].parent
    assert again.train_dataset["ref_chosen_logps"] == pytest.approx(data["ref_chosen_logps"], abs=1e-6)
    assert saved.stat().st_mtime_ns == written
    # Other pairs (other heads masked) get their own saved dataset, never the first one's rows.
    other = RetMaskTrainer(
        model=copy.deepcopy(initial),
        args=config(tmp_path, precompute_ref_log_probs=True, mask_top_k=1),
        train_dataset=prompts(),
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    assert len(list(pairs_folder.glob("dataset-*/state.json"))) == 2
    assert Path(other.train_dataset.cache_files[0]["filename"]).parent != files[0].parent
    assert other.train_dataset["rejected"] != data["rejected"]


def test_online_regeneration_that_drops_every_pair_keeps_the_previous_pairs(tiny_tokenizer, tmp_path, caplog):
    """A regeneration whose new pairs are all identical (nothing to learn from) must not stop training: the previous
    pairs stay, with a warning, and no regeneration is recorded."""
    trainer = RetMaskTrainer(
        model=make_tiny_model("llama"),
        args=config(tmp_path, regenerate_pairs_steps=2),
        train_dataset=prompts(["the man said"]),
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    before, stats = trainer.train_dataset.current, trainer.pair_stats["train"]
    trainer.masked_heads = [(2, 3)]  # for these prompts, a mask that changes no greedy answer within 1 token
    trainer.args.max_new_tokens = 1
    assert independent(trainer.model, tiny_tokenizer, "the man said", max_new_tokens=1) == independent(
        trainer.model, tiny_tokenizer, "the man said", [(2, 3)], max_new_tokens=1
    )
    with caplog.at_level("WARNING", logger="trl_retmask.trainer"):
        trainer.regenerate_train_pairs(2)
    assert trainer.train_dataset.current is before and trainer.pair_stats["train"] is stats
    assert trainer.pair_stats_history == []
    assert any(
        r.getMessage().startswith(
            "Online RetMask at step 2 kept the previous pairs: All 1 generated pairs "
            "of the train@2 dataset were dropped"
        )
        for r in caplog.records
    )

    trainer.masked_heads = list(HEADS)  # and a regeneration that keeps pairs replaces them
    trainer.args.max_new_tokens = 6
    trainer.regenerate_train_pairs(3)
    assert trainer.train_dataset.current is not before and [h["step"] for h in trainer.pair_stats_history] == [3]
    assert len(trainer.train_dataset) == len(before)  # the dataloader's view keeps its length
    counter = CountingGenerate(trainer.model)
    again = trainer.train_dataset.current
    trainer.regenerate_train_pairs(3)  # same policy, same step (a resumed run): read back from the pair cache
    assert counter.calls == 0 and trainer.pair_stats["train"].batches_from_cache == 1
    assert trainer.train_dataset.current["chosen"] == again["chosen"]


@pytest.mark.parametrize("learning_rate,regenerated", [(2e-2, [2]), (2e-3, [])])
def test_online_regeneration_restores_checkpointing_with_the_users_kwargs(
    tiny_tokenizer, tmp_path, learning_rate, regenerated
):
    """Generation runs with activation checkpointing off (TRL's `unwrap_model_for_generation`); afterwards it is back
    on with the user's kwargs (not transformers' default `use_reentrant=False`), also after a regeneration whose
    pairs were all dropped (at this learning rate the policy's answers no longer change under the mask): TRL's
    context manager does not restore checkpointing when its body raises, so that error must not cross it."""
    probe = CheckpointingProbe()
    trainer = RetMaskTrainer(
        model=make_tiny_model("llama"),
        args=config(
            tmp_path,
            regenerate_pairs_steps=2,
            max_steps=3,
            learning_rate=learning_rate,
            activation_checkpointing=True,
            activation_checkpointing_kwargs={"use_reentrant": True},
        ),
        train_dataset=prompts(),
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
        callbacks=[probe],
    )
    trainer.train()
    assert [h["step"] for h in trainer.pair_stats_history] == regenerated
    assert probe.seen == {step: (True, {"use_reentrant": True}) for step in (0, 1, 2)}
