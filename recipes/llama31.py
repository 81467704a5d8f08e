"""RetMask on Llama-3.1-8B-Instruct with the paper's settings (Ma & Okazaki, 2026, arXiv 2601.11020).

Bundled retrieval-head scores; prompts = first user turn of LMSYS-Chat-1M-Synth; DPO with lr 5e-7 (cosine to 5e-8),
weight decay 0.1, 2 epochs, warmup 0.1, Adam beta2 0.95, bf16, gradient checkpointing, per-device batch 2 x
grad-accum 64 on 4 GPUs with DeepSpeed ZeRO-1 (`trl_retmask.recipe.PAPER_DPO_DEFAULTS`):

    accelerate launch --config_file recipes/accelerate/zero1.yaml recipes/llama31.py \\
        --dataset_name ./lmsys-chat-1m-synth.jsonl.gz

The Hub repository tokyotech-llm/lmsys-chat-1m-synth holds only the synthesized part; its README's scripts merge it
with the (gated) LMSYS-Chat-1M into the jsonl.gz above. `--dataset_name lmsys/lmsys-chat-1m` works as well (same
`conversation` column). Every default can be overridden on the command line (`--learning_rate 1e-6`, `--use_peft`,
`--mask_top_k 20`, `--push_to_hub --hub_model_id me/llama31-retmask`, ...) or with `--config my.yaml`.
Memory plans for long sequences: docs/distributed.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout too

from trl_retmask.recipe import RECIPE_DEFAULTS, main  # noqa: E402

DEFAULTS = RECIPE_DEFAULTS["llama31"]  # trl_retmask/recipe.py; override any of them on the command line

if __name__ == "__main__":
    main(DEFAULTS, prog="recipes/llama31.py", description=__doc__)
