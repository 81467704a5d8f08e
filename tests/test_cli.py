"""`trl-retmask <stage>` on tiny local models and the bundled scores: TRL's parser everywhere (`--config`, underscore
flags = field names), the one error path (one line, exit 2), and each stage's result checked independently."""

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.recipe_utils import (
    HEAD_SCORES,
    PROMPT_TEXTS,
    RECIPES,
    REPO,
    SELECTED,
    save_tiny_model,
    tiny_overrides,
    write_chat_log,
    write_head_scores,
)
from trl_retmask import cli
from trl_retmask.cli import main
from trl_retmask.scripts import STAGES

LLAMA_SCORES = REPO / "trl_retmask" / "data" / "head_scores" / "Llama-3.1-8B-Instruct.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {
        "model": save_tiny_model(root / "model"),
        "data": write_chat_log(root / "prompts.jsonl"),
        "scores": write_head_scores(root / "scores.json"),
    }


def _run_json(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


def _user_error(capsys, argv) -> str:
    """Run a command that must fail as a user error: exit code 2 and exactly one line on stderr, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("trl-retmask")]
    assert len(lines) == 1 and "Traceback" not in err, err  # (other lines: progress bars of model loading)
    assert lines[0].startswith(f"trl-retmask {argv[0]}: error: ")
    return lines[0]


def _top_k_by_hand(k):
    raw = json.loads(LLAMA_SCORES.read_text())
    means = {tuple(int(x) for x in key.split("-")): sum(v) / len(v) for key, v in raw.items()}
    return sorted(sorted(means, key=lambda h: (-means[h], h))[:k]), means


# ------------------------------------------------------------------------------------------- parser shape
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_flag_is_a_field_name(stage):
    """Each option of a stage is `--<field>` of one of its dataclasses (the dashed alias is argparse's spelling)."""
    import importlib

    module = importlib.import_module(f"trl_retmask.scripts.{stage}")
    parser = module.make_parser()
    fields = {f.name for t in parser.dataclass_types for f in dataclasses.fields(t)}
    flags = {}
    for action in parser._actions:
        flags.setdefault(action.dest, set()).update(action.option_strings)
    flags.pop("help")
    assert set(flags) <= fields
    for dest, options in flags.items():
        assert f"--{dest}" in options, (dest, options)
    selection = {"head_scores", "mask_threshold", "mask_top_k", "mask_strategy", "mask_seed"}
    if stage != "detect":
        assert selection <= fields, stage


def test_stages_build_as_subparsers_like_trl_scripts():
    """`make_parser(subparsers)` adds the stage to a TrlParser's subparsers, as `trl/scripts/*.py` do."""
    from trl import TrlParser

    from trl_retmask.scripts import heads

    top = TrlParser(prog="x")
    sub = top.add_subparsers(dest="command")
    parser = heads.make_parser(sub)
    assert parser.prog.endswith("heads")
    args, selection = parser.parse_args_and_config(["--mask_top_k", "3"])
    assert selection.mask_top_k == 3 and selection.selection["top_k"] == 3 and args.show == 10


def test_pairs_takes_retmask_configs_generation_defaults():
    """No second set of defaults: `pairs` parses RetMaskConfig itself."""
    from trl_retmask.config import RetMaskConfig
    from trl_retmask.scripts import pairs

    script_args, config, _ = pairs.make_parser().parse_args_and_config(["--output", "/tmp/never.jsonl"])
    reference = {f.name: f.default for f in dataclasses.fields(RetMaskConfig)}
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "generation_batch_size", "mask_threshold"):
        assert getattr(config, name) == reference[name], name
    assert isinstance(config, RetMaskConfig)


def test_top_level_help_lists_every_stage(capsys):
    assert main([]) == 0
    text = capsys.readouterr().out
    assert all(stage in text for stage in STAGES)


def test_no_import_circle_between_cli_and_stages():
    code = (
        "import sys, trl_retmask.scripts.train, trl_retmask.scripts.pairs, trl_retmask.scripts.heads; "
        "assert 'trl_retmask.cli' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# ------------------------------------------------------------------------------------------------- heads
def test_heads_summary_selection_heatmap_into_a_directory(capsys, tmp_path):
    plots = tmp_path / "plots"
    plots.mkdir()
    out = _run_json(
        capsys,
        [
            "heads",
            "--head_scores",
            str(LLAMA_SCORES),
            "--mask_top_k",
            "8",
            "--plot",
            str(plots),
            "--save_heads",
            str(tmp_path / "heads.json"),
        ],
    )
    expected, means = _top_k_by_hand(8)
    assert out["layers"] == 32 and out["heads_per_layer"] == 32
    assert out["selection"]["heads"] == [f"{layer}-{head}" for layer, head in expected]
    assert out["selection"]["scores"]["15-30"] == pytest.approx(means[(15, 30)], abs=1e-4)
    assert out["sparsity"]["n_above_0.1"] == sum(m >= 0.1 for m in means.values())
    assert json.loads((tmp_path / "heads.json").read_text()) == [f"{layer}-{head}" for layer, head in expected]
    assert out["heatmap"] == str(plots / "heads.png")  # the real path, inside the directory
    assert (plots / "heads.png").read_bytes()[:4] == b"\x89PNG"
    best = max(means, key=means.get)
    assert list(out["top"])[0] == f"{best[0]}-{best[1]}"


def test_heads_heatmap_into_a_new_directory_named_with_a_trailing_slash(capsys, tmp_path):
    """`--plot plots.v2/` (not there yet; its name has a suffix): the slash names a directory. The name-length check
    handed on a `Path`, which drops the slash, and the heatmap went to a file `plots.v2`."""
    plot = str(tmp_path / "plots.v2") + "/"
    out = _run_json(capsys, ["heads", "--head_scores", str(LLAMA_SCORES), "--mask_top_k", "8", "--plot", plot])
    assert out["heatmap"] == str(tmp_path / "plots.v2" / "heads.png")
    assert (tmp_path / "plots.v2" / "heads.png").read_bytes()[:4] == b"\x89PNG"


def test_heads_random_control_avoids_retrieval_heads(capsys):
    out = _run_json(
        capsys,
        [
            "heads",
            "--head_scores",
            str(LLAMA_SCORES),
            "--mask_top_k",
            "8",
            "--mask_strategy",
            "random_non_retrieval",
            "--mask_seed",
            "3",
        ],
    )
    control = [tuple(int(x) for x in h.split("-")) for h in out["selection"]["heads"]]
    retrieval, means = _top_k_by_hand(8)
    pool = sorted(set(means) - set(retrieval))
    assert control == sorted(random.Random(3).sample(pool, 8))  # --mask_seed 3 draws as random.Random(3)
    assert control != sorted(random.Random(0).sample(pool, 8))


def test_heads_reads_a_config_file(capsys, tmp_path):
    config = tmp_path / "heads.yaml"
    config.write_text(yaml.safe_dump({"head_scores": str(LLAMA_SCORES), "mask_top_k": 5, "show": 2}))
    out = _run_json(capsys, ["heads", "--config", str(config), "--show", "3"])  # the command line wins
    assert out["selection"]["n_heads"] == 5 and len(out["top"]) == 3


# ------------------------------------------------------------------------------------------ detect / niah
def test_detect_reads_a_config_file(tmp_path, hay_dir):
    from trl_retmask.scripts import detect

    config = tmp_path / "detect.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "some/model",
                "context_lengths": [64, 128],
                "depths": [0, 100],
                "haystack_dir": str(hay_dir),
                "num_needles": 2,
                "dtype": "bfloat16",
            }
        )
    )
    script_args, model_args = detect.make_parser().parse_args_and_config(["--config", str(config), "--depths", "50"])
    assert script_args.context_lengths == [64, 128] and script_args.depths == [50.0]
    assert script_args.haystack_dir == str(hay_dir) and script_args.num_needles == 2
    assert model_args.model_name_or_path == "some/model" and model_args.dtype == "bfloat16"


