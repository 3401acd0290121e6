r"""Glue of the compiled CPU kernel ``kama._cgivens`` (plain C, built by ``setup.py``; the kernels' design is in
``_cgivens.c`` and ``docs/``).

The extension takes ``torch.Tensor`` objects and checks each one's dtype, device, contiguity and size against the
call before touching its memory; plans hand it their pairs once, validated into a capsule it owns. This module
chooses the tile width (from the settings measured for this machine, :mod:`kama.ops.tuning`) and the threads,
keeps the cos / sin of large plans, and turns tensors into the contiguous float32 / float64 buffers the kernels
read.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from . import tuning
from .plans import CoefficientCache, GivensPlan
from .reference import compute_dtype

try:  # the optional compiled CPU kernel (built by setup.py)
    from .. import _cgivens

    KERNEL_ERROR: Exception | None = None
except ImportError as _e:  # pragma: no cover - exercised by simulating the failure in tests
    _cgivens = None  # type: ignore[assignment]
    KERNEL_ERROR = _e

__all__ = ["available", "tile_width", "kernel_threads", "coefficients", "forward", "backward", "linear_forward",
           "linear_backward", "COEF_CACHE_MIN_ROTATIONS", "warn_unavailable"]

_WARNED = False
_OPENMP: bool | None = None  # whether the kernel's threads run on torch's OpenMP team (decided at first use)


def available() -> bool:
    """Whether the compiled CPU kernel ``kama._cgivens`` loaded."""
    return _cgivens is not None


def warn_unavailable() -> None:
    """One warning (per process) that the pure-PyTorch path replaces the missing compiled kernel."""
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(f"kama: the compiled CPU kernel could not be loaded ({KERNEL_ERROR}); using the slower "
                      "pure-PyTorch path. Reinstall with a C compiler available (pip install -e .) to build it.",
                      RuntimeWarning, stacklevel=4)


def _torch_libgomp() -> str | None:
    """The path of the one libgomp this process loaded (torch's, when torch is built with OpenMP), else None."""
    if not os.path.exists("/proc/self/maps") or "OpenMP" not in torch.__config__.parallel_info():
        return None
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libgomp" in line and line.strip().endswith(".so.1")}
    return paths.pop() if len(paths) == 1 else None


def _module() -> Any:
    """The extension, with its threads set up on first use: on torch's own OpenMP team where torch has one
    (so they never compete with torch's spinning workers; ``KAMA_PTHREADS=1`` keeps pthreads), else pthreads."""
    global _OPENMP
    if _OPENMP is None:
        path = None if os.environ.get("KAMA_PTHREADS") else _torch_libgomp()
        _OPENMP = bool(_cgivens.use_openmp(path))
    return _cgivens


def tile_width(n_rows: int, d: int, itemsize: int, buffers: int) -> int:
    """Batch columns per tile of the compiled kernel (:meth:`kama.ops.tuning.Tuning.tile_width` of the settings
    in effect; memoized)."""
    t = tuning.current()
    key = (n_rows, d, itemsize, buffers, id(t))
    w = _TILE_WIDTHS.get(key)
    if w is None:
        if len(_TILE_WIDTHS) > 4096:
            _TILE_WIDTHS.clear()
        w = _TILE_WIDTHS[key] = t.tile_width(n_rows, d, itemsize, buffers)
    return w


_TILE_WIDTHS: dict[tuple[int, int, int, int, int], int] = {}


def kernel_threads(n_rows: int, k: int) -> int:
    """Threads for the compiled kernel: torch's intra-op setting, one per ~1 MFLOP of work at least (threads
    split tiles, so batches of at most one tile run on one thread anyway). Measured at d = 64, batch 256
    (2 MFLOP): 18 us on one thread, 10.7 on two."""
    work = 6.0 * k * n_rows
    return max(1, min(torch.get_num_threads(), int(work // 1e6) or 1))


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, contiguous, without a call when it already is (small calls: RL policies). The kernel
    only reads its memory, so ``t`` may require gradients: no ``detach`` is needed."""
    if t.dtype != dtype:
        t = t.detach().to(dtype)
    return t if t.is_contiguous() else t.detach().contiguous()


COEF_CACHE_MIN_ROTATIONS = 1024
"""Plans with at least this many rotations keep the cos/sin of the last angles they were applied with. Around
the break-even: at k = 1331 recomputing takes 1.7 us, a hit 0.3 us, a miss (changed angles) 1.6 us more."""


def kernel_pairs(plan: GivensPlan) -> object:
    """The plan's pairs as the compiled kernel's capsule: validated once and copied into memory only the extension
    reaches (built on first use), so kernel calls skip a per-call index check (1.7 us at k = 35k)."""
    caches = plan.caches
    if caches.kernel_pairs is None:
        caches.kernel_pairs = _module().make_pairs(plan.pairs_view.to(torch.int32).contiguous(), plan.d)
    return caches.kernel_pairs


def kernel_blocks(plan: GivensPlan) -> object | None:
    """The compiled kernel's capsule of the plan's register-blocked groups (:mod:`kama.ops.blocked`), or ``None``
    for a plan without that structure (decided once per plan)."""
    caches = plan.caches
    if caches.kernel_blocks is None:
        from .blocked import structure

        st = structure(plan)
        caches.kernel_blocks = False if st is None else _module().make_blocks(st.slots, plan.d,
                                                                                plan.num_rotations)
    return caches.kernel_blocks or None


BLOCKED_BACKWARD_MIN_VECTORS = 4
"""Batches of fewer rows than this many 256-bit vectors take the generic backward on blocked plans too: the blocked
backward adds up the lanes of its 12 angle-gradient sums once per group and tile, which one or two column chunks do
not repay (Zen 3, d = 1024: 8 / 16 rows 0.90x / 0.75x the generic walk's speed, 32 / 64 rows 1.15x / 1.23x)."""


def _vector_width(cdtype: torch.dtype) -> int:
    return 4 if cdtype == torch.float64 else 8


def coefficients(plan: GivensPlan, angles: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
    """``(k, 2)`` cos / sin of the angles for the C kernels (the layout they read: one load per rotation in the
    row walk), computed by the extension so that every C path (plain, scaled, fused KamaLinear) rounds them
    identically.

    Large plans reuse the coefficients of their last call while the angles keep their bytes (one ``memcmp``,
    ~1/40 of recomputing them), which is most of a batch-1 forward at d >= 1024."""
    a = as_dtype(angles, cdtype)
    k = a.shape[0]
    cache = k >= COEF_CACHE_MIN_ROTATIONS
    if cache:
        hit = plan.caches.coefficients
        if hit is not None and hit.dtype == cdtype and _cgivens.same_bytes(hit.angles, a):
            return hit.coefficients
    cs = torch.empty(k, 2, dtype=cdtype)
    _module().cos_sin(a, cs)
    if cache:
        plan.caches.coefficients = CoefficientCache(cdtype, a.detach().clone(), cs)
    return cs


def forward(x: torch.Tensor, angles: torch.Tensor, plan: GivensPlan, transpose: bool,
            coef: torch.Tensor | None = None, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x M^T`` (``x M`` when ``transpose``) of a 2-D CPU batch, optionally times ``out_scale`` per output
    coordinate; ``coef`` is :func:`coefficients`' output when the caller has it. One row walks without a tile
    (the C side's row walk: tile width 1)."""
    cdtype = compute_dtype(x.dtype)
    scale = as_dtype(out_scale, cdtype) if out_scale is not None else None
    xc = as_dtype(x, cdtype)
    n, d = xc.shape
    y = torch.empty(n, d, dtype=cdtype)
    cs = coef if coef is not None else coefficients(plan, angles, cdtype)
    k = plan.num_rotations
    blocks = kernel_blocks(plan) if n >= 1 else None
    if blocks is not None:  # one row walks its groups on scalars; more rows take at least a vector's columns
        tile = 1 if n == 1 else tuning.current().blocked_tile(n, d, xc.element_size(), 1, _vector_width(cdtype))
        _module().forward_blocked(xc, y, kernel_pairs(plan), blocks, cs, n, d, tile, kernel_threads(n, k), transpose,
                                  scale, tuning.current().wide_blocked(d))
    else:
        tile = tile_width(n, d, xc.element_size(), 1)
        _module().forward(xc, y, kernel_pairs(plan), cs, n, d, tile, kernel_threads(n, k), transpose, scale,
                          tuning.current().prefetch_for(d * tile * xc.element_size()), tuning.current().wide(d))
    return y if cdtype == x.dtype else y.to(x.dtype)


def backward(y: torch.Tensor, gy: torch.Tensor, angles: torch.Tensor, plan: GivensPlan, transpose: bool,
             coef: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dx, dL/dangles)`` from the saved output ``y`` and its gradient ``gy``."""
    cdtype = compute_dtype(y.dtype)
    yc = as_dtype(y, cdtype)
    gc = as_dtype(gy, cdtype)
    gx = torch.empty_like(yc)
    cs = coef if coef is not None else coefficients(plan, angles, cdtype)
    n, d = yc.shape
    k = plan.num_rotations
    threads = kernel_threads(n, k)
    gacc = torch.zeros(threads, k, dtype=torch.float64)
    blocks = kernel_blocks(plan) if n >= BLOCKED_BACKWARD_MIN_VECTORS * _vector_width(cdtype) else None
    if blocks is not None:
        tile = tuning.current().blocked_tile(n, d, yc.element_size(), 2, _vector_width(cdtype))
        _module().backward_blocked(yc, gc, gx, gacc, kernel_pairs(plan), blocks, cs, n, d, tile, threads, transpose,
                                   tuning.current().wide_blocked(d))
    else:
        tile = tile_width(n, d, yc.element_size(), 2)
        _module().backward(yc, gc, gx, gacc, kernel_pairs(plan), cs, n, d, tile, threads, transpose,
                           tuning.current().prefetch_for(2 * d * tile * yc.element_size()), tuning.current().wide(d))
    g_applied = gacc.sum(0) if threads > 1 else gacc[0]
    g_angles = as_dtype(-g_applied if transpose else g_applied, angles.dtype)
    return (gx if gx.dtype == y.dtype else gx.to(y.dtype)), g_angles


def linear_forward(x: torch.Tensor, angles: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   plan: GivensPlan, out_features: int, keep_rotated: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KamaLinear's forward in one C pass (pad / scale the input, rotate, keep and scale the outputs, add the
    bias; cos / sin computed there). Returns the output and, if ``keep_rotated``, the rotated state ``(n, d)``
    that :func:`linear_backward` needs. ``x``, ``angles``, ``scale``, ``bias`` share one float32 / float64 dtype.
    An RL-size call is a few microseconds of work: outputs shaped like ``x`` are allocated with ``empty_like``
    (a third cheaper than ``torch.empty`` with a dtype) and the launch settings are memoized."""
    dt = x.dtype
    xc = as_dtype(x, dt)
    n_rows, in_f = xc.shape
    d = plan.d
    out = torch.empty_like(xc) if out_features == in_f else torch.empty(n_rows, out_features, dtype=dt)
    rotated = None
    if keep_rotated:
        rotated = torch.empty_like(xc) if d == in_f else torch.empty(n_rows, d, dtype=dt)
    pairs, tile, _, threads = _linear_launch(plan, n_rows, xc.element_size())
    _module().linear_forward(xc, out, rotated, pairs, as_dtype(angles, dt), as_dtype(scale, dt),
                             None if bias is None else as_dtype(bias, dt), n_rows, in_f, out_features, tile, threads)
    return out, rotated


def linear_backward(g: torch.Tensor, rotated: torch.Tensor, x: torch.Tensor, angles: torch.Tensor,
                    scale: torch.Tensor, has_bias: bool, plan: GivensPlan, out_features: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients ``(x, angles, scale, bias)`` of :func:`linear_forward` from the output gradient ``g`` and the
    rotated state it kept (``x`` is the contiguous input that :func:`linear_forward` was given)."""
    dt = x.dtype
    n_rows, in_f = x.shape
    gc, a, sc = as_dtype(g, dt), as_dtype(angles, dt), as_dtype(scale, dt)
    gx, ga, gs = torch.empty_like(x), torch.empty_like(a), torch.empty_like(sc)
    gb = torch.empty(out_features, dtype=dt) if has_bias else None
    pairs, _, tile, threads = _linear_launch(plan, n_rows, x.element_size())
    _module().linear_backward(gc, rotated, x, gx, ga, gs, gb, pairs, a, sc, n_rows, in_f, out_features, tile, threads)
    return gx, ga, gs, gb


def _linear_launch(plan: GivensPlan, n_rows: int, itemsize: int) -> tuple[object, int, int, int]:
    """``(pairs capsule, forward tile width, backward tile width, threads)`` of the fused KamaLinear pass, memoized on
    the plan per batch size, element size, thread setting and kernel settings."""
    key = (n_rows, itemsize, torch.get_num_threads(), id(tuning.current()))
    memo = plan.caches.linear_launch
    hit = memo.get(key)
    if hit is None:
        if len(memo) > 64:
            memo.clear()
        d = plan.d
        hit = memo[key] = (kernel_pairs(plan), tile_width(n_rows, d, itemsize, 1), tile_width(n_rows, d, itemsize, 2),
                           kernel_threads(n_rows, plan.num_rotations))
    return hit


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values in one dtype, shape and device: one ``memcmp`` for contiguous CPU
    tensors from :data:`SAME_BYTES_MIN_ELEMENTS` elements on (equal bytes imply equal values; ``-0.0`` against
    ``0.0`` is a miss, never a wrong hit), else ``torch.equal`` (which compares shapes itself)."""
    if a.dtype is not b.dtype or a.device != b.device:
        return False
    if _cgivens is not None and a.numel() >= SAME_BYTES_MIN_ELEMENTS and a.is_cpu and a.is_contiguous() \
            and b.is_contiguous() and a.dtype in (torch.float32, torch.float64, torch.int32, torch.int64):
        return a.shape == b.shape and bool(_cgivens.same_bytes(a, b))
    return torch.equal(a, b)


SAME_BYTES_MIN_ELEMENTS = 512
"""From this size on :func:`same_values` compares bytes in C (below it ``torch.equal`` is as fast)."""


def has_linear_kernel() -> bool:
    """Whether the extension has the fused KamaLinear pass."""
    return _cgivens is not None
