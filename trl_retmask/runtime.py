"""Plumbing shared by detection, NIAH, evaluation and pair generation.

One place each for: the process state (rank, world size, device), fingerprints (what a stored result depends on),
batched generation (left padding per call, seeded sampling, optional head mask), and the sharded, resumable,
fingerprinted runner that writes results as they finish. Every stage pads, seeds, caches and resumes the same way.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import logging
import os
import platform
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm
from trl.trainer.utils import pad

from .masking import mask_heads
from .validation import check_int, check_number

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ process state
def process_state() -> PartialState:
    """accelerate's process state: the one way the package reads rank, world size and device.

    Without CUDA (or with `ACCELERATE_USE_CPU`), a torchrun / `accelerate launch` job is multi-CPU (gloo).
    """
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=use_cpu)


def from_main_process(value):
    """The main process's `value` on every process (the processes then agree, e.g. on a cache directory)."""
    state = process_state()
    if state.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


@contextmanager
def unwrapped_for_generation(trainer):
    """The trainer's model ready to generate mid-training: TRL's `unwrap_model_for_generation` (gathers ZeRO-3 / FSDP
    shards, turns activation checkpointing off), with checkpointing restored with the user's kwargs (TRL's default
    would be transformers' own) and also when the body raises (TRL restores it only when the body returns, so an
    error caught by the caller would leave the rest of training without it)."""
    from trl.models.utils import unwrap_model_for_generation

    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    was_on = unwrapped.is_gradient_checkpointing  # the names TRL reads and calls, valid on every transformers 5
    kwargs = trainer.args.gradient_checkpointing_kwargs
    try:
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                         gradient_checkpointing_kwargs=kwargs) as model:
            yield model
    finally:
        if was_on and not unwrapped.is_gradient_checkpointing:
            unwrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def end_processes() -> None:
    """Wait for every process, then tear down the process group (accelerate's `end_training`).

    A rank that leaves the interpreter with the group alive while another still works (rank 0 saving the model)
    can abort in the collective backend's destructor ("terminate called without an active exception", gloo), which
    fails the whole launch although the work is done. No-op without a process group.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        state = process_state()
        state.wait_for_everyone()
        state.destroy_process_group()


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def limit_cpu_training_memory(device: torch.device | str = "cpu", threshold: int = 128 * 1024) -> bool:
    """On a CPU `device`, make glibc return freed activation memory to the OS: `mallopt(M_MMAP_THRESHOLD, threshold)`.

    glibc serves large blocks with mmap, but after the first big free it raises that threshold (up to 32 MiB), so a
    CPU training step's activations then come from its heap and stay resident once freed (the README's main command:
    5.9 GB resident for 2.1 GB of live tensors after a DPO micro-batch). A fixed threshold turns that adjustment off.
    No-op (returns False) on accelerators, off glibc, or when the user set `MALLOC_MMAP_THRESHOLD_` (it wins).
    """
    if (torch.device(device).type != "cpu" or platform.libc_ver()[0] != "glibc"
            or "MALLOC_MMAP_THRESHOLD_" in os.environ):
        return False
    return ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1


# ------------------------------------------------------------------------------------------------- fingerprints
_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "_commit_hash", "_from_model_config", "transformers_version"})
"""Config fields that say where a model came from, not what it computes (the weights hash covers identity)."""


def _canonical(obj):
    """The JSON form of a fingerprint part. Unknown types are refused: their repr may hold a memory address."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_canonical(v) for v in obj), key=json.dumps)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    if hasattr(obj, "to_diff_dict"):  # transformers' PretrainedConfig and GenerationConfig
        return _canonical({k: v for k, v in obj.to_diff_dict().items() if k not in _VOLATILE_CONFIG_KEYS})
    if is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(asdict(obj))
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"Cannot fingerprint a {type(obj).__name__}; pass JSON-like values (dict, list, str, numbers).")


