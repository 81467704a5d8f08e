"""Needle-in-a-haystack (NIAH): sample building, greedy answering, scoring and the accuracy grid.

The sample builder is shared by retrieval-head detection (`trl_retmask.detection`) and every long-context
evaluation, so that the haystack logic exists once. Depths are in percent of the context (0 = start).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_HAYSTACK_DIR = DATA_DIR / "haystack"
DEFAULT_NEEDLES = DATA_DIR / "needles.jsonl"
DEFAULT_CONTEXT_LENGTHS = (512, 1024, 2048)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
PROMPT_TEMPLATE = (
    "This is a very long story book: <book> {context} </book>.\n\n"
    "Based on the content of the book, answer the question: {question}"
)
"""The retrieval-head paper's prompt shape: the needle sits inside a book, the question follows it."""


# ----------------------------------------------------------------------------------------------------- data files
def load_haystack(haystack_dir=None) -> str:
    """All `*.txt` files of `haystack_dir` (default: the bundled PG-19 excerpts), sorted by name, joined."""
    directory = Path(haystack_dir) if haystack_dir is not None else DEFAULT_HAYSTACK_DIR
    if not directory.is_dir():
        raise ValueError(f"Haystack directory {directory} does not exist; pass a directory of .txt files.")
    texts = [p.read_text(encoding="utf-8", errors="replace").strip() for p in sorted(directory.glob("*.txt"))]
    text = "\n\n".join(t for t in texts if t)
    if not text.strip():
        raise ValueError(f"Haystack directory {directory} holds no text (no non-empty *.txt files); "
                         "add plain-text files or omit it to use the bundled PG-19 haystack.")
    return text


def load_needles(path=None) -> list[dict]:
    """Needle records (`needle`, `question`, `real_needle` = the expected answer) from a JSONL file."""
    path = Path(path) if path is not None else DEFAULT_NEEDLES
    if not path.is_file():
        raise ValueError(f"Needle file {path} does not exist; pass a JSONL file of needle/question/real_needle.")
    needles = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = {"needle", "question"} - record.keys()
        if missing:
            raise ValueError(f"{path}:{lineno} lacks {sorted(missing)}; each line needs needle, question and "
                             "real_needle (the answer; defaults to the needle).")
        record.setdefault("real_needle", record["needle"])
        needles.append(record)
    if not needles:
        raise ValueError(f"Needle file {path} is empty.")
    return needles


def _as_needles(needles) -> list[dict]:
    if needles is None or isinstance(needles, (str, Path)):
        return load_needles(needles)
    needles = [dict(n) for n in needles]
    for n in needles:
        if "needle" not in n or "question" not in n:
            raise ValueError(f"Needle {n} needs 'needle' and 'question' keys (and 'real_needle', the answer).")
        n.setdefault("real_needle", n["needle"])
    return needles


# --------------------------------------------------------------------------------------------------- the samples
@dataclass
class NIAHSample:
    """One prompt: `input_ids[needle_start:needle_end]` are the needle's tokens; `answer` is the reference."""

    input_ids: list[int]
    needle_start: int
    needle_end: int
    answer: str
    question: str
    needle: str
    context_length: int
    depth: float
    needle_index: int = 0

    @property
    def key(self) -> str:
        """Identifies the sample in result files (used to resume)."""
        return f"{self.context_length}-{self.depth:g}-{self.needle_index}"

    @property
    def needle_span(self) -> tuple[int, int]:
        return self.needle_start, self.needle_end


