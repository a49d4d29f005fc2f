"""The one figure style of the toolkit and the one way to write a figure: every stage's reports (evaluation,
optimization, tuning, benchmarks) draw with `styled`, save with `save_figure` (atomic PNG) and embed with
`png_data_uri`. matplotlib only, on the Agg backend (no display needed)."""
from __future__ import annotations

import base64
import functools
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cxrscale.files import atomic_path  # noqa: E402

DPI = 110
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
         "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": DPI, "figure.constrained_layout.use": True}


def styled(fn):
    """Run a plotting function under the toolkit's matplotlib style (leaves the global rcParams alone)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write `fig` to `path` as PNG in one step and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def png_data_uri(path: str | os.PathLike) -> str:
    """A PNG file as a data: URI, so a report page carries its figures inside itself."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


__all__ = ["DPI", "STYLE", "plt", "png_data_uri", "save_figure", "styled"]
