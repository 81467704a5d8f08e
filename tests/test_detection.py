"""Retrieval-head detection: argmax recording against eager attention, hand-computed scores, resume, sharding."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trl_retmask.detection as detection
from tests.tiny import NEEDLE, make_tiny_model
from tests.tiny import OTHER_NEEDLE as OTHER
from trl_retmask.detection import copy_scores, detect_retrieval_heads, record_attention_argmax
from trl_retmask.niah import NIAHSample, build_niah_samples, generate_answer, greedy_generation_config

REPO = Path(__file__).resolve().parents[1]




def forced_generation(tokenizer, answers: dict, calls: list | None = None, fail_after: int | None = None,
                      on_sample=None):
    """A `generate_answer` that runs the real model forward passes but emits the given answer text per needle."""

    def generate(model, tok, sample, max_new_tokens):
        if calls is not None:
            calls.append(sample.key)
            if fail_after is not None and len(calls) > fail_after:
                raise KeyboardInterrupt  # killed mid-run
        if on_sample is not None:
            on_sample(sample)
        target = tokenizer(answers[sample.needle_index], add_special_tokens=False)["input_ids"][:max_new_tokens]
        ids = torch.tensor([sample.input_ids])
        p = ids.shape[1]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=greedy_generation_config(model, len(target)),
                             prefix_allowed_tokens_fn=lambda _, x: [target[len(x) - p]])
        return out[0, p:].tolist()

    return generate


def test_copy_scores_by_hand():
    sequence = torch.tensor([5, 6, 7, 8, 9, 10, 6, 7, 99])
    generated = torch.tensor([6, 7, 99])  # sequence[6:] = prompt (6 tokens) + generated
    span = (1, 4)  # needle tokens 6, 7, 8
    positions = torch.tensor([  # [steps, layers=1, heads=4]
        [[1, 6, 2, 0]],  # step 0 (generates 6): head0 copies; head1 points at a 6 outside the needle; head2 at a 7
        [[2, 7, 2, 2]],  # step 1 (generates 7): head0, head2, head3 copy; head1 points at a 7 outside the needle
        [[1, 8, 3, 8]],  # step 2 (generates 99): nobody copies (99 is not in the needle)
    ])
    expected = torch.tensor([[2 / 3, 0.0, 1 / 3, 1 / 3]])
    assert torch.allclose(copy_scores(positions, generated, sequence, span), expected)


def _reference_argmax(model, prompt: list[int], new: list[int]) -> torch.Tensor:
    """The original algorithm's attention rows: eager attention over the sequence, every head's weights."""
    base = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(torch.tensor([prompt + new[:-1]]), output_attentions=True)
    finally:
        model.set_attn_implementation(base)
    rows = slice(len(prompt) - 1, len(prompt) - 1 + len(new))
    return torch.stack([a[0, :, rows, :].transpose(0, 1) for a in out.attentions], dim=1)  # [steps, L, H, kv]


def test_recorded_argmax_matches_eager_attention(tiny_arch, tiny_tokenizer):
    """Across families (GQA, sliding windows with cropped caches, soft-capping), sdpa or eager."""
    model = make_tiny_model(tiny_arch)
    torch.manual_seed(1)
    prompt = torch.randint(6, 380, (40,)).tolist()  # longer than the sliding windows (8) of the Gemma configs
    sample = NIAHSample(prompt, 10, 20, "x", "q", "n", 40, 50.0)
    impl = model.config._attn_implementation
    with record_attention_argmax(model) as recorder:
        assert model.config._attn_implementation != impl
        new = generate_answer(model, tiny_tokenizer, sample, 8)
        positions = recorder.positions(len(prompt) - 1, len(new))
    assert model.config._attn_implementation == impl  # restored
    weights = _reference_argmax(model, prompt, new)  # [steps, layers, heads, kv]
    picked = weights.gather(-1, positions[..., None]).squeeze(-1)
    best = weights.max(-1)
    # The recorded key has the largest weight (up to float noise between sdpa and eager) ...
    assert torch.all(picked >= best.values - 1e-6), (picked - best.values).min()
    # ... and is the same position nearly everywhere (differences are exact ties only).
    assert (positions == best.indices).float().mean() > 0.97
    assert positions.shape == (len(new), 3, 4)


def test_recording_leaves_outputs_unchanged(tiny_llama):
    ids = torch.randint(6, 380, (1, 30))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        with record_attention_argmax(tiny_llama):
            rec = tiny_llama(ids).logits
    assert torch.equal(ref, rec)


def test_detect_scores_match_hand_computation(tiny_tokenizer, hay_dir, monkeypatch, tmp_path):
    """Stub the argmax so that the copying is known, force the answers, and compare with scores by hand."""
    current = {}

    def stub_argmax(query, key, attention_mask=None):
        b, hq = query.shape[:2]
        s = current["sample"]
        t = key.shape[2] - len(s.input_ids)  # the step: 0 for the prefill, then one per generated token
        pos = torch.zeros(b, hq, dtype=torch.long)
        pos[:, 0] = s.needle_start + t  # copies needle token t: a hit every step
        pos[:, 1] = s.needle_start + t + 1  # one ahead: never the token being generated
        pos[:, 2] = s.needle_start + t if t % 2 == 0 else 0  # copies on even steps only
        pos[:, 3] = len(s.input_ids) - 1 + t  # the latest token: outside the needle
        return pos

    monkeypatch.setattr(detection, "last_row_argmax", stub_argmax)
    # Needle 0 is answered with the needle itself (correct); needle 1 with a wrong answer (excluded).
    monkeypatch.setattr(detection, "generate_answer", forced_generation(
        tiny_tokenizer, {0: NEEDLE["needle"], 1: "the man went home . it"},
        on_sample=lambda s: current.update(sample=s)))
    model = make_tiny_model("llama")
    scores = detect_retrieval_heads(model, tiny_tokenizer, context_lengths=[60], depths=[0, 50],
                                    needles=[NEEDLE, OTHER], max_new_tokens=6, haystack_dir=hay_dir,
                                    output_dir=tmp_path / "out")
    # 6 needle tokens, 6 steps: head0 copies 6/6, head2 3/6 (steps 0, 2, 4), heads 1 and 3 never.
    for layer in range(3):
        assert scores.scores[(layer, 0)] == [1.0, 1.0]  # two correct samples (depths 0 and 50 of needle 0)
        assert scores.scores[(layer, 1)] == [0.0, 0.0]
        assert scores.scores[(layer, 2)] == [0.5, 0.5]
        assert scores.scores[(layer, 3)] == [0.0, 0.0]
    out = tmp_path / "out"
    assert json.loads((out / "head_scores.json").read_text())["0-2"] == [0.5, 0.5]
    for name in ("head_scores.png", "niah_grid.png", "sparsity.json"):
        assert (out / name).is_file()
    assert json.loads((out / "sparsity.json").read_text())["num_correct"] == 2


def _forced_detect(model, tok, hay_dir, out, monkeypatch, **kw):
    monkeypatch.setattr(detection, "generate_answer",
                        forced_generation(tok, {0: NEEDLE["needle"], 1: OTHER["needle"]}, **kw))
    return detect_retrieval_heads(model, tok, context_lengths=[50, 80], depths=[0, 50, 100], needles=[NEEDLE, OTHER],
                                  max_new_tokens=6, haystack_dir=hay_dir, output_dir=out)


def test_detect_resumes_after_kill(tiny_tokenizer, hay_dir, monkeypatch, tmp_path):
    model = make_tiny_model("qwen2")
    full = _forced_detect(model, tiny_tokenizer, hay_dir, tmp_path / "full", monkeypatch)
    calls = []
    with pytest.raises(KeyboardInterrupt):
        _forced_detect(model, tiny_tokenizer, hay_dir, tmp_path / "cut", monkeypatch, calls=calls, fail_after=5)
    assert len((tmp_path / "cut" / "detect.rank0.jsonl").read_text().splitlines()) == 5
    calls.clear()
    resumed = _forced_detect(model, tiny_tokenizer, hay_dir, tmp_path / "cut", monkeypatch, calls=calls)
    assert len(calls) == 12 - 5  # only the unfinished samples ran again
    assert resumed.scores == full.scores
    assert max(max(v) for v in full.scores.values()) > 0  # real copying happened, so the comparison means something


SHARD_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import pytest
from tests.tiny import make_tiny_model, make_tiny_tokenizer
from tests.test_detection import _forced_detect
from pathlib import Path
tok = make_tiny_tokenizer(Path(sys.argv[1]) / "tok")
mp = pytest.MonkeyPatch()
_forced_detect(make_tiny_model("qwen2"), tok, Path(sys.argv[2]), Path(sys.argv[1]) / "out", mp)
"""


