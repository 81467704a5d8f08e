"""RetMask on Qwen3-8B: bundled retrieval-head scores, thinking disabled in the chat template.

The paper's DPO settings and prompts, as in recipes/llama31.py. Prompts are rendered with `enable_thinking=False`,
so the sampled pairs and the DPO sequences both use Qwen3's non-thinking turn (an empty, closed think block):

    accelerate launch --config_file recipes/accelerate/zero1.yaml recipes/qwen3.py \\
        --dataset_name ./lmsys-chat-1m-synth.jsonl.gz

`--enable_thinking True` trains the thinking mode instead. Overrides as in any TRL script.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trl_retmask.recipe import RECIPE_DEFAULTS, main  # noqa: E402

DEFAULTS = RECIPE_DEFAULTS["qwen3"]  # trl_retmask/recipe.py; override any of them on the command line

if __name__ == "__main__":
    main(DEFAULTS, prog="recipes/qwen3.py", description=__doc__)
