"""RetMask on Olmo-3-7B-Instruct: no published head scores, so the recipe detects them first (NIAH).

    accelerate launch --config_file recipes/accelerate/zero1.yaml recipes/olmo3.py \\
        --dataset_name ./lmsys-chat-1m-synth.jsonl.gz

Detection runs on the loaded policy over `--detect_context_lengths` x `--detect_depths` x the bundled needles
(split across the processes) and writes `<output_dir>/detection/` (head_scores.json, heatmap, per-sample JSONL;
an interrupted run resumes). To reuse scores from an earlier run or from `trl-retmask detect`, pass
`--head_scores FILE`, which skips detection. The paper's DPO settings otherwise, as in recipes/llama31.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trl_retmask.recipe import RECIPE_DEFAULTS, main  # noqa: E402

DEFAULTS = RECIPE_DEFAULTS["olmo3"]  # trl_retmask/recipe.py; override any of them on the command line

if __name__ == "__main__":
    main(DEFAULTS, prog="recipes/olmo3.py", description=__doc__)