def test_two_processes_match_one(tiny_tokenizer, hay_dir, monkeypatch, tmp_path):
    # Same thread count as the shards (OMP_NUM_THREADS=1 below): float reduction order, hence argmax near-ties,
    # depends on it, and exact equality of scores is the point of the test.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _forced_detect(make_tiny_model("qwen2"), tiny_tokenizer, hay_dir, tmp_path / "one", monkeypatch)
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT.format(repo=str(REPO)))
    # `--cpu --num_processes 2` would need mpirun; torchrun through `--multi_gpu` with ACCELERATE_USE_CPU gives gloo.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(script), str(tmp_path), str(hay_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("detect.rank*.jsonl")) == ["detect.rank0.jsonl", "detect.rank1.jsonl"]
    sharded = json.loads((out / "head_scores.json").read_text())
    assert sharded == json.loads((tmp_path / "one" / "head_scores.json").read_text())
    assert sharded == {f"{l}-{h}": v for (l, h), v in single.scores.items()}


def test_zero_correct_samples_is_an_error(tiny_tokenizer, hay_dir):
    model = make_tiny_model("llama")  # random weights never answer
    with pytest.raises(ValueError, match="shorter contexts"):
        detect_retrieval_heads(model, tiny_tokenizer, context_lengths=[50], depths=[50], needles=[NEEDLE],
                               max_new_tokens=3, haystack_dir=hay_dir)


