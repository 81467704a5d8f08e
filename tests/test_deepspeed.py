"""RetMask under real DeepSpeed ZeRO-3: 2 CPU processes (torchrun, gloo, DeepSpeed's CPU accelerator), checked against
a one-process run of the same model.

`accelerate launch` cannot start DeepSpeed on CPUs (its state finds no device backend and reports process 0 on every
rank; tests/launch.py `deepspeed_cpu_state` has the reading), so the drivers build accelerate's DeepSpeed state
themselves and the training arguments reuse it, as a script launched by torchrun may.
"""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.launch import REPO, ZERO3_CONFIG, build_deepspeed_cpu_ops, launch_two_deepspeed_cpu_processes
from tests.recipe_utils import save_tiny_model

pytest.importorskip("deepspeed")

# The driver's settings (tests/zero3_driver.py), read here for the one-process rerun.
PROMPTS = [
    "the secret number is",
    "tell me a story about the sea",
    "how many boys went to school ?",
    "the man",
    "what is the magic word ?",
]
HEADS = [(0, 1), (2, 3)]
PERTURBED = "model.layers.0.self_attn.q_proj.weight"
SAVE_16BIT = {"stage3_gather_16bit_weights_on_model_save": True}


@pytest.fixture(scope="module")
def deepspeed_ops():
    build_deepspeed_cpu_ops()


def one_process_pairs(model, tokenizer, tmp_path, seed_offset=0) -> list[dict]:
    """The pairs a plain one-process run makes from `model` with the driver's generation settings, as the trainer
    holds them."""
    from trl_retmask import RetMaskConfig
    from trl_retmask.pairs import complete_prompt_dataset

    args = RetMaskConfig(
        str(tmp_path / "one"), heads=["0-1", "2-3"], temperature=0.0, max_new_tokens=5, generation_batch_size=2
    )
    settings = {**args.pair_generation_kwargs, "cache_dir": None, "seed": args.generation_seed + seed_offset}
    pairs, _ = complete_prompt_dataset(Dataset.from_dict({"prompt": PROMPTS}), model, tokenizer, HEADS, **settings)
    eos = tokenizer.eos_token  # DPOTrainer's processing ends each completion with it
    return [{"prompt": r["prompt"], "chosen": r["chosen"] + eos, "rejected": r["rejected"] + eos} for r in pairs]


@pytest.mark.slow
def test_zero3_online_run_equals_one_process(tmp_path, deepspeed_ops):
    """ZeRO-3, 2 processes, model partitioned at load, default pair cache, odd batch count (3 batches of 2 prompts):
    - the weights' fingerprint inside the full-model gather (as pair generation computes it) and outside it equal
      the one-process fingerprint (DeepSpeed 0.19.8 refused the nested gather; the generation then hung in
      transformers' per-step sync on the process with more batches);
    - the reference model equals the policy as it was handed in (a weight changed after loading), dtype included
      (TRL reloaded it from the checkpoint);
    - the initial pairs, and those regenerated at step 2 from the trained policy, equal a one-process run's;
    - after a regeneration whose pairs were all dropped (step 1), training goes on with ZeRO-3's module hooks
      (they were left removed);
    - `LongContextEvalCallback` decodes its shares with the gathered weights.
    """
    from trl_retmask.fingerprints import hash_weights

    model_dir = save_tiny_model(tmp_path / "model")
    reports = tmp_path / "reports"
    launch_two_deepspeed_cpu_processes(
        REPO / "tests" / "zero3_driver.py", model_dir, tmp_path / "out", reports, cwd=tmp_path, timeout=240
    )
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks)
    assert all(r["distributed_type"] == "DistributedType.DEEPSPEED" and r["zero3"] for r in ranks)
    assert all(r["partitioned"] and r["partitioned_after_hash"] for r in ranks)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        dict(policy.named_parameters())[PERTURBED].add_(0.5)
    expected_hash = hash_weights(policy)
    assert all(r["hash_partitioned"] == r["hash_gathered"] == expected_hash for r in ranks)
    assert hash_weights(AutoModelForCausalLM.from_pretrained(model_dir)) != expected_hash  # the weights count

    assert all(r["reference_max_diff"] == 0.0 for r in ranks)
    assert all(r["reference_dtypes"] == r["policy_dtypes"] == ["torch.float32"] for r in ranks)

    assert ranks[0]["pairs"] == ranks[1]["pairs"]
    pairs = ranks[0]["pairs"]
    assert pairs["0"] == one_process_pairs(policy, tokenizer, tmp_path)
    assert pairs["1"] == pairs["0"]  # step 1's regeneration dropped every pair: the previous ones were kept
    step2 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    step2.load_state_dict(torch.load(reports / "policy_step2.pt"))
    assert pairs["2"] == one_process_pairs(step2, tokenizer, tmp_path, seed_offset=2)
    assert pairs["2"] != pairs["0"], "the policy moved, so its pairs changed"

    # TRL removes DeepSpeed's module hooks for generation and adds them back only when the body returns
    # (trl/models/utils.py:147-150): after step 1's failed regeneration they were gone (0 of 92 here).
    assert all(len(set(r["zero3_hooks"].values())) == 1 and r["zero3_hooks"]["0"] > 0 for r in ranks)
    assert all(r["global_step"] == 3 for r in ranks)
    # LongContextEvalCallback at step 3: 12 samples shared by 2 processes, decoded without hanging, the
    # same scores logged on both.
    assert ranks[0]["longctx_samples"] == 12 and [h["step"] for h in ranks[0]["longctx"]] == [3]
    assert ranks[0]["longctx"] == ranks[1]["longctx"]
    assert [h["step"] for h in ranks[0]["history"]] == [2]
    assert ranks[0]["losses"] and all(torch.isfinite(torch.tensor(ranks[0]["losses"])))
    assert any(f.endswith("pairs.meta.json") for f in ranks[0]["cache_files"])  # the default cache was used


