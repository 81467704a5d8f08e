"""scripts/reproduce_small.py on a tiny model: every piece runs, an interrupted run resumes without redoing
finished pieces, and the reported comparisons are the paired means of the saved per-sample scores."""

import importlib.util
import itertools
import json

import numpy as np
import pytest

from tests.recipe_utils import REPO, save_tiny_model, write_chat_log, write_head_scores


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce_small", REPO / "scripts" / "reproduce_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduce_small_resumes_after_interruption(reproduce, tmp_path, monkeypatch):
    import trl_retmask.evaluation.suite as suite
    from trl_retmask.trainer import RetMaskTrainer

    out = tmp_path / "out"
    argv = [
        "--model",
        str(save_tiny_model(tmp_path / "model")),
        "--head-scores",
        str(write_head_scores(tmp_path / "scores.json")),
        "--dataset-name",
        str(write_chat_log(tmp_path / "prompts.jsonl", 4)),
        "--output-dir",
        str(out),
        "--mask-top-k",
        "2",
        "--seeds",
        "0",
        "--max-prompts",
        "4",
        "--max-new-tokens",
        "4",
        "--generation-batch-size",
        "4",
        "--no-bf16",
        "--lengths",
        "256",
        "--categories",
        "recall",
        "--n-per-task",
        "3",
        "--ppl-tokens",
        "128",
        "--short-answer",
        "3",
        "--n-resamples",
        "200",
    ]
    calls = {"train": [], "generate": 0}
    inner_train, inner_generate = RetMaskTrainer.train, suite.generate_batch

    def train(self, *a, **k):
        calls["train"].append(self.args.mask_strategy)
        if calls.get("interrupt") == self.args.mask_strategy:
            raise KeyboardInterrupt
        return inner_train(self, *a, **k)

    def generate(*a, **k):
        calls["generate"] += 1
        return inner_generate(*a, **k)

    monkeypatch.setattr(RetMaskTrainer, "train", train)
    monkeypatch.setattr(suite, "generate_batch", generate)

    calls["interrupt"] = "random_non_retrieval"  # killed while training the control
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(argv)
    assert calls["train"] == ["retrieval", "random_non_retrieval"] and not (out / "results.json").exists()
    assert sorted(p.stem for p in (out / "eval").glob("*.json")) == [
        "base",
        "base_masked_random",
        "base_masked_retrieval",
        "retrieval-seed0",
    ]

    partial = reproduce.main([*argv, "--report-only"])  # the finished pieces only: RetMask seed 0, no control yet
    assert calls["train"] == ["retrieval", "random_non_retrieval"]  # nothing trained or evaluated again
    assert partial["models"]["RetMask"]["runs"] == 1 and "control" not in partial["models"]
    assert "RetMask vs base" in partial["comparisons"] and "RetMask vs control" not in partial["comparisons"]
    assert "| RetMask (1 seed) |" in (out / "results.md").read_text()

    calls.update(train=[], generate=0, interrupt=None)  # resumed: only the control is trained and evaluated
    first = reproduce.main(argv)
    # 4 suite batches (1 per task) + 1 short-answer
    assert calls["train"] == ["random_non_retrieval"] and calls["generate"] == 5

    calls.update(train=[], generate=0)  # finished: nothing is computed again, the report is the same
    assert reproduce.main(argv) == first == json.loads((out / "results.json").read_text())
    assert calls == {"train": [], "generate": 0, "interrupt": None}
    monkeypatch.chdir(tmp_path)  # the same directory spelled relatively is the same run
    spelled = {"--output-dir": "out", "--model": "model", "--dataset-name": "prompts.jsonl"}
    relative = [spelled.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]
    assert relative.count("out") == 1 and "model" in relative and "prompts.jsonl" in relative
    again = reproduce.main(relative)
    assert {k: v for k, v in again.items() if k != "args"} == {k: v for k, v in first.items() if k != "args"}
    assert calls == {"train": [], "generate": 0, "interrupt": None}

    # the report's numbers are the saved per-sample scores, paired on the same samples
    def per_sample(name):
        rows = json.loads((out / "eval" / f"{name}.json").read_text())["suite"]["per_sample"]
        return np.array([r["score"] for r in sorted(rows, key=lambda r: (r["task"], r["length"], r["seed"]))])

    base, retmask, control = per_sample("base"), per_sample("retrieval-seed0"), per_sample("random_non_retrieval-seed0")
    assert len(base) == 12
    for name, diff in (("RetMask vs base", retmask - base), ("RetMask vs control", retmask - control)):
        overall = first["comparisons"][name]["suite"]["overall"]
        assert overall["difference"] == pytest.approx(diff.mean())
        assert overall["ci"][0] <= diff.mean() + 1e-12 and diff.mean() <= overall["ci"][1] + 1e-12
        # Independent two-sided sign-flip p-value: every sign pattern of the non-zero differences enumerated (the
        # strata are equal-sized, so the stratified mean is the plain mean); the report's is exact or 200 draws.
        nonzero = diff[diff != 0]
        flips = [
            abs(sum(s * d for s, d in zip(signs, nonzero))) for signs in itertools.product((-1, 1), repeat=len(nonzero))
        ]
        exact = sum(f >= abs(nonzero.sum()) - 1e-12 for f in flips) / len(flips)  # one pattern (p = 1) when none
        assert overall["p_value"] == pytest.approx(exact, abs=0 if overall["exact"] else 0.12)
    assert first["models"]["base"]["suite"]["overall"]["mean"] == pytest.approx(base.mean())
    assert "| RetMask vs control |" in (out / "results.md").read_text()
    assert (out / "suite.png").read_bytes()[:4] == b"\x89PNG"

    with pytest.raises(ValueError, match="other inputs|another run"):  # other settings never reuse the pieces
        reproduce.main([*argv[:-2], "--n-resamples", "200", "--eval-seed", "7"])


