"""Retrieval-head scores: load/save in the retrieval-head format, select heads to mask, summarise sparsity.

File format (shared with the original retrieval-head tools): one JSON object on one line,
``{"LAYER-HEAD": [score per sample, ...], ...}``. A head's retrieval score is the mean of its list.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np

STRATEGIES = ("retrieval", "random_non_retrieval", "random")
_BUNDLED_DIR = Path(__file__).parent / "data" / "head_scores"


def _parse_key(key) -> tuple[int, int]:
    if isinstance(key, str):
        parts = key.split("-")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            return int(parts[0]), int(parts[1])
    elif isinstance(key, (tuple, list)) and len(key) == 2 and all(isinstance(k, (int, np.integer)) for k in key):
        if key[0] >= 0 and key[1] >= 0:
            return int(key[0]), int(key[1])
    raise ValueError(f"Malformed head key {key!r}: expected 'LAYER-HEAD' (e.g. '12-3') or a (layer, head) pair.")


def _parse_values(key, values) -> list[float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]  # some tools store the mean only
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise ValueError(f"Malformed scores for head {key!r}: expected a list of finite numbers, got {values!r}.")
    return [float(v) for v in values]


class HeadScores:
    """Per-sample retrieval scores of every (layer, head) of one model."""

    def __init__(self, scores: Mapping, num_layers: int | None = None, num_heads: int | None = None):
        if not scores:
            raise ValueError("HeadScores needs at least one head; got an empty mapping.")
        self.scores: dict[tuple[int, int], list[float]] = {
            _parse_key(k): _parse_values(k, v) for k, v in scores.items()
        }
        self.num_layers = num_layers if num_layers is not None else 1 + max(l for l, _ in self.scores)
        self.num_heads = num_heads if num_heads is not None else 1 + max(h for _, h in self.scores)
        bad = [k for k in self.scores if k[0] >= self.num_layers or k[1] >= self.num_heads]
        if bad:
            raise ValueError(f"Heads {bad[:5]} lie outside {self.num_layers} layers x {self.num_heads} heads.")

    def __repr__(self) -> str:
        return f"HeadScores({self.num_layers} layers x {self.num_heads} heads, {len(self.scores)} scored)"

    # ----------------------------------------------------------------------------------------------- I/O
    @classmethod
    def load(cls, path) -> HeadScores:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Head-score file {path} does not exist. Pass a file written by `trl-retmask detect` (or the "
                f"original retrieval-head tools), or a model id with bundled scores: {', '.join(bundled_models())}."
            )
        text = path.read_text().strip()
        if not text:
            raise ValueError(f"Head-score file {path} is empty. Re-run detection (`trl-retmask detect`).")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            try:  # the original tools read only the first line
                data = json.loads(text.splitlines()[0])
            except json.JSONDecodeError:
                raise ValueError(f"Head-score file {path} is not valid JSON ({e}). Expected one JSON object "
                                 f'{{"LAYER-HEAD": [scores...]}}.') from None
        if not isinstance(data, dict) or not data:
            raise ValueError(f'Head-score file {path} must hold one non-empty JSON object {{"LAYER-HEAD": [...]}}; '
                             f"got {type(data).__name__}{' (empty)' if not data else ''}.")
        try:
            return cls(data)
        except ValueError as e:
            raise ValueError(f"Head-score file {path}: {e}") from None

    def save(self, path) -> Path:
        """Write one JSON object on one line (the original tools read the file with `readline()`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {f"{l}-{h}": v for (l, h), v in sorted(self.scores.items())}
        path.write_text(json.dumps(data))
        return path

    @classmethod
    def from_pretrained(cls, model_id_or_path) -> HeadScores:
        """Scores for a model without network: a JSON path, or bundled scores matched by model id or basename."""
        candidate = Path(str(model_id_or_path))
        if candidate.suffix == ".json" or candidate.is_file():
            return cls.load(candidate)
        path = bundled_path(model_id_or_path)
        if path is None:
            raise ValueError(
                f"No bundled head scores for {model_id_or_path!r} (bundled: {', '.join(bundled_models())}). "
                f"Detect them with `trl-retmask detect --model {model_id_or_path}` and pass the resulting file."
            )
        return cls.load(path)

    # -------------------------------------------------------------------------------------------- checks
    def validate(self, model_or_config) -> None:
        """Raise ValueError if these scores were not made for this model's (layers, heads) layout."""
        from .masking import head_layout

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

    def select(self, threshold: float | None = None, top_k: int | None = None, strategy: str = "retrieval",
               seed: int = 0) -> list[tuple[int, int]]:
        """Heads to mask, sorted.

        `retrieval`: heads with mean score >= threshold, or the top_k by mean score. `random_non_retrieval`: the
        same number drawn (seeded) from the heads outside that retrieval set. `random`: the same number drawn
        from all heads. These are the paper's controls.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"Unknown mask strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
        if (threshold is None) == (top_k is None):
            raise ValueError("Give exactly one of `threshold` (mask heads scoring >= it) or `top_k` (mask the k "
                             f"best heads); got threshold={threshold!r}, top_k={top_k!r}.")
        ranked = self.ranked()
        n_total = len(ranked)
        if top_k is not None:
            if not isinstance(top_k, (int, np.integer)) or not 0 < top_k <= n_total:
                raise ValueError(f"top_k must be an integer in 1..{n_total} (the model's heads); got {top_k!r}.")
            retrieval = [k for k, _ in ranked[:top_k]]
        else:
            retrieval = [k for k, m in ranked if m >= threshold]
            if not retrieval:
                raise ValueError(f"No head has a mean score >= {threshold} (the highest is {ranked[0][1]:.4f}). "
                                 "Lower the threshold or use top_k.")
        if strategy == "retrieval":
            return sorted(retrieval)
        pool = sorted(self.mean_scores()) if strategy == "random" else sorted(set(self.mean_scores()) - set(retrieval))
        if len(pool) < len(retrieval):
            raise ValueError(f"Cannot draw {len(retrieval)} {strategy} heads from {len(pool)} candidates; "
                             "select fewer retrieval heads.")
        return sorted(random.Random(seed).sample(pool, len(retrieval)))

    def sparsity(self) -> dict[str, float]:
        """How concentrated retrieval is; the paper finds RetMask gains grow with it.

        gini: Gini coefficient of the per-head means (0 = even, ->1 = all in one head). entropy: Shannon
        entropy of the normalised means divided by log(n) (1 = even). top_X_mass: share of the total score held
        by the top X% of heads. n_above_0.1: heads with mean >= 0.1.
        """
        x = np.sort(np.clip(self.to_array().ravel(), 0.0, None))
        n, total = x.size, float(x.sum())
        out = {"n_heads": n, "max": float(x[-1]), "mean": float(x.mean()),
               "n_above_0.1": int((x >= 0.1).sum()), "n_above_0.05": int((x >= 0.05).sum())}
        if total <= 0:
            return {**out, "gini": 0.0, "entropy": float("nan"), "top_1pct_mass": float("nan"),
                    "top_5pct_mass": float("nan")}
        ranks = np.arange(1, n + 1)
        gini = float(((2 * ranks - n - 1) * x).sum() / (n * total))
        p = x[x > 0] / total
        entropy = float(-(p * np.log(p)).sum() / np.log(n)) if n > 1 else 0.0
        top = {f"top_{pct}pct_mass": float(x[-max(1, math.ceil(n * pct / 100)):].sum() / total) for pct in (1, 5)}
        return {**out, "gini": gini, "entropy": entropy, **top}

    # -------------------------------------------------------------------------------------------- plotting
    def plot(self, path, heads=None, title: str | None = None):
        """Save a layers x heads heatmap of mean scores as PNG, with `heads` (e.g. the selection) boxed."""
        from matplotlib.patches import Rectangle

        from .plotting import new_figure, save_figure

        arr = self.to_array()
        fig, ax = new_figure(figsize=(max(4.0, 0.28 * self.num_heads + 2), max(3.0, 0.22 * self.num_layers + 1.5)))
        im = ax.imshow(arr, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="mean retrieval score")
        for l, h in heads or []:
            ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        s = self.sparsity()
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title or f"Retrieval scores (gini {s['gini']:.2f}, {s['n_above_0.1']} heads >= 0.1"
                     + (f", {len(heads)} selected" if heads else "") + ")", fontsize=9)
        return save_figure(fig, path)


def bundled_path(model_id_or_path) -> Path | None:
    """The bundled score file whose stem matches the model's basename (case-insensitive), if any."""
    from .models import _EMBEDDED, embedded_name

    name = embedded_name(model_id_or_path)
    base = _EMBEDDED[name][2] if name else str(model_id_or_path).rstrip("/").split("/")[-1]
    for f in sorted(_BUNDLED_DIR.glob("*.json")):
        if f.stem.lower() == base.lower():
            return f
    return None


def bundled_models() -> list[str]:
    return [f.stem for f in sorted(_BUNDLED_DIR.glob("*.json"))]
