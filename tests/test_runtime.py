"""The shared plumbing: fingerprints, batched generation, the resumable sharded runner and the JSON cache."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.launch import launch_two_cpu_processes
from tests.tiny import make_tiny_model
from trl_retmask.masking import mask_heads
from trl_retmask.runtime import (
    GenerateBackend,
    cached_json,
    check_prompts,
    fingerprint,
    generate_batch,
    make_generation_config,
    model_fingerprint,
    run_resumable,
)

REPO = Path(__file__).resolve().parents[1]
HEADS = [(0, 1), (1, 2), (2, 0)]


# ------------------------------------------------------------------------------------------------ fingerprints
def test_fingerprint_is_canonical_and_refuses_unknown_types():
    assert fingerprint(a=(1, 2), b={"y": 1, "x": [3]}) == fingerprint(b={"x": (3,), "y": 1}, a=[1, 2])
    assert fingerprint(a=1) != fingerprint(a=2) and fingerprint(a=1) != fingerprint(b=1)
    with pytest.raises(TypeError, match="Cannot fingerprint a object"):
        fingerprint(a=object())


def test_model_fingerprint_tracks_weights_and_generation_config_not_the_path():
    a, b = make_tiny_model("llama"), make_tiny_model("llama")
    assert model_fingerprint(a) == model_fingerprint(b)
    b.config._name_or_path = "/somewhere/else"  # where it was loaded from is no part of what it computes
    assert model_fingerprint(a) == model_fingerprint(b)
    b.generation_config.repetition_penalty = 1.3
    assert model_fingerprint(a) != model_fingerprint(b)
    c = make_tiny_model("llama")
    c.generation_config.eos_token_id = 7
    assert model_fingerprint(a) != model_fingerprint(c)
    with torch.no_grad():
        a.lm_head.weight[0, 0] += 1e-4
    assert model_fingerprint(a) != model_fingerprint(make_tiny_model("llama"))


def _independent_weight_hash(state: dict) -> str:
    """The documented format, by hand: sorted names; name|dtype|shape, then the bytes (a tied repeat: '=first')."""
    import hashlib

    h, first = hashlib.sha256(), {}
    for name, t in sorted(state.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.data_ptr() in first:
            h.update(f"={first[t.data_ptr()]}".encode())
            continue
        first[t.data_ptr()] = name
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("tie", [False, True])
def test_offloaded_weights_are_hashed_as_if_in_memory(tie, tmp_path):
    """accelerate's `device_map` offload leaves meta tensors in the module: they are read from their offload (disk
    or CPU), so the fingerprint is that of the same weights in memory, and the module is left offloaded."""
    from transformers import AutoModelForCausalLM

    from trl_retmask.runtime import hash_weights

    make_tiny_model("llama", tie_word_embeddings=tie).save_pretrained(tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert hash_weights(plain) == _independent_weight_hash(plain.state_dict())
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu" if tie else "disk",
                  "model.rotary_emb": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map,
                                                     offload_folder=tmp_path / "offload")
    on_meta = {n for n, p in offloaded.named_parameters() if p.device.type == "meta"}
    assert any(".layers.1." in n for n in on_meta)
    assert hash_weights(offloaded) == hash_weights(plain)
    assert {n for n, p in offloaded.named_parameters() if p.device.type == "meta"} == on_meta
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(plain.config)
    with pytest.raises(ValueError, match="is on the meta device with no offloaded copy.*load the checkpoint"):
        hash_weights(empty)


def test_zero3_partitions_are_gathered_for_the_hash(monkeypatch):
    """Under DeepSpeed ZeRO-3 each process holds empty partitions: the weights are gathered, so two checkpoints of
    one architecture never share a fingerprint (a stand-in `deepspeed.zero.GatheredParameters` at the boundary)."""
    import contextlib
    import types

    from trl_retmask.runtime import hash_weights

    full = make_tiny_model("llama")
    expected = hash_weights(full)
    partitioned = make_tiny_model("llama")
    stash = {}
    for i, p in enumerate(partitioned.parameters()):
        p.ds_id, p.ds_shape = i, p.shape  # DeepSpeed's attributes of a partitioned parameter
        stash[i] = p.data
        p.data = torch.empty(0, dtype=p.dtype)

    gathered = []

    @contextlib.contextmanager
    def gathered_parameters(params, modifier_rank=None):
        saved = [p.data for p in params]
        for p in params:
            p.data = stash[p.ds_id]
            gathered.append(p.ds_id)
        yield
        for p, data in zip(params, saved):
            p.data = data

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    monkeypatch.setitem(__import__("sys").modules, "deepspeed", fake)
    assert hash_weights(partitioned) == expected
    assert sorted(gathered) == sorted(stash)  # each partitioned weight gathered once (tied ones are not repeated)
    assert all(p.numel() == 0 for p in partitioned.parameters())  # partitions restored
    stash[0] = stash[0] + 1e-3  # another checkpoint of the same architecture
    assert hash_weights(partitioned) != expected


# --------------------------------------------------------------------------------------------------- generation
PROMPT_IDS = [[1, 10, 11, 12, 13, 14, 15], [1, 20, 21], [1, 30, 31, 32, 33], [1, 40]]


def _one_by_one(model, prompt_ids, config, heads=None):
    """Independent reference: each prompt alone (no padding) through `model.generate`, cut after the first EOS."""
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        with torch.no_grad(), mask_heads(model, heads or []):
            new = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)[0, len(ids):]
        new = new.tolist()
        out.append(new[:new.index(2) + 1] if 2 in new else new)  # eos_token_id = 2
    return out


@pytest.mark.parametrize("heads", [None, HEADS])
def test_generate_batch_equals_unpadded_generation(tiny_tokenizer, heads):
    model = make_tiny_model("llama").train()  # left in training mode: the helper decodes in eval mode
    config = make_generation_config(model, 6)
    side = tiny_tokenizer.padding_side
    got = generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, heads=heads)
    assert model.training and tiny_tokenizer.padding_side == side  # both given back untouched
    model.eval()
    assert got == _one_by_one(model, PROMPT_IDS, config, heads)
    if heads:  # the mask is applied: the masked batch differs from the unmasked one somewhere
        assert got != generate_batch(model, tiny_tokenizer, PROMPT_IDS, config)


def test_generate_batch_works_without_a_pad_token(tiny_tokenizer):
    model = make_tiny_model("llama")
    config = make_generation_config(model, 4)
    tok = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tok.pad_token = None
    assert tok.pad_token_id is None
    assert generate_batch(model, tok, PROMPT_IDS, config) == _one_by_one(model, PROMPT_IDS, config)


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng(tiny_tokenizer):
    model = make_tiny_model("llama")
    config = make_generation_config(model, 8, temperature=1.5)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, seed=5)
    assert a != generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, seed=6)  # it does sample


def test_backend_is_pluggable_and_owns_the_mask(tiny_tokenizer):
    calls = []

    class Counting(GenerateBackend):
        def __call__(self, model, input_ids, attention_mask, generation_config, *, heads=(), masked):
            calls.append((list(heads), list(masked)))
            assert input_ids.shape == attention_mask.shape and (attention_mask[:, -1] == 1).all()  # left padding
            return super().__call__(model, input_ids, attention_mask, generation_config, heads=heads, masked=masked)

    model = make_tiny_model("llama")
    config = make_generation_config(model, 3)
    assert generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, heads=HEADS, backend=Counting()) == \
        generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, heads=HEADS)
    assert calls == [(HEADS, [True] * 4)]
    assert not any(m._forward_pre_hooks for m in model.modules())  # the default backend's mask is gone


def test_mixed_rows_equal_their_own_calls(tiny_tokenizer):
    """Rows flagged `masked` decode as in a masked call, the others as in a plain one, in any order."""
    model = make_tiny_model("llama")
    config = make_generation_config(model, 6)
    flags = [True, False, False, True]
    got = generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, heads=HEADS, masked=flags)
    plain, masked = _one_by_one(model, PROMPT_IDS, config), _one_by_one(model, PROMPT_IDS, config, HEADS)
    assert plain != masked
    assert got == [masked[i] if f else plain[i] for i, f in enumerate(flags)]
    with pytest.raises(ValueError, match="one flag per prompt"):
        generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, heads=HEADS, masked=[True])
    with pytest.raises(ValueError, match="no heads are given"):
        generate_batch(model, tiny_tokenizer, PROMPT_IDS, config, masked=flags)


def test_empty_prompts_refused_alone_and_in_a_batch(tiny_tokenizer):
    model = make_tiny_model("llama")
    model.generate = lambda *a, **k: pytest.fail("generated although a prompt is empty")
    for prompt_ids, index in (([[]], 0), ([[1, 5], [], [1, 6, 7]], 1)):
        with pytest.raises(ValueError, match=f"Prompt {index} encodes to no tokens"):
            generate_batch(model, tiny_tokenizer, prompt_ids, make_generation_config(model, 3))
    for prompts, index in (([""], 0), (["a", " \n"], 1), ([[{"role": "user", "content": "x"}], []], 1),
                           ([[{"role": "user", "content": [{"type": "text", "text": " "}]}]], 0)):
        with pytest.raises(ValueError, match=f"Prompt {index} is empty"):
            check_prompts(prompts)
    with pytest.raises(ValueError, match="Prompt 0 must be a string"):
        check_prompts([3])
    check_prompts(["a", [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]])


def test_top_k_none_takes_the_model_value_or_off():
    """vLLM's rule: the model's generation config top_k, off (0) when it has none (transformers would use 50)."""
    model = make_tiny_model("llama")
    model.generation_config.top_k = None
    assert make_generation_config(model, 3, temperature=0.7, top_k=None).top_k == 0
    model.generation_config.top_k = 20
    assert make_generation_config(model, 3, temperature=0.7, top_k=None).top_k == 20
    assert make_generation_config(model, 3, temperature=0.7, top_k=5).top_k == 5
    assert make_generation_config(model, 3, top_k=None).top_k is None  # greedy: sampling fields cleared


def test_bad_generation_settings_are_refused():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="Unknown generation settings \\['temprature'\\]"):
        make_generation_config(model, 3, temprature=0.5)
    for kwargs, name in (({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
                         ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(ValueError, match=f"`{name}` must"):
            make_generation_config(model, **{"max_new_tokens": 3, **kwargs})


class Canned(GenerateBackend):
    """A backend that returns fixed rows: what `generate_batch` does after decoding, checked exactly."""

    def __init__(self, rows):
        self.rows = rows

    def __call__(self, model, input_ids, attention_mask, generation_config, *, heads=(), masked):
        return [list(r) for r in self.rows]


@pytest.mark.parametrize("eos,rows,expected", [
    (2, [[5, 6, 2], [2, 7, 8], [5, 6, 7], [9, 2, 2]], [[5, 6, 2], [2], [5, 6, 7], [9, 2]]),  # last / first / none
    ([2, 7], [[5, 6, 7], [7, 2, 8], [5, 6, 9], [8, 2]], [[5, 6, 7], [7], [5, 6, 9], [8, 2]]),  # several EOS ids
    (None, [[5, 2, 7]], [[5, 2, 7]]),  # no EOS: nothing cut
])
def test_rows_are_cut_after_their_first_eos(eos, rows, expected):
    """An EOS at the last position keeps the whole row (EOS included); at the first, the row is the EOS alone."""
    model = make_tiny_model("llama")
    config = make_generation_config(model, 3)
    config.eos_token_id = eos
    tok = type("Tok", (), {"pad_token_id": 0})()
    assert generate_batch(model, tok, PROMPT_IDS[:len(rows)], config, backend=Canned(rows)) == expected


def test_temperature_zero_is_greedy_and_any_positive_temperature_samples():
    model = make_tiny_model("llama")
    greedy, hot = make_generation_config(model, 3, temperature=0.0), make_generation_config(model, 3, temperature=1e-6)
    assert (greedy.do_sample, greedy.temperature, greedy.top_k) == (False, None, None)
    assert (hot.do_sample, hot.temperature, hot.top_k) == (True, 1e-6, 0)
    assert make_generation_config(model, 1).max_new_tokens == 1  # the smallest budget is accepted


# ------------------------------------------------------------------------------------------------------ runner
class Item:
    def __init__(self, i):
        self.i, self.key = i, f"item{i}"


ITEMS = [Item(i) for i in range(7)]


def square(item):
    return {"value": item.i ** 2}


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    calls = []

    def dies_at_4(item):
        calls.append(item.i)
        if len(calls) == 4 and interrupt:
            raise KeyboardInterrupt
        return square(item)

    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        run_resumable(ITEMS, dies_at_4, tmp_path, name="t", fingerprint="f")
    interrupt, calls = False, []
    resumed = run_resumable(ITEMS, dies_at_4, tmp_path, name="t", fingerprint="f")
    assert calls == [3, 4, 5, 6]
    assert resumed == run_resumable(ITEMS, square, None, name="t") == [
        {"key": f"item{i}", "value": i * i} for i in range(7)]


def test_other_fingerprint_is_refused_or_redone_with_overwrite(tmp_path):
    run_resumable(ITEMS, square, tmp_path, name="t", fingerprint="f", info={"needles": ["a"]})
    with pytest.raises(ValueError, match=f"{tmp_path} holds t results of another run.*needles differ.*fresh output "
                                         "directory.*overwrite=True"):
        run_resumable(ITEMS, square, tmp_path, name="t", fingerprint="g", info={"needles": ["b"]})
    calls = []
    redone = run_resumable(ITEMS, lambda it: calls.append(it.i) or {"value": -it.i}, tmp_path, name="t",
                           fingerprint="g", overwrite=True)
    assert calls == list(range(7)) and [r["value"] for r in redone] == [-i for i in range(7)]
    assert json.loads((tmp_path / "t.meta.json").read_text())["fingerprint"] == "g"
    # Records without their metadata cannot be trusted either.
    (tmp_path / "t.meta.json").unlink()
    with pytest.raises(ValueError, match="t.meta.json is missing or unreadable"):
        run_resumable(ITEMS, square, tmp_path, name="t", fingerprint="g")


def test_a_matching_fingerprint_is_resumed_even_with_overwrite_and_a_bare_meta_file_is_refused(tmp_path):
    run_resumable(ITEMS, square, tmp_path / "a", name="t", fingerprint="f")
    # same run: records reused, overwrite or not (overwrite discards only another run's records)
    assert run_resumable(ITEMS, _never, tmp_path / "a", name="t", fingerprint="f", overwrite=True) == \
        run_resumable(ITEMS, square, None, name="t")
    # another run's metadata alone (no records yet) is refused too: the directory belongs to that run
    run_resumable([], square, tmp_path / "b", name="t", fingerprint="f")
    assert not list((tmp_path / "b").glob("t.rank*.jsonl"))
    with pytest.raises(ValueError, match="another run"):
        run_resumable(ITEMS, square, tmp_path / "b", name="t", fingerprint="g")


def _never(item):
    raise AssertionError(f"{item.key} was recomputed")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_fields", "unknown_key", "binary"])
def test_damaged_records_are_named_and_redone(tmp_path, damage):
    run_resumable(ITEMS, square, tmp_path, name="t", fingerprint="f")
    path = tmp_path / "t.rank0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    if damage == "truncated":  # kill -9 while writing the last line
        path.write_text("".join(lines[:-1]) + lines[-1][:9])
    elif damage == "garbage":
        path.write_text("".join(lines[:2]) + "{not json\n" + "".join(lines[3:]))
    elif damage == "wrong_fields":
        path.write_text("".join(lines[:2]) + json.dumps({"key": "item2", "valu": 4}) + "\n" + "".join(lines[3:]))
    elif damage == "unknown_key":
        path.write_text("".join(lines[:2]) + json.dumps({"key": "item99", "value": 4}) + "\n" + "".join(lines[3:]))
    else:
        path.write_bytes(b"\x00\xff\xfe\x80 PK garbage" + b"\n" + "".join(lines[3:]).encode())
    calls = []

    def redo(item):
        calls.append(item.i)
        return square(item)

    if damage == "truncated":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an expected outcome of a kill: no warning
            out = run_resumable(ITEMS, redo, tmp_path, name="t", fingerprint="f", verify=lambda it, r: "value" in r)
    else:
        with pytest.warns(UserWarning, match=f"{path}: 1 unusable record"):
            out = run_resumable(ITEMS, redo, tmp_path, name="t", fingerprint="f", verify=lambda it, r: "value" in r)
    assert calls == {"truncated": [6], "binary": [0, 1, 2]}.get(damage, [2])
    assert out == run_resumable(ITEMS, square, None, name="t")
    with warnings.catch_warnings():  # repaired: read cleanly, nothing redone
        warnings.simplefilter("error")
        assert run_resumable(ITEMS, _never, tmp_path, name="t", fingerprint="f") == out


def test_read_only_complete_directory_is_read_without_writing(tmp_path):
    out = tmp_path / "out"
    first = run_resumable(ITEMS, square, out, name="t", fingerprint="f")
    paths = [out, *out.iterdir()]
    before = {p: (p.stat().st_mtime_ns, None if p.is_dir() else p.read_bytes()) for p in paths}
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        again = run_resumable(ITEMS, _never, out, name="t", fingerprint="f")
    finally:
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert again == first
    # Also as root (whom chmod does not stop): nothing was touched.
    assert {p: (p.stat().st_mtime_ns, None if p.is_dir() else p.read_bytes()) for p in [out, *out.iterdir()]} == before


def test_duplicate_keys_are_refused():
    with pytest.raises(ValueError, match="distinct keys"):
        run_resumable([Item(1), Item(1)], square, None, name="t")


SHARD_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_runtime import ITEMS, square
import torch
from trl_retmask.runtime import end_processes, process_state, run_resumable

out = run_resumable(ITEMS, square, sys.argv[1], name="t", fingerprint="f")
assert out == [{{"key": f"item{{i}}", "value": i * i}} for i in range(7)], out
rank = process_state().process_index
end_processes()
assert not torch.distributed.is_initialized()
end_processes()  # a no-op once the group is gone
print("rank", rank, "ok")
"""


