"""Long-context suite: generators (deterministic, gold by construction), metrics (hand-computed), runner, callback."""

import json
import math
import re

import numpy as np
import pytest
import torch

from tests.tiny import CheckpointingProbe, make_tiny_model
from trl_retmask.checkpointing import ARG, is_checkpointing
from trl_retmask.evaluation import (
    CATEGORIES,
    LongContextEvalCallback,
    build_suite,
    evaluate_long_context,
    heldout_perplexity,
    load_metric,
    score_suite,
    short_answer_accuracy,
)
from trl_retmask.evaluation.metrics.citation.citation import citation_scores
from trl_retmask.evaluation.metrics.ndcg.ndcg import ndcg_at_k
from trl_retmask.evaluation.metrics.substring_match.substring_match import match_any, match_fraction
from trl_retmask.evaluation.registry import TASKS, parse_ranking
from trl_retmask.evaluation.tasks import n_tokens


@pytest.fixture(scope="module")
def suite(tiny_tokenizer):
    return build_suite(tiny_tokenizer, lengths=(384, 768), n_per_task=3, seed=0)


# ------------------------------------------------------------------------------------------------ generators
@pytest.mark.parametrize("task", list(TASKS))
def test_generators_deterministic_by_seed(tiny_tokenizer, task):
    a, b, c = (TASKS[task](tiny_tokenizer, 512, seed) for seed in (3, 3, 4))
    assert a == b
    assert a["prompt"] != c["prompt"] and a["reference"] != c["reference"]


def test_suite_covers_categories_and_lengths(suite, tiny_tokenizer):
    assert {s["task"] for s in suite} == set(TASKS)
    assert {s["category"] for s in suite} == set(CATEGORIES)
    for s in suite:  # prompts are about the requested length (within 20 %) and never far above it
        assert 0.8 * s["length"] <= n_tokens(tiny_tokenizer, s["prompt"]) <= 1.1 * s["length"], s["task"]


def test_needle_golds_by_construction(suite):
    for s in (s for s in suite if s["task"].startswith("niah")):
        key, prompt = s["meta"]["key"], s["prompt"]
        for value in s["reference"]:
            assert re.fullmatch(r"\d{7}", value) and prompt.count(value) == 1
            assert f"One of the special magic numbers for {key} is: {value}." in prompt
        assert prompt.count(f"magic numbers for {key} is:") == len(s["reference"])
        assert key in prompt.rsplit("\n\n", 1)[1]  # the question asks for this key
        for other in s["meta"]["distractor_keys"]:  # distractor keys carry one other number each
            value = re.search(rf"magic numbers for {other} is: (\d{{7}})\.", prompt).group(1)
            assert value not in s["reference"] and prompt.count(value) == 1
    counts = {t: len(next(s for s in suite if s["task"] == t)["reference"]) for t in ("niah_multivalue",)}
    assert counts == {"niah_multivalue": 4}


def test_json_kv_gold_by_construction(suite):
    for s in (s for s in suite if s["task"] == "json_kv"):
        data = json.loads(s["prompt"].split("JSON data:\n", 1)[1].split("\n\nKey:", 1)[0])
        assert data[s["meta"]["key"]] == s["reference"][0]
        assert s["prompt"].count(s["reference"][0]) == 1 and s["prompt"].count(s["meta"]["key"]) == 2


def test_rerank_gold_ids_exist(suite):
    for s in (s for s in suite if s["task"] == "rerank"):
        ids, rel = s["reference"]["ids"], s["reference"]["relevance"]
        assert len(set(ids)) == len(ids) == len(rel) >= 3 and sorted(rel)[-3:] == [1.0, 1.0, 2.0]
        subject = s["meta"]["question"][len("Where is the ") : -len(" kept?")]
        docs = dict(re.findall(r"\[ID: (\d+)\] Document: (.*)", s["prompt"]))
        assert list(docs) == ids
        for i, r in zip(ids, rel):
            assert (subject in docs[i]) == (r > 0)
            assert ("is kept in" in docs[i] and subject in docs[i]) == (r == 2.0)