def fingerprint(**parts) -> str:
    """SHA-256 of the canonical JSON of `parts` (sorted keys, tuples as lists, configs as their non-default fields)."""
    text = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def hash_weights(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the state dict (names, dtypes, shapes, bytes).

    Reads every weight once (about a second per GB on a CPU core; a GPU model is copied to the CPU tensor by
    tensor), so fingerprinting is cheap next to generating with the model, but not free. Weights that are not
    in the module are read where they are: DeepSpeed ZeRO-3 partitions are gathered (every process hashes, in the
    same order), accelerate-offloaded weights (`device_map` with "cpu"/"disk", on the meta device in the module) are
    loaded module by module. A weight on the meta device with nothing behind it is refused: the hash would not
    depend on the weights.
    """
    from accelerate.utils.modeling import align_module_device, has_offloaded_params

    params = dict(model.named_parameters(remove_duplicate=False))
    offloaded = {n: m for n, m in model.named_modules() if has_offloaded_params(m)}
    h = hashlib.sha256()
    seen = {}  # tied weights (embeddings / LM head) are hashed once
    onloaded = None  # (name, context) of the offloaded module whose weights are loaded now
    try:
        for name, t in sorted(model.state_dict().items()):
            param = params.get(name)
            zero3 = getattr(param, "ds_id", None) is not None  # ZeRO-3: this process holds a partition
            h.update(f"{name}|{t.dtype}|{tuple(param.ds_shape if zero3 else t.shape)}".encode())
            owner = None
            if zero3:
                key = ("zero3", id(param))
            elif t.device.type == "meta":
                owner = max((n for n in offloaded if name.startswith(f"{n}.") or n == ""), key=len, default=None)
                if owner is None:
                    raise ValueError(f"Weight {name!r} is on the meta device with no offloaded copy behind it (the "
                                     "model was built without loading its weights): load the checkpoint first.")
                key = ("offloaded", id(param) if param is not None else name)
            else:
                key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            elsewhere = zero3 or owner is not None  # the full tensor is not this placeholder
            if key in seen or (t.numel() == 0 and not elsewhere):
                h.update(f"={seen.get(key, '')}".encode())
                continue
            seen[key] = name
            if zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    t = param.detach().contiguous().cpu().clone()
            elif owner is not None:
                if onloaded is None or onloaded[0] != owner:
                    if onloaded is not None:
                        onloaded[1].__exit__(None, None, None)
                    context = align_module_device(offloaded[owner], "cpu")
                    context.__enter__()
                    onloaded = (owner, context)
                t = offloaded[owner].state_dict()[name[len(owner) + 1:] if owner else name]
            t = t.detach().contiguous().cpu()
            h.update(t.view(torch.uint8).numpy().tobytes())
    finally:
        if onloaded is not None:
            onloaded[1].__exit__(None, None, None)
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """The model's identity: class, config, attention implementation, weights, and its generation config (whose
    defaults, e.g. `eos_token_id` or `repetition_penalty`, change what it generates)."""
    config = getattr(model, "config", None)
    return fingerprint(cls=f"{type(model).__module__}.{type(model).__qualname__}", config=config,
                       attn=getattr(config, "_attn_implementation", None), weights=hash_weights(model),
                       generation=getattr(model, "generation_config", None))


# --------------------------------------------------------------------------------------------------- prompts
def render_user_prompt(tokenizer, content: str, plain_suffix: str = "") -> str:
    """One user turn as the model sees it: the chat template when the tokenizer has one, else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return content + plain_suffix


def encode_rendered(tokenizer, text: str, **kwargs):
    """Tokenize a prompt made by `render_user_prompt`: chat-rendered text already holds its special tokens, plain
    text gets the tokenizer's own (its BOS)."""
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None), **kwargs)


def _blank(content) -> bool:
    if content is None or isinstance(content, str):
        return not (content or "").strip()
    if isinstance(content, list):  # multimodal parts: blank when every part is blank text
        return all(isinstance(p, dict) and p.get("type", "text") == "text" and _blank(p.get("text")) for p in content)
    return False


def check_prompts(prompts: Sequence) -> None:
    """Refuse empty prompts before any generation: an empty or whitespace-only string, a chat prompt without
    messages, or one whose last message (the turn answered) has no content. Alone in a batch such a prompt crashes
    inside transformers; batched with others it silently yields a response to nothing."""
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            empty = not p.strip()
        elif isinstance(p, list) and all(isinstance(m, dict) for m in p):
            empty = not p or _blank(p[-1].get("content"))
        else:
            raise ValueError(f"Prompt {i} must be a string or a list of chat messages, got {type(p).__name__}: "
                             f"{p!r:.80}")
        if empty:
            raise ValueError(f"Prompt {i} is empty ({p!r:.80}); remove empty prompts from the data "
                             "(e.g. `dataset.filter(...)`) before generating.")


def check_prompt_ids(prompt_ids: Sequence[Sequence[int]]) -> None:
    """Refuse prompts that encode to no tokens, naming the first one, before any generation."""
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"Prompt {i} encodes to no tokens; remove empty prompts from the data before generating.")


