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
    with pytest.raises(ValueError, match="No bundled head scores for 'org/unknown-model'.*trl-retmask detect"):
        HeadScores.from_pretrained("org/unknown-model")  # offline in the tests: the Hub lookup fails clearly
    with pytest.raises(ValueError, match="not a score file.*trl-retmask detect"):
        HeadScores.from_pretrained("/no/such/dir/unknown-model")


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


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "empty"),
        ("{}", "non-empty JSON object"),
        ("[1, 2]", "non-empty JSON object"),
        ("{not json", "not valid JSON"),
        ('{"0-x": [1]}', "Malformed head key"),
        ('{"0-1": ["a"]}', "Malformed scores"),
    ],
)
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
    with pytest.raises(ValueError, match="No head has a mean score >= 1"):
        scores.select(threshold=1.0)
    with pytest.raises(ValueError, match="threshold` must be in"):
        scores.select(threshold=2.0)
    with pytest.raises(ValueError, match="top_k` must be >= 1"):
        scores.select(top_k=0)
    with pytest.raises(ValueError, match="top_k must be at most 1024"):
        scores.select(top_k=1025)
    with pytest.raises(ValueError, match="top_k` must be an integer"):
        scores.select(top_k=True)
    with pytest.raises(ValueError, match="Unknown mask strategy"):
        scores.select(top_k=3, strategy="best")


def test_plot_writes_png(scores, tmp_path):
    path = scores.plot(tmp_path / "heat.png", heads=scores.select(top_k=10))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# ---------------------------------------------------------------------------------------- hostile score files