def test_cite_gold_by_construction(suite):
    for s in (s for s in suite if s["task"] == "cite"):
        docs, answers = s["reference"]["documents"], s["reference"]["answers"]
        for answer, doc_no in zip(answers, s["meta"]["supporting"]):
            assert [i + 1 for i, d in enumerate(docs) if answer in d] == [doc_no]
            assert f"Document [{doc_no}]: {docs[doc_no - 1]}" in s["prompt"]


def test_build_suite_rejects_bad_input(tiny_tokenizer):
    with pytest.raises(ValueError, match="Unknown category"):
        build_suite(tiny_tokenizer, categories=["recal"])
    with pytest.raises(ValueError, match="lengths"):
        build_suite(tiny_tokenizer, lengths=(16,))


# ------------------------------------------------------------------------------------------------ metrics
def test_ndcg_hand_computed():
    rel = {"a": 2.0, "b": 1.0, "c": 0.0}
    # ranking b, a, c: DCG = 1/log2(2) + 2/log2(3); ideal a, b: 2/log2(2) + 1/log2(3)
    assert ndcg_at_k(["b", "a", "c"], rel) == pytest.approx((1 + 2 / 1.5849625) / (2 + 1 / 1.5849625), rel=1e-6)
    assert ndcg_at_k(["a", "b"], rel) == pytest.approx(1.0)
    assert ndcg_at_k(["c", "x", "b"], rel, k=2) == 0.0  # b falls outside the cut-off
    assert ndcg_at_k(["b", "b", "a"], rel) == pytest.approx((1 + 2 / 2) / (2 + 1 / 1.5849625))  # duplicates gain 0
    metric = load_metric("ndcg")  # the evaluate module, loaded from the shipped file with HF_HUB_OFFLINE=1
    out = metric.compute(
        predictions=[["b", "a"], ["a"]], references=[{"ids": list(rel), "relevance": list(rel.values())}] * 2, k=1
    )
    assert out["ndcg"] == pytest.approx((0.5 + 1.0) / 2)


def test_citation_hand_computed():
    docs = ["The lantern is kept in Lowmere.", "Bread is baked daily.", "It was made by Rurik Hale long ago."]
    pred = "It is kept in Lowmere [1][2]. It was made by Rurik Hale [2]. I hope this helps [3]."
    # claims: s1 (Lowmere, cites 1+2: supported; 1 precise), s2 (Rurik Hale, cites 2: unsupported); s3 no claim
    assert citation_scores(pred, ["Lowmere", "Rurik Hale"], docs) == {
        "correctness": 1.0,
        "citation_recall": 0.5,
        "citation_precision": 0.25,
    }
    assert citation_scores("Lowmere.", ["Lowmere", "Rurik Hale"], docs) == {
        "correctness": 0.5,
        "citation_recall": 0.0,
        "citation_precision": 0.0,
    }
    assert citation_scores("Made by Rurik Hale [1, 3]; kept in Lowmere [9].", ["Lowmere", "Rurik Hale"], docs) == {
        "correctness": 1.0,
        "citation_recall": 1.0,
        "citation_precision": pytest.approx(2 / 3),
    }
    out = load_metric("citation").compute(
        predictions=[pred], references=[{"answers": ["Lowmere", "Rurik Hale"], "documents": docs}]
    )
    assert out == pytest.approx({"correctness": 1.0, "citation_recall": 0.5, "citation_precision": 0.25})


