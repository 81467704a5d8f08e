"""RetMask on Olmo-3-7B-Think with the authors' settings and their published retrieval-head scores (bundled).

    accelerate launch --config_file recipes/accelerate/zero1.yaml recipes/olmo3_think.py \\
        --dataset_name ./lmsys-chat-1m-synth.jsonl.gz

Heads scoring >= 0.1 (46 of 1024) are masked. Pairs: up to 2048 new tokens; the model always thinks and the authors
served it without a reasoning parser, so the whole generated text (thinking + answer) is the response DPO trains on.
DPO as in recipes/llama31.py (the authors' run_dpo_olmo.sh). Olmo-3-7B-Instruct (scores detected first):
recipes/olmo3.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout too

from trl_retmask.scripts.train import cli_main, recipe_defaults  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "olmo3_think.yaml")  # the defaults; override any
DEFAULTS = recipe_defaults(RECIPE)

if __name__ == "__main__":
    sys.exit(cli_main(prog="recipes/olmo3_think.py", recipe=RECIPE))
