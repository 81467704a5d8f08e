"""Figures for the PNG outputs (head heatmap, NIAH grid, suite chart).

Built on `matplotlib.figure.Figure` rather than pyplot, so plotting neither switches the user's backend (e.g. in a
notebook) nor leaks figures into pyplot's global state.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path


def new_figure(nrows: int = 1, ncols: int = 1, **subplots_kwargs):
    """(figure, axes) like `plt.subplots`, without pyplot."""
    from matplotlib.figure import Figure

    figsize = subplots_kwargs.pop("figsize", None)
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplots_kwargs)


def save_figure(fig, path, layout: bool = True) -> Path:
    """Lay out (unless the caller did) and write `fig` as a PNG at `path` (parent directories created)."""
    path = Path(path)
    if layout:
        fig.tight_layout()
    with atomic_path(path) as tmp:  # whole or absent
        fig.savefig(tmp, dpi=120)
    return path


def head_heatmap(mean_scores, path, heads=None, title: str | None = None) -> Path:
    """A layers x heads heatmap of mean retrieval scores as PNG, with `heads` (e.g. the selection) boxed."""
    from matplotlib.patches import Rectangle

    from .sparsity import retrieval_sparsity

    num_layers, num_heads = mean_scores.shape
    fig, ax = new_figure(figsize=(max(4.0, 0.28 * num_heads + 2), max(3.0, 0.22 * num_layers + 1.5)))
    im = ax.imshow(mean_scores, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="mean retrieval score")
    for l, h in heads or []:
        ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    s = retrieval_sparsity(mean_scores)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(
        title
        or f"Retrieval scores (gini {s['gini']:.2f}, {s['n_above_0.1']} heads >= 0.1"
        + (f", {len(heads)} selected" if heads else "")
        + ")",
        fontsize=9,
    )
    return save_figure(fig, path)
