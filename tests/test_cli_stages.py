"""`trl-retmask heads | export | pairs | train | eval` on tiny local models and the bundled Llama-3.1 scores."""

import json
from pathlib import Path

import pytest
import torch

from tests.recipe_utils import (
    HEAD_SCORES,
    PROMPT_TEXTS,
    SELECTED,
    save_tiny_model,
    tiny_overrides,
    write_chat_log,
    write_head_scores,
)
from trl_retmask.cli import main

LLAMA_SCORES = Path(__file__).resolve().parents[1] / "trl_retmask" / "data" / "head_scores" / "Llama-3.1-8B-Instruct.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"model": save_tiny_model(root / "model"), "data": write_chat_log(root / "prompts.jsonl"),
            "scores": write_head_scores(root / "scores.json")}


def _run_json(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def _top_k_by_hand(k):
    raw = json.loads(LLAMA_SCORES.read_text())
    means = {tuple(int(x) for x in key.split("-")): sum(v) / len(v) for key, v in raw.items()}
    return sorted(sorted(means, key=lambda h: (-means[h], h))[:k]), means


def test_heads_summary_selection_heatmap(capsys, tmp_path):
    out = _run_json(capsys, ["heads", str(LLAMA_SCORES), "--top-k", "8", "--plot", str(tmp_path / "map.png"),
                             "--save-heads", str(tmp_path / "heads.json")])
    expected, means = _top_k_by_hand(8)
    assert out["layers"] == 32 and out["heads_per_layer"] == 32
    assert out["selection"]["heads"] == ",".join(f"{layer}-{head}" for layer, head in expected)
    assert out["selection"]["scores"]["15-30"] == pytest.approx(means[(15, 30)], abs=1e-4)
    assert out["sparsity"]["n_above_0.1"] == sum(m >= 0.1 for m in means.values())
    assert json.loads((tmp_path / "heads.json").read_text()) == [list(h) for h in expected]
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"
    best = max(means, key=means.get)
    assert list(out["top"])[0] == f"{best[0]}-{best[1]}"


def test_heads_random_control_avoids_retrieval_heads(capsys):
    out = _run_json(capsys, ["heads", str(LLAMA_SCORES), "--top-k", "8", "--strategy", "random_non_retrieval",
                             "--seed", "3"])
    control = {tuple(int(x) for x in h.split("-")) for h in out["selection"]["heads"].split(",")}
    retrieval, _ = _top_k_by_hand(8)
    assert len(control) == 8 and not control & set(retrieval)


def test_export_zeroes_the_selected_heads_in_the_weights(capsys, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _run_json(capsys, ["export", str(tiny["model"]), "--head-scores", str(tiny["scores"]), "--top-k", "2",
                             "--output-dir", str(tmp_path / "masked")])
    assert out["masked_heads"] == "0-1,2-3"
    masked = AutoModelForCausalLM.from_pretrained(tmp_path / "masked")
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
    assert (tmp_path / "masked" / "tokenizer.json").is_file()


def test_pairs_writes_a_preference_dataset(capsys, tiny, tmp_path):
    from trl_retmask.masking import mask_heads
    from trl_retmask.models import load_model_and_tokenizer

    output = tmp_path / "pairs.jsonl"
    stats = _run_json(capsys, ["pairs", str(tiny["model"]), "--dataset", str(tiny["data"]), "--heads", "0-1,2-3",
                               "--temperature", "0", "--max-new-tokens", "5", "--batch-size", "3",
                               "--output", str(output)])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert stats["prompts"] == len(PROMPT_TEXTS) and stats["kept"] == len(rows) > 0
    assert stats["masked_heads"] == "0-1,2-3"
    # greedy: the rejected response is what the model says with those heads masked (independent generate call)
    model, tokenizer = load_model_and_tokenizer(str(tiny["model"]))
    row = rows[0]
    ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with mask_heads(model, SELECTED):
        new = model.generate(**ids, max_new_tokens=5, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert row["rejected"][0]["content"] == tokenizer.decode(new, skip_special_tokens=True)
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"]


def test_train_runs_a_recipe_with_trl_style_overrides(tiny, tmp_path):
    out = tmp_path / "trained"
    argv = ["train", "--recipe", "smollm2", *tiny_overrides(tiny["model"], tiny["data"], tiny["scores"], out),
            "--mask_top_k", "2", "--niah_eval", "False", "--max_steps", "1"]
    assert main(argv) == 0
    summary = json.loads((out / "retmask_recipe_summary.json").read_text())
    assert summary["masked_heads"] == ["0-1", "2-3"]
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "retmask_head_scores.json").read_text()) == HEAD_SCORES


def test_train_help_lists_trl_arguments_with_recipe_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--recipe", "llama31", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--learning_rate" in text and "--mask_top_k" in text and "--detect_heads" in text
    assert "meta-llama/Llama-3.1-8B-Instruct" in text  # the recipe's default shown


def test_eval_runs_the_suite_with_heads_masked(capsys, tiny, tmp_path):
    assert main(["eval", str(tiny["model"]), "--lengths", "256", "--n-per-task", "1", "--categories", "rerank",
                 "--heads", "0-1", "--output-dir", str(tmp_path), "--name", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "| tiny | rerank |" in text and "masked heads: 0-1" in text
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["config"]["heads"] == [[0, 1]] and (tmp_path / "tiny.png").is_file()


def test_stage_subcommands_refuse_unknown_arguments():
    with pytest.raises(SystemExit):
        main(["heads", "--no-such-flag"])
    with pytest.raises(ValueError, match="either --heads or a selection"):
        main(["export", "--heads", "0-1", "--top-k", "3", "--output-dir", "/tmp/never-written"])