def render_user_prompt(tokenizer, content: str, plain_suffix: str = "") -> str:
    """One user turn as the model sees it: the chat template when the tokenizer has one, else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return content + plain_suffix


def format_prompt(tokenizer, context: str, question: str) -> str:
    """The NIAH prompt text (plain-text models get an `Answer:` cue)."""
    return render_user_prompt(tokenizer, PROMPT_TEMPLATE.format(context=context, question=question), "\nAnswer:")


def _encode(tokenizer, text: str, offsets: bool = False):
    # Chat templates already contain the special tokens; plain prompts get the tokenizer's BOS.
    special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=special, return_offsets_mapping=offsets)


@lru_cache(maxsize=4)
def haystack_token_ids(tokenizer, haystack: str) -> tuple[int, ...]:
    """The haystack tokenised once per (tokenizer, text); building many samples reuses it."""
    return tuple(tokenizer(haystack, add_special_tokens=False)["input_ids"])


def _locate_needle(tokenizer, prompt: str, needle: str) -> tuple[list[int], int, int]:
    """Prompt ids and the token span of `needle`: by character offsets, else by searching the needle's ids."""
    char_start = prompt.find(needle)
    try:
        enc = _encode(tokenizer, prompt, offsets=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):  # slow tokenizers have no offsets
        ids, offsets = _encode(tokenizer, prompt)["input_ids"], None
    if offsets is not None and char_start >= 0:
        char_end = char_start + len(needle)
        inside = [i for i, (s, e) in enumerate(offsets)
                  if e > s and s < char_end and e > char_start and prompt[max(s, char_start):min(e, char_end)].strip()]
        # A token that straddles a boundary with more than whitespace outside the needle was merged across it.
        if inside:
            first, last = offsets[inside[0]], offsets[inside[-1]]
            if not prompt[first[0]:char_start].strip() and not prompt[char_end:last[1]].strip():
                return ids, inside[0], inside[-1] + 1
    else:
        for variant in (" " + needle, needle):
            needle_ids = tokenizer(variant, add_special_tokens=False)["input_ids"]
            n = len(needle_ids)
            for i in range(len(ids) - n + 1):
                if ids[i:i + n] == needle_ids:
                    return ids, i, i + n
    raise ValueError(
        "The needle was not found as whole tokens in the tokenised prompt: the tokenizer merged it with the "
        "neighbouring haystack text. Start and end the needle with a complete word and punctuation, or use "
        "another haystack."
    )


def build_niah_sample(tokenizer, haystack: str, needle: dict, context_length: int, depth: float, *,
                      max_length: int | None = None, needle_index: int = 0) -> NIAHSample:
    """A NIAH prompt of about `context_length` tokens with `needle` at `depth` percent, at a sentence boundary.

    The haystack is trimmed (or repeated, when too short) so that the whole prompt, template and question
    included, is `context_length` tokens give or take a few merges. `max_length` (the model's window) refuses
    longer contexts.
    """
    if context_length < 1:
        raise ValueError(f"context_length must be positive, got {context_length}.")
    if not 0 <= depth <= 100:
        raise ValueError(f"depth is a percentage of the context, in [0, 100]; got {depth}.")
    if max_length is not None and context_length > max_length:
        raise ValueError(f"context_length {context_length} exceeds the model's window of {max_length} tokens; "
                         "use shorter contexts.")
    text, question = needle["needle"].strip(), needle["question"].strip()
    overhead = len(_encode(tokenizer, format_prompt(tokenizer, "", question))["input_ids"])
    overhead += len(tokenizer(" " + text + " ", add_special_tokens=False)["input_ids"])
    n_hay = context_length - overhead
    if n_hay < 0:
        raise ValueError(f"The needle, question and prompt template take {overhead} tokens, more than "
                         f"context_length={context_length}; use a longer context or a shorter needle.")
    hay_ids = haystack_token_ids(tokenizer, haystack)
    if not hay_ids:
        raise ValueError("The haystack tokenises to no tokens; pass a haystack with text.")
    if n_hay > len(hay_ids):  # longer contexts than the haystack repeat it
        hay_ids = hay_ids * math.ceil(n_hay / len(hay_ids))
    hay_ids = hay_ids[:n_hay]
    cut = round(n_hay * depth / 100)
    before = tokenizer.decode(hay_ids[:cut], skip_special_tokens=True)
    after = tokenizer.decode(hay_ids[cut:], skip_special_tokens=True)
    if 0 < cut < n_hay:  # move back to the end of the previous sentence, as the original NIAH code does
        stop = before.rfind(".", max(0, len(before) - 1000))  # at most ~1000 characters back
        if stop >= 0:
            before, after = before[:stop + 1], before[stop + 1:] + after
    context = " ".join(part for part in (before.strip(), text, after.strip()) if part)
    ids, start, end = _locate_needle(tokenizer, format_prompt(tokenizer, context, question), text)
    return NIAHSample(input_ids=list(ids), needle_start=start, needle_end=end, answer=needle["real_needle"],
                      question=question, needle=text, context_length=context_length, depth=float(depth),
                      needle_index=needle_index)