@pytest.mark.slow
def test_zero3_recipe_detects_heads_and_measures_niah_like_one_process(tmp_path, deepspeed_ops, monkeypatch):
    """The train script under ZeRO-3 (2 processes, model partitioned at load): detection, NIAH before (plain and
    masked) and NIAH after training decode with full weights and equal a one-process run of the same models (they
    ran on empty partitions before, and NIAH after training decoded through per-forward all-gathers). 3 samples
    each, so one process decodes two and the other one. Every answer counts as correct (both sides), as in
    tests/test_surface.py: a random model answers nothing right."""
    import trl_retmask.detection as detection
    from tests.recipe_utils import tiny_overrides, write_chat_log, write_head_scores
    from trl_retmask import HeadScores, detect_retrieval_heads
    from trl_retmask.generation import model_window
    from trl_retmask.masking import mask_heads
    from trl_retmask.niah import build_niah_samples

    monkeypatch.setattr(detection, "score_answer", lambda reference, response: {"rouge1_recall": 1.0, "correct": True})
    model_dir = save_tiny_model(tmp_path / "model")
    config = tmp_path / "zero3.json"  # consolidated weights saved, as recipes/accelerate/zero3.yaml does
    zero = {**ZERO3_CONFIG["zero_optimization"], **SAVE_16BIT}
    config.write_text(json.dumps({**ZERO3_CONFIG, "zero_optimization": zero}))
    out, reports = tmp_path / "out", tmp_path / "reports"
    args = tiny_overrides(model_dir, write_chat_log(tmp_path / "chat.jsonl"), write_head_scores(tmp_path / "s"), out)
    i = args.index("--head_scores")
    del args[i : i + 2]  # heads from detection
    args += [
        *("--deepspeed", config, "--accelerator_config", '{"use_configured_state": true}'),
        *("--mask_top_k", "2", "--max_steps", "1", "--temperature", "0", "--max_prompts", "4"),
        *("--detect_heads", "True", "--detect_context_lengths", "300", "--detect_depths", "50"),
        *("--detect_max_new_tokens", "3", "--niah_eval", "True", "--niah_context_lengths", "120"),
        *("--niah_depths", "50", "--niah_max_new_tokens", "4", "--generation_batch_size", "2"),
        *("--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--warmup_steps", "0"),
    ]
    monkeypatch.setenv("RETMASK_TEST_EVERY_ANSWER_CORRECT", "1")
    launch_two_deepspeed_cpu_processes(REPO / "tests" / "distributed_driver.py", reports, *args, cwd=tmp_path)
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["num_processes"] == 2 and r["global_step"] == 1 for r in ranks)

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    detected = detect_retrieval_heads(model, tokenizer, context_lengths=[300], depths=[50], max_new_tokens=3)
    assert HeadScores.from_pretrained(out / "detection").to_dict() == detected.to_dict()
    top2 = sorted(h for h, _ in sorted(detected.mean_scores().items(), key=lambda kv: (-kv[1], kv[0]))[:2])
    assert ranks[0]["summary_heads"] == [f"{layer}-{head}" for layer, head in top2]

    samples = build_niah_samples(tokenizer, [120], [50], max_length=model_window(model), max_new_tokens=4)
    assert len(samples) == 3

    def answers(m, heads=None):
        result = {}
        for s in samples:
            ids = torch.tensor([s.input_ids])
            with torch.no_grad(), mask_heads(m, heads or []):
                new = m.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=4,
                    do_sample=False,
                    pad_token_id=0,
                )[0, ids.shape[1] :]
            result[s.key] = tokenizer.decode(new, skip_special_tokens=True)
        return result

    def records(name):
        lines = [line for r in (0, 1) for line in (out / name / f"niah.rank{r}.jsonl").read_text().splitlines()]
        return {r["key"]: r["response"] for r in map(json.loads, lines)}

    trained = AutoModelForCausalLM.from_pretrained(out).eval()
    assert any((a - b).abs().max() > 0 for a, b in zip(trained.parameters(), model.parameters()))
    assert records("niah_before") == answers(model)
    assert records("niah_before_masked") == answers(model, top2)
    assert records("niah_after") == answers(trained)
    assert all(ranks[0]["niah"][k]["num_samples"] == 3 for k in ("niah_before", "niah_before_masked", "niah_after"))
