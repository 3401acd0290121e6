"""Shared plotting helpers (matplotlib with the non-interactive Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .._optional import require


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (figures are written to files, never shown); a
    :class:`~kama._optional.MissingDependencyError` naming the ``reproduce`` extra when matplotlib is missing."""
    matplotlib = require("matplotlib", "reproduce", "plotting")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "reproduce", "plotting")


def log_xticks(ax: Any, values: Iterable[float]) -> None:
    """Label a log-scaled x axis at exactly ``values`` (plain numbers, no overlapping minor labels)."""
    from matplotlib.ticker import NullFormatter

    ticks = sorted(set(values))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_curves(groups: dict[tuple, list[tuple[Any, Any]]], path: Path, title: str,
                label_of: Callable[[tuple], str]) -> None:
    """Learning curves, one panel per ``(task, algorithm)``: for every group key ``(task, algo, ...)`` the mean
    +/- std over its runs' ``(timesteps, returns)`` curves (cut to the shortest), labelled by ``label_of(key)``."""
    import numpy as np

    plt = pyplot()
    panels = sorted({(k[0], k[1]) for k in groups})
    cols = min(3, len(panels))
    nrow = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(max(5.2 * cols, 9.0), 4 * nrow), squeeze=False)
    for ax, (task, algo) in zip(axes.flat, panels, strict=False):
        for key in sorted(k for k in groups if k[:2] == (task, algo)):
            curves = groups[key]
            n = min(len(c[0]) for c in curves)
            t = curves[0][0][:n]
            ys = np.stack([c[1][:n] for c in curves])
            mean, std = ys.mean(0), ys.std(0)
            line = ax.plot(t, mean, label=f"{label_of(key)} ({len(curves)} seeds)")[0]
            ax.fill_between(t, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set(title=f"{task} ({algo.upper()})", xlabel="timesteps", ylabel="evaluation return")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.25 / (4 * nrow)))  # the title's band stays clear of the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)