def test_niah_runs_from_a_config_file_with_heads_masked(capsys, tiny, hay_dir, tmp_path):
    config = tmp_path / "niah.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny["model"]),
                "context_lengths": [60],
                "depths": [0, 100],
                "haystack_dir": str(hay_dir),
                "max_new_tokens": 3,
                "heads": "0-1,2-3",
                "output_dir": str(tmp_path / "ev"),
            }
        )
    )
    out = _run_json(capsys, ["niah", "--config", str(config)])
    assert out["num_samples"] == 6 and out["masked_heads"] == 2
    assert sorted(out["grid"]) == ["60@0", "60@100"]
    # the stored answers are those of the model under the two heads (an API call), not the unmasked ones
    from trl_retmask import evaluate_niah
    from trl_retmask.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny["model"]))
    kw = dict(context_lengths=[60], depths=[0, 100], haystack_dir=str(hay_dir), max_new_tokens=3)
    stored = {
        r["key"]: r["response"]
        for r in map(json.loads, (tmp_path / "ev" / "niah.rank0.jsonl").read_text().splitlines())
    }
    masked = {r["key"]: r["response"] for r in evaluate_niah(model, tokenizer, heads=[(0, 1), (2, 3)], **kw)["records"]}
    plain = {r["key"]: r["response"] for r in evaluate_niah(model, tokenizer, **kw)["records"]}
    assert stored == masked != plain


