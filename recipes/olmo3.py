"""RetMask on Olmo-3-7B-Instruct: the authors published no head scores for it, so the recipe detects them first.

    accelerate launch --config_file recipes/accelerate/zero1.yaml recipes/olmo3.py \\
        --dataset_name ./lmsys-chat-1m-synth.jsonl.gz

Detection runs the authors' NIAH protocol (their grid: 0-5000 tokens x 10 depths x 3 needles, 50 greedy tokens) on the
loaded policy (split across the processes) and writes `<output_dir>/detection/` (head_scores.json, heatmap,
per-sample JSONL; an interrupted run resumes); heads scoring >= 0.1 are masked. To reuse scores from an earlier run or
from `trl-retmask detect`, pass `--head_scores FILE`, which skips detection. Pairs (2048 new tokens) and DPO as in
recipes/llama31.py (the authors' run_dpo_olmo_inst.sh). Olmo-3-7B-Think, with its published scores:
recipes/olmo3_think.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout too

from trl_retmask.scripts.train import cli_main, recipe_defaults  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "olmo3.yaml")  # the defaults; override any
DEFAULTS = recipe_defaults(RECIPE)

if __name__ == "__main__":
    sys.exit(cli_main(prog="recipes/olmo3.py", recipe=RECIPE))
