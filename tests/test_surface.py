"""Every public surface with an assertion on its effect: the package root's exports, each
`RetMaskConfig` field RetMask adds, the recipe pipeline's optional paths and the stages run for real, each checked
against an independent computation (a hand-made `model.generate`, `random.Random`, a hand-filtered list).
docs/testing.md maps each surface item to its test."""

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from datasets import Dataset

from tests.recipe_utils import REPO, save_tiny_model, write_chat_log
from tests.test_pairs import CountingGenerate
from tests.tiny import PREFS, make_greedy, make_tiny_model, make_tiny_tokenizer
from trl_retmask import HeadScores, RetMaskConfig, RetMaskTrainer, mask_heads

# Mean scores: 4 heads >= 0.1 (the default threshold), one exactly on the 0.25 boundary used below.
SCORES = HeadScores(
    {"0-1": [0.9, 0.7], "1-2": [0.25], "2-0": [0.3], "0-0": [0.01], "2-3": [0.2499]}, num_layers=3, num_heads=4
)
RETRIEVAL = [(0, 1), (1, 2), (2, 0), (2, 3)]
ALL_HEADS = [(layer, head) for layer in range(3) for head in range(4)]
PROMPTS = ["the secret number is", "tell me a story about the sea", "how many boys went to school ?", "the man said"]


def config(tmp_path, **kw):
    base = dict(
        max_steps=1,
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
        cache_pairs=False,
    )
    return RetMaskConfig(str(tmp_path / "out"), **{**base, **kw})


def chats(texts=PROMPTS):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})


def trainer_for(tokenizer, tmp_path, dataset=None, model=None, **kw):
    return RetMaskTrainer(
        model=model or make_tiny_model("llama"),
        args=config(tmp_path, **kw),
        train_dataset=chats() if dataset is None else dataset,
        processing_class=tokenizer,
        head_scores=SCORES,
    )


def hand(model, tokenizer, text, heads=None, max_new_tokens=6, seed=None, **generate_kwargs):
    """One chat prompt alone through `model.generate` (no package code), under `mask_heads` when `heads`."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad(), mask_heads(model, heads or []):
        out = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=0, **generate_kwargs)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def pairs_of(trainer) -> dict:
    """{prompt text: (chosen, rejected)} of a trainer's generated training pairs."""
    return {
        p[0]["content"]: (c[0]["content"], r[0]["content"])
        for p, c, r in zip(
            trainer.train_dataset["prompt"], trainer.train_dataset["chosen"], trainer.train_dataset["rejected"]
        )
    }


# ------------------------------------------------------------------------------------------------ package root
EXPORTS = {
    "DEFAULT_MODEL": "models",
    "load_model_and_tokenizer": "models",
    "export_masked_model": "masking",
    "head_layout": "layout",
    "mask_heads": "masking",
    "validate_heads": "heads",
    "STRATEGIES": "heads",
    "HeadScores": "scores",
    "HeadSelectionArguments": "heads",
    "resolve_head_scores": "scores",
    "select_heads": "selection",
    "RetMaskConfig": "config",
    "RetMaskTrainer": "trainer",
    "generate_pairs": "pairs",
    "detect_retrieval_heads": "detection",
    "evaluate_niah": "niah",
    "evaluate_long_context": "evaluation",
    "LongContextEvalCallback": "evaluation",
}