def test_trained_models_are_compared_over_the_seeds_both_finished(reproduce, tmp_path):
    """RetMask with seeds 0 and 1 finished, the control with seed 0 only: RetMask vs control pairs seed 0 with seed 0
    (the difference is that seed's), while RetMask alone is the mean of its two seeds."""
    from types import SimpleNamespace

    def run(scores, correct):
        return {
            "suite": {
                "per_sample": [
                    {"task": "niah_single", "length": 256, "seed": i, "score": s} for i, s in enumerate(scores)
                ]
            },
            "general": {"heldout_chunks": [[10.0, 5], [12.0, 5]], "short_answer_correct": correct},
        }

    evals = {
        "base": [run([0, 0, 0, 0], [0, 0])],
        "RetMask": [run([1, 1, 0, 0], [1, 0]), run([1, 1, 1, 1], [1, 1])],
        "control": [run([0, 1, 0, 0], [0, 0])],
    }
    args = SimpleNamespace(n_resamples=200, model="m", n_per_task=4, seeds=[0, 1])
    result = reproduce.report(evals, args, tmp_path, {}, {})
    vs_control = result["comparisons"]["RetMask vs control"]
    assert vs_control["runs"] == 1
    assert vs_control["suite"]["overall"]["difference"] == pytest.approx(np.mean([1, 1, 0, 0]) - np.mean([0, 1, 0, 0]))
    assert result["comparisons"]["RetMask vs base"]["runs"] == 2
    assert result["models"]["RetMask"]["suite"]["overall"]["mean"] == pytest.approx(0.75)
    assert "| RetMask (2 seeds) |" in (tmp_path / "results.md").read_text()


def test_p_values_below_the_printed_precision_are_written_as_a_bound(reproduce):
    """A Monte Carlo p-value is at least 1 / (1 + resamples), never 0: "p=0.000" would misstate it."""
    cell = {"difference": 0.5, "ci": [0.1, 0.9]}
    assert reproduce._diff({**cell, "p_value": 1 / 10_001}) == "+50.0 [+10.0, +90.0] p<0.001"
    assert reproduce._diff({**cell, "p_value": 0.001}) == "+50.0 [+10.0, +90.0] p=0.001"
    assert reproduce._diff({**cell, "p_value": 0.0314}) == "+50.0 [+10.0, +90.0] p=0.031"