# ------------------------------------------------------------------------------------------------- generation
def make_generation_config(model, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                           top_k: int | None = 0, **overrides):
    """A copy of the model's generation config for up to `max_new_tokens` new tokens, one sequence per prompt.

    `temperature == 0` decodes greedily (sampling fields cleared, so transformers does not warn); otherwise it
    samples with `temperature`, `top_p`, `top_k` (0 = off; None = the model's generation config value, off when it
    has none: vLLM's rule, not transformers' fallback of 50). `overrides` (any `GenerationConfig` field, e.g.
    `repetition_penalty`) come last. The pad token defaults to EOS when the model has none.
    """
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_number("temperature", temperature, low=0)
    check_number("top_p", top_p, low=0, high=1, low_open=True)
    check_int("top_k", top_k, minimum=0, optional=True)
    config = copy.deepcopy(model.generation_config)
    if temperature > 0:
        if top_k is None:  # vLLM reads generation_config.json; absent -> off (transformers would fill in 50)
            top_k = config.top_k or 0
        config.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        config.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    unknown = config.update(max_new_tokens=max_new_tokens, num_beams=1, use_cache=True, **overrides)
    if unknown:
        raise ValueError(f"Unknown generation settings {sorted(unknown)}: use fields of transformers.GenerationConfig.")
    if config.pad_token_id is None and config.eos_token_id is not None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return config


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


