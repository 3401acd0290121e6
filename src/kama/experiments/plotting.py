"""Shared plotting helpers (matplotlib with the non-interactive Agg backend)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (figures are written to files, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_xticks(ax: Any, values: Iterable[float]) -> None:
    """Label a log-scaled x axis at exactly ``values`` (plain numbers, no overlapping minor labels)."""
    from matplotlib.ticker import NullFormatter

    ticks = sorted(set(values))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
