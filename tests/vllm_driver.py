"""Pair generation on vLLM under `accelerate launch`: each rank runs its own colocated CPU engine on its share.

Used by tests/test_vllm.py: `accelerate launch --num_processes 2 ... tests/vllm_driver.py OUT_DIR`. Every rank calls
`generate_pairs(backend="vllm")` on the same prompts (greedy); rank k writes OUT_DIR/rank<k>.json with the pairs it
returns (all of them, gathered) and the prompts its own engine decoded; then closes the engine (as the trainer does
before training), meets the other rank (the job's process group must survive the engine), and generates again with a
new engine; then once more with a single batch, which only rank 0 decodes (rank 1 must still join the engine's
set-up).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import PartialState  # noqa: E402

from tests.test_vllm import CHATS, HEADS  # noqa: E402
from trl_retmask import load_model_and_tokenizer  # noqa: E402
from trl_retmask.distributed import end_processes  # noqa: E402
from trl_retmask.generation import vllm  # noqa: E402
from trl_retmask.pairs import generate_pairs  # noqa: E402

out = Path(sys.argv[1])
state = PartialState(cpu=True)
decoded = []
_generate = vllm._Engine.generate


def counting(self, prompts, params):
    decoded.extend(map(list, prompts))
    return _generate(self, prompts, params)


vllm._Engine.generate = counting
model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
greedy = dict(batch_size=2, backend="vllm", temperature=0.0, max_new_tokens=12, show_progress=False)
pairs = generate_pairs(model, tokenizer, CHATS, HEADS, **greedy)
shares = len(decoded)
vllm.close_engine()  # what the trainer does before training: the job's process group must survive it
state.wait_for_everyone()
again = generate_pairs(model, tokenizer, CHATS[:4], HEADS, **greedy)  # a new engine in the same job
vllm.close_engine()
lone = generate_pairs(model, tokenizer, CHATS[:2], HEADS, **greedy)  # one batch: rank 1 decodes nothing
vllm.close_engine()
record = {
    "rank": state.process_index,
    "world_size": state.num_processes,
    "chosen": pairs.chosen,
    "rejected": pairs.rejected,
    "decoded": decoded[:shares],
    "again": [again.chosen, again.rejected],
    "lone": [lone.chosen, lone.rejected],
}
(out / f"rank{state.process_index}.json").write_text(json.dumps(record))
end_processes()  # as the CLI does: no gloo abort at interpreter exit