def test_niah_refuses_scores_of_another_model(capsys, tiny, tmp_path):
    other = {f"{layer}-{head}": [0.5 if (layer, head) == (0, 1) else 0.0] for layer in range(5) for head in range(4)}
    (tmp_path / "other.json").write_text(json.dumps(other))
    line = _user_error(
        capsys,
        [
            "niah",
            "--model_name_or_path",
            str(tiny["model"]),
            "--head_scores",
            str(tmp_path / "other.json"),
            "--mask_top_k",
            "1",
            "--context_lengths",
            "60",
        ],
    )
    assert "5 layers" in line and "3 layers" in line


# ------------------------------------------------------------------------------------------------ export
def test_export_zeroes_the_selected_heads_and_refuses_a_non_empty_dir(capsys, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    target = tmp_path / "masked"
    argv = [
        "export",
        "--model_name_or_path",
        str(tiny["model"]),
        "--head_scores",
        str(tiny["scores"]),
        "--mask_top_k",
        "2",
        "--output_dir",
        str(target),
    ]
    out = _run_json(capsys, argv)
    assert out["masked_heads"] == ["0-1", "2-3"]
    masked = AutoModelForCausalLM.from_pretrained(target)
    original = AutoModelForCausalLM.from_pretrained(tiny["model"])
    head_dim = 16
    for layer in range(3):
        w_m = masked.model.layers[layer].self_attn.o_proj.weight
        w_o = original.model.layers[layer].self_attn.o_proj.weight
        for head in range(4):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            if (layer, head) in SELECTED:
                assert torch.all(w_m[:, cols] == 0)
            else:
                assert torch.equal(w_m[:, cols], w_o[:, cols])
    assert (target / "tokenizer.json").is_file()

    before = (target / "model.safetensors").read_bytes()
    assert "--overwrite True" in _user_error(capsys, argv)
    assert (target / "model.safetensors").read_bytes() == before
    source = (tiny["model"] / "model.safetensors").read_bytes()
    _user_error(capsys, [*argv[:-1], str(tiny["model"])])  # onto the source model: refused, weights untouched
    assert (tiny["model"] / "model.safetensors").read_bytes() == source
    assert main([*argv, "--overwrite", "True"]) == 0


# ------------------------------------------------------------------------------------------------- pairs
def test_pairs_writes_a_preference_dataset(capsys, tiny, tmp_path):
    from trl_retmask.masking import mask_heads
    from trl_retmask.models import load_model_and_tokenizer

    output = tmp_path / "pairs.jsonl"
    argv = [
        "pairs",
        "--model_name_or_path",
        str(tiny["model"]),
        "--dataset_name",
        str(tiny["data"]),
        "--heads",
        "0-1,2-3",
        "--temperature",
        "0",
        "--max_new_tokens",
        "5",
        "--generation_batch_size",
        "3",
        "--output",
        str(output),
        "--output_dir",
        str(tmp_path / "run"),
    ]
    stats = _run_json(capsys, argv)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert stats["prompts"] == len(PROMPT_TEXTS) and stats["kept"] == len(rows) > 0
    assert stats["masked_heads"] == ["0-1", "2-3"]
    # greedy: each chosen / rejected response is what the model says without / with those heads masked (independent
    # generate calls), and exactly the pairs whose two responses differ are kept
    model, tokenizer = load_model_and_tokenizer(str(tiny["model"]))

    def answer(text, heads=()):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad(), mask_heads(model, heads):
            new = model.generate(**ids, max_new_tokens=5, do_sample=False)[0, ids["input_ids"].shape[1] :]
        return tokenizer.decode(new, skip_special_tokens=True)

    expected = [(t, answer(t), answer(t, SELECTED)) for t in PROMPT_TEXTS]
    expected = [e for e in expected if e[1].strip() != e[2].strip()]
    got = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    assert sorted(got) == sorted(expected) and stats["kept"] == len(expected)

    # Cached by default where the trainer caches (<output_dir>/_retmask_pairs): a rerun generates nothing.
    assert stats["batches_generated"] == -(-len(PROMPT_TEXTS) // 3) and stats["batches_from_cache"] == 0
    assert any((tmp_path / "run" / "_retmask_pairs").glob("*/pairs.meta.json"))
    again = _run_json(capsys, [*argv, "--overwrite", "True"])
    assert again["batches_generated"] == 0 and again["batches_from_cache"] == stats["batches_generated"]
    assert [json.loads(line) for line in output.read_text().splitlines()] == rows


def test_pairs_checks_output_before_generation(capsys, tiny, tmp_path, monkeypatch):
    import trl_retmask.pairs

    monkeypatch.setattr(trl_retmask.pairs, "generate_pairs", lambda *a, **k: pytest.fail("generated"))
    line = _user_error(capsys, ["pairs", "--model_name_or_path", str(tiny["model"]), "--output", str(tmp_path)])
    assert "is a directory" in line
    assert "--batch_size" not in line
    assert "generation_batch_size" in _user_error(
        capsys, ["pairs", "--output", str(tmp_path / "p.jsonl"), "--generation_batch_size", "0"]
    )


# ------------------------------------------------------------------------------------------------- eval
def test_eval_runs_the_suite_with_heads_masked(capsys, tiny, tmp_path):
    """`--heads` masks: the stored generations are those of `evaluate_long_context(heads=...)` (itself checked
    against hand-masked generation in tests/test_surface.py), not those of the unmasked model."""
    from trl_retmask import evaluate_long_context
    from trl_retmask.models import load_model_and_tokenizer

    assert (
        main(
            [
                "eval",
                "--model_name_or_path",
                str(tiny["model"]),
                "--lengths",
                "256",
                "--n_per_task",
                "1",
                "--categories",
                "rerank",
                "--heads",
                "0-1",
                "--output_dir",
                str(tmp_path),
                "--name",
                "tiny",
                "--eval_seed",
                "5",
                "--batch_size",
                "1",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "| tiny | rerank |" in text and "masked heads: 0-1" in text
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["config"]["heads"] == ["0-1"] and (tmp_path / "tiny.png").is_file()
    stored = [
        o
        for line in (tmp_path / "tiny.generations.rank0.jsonl").read_text().splitlines()
        for o in json.loads(line)["outputs"]
    ]
    model, tokenizer = load_model_and_tokenizer(str(tiny["model"]))
    kw = dict(lengths=(256,), categories=["rerank"], n_per_task=1, keep_generations=True, progress=False, seed=5)
    assert {s["seed"] for s in saved["per_sample"]} == {5}  # --eval_seed: sample i of a task uses seed + i
    masked = [g["output"] for g in evaluate_long_context(model, tokenizer, heads=[(0, 1)], **kw)["generations"]]
    plain = [g["output"] for g in evaluate_long_context(model, tokenizer, **kw)["generations"]]
    assert sorted(stored) == sorted(masked) and masked != plain
    assert saved["per_sample"] == evaluate_long_context(model, tokenizer, heads=[(0, 1)], **kw)["per_sample"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "--name", "../x"], "plain file name"),
        (["eval", "--batch_size", "0"], "batch_size"),
        (["eval", "--lengths", "0"], "lengths"),
        (["niah", "--num_needles", "-1"], "num_needles"),
        (["niah", "--depths", "120"], "depths"),
        (["detect", "--max_new_tokens", "0"], "max_new_tokens"),
        (["niah", "--mask_top_k", "0"], "mask_top_k"),
        (["heads", "--no_such_flag", "1"], "no_such_flag"),
        (["export", "--output_dir", "x", "--heads", "0-1", "--mask_top_k", "3"], "either `heads`"),
        (["heads", "--head_scores", "no/such/dir/scores.json"], "does not exist"),
    ],
)
def test_bad_values_are_one_line_errors(capsys, argv, message):
    assert message in _user_error(capsys, argv)


def test_argparse_errors_exit_2_and_internal_errors_keep_their_traceback(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["niah", "--mask_top_k", "2.5"])
    assert e.value.code == 2
    assert "trl-retmask niah: error: argument --mask_top_k" in capsys.readouterr().err
    from trl_retmask.scripts import heads

    monkeypatch.setattr(heads, "main", lambda *a: (_ for _ in ()).throw(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        main(["heads"])


# ------------------------------------------------------------------------------------------- model loading
def test_missing_model_path_and_4bit_are_refused_before_loading(capsys, monkeypatch, tmp_path):
    import transformers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same refusal on a CUDA machine

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model")
    )
    line = _user_error(capsys, ["niah", "--model_name_or_path", str(tmp_path / "nope"), "--heads", "0-1"])
    assert "No such model directory or Hub id" in line and "Repo id must be" not in line
    line = _user_error(capsys, ["eval", "--model_name_or_path", str(tmp_path), "--load_in_4bit", "True"])
    assert (
        "--load_in_4bit quantizes the model with bitsandbytes, which needs a CUDA GPU (this machine has none)" in line
    )
    line = _user_error(
        capsys, ["train", "--recipe", "smollm2", "--load_in_4bit", "True", "--output_dir", str(tmp_path / "o")]
    )
    assert "--load_in_4bit" in line


# ------------------------------------------------------------------------------------------------- train
def test_train_recipe_yaml_defaults_are_parsed():
    from trl_retmask.scripts.train import make_parser

    script_args, args, model_args = make_parser(recipe="smollm2").parse_args_and_config(["--max_prompts", "4"])
    recipe = yaml.safe_load((RECIPES / "smollm2.yaml").read_text())
    assert model_args.model_name_or_path == recipe["model_name_or_path"] == "smollm2-135m-instruct"
    assert script_args.detect_heads is True and script_args.detect_depths == recipe["detect_depths"]
    assert args.mask_top_k == recipe["mask_top_k"] and args.learning_rate == recipe["learning_rate"]
    assert script_args.max_prompts == 4  # the command line over the recipe


def test_train_runs_a_recipe_with_trl_style_overrides(tiny, tmp_path):
    out = tmp_path / "trained"
    argv = [
        "train",
        "--recipe",
        "smollm2",
        *tiny_overrides(tiny["model"], tiny["data"], tiny["scores"], out),
        "--mask_top_k",
        "2",
        "--niah_eval",
        "False",
        "--max_steps",
        "1",
        "--compare_heads_with",
        "allenai/Olmo-3-7B-Think",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "retmask_recipe_summary.json").read_text())
    assert summary["masked_heads"] == ["0-1", "2-3"]
    assert summary["heads_compared"] == {
        "selection": {"threshold": None, "top_k": 2},
        "masked_here": 2,
        "reference": "allenai/Olmo-3-7B-Think",
        "reference_heads": 2,
    }
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "retmask_head_scores.json").read_text()) == HEAD_SCORES


