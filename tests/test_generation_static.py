"""The static backend decodes exactly what separate `generate` calls (without / with `mask_heads`) decode."""

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import CompileConfig

from tests.tiny import make_tiny_model
from trl_retmask.generation import DEFAULT_BACKEND, RowHeadMask, StaticCacheBackend, generate_batch, make_backend
from trl_retmask.masking import mask_heads

HEADS = [(0, 1), (1, 0), (2, 3)]
# Different lengths: left padding, and length buckets that differ from the prompt lengths.
PROMPTS = [[1, 10, 11, 12, 13, 14], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 40]]


class Tok:
    """All generate_batch reads of a tokenizer."""

    pad_token_id = 0


def greedy(eos=2, max_new_tokens=10):
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)


def reference(model, prompts, heads, config):
    """Each prompt alone (no padding, dynamic cache), plain or under `mask_heads`, cut after the first EOS: the
    independent computation."""
    out = []
    for p in prompts:
        with mask_heads(model, heads or []), torch.no_grad():
            seq = model.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), generation_config=config
            )
        new = seq[0, len(p) :].tolist()
        out.append(new[: new.index(config.eos_token_id) + 1] if config.eos_token_id in new else new)
    return out


def pairs(model, backend, prompts, heads, config, seed=None):
    """(chosen, rejected) from one `generate_batch` call: rows [plain..., masked...]."""
    n = len(prompts)
    new = generate_batch(
        model, Tok(), prompts * 2, config, heads=heads, masked=[False] * n + [True] * n, seed=seed, backend=backend
    )
    return new[:n], new[n:]


