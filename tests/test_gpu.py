"""CUDA-only checks (`gpu` marker; skipped without CUDA): what the CPU suite cannot show.

Liger's Triton kernels (equal to the model's own layers, and in a training run), bf16 end to end from prompts,
detection on CUDA agreeing with the CPU, masking under the CUDA attention kernels equal to a zeroed-weights copy, the
static pair backend (compiled, CUDA graphs) equal to plain `generate`, also through `generate_pairs`, and vLLM's greedy
pairs on CUDA equal to `generate`'s on both of its routes. `bash scripts/gpu_check.sh` runs them on a lent GPU
(docs/benchmarks.md, "GPU check"), where TRL, datasets and liger-kernel come as carried wheels and vLLM is absent.
"""

import math

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (on a lent GPU: bash scripts/gpu_wheels.sh, carry .gpu_wheels)")

from datasets import Dataset  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from tests.test_masking import zeroed_copy  # noqa: E402
from tests.tiny import HAYSTACK, make_tiny_model  # noqa: E402
from trl_retmask import HeadScores  # noqa: E402
from trl_retmask.config import RetMaskConfig  # noqa: E402
from trl_retmask.detection import record_attention_argmax  # noqa: E402
from trl_retmask.generation import StaticCacheBackend, generate_batch  # noqa: E402
from trl_retmask.masking import mask_heads  # noqa: E402
from trl_retmask.pairs import generate_pairs  # noqa: E402
from trl_retmask.trainer import RetMaskTrainer  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = ["the secret number is", "tell me a story about the sea", "how many boys went to school ?", "the man said"]
SCORES = HeadScores(
    {"0-1": [0.9, 0.7], "1-2": [0.5], "2-0": [0.3], "0-0": [0.01], "2-3": [0.02]}, num_layers=3, num_heads=4
)
HEADS = [(0, 1), (1, 2), (2, 0)]


def train(tmp_path, tokenizer, **kw):
    args = RetMaskConfig(
        str(tmp_path / "out"),
        **{
            **dict(
                max_steps=2,
                per_device_train_batch_size=2,
                temperature=0.0,
                max_new_tokens=6,
                report_to="none",
                logging_steps=1,
                learning_rate=2e-3,
                save_strategy="no",
                disable_tqdm=True,
                seed=0,
            ),
            **kw,
        },
    )
    trainer = RetMaskTrainer(
        model=make_tiny_model("llama"),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        head_scores=SCORES,
    )
    trainer.train()
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture
def liger(monkeypatch):
    """liger-kernel, with transformers' Llama module restored afterwards.

    Liger patches the instance *and* the modeling module's globals (`liger_kernel/transformers/monkey_patch.py`,
    `apply_liger_kernel_to_llama`: `modeling_llama.apply_rotary_pos_emb`, `LlamaRMSNorm`, `LlamaMLP`), so every
    Llama built or run later in the process uses Liger's Triton kernels, which fail on CPU tensors: the detection
    test, which decodes on the CPU first, broke after the Liger test."""
    liger_kernel = pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))  # restored at teardown
    return liger_kernel


def test_liger_kernels_equal_the_models_layers(liger):
    """`apply_liger_kernels` (liger-kernel's instance API) keeps the model's function: fp32 logits within rounding of
    the unpatched model's, and Liger's RMSNorm and SwiGLU are what runs."""
    from trl_retmask.liger import apply_liger_kernels

    model = make_tiny_model("llama").cuda()
    x = torch.randint(3, 384, (2, 48), device="cuda")
    with torch.no_grad():
        expected = model(x).logits
        apply_liger_kernels(model)
        got = model(x).logits
    layer = model.model.layers[0]
    assert (model.model.norm._get_name(), layer.input_layernorm._get_name(), layer.mlp._get_name()) == (
        "LigerRMSNorm",
        "LigerRMSNorm",
        "LigerSwiGLUMLP",
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_liger_training_step(liger, tiny_tokenizer, tmp_path):
    trainer, losses = train(tmp_path, tiny_tokenizer, liger_kernels=True, bf16=True)
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert trainer.model.model.norm._get_name() == "LigerRMSNorm"  # patched by `liger_kernels=True`
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-2)  # policy == reference at step 0
    assert all(math.isfinite(x) for x in losses)


def test_bf16_end_to_end_from_prompts(tiny_tokenizer, tmp_path):
    # `gradient_checkpointing`: the spelling transformers 5.17 (the lent GPU's) knows; RetMaskConfig maps it.
    trainer, losses = train(tmp_path, tiny_tokenizer, bf16=True, gradient_checkpointing=True)
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-2)  # policy == reference at step 0
    stats = trainer.pair_stats["train"]
    assert stats.kept == len(trainer.train_dataset) == stats.prompts - stats.dropped_identical - stats.dropped_empty
    assert all(c != r for c, r in zip(trainer.train_dataset["chosen"], trainer.train_dataset["rejected"]))
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "config.json").is_file()


def _argmax_positions(model, ids):
    config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
    with record_attention_argmax(model) as recorder, torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return out[0, ids.shape[1] :].cpu(), recorder.positions(ids.shape[1] - 1, 6)