class GenerateBackend:
    """How one left-padded batch is decoded, head masking included: `model.generate` with its dynamic KV cache, the
    rows flagged `masked` in a call of their own under `mask_heads`. The default, and the best on a CPU.

    Subclasses (e.g. `fast_generation.StaticCacheBackend`) return the same tokens for greedy decoding. `joint` says
    whether rows of both kinds share one decode loop (and so one seeded random stream); a backend that keeps state
    (hooks, a compiled step) releases it in `close()`.
    """

    name = "generate"
    joint = False

    def __call__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config, *,
                 heads: Sequence = (), masked: Sequence[bool]) -> list[list[int]]:
        """New token ids per row (not yet cut at EOS); row i decodes with `heads` masked iff `masked[i]`."""
        new: list[list[int] | None] = [None] * len(masked)
        for flag in (False, True):
            idx = [i for i, m in enumerate(masked) if m == flag]
            if not idx:
                continue
            rows = torch.tensor(idx, device=input_ids.device)
            with mask_heads(model, heads) if flag else nullcontext():
                out = model.generate(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                                     generation_config=generation_config)
            for i, row in zip(idx, out[:, input_ids.shape[1]:].tolist()):
                new[i] = row
        return new

    def close(self) -> None:
        """Release what the backend holds on the model (nothing here)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


DEFAULT_BACKEND = GenerateBackend()


def eos_ids(config) -> set[int]:
    """The token ids a generation config stops on."""
    eos = config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def generate_batch(model, tokenizer, prompt_ids: Sequence[Sequence[int]], generation_config=None, *, heads=None,
                   masked: Sequence[bool] | None = None, seed: int | None = None,
                   backend: GenerateBackend | None = None) -> list[list[int]]:
    """New token ids per prompt: one batched decode, `heads` ((layer, head) pairs) masked in the rows flagged by
    `masked` (default: every row when `heads` are given).

    Rows are left-padded for this call only (TRL's `pad`; the tokenizer is not touched, and one without a pad token
    works). Each row is cut after its first EOS, the EOS kept, so its length is the number of generated tokens.
    With `seed`, sampling is reproducible and the global RNG state is left as it was. The model runs in eval mode and
    gets its mode back. `backend` decodes (default: `GenerateBackend`). Bad input is refused before generating.
    """
    check_prompt_ids(prompt_ids)
    config = generation_config if generation_config is not None else model.generation_config
    if (config.num_return_sequences or 1) != 1 or (config.num_beams or 1) != 1:
        raise ValueError("generate_batch returns one sequence per prompt: set num_return_sequences=1 and num_beams=1.")
    heads = list(heads or ())
    masked = [bool(heads)] * len(prompt_ids) if masked is None else [bool(m) for m in masked]
    if len(masked) != len(prompt_ids):
        raise ValueError(f"Got {len(masked)} `masked` flags for {len(prompt_ids)} prompts: give one flag per prompt.")
    if any(masked) and not heads:
        raise ValueError("Rows are flagged `masked` but no heads are given: pass the `heads` to mask.")
    pad_id = next((p for p in (tokenizer.pad_token_id, config.pad_token_id, *sorted(eos_ids(config)))
                   if p is not None), None)
    if pad_id is None and len({len(ids) for ids in prompt_ids}) > 1:
        raise ValueError("Prompts of different lengths need a pad token: set `tokenizer.pad_token`.")
    device = model_device(model)
    input_ids = pad([torch.tensor(list(ids)) for ids in prompt_ids], padding_value=pad_id or 0,
                    padding_side="left").to(device)
    attention_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids], padding_value=0,
                         padding_side="left").to(device)
    rng = (torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
           if seed is not None else nullcontext())
    was_training = model.training
    model.eval()
    try:
        with rng, torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            new = (backend or DEFAULT_BACKEND)(model, input_ids, attention_mask, config, heads=heads, masked=masked)
    finally:
        model.train(was_training)
    stop = eos_ids(config)
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in new]


# ---------------------------------------------------------------------------------- resumable, sharded results
def write_json(path, obj) -> bool:
    """Write `obj` as JSON (atomically) unless the file already holds exactly that; whether it wrote.

    Rewriting nothing when nothing changed keeps a finished, read-only output directory readable.
    """
    path = Path(path)
    text = json.dumps(obj, indent=2)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


class ResultStore:
    """The records of one resumable output: `<dir>/<name>.meta.json` holds the fingerprint of everything the
    records depend on, and each process appends a line per finished item to `<dir>/<name>.rank<i>.jsonl`.

    `open()` (every process) checks the fingerprint: another one is refused, or its records deleted with
    `overwrite=True`; never reused. It then reads the records: a line cut short by a kill is dropped, and an
    unreadable line, an unknown key or a record that fails `verify` is named in a warning and dropped, so that item
    is redone. Nothing is written when the directory is complete and unchanged.
    """

    def __init__(self, output_dir, name: str, fingerprint: str, *, info: dict | None = None, overwrite: bool = False):
        self.dir, self.name, self.fingerprint = Path(output_dir), name, fingerprint
        self.info, self.overwrite = _canonical(info or {}), overwrite
        self.state = process_state()
        self._file = None
        self._repair: dict[Path, list[str]] = {}

    @property
    def meta_path(self) -> Path:
        return self.dir / f"{self.name}.meta.json"

    def _rank_files(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.name}.rank*.jsonl"))

    def _check_fingerprint(self) -> None:
        """Main process: accept a matching directory as is, initialise a fresh one, refuse or clear another run's."""
        try:
            stored = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            stored = None
        except (OSError, ValueError):
            stored = {}
        if isinstance(stored, dict) and stored.get("fingerprint") == self.fingerprint:
            return
        files = self._rank_files() if self.dir.is_dir() else []
        if stored is not None or files:
            if not self.overwrite:
                if not isinstance(stored, dict) or "fingerprint" not in stored:
                    why = f"{self.meta_path.name} is missing or unreadable"
                else:
                    old = stored.get("info", {})
                    changed = sorted(k for k in set(old) | set(self.info) if old.get(k) != self.info.get(k))
                    why = "they depend on other inputs" + (f" ({', '.join(changed)} differ)" if changed else
                                                           " (model weights, data or settings differ)")
                raise ValueError(f"{self.dir} holds {self.name} results of another run: {why}. Use a fresh output "
                                 "directory, or pass overwrite=True (`--overwrite True` on the command line) to discard them "
                                 "and redo the work.")
            for path in files:
                path.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.meta_path, {"fingerprint": self.fingerprint, "name": self.name, "info": self.info})

    def open(self, verify: Callable[[str, dict], bool] | None = None) -> dict[str, dict]:
        """Check the fingerprint and read the finished records, `{key: record}`; every process calls it."""
        error = None
        if self.state.is_main_process:
            try:
                self._check_fingerprint()
            except (ValueError, OSError) as e:
                error = e
        error = from_main_process(error)  # every process fails alike, none waits forever
        if error is not None:
            raise error
        records: dict[str, dict] = {}
        for path in self._rank_files():
            records.update({k: v for k, v in self._read(path, verify).items() if k not in records})
        self.state.wait_for_everyone()  # all have read before anyone appends
        self._repair_own_files()
        return records

    def _read(self, path: Path, verify) -> dict[str, dict]:
        text = path.read_bytes().decode("utf-8", errors="replace")
        *lines, tail = text.split("\n")  # `tail` is "" unless the last line was cut short
        good, problems, records = [], [], {}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                problems.append(f"line {n} is not JSON")
                continue
            key = record.get("key") if isinstance(record, dict) else None
            if not isinstance(key, str) or (verify is not None and not verify(key, record)):
                problems.append(f"line {n} is not a valid record")
            elif key in records:
                problems.append(f"line {n} repeats key {key!r}")
            else:
                records[key] = record
                good.append(line)
        if problems:
            warnings.warn(f"{path}: {len(problems)} unusable record(s) ({'; '.join(problems[:3])}); "
                          "they are dropped and their items redone.", UserWarning, stacklevel=3)
        if tail.strip():
            logger.info("%s: dropped a last line cut short (an interrupted write); that item is redone.", path)
        if problems or tail.strip():
            self._repair[path] = good
        return records

    def _repair_own_files(self) -> None:
        """Rewrite this process's damaged files with their good lines only, so appends start on a clean line."""
        for path, good in self._repair.items():
            suffix = path.name[len(self.name) + len(".rank"):-len(".jsonl")]
            owner = int(suffix) % self.state.num_processes if suffix.isdigit() else 0
            if owner != self.state.process_index:
                continue
            try:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text("".join(line + "\n" for line in good), encoding="utf-8")
                os.replace(tmp, path)
            except OSError as e:
                warnings.warn(f"Could not rewrite {path} without its damaged lines ({e}).", UserWarning, stacklevel=3)
        self._repair.clear()

    def append(self, record: dict) -> None:
        """Store one finished record (a line, flushed at once) in this process's file."""
        if self._file is None:
            self._file = open(self.dir / f"{self.name}.rank{self.state.process_index}.jsonl", "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_resumable(items: Sequence, fn: Callable[[Any], dict], output_dir=None, *, name: str, fingerprint: str = "",
                  key: Callable[[Any], str] = lambda item: item.key,
                  verify: Callable[[Any, dict], bool] | None = None, info: dict | None = None,
                  overwrite: bool = False, desc: str | None = None, show_progress: bool = True) -> list[dict]:
    """`{"key": key(item), **fn(item)}` for every item, in order, on every process; work shared across processes.

    Processes take every n-th unfinished item (balanced when items are sorted by cost) and their records are
    gathered. With `output_dir`, records go to a `ResultStore` there as they finish, so a killed run resumes
    without redoing or losing a finished item, with any number of processes; `fingerprint` must cover everything
    the records depend on (see `ResultStore` for what is refused and what is redone); `verify(item, record)`
    checks a stored record before it is reused; `info` (a few readable settings) is stored beside the fingerprint
    to name what changed when a directory is refused.
    """
    keys = [key(item) for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"Items of {name} must have distinct keys; {len(keys) - len(set(keys))} repeat.")
    by_key = dict(zip(keys, items))
    state = process_state()
    store = ResultStore(output_dir, name, fingerprint, info=info, overwrite=overwrite) if output_dir is not None \
        else None
    done = store.open(lambda k, r: k in by_key and (verify is None or verify(by_key[k], r))) if store else {}
    todo = [i for i, k in enumerate(keys) if k not in done]
    mine = todo[state.process_index::state.num_processes]
    new = []
    with store or nullcontext():
        for i in tqdm(mine, desc=desc or name, disable=not (show_progress and state.is_local_main_process)):
            record = {"key": keys[i], **fn(items[i])}
            if store is not None:
                store.append(record)
            new.append(record)
    if state.num_processes > 1:
        new = gather_object(new)
    done.update({r["key"]: r for r in new})
    return [done[k] for k in keys]