def build_niah_samples(tokenizer, context_lengths: Iterable[int] = DEFAULT_CONTEXT_LENGTHS,
                       depths: Iterable[float] = DEFAULT_DEPTHS, needles=None, haystack_dir=None, *,
                       max_length: int | None = None, max_new_tokens: int = 0) -> list[NIAHSample]:
    """The grid context length x depth x needle; errors on bad input come before any model work."""
    needles = _as_needles(needles)
    haystack = load_haystack(haystack_dir)
    context_lengths, depths = list(context_lengths), list(depths)
    if not context_lengths or not depths:
        raise ValueError("Give at least one context length and one depth.")
    if max_length is not None and max(context_lengths) + max_new_tokens > max_length:
        raise ValueError(f"Context length {max(context_lengths)} + {max_new_tokens} new tokens exceeds the model's "
                         f"window of {max_length} tokens; use shorter contexts.")
    return [build_niah_sample(tokenizer, haystack, n, length, depth, max_length=max_length, needle_index=i)
            for length in context_lengths for depth in depths for i, n in enumerate(needles)]


def model_max_length(model) -> int | None:
    """The model's context window, from its config."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    return getattr(config, "max_position_embeddings", None)


# ----------------------------------------------------------------------------------------------------- answering
_SCORER = None


def rouge1_recall(reference: str, prediction: str) -> float:
    """ROUGE-1 recall of the reference words in the prediction (the `rouge-score` package; no downloads)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return _SCORER.score(reference, prediction)["rouge1"].recall


def is_correct(reference: str, prediction: str, threshold: float = 0.5) -> bool:
    """The retrieval-head paper's success criterion: ROUGE-1 recall of the answer above `threshold`."""
    return rouge1_recall(reference, prediction) > threshold


def greedy_generation_config(model, max_new_tokens: int):
    """The model's generation config made greedy (sampling settings dropped, so no warnings)."""
    import copy

    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=max_new_tokens,
                  num_beams=1)
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id if not isinstance(config.eos_token_id, list) else \
            config.eos_token_id[0]
    return config


def generate_answer(model, tokenizer, sample: NIAHSample, max_new_tokens: int = 48) -> list[int]:
    """Greedy continuation of the prompt (batch of one); the new token ids."""
    import torch

    input_ids = torch.tensor([sample.input_ids], device=model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=greedy_generation_config(model, max_new_tokens))
    return out[0, input_ids.shape[1]:].tolist()


# ------------------------------------------------------------------------------------ resumable, sharded running
def run_samples(samples: Sequence[NIAHSample], fn: Callable[[NIAHSample], dict], output_dir=None, *,
                name: str = "samples", settings: dict | None = None, desc: str = "NIAH") -> list[dict]:
    """Apply `fn` to every sample not already done, across accelerate processes; one JSONL line per sample.

    Each process appends to `<output_dir>/<name>.rank<i>.jsonl` as samples finish, so a killed run resumes
    without redoing or losing a finished sample (with any number of processes). `settings` are stored
    alongside and must match on resume. Returns one record per sample, in `samples` order, on every process.
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = partial_state()
    done: dict[str, dict] = {}
    out = None
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _check_settings(out / f"{name}.settings.json", settings or {}, state)
        done = read_records(out, name)
    keys = {s.key for s in samples}
    todo = [s for s in samples if s.key not in done]
    mine: list[dict] = []
    with state.split_between_processes(todo) as shard:
        path = out / f"{name}.rank{state.process_index}.jsonl" if out is not None else None
        bar = tqdm(shard, desc=desc, disable=not state.is_local_main_process, initial=0, total=len(shard))
        for sample in bar:
            record = {"key": sample.key, "context_length": sample.context_length, "depth": sample.depth,
                      "needle_index": sample.needle_index, "prompt_tokens": len(sample.input_ids), **fn(sample)}
            mine.append(record)
            if path is not None:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
    new = gather_object(mine) if state.num_processes > 1 else mine
    records = {k: v for k, v in done.items() if k in keys}
    records.update({r["key"]: r for r in new})
    return [records[s.key] for s in samples]


def partial_state():
    """accelerate's process state; on a machine without CUDA, a torchrun/`accelerate launch` job is multi-CPU (gloo)."""
    import torch
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=use_cpu)


