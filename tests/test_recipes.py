"""Each recipe parses its arguments and builds its trainer on local tiny stand-ins of its Hub model and dataset."""

import json

import pytest

from tests.recipe_utils import (
    PROMPT_TEXTS,
    SELECTED,
    THINKING_TEMPLATE,
    load_recipe,
    save_tiny_model,
    tiny_overrides,
    write_chat_log,
    write_head_scores,
)
from trl_retmask.recipe import RetMaskScriptArguments, first_user_turn, load_prompts, parse_args

PAPER = dict(learning_rate=5e-7, weight_decay=0.1, num_train_epochs=2, warmup_steps=0.1, adam_beta2=0.95, bf16=True,
             gradient_checkpointing=True, per_device_train_batch_size=2, gradient_accumulation_steps=64,
             temperature=0.6, top_p=1.0)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("stand_ins")
    return {
        "data": write_chat_log(root / "lmsys.jsonl", n=8),
        "scores": write_head_scores(root / "scores.json"),
        "llama": save_tiny_model(root / "llama"),
        "qwen3": save_tiny_model(root / "qwen3", "qwen3", chat_template=THINKING_TEMPLATE),
        "olmo3": save_tiny_model(root / "olmo3", "olmo3"),
    }


@pytest.mark.parametrize("name,model_id", [("llama31", "meta-llama/Llama-3.1-8B-Instruct"), ("qwen3", "Qwen/Qwen3-8B"),
                                           ("olmo3", "allenai/Olmo-3-7B-Instruct")])
def test_8b_recipes_default_to_the_paper(name, model_id, tmp_path):
    recipe = load_recipe(name)
    script_args, args, model_args = parse_args(recipe.DEFAULTS, ["--use_cpu", "True", "--output_dir", str(tmp_path)])
    assert model_args.model_name_or_path == model_id
    for key, value in PAPER.items():
        assert getattr(args, key) == value, key
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr": 5e-8}
    assert script_args.dataset_name == "tokyotech-llm/lmsys-chat-1m-synth"
    assert script_args.enable_thinking is (False if name == "qwen3" else None)
    assert script_args.detect_heads is (name == "olmo3")


def test_command_line_and_config_file_override_recipe_defaults(tmp_path):
    recipe = load_recipe("llama31")
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1.0e-6\nnum_train_epochs: 3\nmask_top_k: 16\n")
    _, args, model_args = parse_args(recipe.DEFAULTS, [
        "--config", str(config), "--num_train_epochs", "1", "--use_peft", "True", "--use_cpu", "True",
        "--output_dir", str(tmp_path)])
    assert args.learning_rate == 1e-6  # config file over the recipe
    assert args.num_train_epochs == 1  # command line over the config file
    assert args.mask_top_k == 16 and args.selection["top_k"] == 16 and args.selection["threshold"] is None
    assert model_args.use_peft is True
    assert args.weight_decay == 0.1  # untouched defaults stay the paper's


def test_unknown_recipe_default_is_refused():
    with pytest.raises(ValueError, match="unknown arguments.*no_such_field"):
        parse_args({"no_such_field": 1}, [])


def test_context_parallelism_is_refused_before_model_work(monkeypatch, tmp_path):
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    with pytest.raises(ValueError, match="Context/sequence parallelism.*cp_size"):
        parse_args(load_recipe("smollm2").DEFAULTS, ["--output_dir", str(tmp_path)])


@pytest.mark.parametrize("name,arch", [("llama31", "llama"), ("qwen3", "qwen3"), ("olmo3", "olmo3"),
                                       ("smollm2", "llama")])
def test_recipe_builds_its_trainer(name, arch, stand_ins, tmp_path):
    from trl_retmask.recipe import build_trainer
    from trl_retmask.trainer import RetMaskTrainer

    recipe = load_recipe(name)
    extra = ["--mask_top_k", "2"] if name == "smollm2" else []  # its default k=10 would cover the tiny model
    script_args, args, model_args = parse_args(
        recipe.DEFAULTS, tiny_overrides(stand_ins[arch], stand_ins["data"], stand_ins["scores"], tmp_path, *extra))
    trainer = build_trainer(script_args, args, model_args)

    assert isinstance(trainer, RetMaskTrainer)
    assert trainer.masked_heads == SELECTED
    assert trainer.model.config.model_type == arch
    stats = trainer.pair_stats["train"]
    assert stats.prompts == 8 and stats.kept == len(trainer.train_dataset) > 0
    row = trainer.train_dataset[0]
    prompts_seen = set()
    for prompt in trainer.train_dataset["prompt"]:
        if name == "qwen3":  # rendered through the chat template with enable_thinking=False
            assert isinstance(prompt, str) and prompt.startswith("<|user|> ") and prompt.endswith(
                "<|assistant|> no think ")
            prompts_seen.add(prompt[len("<|user|> "):].split(" <|assistant|>")[0])
        else:  # conversational, the first user turn of each conversation
            assert [m["role"] for m in prompt] == ["user"]
            prompts_seen.add(prompt[0]["content"])
    assert prompts_seen <= set(PROMPT_TEXTS)
    assert {"chosen", "rejected"} <= set(row)
    # the recipe's own settings survive next to the overrides
    expected_lr = 1e-5 if name == "smollm2" else 5e-7
    assert args.learning_rate == expected_lr and args.max_new_tokens == 6
    assert not (tmp_path / "detection").exists()  # --head_scores given: no detection, even for olmo3


def test_first_user_turn_formats():
    assert first_user_turn("  hello ") == "hello"
    assert first_user_turn([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                            {"role": "user", "content": "later"}]) == "hi"
    assert first_user_turn([{"from": "human", "value": "sharegpt"}, {"from": "gpt", "value": "x"}]) == "sharegpt"
    assert first_user_turn([{"role": "assistant", "content": "only"}]) is None
    assert first_user_turn("") is None and first_user_turn(None) is None


def test_load_prompts_columns_limits_and_errors(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "first", "other": 1}, {"instruction": "", "other": 2}, {"instruction": "third", "other": 3},
    ]))
    prompts = load_prompts(RetMaskScriptArguments(dataset_name=str(data)))
    assert prompts["prompt"] == [[{"role": "user", "content": "first"}], [{"role": "user", "content": "third"}]]
    assert len(load_prompts(RetMaskScriptArguments(dataset_name=str(data), max_prompts=1))) == 1
    with pytest.raises(ValueError, match="not a column"):
        load_prompts(RetMaskScriptArguments(dataset_name=str(data), prompt_column="missing"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"foo": "x"}))
    with pytest.raises(ValueError, match="No prompt column.*--prompt_column"):
        load_prompts(RetMaskScriptArguments(dataset_name=str(bad)))
    with pytest.raises(ValueError, match="max_prompts"):
        RetMaskScriptArguments(max_prompts=0)