@pytest.mark.parametrize(
    "content,match",
    [
        ('{"30000-3000": [1.0]}', "beyond any model"),  # would be a 90M-cell dense grid
        ('{"0-0": [1], "1-1": [1]}', "2 of 2 layers x 2 heads.*missing e.g. 0-1, 1-0"),
        ('{"0-0": [1], "0-1": [1], "00-1": [1]}', "'0-1' and '00-1' both name layer 0 head 1"),
        ('{"0-0": [1], "0-0": [2]}', "duplicate key '0-0'"),
        ('{"0-0": [NaN]}', "Malformed scores"),
        ('{"1²-0": [1]}', "Malformed head key"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # was a RecursionError traceback
    ],
)
def test_hostile_files_refused_before_allocating(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        HeadScores.load(path)


def test_explicit_layout_partial_grid_round_trips(tmp_path):
    partial = HeadScores({"0-1": [0.5, 0.7], "2-3": [0.3]}, num_layers=3, num_heads=4)
    back = HeadScores.load(partial.save(tmp_path / "s.json"))
    assert (back.num_layers, back.num_heads) == (3, 4) and len(back.scores) == 12
    assert back.mean_scores() == pytest.approx(partial.mean_scores())
    assert back.mean_scores()[(0, 1)] == pytest.approx(0.6) and back.mean_scores()[(1, 1)] == 0.0
    with pytest.raises(ValueError, match="missing e.g. 0-0"):
        HeadScores({"0-1": [0.5], "2-3": [0.3]})  # inferred layout: must be complete


# ------------------------------------------------------------------------- local round trips (Hub: test_hub.py)
GRID = {f"{l}-{h}": [0.05 * (l * 4 + h) / 11] for l in range(3) for h in range(4)}


def test_save_pretrained_from_pretrained_directory(tmp_path):
    scores = HeadScores(GRID)
    path = scores.save_pretrained(tmp_path / "model")
    assert path.name == "retmask_head_scores.json"
    back = HeadScores.from_pretrained(tmp_path / "model")
    assert back.scores == scores.scores and back.trained_heads is None
    # A RetMask output dir also says which heads it was trained with.
    (tmp_path / "model" / "retmask.json").write_text(json.dumps({"masked_heads": [[2, 3], [0, 1]]}))
    assert HeadScores.from_pretrained(str(tmp_path / "model")).trained_heads == [(0, 1), (2, 3)]
    (tmp_path / "model" / "retmask.json").write_text(json.dumps({"masked_heads": [[7, 0]]}))
    with pytest.raises(ValueError, match="outside its score grid"):
        HeadScores.from_pretrained(tmp_path / "model")


# ------------------------------------------------------------------------------------------ selection arguments
def test_selection_arguments_and_select_heads(tmp_path):
    from tests.tiny import make_tiny_model
    from trl_retmask.heads import HeadSelectionArguments
    from trl_retmask.scores import resolve_head_scores
    from trl_retmask.selection import select_heads

    model = make_tiny_model("llama")  # 3 layers x 4 heads
    path = HeadScores(GRID).save(tmp_path / "s.json")
    means = {tuple(map(int, k.split("-"))): v[0] for k, v in GRID.items()}
    heads, scores = select_heads(HeadSelectionArguments(head_scores=str(path), mask_top_k=3), model)
    assert heads == sorted(sorted(means, key=means.get)[-3:]) and scores.num_layers == 3
    heads, _ = select_heads(HeadSelectionArguments(mask_threshold=0.03), model, scores=path)
    assert heads == sorted(k for k, m in means.items() if m >= 0.03)
    with pytest.raises(ValueError, match="32 layers x 32 heads but the model has 3 layers x 4"):
        select_heads(HeadSelectionArguments(), model, scores="Llama-3.1-8B-Instruct")
    with pytest.raises(ValueError, match="no model name to find them by"):
        resolve_head_scores(None, model)  # built in memory: no name
    model.config._name_or_path = str(tmp_path)  # a local model directory without scores
    with pytest.raises(ValueError, match="none found for the model"):
        resolve_head_scores(None, model)
    assert resolve_head_scores(None, "HuggingFaceTB/SmolLM2-135M-Instruct").num_layers == 30


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mask_threshold": float("nan")}, "mask_threshold` must be a finite number"),
        ({"mask_threshold": float("inf")}, "mask_threshold` must be a finite number"),
        ({"mask_threshold": 0.0}, r"mask_threshold` must be in \(0, 1\]"),
        ({"mask_threshold": -0.1}, r"mask_threshold` must be in \(0, 1\]"),
        ({"mask_threshold": True}, "mask_threshold` must be a finite number"),
        ({"mask_top_k": 2.5}, "mask_top_k` must be an integer"),
        ({"mask_top_k": 2.0}, "mask_top_k` must be an integer"),
        ({"mask_top_k": True}, "mask_top_k` must be an integer"),
        ({"mask_top_k": 0}, "mask_top_k` must be >= 1"),
        ({"mask_strategy": "best"}, "mask_strategy` must be one of retrieval"),
        ({"mask_seed": 1.5}, "mask_seed` must be an integer"),
        ({"mask_seed": None}, "mask_seed` must be an integer"),
        ({"mask_seed": -1}, r"mask_seed` must be a seed in \[0, 2\*\*32 - 1\], got -1"),
        ({"mask_seed": 2**32}, r"mask_seed` must be a seed in \[0, 2\*\*32 - 1\], got 4294967296"),
        ({"head_scores": ""}, "head_scores` must be a path"),
        ({"head_scores": 3}, "head_scores` must be a path"),
        ({"mask_threshold": None, "head_scores": "s.json"}, "Set `mask_threshold` or `mask_top_k`"),
        ({"heads": "1-2", "mask_top_k": 2}, "Give either `heads` or a selection"),
        ({"heads": "1-2,1-2"}, "lists 1-2 more than once"),
    ],
)
def test_selection_arguments_refuse_bad_values(kwargs, match):
    from trl_retmask.heads import HeadSelectionArguments

    with pytest.raises(ValueError, match=match):
        HeadSelectionArguments(**kwargs)


