"""Each recipe's YAML defaults parse with TRL's parser and hold the authors' settings, and each recipe builds its
trainer on local tiny stand-ins of its Hub model and dataset (sampling, Qwen3 thinking and the prompt filter
included)."""

import contextlib
import functools
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, GenerationConfig

from tests.recipe_utils import (
    PROMPT_TEXTS,
    RECIPES,
    SELECTED,
    THINKING_TEMPLATE,
    load_recipe,
    save_tiny_model,
    tiny_overrides,
    write_chat_log,
    write_head_scores,
)
from tests.tiny import make_tiny_model
from trl_retmask import generation
from trl_retmask import pairs as pairs_module
from trl_retmask.config import RetMaskConfig
from trl_retmask.prompts import MISSING_USER_TURNS
from trl_retmask.scores import resolve_head_scores
from trl_retmask.scripts.train import build_trainer, parse_args, recipe_defaults, recipe_names, recipe_path

# The authors' settings, transcribed from their code (github.com/YoumiMa/RetMask; docs/fidelity.md), not from our
# YAMLs: (field, their value, where it comes from). DPO = 3_Direct_Preference_Optimization/; their dpo_llm.py parses
# DPOConfig from the command line of run_dpo_{llama,olmo,olmo_inst,qwen}.sh and ran on trl==0.24.0 (pyproject.toml),
# so what those scripts do not set is a TRL 0.24 DPOConfig / transformers TrainingArguments default.
RUN_DPO = "DPO/run_dpo_*.sh"
TRL024 = "TRL 0.24 DPOConfig default (DPO/dpo/dpo_llm.py sets none)"
ADAM = "transformers TrainingArguments default (DPO/run_dpo_*.sh sets none)"
AUTHORS_DPO = [
    ("learning_rate", 5e-7, RUN_DPO),
    ("lr_scheduler_type", "cosine_with_min_lr", RUN_DPO),
    ("lr_scheduler_kwargs", {"min_lr": 5e-8}, RUN_DPO),
    ("weight_decay", 0.1, RUN_DPO),
    ("num_train_epochs", 2, RUN_DPO),
    ("warmup_steps", 0.1, RUN_DPO + " --warmup_ratio 0.1"),
    ("adam_beta2", 0.95, RUN_DPO),
    ("optim", "adamw_torch", RUN_DPO),
    ("bf16", True, RUN_DPO),
    ("activation_checkpointing", True, RUN_DPO + " --gradient_checkpointing"),
    ("beta", 0.1, TRL024),
    ("loss_type", ["sigmoid"], TRL024),
    ("label_smoothing", 0.0, TRL024),
    ("use_weighting", False, TRL024),
    ("f_divergence_type", "reverse_kl", TRL024),
    ("ld_alpha", None, TRL024),
    ("loss_weights", None, TRL024),
    ("sync_ref_model", False, TRL024),
    ("disable_dropout", True, TRL024),
    ("precompute_ref_log_probs", False, TRL024),
    ("max_prompt_length", 512, TRL024),
    ("max_length", 1024, TRL024),
    ("truncation_side", "left", TRL024 + ": truncation_mode='keep_end'"),
    ("adam_beta1", 0.9, ADAM),
    ("adam_epsilon", 1e-8, ADAM),
    ("max_grad_norm", 1.0, ADAM),
]
# Pairs: CRG = 2_Contrastive_Response_Generation/. The vLLM request sets temperature, top_p and max_tokens; vLLM takes
# the rest from the model's generation_config.json, so top_k / min_p / repetition_penalty stay unset here.
CRG = "CRG/exec_synthesize_assistant_response_using_*.sh"
AUTHORS_SAMPLING = [
    ("temperature", 0.6, CRG),
    ("top_p", 1.0, CRG),
    ("top_k", None, CRG),
    ("min_p", None, CRG),
    ("repetition_penalty", None, CRG),
]
# recipe -> (model, max new tokens [CRG/exec_*.sh --max_tokens], per-device batch, grad-accum [DPO/run_dpo_*.sh],
# heads >= 0.1 in the published scores [1_Retrieval_Head_Deactivation/head_score/*.json], or None when the authors
# published none and the recipe detects them)
AUTHORS_MODELS = {
    "llama31": ("meta-llama/Llama-3.1-8B-Instruct", 2048, 2, 64, 33),
    "qwen3": ("Qwen/Qwen3-8B", 4096, 1, 128, 57),
    "olmo3_think": ("allenai/Olmo-3-7B-Think", 2048, 2, 64, 46),
    "olmo3": ("allenai/Olmo-3-7B-Instruct", 2048, 2, 64, None),
}
QWEN3_TEMPLATE = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()
# Qwen3-8B's generation_config.json sampling fields (vLLM kept top_k 20; the request's T and top_p won).
QWEN3_GENERATION = dict(do_sample=True, temperature=0.6, top_k=20, top_p=0.95)


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