def test_every_public_name_imports_through_the_package_root():
    """Each name of `trl_retmask.__all__` resolves through the lazy root, in a fresh interpreter (so the lazy path
    runs), to the object its module defines; the list itself is pinned (a dropped export fails)."""
    code = (
        "import importlib, json, trl_retmask\n"
        f"expected = {EXPORTS!r}\n"
        "assert sorted(trl_retmask.__all__) == sorted(expected), trl_retmask.__all__\n"
        "bad = [n for n, m in expected.items()\n"
        "       if getattr(trl_retmask, n) is not getattr(importlib.import_module('trl_retmask.' + m), n)]\n"
        "ns = {}\n"
        "exec('from trl_retmask import *', ns)\n"
        "print(json.dumps({'bad': bad, 'star': sorted(k for k in ns if not k.startswith('__'))}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"bad": [], "star": sorted(EXPORTS)}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import trl_retmask

        trl_retmask.nope  # noqa: B018


def test_root_helpers_have_their_effect(tiny_tokenizer, tmp_path):
    """The root's small helpers on a tiny model: layout, validation, masking (output changes, then restores) and
    export (exactly the masked heads' o_proj columns are zero)."""
    from trl_retmask import STRATEGIES, export_masked_model, head_layout, validate_heads

    model = make_tiny_model("llama")
    assert head_layout(model) == (3, 4, 16) and STRATEGIES == ("retrieval", "random_non_retrieval", "random")
    assert validate_heads(model, [(2, 3), (0, 1)]) == [(0, 1), (2, 3)]  # sorted
    with pytest.raises(ValueError):
        validate_heads(model, [(3, 0)])  # layer 3 of 3: just outside
    with pytest.raises(ValueError):
        validate_heads(model, [(0, 4)])
    x = torch.tensor([[1, 10, 11, 12]])
    with torch.no_grad():
        plain = model(x).logits
        with mask_heads(model, [(0, 1)]):
            masked = model(x).logits
        assert torch.equal(model(x).logits, plain)
    assert not torch.allclose(plain, masked)
    export_masked_model(model, [(1, 2)], tmp_path / "exported", tokenizer=tiny_tokenizer)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    for layer in range(3):
        w, w0 = exported.model.layers[layer].self_attn.o_proj.weight, model.model.layers[layer].self_attn.o_proj.weight
        zero = torch.zeros_like(w)
        for head in range(4):
            cols = slice(16 * head, 16 * head + 16)
            assert torch.equal(w[:, cols], zero[:, cols] if (layer, head) == (1, 2) else w0[:, cols]), (layer, head)


# ------------------------------------------------------------------------------------------ head selection fields
@pytest.mark.parametrize("strategy", ["random", "random_non_retrieval"])
def test_mask_seed_draws_as_random_random_over_the_pool(strategy, tiny_tokenizer, tmp_path):
    pool = ALL_HEADS if strategy == "random" else sorted(set(ALL_HEADS) - set(RETRIEVAL))
    expected = {seed: sorted(random.Random(seed).sample(pool, len(RETRIEVAL))) for seed in (0, 1, 7)}
    assert len({tuple(v) for v in expected.values()}) == 3  # the seeds do draw differently: the test can fail
    for seed, heads in expected.items():
        trainer = trainer_for(tiny_tokenizer, tmp_path, PREFS, mask_strategy=strategy, mask_seed=seed)
        assert trainer.masked_heads == heads, seed
        assert trainer.retmask_info["selection"]["seed"] == seed


def test_mask_threshold_includes_a_head_exactly_on_it(tiny_tokenizer, tmp_path):
    means = {h: sum(v) / len(v) for h, v in SCORES.scores.items()}
    assert means[(1, 2)] == 0.25 and means[(2, 3)] < 0.25
    for threshold in (0.25, 0.3, 0.8):
        trainer = trainer_for(tiny_tokenizer, tmp_path, PREFS, mask_threshold=threshold)
        assert trainer.masked_heads == sorted(h for h, m in means.items() if m >= threshold), threshold
    assert trainer_for(tiny_tokenizer, tmp_path, PREFS, mask_threshold=0.25).masked_heads == [(0, 1), (1, 2), (2, 0)]
    assert trainer_for(tiny_tokenizer, tmp_path, PREFS).masked_heads == RETRIEVAL  # default 0.1
    # mask_top_k replaces the threshold: the k best
    assert trainer_for(tiny_tokenizer, tmp_path, PREFS, mask_top_k=2).masked_heads == [(0, 1), (2, 0)]


# ---------------------------------------------------------------------------------------------- generation fields
def test_generation_kwargs_dict_json_and_field_reach_generate(tiny_tokenizer, tmp_path):
    """`generation_kwargs` (a dict or the CLI's JSON string) and the `repetition_penalty` field reach
    `model.generate`: greedy pairs equal a hand call with the penalty, and differ from plain greedy ones."""
    model = make_tiny_model("llama")
    expected = {
        p: (
            hand(model, tiny_tokenizer, p, repetition_penalty=10.0),
            hand(model, tiny_tokenizer, p, RETRIEVAL, repetition_penalty=10.0),
        )
        for p in PROMPTS
    }
    plain = {p: (hand(model, tiny_tokenizer, p), hand(model, tiny_tokenizer, p, RETRIEVAL)) for p in PROMPTS}
    assert expected != plain  # the penalty changes greedy decoding here: the test can fail
    for kw in (
        {"generation_kwargs": {"repetition_penalty": 10.0}},
        {"generation_kwargs": '{"repetition_penalty": 10.0}'},
        {"repetition_penalty": 10.0},
    ):
        got = pairs_of(trainer_for(tiny_tokenizer, tmp_path, model=model, **kw))
        assert got == {p: pair for p, pair in expected.items() if pair[0].strip() != pair[1].strip()}, kw


def test_generation_seed_seeds_each_decode_as_documented(tiny_tokenizer, tmp_path):
    """Sampled pairs equal hand-seeded `generate` calls: batch 0's chosen rows use seed * 1_000_003 and its rejected
    rows seed * 1_000_003 + 1 (pairs.generate_pairs); `generation_seed` defaults to `seed`."""
    model = make_tiny_model("llama")
    prompt = PROMPTS[1]
    sample = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8)  # top_k None -> off (vLLM)

    def expected(seed):
        base = seed * 1_000_003
        return (
            hand(model, tiny_tokenizer, prompt, seed=base, **sample),
            hand(model, tiny_tokenizer, prompt, RETRIEVAL, seed=base + 1, **sample),
        )

    assert expected(3) != expected(4)
    for kw, seed in (({"generation_seed": 3}, 3), ({"generation_seed": 4, "seed": 3}, 4), ({"seed": 3}, 3)):
        trainer = trainer_for(
            tiny_tokenizer, tmp_path, chats([prompt]), model=model, temperature=1.0, max_new_tokens=8, **kw
        )
        assert trainer.args.generation_seed == seed
        assert pairs_of(trainer) == {prompt: expected(seed)}, kw


