"""Retrieval-head scores: load/save (locally and on the Hub), select heads to mask, summarise sparsity.

File format (shared with the original retrieval-head tools): one JSON object on one line,
``{"LAYER-HEAD": [score per sample, ...], ...}`` covering every head of the model. A head's retrieval score is the
mean of its list. `heads.HeadSelectionArguments` + `selection.select_heads` pick the heads to mask from them.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_text
from .heads import STRATEGIES, format_head, format_heads, parse_head
from .layout import head_layout
from .validation import check_int, check_number

HEAD_SCORES_FILE = "retmask_head_scores.json"
"""Name of the score file in a model directory or Hub repository (what `RetMaskTrainer` saves beside the weights)."""
RETMASK_FILE = "retmask.json"
"""What a RetMask model records beside its weights: masked heads, selection, generation settings, pair statistics."""
MAX_HEADS = 1 << 20
"""Largest layers x heads grid accepted (real models have < 20k heads): a tiny file cannot make us allocate GBs."""
_BUNDLED_DIR = Path(__file__).parent / "data" / "head_scores"


def _parse_values(key, values) -> list[float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]  # some tools store the mean only
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise ValueError(f"Malformed scores for head {key!r}: expected a list of finite numbers, got {values!r}.")
    values = [float(v) for v in values]
    negative = [v for v in values if v < 0]
    if negative:
        raise ValueError(
            f"Head {key!r} has a negative retrieval score ({negative[0]!r}): a sample's score counts copied answer "
            "tokens, so it is >= 0. These are not retrieval scores."
        )
    if values and sum(values) / len(values) > 1:
        raise ValueError(
            f"Head {key!r} has a retrieval score (the mean of its samples) of {sum(values) / len(values)!r}, above "
            "1: a head's score is the share of answer tokens it copied (one sample may exceed 1, their mean does "
            "not). These are not retrieval scores (percentages? divide by 100)."
        )
    return values


def _refuse_duplicate_keys(pairs):
    """`object_pairs_hook` for json: a key given twice would silently keep only its last value."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}; each head must appear once.")
        seen.add(key)
    return dict(pairs)


def _first_missing(present, num_layers: int, num_heads: int, limit: int = 5) -> list[tuple[int, int]]:
    """Up to `limit` heads of the grid absent from `present`, in order; stops early, so it never walks a huge grid
    (at most len(present) + limit steps)."""
    missing = []
    for layer in range(num_layers):
        for head in range(num_heads):
            if (layer, head) not in present:
                missing.append((layer, head))
                if len(missing) == limit:
                    return missing
    return missing