def read_records(output_dir, name: str = "samples") -> dict[str, dict]:
    """Finished records of an earlier run (a line cut short by a kill is ignored)."""
    records = {}
    for path in sorted(Path(output_dir).glob(f"{name}.rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["key"]] = record
    return records


def _check_settings(path: Path, settings: dict, state) -> None:
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as stored
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != settings:
            diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            raise ValueError(f"{path.parent} holds results of a run with other settings ({', '.join(diff)}); "
                             "use another output directory or delete it.")
    elif state.is_main_process:
        path.write_text(json.dumps(settings, indent=2))
    state.wait_for_everyone()


# -------------------------------------------------------------------------------------------------- evaluation
def accuracy_grid(records: Iterable[dict]) -> dict[tuple[int, float], float]:
    """Mean correctness per (context length, depth)."""
    cells: dict[tuple[int, float], list[bool]] = {}
    for r in records:
        cells.setdefault((r["context_length"], r["depth"]), []).append(bool(r["correct"]))
    return {k: sum(v) / len(v) for k, v in sorted(cells.items())}


def plot_accuracy_grid(grid: dict[tuple[int, float], float], path, title: str | None = None) -> None:
    """Heatmap of NIAH accuracy: depth (rows) x context length (columns)."""
    import numpy as np

    from trl_retmask.plotting import new_figure, save_figure

    lengths = sorted({k[0] for k in grid})
    depths = sorted({k[1] for k in grid})
    values = np.full((len(depths), len(lengths)), np.nan)
    for (length, depth), acc in grid.items():
        values[depths.index(depth), lengths.index(length)] = acc
    fig, ax = new_figure(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 2))
    im = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title or "Needle-in-a-haystack accuracy")
    save_figure(fig, path)


def evaluate_niah(model, tokenizer, heads=None, context_lengths: Iterable[int] = (1024,),
                  depths: Iterable[float] = (10, 30, 50, 70, 90), needles=None, haystack_dir=None,
                  max_new_tokens: int = 48, output_dir=None, samples: Sequence[NIAHSample] | None = None) -> dict:
    """NIAH accuracy with `heads` (list of (layer, head)) masked: per (length, depth) and overall.

    Returns `{"accuracy", "grid", "num_samples", "records"}`; with `output_dir`, per-sample JSONL (resumable)
    and `niah_grid.png` are written there.
    """
    from trl_retmask.masking import mask_heads, validate_heads

    heads = sorted({(int(layer), int(head)) for layer, head in (heads or [])})
    if heads:
        validate_heads(model, heads)
    if samples is None:
        samples = build_niah_samples(tokenizer, context_lengths, depths, needles, haystack_dir,
                                     max_length=model_max_length(model), max_new_tokens=max_new_tokens)

    def answer(sample: NIAHSample) -> dict:
        with mask_heads(model, heads):
            new = generate_answer(model, tokenizer, sample, max_new_tokens)
        response = tokenizer.decode(new, skip_special_tokens=True)
        recall = rouge1_recall(sample.answer, response)
        return {"response": response, "rouge1_recall": recall, "correct": recall > 0.5}

    settings = {"model": getattr(model, "name_or_path", ""), "heads": heads, "max_new_tokens": max_new_tokens}
    records = run_samples(samples, answer, output_dir, name="niah", settings=settings, desc="NIAH eval")
    grid = accuracy_grid(records)
    accuracy = sum(r["correct"] for r in records) / max(len(records), 1)
    if output_dir is not None:
        if partial_state().is_main_process:
            plot_accuracy_grid(grid, Path(output_dir) / "niah_grid.png",
                               title=f"NIAH accuracy ({len(heads)} heads masked)")
            (Path(output_dir) / "niah_summary.json").write_text(json.dumps(
                {"accuracy": accuracy, "num_samples": len(records), "heads": heads,
                 "grid": {f"{k[0]}@{k[1]:g}": v for k, v in grid.items()}}, indent=2))
    if not records:
        warnings.warn("No NIAH samples were evaluated.", stacklevel=2)
    return {"accuracy": accuracy, "grid": grid, "num_samples": len(records), "records": records}


__all__ = [
    "NIAHSample", "accuracy_grid", "build_niah_sample", "build_niah_samples", "evaluate_niah", "format_prompt",
    "generate_answer", "haystack_token_ids", "is_correct", "load_haystack", "load_needles", "model_max_length",
    "plot_accuracy_grid", "read_records", "rouge1_recall", "run_samples",
]