@pytest.mark.parametrize("cut", [{"top_k": 1}, {"top_k": 0, "top_p": 1e-6}], ids=["top_k=1", "tiny_top_p"])
def test_top_k_and_top_p_cut_the_sampled_distribution(cut, tiny_tokenizer, tmp_path):
    """top_k=1 (or a top_p so small that only the most likely token survives) makes sampling at T=1 the argmax:
    the pairs equal hand greedy ones; without the cut, sampling at T=1 gives other pairs."""
    model = make_tiny_model("llama")
    greedy = {p: (hand(model, tiny_tokenizer, p), hand(model, tiny_tokenizer, p, RETRIEVAL)) for p in PROMPTS}
    greedy = {p: pair for p, pair in greedy.items() if pair[0].strip() != pair[1].strip()}
    assert pairs_of(trainer_for(tiny_tokenizer, tmp_path, model=model, temperature=1.0, **cut)) == greedy
    uncut = pairs_of(trainer_for(tiny_tokenizer, tmp_path, model=model, temperature=1.0, top_k=0, top_p=1.0))
    assert uncut != greedy


@pytest.mark.parametrize("batch_size,rows", [(4, [4, 4]), (3, [3, 3, 2]), (8, [8]), (7, [7, 1])])
def test_generation_batch_size_splits_the_prompts(batch_size, rows, tiny_tokenizer, tmp_path):
    """Exact multiples give full batches only (8 = 2 x 4, 1 x 8); otherwise the last batch holds the rest."""
    model = make_tiny_model("llama")
    calls = []
    inner = model.generate

    def counting(*a, **kw):
        calls.append(len(kw["input_ids"]))
        return inner(*a, **kw)

    model.generate = counting
    trainer = trainer_for(
        tiny_tokenizer, tmp_path, chats(PROMPTS * 2), model=model, generation_batch_size=batch_size, temperature=1.0
    )
    assert calls == [n for n in rows for _ in range(2)]  # chosen rows, then rejected rows, per batch
    assert trainer.pair_stats["train"].batches_generated == len(rows)


def test_pairs_cache_dir_is_where_pairs_are_cached(tiny_tokenizer, tmp_path):
    cache = tmp_path / "shared_cache"
    first = trainer_for(tiny_tokenizer, tmp_path / "a", cache_pairs=True, pairs_cache_dir=str(cache))
    assert sorted(p.name for p in cache.rglob("*.meta.json")) == ["chosen.meta.json", "pairs.meta.json"]
    assert not (tmp_path / "a" / "out" / "_retmask_pairs").exists()
    model = make_tiny_model("llama")  # the same weights
    model.generate = lambda *a, **k: pytest.fail("generated although the pairs are cached")
    second = trainer_for(tiny_tokenizer, tmp_path / "b", model=model, cache_pairs=True, pairs_cache_dir=str(cache))
    assert second.pair_stats["train"].batches_from_cache == 1 and pairs_of(second) == pairs_of(first)
    # default: <output_dir>/_retmask_pairs; cache_pairs=False: no files anywhere
    model = make_tiny_model("llama")
    trainer_for(tiny_tokenizer, tmp_path / "c", model=model, cache_pairs=True)
    assert (tmp_path / "c" / "out" / "_retmask_pairs").is_dir()
    trainer_for(tiny_tokenizer, tmp_path / "d", model=model, cache_pairs=False)
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").rglob("*.jsonl"))


