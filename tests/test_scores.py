"""HeadScores on the bundled Llama-3.1-8B-Instruct file, checked against numbers computed independently here."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from tests.tiny import tiny_config
from trl_retmask import HeadScores

LLAMA = Path(__file__).parents[1] / "trl_retmask" / "data" / "head_scores" / "Llama-3.1-8B-Instruct.json"


@pytest.fixture(scope="module")
def raw():
    return json.loads(LLAMA.read_text())


@pytest.fixture(scope="module")
def scores():
    return HeadScores.from_pretrained("meta-llama/Llama-3.1-8B-Instruct")


def plain_means(raw):
    return {tuple(int(p) for p in k.split("-")): sum(v) / len(v) for k, v in raw.items()}


def test_from_pretrained_by_id_basename_and_path(scores, raw):
    assert (scores.num_layers, scores.num_heads) == (32, 32)
    assert HeadScores.from_pretrained("/models/llama/Llama-3.1-8B-Instruct/").scores == scores.scores
    assert HeadScores.from_pretrained(LLAMA).scores == scores.scores
    assert HeadScores.from_pretrained("Qwen/Qwen3-8B").num_layers == 36
    with pytest.raises(ValueError, match="No bundled head scores.*trl-retmask detect"):
        HeadScores.from_pretrained("org/unknown-model")


def test_threshold_and_top_k_selection(scores, raw):
    means = plain_means(raw)
    assert scores.select(threshold=0.1) == sorted(k for k, m in means.items() if m >= 0.1)
    top10 = sorted(means, key=lambda k: means[k], reverse=True)[:10]
    assert scores.select(top_k=10) == sorted(top10)
    assert len(scores.select(threshold=0.1)) == 33


def test_random_controls_are_seeded_disjoint_and_sized(scores, raw):
    retrieval = set(scores.select(top_k=20))
    ctrl = scores.select(top_k=20, strategy="random_non_retrieval", seed=3)
    assert len(ctrl) == 20 and not set(ctrl) & retrieval and ctrl == sorted(ctrl)
    assert ctrl == scores.select(top_k=20, strategy="random_non_retrieval", seed=3)
    assert ctrl != scores.select(top_k=20, strategy="random_non_retrieval", seed=4)
    pool = sorted(set(plain_means(raw)) - retrieval)
    assert ctrl == sorted(random.Random(3).sample(pool, 20))
    anyh = scores.select(threshold=0.1, strategy="random", seed=0)
    assert len(anyh) == 33 and anyh == sorted(random.Random(0).sample(sorted(plain_means(raw)), 33))


def test_sparsity_against_independent_formulas(scores, raw):
    x = np.array(list(plain_means(raw).values()))
    n, total = len(x), x.sum()
    gini = np.abs(x[:, None] - x[None, :]).sum() / (2 * n * n * x.mean())  # mean-absolute-difference form
    p = x[x > 0] / total
    entropy = -sum(pi * math.log(pi) for pi in p) / math.log(n)
    top = sorted(x, reverse=True)
    s = scores.sparsity()
    assert s["gini"] == pytest.approx(gini, rel=1e-9)
    assert s["entropy"] == pytest.approx(entropy, rel=1e-9)
    assert s["top_1pct_mass"] == pytest.approx(sum(top[:11]) / total)  # ceil(1% of 1024) = 11
    assert s["top_5pct_mass"] == pytest.approx(sum(top[:52]) / total)  # ceil(5% of 1024) = 52
    assert s["n_above_0.1"] == int((x >= 0.1).sum()) == 33
    assert 0.9 < s["gini"] < 1  # retrieval is sparse in Llama-3.1


def test_round_trip_in_original_format(scores, tmp_path):
    path = scores.save(tmp_path / "s.json")
    text = path.read_text()
    assert "\n" not in text  # the original tools read one line
    first = json.loads(text)
    assert list(first)[:2] == ["0-0", "0-1"] and all(isinstance(v, list) for v in first.values())
    assert HeadScores.load(path).scores == scores.scores


def test_validate_against_config(scores):
    HeadScores({(l, h): [0.1] for l in range(3) for h in range(4)}).validate(tiny_config("llama"))
    with pytest.raises(ValueError, match="32 layers x 32 heads but the model has 3 layers x 4"):
        scores.validate(tiny_config("llama"))


@pytest.mark.parametrize("content,match", [
    ("", "empty"),
    ("{}", "non-empty JSON object"),
    ("[1, 2]", "non-empty JSON object"),
    ("{not json", "not valid JSON"),
    ('{"0-x": [1]}', "Malformed head key"),
    ('{"0-1": ["a"]}', "Malformed scores"),
])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        HeadScores.load(path)


def test_missing_file_and_bad_selection(tmp_path, scores):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HeadScores.load(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="exactly one"):
        scores.select()
    with pytest.raises(ValueError, match="exactly one"):
        scores.select(threshold=0.1, top_k=3)
    with pytest.raises(ValueError, match="No head has a mean score >= 2"):
        scores.select(threshold=2.0)
    with pytest.raises(ValueError, match="top_k must be"):
        scores.select(top_k=0)
    with pytest.raises(ValueError, match="Unknown mask strategy"):
        scores.select(top_k=3, strategy="best")


def test_plot_writes_png(scores, tmp_path):
    path = scores.plot(tmp_path / "heat.png", heads=scores.select(top_k=10))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