def test_two_processes_equal_one(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT.format(repo=str(REPO)))
    proc = launch_two_cpu_processes(script, tmp_path / "out")
    assert proc.stdout.count(" ok") == 2
    files = sorted(p.name for p in (tmp_path / "out").glob("t.rank*.jsonl"))
    assert files == ["t.rank0.jsonl", "t.rank1.jsonl"]
    # Each item was done once, by one process; one process resumes from both files without redoing anything.
    lines = [json.loads(line) for f in files for line in (tmp_path / "out" / f).read_text().splitlines()]
    assert sorted(r["key"] for r in lines) == sorted(it.key for it in ITEMS)
    assert run_resumable(ITEMS, _never, tmp_path / "out", name="t", fingerprint="f") == \
        run_resumable(ITEMS, square, None, name="t")


# ------------------------------------------------------------------------------------------------ JSON cache
def test_cached_json(tmp_path):
    path = tmp_path / "r.json"
    calls = []

    def compute():
        calls.append(1)
        return {"x": len(calls)}

    assert cached_json(path, "f", compute) == {"x": 1}
    assert cached_json(path, "f", compute) == {"x": 1} and len(calls) == 1
    with pytest.raises(ValueError, match=f"{path} holds a result of other inputs.*overwrite=True"):
        cached_json(path, "g", compute)
    assert cached_json(path, "g", compute, overwrite=True) == {"x": 2}
    path.write_text('{"x": 2, "fingerp')
    with pytest.warns(UserWarning, match=f"{path} is unreadable"):
        assert cached_json(path, "g", compute) == {"x": 3}