def test_bad_input_fails_before_work(tiny_tokenizer, hay_dir, tmp_path):
    model = make_tiny_model("llama")  # window 512
    with pytest.raises(ValueError, match="window"):
        detect_retrieval_heads(model, tiny_tokenizer, context_lengths=[500], depths=[50], needles=[NEEDLE],
                               max_new_tokens=32, haystack_dir=hay_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text"):
        detect_retrieval_heads(model, tiny_tokenizer, haystack_dir=tmp_path / "empty")


@pytest.mark.real_model
def test_real_model_argmax_matches_eager(smollm2):
    model, tok = smollm2
    sample = build_niah_samples(tok, [512], [50], None)[1]
    with record_attention_argmax(model) as recorder:
        new = generate_answer(model, tok, sample, 12)
        positions = recorder.positions(len(sample.input_ids) - 1, len(new))
    weights = _reference_argmax(model, sample.input_ids, new)
    picked = weights.gather(-1, positions[..., None]).squeeze(-1)
    assert torch.all(picked >= weights.max(-1).values - 1e-5)
    assert (positions == weights.argmax(-1)).float().mean() > 0.99
    # Some head copies the answer from the needle: the mechanism the score counts exists in this model.
    scores = copy_scores(positions, torch.tensor(new), torch.tensor(sample.input_ids + new), sample.needle_span)
    assert scores.max() >= 3 / (sample.needle_end - sample.needle_start)  # >= 3 copied needle tokens