def hooked(model) -> bool:
    return any(m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def stopping(llama):
    """A greedy config whose EOS is a token that prompt 0 emits at step 3: some rows stop early, others do not."""
    token = reference(llama, PROMPTS[:1], None, greedy(eos=None))[0][3]
    config = greedy(eos=token)
    return config, reference(llama, PROMPTS, None, config), reference(llama, PROMPTS, HEADS, config)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_row_mask_forward_equals_mask_heads_per_row(arch):
    model = make_tiny_model(arch)
    x = torch.tensor([PROMPTS[2], PROMPTS[2][::-1]])
    with torch.no_grad():
        plain = model(x).logits
        with mask_heads(model, HEADS):
            masked = model(x).logits
        with RowHeadMask(model) as rm:
            rm.set(HEADS, [False, True])
            rm.active = True
            mixed = model(x).logits
            rm.active = False
            off = model(x).logits
    assert not torch.allclose(plain[1], masked[1])  # the heads matter
    torch.testing.assert_close(mixed[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(mixed[1], masked[1], rtol=0, atol=0)
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    assert not hooked(model)  # removed on exit


def test_greedy_pairs_and_mixed_rows_equal_separate_generate(llama, stopping):
    config, chosen_ref, rejected_ref = stopping
    assert any(len(r) < config.max_new_tokens for r in chosen_ref)  # EOS is exercised
    assert chosen_ref != rejected_ref
    with StaticCacheBackend() as backend:
        assert pairs(llama, backend, PROMPTS, HEADS, config) == (chosen_ref, rejected_ref)
        assert hooked(llama)  # the hooks stay between calls
        # any mix of rows in one batch, in any order; the default backend agrees
        flags = [True, False, True, False]
        mixed = [
            generate_batch(llama, Tok(), PROMPTS[::-1], config, heads=HEADS, masked=flags, backend=b)
            for b in (backend, DEFAULT_BACKEND)
        ]
    assert mixed[0] == mixed[1] == [rejected_ref[3], chosen_ref[2], rejected_ref[1], chosen_ref[0]]
    assert not hooked(llama)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_greedy_pairs_other_families(arch):
    model = make_tiny_model(arch)  # gemma3_text: sliding-window layers in the static cache
    config = greedy(eos=None)
    with StaticCacheBackend() as backend:
        got = pairs(model, backend, PROMPTS, HEADS, config)
    assert got == (reference(model, PROMPTS, None, config), reference(model, PROMPTS, HEADS, config))


def test_sampling_reproducible_and_chosen_independent_of_heads(llama):
    config = GenerationConfig(
        max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0
    )
    with StaticCacheBackend() as backend:
        torch.manual_seed(123)
        a = pairs(llama, backend, PROMPTS, HEADS, config, seed=7)
        after = torch.rand(1)
        b = pairs(llama, backend, PROMPTS, HEADS, config, seed=7)
        c = pairs(llama, backend, PROMPTS, HEADS, config, seed=8)
        other = pairs(llama, backend, PROMPTS, [(1, 2), (2, 0)], config, seed=7)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))  # the caller's RNG stream is untouched
    assert a == b
    assert a != c
    assert other[0] == a[0]  # chosen rows do not see the rejected rows' heads: they can be cached apart
    assert other[1] != a[1]


def test_compiled_decode_step_equal_padded_and_no_recompiles(llama, stopping):
    """The dynamo-traced decode step (hooks inlined) decodes the same tokens; smaller batches are padded to the
    compiled batch size (filler rows dropped), and new head sets, prompt lengths and row flags reuse its graph.
    aot_eager: inductor's C++ build takes ~1 min on a CPU (tests/test_gpu.py covers CUDA graphs)."""
    from torch._dynamo.utils import counters

    config, chosen_ref, rejected_ref = stopping
    torch._dynamo.reset()
    counters.clear()
    with StaticCacheBackend(
        compile=True, length_multiple=16, compile_config=CompileConfig(backend="aot_eager", mode=None)
    ) as backend:
        assert pairs(llama, backend, PROMPTS, HEADS, config) == (chosen_ref, rejected_ref)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        assert pairs(llama, backend, PROMPTS[:3], HEADS, config) == (chosen_ref[:3], rejected_ref[:3])
        assert generate_batch(llama, Tok(), PROMPTS[:1], config, heads=HEADS, backend=backend) == rejected_ref[:1]
        pairs(llama, backend, PROMPTS[1:], [(1, 1)], config)
        pairs(llama, backend, PROMPTS[::-1], HEADS, config)
        assert counters["stats"]["unique_graphs"] == graphs
        assert backend.batch_sizes == {8}
    torch._dynamo.reset()


def test_one_backend_follows_the_model_it_is_given(stopping):
    config, _, _ = stopping
    a, b = make_tiny_model("llama"), make_tiny_model("llama", seed=1)
    with StaticCacheBackend() as backend:
        pairs(a, backend, PROMPTS, HEADS, config)
        assert pairs(b, backend, PROMPTS, HEADS, config) == (
            reference(b, PROMPTS, None, config),
            reference(b, PROMPTS, HEADS, config),
        )
        assert hooked(b) and not hooked(a)


def test_make_backend_and_bad_input(llama):
    assert make_backend("auto", llama) is DEFAULT_BACKEND  # head size 16: vLLM (if installed) cannot serve it
    assert make_backend("generate", llama) is DEFAULT_BACKEND
    static = make_backend("static", llama)
    assert isinstance(static, StaticCacheBackend) and make_backend(static) is static
    with pytest.raises(ValueError, match="`backend` must be one of auto, generate, static, vllm"):
        make_backend("tgi", llama)
    with pytest.raises(ValueError, match="length_multiple"):
        StaticCacheBackend(length_multiple=0)
    with StaticCacheBackend() as backend, pytest.raises(ValueError, match="max_new_tokens"):
        generate_batch(llama, Tok(), PROMPTS, GenerationConfig(max_length=20, pad_token_id=0), backend=backend)
    assert not hooked(llama)


# ------------------------------------------------------------------------------- scripts/bench_gpu.py on the CPU
def _bench_gpu():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_longest_sequence_bisects_to_the_oom_edge(monkeypatch):
    bench = _bench_gpu()
    edge = 5 * 1024 + 300  # the largest completion length that "fits"

    def fake_step(trainer, prompt_len, length):
        if length > edge:
            raise torch.OutOfMemoryError("fake")
        return 0.1

    monkeypatch.setattr(bench, "dpo_step", fake_step)
    trainer = type("T", (), {"optimizer": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)})()
    assert bench.longest_sequence(trainer, 1024, 131072, 1024, budget_s=60) == (5 * 1024, 0.1)
    assert bench.longest_sequence(trainer, 8192, 131072, 1024, budget_s=60)[0] == 0  # even the shortest fails
    assert bench.longest_sequence(trainer, 16, 256, 16, budget_s=60)[0] == 256  # everything fits


