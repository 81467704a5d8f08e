"""RetMask on Qwen3-8B with the authors' settings: bundled retrieval-head scores, thinking on, reasoning kept.

As recipes/llama31.py (prompts, filter, DPO hyperparameters, TRL 0.24's truncation), except, as in the authors'
scripts: up to 4096 new tokens per response, top_k 20 from Qwen3's generation_config.json (their vLLM server took it
from there), and per-device batch 1 x grad-accum 128 with DeepSpeed ZeRO-2:

    accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/qwen3.py \\
        --dataset_name ./lmsys-chat-1m-synth.jsonl.gz

Thinking is on (the chat template's default): each response is `<think>reasoning</think>answer`, and DPO trains on
both, since Qwen3's template renders the reasoning of the final assistant turn (the authors stored it as
`reasoning_content`, which renders the same). `--enable_thinking False` trains the non-thinking mode instead (prompts
rendered with an empty, closed think block). Overrides as in any TRL script.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout too

from trl_retmask.scripts.train import cli_main, recipe_defaults  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3.yaml")  # the defaults; override any
DEFAULTS = recipe_defaults(RECIPE)

if __name__ == "__main__":
    sys.exit(cli_main(prog="recipes/qwen3.py", recipe=RECIPE))