def test_substring_match_hand_computed():
    assert match_fraction("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) == 2 / 3
    assert match_any("It has 14 legs", ["4", "four"]) == 0.0 and match_any("Four legs.", ["4", "four"]) == 1.0
    out = load_metric("substring_match").compute(predictions=["a 12", "b"], references=[["12", "13"], ["b"]])
    assert out == {"recall": pytest.approx(0.75), "all_match": 0.5}


def test_parse_ranking():
    assert parse_ranking("Ranking: 20 > 11 > 99 > 20 > ID10", ["10", "11", "20"]) == ["20", "11", "10"]


def test_perfect_outputs_score_one(suite):
    outputs = []
    for s in suite:
        ref = s["reference"]
        if s["task"] == "rerank":
            outputs.append(" > ".join(i for _, i in sorted(zip(ref["relevance"], ref["ids"]), reverse=True)))
        elif s["task"] == "cite":
            a, b = s["meta"]["supporting"]
            outputs.append(f"It is kept in {ref['answers'][0]} [{a}]. It was made by {ref['answers'][1]} [{b}].")
        else:
            outputs.append(", ".join(ref))
    result = score_suite(suite, outputs)
    assert result["scores"] == {cat: {"384": pytest.approx(1.0), "768": pytest.approx(1.0)} for cat in CATEGORIES}
    empty = score_suite(suite, [""] * len(suite))
    assert all(v == 0.0 for by_len in empty["scores"].values() for v in by_len.values())


# ------------------------------------------------------------------------------------------------ runner, general
def test_evaluate_long_context_tiny(tiny_llama, tiny_tokenizer, tmp_path):
    result = evaluate_long_context(
        tiny_llama,
        tiny_tokenizer,
        lengths=(256,),
        n_per_task=1,
        heads=[(0, 1)],
        output_dir=tmp_path,
        name="tiny",
        progress=False,
        keep_generations=True,
        max_new_tokens=6,
    )
    assert set(result["scores"]) == set(CATEGORIES) and set(result["scores"]["recall"]) == {"256"}
    assert result["config"]["heads"] == ["0-1"] and len(result["generations"]) == len(TASKS)
    # The mask was applied: the same answers come from a copy whose o_proj input columns of head (0, 1) are zeroed
    # by hand (the weight-space equivalent of the forward-hook mask), and the unmasked model answers otherwise.
    import copy

    cfg = tiny_llama.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    zeroed = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        zeroed.model.layers[0].self_attn.o_proj.weight[:, head_dim : 2 * head_dim] = 0
    kw = dict(lengths=(256,), n_per_task=1, progress=False, keep_generations=True, max_new_tokens=6)
    by_weights = evaluate_long_context(zeroed, tiny_tokenizer, **kw)
    assert [g["output"] for g in result["generations"]] == [g["output"] for g in by_weights["generations"]]
    assert result["scores"] == by_weights["scores"]
    unmasked = evaluate_long_context(tiny_llama, tiny_tokenizer, **kw)
    assert [g["output"] for g in unmasked["generations"]] != [g["output"] for g in result["generations"]]
    assert all(
        len(tiny_tokenizer(g["output"], add_special_tokens=False)["input_ids"]) <= 6 for g in result["generations"]
    )  # the answer budget cap holds
    assert json.loads((tmp_path / "tiny.json").read_text())["scores"] == result["scores"]
    assert (tmp_path / "tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert not tiny_llama.training and tiny_tokenizer.padding_side == "right"  # state restored
    with pytest.raises(ValueError, match="max_position_embeddings"):
        evaluate_long_context(tiny_llama, tiny_tokenizer, lengths=(1024,), n_per_task=1, progress=False)


def test_suite_generations_resume_and_refuse_other_runs(tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama")
    kw = dict(
        lengths=(256,),
        categories=["recall"],
        n_per_task=2,
        output_dir=tmp_path,
        name="m",
        progress=False,
        max_new_tokens=4,
        batch_size=3,
    )
    first = evaluate_long_context(model, tiny_tokenizer, **kw)
    assert sorted(p.name for p in tmp_path.glob("m.generations.*")) == [
        "m.generations.meta.json",
        "m.generations.rank0.jsonl",
    ]
    inner, model.generate = model.generate, lambda *a, **k: pytest.fail("regenerated finished generations")
    assert evaluate_long_context(model, tiny_tokenizer, **kw)["scores"] == first["scores"]
    model.generate = inner
    with pytest.raises(ValueError, match="another run.*heads.*overwrite=True"):
        evaluate_long_context(model, tiny_tokenizer, heads=[(0, 1)], **kw)
    masked = evaluate_long_context(model, tiny_tokenizer, heads=[(0, 1)], overwrite=True, keep_generations=True, **kw)
    fresh = evaluate_long_context(
        model, tiny_tokenizer, heads=[(0, 1)], keep_generations=True, **{**kw, "output_dir": None}
    )
    assert masked["generations"] == fresh["generations"]
    with pytest.raises(ValueError, match="plain file name"):
        evaluate_long_context(model, tiny_tokenizer, **{**kw, "name": "../x"})


def test_heldout_perplexity_matches_model_loss(tiny_llama, tiny_tokenizer):
    text = "the man said that the water was very long and the day was good " * 8
    ids = torch.tensor([tiny_tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = math.exp(tiny_llama(input_ids=ids, labels=ids).loss.item())
    assert heldout_perplexity(tiny_llama, tiny_tokenizer, text=text, window=512) == pytest.approx(expected, rel=1e-4)
    # two windows, second one shorter: still the token-weighted mean NLL, counted per window
    assert 60 < ids.shape[1] < 120
    chunked = heldout_perplexity(tiny_llama, tiny_tokenizer, text=text, window=60)
    first, second = ids[:, :60], ids[:, 60:]
    with torch.no_grad():
        l1, l2 = (tiny_llama(input_ids=x, labels=x).loss.item() for x in (first, second))
    assert chunked == pytest.approx(math.exp((l1 * 59 + l2 * (second.shape[1] - 1)) / (58 + second.shape[1])), rel=1e-4)
    ppl, chunks = heldout_perplexity(tiny_llama, tiny_tokenizer, text=text, window=60, return_chunks=True)
    assert ppl == chunked and [c[1] for c in chunks] == [59, second.shape[1] - 1]  # per-chunk units for intervals
    assert [c[0] for c in chunks] == pytest.approx([l1 * 59, l2 * (second.shape[1] - 1)], rel=1e-4)


def test_short_answer_accuracy_scores_outputs(tiny_llama, tiny_tokenizer):
    questions = [{"question": "what is the water ?", "answers": ["zzzz"]}] * 2
    acc, outputs = short_answer_accuracy(tiny_llama, tiny_tokenizer, questions, max_new_tokens=4, return_outputs=True)
    assert acc == 0.0 and len(outputs) == 2
    word = outputs[0].split()[0] if outputs[0].split() else None
    if word:  # an answer equal to what the model says counts as correct
        acc = short_answer_accuracy(
            tiny_llama, tiny_tokenizer, [{"question": "what is the water ?", "answers": [word]}], max_new_tokens=4
        )
        assert acc == 1.0


# ------------------------------------------------------------------------------------------------ callback
def test_callback_logs_during_training(tiny_llama, tiny_tokenizer, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = tiny_tokenizer(["the man said that the water was good"] * 4)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})

    # Generation turns activation checkpointing off; it must come back with the user's kwargs, not the default ones.
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        learning_rate=1e-3,
        **{ARG: True, ARG + "_kwargs": {"use_reentrant": True}},  # transformers' own name (5.23 renamed it)
    )
    trainer = Trainer(model=tiny_llama, args=args, train_dataset=data, processing_class=tiny_tokenizer)
    callback = LongContextEvalCallback(
        trainer, lengths=(128,), categories=("recall", "cite"), n_per_task=1, every_n_steps=2, max_new_tokens=4
    )
    trainer.add_callback(callback)
    probe = CheckpointingProbe()
    trainer.add_callback(probe)
    trainer.train()
    assert probe.seen == {0: (True, {"use_reentrant": True}), 1: (True, {"use_reentrant": True})}
    assert is_checkpointing(tiny_llama)  # after the evaluation at the last step too
    logged = [h for h in trainer.state.log_history if "longctx/recall/128" in h]
    assert [h["step"] for h in logged] == [0, 2]
    expected = {
        "longctx/recall/128",
        "longctx/cite/128",
        "longctx/niah_single/128",
        "longctx/niah_multikey/128",
        "longctx/niah_multivalue/128",
        "longctx/json_kv/128",
        "longctx/cite_correctness/128",
        "longctx/cite_citation_recall/128",
        "longctx/cite_citation_precision/128",
    }
    assert expected <= set(logged[0]) and [h["step"] for h in callback.history] == [0, 2]
    with pytest.raises(ValueError, match="every_n_steps"):
        LongContextEvalCallback(trainer, every_n_steps=0)


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_solves_short_single_needle(smollm2):
    """The suite is answerable: the embedded model finds a single needle in a short context."""
    model, tokenizer = smollm2
    result = evaluate_long_context(
        model,
        tokenizer,
        lengths=(256,),
        categories=["niah_single"],
        n_per_task=2,
        seed=0,
        progress=False,
        keep_generations=True,
    )
    assert result["tasks"]["niah_single"]["256"]["recall"] >= 0.5, result["generations"]


# ------------------------------------------------------------------------------------------------ data split
def test_suite_contexts_come_from_the_suite_text_not_the_detection_haystack(tiny_tokenizer):
    from tests.test_prompts import DATA, SUMMARY_QUESTION, detection_texts, normalised, shared_windows, windows

    samples = build_suite(tiny_tokenizer, lengths=(512,), n_per_task=2, seed=0)
    prompts = [s["prompt"].replace(SUMMARY_QUESTION, "\n") for s in samples]
    suite_text = windows([p.read_text(encoding="utf-8") for p in sorted((DATA / "eval" / "suite").glob("*.txt"))])
    for s, prompt in zip(samples, map(normalised, prompts)):
        if s["task"] == "json_kv":  # UUIDs only, no book text
            continue
        own = [prompt[i : i + 50] for i in range(len(prompt) - 49)]
        assert sum(w in suite_text for w in own) > 0.5 * len(own), s["task"]  # mostly the suite's text
    detection = windows([t.replace(SUMMARY_QUESTION, "\n") for t in detection_texts()])
    assert not shared_windows(prompts, detection)


# ------------------------------------------------------------------------------------------------ statistics
def test_per_sample_scores_average_to_the_suite_tables(suite):
    from trl_retmask.evaluation import sample_score, suite_summary

    def answer(s):  # a mix of right, half-right and wrong answers
        ref = s["reference"]
        if s["task"] == "rerank":
            return "Ranking: " + " > ".join(sorted(ref["ids"], key=lambda i: -ref["relevance"][ref["ids"].index(i)]))
        if s["task"] == "cite":
            return f"It is kept in {ref['answers'][0]} [{s['meta']['supporting'][0]}]."
        return " ".join(ref[: max(1, len(ref) // 2)]) if s["seed"] % 2 == 0 else "no idea"

    outputs = [answer(s) for s in suite]
    tables = score_suite(suite, outputs)
    records = [
        {**{k: s[k] for k in ("task", "length", "seed")}, "score": sample_score(s, o)} for s, o in zip(suite, outputs)
    ]
    summary = suite_summary([records], n_resamples=200)
    primary = {"recall": "recall", "rerank": "ndcg", "cite": "cite_avg"}
    for task, by_len in tables["tasks"].items():
        for n, metrics in by_len.items():
            cat = next(c for c, ts in CATEGORIES.items() if task in ts)
            assert summary["task"][task][n]["mean"] == pytest.approx(metrics[primary[cat]])
    for cat, by_len in tables["scores"].items():
        for n, value in by_len.items():
            got = summary["category"][cat][n]
            assert got["mean"] == pytest.approx(value) and got["ci"][0] <= value + 1e-12 <= got["ci"][1] + 2e-12
    cells = [m[primary[c]] for c, ts in CATEGORIES.items() for t in ts for m in tables["tasks"][t].values()]
    assert summary["overall"]["mean"] == pytest.approx(sum(cells) / len(cells))


def test_sign_flip_p_value_enumerated_by_hand():
    from trl_retmask.evaluation.stats import paired_comparison, sign_flip_p_value

    # +-1 +-2 +-3: sums 6 4 2 0 0 -2 -4 -6; |sum| >= 6 in 2 of 8 patterns
    assert sign_flip_p_value([1.0, 2.0, 3.0]) == (0.25, True)
    assert sign_flip_p_value([1.0, 2.0, 3.0, 0.0, 0.0]) == (0.25, True)  # ties (zero differences) never move
    assert sign_flip_p_value([0.0, 0.0]) == (1.0, True)
    result = paired_comparison([1, 1, 1, 0], [0, 0, 0, 0])  # 3 wins of 3: 2 of 8 patterns as extreme
    assert result["difference"] == 0.75 and result["p_value"] == 0.25 and result["exact"]
    constant = paired_comparison([0.5] * 6, [0.5] * 6)
    assert constant["difference"] == 0 and constant["ci"] == [0, 0] and constant["p_value"] == 1


def test_stratified_sign_flip_matches_brute_force():
    import itertools

    from trl_retmask.evaluation.stats import sign_flip_p_value, stratified_mean

    diffs, strata = [0.5, -0.25, 1.0, 0.75, 0.25], ["a", "a", "b", "b", "b"]
    assert stratified_mean(diffs, strata) == pytest.approx((0.125 + 2 / 3) / 2)

    def stat(d):  # mean of the group means, written out
        return (sum(d[:2]) / 2 + sum(d[2:]) / 3) / 2

    observed = abs(stat(diffs))
    flips = [abs(stat([s * d for s, d in zip(signs, diffs)])) for signs in itertools.product((1, -1), repeat=5)]
    p, exact = sign_flip_p_value(diffs, strata)
    assert exact and p == pytest.approx(sum(f >= observed - 1e-12 for f in flips) / 32)


def test_statistics_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    import numpy as np

    from trl_retmask.evaluation.stats import bootstrap_ci, paired_comparison

    rng = np.random.default_rng(3)
    a, b = rng.random(16), rng.random(16)

    def mean_diff(x, y, axis=-1):
        return np.mean(x - y, axis=axis)

    exact = scipy_stats.permutation_test(
        (a, b), mean_diff, permutation_type="samples", n_resamples=np.inf, vectorized=True
    ).pvalue  # all 2**16 sign patterns
    ours = paired_comparison(a, b)  # 2**16 > 10,000: Monte Carlo
    assert not ours["exact"] and ours["p_value"] == pytest.approx(exact, abs=0.015)
    assert paired_comparison(a, b, n_resamples=2**16)["p_value"] == pytest.approx(exact)
    x = (rng.random(24) < 0.4).astype(float)  # 24 correct/incorrect answers
    ref = scipy_stats.bootstrap((x,), np.mean, method="percentile", n_resamples=10_000, random_state=0)
    low, high = bootstrap_ci(x)
    assert low == pytest.approx(ref.confidence_interval.low, abs=0.03)
    assert high == pytest.approx(ref.confidence_interval.high, abs=0.03)
    assert bootstrap_ci([0.7] * 10) == [0.7, 0.7] and bootstrap_ci(x) == bootstrap_ci(x)  # point; seeded


def test_perplexity_interval_and_bad_input():
    import math

    from trl_retmask.evaluation.stats import bootstrap_ci, combine_runs, paired_comparison, perplexity_ci

    assert perplexity_ci([[20.0, 10]]) == pytest.approx([math.exp(2.0)] * 2)
    low, high = perplexity_ci([[20.0, 10], [30.0, 10], [10.0, 10]])
    assert math.exp(1.0) <= low < math.exp(2.0) < high <= math.exp(3.0)
    with pytest.raises(ValueError, match="token count"):
        perplexity_ci([[1.0, 0]])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="same items"):
        paired_comparison([1, 0], [1])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=95)
    run = [{"task": "niah_single", "length": 512, "seed": i, "score": float(i % 2)} for i in range(4)]
    keys, mean = combine_runs([run, [{**r, "score": 1.0} for r in run]])  # seeds averaged per sample
    assert keys == [("niah_single", 512, i) for i in range(4)] and list(mean) == [0.5, 1.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="different suite samples"):
        combine_runs([run, run[:3]])


def test_plot_results_draws_each_models_bars_and_intervals(tmp_path, monkeypatch):
    """One bar per model and length at its score, and the interval (when given) as its error bar, in percent."""
    import trl_retmask.plotting as plotting
    from trl_retmask.evaluation.suite import plot_results

    figures = []
    save = plotting.save_figure
    monkeypatch.setattr(plotting, "save_figure", lambda fig, path, **kw: figures.append(fig) or save(fig, path, **kw))
    results = {
        "a": {
            "scores": {"recall": {"1024": 0.5, "2048": 0.25}},
            "intervals": {"recall": {"1024": [0.4, 0.7], "2048": [0.1, 0.3]}},
        },
        "b": {"scores": {"recall": {"1024": 0.75}}},
    }  # no intervals, no 2048
    path = plot_results(results, tmp_path / "p.png", title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"
    (ax,) = figures[0].axes
    from matplotlib.container import BarContainer

    bars_a, bars_b = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_height() for b in bars_a] == [50.0, 25.0]
    assert [b.get_height() for b in bars_b][0] == 75.0 and np.isnan([b.get_height() for b in bars_b][1])
    segments = bars_a.errorbar.lines[2][0].get_segments()
    assert [tuple(np.round(s[:, 1], 6)) for s in segments] == [(40.0, 70.0), (10.0, 30.0)]
    assert bars_b.errorbar is None
    assert [t.get_text() for t in figures[0].legends[0].get_texts()] == ["a", "b"]


def test_a_new_task_is_one_registration(tiny_tokenizer):
    """`register(Task(...))` is all a task needs: it is built, scored per sample and per batch with its metric, and
    averaged into its (new) category by the suite, which names it nowhere else."""
    from trl_retmask.evaluation import registry

    def echo(tokenizer, length, seed):
        return {
            "task": "echo",
            "length": length,
            "seed": seed,
            "prompt": f"Repeat {seed}.",
            "reference": [str(seed)],
            "max_new_tokens": 4,
        }

    task = registry.Task(
        "echo",
        "echoes",
        echo,
        "substring_match",
        "recall",
        score=lambda ref, output: float(ref[0] in output),
        logged={"echo": "recall"},
    )
    saved = {name: dict(getattr(registry, name)) for name in ("TASKS", "CATEGORIES", "TASK_CATEGORY", "PRIMARY")}
    try:
        registry.register(task)
        with pytest.raises(ValueError, match="already registered"):
            registry.register(task)
        with pytest.raises(ValueError, match="scored by 'recall', not 'ndcg'"):
            registry.register(registry.Task("echo2", "echoes", echo, "ndcg", "ndcg", score=task.score))
        samples = build_suite(tiny_tokenizer, (256,), ["echoes"], n_per_task=2, seed=5)
        assert [(s["task"], s["category"], s["seed"]) for s in samples] == [
            ("echo", "echoes", 5),
            ("echo", "echoes", 6),
        ]
        outputs = ["it is 5", "no idea"]
        result = score_suite(samples, outputs)
        assert result["scores"] == {"echoes": {"256": 0.5}} and result["tasks"]["echo"]["256"]["n"] == 2
        from trl_retmask.evaluation import sample_score

        assert [sample_score(s, o) for s, o in zip(samples, outputs)] == [1.0, 0.0]
    finally:
        for name, value in saved.items():
            getattr(registry, name).clear()
            getattr(registry, name).update(value)
    assert "echo" not in registry.TASKS and list(registry.CATEGORIES) == ["recall", "rerank", "cite"]
