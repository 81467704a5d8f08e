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
