"""The paper style of every figure (plot_results.py, visualize.py) and the drawings they share.

Usage:
    from helpers.figures import paper_style, new_figure, save_figure, COLUMN_WIDTH_IN
    with paper_style():
        fig = new_figure(COLUMN_WIDTH_IN, 2.6)
        ...
        save_figure(fig, "figures", "bar")            # figures/bar.png and figures/bar.pdf, 300 dpi

Seaborn's "whitegrid" style in paper context, TrueType fonts in PDFs, one column 3.5 in wide or a
page 7 in wide. Figures are made outside pyplot (no display, nothing to close).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 300
COLUMN_WIDTH_IN = 3.5
PAGE_WIDTH_IN = 7.0
NEGLIGIBLE_NEGATIVE = 0.05  # interaction maps switch to a diverging scale beyond this share


def paper_rc(font_scale: float = 1.0) -> dict[str, Any]:
    """rcParams for paper figures: seaborn whitegrid + paper context, embedded TrueType fonts."""
    rc: dict[str, Any] = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=font_scale)}
    rc.update({
        "savefig.dpi": DPI,
        "pdf.fonttype": 42,   # TrueType in PDFs: text stays editable and journals accept it
        "ps.fonttype": 42,
        "axes.titlesize": 8.5,
        "axes.labelsize": 8,
        "xtick.labelsize": 7,
        "ytick.labelsize": 7,
        "legend.fontsize": 7,
        "legend.title_fontsize": 7.5,
        "legend.frameon": False,
        "grid.linewidth": 0.5,
        "lines.linewidth": 1.2,
        "errorbar.capsize": 2.0,
    })
    return rc


@contextlib.contextmanager
def paper_style(font_scale: float = 1.0) -> Iterator[None]:
    """Apply the paper style only inside the block, leaving matplotlib's defaults untouched."""
    with matplotlib.rc_context(paper_rc(font_scale)):
        yield


def new_figure(width_in: float, height_in: float) -> Figure:
    """A figure outside pyplot's registry (nothing to close, no display) with constrained layout."""
    return Figure(figsize=(width_in, height_in), layout="constrained")


def save_figure(fig: Figure, save_dir: str | Path, stem: str,
                formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write fig as <save_dir>/<stem>.<fmt> at 300 dpi; returns the paths."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = save_dir / f"{stem}.{fmt}"
        # No bbox_inches="tight": the page size must stay the requested column width.
        metadata = {"CreationDate": None} if fmt == "pdf" else None  # byte-stable PDFs across re-runs
        fig.savefig(path, dpi=DPI, format=fmt, metadata=metadata)
        paths.append(path)
    return paths


def interaction_colour_scale(vmin: float, vmax: float) -> tuple[mcolors.Normalize, str]:
    """A diverging map centred on 0 when interactions are clearly negative, else a sequential one.

    A trained twist kernel can make a few products slightly negative; below NEGLIGIBLE_NEGATIVE
    of the largest value they would only wash out a symmetric scale.
    """
    if vmin < -NEGLIGIBLE_NEGATIVE * max(vmax, 0.0) and vmax > 0:
        bound = max(-vmin, vmax)
        return mcolors.Normalize(-bound, bound), "RdBu_r"
    return mcolors.Normalize(vmin, vmax if vmax > vmin else vmin + 1e-6), "magma"


def draw_interaction(ax: Any, matrix: np.ndarray, norm: mcolors.Normalize, cmap: str) -> Any:
    """One r x r heatmap with sparse integer ticks."""
    r = matrix.shape[0]
    image = ax.imshow(matrix, norm=norm, cmap=cmap, interpolation="nearest")
    ticks = np.arange(0, r, max(1, r // 4))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.tick_params(labelsize=6, length=1.5, pad=1)
    ax.grid(False)
    return image
