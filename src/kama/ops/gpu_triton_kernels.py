"""Triton kernels behind :mod:`kama.ops.gpu_triton` (imported on first use, after ``TRITON_INTERPRET`` is read).

See :mod:`kama.ops.gpu_triton` for the design. Shapes: ``x, y (n, d)`` row-major with unit column stride; ``ii, jj``
int32 and ``cc, ss`` (compute dtype) of the ``k`` rotations sorted by ASAP layer; ``offsets (depth + 1,)``.
"""

import triton
import triton.language as tl


@triton.jit
def _load_tile(src, base, rows, n_rows, stride, d, BB: tl.constexpr, BD: tl.constexpr):
    # rows of src (row-major, stride `stride`) -> scratch `base` laid out (d, BB), in the scratch dtype
    cols = tl.arange(0, BB)
    rmask = rows < n_rows
    for f0 in range(0, d, BD):
        f = f0 + tl.arange(0, BD)
        fmask = f < d
        v = tl.load(src + rows[None, :].to(tl.int64) * stride + f[:, None],
                    mask=fmask[:, None] & rmask[None, :], other=0.0)
        tl.store(base + f[:, None] * BB + cols[None, :], v.to(base.dtype.element_ty), mask=fmask[:, None])

@triton.jit
def _store_tile(dst, base, rows, n_rows, stride, d, BB: tl.constexpr, BD: tl.constexpr):
    cols = tl.arange(0, BB)
    rmask = rows < n_rows
    for f0 in range(0, d, BD):
        f = f0 + tl.arange(0, BD)
        fmask = f < d
        v = tl.load(base + f[:, None] * BB + cols[None, :], mask=fmask[:, None], other=0.0)
        tl.store(dst + rows[None, :].to(tl.int64) * stride + f[:, None], v.to(dst.dtype.element_ty),
                 mask=fmask[:, None] & rmask[None, :])

@triton.jit
def _layer_bounds(offsets, step, depth, TRANSPOSE: tl.constexpr):
    # Layer visited at ``step`` of a forward walk: last layer first for x M^T, first layer first for x M (TRANSPOSE);
    # its rotations sit at offsets[l]:offsets[l+1].
    if TRANSPOSE:
        layer = step
    else:
        layer = depth - 1 - step
    return tl.load(offsets + layer), tl.load(offsets + layer + 1)


@triton.jit
def _pair_block(ii, jj, cc, ss, p0, hi, cols, BB: tl.constexpr, BM: tl.constexpr):
    # BM rotations from p0 (masked at hi): scratch offsets of their rows i and j, cos and sin as columns.
    p = p0 + tl.arange(0, BM)
    pm = p < hi
    i = tl.load(ii + p, mask=pm, other=0)
    j = tl.load(jj + p, mask=pm, other=0)
    c = tl.load(cc + p, mask=pm, other=1.0)[:, None]
    s = tl.load(ss + p, mask=pm, other=0.0)[:, None]
    return p, pm, i[:, None] * BB + cols[None, :], j[:, None] * BB + cols[None, :], c, s


@triton.jit
def givens_fwd(x, y, scratch, ii, jj, cc, ss, offsets, n_rows, d, depth, n_tiles, stride_x, stride_y,
               TRANSPOSE: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BB)
    base = scratch + pid.to(tl.int64) * d * BB
    for t in range(pid, n_tiles, nprog):
        rows = t * BB + cols
        _load_tile(x, base, rows, n_rows, stride_x, d, BB, BD)
        tl.debug_barrier()
        for step in range(0, depth):
            lo, hi = _layer_bounds(offsets, step, depth, TRANSPOSE)
            for p0 in range(lo, hi, BM):
                _, pm, oi, oj, c, s = _pair_block(ii, jj, cc, ss, p0, hi, cols, BB, BM)
                pi = base + oi
                pj = base + oj
                a = tl.load(pi, mask=pm[:, None], other=0.0)
                b = tl.load(pj, mask=pm[:, None], other=0.0)
                tl.store(pi, c * a - s * b, mask=pm[:, None])
                tl.store(pj, s * a + c * b, mask=pm[:, None])
            tl.debug_barrier()
        _store_tile(y, base, rows, n_rows, stride_y, d, BB, BD)
        tl.debug_barrier()

@triton.jit
def givens_bwd(y, gy, gx, gpart, scratch, ii, jj, cc, ss, offsets, n_rows, d, k, depth, n_tiles,
               stride_y, stride_gy, stride_gx,
               TRANSPOSE: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    # TRANSPOSE is the forward's direction; the backward walks the other way.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BB)
    vbase = scratch + pid.to(tl.int64) * 2 * d * BB
    gbase = vbase + d * BB
    grow = gpart + pid.to(tl.int64) * k
    for t in range(pid, n_tiles, nprog):
        rows = t * BB + cols
        _load_tile(y, vbase, rows, n_rows, stride_y, d, BB, BD)
        _load_tile(gy, gbase, rows, n_rows, stride_gy, d, BB, BD)
        tl.debug_barrier()
        for step in range(0, depth):
            lo, hi = _layer_bounds(offsets, depth - 1 - step, depth, TRANSPOSE)  # the forward's order, reversed
            for p0 in range(lo, hi, BM):
                p, pm, oi, oj, c, s = _pair_block(ii, jj, cc, ss, p0, hi, cols, BB, BM)
                vi = tl.load(vbase + oi, mask=pm[:, None], other=0.0)
                vj = tl.load(vbase + oj, mask=pm[:, None], other=0.0)
                gi = tl.load(gbase + oi, mask=pm[:, None], other=0.0)
                gj = tl.load(gbase + oj, mask=pm[:, None], other=0.0)
                part = tl.sum(gj * vi - gi * vj, axis=1)
                acc = tl.load(grow + p, mask=pm, other=0.0)
                tl.store(grow + p, acc + part.to(acc.dtype), mask=pm)
                tl.store(vbase + oi, c * vi + s * vj, mask=pm[:, None])
                tl.store(vbase + oj, c * vj - s * vi, mask=pm[:, None])
                tl.store(gbase + oi, c * gi + s * gj, mask=pm[:, None])
                tl.store(gbase + oj, c * gj - s * gi, mask=pm[:, None])
            tl.debug_barrier()
        _store_tile(gx, gbase, rows, n_rows, stride_gx, d, BB, BD)
        tl.debug_barrier()