@contextlib.contextmanager
def deprecations_recorded(monkeypatch):
    """The FutureWarning / DeprecationWarning messages that the recipe path is answerable for: every one issued by TRL
    (a deprecated TRL setting or path in use), and those of other libraries (transformers, ...) unless TRL's own code
    made the deprecated call (TRL's business, e.g. its reference-log-prob pass reading a renamed transformers
    property). Recorded at `warnings.warn`, where the issuing module is known whatever the `stacklevel`."""
    found, real_warn = [], warnings.warn

    def warn(message, category=UserWarning, stacklevel=1, *args, **kwargs):
        if isinstance(message, Warning):
            category = type(message)
        if issubclass(category, (FutureWarning, DeprecationWarning)):
            modules = [f.f_globals.get("__name__", "") for f in _frames(sys._getframe(1))]
            in_trl = [m == "trl" or m.startswith("trl.") for m in modules]
            if in_trl[0] or not any(in_trl):
                found.append(f"{category.__name__} from {modules[0]}: {message}")
        return real_warn(message, category, stacklevel + 1, *args, **kwargs)

    monkeypatch.setattr(warnings, "warn", warn)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield found


def _frames(frame):
    while frame is not None:
        yield frame
        frame = frame.f_back


def _module_function(module: str, source: str, **names):
    """A function whose frames belong to `module` (what `deprecations_recorded` reads), e.g. a TRL caller."""
    namespace = {"__name__": module, "warnings": warnings, **names}
    exec(source, namespace)
    return namespace["f"]


def test_deprecations_recorded_tells_trls_own_from_trls_callees(monkeypatch, tmp_path):
    from trl import DPOConfig

    # TRL calling a renamed transformers API (TRL 1.16 reads `is_gradient_checkpointing`, deprecated since
    # transformers 5.23): transformers warns, but the call is TRL's business, not recorded.
    renamed = _module_function("transformers.modeling_utils", "def f():\n    warnings.warn('renamed', FutureWarning)")
    trl_caller = _module_function("trl.models.utils", "def f():\n    callee()", callee=renamed)
    with deprecations_recorded(monkeypatch) as found:
        DPOConfig(str(tmp_path), truncation_mode="keep_end", report_to="none", use_cpu=True)  # TRL's own deprecation
        warnings.warn("old name", FutureWarning, stacklevel=1)  # ours (the test module)
        with pytest.warns(FutureWarning, match="renamed"):
            trl_caller()
        with pytest.warns(FutureWarning, match="renamed"):
            renamed()  # called by us: recorded
    assert len(found) == 3 and "keep_end" in found[0] and found[0].startswith("FutureWarning from trl.")
    assert found[1] == "FutureWarning from tests.test_recipes: old name"
    assert found[2] == "FutureWarning from transformers.modeling_utils: renamed"