def test_no_rule_masks_nothing_in_the_selection_but_is_refused_by_the_trainer_config(tmp_path):
    from trl_retmask import RetMaskConfig
    from trl_retmask.heads import HeadSelectionArguments

    assert not HeadSelectionArguments(mask_threshold=None).masks
    assert HeadSelectionArguments(mask_threshold=None, heads="0-1").masks
    with pytest.raises(ValueError, match="RetMask masks heads: set `mask_threshold` or `mask_top_k`"):
        RetMaskConfig(str(tmp_path), mask_threshold=None, report_to="none")


def test_seed_range_is_inclusive_and_checked_in_every_config(tmp_path):
    from trl_retmask import RetMaskConfig
    from trl_retmask.heads import HeadSelectionArguments
    from trl_retmask.scripts.eval import EvalScriptArguments

    for seed in (0, 2**32 - 1):  # both ends are valid seeds
        assert HeadSelectionArguments(mask_seed=seed).mask_seed == seed
        assert RetMaskConfig(str(tmp_path), generation_seed=seed, report_to="none").generation_seed == seed
    with pytest.raises(ValueError, match=r"generation_seed` must be a seed"):
        RetMaskConfig(str(tmp_path), generation_seed=-1, report_to="none")
    with pytest.raises(ValueError, match=r"generation_seed \(defaults to `seed`\)` must be a seed.*got -3"):
        RetMaskConfig(str(tmp_path), seed=-3, report_to="none")  # the inherited TrainingArguments seed
    with pytest.raises(ValueError, match=r"eval_seed` must be a seed"):
        EvalScriptArguments(eval_seed=2**32)


# ------------------------------------------------------------------ mutation-tested edges (docs/testing.md)
def test_single_numbers_and_empty_lists_are_scores():
    s = HeadScores({"0-0": 0.25, "0-1": 1, "1-0": [], "1-1": [0.5, 1]})  # some tools store the mean only
    assert s.scores == {(0, 0): [0.25], (0, 1): [1.0], (1, 0): [], (1, 1): [0.5, 1.0]}
    assert all(type(v) is float for vals in s.scores.values() for v in vals)
    assert s.mean_scores() == {(0, 0): 0.25, (0, 1): 1.0, (1, 0): 0.0, (1, 1): 0.75}
    assert repr(s) == "HeadScores(2 layers x 2 heads, 4 scored)"
    with pytest.raises(
        ValueError, match=r"Malformed scores for head '0-0': expected a list of finite numbers, got True"
    ):
        HeadScores({"0-0": True})
    with pytest.raises(ValueError, match=r"got \[1, False\]"):
        HeadScores({"0-0": [1, False]})
    for bad in ({}, [("0-0", [1])], None):
        with pytest.raises(ValueError, match=r"HeadScores needs a non-empty mapping \{'LAYER-HEAD': \[scores...\]\}"):
            HeadScores(bad)


def test_layout_boundaries():
    assert (HeadScores({"2-3": [1]}, num_layers=3, num_heads=4).num_layers,) == (3,)
    for key in ("3-0", "0-4"):  # one past the last layer / head
        with pytest.raises(ValueError, match=r"Heads \[\(\d, \d\)\] lie outside 3 layers x 4 heads"):
            HeadScores({key: [1]}, num_layers=3, num_heads=4)
    for bad in ({"num_layers": 0, "num_heads": 4}, {"num_layers": 3, "num_heads": 0}):
        with pytest.raises(ValueError, match="must be >= 1, got 0"):
            HeadScores({"0-0": [1]}, **bad)
    from trl_retmask.scores import MAX_HEADS

    assert MAX_HEADS == 1024 * 1024
    assert HeadScores({"0-0": [1]}, num_layers=1024, num_heads=1024).num_heads == 1024  # exactly the limit
    with pytest.raises(ValueError, match="A grid of 1025 layers x 1024 heads is beyond any model"):
        HeadScores({"0-0": [1]}, num_layers=1025, num_heads=1024)
    with pytest.raises(ValueError, match=r"1 of 3 layers x 3 heads are given; missing e.g. 0-0, 0-1, 0-2, 1-0, 1-1\. "):
        HeadScores({"2-2": [1]})  # 8 missing: the first five named


