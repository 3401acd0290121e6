"""Timing shared by the benchmark scripts; standard library only, so that a script may import it in a process that
runs an older checkout's ``kama`` (``bench_vs_commit.py``)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

MIN_SAMPLE_S = 2e-3
"""Calls shorter than this are timed in blocks of calls lasting at least this long (one sample per block):
single ~30 us calls (batch 1) are at the timer's and the scheduler's mercy, and their medians over 7 single calls
moved by 2x between runs."""


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` samples, after a warm-up call; each sample times a block
    of ``ceil(MIN_SAMPLE_S / one call)`` calls (one call for slow ones)."""
    fn()  # warm-up (plans are cached, allocator warmed)
    t0 = time.perf_counter()
    fn()
    number = max(1, math.ceil(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-9)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)
