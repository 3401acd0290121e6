r"""The CPU kernel's tunable settings, measured once per machine.

The compiled walk's speed depends on the core: which cache level the batch tile sits in, how many columns one
rotation's SIMD work spans, whether prefetching rows ahead pays. Rather than constants tuned to one machine, the
settings are chosen at the first use of the kernel on a machine from its cache sizes (:func:`from_caches`) and a short
calibration (about a second: the
forward and backward walks timed at a few tile widths, prefetch distances and blocked-walk widths on batches of
``d = 1024`` and ``4096``), and stored in the user's cache directory keyed by the CPU (model, caches, SIMD level,
:mod:`kama.ops.machine`) and the kernel's version, so later processes read them.

Only tiles of at least :data:`MIN_TUNED_DIM` features use the measured widths: small layers (RL policies) keep the
fixed rule, so their results do not depend on the machine's calibration.

Environment:

* ``KAMA_TUNING``: ``auto`` (default: the cached settings, else calibrate and cache), ``defaults`` (the built-in
  settings, no measurement, no file), ``calibrate`` (measure again and overwrite the cache).
* ``KAMA_CACHE_DIR``: the directory of ``tuning.json`` (default ``$XDG_CACHE_HOME/kama-nn`` or ``~/.cache/kama-nn``).
* ``KAMA_TILE_BYTES``, ``KAMA_TILE_COLUMNS``, ``KAMA_PREFETCH``, ``KAMA_BLOCKED_COLUMNS`` (the blocked walk's
  forward and backward widths), ``KAMA_VECTOR_BITS`` (256 or 512, both walks): fix their settings (they win over
  the measured ones).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .._checks import env_int
from .machine import describe

__all__ = ["Tuning", "DEFAULTS", "current", "calibrate", "from_caches", "cache_path", "MIN_TUNED_DIM", "TUNING_MODES"]

MIN_TUNED_DIM = 256
"""Tiles with fewer features keep the built-in widths (they fit the L1 or L2 on every x86-64 core)."""

TUNING_MODES: tuple[str, ...] = ("auto", "defaults", "calibrate")


@dataclass(frozen=True)
class Tuning:
    """Settings of the compiled CPU walk.

    Attributes:
        tile_budget_bytes: the tile buffers' cache budget; wider tiles are narrowed until they fit it.
        max_columns: batch columns of a tile at most (a power of two, 8-128).
        forward_min_columns, backward_min_columns: narrowing stops there (one-buffer / two-buffer passes).
        prefetch: rotations ahead whose rows the walk prefetches for tiles larger than ``prefetch_min_bytes``.
        prefetch_min_bytes: from this tile size on, ``prefetch`` applies (0 below).
        blocked_columns: batch columns of the register-blocked walk's tiles (forward).
        blocked_backward_columns: the same for its backward, calibrated on its own: the backward carries 12
            angle-gradient sums per group across a tile's column chunks and adds up their lanes once per group
            and tile, so it gains from wider tiles than the forward (measured on a Xeon with 2 MiB of L2: 64
            columns, forward + backward at d = 1024 in 0.85-0.91x the time it takes with the forward's 32).
        vector_bits: 512 runs the walks of tiles with at least :data:`MIN_TUNED_DIM` features with 512-bit vectors
            (AVX-512 cores only; twice the arithmetic per instruction), 256 with the portable loops.
        blocked_vector_bits: the same for the register-blocked walk (calibrated on its own: its groups gain the
            most from wide vectors).
        source: ``"defaults"``, ``"calibrated"`` (with the date) or ``"environment"``.
    """

    tile_budget_bytes: int = 2 * 1024 * 1024
    max_columns: int = 128
    forward_min_columns: int = 64
    backward_min_columns: int = 32
    prefetch: int = 2
    prefetch_min_bytes: int = 768 * 1024
    blocked_columns: int = 32
    blocked_backward_columns: int = 32
    vector_bits: int = 256
    blocked_vector_bits: int = 256
    source: str = "defaults"

    def tile_width(self, n_rows: int, d: int, itemsize: int, buffers: int) -> int:
        """Batch columns per tile: a power of two no wider than the batch needs (at most :attr:`max_columns`,
        128 for tiles under :data:`MIN_TUNED_DIM` features) and, for two rows or more, at least one 256-bit
        vector (8 float32 / 4 float64 columns: the walk's vector loop, measured 1.2-2.4x faster than the 2- and
        4-column tiles of float32 batches of 2-4 rows on a Zen 3), narrowed while ``buffers`` tiles of ``d x T``
        exceed the budget, but not below the pass's minimum."""
        tuned = d >= MIN_TUNED_DIM
        cap = self.max_columns if tuned else 128
        t, want = 1, min(n_rows if n_rows < 2 else max(n_rows, 32 // itemsize), cap)
        while t < want:
            t *= 2
        floor = (self.forward_min_columns if buffers == 1 else self.backward_min_columns) if tuned else \
            (64 if buffers == 1 else 32)
        floor = min(floor, cap)
        budget = self.tile_budget_bytes if tuned else DEFAULTS.tile_budget_bytes
        while t > floor and buffers * d * t * itemsize > budget:
            t //= 2
        return t

    def blocked_tile(self, n_rows: int, d: int, itemsize: int, buffers: int, lanes: int) -> int:
        """Batch columns per tile of the register-blocked walk: a power of two no wider than the batch needs (at most
        :attr:`blocked_columns`, or :attr:`blocked_backward_columns` for the two-buffer backward, at least
        ``lanes``, one vector), narrowed while ``buffers`` tiles of ``d x T`` exceed
        a quarter of the budget (half the L2: a group's 8 rows come from anywhere in the tile; measured on a Xeon
        with 2 MiB of L2, 128 columns are fastest at d = 1024 and slowest at d = 4096), but never below 16 columns
        nor below two vectors of the loop's width: a group's set-up (its 8 row addresses, 24 coefficient broadcasts
        and, in the backward, 12 lane sums) shared by a single 512-bit chunk cost 1.1-1.3x on a Zen 5 (d = 4096 and
        8192, float32: 32 columns against 16)."""
        t, cap = lanes, self.blocked_columns if buffers == 1 else self.blocked_backward_columns
        while t < min(n_rows, cap):
            t *= 2
        budget = (self.tile_budget_bytes if d >= MIN_TUNED_DIM else DEFAULTS.tile_budget_bytes) // 4
        floor = max(lanes, 16, 2 * (64 if self.wide_blocked(d) else 32) // itemsize)
        while t > floor and buffers * d * t * itemsize > budget:
            t //= 2
        return t

    def wide(self, d: int) -> bool:
        """Whether tiles of ``d`` features run the 512-bit loops (never under :data:`MIN_TUNED_DIM` features, so that
        RL-size layers compute the same bits on every x86-64 core)."""
        return self.vector_bits == 512 and d >= MIN_TUNED_DIM

    def wide_blocked(self, d: int) -> bool:
        """:meth:`wide` for the register-blocked walk."""
        return self.blocked_vector_bits == 512 and d >= MIN_TUNED_DIM

    def prefetch_for(self, tile_bytes: int) -> int:
        """Rotations ahead to prefetch for a tile of ``tile_bytes`` (all its buffers)."""
        return self.prefetch if tile_bytes > self.prefetch_min_bytes else 0


DEFAULTS = Tuning()
"""The built-in settings (measured on an AMD EPYC with 1 MiB L2 per core)."""


def from_caches(l2: int | None) -> Tuning:
    """The settings that follow from the per-core L2 size ``l2`` (bytes): the tile buffers may take twice the L2
    (a forward tile streams through it once per rotation group; measured on a 1 MiB-L2 EPYC: 2 MiB is the knee),
    and prefetching starts once a tile no longer fits three quarters of it. Unknown sizes keep :data:`DEFAULTS`.

    Example:
        >>> from_caches(2 * 1024 * 1024).tile_budget_bytes // 1024
        4096
    """
    if not l2 or l2 < 256 * 1024:
        return DEFAULTS
    return replace(DEFAULTS, tile_budget_bytes=2 * l2, prefetch_min_bytes=3 * l2 // 4)


def cache_path() -> Path:
    """Where the measured settings are stored (``KAMA_CACHE_DIR``, else the user's cache directory)."""
    base = os.environ.get("KAMA_CACHE_DIR")
    if base:
        return Path(base) / "tuning.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "kama-nn" / "tuning.json"


def _key(kernel_version: int) -> str:
    return f"{describe().key()}|kernel {kernel_version}|calibration {CALIBRATION_VERSION}"


def _read_cache(key: str) -> Tuning | None:
    try:
        data = json.loads(cache_path().read_text())
        entry = data[key]
        fields = {f for f in Tuning.__dataclass_fields__}
        return Tuning(**{k: v for k, v in entry.items() if k in fields})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(key: str, tuning: Tuning) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[key] = asdict(tuning)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: the settings hold for this process only
        warnings.warn(f"kama: could not store the CPU kernel's tuning in {path} ({e})", RuntimeWarning, stacklevel=3)


CALIBRATION_VERSION = 4
"""Part of the cache key: a new calibration procedure measures again."""

MARGIN = 0.03
"""A measured setting replaces the built-in one only if it is at least this much faster (3 %)."""


def _best(candidates: list[Any], run: Callable[[Any], None], repeats: int = 7) -> Any:
    """The fastest candidate; ``candidates[0]`` (the built-in setting) is kept unless another is :data:`MARGIN`
    faster. Candidates are timed round-robin (each round times every candidate once, so a change of clock or a
    busy neighbour affects all of them alike), after one warm-up call each; a candidate's time is its fastest
    call, which interference cannot lower."""
    for c in candidates:
        run(c)
    times = dict.fromkeys(candidates, math.inf)
    for _ in range(repeats):
        for c in candidates:
            t0 = time.perf_counter()
            run(c)
            times[c] = min(times[c], time.perf_counter() - t0)
    best = min(candidates, key=lambda c: times[c])
    return best if times[best] < (1.0 - MARGIN) * times[candidates[0]] else candidates[0]


def calibrate(timer: Callable[[list[Any], Callable[[Any], None]], Any] | None = None) -> Tuning:
    """Measure the settings on this machine (one thread; under a second). ``timer(candidates, run)`` picks a
    candidate, the built-in setting first (default: :func:`_best`); tests pass their own.

    The tile width and the vector width (512 bits only on AVX-512 cores) are timed together on forward passes at
    d = 1024 (k = 2 d ln d) and d = 4096 (k = 5 d ln d), the backward width at d = 1024, the prefetch distance at
    d = 4096, the blocked walk's tile and vector widths at d = 1024 and 4096 (as the forward) and its backward's
    tile width at d = 1024, all with 256 rows."""
    from . import cpu
    from .blocked import blocked_pairs
    from .plans import GivensPlan
    from .sampling import random_angles, random_pairs

    pick = timer or _best
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        t = from_caches(describe().l2)
        C = cpu._module()

        def problem(d: int, k: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor, Any]:
            plan = GivensPlan(random_pairs(d, k, generator=g), d)
            x = torch.randn(rows, d, generator=g)
            return x, torch.empty_like(x), cpu.kernel_pairs(plan), cpu.coefficients(
                plan, random_angles(k, generator=g), torch.float32), plan

        d, d4 = 1024, 4096
        # a long plan at d = 4096: once the plan outgrows the L2, every tile streams it again, so narrow tiles
        # lose there (at k = d ln d they do not)
        k, k4 = math.ceil(2 * d * math.log(d)), math.ceil(5 * d4 * math.log(d4))
        x, y, pairs, cs, _ = problem(d, k, 256)
        x4, y4, pairs4, cs4, _ = problem(d4, k4, 256)

        def fwd(setting: tuple[int, int]) -> None:
            cols, wide = setting[0], setting[1] == 512
            for _ in range(3):  # about a third of the time at d = 1024
                C.forward(x, y, pairs, cs, 256, d, cols, 1, False, None, t.prefetch_for(d * cols * 4), wide)
            C.forward(x4, y4, pairs4, cs4, 256, d4, cols, 1, False, None, t.prefetch_for(d4 * cols * 4), wide)

        widths = (256, 512) if describe().simd == "avx512" else (256,)
        cols, bits = pick([(c, b) for b in widths for c in (t.max_columns, 64, 32)], fwd)
        t = replace(t, max_columns=cols, forward_min_columns=min(t.forward_min_columns, cols), vector_bits=bits)
        gacc = torch.zeros(1, k, dtype=torch.float64)
        gx = torch.empty_like(x)
        wide = bits == 512

        def bwd(cols: int) -> None:
            C.backward(y, x, gx, gacc, pairs, cs, 256, d, cols, 1, False, t.prefetch_for(2 * d * cols * 4), wide)

        bcols = pick([t.backward_min_columns, 16, 64], bwd)
        t = replace(t, backward_min_columns=min(bcols, t.max_columns))

        def pf(distance: int) -> None:
            C.forward(x4, y4, pairs4, cs4, 256, d4, t.max_columns, 1, False, None, distance, wide)

        t = replace(t, prefetch=pick([t.prefetch, 0, 4], pf))
        blk = GivensPlan(blocked_pairs(d, k, generator=g), d)
        bl, bp = cpu.kernel_blocks(blk), cpu.kernel_pairs(blk)
        blk4 = GivensPlan(blocked_pairs(d4, k4, generator=g), d4)
        bl4, bp4 = cpu.kernel_blocks(blk4), cpu.kernel_pairs(blk4)

        def blocked(setting: tuple[int, int]) -> None:
            tb, wide = replace(t, blocked_columns=setting[0]), setting[1] == 512
            for _ in range(3):
                C.forward_blocked(x, y, bp, bl, cs, 256, d, tb.blocked_tile(256, d, 4, 1, 8), 1, False, None, wide)
            C.forward_blocked(x4, y4, bp4, bl4, cs4, 256, d4, tb.blocked_tile(256, d4, 4, 1, 8), 1, False, None,
                              wide)

        # with 512-bit vectors a row of a 32-column tile is two vectors: the groups' setup (12 cos / sin, 8 rows)
        # is spread over too little work there, so wide tiles come first
        cands = [(c, 256) for c in (t.blocked_columns, 16, 64, 128)] + \
            [(c, 512) for c in (128, 64, 32) if 512 in widths]
        bcols, bbits = pick(cands, blocked)
        t = replace(t, blocked_columns=bcols, blocked_vector_bits=bbits)
        bwide = bbits == 512

        def blocked_bwd(cols: int) -> None:
            tb = replace(t, blocked_backward_columns=cols)
            C.backward_blocked(y, x, gx, gacc, bp, bl, cs, 256, d, tb.blocked_tile(256, d, 4, 2, 8), 1, False, bwide)

        t = replace(t, blocked_backward_columns=pick([t.blocked_backward_columns, 64, 128], blocked_bwd))
        return replace(t, source=f"calibrated {time.strftime('%Y-%m-%d')}")
    finally:
        torch.set_num_threads(old_threads)


_VARIABLES = {"tile_budget_bytes": "KAMA_TILE_BYTES", "max_columns": "KAMA_TILE_COLUMNS", "prefetch": "KAMA_PREFETCH",
              "blocked_columns": "KAMA_BLOCKED_COLUMNS", "blocked_backward_columns": "KAMA_BLOCKED_COLUMNS",
              "vector_bits": "KAMA_VECTOR_BITS", "blocked_vector_bits": "KAMA_VECTOR_BITS"}
_MINIMUMS = {"tile_budget_bytes": 1024, "max_columns": 1, "prefetch": 0, "blocked_columns": 8,
             "blocked_backward_columns": 8, "vector_bits": 1, "blocked_vector_bits": 1}


def _given(variable: str, minimum: int) -> bool:
    """Whether the environment sets ``variable`` to an integer ``>= minimum`` (a value :func:`env_int` takes)."""
    try:
        return int(os.environ.get(variable, "").strip()) >= minimum
    except ValueError:
        return False


def _with_environment(t: Tuning) -> Tuning:
    env = {name: env_int(var, getattr(t, name), minimum=_MINIMUMS[name]) for name, var in _VARIABLES.items()}
    rejected: set[str] = set()
    for name in ("vector_bits", "blocked_vector_bits"):
        if env[name] not in (256, 512):
            warnings.warn(f"kama: {name} must be 256 or 512, got {env[name]}; using {getattr(t, name)}",
                          RuntimeWarning, stacklevel=3)
            env[name] = getattr(t, name)
            rejected.add(name)
    for name in ("max_columns", "blocked_columns", "blocked_backward_columns"):
        v = env[name]
        if v & (v - 1) or v > 128:
            warnings.warn(f"kama: {name} must be a power of two <= 128, got {v}; using {getattr(t, name)}",
                          RuntimeWarning, stacklevel=3)
            env[name] = getattr(t, name)
            rejected.add(name)
    # a setting the environment fixes marks the source even where it equals the measured value: the user chose it
    fixed = {k: v for k, v in env.items() if k not in rejected and _given(_VARIABLES[k], _MINIMUMS[k])}
    return replace(t, **fixed, source="environment") if fixed else t


_CURRENT: Tuning | None = None
_LOCK = threading.Lock()


def current() -> Tuning:
    """The settings in effect (decided at the first call; see the module docstring for the environment)."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    with _LOCK:
        if _CURRENT is None:
            _CURRENT = _with_environment(_resolve())
    return _CURRENT


def _resolve() -> Tuning:
    from . import cpu

    mode = os.environ.get("KAMA_TUNING", "auto").strip() or "auto"
    if mode not in TUNING_MODES:
        warnings.warn(f"kama: ignoring KAMA_TUNING={mode!r}: it must be one of {list(TUNING_MODES)}; using 'auto'",
                      RuntimeWarning, stacklevel=4)
        mode = "auto"
    if mode == "defaults" or not cpu.available():
        return DEFAULTS
    key = _key(cpu._cgivens.KERNEL_VERSION)
    if mode == "auto":
        cached = _read_cache(key)
        if cached is not None:
            return cached
    measured = calibrate()
    _write_cache(key, measured)
    return measured


def reset() -> None:
    """Forget the settings in effect (the next kernel call decides them again)."""
    global _CURRENT
    _CURRENT = None