def test_every_recipe_has_its_yaml_beside_it():
    scripts = sorted(p.stem for p in RECIPES.glob("*.py"))
    assert scripts == recipe_names() == ["llama31", "olmo3", "olmo3_think", "qwen3", "smollm2"]
    for name in scripts:
        assert recipe_path(name).resolve() == (RECIPES / f"{name}.yaml").resolve()  # the package may link recipes/
        assert load_recipe(name).DEFAULTS == yaml.safe_load((RECIPES / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", ["smollm2", "llama31", "qwen3", "olmo3", "olmo3_think"])
def test_every_yaml_value_reaches_the_parsed_arguments(name, tmp_path):
    """Each key of the YAML lands, unchanged, in one of the three parsed dataclasses."""
    script_args, args, model_args = parse_args(["--use_cpu", "True"], recipe=name)
    for key, value in recipe_defaults(name).items():
        owner = next(o for o in (script_args, args, model_args) if hasattr(o, key))
        expected = [] if (key, value) == ("report_to", "none") else value  # TrainingArguments' normal form
        assert getattr(owner, key) == expected, (key, getattr(owner, key), value)


@pytest.mark.parametrize("name", sorted(AUTHORS_MODELS))
@pytest.mark.parametrize("key,value,source", [pytest.param(*row, id=row[0]) for row in AUTHORS_DPO + AUTHORS_SAMPLING])
def test_8b_recipes_pin_every_authors_setting(name, key, value, source):
    """Each setting is written in the recipe's YAML (no TRL or transformers default decides it; the sampling cuts
    left unset on purpose excepted) and parses to the authors' value."""
    if key not in ("top_k", "min_p", "repetition_penalty"):  # unset = the model's file decides, as in vLLM
        assert key in recipe_defaults(name), f"{name}.yaml does not pin {key} ({source})"
    assert getattr(parsed_recipe(name)[1], key) == value, (key, source)


@functools.cache
def parsed_recipe(name: str):
    """A recipe's parsed defaults, once per recipe (nothing is written to its output directory)."""
    return parse_args(["--use_cpu", "True", "--output_dir", str(Path(tempfile.gettempdir()) / "unused")], recipe=name)


@pytest.mark.parametrize("name", sorted(AUTHORS_MODELS))
def test_8b_recipes_default_to_the_authors_settings(name, tmp_path):
    from trl_retmask.detection import AUTHORS_CONTEXT_LENGTHS, AUTHORS_DEPTHS

    model_id, new_tokens, batch, accumulation, n_heads = AUTHORS_MODELS[name]
    script_args, args, model_args = parse_args(["--use_cpu", "True", "--output_dir", str(tmp_path)], recipe=name)
    assert model_args.model_name_or_path == model_id
    assert model_args.dtype == "float32"  # their dpo_llm.py loads without a dtype: fp32 weights, bf16 autocast
    assert (args.max_new_tokens, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (
        new_tokens,
        batch,
        accumulation,
    )
    assert args.generation_settings["generation_kwargs"] == {}  # min_p / repetition_penalty: the model's own
    assert script_args.dataset_name == "tokyotech-llm/lmsys-chat-1m-synth" and script_args.filter_prompts is True
    assert script_args.enable_thinking is None  # Qwen3 thinks (its template's default); Olmo-3-Think always does
    assert args.keep_reasoning is True
    # the open choices are written in every recipe: prompt count (all), threshold (the paper's), seed
    defaults = recipe_defaults(name)
    assert defaults["max_prompts"] is None and script_args.max_prompts is None
    assert defaults["mask_threshold"] == args.mask_threshold == 0.1 and defaults["seed"] == 42
    assert args.mask_top_k is None and args.head_scores is None
    assert script_args.detect_heads is (n_heads is None)
    if n_heads is None:  # detected with the authors' protocol, reported beside their Olmo-3-7B-Think count
        assert list(script_args.detect_context_lengths) == list(AUTHORS_CONTEXT_LENGTHS)
        assert list(script_args.detect_depths) == list(AUTHORS_DEPTHS)
        assert script_args.compare_heads_with == AUTHORS_MODELS["olmo3_think"][0]
    else:  # the model's bundled published scores, at threshold 0.1
        assert len(resolve_head_scores(None, model_id).select(threshold=0.1)) == n_heads


def test_olmo3_summary_compares_detected_heads_with_the_authors_olmo3_think_count(tmp_path):
    from trl_retmask.scripts.train import compare_heads

    script_args, args, _ = parse_args(["--use_cpu", "True", "--output_dir", str(tmp_path)], recipe="olmo3")
    heads = [(0, 1), (2, 3), (5, 7)]  # whatever detection selected
    assert compare_heads(heads, script_args.compare_heads_with, args) == {
        "selection": {"threshold": 0.1, "top_k": None},
        "masked_here": 3,
        "reference": "allenai/Olmo-3-7B-Think",
        "reference_heads": AUTHORS_MODELS["olmo3_think"][4],
    }


def test_smollm2_recipe_says_where_it_departs_for_cpu_time():
    assert "instead of the authors' 2048" in (RECIPES / "smollm2.yaml").read_text()
    assert recipe_defaults("smollm2")["max_new_tokens"] == 64


def test_command_line_and_config_file_override_recipe_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1.0e-6\nnum_train_epochs: 3\nmask_top_k: 16\n")
    _, args, model_args = parse_args(
        [
            "--recipe",
            "llama31",
            "--config",
            str(config),
            "--num_train_epochs",
            "1",
            "--use_peft",
            "True",
            "--use_cpu",
            "True",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert args.learning_rate == 1e-6  # config file over the recipe
    assert args.num_train_epochs == 1  # command line over the config file
    assert args.mask_top_k == 16 and args.selection["top_k"] == 16 and args.selection["threshold"] is None
    assert model_args.use_peft is True
    assert args.weight_decay == 0.1  # untouched defaults stay the authors'


def test_unknown_recipe_default_is_refused():
    with pytest.raises(ValueError, match="unknown arguments.*no_such_field"):
        parse_args([], defaults={"no_such_field": 1})


def test_context_parallelism_is_refused_before_model_work(monkeypatch, tmp_path):
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    with pytest.raises(ValueError, match="Context/sequence parallelism.*cp_size"):
        parse_args(["--output_dir", str(tmp_path)], recipe="smollm2")


@pytest.mark.parametrize(
    "name,arch",
    [("llama31", "llama"), ("qwen3", "qwen3"), ("olmo3", "olmo3"), ("olmo3_think", "olmo3"), ("smollm2", "llama")],
)
def test_recipe_builds_its_trainer(name, arch, stand_ins, tmp_path, monkeypatch):
    from trl_retmask.trainer import RetMaskTrainer

    extra = ["--mask_top_k", "2"] if name == "smollm2" else []  # its default k=10 would cover the tiny model
    with deprecations_recorded(monkeypatch) as deprecations:  # the whole recipe path: parsing, config, pairs, trainer
        script_args, args, model_args = parse_args(
            tiny_overrides(stand_ins[arch], stand_ins["data"], stand_ins["scores"], tmp_path, *extra), recipe=name
        )
        trainer = build_trainer(script_args, args, model_args)
    assert not deprecations, deprecations  # TRL's deprecated settings and paths (keep_end, use_liger_kernel) unused

    assert isinstance(trainer, RetMaskTrainer)
    assert trainer.masked_heads == SELECTED
    assert trainer.model.config.model_type == arch
    stats = trainer.pair_stats["train"]
    assert stats.prompts == 8 and stats.kept == len(trainer.train_dataset)  # (0 kept is refused by the trainer)
    row = trainer.train_dataset[0]
    prompts_seen = set()
    for prompt in trainer.train_dataset["prompt"]:  # conversational: the first user turn of each conversation
        assert [m["role"] for m in prompt] == ["user"]
        prompts_seen.add(prompt[0]["content"])
    assert prompts_seen <= set(PROMPT_TEXTS)
    assert {"chosen", "rejected"} <= set(row)
    # the recipe's own settings survive next to the overrides
    expected_lr = 1e-5 if name == "smollm2" else 5e-7
    assert args.learning_rate == expected_lr and args.max_new_tokens == 6
    assert not (tmp_path / "detection").exists()  # --head_scores given: no detection, even for olmo3


def test_recipe_script_help_shows_its_yaml_defaults():
    """`python recipes/qwen3.py --help` (a fresh interpreter, as a user runs it) lists the YAML's values."""
    proc = subprocess.run(
        [sys.executable, str(RECIPES / "qwen3.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Qwen/Qwen3-8B" in proc.stdout and "--enable_thinking" in proc.stdout


# ------------------------------------------------------------------------------------- sampling (vLLM's rule)
def model_with_generation_config(path, **fields):
    """A tiny model saved with `fields` in its generation_config.json and loaded back (vLLM reads that file)."""
    model = make_tiny_model("qwen3")
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **fields)
    model.save_pretrained(path)
    saved = json.loads((Path(path) / "generation_config.json").read_text())
    assert {k: saved[k] for k in fields} == fields and ("top_k" in saved) == ("top_k" in fields)
    return AutoModelForCausalLM.from_pretrained(path)


def effective_sampling(model, args: RetMaskConfig) -> dict:
    """The sampling `model.generate` applies for `args`: the pairs' generation config with transformers' global
    defaults filled in for unset fields, as generate() does."""
    settings = args.generation_settings
    config = generation.make_generation_config(
        model,
        8,
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        top_k=settings["top_k"],
        **settings["generation_kwargs"],
    )
    config, _ = model._prepare_generation_config(config)
    return {
        "do_sample": config.do_sample,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k or 0,
        "min_p": config.min_p,
        "repetition_penalty": config.repetition_penalty,
    }


@pytest.mark.parametrize(
    "file_fields,expected",
    [
        # Qwen3-8B's file: vLLM kept its top_k 20; the request's temperature 0.6 / top_p 1.0 won over the file's
        (QWEN3_GENERATION, dict(top_k=20, min_p=None, repetition_penalty=1.0)),
        # Llama-3.1-8B-Instruct's file (temperature 0.6, top_p 0.9, no top_k): no top-k cut (vLLM's default; not 50)
        (dict(do_sample=True, temperature=0.6, top_p=0.9), dict(top_k=0, min_p=None, repetition_penalty=1.0)),
        # a file with min_p and a repetition penalty: vLLM takes both
        (
            dict(do_sample=True, top_k=40, min_p=0.05, repetition_penalty=1.1),
            dict(top_k=40, min_p=0.05, repetition_penalty=1.1),
        ),
        # no sampling fields at all (SmolLM2's file): plain temperature sampling
        ({}, dict(top_k=0, min_p=None, repetition_penalty=1.0)),
    ],
    ids=["qwen3", "llama31", "min_p_and_penalty", "none"],
)
def test_sampling_defaults_follow_the_models_generation_config(file_fields, expected, tmp_path):
    model = model_with_generation_config(tmp_path / "model", **file_fields)
    args = RetMaskConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert effective_sampling(model, args) == dict(do_sample=True, temperature=0.6, top_p=1.0, **expected)


def test_explicit_sampling_settings_win_over_the_models_file(tmp_path):
    model = model_with_generation_config(tmp_path / "model", **QWEN3_GENERATION, min_p=0.05, repetition_penalty=1.1)
    args = RetMaskConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.0,
        temperature=0.7,
        top_p=0.8,
    )
    assert effective_sampling(model, args) == dict(
        do_sample=True, temperature=0.7, top_p=0.8, top_k=0, min_p=0.0, repetition_penalty=1.0
    )
    with pytest.raises(ValueError, match="min_p"):
        RetMaskConfig(output_dir=str(tmp_path), use_cpu=True, min_p=1.5)


# -------------------------------------------------------------------------------------------- Qwen3 thinking
def qwen3_tokenizer():
    """A byte-level tokenizer with Qwen3's special tokens (`<think>`/`</think>` added but not special, as in Qwen3)
    and Qwen3's real chat template (tests/data/qwen3_chat_template.jinja: the Qwen3 family's template, from
    llama.cpp's vendored models/templates/Qwen-Qwen3-0.6B.jinja)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    fast.chat_template = QWEN3_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def qwen3_stand_in(tmp_path_factory):
    """A tiny Qwen3 with Qwen3's tokenizer layout, chat template and generation_config sampling fields."""
    path = tmp_path_factory.mktemp("qwen3_real_template")
    tokenizer = qwen3_tokenizer()
    tokenizer.save_pretrained(path)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = make_tiny_model("qwen3", vocab_size=len(tokenizer), bos_token_id=None, **ids)
    model.generation_config = GenerationConfig(**ids, **QWEN3_GENERATION)
    model.save_pretrained(path)
    return path


def test_qwen3_template_renders_our_inline_reasoning_as_the_authors_reasoning_content():
    """The authors stored vLLM's reasoning-parser output as `reasoning_content`; we keep the raw `<think>` text in
    `content`. Qwen3's template renders both the same, reasoning included."""
    tokenizer = qwen3_tokenizer()
    prompt = [{"role": "user", "content": "Which city?"}]
    for reasoning, answer in [("The user asks.\nThink twice.", "Paris."), ("short", "A\n\nB")]:
        ours = [{"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}]
        authors = [{"role": "assistant", "content": answer, "reasoning_content": reasoning}]
        rendered = tokenizer.apply_chat_template(prompt + ours, tokenize=False)
        assert rendered == tokenizer.apply_chat_template(prompt + authors, tokenize=False)
        assert rendered.endswith(f"<|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>\n")


def test_qwen3_recipe_trains_on_the_reasoning(qwen3_stand_in, stand_ins, tmp_path):
    """TRL's DPO tokenization of a conversational completion holding `<think>...</think>` keeps every reasoning
    token, after the thinking-mode generation prompt (no empty think block)."""
    tokenizer = qwen3_tokenizer()
    question, reasoning, answer = "Which city?", "The user asks about a city.", "Paris."
    rows = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}],
                "rejected": [{"role": "assistant", "content": "<think>\nno\n</think>\n\nRome."}],
            }
        ]
    )
    script_args, args, model_args = parse_args(
        tiny_overrides(qwen3_stand_in, stand_ins["data"], stand_ins["scores"], tmp_path), recipe="qwen3"
    )
    row = build_trainer(script_args, args, model_args, train_dataset=rows).train_dataset[0]

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert row["prompt_ids"] == encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    assert row["chosen_ids"] == encode(f"<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>\n")
    assert row["rejected_ids"] == encode("<think>\nno\n</think>\n\nRome.<|im_end|>\n")


def test_qwen3_without_reasoning_trains_what_the_authors_content_only_data_renders():
    """`keep_reasoning=False` keeps vLLM's `content` (after the first `</think>`): Qwen3's template renders it after an
    empty think block, as it renders a message without `reasoning_content`; identical answers are then one pair."""
    from trl_retmask.pairs import _assemble, strip_reasoning

    tokenizer = qwen3_tokenizer()
    prompt = [{"role": "user", "content": "Which city?"}]
    answer = strip_reasoning("<think>\nThe user asks.\n</think>\n\nParis.")
    assert answer == "\n\nParis."
    rendered = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nParis.<|im_end|>\n")
    assert strip_reasoning("<think>\ncut inside") == "<think>\ncut inside"  # no </think>: vLLM leaves it whole
    results = [
        {
            "indices": [0, 1],
            "chosen": ["<think>a</think>X", "<think>a</think>Y"],
            "rejected": ["<think>b</think>X", "<think>b</think>Z"],
            "chosen_tokens": [3, 3],
            "rejected_tokens": [3, 3],
            "seconds": 1.0,
        }
    ]
    kept = _assemble(["p", "q"], results, "", 1, False, keep_reasoning=False)
    assert kept.keep == [False, True] and kept.chosen[1] == "Y" and kept.rejected[1] == "Z"
    assert _assemble(["p", "q"], results, "", 1, False).keep == [True, True]  # the reasoning differs: kept


@pytest.mark.parametrize("enable_thinking", [None, False], ids=["thinking", "no_thinking"])
def test_qwen3_recipe_samples_pairs_as_the_authors_vllm(
    enable_thinking, qwen3_stand_in, stand_ins, tmp_path, monkeypatch
):
    """End to end through the recipe: pairs are sampled with Qwen3's top_k 20 (from its generation_config), T 0.6,
    top_p 1.0, after the thinking-mode prompt (thinking off on request: prompts end with an empty think block)."""
    used = []

    def recording(*a, **kw):
        used.append(generation.make_generation_config(*a, **kw))
        return used[-1]

    monkeypatch.setattr(pairs_module, "make_generation_config", recording)
    extra = [] if enable_thinking is None else ["--enable_thinking", str(enable_thinking)]
    script_args, args, model_args = parse_args(
        tiny_overrides(qwen3_stand_in, stand_ins["data"], stand_ins["scores"], tmp_path, *extra), recipe="qwen3"
    )
    trainer = build_trainer(script_args, args, model_args)
    assert [(c.do_sample, c.temperature, c.top_p, c.top_k) for c in used] == [(True, 0.6, 1.0, 20)]
    opening = "<|im_start|>assistant\n" + ("" if enable_thinking is None else "<think>\n\n</think>\n\n")
    tokenizer = qwen3_tokenizer()
    assert len(trainer.train_dataset) > 0
    for ids in trainer.train_dataset["prompt_ids"]:
        assert tokenizer.decode(ids).endswith(opening)


# ------------------------------------------------------------------------------------------- prompt filter wiring
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_recipe_applies_the_authors_prompt_filter(stand_ins, tmp_path):
    rows = [
        {
            "conversation": [{"role": "user", "content": text}],
            "redacted": i % 4 == 1,
            "empty_user_instruction_ja": False,
            "duplicate_user_instruction_ja": "x" if i % 4 == 2 else None,
        }
        for i, text in enumerate(PROMPT_TEXTS)
    ]
    data = write_jsonl(tmp_path / "synth.jsonl", rows)
    script_args, args, model_args = parse_args(
        tiny_overrides(stand_ins["llama"], data, stand_ins["scores"], tmp_path / "out"), recipe="llama31"
    )
    trainer = build_trainer(script_args, args, model_args)
    kept = [r for r in rows if not (r["redacted"] or r["duplicate_user_instruction_ja"] is not None)]
    assert trainer.pair_stats["train"].prompts == len(kept) == 4


def test_recipe_on_synth_without_user_turns_says_how_to_merge(stand_ins, tmp_path):
    rows = [
        {
            "conversation_id": str(i),
            "synthesized_assistant_responses": [],
            "redacted": False,
            "empty_user_instruction_ja": False,
            "duplicate_user_instruction_ja": None,
        }
        for i in range(3)
    ]
    data = write_jsonl(tmp_path / "lmsys-chat-1m-synth.jsonl", rows)
    script_args, args, model_args = parse_args(
        tiny_overrides(stand_ins["llama"], data, stand_ins["scores"], tmp_path / "out"), recipe="llama31"
    )
    with pytest.raises(ValueError, match="No user turns") as error:
        build_trainer(script_args, args, model_args)
    assert MISSING_USER_TURNS in str(error.value)


@pytest.mark.parametrize("ignore", [True, False])
def test_ignore_bias_buffers_hides_boolean_buffers_from_ddp(ignore, stand_ins, tmp_path):
    """TRL's `--ignore_bias_buffers` (DDP cannot broadcast bool buffers): exactly the model's boolean buffers are
    listed in DDP's ignore list, float buffers stay synchronised; off, no list is set."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stand_ins["llama"])
    model.model.layers[0].self_attn.register_buffer("causal_bias", torch.ones(2, 2, dtype=torch.bool))
    model.model.layers[1].register_buffer("scale", torch.ones(2))
    script_args, args, model_args = parse_args(
        tiny_overrides(
            stand_ins["llama"],
            stand_ins["data"],
            stand_ins["scores"],
            tmp_path,
            "--mask_top_k",
            "2",
            "--ignore_bias_buffers",
            str(ignore),
        ),
        recipe="llama31",
    )
    assert script_args.ignore_bias_buffers is ignore
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(stand_ins["llama"])
    trainer = build_trainer(script_args, args, model_args, model=model, tokenizer=tokenizer)
    if ignore:
        assert trainer.model._ddp_params_and_buffers_to_ignore == ["model.layers.0.self_attn.causal_bias"]
    else:
        assert not hasattr(trainer.model, "_ddp_params_and_buffers_to_ignore")


def _unreachable(found):
    return [str(w.message) for w in found if "cannot be reached" in str(w.message)]


def test_a_max_length_the_prompt_limit_cannot_reach_is_one_warning(tmp_path):
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        RetMaskConfig(str(tmp_path), use_cpu=True, mask_top_k=2, max_length=32768, max_new_tokens=2048)
    assert _unreachable(found) == [
        "max_length=32768 cannot be reached: prompts are cut to their last max_prompt_length=512 tokens and "
        "responses to max_new_tokens=2048, at most 2560 tokens; set --max_prompt_length 30720 "
        "(max_length - max_new_tokens) to train on long prompts."
    ]
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        RetMaskConfig(str(tmp_path), use_cpu=True, mask_top_k=2)  # DPOConfig's max_length: the authors' cut, quiet
        RetMaskConfig(str(tmp_path), use_cpu=True, mask_top_k=2, max_length=32768, max_prompt_length=32512)
        RetMaskConfig(str(tmp_path), use_cpu=True, mask_top_k=2, max_length=32768, max_prompt_length=None)
    assert _unreachable(found) == []


def test_the_32k_command_of_the_docs_reaches_its_max_length(tmp_path):
    """docs/distributed.md's 32K command, parsed with its recipe: sequences can fill `max_length`."""
    import re
    import shlex

    text = (Path(__file__).parents[1] / "docs" / "distributed.md").read_text()
    command = re.search(r"recipes/llama31\.py (--max_length 32768.*?) --dataset_name", text, re.S).group(1)
    argv = shlex.split(command.replace("\\\n", " "))
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        _, args, _ = parse_args(["--use_cpu", "True", "--output_dir", str(tmp_path), *argv], recipe="llama31")
    assert args.max_length == 32768 and args.max_prompt_length + args.max_new_tokens >= args.max_length
    assert _unreachable(found) == []


def test_no_pinned_memory_without_an_accelerator(tmp_path):
    """TRL's DataLoaders pin memory by default; on a CPU torch warns at each one ("no accelerator is found").
    transformers turns pinning off for `use_cpu=True` only, not on a machine that has no accelerator at all."""
    import torch

    from trl_retmask.config import accelerator_available

    if accelerator_available():
        pytest.skip("needs a machine without an accelerator")
    args = RetMaskConfig(str(tmp_path), mask_top_k=2)
    assert args.dataloader_pin_memory is False
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        list(torch.utils.data.DataLoader(range(4), batch_size=2, pin_memory=args.dataloader_pin_memory))
    assert [str(w.message) for w in found if "pin_memory" in str(w.message)] == []