class HeadScores:
    """Per-sample retrieval scores of every (layer, head) of one model.

    The layout is inferred from the keys, which must then cover the whole grid (as detection writes and the
    published files do). With explicit `num_layers`/`num_heads` a partial mapping is allowed: unscored heads count 0
    and are saved as `[0.0]`, so the file reloads with the same layout.
    """

    def __init__(self, scores: Mapping, num_layers: int | None = None, num_heads: int | None = None):
        if not isinstance(scores, Mapping) or not scores:
            raise ValueError("HeadScores needs a non-empty mapping {'LAYER-HEAD': [scores...]}.")
        parsed: dict[tuple[int, int], list[float]] = {}
        spelled: dict[tuple[int, int], Any] = {}
        for key, values in scores.items():
            head = parse_head(key)
            if head in parsed:
                raise ValueError(
                    f"Keys {spelled[head]!r} and {key!r} both name layer {head[0]} head {head[1]}; "
                    "each head must appear once."
                )
            parsed[head], spelled[head] = _parse_values(key, values), key
        inferred = num_layers is None or num_heads is None
        check_int("num_layers", num_layers, minimum=1, optional=True)
        check_int("num_heads", num_heads, minimum=1, optional=True)
        self.num_layers = int(num_layers) if num_layers is not None else 1 + max(l for l, _ in parsed)
        self.num_heads = int(num_heads) if num_heads is not None else 1 + max(h for _, h in parsed)
        bad = [k for k in parsed if k[0] >= self.num_layers or k[1] >= self.num_heads]
        if bad:
            raise ValueError(f"Heads {bad[:5]} lie outside {self.num_layers} layers x {self.num_heads} heads.")
        if self.num_layers * self.num_heads > MAX_HEADS:
            raise ValueError(
                f"A grid of {self.num_layers} layers x {self.num_heads} heads is beyond any model "
                f"(limit {MAX_HEADS} heads): the head keys are wrong."
            )
        if inferred and len(parsed) != self.num_layers * self.num_heads:
            missing = _first_missing(parsed, self.num_layers, self.num_heads)
            raise ValueError(
                f"Scores must cover every head of the model: {len(parsed)} of {self.num_layers} layers x "
                f"{self.num_heads} heads are given; missing e.g. {', '.join(format_heads(missing))}. Use a "
                "complete score file (as `trl-retmask detect` writes), or pass num_layers/num_heads explicitly."
            )
        self.scores = parsed
        self.trained_heads: list[tuple[int, int]] | None = None
        """Heads a RetMask model was trained with, when loaded from its directory or Hub repo (`retmask.json`)."""

    def __repr__(self) -> str:
        return f"HeadScores({self.num_layers} layers x {self.num_heads} heads, {len(self.scores)} scored)"

    # ----------------------------------------------------------------------------------------------- I/O
    @classmethod
    def load(cls, path) -> HeadScores:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Head-score file {path} does not exist. Pass a file or directory written by `trl-retmask detect` "
                f"(or the original retrieval-head tools), or a model id with bundled scores: "
                f"{', '.join(bundled_models())}."
            )
        try:
            text = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(
                f"Head-score file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
                "is it a score file (JSON)?"
            ) from None
        if not text:
            raise ValueError(f"Head-score file {path} is empty. Re-run detection (`trl-retmask detect`).")
        try:
            try:
                data = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
            except RecursionError:  # nesting thousands deep: no score file looks like that
                raise ValueError("its JSON is nested too deeply to be a score file.") from None
            except json.JSONDecodeError as e:
                try:  # the original tools read only the first line
                    data = json.loads(text.splitlines()[0], object_pairs_hook=_refuse_duplicate_keys)
                except json.JSONDecodeError:
                    raise ValueError(
                        f'not valid JSON ({e}). Expected one JSON object {{"LAYER-HEAD": [scores...]}}.'
                    ) from None
            if not isinstance(data, dict) or not data:
                raise ValueError(
                    f'it must hold one non-empty JSON object {{"LAYER-HEAD": [...]}}; '
                    f"got {type(data).__name__}{' (empty)' if not data else ''}."
                )
            return cls(data)
        except ValueError as e:
            raise ValueError(f"Head-score file {path}: {e}") from None

    def to_dict(self) -> dict[str, list[float]]:
        """The file content: every head of the grid in (layer, head) order, unscored heads as `[0.0]`."""
        return {
            format_head((l, h)): self.scores.get((l, h), [0.0])
            for l in range(self.num_layers)
            for h in range(self.num_heads)
        }

    def save(self, path) -> Path:
        """Write every head of the grid as one JSON object on one line (the original tools use `readline()`)."""
        return write_text(path, json.dumps(self.to_dict()))

    def save_pretrained(self, save_directory) -> Path:
        """Write `retmask_head_scores.json` into `save_directory` (the file `from_pretrained` and the trainer use)."""
        return self.save(Path(save_directory) / HEAD_SCORES_FILE)

    @classmethod
    def from_pretrained(
        cls, name_or_path, *, revision: str | None = None, token: str | bool | None = None
    ) -> HeadScores:
        """Scores from a score file, a local directory holding `retmask_head_scores.json` (e.g. a RetMask model's
        output directory), the bundled files (matched by model id or basename), or a Hub repository that holds
        `retmask_head_scores.json` (downloaded with huggingface_hub; cached, so it also works offline once fetched).

        From a RetMask model's directory or repo, `trained_heads` holds the heads it was trained with.
        """
        text = str(name_or_path)
        path = Path(text).expanduser()
        if path.is_dir() and (path / HEAD_SCORES_FILE).is_file():
            return cls._with_record(cls.load(path / HEAD_SCORES_FILE), path / RETMASK_FILE)
        if path.suffix == ".json" or path.is_file():
            return cls.load(path)
        bundled = bundled_path(text)
        if bundled is not None:
            return cls.load(bundled)
        hint = (
            f"Detect them with `trl-retmask detect --model_name_or_path {text} --output_dir DIR` and pass "
            f"`--head_scores DIR` (bundled: {', '.join(bundled_models())})."
        )
        if path.is_dir():
            raise ValueError(f"The directory {text!r} holds no {HEAD_SCORES_FILE}. {hint}")
        if path.exists() or not _is_repo_id(text):
            raise ValueError(
                f"No head scores for {text!r}: not a score file, and no bundled scores for that name. {hint}"
            )
        return cls._from_hub(text, revision=revision, token=token, hint=hint)

    @classmethod
    def _from_hub(cls, repo_id: str, *, revision, token, hint: str) -> HeadScores:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            file = hf_hub_download(repo_id, HEAD_SCORES_FILE, revision=revision, token=token)
        except LocalEntryNotFoundError as e:
            raise ValueError(
                f"No bundled head scores for {repo_id!r}, and {HEAD_SCORES_FILE} of the Hub repo {repo_id!r} is not "
                f"in the local cache while the Hub cannot be reached (offline mode, HF_HUB_OFFLINE=1, or no "
                f"network): {type(e).__name__}. Download it once online, or pass a local file. {hint}"
            ) from e
        except RepositoryNotFoundError as e:
            raise ValueError(
                f"No bundled head scores for {repo_id!r}, and no such Hub repo (or it is private/gated: "
                f"log in with `hf auth login`). {hint}"
            ) from e
        except EntryNotFoundError as e:
            raise ValueError(
                f"No bundled head scores for {repo_id!r}, and the Hub repo {repo_id!r} holds no "
                f"{HEAD_SCORES_FILE}. {hint}"
            ) from e
        scores = cls.load(file)
        try:
            record = hf_hub_download(repo_id, RETMASK_FILE, revision=revision, token=token)
        except (EntryNotFoundError, OSError):
            return scores
        return cls._with_record(scores, Path(record))

    @staticmethod
    def _with_record(scores: HeadScores, record_path: Path) -> HeadScores:
        """Attach the heads a RetMask model was trained with, from its `retmask.json` if there is one."""
        if record_path.is_file():
            try:
                heads = json.loads(record_path.read_text(encoding="utf-8")).get("masked_heads")
                scores.trained_heads = sorted(parse_head(h) for h in heads) if heads else None
            except (ValueError, AttributeError, TypeError) as e:
                raise ValueError(f"{record_path} is not a valid RetMask record ({e}).") from None
            bad = [h for h in scores.trained_heads or [] if h[0] >= scores.num_layers or h[1] >= scores.num_heads]
            if bad:
                raise ValueError(f"{record_path} lists masked heads {bad[:5]} outside its score grid.")
        return scores

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload RetMask head scores",
        create_repo: bool = True,
    ):
        """Upload the scores as `retmask_head_scores.json` of a Hub model repo (created if needed); returns the
        commit info. `HeadScores.from_pretrained(repo_id)` reads them back."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        if create_repo:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_file(
            path_or_fileobj=json.dumps(self.to_dict()).encode(),
            path_in_repo=HEAD_SCORES_FILE,
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
        )

    # -------------------------------------------------------------------------------------------- checks
    def validate(self, model_or_config) -> None:
        """Raise ValueError if these scores were not made for this model's (layers, heads) layout."""
        num_layers, num_heads, _ = head_layout(model_or_config)
        if (self.num_layers, self.num_heads) != (num_layers, num_heads):
            raise ValueError(
                f"Head scores cover {self.num_layers} layers x {self.num_heads} heads but the model has "
                f"{num_layers} layers x {num_heads} query heads: the score file belongs to another model. "
                f"Use the scores of this model or detect them (`trl-retmask detect`)."
            )

    # ------------------------------------------------------------------------------------------- numbers
    def mean_scores(self) -> dict[tuple[int, int], float]:
        """Mean score per head over its samples, for every head of the grid (unscored heads count 0)."""
        means = {(l, h): 0.0 for l in range(self.num_layers) for h in range(self.num_heads)}
        means.update({k: float(np.mean(v)) if v else 0.0 for k, v in self.scores.items()})
        return means

    def to_array(self) -> np.ndarray:
        arr = np.zeros((self.num_layers, self.num_heads))
        for (l, h), m in self.mean_scores().items():
            arr[l, h] = m
        return arr

    def ranked(self) -> list[tuple[tuple[int, int], float]]:
        """Heads by mean score, highest first; ties by (layer, head) so the order is reproducible."""
        return sorted(self.mean_scores().items(), key=lambda kv: (-kv[1], kv[0]))

    def select(
        self, threshold: float | None = None, top_k: int | None = None, strategy: str = "retrieval", seed: int = 0
    ) -> list[tuple[int, int]]:
        """Heads to mask, sorted.

        `retrieval`: heads with mean score >= threshold, or the top_k by mean score. `random_non_retrieval`: the
        same number drawn (seeded) from the heads outside that retrieval set. `random`: the same number drawn
        from all heads. These are the paper's controls.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"Unknown mask strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
        if (threshold is None) == (top_k is None):
            raise ValueError(
                "Give exactly one of `threshold` (mask heads scoring >= it) or `top_k` (mask the k "
                f"best heads); got threshold={threshold!r}, top_k={top_k!r}."
            )
        check_int("top_k", top_k, minimum=1, optional=True)
        check_number("threshold", threshold, low=0, high=1, low_open=True, optional=True)
        ranked = self.ranked()
        n_total = len(ranked)
        if top_k is not None:
            if top_k > n_total:
                raise ValueError(f"top_k must be at most {n_total} (the model's heads); got {top_k!r}.")
            retrieval = [k for k, _ in ranked[:top_k]]
        else:
            retrieval = [k for k, m in ranked if m >= threshold]
            if not retrieval:
                raise ValueError(
                    f"No head has a mean score >= {threshold} (the highest is {ranked[0][1]:.4f}). "
                    "Lower the threshold or use top_k."
                )
        if strategy == "retrieval":
            return sorted(retrieval)
        pool = sorted(self.mean_scores()) if strategy == "random" else sorted(set(self.mean_scores()) - set(retrieval))
        if len(pool) < len(retrieval):
            raise ValueError(
                f"Cannot draw {len(retrieval)} {strategy} heads from {len(pool)} candidates; "
                "select fewer retrieval heads."
            )
        return sorted(random.Random(seed).sample(pool, len(retrieval)))

    def sparsity(self) -> dict[str, float]:
        """How concentrated retrieval is (`sparsity.retrieval_sparsity`); the paper finds RetMask gains grow with it."""
        from .sparsity import retrieval_sparsity

        return retrieval_sparsity(self.to_array())

    def plot(self, path, heads=None, title: str | None = None):
        """Save a layers x heads heatmap of mean scores as PNG, with `heads` (e.g. the selection) boxed."""
        from .plotting import head_heatmap

        return head_heatmap(self.to_array(), path, heads=heads, title=title)


def bundled_path(model_id_or_path) -> Path | None:
    """The bundled score file whose stem matches the model's basename, case-insensitively (so the embedded
    `smollm2-135m-instruct`, `HuggingFaceTB/SmolLM2-135M-Instruct` and a local `.../SmolLM2-135M-Instruct` match)."""
    base = str(model_id_or_path).rstrip("/").split("/")[-1].lower()
    for f in sorted(_BUNDLED_DIR.glob("*.json")):
        if f.stem.lower() == base:
            return f
    return None


def bundled_models() -> list[str]:
    return [f.stem for f in sorted(_BUNDLED_DIR.glob("*.json"))]


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _model_name(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


def resolve_head_scores(source, model=None) -> HeadScores:
    """The `HeadScores` of `source` (a `HeadScores`, file, directory, bundled name or Hub repo id; `None`: those
    found for `model`'s name or path), validated against `model` when it is a loaded model or config."""
    if isinstance(source, HeadScores):
        scores = source
    elif source is not None:
        scores = HeadScores.from_pretrained(source)
    else:
        name = _model_name(model)
        if not name:
            raise ValueError(
                "No head scores given and no model name to find them by: pass `head_scores` (a score "
                "file, a directory or Hub repo holding retmask_head_scores.json, or a bundled model id)."
            )
        try:
            scores = HeadScores.from_pretrained(name)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(
                f"No head scores given, and none found for the model {name!r}. {e} Or pass "
                "`head_scores`: a score file, a directory or Hub repo with retmask_head_scores.json, or "
                "a bundled model id."
            ) from e
    if model is not None and not isinstance(model, (str, os.PathLike)):
        scores.validate(model)
    return scores