def test_train_launches_through_accelerate_with_a_config(monkeypatch, tmp_path):
    launched = {}
    monkeypatch.setattr(cli, "launch_training", lambda launch, script: launched.update(launch=launch, script=script))
    argv = [
        "--recipe",
        "smollm2",
        "--accelerate_config",
        "zero1",
        "--num_processes",
        "2",
        "--learning_rate",
        "1e-6",
        "--output_dir",
        str(tmp_path),
    ]
    assert main(["train", *argv]) == 0
    config = launched["launch"][launched["launch"].index("--config_file") + 1]
    assert Path(config).name == "zero1.yaml" and Path(config).is_file()
    assert launched["launch"][-2:] == ["--num_processes", "2"]
    assert launched["script"] == ["--recipe", "smollm2", "--learning_rate", "1e-6", "--output_dir", str(tmp_path)]
    # what accelerate would run: the training module with the script arguments
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args([*launched["launch"], "--module", cli.TRAIN_MODULE, *launched["script"]])
    assert args.module and args.training_script == "trl_retmask.scripts.train" and args.num_processes == 2


def test_train_help_lists_trl_arguments_with_recipe_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--recipe", "llama31", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--learning_rate" in text and "--mask_top_k" in text and "--detect_heads" in text
    assert "meta-llama/Llama-3.1-8B-Instruct" in text  # the recipe's default shown