def cached_json(path, fingerprint: str, fn: Callable[[], dict], *, overwrite: bool = False) -> dict:
    """A JSON result computed once: stored at `path` with its fingerprint and reused only under the same one.

    A file made from other inputs is refused (or recomputed with `overwrite=True`); an unreadable file is named in
    a warning and recomputed.
    """
    path = Path(path)
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            valid = isinstance(stored, dict)
        except (OSError, ValueError) as e:
            stored, valid = None, False
            warnings.warn(f"{path} is unreadable ({e}); computing it again.", UserWarning, stacklevel=2)
        if valid and stored.get("fingerprint") == fingerprint:
            return {k: v for k, v in stored.items() if k != "fingerprint"}
        if valid and not overwrite:
            raise ValueError(f"{path} holds a result of other inputs (model, data or settings differ); delete it, "
                             "use another output directory, or pass overwrite=True (`--overwrite True` on the command line) to recompute it.")
    result = fn()
    write_json(path, {**result, "fingerprint": fingerprint})
    return result


__all__ = [
    "DEFAULT_BACKEND", "GenerateBackend", "ResultStore", "cached_json", "check_prompt_ids", "check_prompts",
    "encode_rendered", "eos_ids", "fingerprint", "from_main_process", "generate_batch", "hash_weights", "make_generation_config", "model_device",
    "model_fingerprint", "process_state", "render_user_prompt", "run_resumable", "write_json",
]