def test_detection_on_cuda_agrees_with_cpu(tiny_tokenizer):
    model = make_tiny_model("llama")
    ids = torch.tensor([tiny_tokenizer(HAYSTACK)["input_ids"][:120]])
    new_cpu, pos_cpu = _argmax_positions(model, ids)
    new_gpu, pos_gpu = _argmax_positions(model.cuda(), ids.cuda())
    assert torch.equal(new_cpu, new_gpu)
    assert (pos_cpu == pos_gpu).float().mean() > 0.99  # fp32: only exact ties may differ


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masking_on_cuda_equals_zeroed_weights(attn, dtype):
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
        if dtype == torch.float32:
            pytest.skip("flash attention runs in half precision only")
    model = make_tiny_model("llama", attn_implementation=attn).to("cuda", dtype)
    reference = zeroed_copy(model, HEADS)
    x = torch.randint(3, 384, (2, 64), device="cuda")
    with torch.no_grad(), mask_heads(model, HEADS):
        masked = model(x).logits
    with torch.no_grad():
        expected = reference(x).logits
        plain = model(x).logits
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(masked, expected, **tol)
    assert not torch.allclose(masked, plain, atol=1e-3)


def test_static_backend_compiled_equals_plain_generate():
    model = make_tiny_model("llama").cuda()
    prompts = [[1, 10, 11, 12, 13, 14], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 40]]
    config = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)

    def reference(heads):
        rows = []
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            with mask_heads(model, heads), torch.no_grad():
                rows.append(
                    model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[
                        0, len(p) :
                    ].tolist()
                )
        return rows

    tok = type("Tok", (), {"pad_token_id": 0})()
    flags = [False] * 4 + [True] * 4
    with StaticCacheBackend() as backend:  # compiled decode (CUDA graphs) by default on CUDA
        first = generate_batch(model, tok, prompts * 2, config, heads=HEADS, masked=flags, backend=backend)
        again = generate_batch(model, tok, prompts * 2, config, heads=HEADS, masked=flags, backend=backend)
        assert backend.row_mask is not None and backend.batch_sizes == {8}
    assert first == again == reference([]) + reference(HEADS)


def test_generate_pairs_static_backend_on_cuda(tiny_tokenizer):
    """What users get: greedy pairs of the compiled static backend equal the `generate` backend's, and sampled
    pairs are reproducible from the seed."""
    model = make_tiny_model("llama").cuda()
    greedy = dict(temperature=0.0, max_new_tokens=8, batch_size=2, show_progress=False)
    plain = generate_pairs(model, tiny_tokenizer, PROMPTS, HEADS, backend="generate", **greedy)
    static = generate_pairs(model, tiny_tokenizer, PROMPTS, HEADS, backend="static", **greedy)
    assert (static.chosen, static.rejected) == (plain.chosen, plain.rejected)
    assert static.fingerprint == plain.fingerprint == ""  # no cache dir
    sampled = dict(temperature=1.0, max_new_tokens=8, batch_size=2, show_progress=False, seed=3)
    a = generate_pairs(model, tiny_tokenizer, PROMPTS, HEADS, backend="static", **sampled)
    b = generate_pairs(model, tiny_tokenizer, PROMPTS, HEADS, backend="static", **sampled)
    assert (a.chosen, a.rejected) == (b.chosen, b.rejected)


@pytest.fixture(scope="module")
def vllm_model():
    """A tiny fp32 Llama on CUDA whose head size vLLM's CUDA attention takes (64), with vLLM required."""
    from trl_retmask.generation.vllm import INSTALL_HINT, close_engine, vllm_available

    if not vllm_available():
        pytest.skip(f"vLLM is not installed ({INSTALL_HINT})")
    model = make_tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model.config.dtype = torch.float32  # the engine's dtype on CUDA follows the checkpoint's: fp32, as the model's
    yield model.cuda()
    close_engine()


@pytest.mark.parametrize("route", ["per_request", "weights"])
def test_vllm_greedy_pairs_equal_generate_on_cuda(vllm_model, tiny_tokenizer, route, monkeypatch):
    """vLLM's pairs on CUDA, both ways the engine masks heads: "per_request" (eager engine: plain and masked rows in
    one call, the heads zeroed per request) and "weights" (CUDA graphs: the masked layers' o_proj weights swapped for
    a second call). Greedy, they equal the `generate` backend's, chosen and rejected."""
    from trl_retmask.generation.vllm import VLLMBackend, VLLMSettings

    backend = VLLMBackend(VLLMSettings(enforce_eager=route == "per_request"))
    engine = backend.engine(vllm_model)
    calls = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda p, params: calls.append(len(p)) or generate(p, params))
    greedy = dict(temperature=0.0, max_new_tokens=8, batch_size=2, show_progress=False)
    got = generate_pairs(vllm_model, tiny_tokenizer, PROMPTS, HEADS, backend=backend, **greedy)
    assert calls == ([4, 4] if route == "per_request" else [2, 2, 2, 2]), f"{route}: engine calls {calls}"
    plain = generate_pairs(vllm_model, tiny_tokenizer, PROMPTS, HEADS, backend="generate", **greedy)
    assert (got.chosen, got.rejected) == (plain.chosen, plain.rejected)
    assert any(c != r for c, r in zip(plain.chosen, plain.rejected)), "the mask must change some answer"