def test_bench_gpu_skips_without_cuda_and_configs_are_the_published_shapes(capsys, monkeypatch):
    bench = _bench_gpu()
    monkeypatch.setattr(bench, "device", lambda: torch.device("cpu"))  # the no-CUDA branch on every machine
    assert bench.run(type("A", (), {"quick": True})()) == []
    assert "# gpu: skipped (no CUDA" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    billions = {}
    for name in ("Llama-3.1-8B-Instruct", "Qwen3-8B", "Olmo-3-7B", "llama-1b-smollm2-vocab"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(bench.load_config(name, tiny=False))
        billions[name] = round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
    assert billions == {
        "Llama-3.1-8B-Instruct": 8.03,
        "Qwen3-8B": 8.19,
        "Olmo-3-7B": 7.3,
        "llama-1b-smollm2-vocab": 1.17,
    }


@pytest.mark.slow
def test_bench_gpu_tiny_runs_every_row_on_the_cpu(tmp_path):
    bench = _bench_gpu()
    out = tmp_path / "rows.json"
    assert bench.main(["--tiny", "--json", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())
    failed = [r["name"] for r in rows if "failed" in r["name"]]
    assert not failed
    names = " ".join(r["name"] for r in rows)
    for expected in (
        "generate_pairs, backend static",
        "backend generate",
        "bandwidth limit",
        "mask_heads / none",
        "detection / greedy",
        "DPO step",
        "longest completion per GPU, full",
        "longest completion per GPU, LoRA",
    ):
        assert expected in names


def test_bench_gpu_dpo_steps_run_with_checkpointing():
    """The bench's DPO steps bypass `Trainer.train()`, where checkpointing is turned on: `make_trainer` must turn it
    on itself (it did not: the DPO and longest-sequence rows measured steps that kept every activation)."""
    bench = _bench_gpu()
    for lora in (False, True):
        trainer = bench.make_trainer(bench.build("llama-1b-smollm2-vocab", tiny=True), liger=False, lora=lora)
        model = trainer.model.get_base_model() if lora else trainer.model
        assert model.is_gradient_checkpointing, f"lora={lora}"
        assert bench.dpo_step(trainer, 8, 16) > 0


def test_bench_gpu_restores_the_modeling_module_that_liger_patches():
    """Liger's instance API also rebinds `modeling_llama` globals (RoPE, RMSNorm, MLP classes); the bench's sections
    after a Liger section must build plain Llamas again (`modules_restored`)."""
    from transformers.models.llama import modeling_llama

    bench = _bench_gpu()
    before = {n: getattr(modeling_llama, n) for n in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    with bench.modules_restored():
        modeling_llama.apply_rotary_pos_emb = modeling_llama.LlamaRMSNorm = modeling_llama.LlamaMLP = None
        modeling_llama.added_by_a_patch = True
    assert {n: getattr(modeling_llama, n) for n in before} == before and not hasattr(modeling_llama, "added_by_a_patch")
    assert type(bench.build("llama-1b-smollm2-vocab", tiny=True).model.norm) is before["LlamaRMSNorm"]