def test_load_reads_the_first_line_and_nested_dirs(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"0-0": [0.5]}\nnot json at all\n')  # the original tools read only the first line
    assert HeadScores.load(path).scores == {(0, 0): [0.5]}
    path.write_text('\n  {"0-0": [0.5]}  \n\n')
    assert HeadScores.load(path).scores == {(0, 0): [0.5]}
    path.write_text("[]")
    with pytest.raises(
        ValueError, match=r"one non-empty JSON object \{\"LAYER-HEAD\": \[\.\.\.\]\}; got list \(empty\)\.$"
    ):
        HeadScores.load(path)
    path.write_text("3")
    with pytest.raises(ValueError, match=r"got int\.$"):
        HeadScores.load(path)
    saved = HeadScores({"0-0": [1]}).save(tmp_path / "a" / "b" / "s.json")  # parents created
    assert saved.read_text() == '{"0-0": [1.0]}'
    plain = tmp_path / "scores"  # a score file without the .json suffix
    plain.write_text('{"0-0": [0.5]}')
    assert HeadScores.from_pretrained(plain).scores == {(0, 0): [0.5]}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HeadScores.from_pretrained(tmp_path / "missing.json")  # a .json path is a file, never a Hub id
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"The directory '.*empty_dir' holds no retmask_head_scores\.json\. Detect"):
        HeadScores.from_pretrained(tmp_path / "empty_dir")


