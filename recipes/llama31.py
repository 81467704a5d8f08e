"""RetMask on Llama-3.1-8B-Instruct with the authors' settings (Ma & Okazaki, 2026, arXiv 2601.11020; their code:
github.com/YoumiMa/RetMask). docs/fidelity.md compares every step with their scripts.

Bundled retrieval-head scores (threshold 0.1); prompts = first user turn of LMSYS-Chat-1M-Synth with their filter;
pairs sampled at temperature 0.6, top_p 1.0, up to 2048 new tokens; DPO with lr 5e-7 (cosine to 5e-8), weight decay
0.1, 2 epochs, warmup 0.1, Adam beta2 0.95, bf16, gradient checkpointing, prompts cut to their last 512 tokens and
sequences to their last 1024 (TRL 0.24's truncation), per-device batch 2 x grad-accum 64 on 4 GPUs with DeepSpeed
ZeRO-1 (recipes/llama31.yaml):

    accelerate launch --config_file recipes/accelerate/zero1.yaml recipes/llama31.py \\
        --dataset_name ./lmsys-chat-1m-synth.jsonl.gz

The Hub repository tokyotech-llm/lmsys-chat-1m-synth holds only the synthesized part; its README's scripts merge it
with the (gated) LMSYS-Chat-1M into the jsonl.gz above (without the merge the recipe stops with that how-to).
`--dataset_name lmsys/lmsys-chat-1m` works as well (same `conversation` column; no duplicate flags, so duplicates are
found by text). Every default can be overridden on the command line (`--learning_rate 1e-6`, `--use_peft`,
`--mask_top_k 20`, `--push_to_hub --hub_model_id me/llama31-retmask`, ...) or with `--config my.yaml`.
Memory plans for long sequences: docs/distributed.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout too

from trl_retmask.scripts.train import cli_main, recipe_defaults  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama31.yaml")  # the defaults; override any
DEFAULTS = recipe_defaults(RECIPE)

if __name__ == "__main__":
    sys.exit(cli_main(prog="recipes/llama31.py", recipe=RECIPE))