# ------------------------------------------------------------------------------------------- CPU training memory
MALLOC_SCRIPT = """
import ctypes, sys
sys.path.insert(0, {repo!r})
from trl_retmask.runtime import limit_cpu_training_memory

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
def touched(n):
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    return p
if sys.argv[1] == "limit":
    assert limit_cpu_training_memory("cpu") is True
libc.free(touched(16 << 20))  # glibc's dynamic rule: freeing this mmapped block raises the mmap threshold to 16 MiB
before = rss()
blocks = [touched(1 << 20) for _ in range(201)]
for p in blocks[:-1]:  # the last block, on top of the heap, keeps the freed ones below it from being trimmed
    libc.free(p)
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_cpu_training_memory_returns_freed_blocks_to_the_os(tmp_path, monkeypatch):
    """Measured on glibc itself: after a large free, 200 freed 1 MiB blocks stay resident (heap), but with
    `limit_cpu_training_memory` they are mmapped and go back to the OS on free."""
    script = tmp_path / "malloc.py"
    script.write_text(MALLOC_SCRIPT.format(repo=str(REPO)))
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    kept = {mode: int(subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True,
                                     check=True).stdout) for mode in ("default", "limit")}
    assert kept["default"] >= 150 and kept["limit"] <= 20, kept  # MiB still resident of 200 freed
    # Only on the CPU, and never over the user's own setting.
    from trl_retmask.runtime import limit_cpu_training_memory

    assert limit_cpu_training_memory("cuda") is False and limit_cpu_training_memory(torch.device("mps")) is False
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert limit_cpu_training_memory("cpu") is False