def test_masked_heads_record(tmp_path):
    d = tmp_path / "model"
    HeadScores(GRID).save_pretrained(d)
    (d / "retmask.json").write_text(json.dumps({"masked_heads": ["2-3", [0, 0]]}))
    assert HeadScores.from_pretrained(d).trained_heads == [(0, 0), (2, 3)]  # last layer/head: inside
    (d / "retmask.json").write_text(json.dumps({"masked_heads": []}))
    assert HeadScores.from_pretrained(d).trained_heads is None
    for bad in ([[3, 0]], [[0, 4]]):
        (d / "retmask.json").write_text(json.dumps({"masked_heads": bad}))
        with pytest.raises(ValueError, match="retmask.json lists masked heads .* outside its score grid"):
            HeadScores.from_pretrained(d)
    (d / "retmask.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"retmask.json is not a valid RetMask record \("):
        HeadScores.from_pretrained(d)


def test_selection_boundaries():
    # means: 0-0: 0.5, 0-1: 0.25 (exactly on the threshold below), 1-0: 0.25, 1-1: 0.0
    s = HeadScores({"0-0": [0.5], "0-1": [0.25], "1-0": [0.0, 0.5], "1-1": [0.0]})
    assert s.ranked() == [((0, 0), 0.5), ((0, 1), 0.25), ((1, 0), 0.25), ((1, 1), 0.0)]  # ties by (layer, head)
    assert s.select(threshold=0.25) == [(0, 0), (0, 1), (1, 0)]  # >=, not >
    assert s.select(threshold=0.5) == [(0, 0)]
    assert s.select(threshold=1e-9) == [(0, 0), (0, 1), (1, 0)]
    assert s.select(top_k=2) == [(0, 0), (0, 1)]  # the tie is broken by (layer, head)
    assert s.select(top_k=4) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # every head is allowed
    with pytest.raises(ValueError, match=r"top_k must be at most 4 \(the model's heads\); got 5"):
        s.select(top_k=5)
    with pytest.raises(ValueError, match=r"No head has a mean score >= 0.75 \(the highest is 0.5000\)\. Lower"):
        s.select(threshold=0.75)
    assert s.select(threshold=1.0 - 0.5) == [(0, 0)]
    # random_non_retrieval needs as many non-retrieval heads as retrieval heads: 2 of 4 is exactly enough
    assert sorted(s.select(top_k=2, strategy="random_non_retrieval", seed=1)) == [(1, 0), (1, 1)]
    with pytest.raises(ValueError, match="Cannot draw 3 random_non_retrieval heads from 1 candidates"):
        s.select(top_k=3, strategy="random_non_retrieval")
    assert s.select(top_k=4, strategy="random") == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert s.select(top_k=1, strategy="random", seed=5) == [random.Random(5).sample(sorted(s.mean_scores()), 1)[0]]
    assert s.select(top_k=1, strategy="random") == s.select(top_k=1, strategy="random", seed=0)  # seed defaults to 0


def test_sparsity_edge_cases():
    zero = HeadScores({"0-0": [0.0], "0-1": [0.0]}).sparsity()
    assert zero["gini"] == 0.0 and zero["max"] == 0.0 and zero["n_heads"] == 2
    assert all(math.isnan(zero[k]) for k in ("entropy", "top_1pct_mass", "top_5pct_mass"))
    one = HeadScores({"0-0": [0.3]}).sparsity()
    assert one["entropy"] == 0.0 and one["gini"] == 0.0 and one["top_1pct_mass"] == 1.0
    on_edges = HeadScores({"0-0": [0.1], "0-1": [0.05], "0-2": [0.0499], "0-3": [-1.0]}).sparsity()  # >= edges
    assert (on_edges["n_above_0.1"], on_edges["n_above_0.05"]) == (1, 2)
    assert on_edges["top_1pct_mass"] == pytest.approx(0.1 / 0.1999)  # negative scores clip to 0; at least one head
    assert on_edges["mean"] == pytest.approx(0.1999 / 4) and on_edges["max"] == 0.1
    even = HeadScores({"0-0": [0.2], "0-1": [0.2]}).sparsity()
    assert even["gini"] == pytest.approx(0.0) and even["entropy"] == pytest.approx(1.0)
    assert even["top_5pct_mass"] == pytest.approx(0.5)


def test_plot_boxes_the_given_heads(tmp_path, monkeypatch):
    import trl_retmask.plotting as plotting

    figures = []
    save = plotting.save_figure
    monkeypatch.setattr(plotting, "save_figure", lambda fig, path: figures.append(fig) or save(fig, path))
    s = HeadScores(GRID)
    s.plot(tmp_path / "a.png", heads=[(2, 1)])
    s.plot(tmp_path / "b.png", title="mine")
    ax, cbar = figures[0].axes
    (box,) = ax.patches
    assert box.get_xy() == (0.5, 1.5) and (box.get_width(), box.get_height()) == (1, 1)
    assert box.get_edgecolor()[:3] == (1.0, 0.0, 0.0) and not box.get_fill()
    assert (ax.get_xlabel(), ax.get_ylabel(), cbar.get_ylabel()) == ("head", "layer", "mean retrieval score")
    assert ax.get_title() == f"Retrieval scores (gini {s.sparsity()['gini']:.2f}, 0 heads >= 0.1, 1 selected)"
    assert figures[1].axes[0].get_title() == "mine" and not figures[1].axes[0].patches
    image = ax.images[0]
    assert np.array_equal(image.get_array(), s.to_array()) and image.origin == "lower"


def test_selection_arguments_forms(tmp_path):
    from trl_retmask.heads import HeadSelectionArguments
    from trl_retmask.scores import resolve_head_scores
    from trl_retmask.selection import select_heads

    path = HeadScores(GRID).save(tmp_path / "s.json")
    args = HeadSelectionArguments(
        head_scores=path, mask_top_k=2, mask_threshold=0.5, mask_strategy="random", mask_seed=7
    )
    assert args.head_scores == str(path)  # a PathLike becomes a string
    assert args.selection == {"threshold": None, "top_k": 2, "strategy": "random", "seed": 7}  # top-k replaces it
    assert HeadSelectionArguments().selection == {"threshold": 0.1, "top_k": None, "strategy": "retrieval", "seed": 0}
    assert HeadSelectionArguments(mask_threshold=1).mask_threshold == 1  # the upper end is allowed
    with pytest.raises(ValueError, match=r"`head_scores` must be a path, model id or Hub repo id, got '  '\."):
        HeadSelectionArguments(head_scores="  ")
    scores = HeadScores(GRID)
    assert resolve_head_scores(scores) is scores
    assert resolve_head_scores(scores, model=str(tmp_path)) is scores  # a name is not validated against
    assert resolve_head_scores(None, tmp_path / "s.json").scores == scores.scores  # a PathLike model name
    heads, used = select_heads(
        HeadSelectionArguments(head_scores="Llama-3.1-8B-Instruct", mask_top_k=1), tiny_config("llama"), scores=scores
    )  # explicit scores win over args.head_scores
    assert used is scores and heads == [(2, 3)]


def test_models_without_a_name_and_long_error_lists(tmp_path):
    from types import SimpleNamespace

    from trl_retmask.scores import resolve_head_scores

    for nameless in (object(), SimpleNamespace(config=SimpleNamespace()), SimpleNamespace(config=None)):
        with pytest.raises(ValueError) as e:
            resolve_head_scores(None, nameless)
        assert str(e.value).startswith("No head scores given and no model name to find them by: pass `head_scores`")
    d = tmp_path / "model"
    HeadScores(GRID).save_pretrained(d)
    (d / "retmask.json").write_text(json.dumps({"masked_heads": [[3, h] for h in range(4)] + [[4, 0], [5, 0]]}))
    with pytest.raises(ValueError, match=r"masked heads \[\(3, 0\), \(3, 1\), \(3, 2\), \(3, 3\), \(4, 0\)\] outside"):
        HeadScores.from_pretrained(d)  # the first five of six
    with pytest.raises(ValueError, match=r"Heads \[\(0, 3\), \(1, 3\), \(2, 0\), \(2, 1\), \(2, 2\)\] lie outside 2"):
        HeadScores({f"{l}-{h}": [1] for l in range(4) for h in range(4)}, num_layers=2, num_heads=3)


def test_threshold_bounds_and_rank_ties():
    """`threshold` lies in (0, 1]: 0 would mask every head (refused), 1 only perfect ones (kept); heads with equal
    scores rank by (layer, head), so a top-k cut at a tie is the same on every run."""
    scores = HeadScores({"0-1": [0.5], "0-0": [0.5], "1-0": [1.0], "1-1": [0.2]}, num_layers=2, num_heads=2)
    for bad in (0, -0.1, 1.01):
        with pytest.raises(ValueError, match="threshold"):
            scores.select(threshold=bad)
    assert scores.select(threshold=1) == [(1, 0)]
    assert [h for h, _ in scores.ranked()] == [(1, 0), (0, 0), (0, 1), (1, 1)]
    assert scores.select(top_k=2) == [(0, 0), (1, 0)]


def test_error_messages_in_full(tmp_path):
    """Each refusal's whole text (the problem and the fix), so that no part of a message is lost unnoticed."""
    from types import SimpleNamespace

    from trl_retmask.heads import HeadSelectionArguments
    from trl_retmask.scores import bundled_models, resolve_head_scores
    from trl_retmask.selection import select_heads

    bundled = "Llama-3.1-8B-Instruct, Olmo-3-7B-Think, Qwen3-8B, SmolLM2-135M-Instruct"
    assert ", ".join(bundled_models()) == bundled
    missing = tmp_path / "x.json"
    cases = [
        (lambda: HeadScores({}), "HeadScores needs a non-empty mapping {'LAYER-HEAD': [scores...]}."),
        (
            lambda: HeadScores({"0-0": [1], "0-1": [1], "00-1": [1]}),
            "Keys '0-1' and '00-1' both name layer 0 head 1; each head must appear once.",
        ),
        (lambda: HeadScores({"0-0": [1]}, num_layers=0), "`num_layers` must be >= 1, got 0."),
        (lambda: HeadScores({"0-0": [1]}, num_heads=0), "`num_heads` must be >= 1, got 0."),
        # one dimension given, the other inferred: the grid must still be complete
        (
            lambda: HeadScores({"0-0": [1]}, num_layers=2),
            "Scores must cover every head of the model: 1 of 2 layers x 1 heads are given; missing e.g. 1-0. Use a "
            "complete score file (as `trl-retmask detect` writes), or pass num_layers/num_heads explicitly.",
        ),
        (
            lambda: HeadScores({"0-0": [1]}).select(top_k=1, strategy="x"),
            "Unknown mask strategy 'x'; choose one of retrieval, random_non_retrieval, random.",
        ),
        (
            lambda: HeadScores({"0-0": [1]}).select(),
            "Give exactly one of `threshold` (mask heads scoring >= it) or `top_k` (mask the k best heads); got "
            "threshold=None, top_k=None.",
        ),
        (
            lambda: HeadScores({"0-0": [1], "0-1": [0.5]}).select(top_k=2, strategy="random_non_retrieval"),
            "Cannot draw 2 random_non_retrieval heads from 0 candidates; select fewer retrieval heads.",
        ),
        (
            lambda: HeadSelectionArguments(head_scores="s.json", mask_threshold=None, mask_top_k=None),
            "Set `mask_threshold` or `mask_top_k` to choose the heads to mask.",
        ),
        (
            lambda: select_heads(HeadSelectionArguments(mask_threshold=None), None),
            "Set `heads`, `mask_threshold` or `mask_top_k` to choose the heads to mask.",
        ),
        (
            lambda: HeadScores.load(missing),
            f"Head-score file {missing} does not exist. Pass a file or directory written by `trl-retmask detect` (or "
            f"the original retrieval-head tools), or a model id with bundled scores: {bundled}.",
        ),
        (
            lambda: HeadScores.from_pretrained(tmp_path),
            f"The directory {str(tmp_path)!r} holds no retmask_head_scores.json. Detect them with `trl-retmask detect "
            f"--model_name_or_path {tmp_path} --output_dir DIR` and pass `--head_scores DIR` (bundled: {bundled}).",
        ),
        (
            lambda: resolve_head_scores(None, object()),
            "No head scores given and no model name to find them by: pass `head_scores` (a score file, a directory or "
            "Hub repo holding retmask_head_scores.json, or a bundled model id).",
        ),
        (
            lambda: resolve_head_scores(None, SimpleNamespace(config=SimpleNamespace(_name_or_path=str(tmp_path)))),
            f"No head scores given, and none found for the model {str(tmp_path)!r}. The directory {str(tmp_path)!r} "
            f"holds no retmask_head_scores.json. Detect them with `trl-retmask detect --model_name_or_path {tmp_path} "
            f"--output_dir DIR` and pass `--head_scores DIR` (bundled: {bundled}). Or pass `head_scores`: a score "
            "file, a directory or Hub repo with retmask_head_scores.json, or a bundled model id.",
        ),
    ]
    for make, message in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            make()
        assert str(e.value) == message
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError) as e:
        HeadScores.load(deep)
    assert str(e.value) == f"Head-score file {deep}: its JSON is nested too deeply to be a score file."
    # A JSON-lines file (the original tools read its first line) is held to the same duplicate-key rule.
    lines = tmp_path / "lines.json"
    lines.write_text('{"0-0": [1], "0-0": [2]}\n{"other": "record"}\n')
    with pytest.raises(ValueError, match="duplicate key '0-0'"):
        HeadScores.load(lines)