def test_unknown_recipe_is_a_one_line_error(capsys):
    assert "smollm2" in _user_error(capsys, ["train", "--recipe", "nope"])


@pytest.mark.real_model
def test_detect_on_the_embedded_model_writes_loadable_scores(capsys, tmp_path):
    from trl_retmask.scores import HeadScores

    out = _run_json(
        capsys,
        [
            "detect",
            "--context_lengths",
            "512",
            "--depths",
            "0",
            "--num_needles",
            "2",
            "--output_dir",
            str(tmp_path),
            "--show",
            "3",
        ],
    )
    scores = HeadScores.from_pretrained(tmp_path)  # the directory, as `--head_scores DIR`
    assert (scores.num_layers, scores.num_heads) == (30, 9)
    assert list(out["top_heads"]) == [f"{l}-{h}" for (l, h), _ in scores.ranked()[:3]]


# ------------------------------------------------------------------------------------------------ reliability
def _no_model_loading(monkeypatch):
    from trl_retmask.scripts import common

    monkeypatch.setattr(common, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded a model"))


def test_package_root_is_lazy():
    """`trl-retmask --help` must not pay for torch/TRL (it took ~6 s when the root imported them eagerly)."""
    code = (
        "import sys, trl_retmask, trl_retmask.cli; assert 'torch' not in sys.modules and 'trl' not in sys.modules; "
        "from trl_retmask import RetMaskTrainer, RetMaskConfig, HeadScores, mask_heads; print(HeadScores.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "HeadScores", out.stderr


def test_file_outputs_never_replace_a_checkpoint_file(capsys, tiny, tmp_path, monkeypatch):
    """Data loss: `--save_heads MODEL/config.json` used to overwrite the model's config; every file output now
    refuses an existing file unless --overwrite True, and outputs under a file fail before any work."""
    _no_model_loading(monkeypatch)
    config = tiny["model"] / "config.json"
    before = config.read_bytes()
    line = _user_error(capsys, ["heads", "--head_scores", str(tiny["scores"]), "--save_heads", str(config)])
    assert "already exists" in line and "--overwrite True" in line and config.read_bytes() == before
    line = _user_error(capsys, ["detect", "--model_name_or_path", str(tiny["model"]), "--save", str(config)])
    assert "already exists" in line and config.read_bytes() == before
    line = _user_error(
        capsys,
        ["eval", "--model_name_or_path", str(tiny["model"]), "--output_dir", str(tiny["model"]), "--name", "config"],
    )
    assert "config.json" in line and config.read_bytes() == before
    line = _user_error(
        capsys,
        ["export", "--model_name_or_path", str(tiny["model"]), "--heads", "0-1", "--output_dir", str(config / "sub")],
    )
    assert "is a file" in line
    target = tmp_path / "heads.json"
    target.write_text("old")
    assert (
        main(["heads", "--head_scores", str(tiny["scores"]), "--save_heads", str(target), "--overwrite", "True"]) == 0
    )
    assert json.loads(target.read_text()) == [f"{layer}-{head}" for layer, head in SELECTED]


def test_detect_refuses_a_directory_holding_other_scores(capsys, tiny, tmp_path, monkeypatch):
    """A trained RetMask model keeps the scores it was trained with in retmask_head_scores.json: detecting into its
    directory would replace them."""
    _no_model_loading(monkeypatch)
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "retmask_head_scores.json").write_text(json.dumps(HEAD_SCORES))
    line = _user_error(capsys, ["detect", "--model_name_or_path", str(tiny["model"]), "--output_dir", str(trained)])
    assert "detection did not write" in line and "--overwrite True" in line
    assert json.loads((trained / "retmask_head_scores.json").read_text()) == HEAD_SCORES


def test_niah_resume_refuses_other_inputs_and_overwrite_redoes(capsys, tiny, tmp_path, hay_dir):
    """Stale results: another needle set in the same output_dir is refused, and the hint's flag exists."""
    needles = []
    for i, answer in enumerate(("seven", "night")):
        needles.append(tmp_path / f"n{i}.jsonl")
        needles[-1].write_text(
            json.dumps(
                {
                    "needle": f"the magic number is {answer}",
                    "question": "what is the magic number",
                    "real_needle": answer,
                }
            )
        )
    argv = [
        "niah",
        "--model_name_or_path",
        str(tiny["model"]),
        "--context_lengths",
        "60",
        "--depths",
        "50",
        "--haystack_dir",
        str(hay_dir),
        "--max_new_tokens",
        "2",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert main([*argv, "--needles", str(needles[0])]) == 0
    assert "another run" in _user_error(capsys, [*argv, "--needles", str(needles[1])])
    assert main([*argv, "--needles", str(needles[1]), "--overwrite", "True"]) == 0
    fresh = [*argv[:-1], str(tmp_path / "fresh"), "--needles", str(needles[1])]
    assert main(fresh) == 0  # the overwritten directory now holds what a fresh run of the new inputs holds
    for name in ("niah.meta.json", "niah.rank0.jsonl"):
        assert (tmp_path / "out" / name).read_text() == (tmp_path / "fresh" / name).read_text()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["niah", "--heads", "0-1,0-1"], "more than once"),
        (["heads", "--mask_topk", "3"], "did you mean --mask_top_k?"),
        (["heads", "--plot", "heatmap.txt"], "not an image format"),
        (["pairs", "--output", "p.jsonl", "--generation_kwargs", '{"max_new_tokens": 5}'], "field of its own"),
        (["pairs", "--output", "p.jsonl", "--generation_kwargs", '{"repetiton_penalty": 1.1}'], "not fields of"),
        (["pairs", "--output", "p.jsonl", "--beta", "nan"], "`beta` must be a finite number"),
    ],
)
def test_more_bad_values_are_one_line_errors(capsys, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in _user_error(capsys, argv)


def test_config_files_are_checked_before_parsing(capsys, tmp_path):
    """Resource blow-up: a 1 kB YAML of nested aliases expands to 10^9 values (the parser was killed for memory);
    malformed YAML printed a yaml traceback."""
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
    for prev, name in zip("abcdefgh", "bcdefghi"):
        bomb += f"{name}: &{name} [{', '.join([f'*{prev}'] * 10)}]\n"
    (tmp_path / "bomb.yaml").write_text(bomb + "context_lengths: *i\n")
    (tmp_path / "bad.yaml").write_text("context_lengths: [1\n")
    assert "expands to more than" in _user_error(capsys, ["niah", "--config", str(tmp_path / "bomb.yaml")])
    assert "not valid YAML" in _user_error(capsys, ["heads", "--config", str(tmp_path / "bad.yaml")])
    assert "expands to more than" in _user_error(capsys, ["train", "--recipe", str(tmp_path / "bomb.yaml")])


def test_pairs_generation_kwargs_json_becomes_a_dict():
    from trl_retmask.scripts.pairs import make_parser

    _, training_args, _ = make_parser().parse_args_and_config(
        ["--output", "unused.jsonl", "--generation_kwargs", '{"repetition_penalty": 1.1, "no_repeat_ngram_size": 3}']
    )
    assert training_args.generation_kwargs == {"repetition_penalty": 1.1, "no_repeat_ngram_size": 3}