def test_generation_backend_static_gives_the_greedy_pairs_of_generate(tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama")
    expected = {p: (hand(model, tiny_tokenizer, p), hand(model, tiny_tokenizer, p, RETRIEVAL)) for p in PROMPTS}
    expected = {p: pair for p, pair in expected.items() if pair[0].strip() != pair[1].strip()}
    for backend in ("generate", "static"):
        assert pairs_of(trainer_for(tiny_tokenizer, tmp_path, model=model, generation_backend=backend)) == expected


# ---------------------------------------------------------------------------------------------- online / eval
def test_regenerate_pairs_each_epoch_regenerates_at_each_later_epoch(tiny_tokenizer, tmp_path, monkeypatch):
    import trl_retmask.trainer as trainer_module

    calls = []
    real = trainer_module.complete_prompt_dataset

    def spy(dataset, model, tokenizer, heads, *, name, **kw):
        calls.append((name, kw["seed"]))
        return real(dataset, model, tokenizer, heads, name=name, **kw)

    monkeypatch.setattr(trainer_module, "complete_prompt_dataset", spy)
    trainer = trainer_for(
        tiny_tokenizer,
        tmp_path,
        max_steps=-1,
        num_train_epochs=3,
        regenerate_pairs_each_epoch=True,
        temperature=1.0,
        generation_seed=5,
    )
    rows = len(trainer.train_dataset)
    steps = math.ceil(rows / 2)  # per epoch: batch 2, no accumulation
    trainer.train()
    assert calls == [("train", 5), (f"train@{steps}", 5 + steps), (f"train@{2 * steps}", 5 + 2 * steps)]
    assert [h["step"] for h in trainer.pair_stats_history] == [steps, 2 * steps]
    assert trainer.state.global_step == 3 * steps and len(trainer.train_dataset) == rows


def test_dict_eval_dataset_completes_each_split_and_first_loss_is_ln2(tiny_tokenizer, tmp_path):
    """Each split of a dict `eval_dataset` gets its own pairs (equal to hand greedy calls) and metrics; before any
    step the policy is its reference, so every DPO loss is exactly ln 2."""
    model = make_tiny_model("llama")
    expected = {p: (hand(model, tiny_tokenizer, p), hand(model, tiny_tokenizer, p, RETRIEVAL)) for p in PROMPTS}
    splits = {"first": chats(PROMPTS[:2]), "last": chats(PROMPTS[2:])}
    trainer = RetMaskTrainer(
        model=model,
        args=config(tmp_path, per_device_eval_batch_size=2),
        train_dataset=chats(),
        eval_dataset=splits,
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    assert set(trainer.pair_stats) == {"train", "eval_first", "eval_last"}
    for name, dataset in trainer.eval_dataset.items():
        kept = [
            p
            for p in (PROMPTS[:2] if name == "first" else PROMPTS[2:])
            if expected[p][0].strip() != expected[p][1].strip()
        ]
        assert len(dataset) == len(kept) == trainer.pair_stats[f"eval_{name}"].kept > 0
    metrics = trainer.evaluate()
    for name in splits:
        assert metrics[f"eval_{name}_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["eval_rewards/margins"] == 0.0  # TRL logs the reward metrics without the split name


def test_first_dpo_step_has_loss_ln2_and_raises_chosen_over_rejected(tiny_tokenizer, tmp_path):
    """A step from the reference: loss ln 2 exactly; after it the chosen-minus-rejected margin is positive."""
    trainer = trainer_for(tiny_tokenizer, tmp_path, max_steps=2, learning_rate=5e-3, per_device_train_batch_size=4)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    margins = [log["rewards/margins"] for log in trainer.state.log_history if "rewards/margins" in log]
    assert margins[0] == pytest.approx(0.0, abs=1e-6) and margins[1] > 0 and losses[1] < losses[0]


# ----------------------------------------------------------------------------------------- evaluation surfaces
def test_masked_long_context_eval_is_generation_under_the_mask(tiny_tokenizer):
    """`evaluate_long_context(heads=...)`'s generations equal hand `generate` calls under `mask_heads`, and differ
    from the unmasked ones (the mask is applied, not only echoed)."""
    from trl_retmask import evaluate_long_context
    from trl_retmask.evaluation import build_suite

    model = make_tiny_model("llama")
    heads = [(0, 1), (1, 2), (2, 0), (2, 3)]
    kw = dict(
        lengths=(256,), categories=["recall"], n_per_task=1, keep_generations=True, progress=False, max_new_tokens=6
    )
    masked = evaluate_long_context(model, tiny_tokenizer, heads=heads, **kw)["generations"]
    plain = evaluate_long_context(model, tiny_tokenizer, **kw)["generations"]
    samples = build_suite(tiny_tokenizer, (256,), ["recall"], 1, 0)
    assert [(g["task"], g["length"]) for g in masked] == [(s["task"], s["length"]) for s in samples]
    for gen_m, gen_p, sample in zip(masked, plain, samples):
        budget = min(sample["max_new_tokens"], 6)
        assert gen_m["output"] == hand(
            model, tiny_tokenizer, sample["prompt"], heads, max_new_tokens=budget, do_sample=False
        )
        assert gen_p["output"] == hand(model, tiny_tokenizer, sample["prompt"], max_new_tokens=budget, do_sample=False)
    assert [g["output"] for g in masked] != [g["output"] for g in plain]


def test_general_ability_masks_the_heads(tiny_tokenizer):
    from trl_retmask.evaluation import general_ability, heldout_perplexity, short_answer_accuracy
    from trl_retmask.evaluation.general import load_short_answer

    model = make_tiny_model("llama")
    heads = [(0, 1), (1, 2)]
    questions = load_short_answer()[:3]
    got = general_ability(model, tiny_tokenizer, heads=heads, max_tokens=300, questions=questions)
    with mask_heads(model, heads):
        ppl = heldout_perplexity(model, tiny_tokenizer, max_tokens=300)
        _, outputs = short_answer_accuracy(model, tiny_tokenizer, questions, return_outputs=True)
    assert got["heldout_ppl"] == pytest.approx(ppl, rel=1e-6)
    assert got["heldout_ppl"] != pytest.approx(heldout_perplexity(model, tiny_tokenizer, max_tokens=300), rel=1e-4)
    assert sum(n for _, n in got["heldout_chunks"]) == 299  # 300 tokens in one window: 299 predicted
    with mask_heads(model, heads):
        acc = short_answer_accuracy(model, tiny_tokenizer, questions)
    assert got["short_answer"] == acc == sum(got["short_answer_correct"]) / 3
    assert len(got["short_answer_correct"]) == 3 and len(outputs) == 3


# ------------------------------------------------------------------------------------------------ recipe paths
def _train_argv(model_dir, data, out, *extra):
    return [
        "--recipe",
        "smollm2",
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--bf16",
        "False",
        "--gradient_checkpointing",
        "False",
        "--max_new_tokens",
        "6",
        "--generation_batch_size",
        "8",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--max_length",
        "64",
        "--report_to",
        "none",
        "--max_steps",
        "1",
        *extra,
    ]


def test_train_pipeline_detects_heads_and_runs_niah_before_and_after(tmp_path, monkeypatch):
    """`detect_heads=True` and `niah_eval=True` (the smollm2 defaults) on a tiny model: the scores are those of a
    hand detection with the recipe's grid, the masked heads their top 2, and the NIAH records are the answers of the
    initial model, the initial model under those heads, and the trained model. (The random tiny model answers no
    bundled needle, so detection counts every answer as correct here: its head scores are then plain copy rates.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl_retmask.detection as detection

    monkeypatch.setattr(detection, "score_answer", lambda reference, response: {"rouge1_recall": 1.0, "correct": True})

    from trl_retmask import detect_retrieval_heads
    from trl_retmask.generation import model_window
    from trl_retmask.niah_samples import build_niah_samples
    from trl_retmask.scripts.train import main, parse_args

    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    argv = _train_argv(
        model_dir,
        write_chat_log(tmp_path / "chat.jsonl"),
        out,
        "--mask_top_k",
        "2",
        "--max_prompts",
        "8",
        "--detect_context_lengths",
        "300",
        "--detect_depths",
        "50",
        "--detect_max_new_tokens",
        "3",
        "--niah_context_lengths",
        "120",
        "--niah_depths",
        "50",
        "--niah_max_new_tokens",
        "4",
    )
    script_args, training_args, model_args = parse_args(argv)
    assert script_args.detect_heads is True and script_args.niah_eval is True  # the recipe's defaults
    summary = main(script_args, training_args, model_args)

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    detected = detect_retrieval_heads(model, tokenizer, context_lengths=[300], depths=[50], max_new_tokens=3)
    assert HeadScores.from_pretrained(out / "detection").to_dict() == detected.to_dict()
    top2 = sorted(h for h, _ in sorted(detected.mean_scores().items(), key=lambda kv: (-kv[1], kv[0]))[:2])
    assert summary["masked_heads"] == [f"{l}-{h}" for l, h in top2]

    samples = build_niah_samples(tokenizer, [120], [50], max_length=model_window(model), max_new_tokens=4)
    trained = AutoModelForCausalLM.from_pretrained(out).eval()

    def answers(m, heads=None):
        result = {}
        for s in samples:
            ids = torch.tensor([s.input_ids])
            with torch.no_grad(), mask_heads(m, heads or []):
                new = m.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=4,
                    do_sample=False,
                    pad_token_id=0,
                )[0, ids.shape[1] :]
            result[s.key] = tokenizer.decode(new, skip_special_tokens=True)
        return result

    def records(name):
        lines = (out / name / "niah.rank0.jsonl").read_text().splitlines()
        return {r["key"]: r["response"] for r in map(json.loads, lines)}

    before, before_masked = answers(model), answers(model, top2)
    assert before != before_masked  # the masked evaluation is a different computation here
    assert records("niah_before") == before and records("niah_before_masked") == before_masked
    assert records("niah_after") == answers(trained)
    for key in ("niah_before", "niah_before_masked", "niah_after"):
        assert summary[key]["num_samples"] == len(samples) == 3  # 3 bundled needles x 1 length x 1 depth


def test_pairs_file_trains_without_generation(capsys, tmp_path, monkeypatch):
    """The `pairs` -> `train` flow: `trl-retmask pairs` writes a preference JSONL; `train --dataset_name` on it
    trains on exactly its first `max_prompts` rows, generating nothing."""
    from trl_retmask.cli import main as cli_main
    from trl_retmask.prompts import load_prompts
    from trl_retmask.scripts.train import build_trainer, parse_args

    model_dir = save_tiny_model(tmp_path / "model")
    pairs_file = tmp_path / "pairs.jsonl"
    assert (
        cli_main(
            [
                "pairs",
                "--model_name_or_path",
                str(model_dir),
                "--dataset_name",
                str(write_chat_log(tmp_path / "chat.jsonl")),
                "--heads",
                "0-1,2-3",
                "--temperature",
                "1.0",
                "--max_new_tokens",
                "5",
                "--output",
                str(pairs_file),
                "--output_dir",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert len(rows) >= 4
    import trl_retmask.pairs

    monkeypatch.setattr(trl_retmask.pairs, "generate_pairs", lambda *a, **k: pytest.fail("generated pairs"))
    scores_file = tmp_path / "scores.json"  # scores covering the tiny model's 3 x 4 heads
    HeadScores({f"{l}-{h}": [0.5 if (l, h) in ((0, 1), (2, 3)) else 0.0] for l in range(3) for h in range(4)}).save(
        scores_file
    )
    script_args, training_args, model_args = parse_args(
        _train_argv(
            model_dir,
            pairs_file,
            tmp_path / "run",
            "--max_prompts",
            "3",
            "--head_scores",
            str(scores_file),
            "--detect_heads",
            "False",
            "--niah_eval",
            "False",
        )
    )
    loaded = load_prompts(script_args)
    assert loaded.to_list() == [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows[:3]]
    script_args.max_prompts = len(rows)  # exactly all rows, then one more than there are
    assert len(load_prompts(script_args)) == len(rows)
    script_args.max_prompts = len(rows) + 1
    assert len(load_prompts(script_args)) == len(rows)
    script_args.max_prompts = 3
    trainer = build_trainer(script_args, training_args, model_args)
    assert trainer.pair_stats == {} and len(trainer.train_dataset) == 3
    capsys.readouterr()


# ------------------------------------------------------------------------------------------ stages run for real
def test_detect_stage_runs_with_its_flags(capsys, tmp_path, hay_dir, monkeypatch):
    """`trl-retmask detect` on a tiny model: --needles/--num_needles choose the needles, --dtype and
    --attn_implementation the loaded model, and the written scores are those of a hand detection with them."""
    import trl_retmask.detection as detection
    from trl_retmask.cli import main as cli_main
    from trl_retmask.models import load_model_and_tokenizer

    model_dir = save_tiny_model(tmp_path / "model")
    needles = [
        {"needle": "the secret number is five .", "question": "what is the secret number ?", "real_needle": "five"},
        {"needle": "the magic word is water .", "question": "what is the magic word ?", "real_needle": "water"},
    ]
    needle_file = tmp_path / "needles.jsonl"
    needle_file.write_text("".join(json.dumps(n) + "\n" for n in needles))
    seen = {}
    real = detection.detect_retrieval_heads

    def spy(model, tokenizer, **kw):
        seen.update(dtype=model.dtype, attn=model.config._attn_implementation, **kw)
        return real(model, tokenizer, **kw)

    monkeypatch.setattr(detection, "detect_retrieval_heads", spy)
    from tests.test_detection import forced_generation

    # the random model cannot answer: it emits the answer, with its real forward passes (and attention) per token
    monkeypatch.setattr(
        detection, "generate_answer", forced_generation(make_tiny_tokenizer(tmp_path / "tok"), {0: "five"})
    )
    out = tmp_path / "detect"
    assert (
        cli_main(
            [
                "detect",
                "--model_name_or_path",
                str(model_dir),
                "--context_lengths",
                "240",
                "--depths",
                "0",
                "100",
                "--needles",
                str(needle_file),
                "--num_needles",
                "1",
                "--haystack_dir",
                str(hay_dir),
                "--max_new_tokens",
                "3",
                "--dtype",
                "bfloat16",
                "--attn_implementation",
                "eager",
                "--output_dir",
                str(out),
                "--show",
                "2",
                "--save",
                str(tmp_path / "copy.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    printed = json.loads(printed[printed.index("{") :])
    assert seen["dtype"] == torch.bfloat16 and seen["attn"] == "eager"
    assert seen["needles"] == needles[:1] and seen["context_lengths"] == [240] and seen["depths"] == [0.0, 100.0]
    assert seen["max_new_tokens"] == 3 and seen["haystack_dir"] == str(hay_dir)

    from trl import ModelConfig

    model, tokenizer = load_model_and_tokenizer(
        ModelConfig(model_name_or_path=str(model_dir), dtype="bfloat16", attn_implementation="eager")
    )
    by_hand = real(
        model.eval(),
        tokenizer,
        context_lengths=[240],
        depths=[0, 100],
        needles=needles[:1],
        haystack_dir=str(hay_dir),
        max_new_tokens=3,
    )
    assert HeadScores.from_pretrained(out).to_dict() == by_hand.to_dict()
    assert list(printed["top_heads"]) == [f"{l}-{h}" for (l, h), _ in by_hand.ranked()[:2]]  # --show 2
    assert HeadScores.load(tmp_path / "copy.json").to_dict() == by_hand.to_dict()  # --save
    # one score per correct sample: 1 needle x 2 depths (with --num_needles 2 it would be 4)
    assert {len(v) for v in HeadScores.from_pretrained(out).scores.values()} == {2}


def test_niah_stage_selects_heads_from_scores_and_limits_needles(capsys, tmp_path, hay_dir):
    """`trl-retmask niah --head_scores F --mask_top_k 2 --num_needles 1`: one needle per grid cell, answered under
    the top-2 heads of F (the stored answers equal an API call with those heads)."""
    from trl_retmask import evaluate_niah
    from trl_retmask.cli import main as cli_main
    from trl_retmask.models import load_model_and_tokenizer
    from trl_retmask.niah_samples import load_needles

    model_dir = save_tiny_model(tmp_path / "model")
    scores = HeadScores(
        {
            f"{l}-{h}": [0.9 if (l, h) == (1, 3) else 0.5 if (l, h) == (0, 2) else 0.1]
            for l in range(3)
            for h in range(4)
        }
    )
    scores.save(tmp_path / "scores.json")
    out = tmp_path / "niah"
    assert (
        cli_main(
            [
                "niah",
                "--model_name_or_path",
                str(model_dir),
                "--head_scores",
                str(tmp_path / "scores.json"),
                "--mask_top_k",
                "2",
                "--num_needles",
                "1",
                "--context_lengths",
                "60",
                "--depths",
                "0",
                "50",
                "--haystack_dir",
                str(hay_dir),
                "--max_new_tokens",
                "3",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :])["masked_heads"] == 2
    stored = {r["key"]: r["response"] for r in map(json.loads, (out / "niah.rank0.jsonl").read_text().splitlines())}
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    api = evaluate_niah(
        model,
        tokenizer,
        heads=[(0, 2), (1, 3)],
        context_lengths=[60],
        depths=[0, 50],
        needles=load_needles()[:1],
        haystack_dir=str(hay_dir),
        max_new_tokens=3,
    )
    assert stored == {r["key"]: r["response"] for r in api["records"]} and len(stored) == 2


def test_suite_generate_is_batched_greedy_generation_under_the_mask(tiny_tokenizer):
    """`evaluation.suite.generate`: each prompt's greedy answer as a hand `generate` call gives it, across batches
    (a last, shorter one included), with and without heads masked."""
    from trl_retmask.evaluation.suite import generate

    model = make_tiny_model("llama")
    heads = [(0, 1), (1, 2), (2, 0), (2, 3)]
    prompts = ["the man said", "tell me a story about the sea", "the secret number is"]
    plain = generate(model, tiny_tokenizer, prompts, 5, batch_size=2)
    masked = generate(model, tiny_tokenizer, prompts, 5, batch_size=2, heads=heads)
    assert plain == [hand(model, tiny_tokenizer, p, max_new_tokens=5, do_sample=False) for p in prompts]
    assert masked == [hand(model, tiny_tokenizer, p, heads, max_new_tokens=5, do_sample=False) for p in prompts]
    assert plain != masked


def test_suite_budgets_batch_size_bounds_and_cache_identity(tiny_tokenizer, tmp_path):
    """`generate_suite`: without a cap each sample gets its task's own budget; batch_size 1 is valid and 0 is not;
    stored generations are reused only for the same model weights, generation settings and prompts."""
    from trl_retmask.evaluation import build_suite
    from trl_retmask.evaluation.suite import generate_suite

    model = make_tiny_model("llama")
    samples = build_suite(tiny_tokenizer, (256,), ["niah_single"], 2, 0)
    budget = samples[0]["max_new_tokens"]
    assert all(s["max_new_tokens"] == budget for s in samples) and budget > 6
    outputs = generate_suite(model, tiny_tokenizer, samples, batch_size=1)
    assert outputs == [
        hand(model, tiny_tokenizer, s["prompt"], max_new_tokens=budget, do_sample=False) for s in samples
    ]
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0\.$"):
        generate_suite(model, tiny_tokenizer, samples, batch_size=0)

    kw = dict(batch_size=2, max_new_tokens=3, output_dir=tmp_path, name="g")
    generate_suite(model, tiny_tokenizer, samples, **kw)
    other_weights = make_tiny_model("llama")
    with torch.no_grad():
        other_weights.lm_head.weight.mul_(2)
    other_settings = make_tiny_model("llama")
    other_settings.generation_config.repetition_penalty = 1.3
    other_prompts = [{**s, "prompt": s["prompt"] + " ?"} for s in samples]
    for m, data in ((other_weights, samples), (other_settings, samples), (model, other_prompts)):
        with pytest.raises(ValueError, match="another run"):
            generate_suite(m, tiny_tokenizer, data, **kw)


def test_suite_answers_skip_special_tokens_and_its_store_names_what_changed(tiny_tokenizer, tmp_path):
    """Special tokens generated inside an answer are not part of it (both entry points); the store keeps the run's
    readable settings, and a rerun with other ones is refused naming them (a renamed model with the same weights is
    the same run)."""
    from trl_retmask.evaluation import build_suite
    from trl_retmask.evaluation.suite import generate, generate_suite

    model = make_tiny_model("llama")
    model.config._name_or_path = "org/tiny"
    bos = tiny_tokenizer.bos_token_id
    assert bos not in (tiny_tokenizer.eos_token_id, None)
    assert tiny_tokenizer.bos_token in tiny_tokenizer.all_special_tokens
    handle = make_greedy(model, bos)  # a special token that does not end generation
    samples = build_suite(tiny_tokenizer, (256,), ["niah_single"], 2, 0)
    assert generate(model, tiny_tokenizer, ["the man said"], 4) == [""]
    assert generate_suite(model, tiny_tokenizer, samples, batch_size=2, max_new_tokens=3) == ["", ""]
    handle.remove()

    kw = dict(batch_size=2, output_dir=tmp_path, name="g")
    generate_suite(model, tiny_tokenizer, samples, max_new_tokens=3, **kw)
    meta = json.loads((tmp_path / "g.meta.json").read_text())
    assert meta["info"] == {"model": "org/tiny", "heads": [], "num_samples": 2, "max_new_tokens": 3}
    for change, named in (
        (dict(max_new_tokens=4), "max_new_tokens"),
        (dict(max_new_tokens=3, heads=[(0, 1)]), "heads"),
        (dict(max_new_tokens=3, samples=samples[:1]), "num_samples"),
    ):
        data = change.pop("samples", samples)
        with pytest.raises(
            ValueError, match=rf"results of another run: they depend on other inputs \({named} differ\)"
        ):
            generate_suite(model, tiny_tokenizer, data, **change, **kw)
    model.config._name_or_path = "org/renamed"  # the name is only informative: same weights, records reused
    assert generate_suite(model, tiny_tokenizer, samples, max_new_tokens=3, **kw) == generate_suite(
        model, tiny_tokenizer, samples, max_new_tokens=3, batch_size=2
    )


@pytest.mark.parametrize("damage", ["fewer outputs", "other indices", "not a list", "not strings"])
def test_suite_store_records_that_do_not_fit_their_batch_are_regenerated(tiny_tokenizer, tmp_path, damage):
    """A stored batch is reused only when its record fits the batch (its indices, one string per sample); a
    damaged one is generated again, the others are read back."""
    from trl_retmask.evaluation import build_suite
    from trl_retmask.evaluation.suite import generate_suite

    model = make_tiny_model("llama")
    samples = build_suite(tiny_tokenizer, (256,), ["niah_single"], 4, 0)
    kw = dict(batch_size=2, max_new_tokens=3, output_dir=tmp_path, name="g")
    first = generate_suite(model, tiny_tokenizer, samples, **kw)
    (store,) = tmp_path.glob("g.rank*.jsonl")
    records = [json.loads(line) for line in store.read_text().splitlines()]
    assert [r["indices"] for r in records] == [[0, 1], [2, 3]]
    broken = records[0]
    if damage == "fewer outputs":
        broken["outputs"] = broken["outputs"][:1]
    elif damage == "other indices":
        broken["indices"] = [1, 0]
    elif damage == "not a list":
        broken["outputs"] = "x"
    else:
        broken["outputs"] = [1, 2]
    store.write_text("".join(json.dumps(r) + "\n" for r in records))
    calls = CountingGenerate(model)
    assert generate_suite(model, tiny_tokenizer, samples, **kw) == first
    assert calls.rows == [2], "only the damaged batch is generated again"
