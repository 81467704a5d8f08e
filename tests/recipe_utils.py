"""Local stand-ins for the recipes' Hub inputs: a tiny model directory, a chat-log prompt file, a head-score file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.tiny import make_tiny_model, make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

# Words of the tiny tokenizer's vocabulary, so that prompts do not collapse to <unk>.
PROMPT_TEXTS = [
    "tell me a story about the sea",
    "what is the name of the first city",
    "write a small story about a boy and his mother",
    "how long does the water take to come back",
    "give me three words about the night",
    "why is the sun so white and big",
    "tell me about the magic number",
    "what did the old man say at the end",
]

# Selected by the default threshold (0.1): heads (0, 1) and (2, 3).
HEAD_SCORES = {f"{layer}-{head}": [0.0] for layer in range(3) for head in range(4)}
HEAD_SCORES.update({"0-1": [0.5, 0.7], "2-3": [0.4, 0.2], "1-0": [0.05, 0.05]})
SELECTED = [(0, 1), (2, 3)]

# A chat template that reacts to `enable_thinking` with in-vocabulary words (as Qwen3's closes its think block).
THINKING_TEMPLATE = (
    "{% for m in messages %}{{ '<|user|> ' if m['role'] == 'user' else '<|assistant|> ' }}{{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% if enable_thinking is defined and enable_thinking is false %}"
    "no think {% endif %}{% endif %}"
)


def load_recipe(name: str):
    """Import recipes/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_model(path: Path, arch: str = "llama", chat_template: str | None = None) -> Path:
    """A tiny random model of `arch` plus the tiny tokenizer, saved as a checkpoint directory."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(path)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(path)
    make_tiny_model(arch).save_pretrained(path)
    return path


def write_chat_log(path: Path, n: int = 8) -> Path:
    """LMSYS-Chat-1M(-Synth)-shaped rows: a `conversation` whose first user turn is the prompt."""
    with open(path, "w") as f:
        for i in range(n):
            text = PROMPT_TEXTS[i % len(PROMPT_TEXTS)]
            conversation = [
                {"role": "user", "content": text},
                {"role": "assistant", "content": "the answer"},
                {"role": "user", "content": "and then"},
            ]
            f.write(json.dumps({"conversation_id": str(i), "conversation": conversation, "language": "English"}) + "\n")
    return path


def write_head_scores(path: Path) -> Path:
    path.write_text(json.dumps(HEAD_SCORES))
    return path


def tiny_overrides(model_dir, data_file, scores_file, output_dir, *extra: str) -> list[str]:
    """Command-line overrides that swap the recipe's Hub inputs for local tiny ones and size it for a CPU."""
    return [
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(data_file),
        "--head_scores",
        str(scores_file),
        "--output_dir",
        str(output_dir),
        "--bf16",
        "False",
        "--activation_checkpointing",
        "False",
        "--max_new_tokens",
        "6",
        "--generation_batch_size",
        "4",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--max_length",
        "64",
        "--report_to",
        "none",
        *extra,
    ]
