"""The whole RetMask pipeline on the embedded SmolLM2-135M-Instruct, on a CPU (the README's main command).

    python recipes/smollm2.py

1. detects the retrieval heads with needle-in-a-haystack copying (bundled PG-19 haystack and needles),
2. measures NIAH accuracy (on depths not used for detection): the model, and the model with its top heads masked,
3. samples a chosen (model) and a rejected (heads masked) response for each prompt of the shipped prompt set,
4. trains with DPO (RetMaskTrainer) and saves the model, its card and the head scores to `--output_dir`,
5. measures NIAH accuracy again and writes `retmask_recipe_summary.json`.

Every setting can be overridden like in any TRL script, e.g. `--max_prompts 16 --num_train_epochs 1` for a quicker
look, or `--head_scores FILE` to skip detection. Two CPU processes (torchrun + gloo; accelerate's `--cpu` alone
would hand a multi-process run to mpirun): `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2
recipes/smollm2.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout too

from trl_retmask.scripts.train import cli_main, recipe_defaults  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2.yaml")  # the defaults; override any
DEFAULTS = recipe_defaults(RECIPE)

if __name__ == "__main__":
    sys.exit(cli_main(prog="recipes/smollm2.py", recipe=RECIPE))
