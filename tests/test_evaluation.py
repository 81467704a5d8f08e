"""Long-context suite: generators (deterministic, gold by construction), metrics (hand-computed), runner, callback."""

import json
import math
import re

import pytest
import torch

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
from trl_retmask.evaluation.suite import parse_ranking
from trl_retmask.evaluation.tasks import TASKS, n_tokens


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
        subject = s["meta"]["question"][len("Where is the "):-len(" kept?")]
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
    out = metric.compute(predictions=[["b", "a"], ["a"]], references=[{"ids": list(rel), "relevance": list(rel.values())}] * 2,
                         k=1)
    assert out["ndcg"] == pytest.approx((0.5 + 1.0) / 2)


def test_citation_hand_computed():
    docs = ["The lantern is kept in Lowmere.", "Bread is baked daily.", "It was made by Rurik Hale long ago."]
    pred = "It is kept in Lowmere [1][2]. It was made by Rurik Hale [2]. I hope this helps [3]."
    # claims: s1 (Lowmere, cites 1+2: supported; 1 precise), s2 (Rurik Hale, cites 2: unsupported); s3 no claim
    assert citation_scores(pred, ["Lowmere", "Rurik Hale"], docs) == {
        "correctness": 1.0, "citation_recall": 0.5, "citation_precision": 0.25}
    assert citation_scores("Lowmere.", ["Lowmere", "Rurik Hale"], docs) == {
        "correctness": 0.5, "citation_recall": 0.0, "citation_precision": 0.0}
    assert citation_scores("Made by Rurik Hale [1, 3]; kept in Lowmere [9].", ["Lowmere", "Rurik Hale"], docs) == {
        "correctness": 1.0, "citation_recall": 1.0, "citation_precision": pytest.approx(2 / 3)}
    out = load_metric("citation").compute(predictions=[pred], references=[{"answers": ["Lowmere", "Rurik Hale"],
                                                                         "documents": docs}])
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
    result = evaluate_long_context(tiny_llama, tiny_tokenizer, lengths=(256,), n_per_task=1, heads=[(0, 1)],
                                   output_dir=tmp_path, name="tiny", progress=False, keep_generations=True,
                                   max_new_tokens=6)
    assert set(result["scores"]) == set(CATEGORIES) and set(result["scores"]["recall"]) == {"256"}
    assert all(0.0 <= v <= 1.0 for by_len in result["scores"].values() for v in by_len.values())
    assert result["config"]["heads"] == [[0, 1]] and len(result["generations"]) == len(TASKS)
    assert all(len(tiny_tokenizer(g["output"], add_special_tokens=False)["input_ids"]) <= 6
               for g in result["generations"])  # the answer budget cap holds
    assert json.loads((tmp_path / "tiny.json").read_text())["scores"] == result["scores"]
    assert (tmp_path / "tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert not tiny_llama.training and tiny_tokenizer.padding_side == "right"  # state restored
    with pytest.raises(ValueError, match="max_position_embeddings"):
        evaluate_long_context(tiny_llama, tiny_tokenizer, lengths=(1024,), n_per_task=1, progress=False)


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


def test_short_answer_accuracy_scores_outputs(tiny_llama, tiny_tokenizer):
    questions = [{"question": "what is the water ?", "answers": ["zzzz"]}] * 2
    acc, outputs = short_answer_accuracy(tiny_llama, tiny_tokenizer, questions, max_new_tokens=4, return_outputs=True)
    assert acc == 0.0 and len(outputs) == 2
    word = outputs[0].split()[0] if outputs[0].split() else None
    if word:  # an answer equal to what the model says counts as correct
        acc = short_answer_accuracy(tiny_llama, tiny_tokenizer, [{"question": "what is the water ?",
                                                                  "answers": [word]}], max_new_tokens=4)
        assert acc == 1.0


# ------------------------------------------------------------------------------------------------ callback
def test_callback_logs_during_training(tiny_llama, tiny_tokenizer, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = tiny_tokenizer(["the man said that the water was good"] * 4)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3)
    trainer = Trainer(model=tiny_llama, args=args, train_dataset=data, processing_class=tiny_tokenizer)
    callback = LongContextEvalCallback(trainer, lengths=(128,), categories=("recall", "cite"), n_per_task=1,
                                       every_n_steps=2, max_new_tokens=4)
    trainer.add_callback(callback)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "longctx/recall/128" in h]
    assert [h["step"] for h in logged] == [0, 2]
    expected = {"longctx/recall/128", "longctx/cite/128", "longctx/niah_single/128", "longctx/niah_multikey/128",
                "longctx/niah_multivalue/128", "longctx/json_kv/128", "longctx/cite_correctness/128",
                "longctx/cite_citation_recall/128", "longctx/cite_citation_precision/128"}
    assert expected <= set(logged[0]) and [h["step"] for h in callback.history] == [0, 2]
    with pytest.raises(ValueError, match="every_n_steps"):
        LongContextEvalCallback(trainer, every_n_steps=0)


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_solves_short_single_needle(smollm2):
    """The suite is answerable: the embedded model finds a single needle in a short context."""
    model, tokenizer = smollm2
    result = evaluate_long_context(model, tokenizer, lengths=(256,), categories=["niah_single"], n_per_task=2,
                                   seed=0, progress=False, keep_generations=True)
    assert result["tasks"]["niah_single"]["256"]["recall"] >= 0.5, result["generations"]
