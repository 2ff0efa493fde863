"""The figures of the monitor and the report, drawn with matplotlib's object API (no pyplot state, no GUI).

Every figure is drawn at a fixed size in inches and ``DPI`` dots per inch and rendered without
cropping, so an image's pixel size follows from what it shows (see :func:`heatmap_size`).
Text is drawn as it is (:data:`PLAIN_TEXT`): a task named ``a$_$b`` is not mathtext.
"""

from __future__ import annotations

import functools
import io
import math
import textwrap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
"""Dots per inch of every rendered figure."""

ANNOTATE_MAX_CELLS = 160
"""A heatmap writes each cell's value in it up to this many cells (e.g. 10 tasks x 16 experts)."""

PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}
"""The matplotlib settings every figure is built and rendered under: labels are task and group
names, drawn as they are, never parsed as mathtext (``$...$``) or TeX, whatever the user's matplotlibrc says."""


def _plain_text(function: Callable) -> Callable:
    # Text objects read these settings when they are made: the figure's when it is built, tick labels when it is drawn.
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(PLAIN_TEXT):
            return function(*args, **kwargs)

    return wrapper


def heatmap_size(rows: Sequence[str], columns: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of the heatmap of ``len(rows)`` named rows and ``columns`` columns.

    Half an inch per column up to 32 columns (16 inches for more), 0.4 inch per row, plus room
    for the row names, the title and the colour bar.
    """
    label = max((len(r) for r in rows), default=4)
    cells = 0.5 * columns if columns <= 32 else 16.0
    return round(DPI * (2.6 + 0.075 * min(label, 40) + cells)), round(DPI * (1.5 + 0.4 * len(rows)))


@_plain_text
def heatmap(
    matrix: np.ndarray, rows: Sequence[str], title: str, *, xlabel: str = "expert", value: str = "mean gate"
) -> Figure:
    """A ``(rows, columns)`` matrix as coloured cells: row names on the y axis, column numbers on the x axis, a colour
    bar.

    NaN cells (nothing seen) are grey and marked ``-``; small matrices have each value written in its cell.
    """
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix, dtype=float)  # (rows, columns)
    n_rows, n_cols = matrix.shape
    width, height = heatmap_size(rows, n_cols)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    finite = matrix[np.isfinite(matrix)]
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    cmap = _colormap("viridis")
    image = ax.imshow(
        np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=top, aspect="auto", interpolation="nearest"
    )
    step = max(1, math.ceil(n_cols / 32))  # at most 32 column numbers
    ax.set_xticks(range(0, n_cols, step))
    ax.set_yticks(range(n_rows), labels=list(rows))
    ax.set_xlabel(xlabel)
    ax.set_title(textwrap.fill(title, width=max(24, int(width / DPI * 9))), fontsize=10)  # ~9 characters an inch
    fig.colorbar(image, ax=ax, label=value)
    if n_rows * n_cols <= ANNOTATE_MAX_CELLS:
        for (i, j), v in np.ndenumerate(matrix):
            if not np.isfinite(v):
                ax.text(j, i, "-", ha="center", va="center", fontsize=8, color="black")
                continue
            dark = v < 0.6 * top  # viridis is dark at the bottom of its range
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    return fig


@_plain_text
def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, ylabel: str) -> Figure:
    """One line per ``name: (steps, values)``, against the step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.6), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for name, (steps, values) in series.items():
        ax.plot(steps, values, label=name, marker="o" if len(steps) < 12 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return fig


@_plain_text
def png(fig: Figure) -> bytes:
    """The figure as PNG bytes, ``figsize * DPI`` pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


@_plain_text
def rgb(fig: Figure) -> np.ndarray:
    """The figure as a ``(height, width, 3)`` uint8 array, ``figsize * DPI`` pixels (what TensorBoard's ``add_image``
    takes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (height, width, 3)


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#d9d9d9")  # NaN: a task with no tokens in these batches
