"""Trainer overheads on the embedded model, each side timed in the same run (interleaved where possible).

1. A RetMaskTrainer training step / a plain TRL DPOTrainer step on the same batch of pairs, same settings.
2. A DPO step / its floor: one policy forward+backward plus one reference forward (no grad) on the same batch.
   Steps are `training_step` (forward, backward, reference forward, loss); the equal optimizer update is left out.
3. Pair-generation throughput / bare `model.generate` throughput on the same batches (fixed-length responses), and
   the static backend (one decode loop for chosen + rejected, static KV cache) / the `generate` backend on the CPU
   (informative: the static backend is meant for CUDA, where it compiles).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings

import torch

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "Give me a tip for learning to cook.",
    "What does a compiler do?",
    "Why is the sky blue?",
    "Suggest a name for a black cat.",
    "How many legs does a spider have?",
    "Summarise the plot of Cinderella in one sentence.",
    "What is 12 times 12?",
    "Describe autumn in two words.",
    "Who wrote Hamlet?",
    "What is the boiling point of water?",
    "Recommend a board game for four players.",
    "Translate 'good morning' into Spanish.",
]


def _scores(model_name, model):
    """The bundled scores of the model, else stand-in scores (any 20 heads cost the same)."""
    from trl_retmask import HeadScores
    from trl_retmask.layout import head_layout

    try:
        return HeadScores.from_pretrained(model_name)
    except ValueError:
        layers, heads, _ = head_layout(model)
        return HeadScores(
            {
                f"{layer}-{head}": [((layer * heads + head) * 37 % 101) / 100]
                for layer in range(layers)
                for head in range(heads)
            }
        )


def _bare_generate(model, tokenizer, chats, batch_size, gen_kwargs):
    """Plain batched generate over the same batches; returns (new tokens, seconds)."""
    tokens, seconds = 0, 0.0
    for i in range(0, len(chats), batch_size):
        enc = tokenizer.apply_chat_template(
            chats[i : i + batch_size],
            add_generation_prompt=True,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            return_dict=True,
        )
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, **gen_kwargs)
        seconds += time.perf_counter() - t
        tokens += out[:, enc["input_ids"].shape[1] :].numel()
    return tokens, seconds


def run(args):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from trl_retmask import RetMaskConfig, RetMaskTrainer, load_model_and_tokenizer
    from trl_retmask.generation import StaticCacheBackend
    from trl_retmask.pairs import generate_pairs

    warnings.filterwarnings("ignore")
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    scores = _scores(args.model, model)
    top_k = min(20, scores.num_layers * scores.num_heads)
    heads = scores.select(top_k=top_k)
    n_prompts = 8 if args.quick else 16
    new_tokens = 16 if args.quick else 32
    batch_size = 8
    reps = 3 if args.quick else 5
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:n_prompts]]
    rows = []

    # 3. Generation throughput: fixed-length responses, so both sides produce the same token count.
    gen = dict(
        max_new_tokens=new_tokens,
        temperature=0.6,
        top_p=1.0,
        top_k=0,
        batch_size=batch_size,
        generation_kwargs={"min_new_tokens": new_tokens},
        show_progress=False,
    )
    gen_kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        temperature=0.6,
        top_p=1.0,
        top_k=0,
        pad_token_id=tokenizer.pad_token_id,
    )
    _bare_generate(model, tokenizer, chats[:batch_size], batch_size, {**gen_kwargs, "max_new_tokens": 2})  # warm-up
    bare_tps, pair_tps, static_tps = [], [], []
    with StaticCacheBackend() as static:
        for rep in range(reps):  # interleaved
            tokens, seconds = _bare_generate(model, tokenizer, chats, batch_size, gen_kwargs)
            bare_tps.append(tokens / seconds)
            pairs = generate_pairs(model, tokenizer, chats, heads, seed=rep, backend="generate", **gen)
            pair_tps.append(pairs.stats.tokens_per_second)
            static_pairs = generate_pairs(model, tokenizer, chats, heads, seed=rep, backend=static, **gen)
            static_tps.append(static_pairs.stats.tokens_per_second)
    rows.append(
        {
            "name": f"pair generation / bare generate tok/s (batch {batch_size}, {new_tokens} new tok)",
            "value": statistics.median(p / b for p, b in zip(pair_tps, bare_tps)),
            "unit": "x",
            "goal": ">= 0.9",
        }
    )
    rows.append(
        {"name": "bare generate throughput (median)", "value": statistics.median(bare_tps), "unit": "tok/s", "goal": ""}
    )
    rows.append(
        {
            "name": "pair generation tok/s, backend static / generate (CPU, informative)",
            "value": statistics.median(s / p for s, p in zip(static_tps, pair_tps)),
            "unit": "x",
            "goal": "",
        }
    )

    # 1 + 2. Step time: RetMaskTrainer vs DPOTrainer vs the floor, on one batch of the same pairs (generated above),
    # same settings, interleaved rep by rep (order reversed every other rep) so machine noise hits all alike. A step is
    # `training_step` (forward + backward of the policy, reference forward, DPO loss); the optimizer update, equal
    # for all, is left out.
    prefs = pairs.to_dataset()
    if len(prefs) < 4:
        prefs = Dataset.from_dict(
            {
                "prompt": chats[:4],
                "chosen": [[{"role": "assistant", "content": c}] for c in pairs.chosen[:4]],
                "rejected": [[{"role": "assistant", "content": r}] for r in pairs.rejected[:4]],
            }
        )
    batch_size = 2 if args.quick else 4
    common = dict(
        max_steps=1,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-6,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        bf16=False,
        max_length=256,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        retmask = RetMaskTrainer(
            model=copy.deepcopy(model).train(),
            args=RetMaskConfig(f"{tmp}/retmask", mask_top_k=top_k, **common),
            train_dataset=prefs,
            processing_class=tokenizer,
            head_scores=scores,
        )
        dpo = DPOTrainer(
            model=copy.deepcopy(model).train(),
            ref_model=copy.deepcopy(model).eval(),
            args=DPOConfig(f"{tmp}/dpo", gradient_checkpointing=False, **common),
            train_dataset=prefs,
            processing_class=tokenizer,
        )
    for trainer in (retmask, dpo):
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is bypassed here
    batch = next(iter(dpo.get_train_dataloader()))
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]

    def step(trainer):
        trainer.training_step(trainer.model, dict(batch))
        trainer.model.zero_grad(set_to_none=True)

    def floor():  # policy forward + backward of a plain log-likelihood, reference forward, same batch
        policy, ref = dpo.model, dpo.ref_model
        logits = policy(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        logp = logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        (-(logp * completion[:, 1:]).sum()).backward()
        with torch.no_grad():
            ref(input_ids=ids, attention_mask=mask, use_cache=False)
        policy.zero_grad(set_to_none=True)

    fns = {"retmask": lambda: step(retmask), "dpo": lambda: step(dpo), "floor": floor}
    times = {k: [] for k in fns}
    for rep in range(reps + 2):
        for name in list(fns) if rep % 2 == 0 else list(fns)[::-1]:
            t = time.perf_counter()
            fns[name]()
            if rep > 0:  # the first rep warms up
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(times["dpo"])
    rows.append(
        {
            "name": f"RetMaskTrainer step / DPOTrainer step (batch {batch_size}, median of {n})",
            "value": statistics.median(r / d for r, d in zip(times["retmask"], times["dpo"])),
            "unit": "x",
            "goal": "<= 1.05",
        }
    )
    rows.append(
        {
            "name": f"DPO step / floor (policy fwd+bwd + ref fwd, median of {n})",
            "value": statistics.median(d / f for d, f in zip(times["dpo"], times["floor"])),
            "unit": "x",
            "goal": "<= 1.5",
        }
    )
    rows.append({"name": "DPOTrainer step time (median)", "value": med["dpo"], "unit": "s", "goal": ""})
    rows.append({"name": "floor time (median)", "value": med["floor"], "unit": "s", "goal": ""})
    return rows
