r"""CUDA C kernels for the Givens product, compiled at run time with NVRTC (no nvcc, no build step).

Same contract as :mod:`kama.ops.gpu_triton` (``forward`` / ``backward`` take the plan's layer-sorted rotations), and the
same arithmetic order per rotation, but the batch tile lives in **shared memory** instead of an L1-cached global
scratch:

* A block holds ``BB`` rows of the batch feature-major, ``tile[f * BB + r]``, in the compute dtype (float32 for
  16/32-bit input, float64 for float64). It walks the plan's ASAP layers; inside a layer the rotations are
  disjoint, so its ``(rotation, group of V rows)`` units are spread over the block's threads with no
  synchronization, each unit one vector load and store per coordinate (``float4`` / ``double2``); one
  ``__syncthreads`` separates layers. Blocks are persistent over tiles.
* The backward holds two tiles (the saved output ``v`` and the incoming gradient ``g``), walks the layers in
  reverse, undoes each rotation on both and adds ``sum_b (g_j v_i - g_i v_j)`` of its rows to a per-block row of
  angle-gradient partial sums (a warp shuffle over the threads of one rotation, then one plain read-modify-write:
  no atomics, deterministic for a fixed grid); the host sums the rows in float64.
* Shared memory bounds ``d``: the backward's two tiles of ``V`` rows must fit the block's opt-in limit
  (227 KiB on Hopper: ``d <= 7264``, float32 or float64). :func:`supports` says whether a shape
  fits; the caller uses the Triton kernels otherwise (forward and backward alike).

Compilation goes through ``torch.cuda._compile_kernel`` (NVRTC, shipped with CUDA builds of PyTorch); one
kernel per (dtype, tile rows, threads, direction) is compiled on first use (~0.1-1 s) and cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import env_int

__all__ = ["CompileError", "available", "supports", "forward", "forward_blocked", "backward", "source", "tile_rows",
           "blocked_schedule", "BlockedSchedule", "BLOCKED_KERNEL"]

TILE_BYTES = env_int("KAMA_CUDA_TILE_BYTES", 64 * 1024, minimum=1024)
"""Target shared memory of one block's tile(s); the rows per tile ``BB`` are the largest power of two that fits."""

THREADS = env_int("KAMA_CUDA_THREADS", 512, minimum=32)
"""Threads per block."""

_SOURCE = r"""
typedef __IO_T__ io_t;
typedef __ACC_T__ acc_t;
typedef __VEC_T__ vec_t;
typedef __VEC2_T__ vec2_t;
#define BB __BB__
#define V __V__
#define G (BB / V)
#define NT __NT__
#define IO_KIND __IO_KIND__

__device__ __forceinline__ acc_t to_acc(io_t v) {
#if IO_KIND == 1
    return __uint_as_float(((unsigned int)v) << 16);
#elif IO_KIND == 2
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f;
#else
    return (acc_t)v;
#endif
}

__device__ __forceinline__ io_t from_acc(acc_t v) {
#if IO_KIND == 1
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (io_t)0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (io_t)(u >> 16);
#elif IO_KIND == 2
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h;
#else
    return (io_t)v;
#endif
}

__device__ __forceinline__ void load_tile(acc_t* tile, const io_t* __restrict__ src, long long stride, int row0,
                                          int n, int d) {
    for (int e = threadIdx.x; e < BB * d; e += NT) {
        int f = e / BB, r = e - f * BB, row = row0 + r;
        tile[e] = row < n ? to_acc(src[(long long)row * stride + f]) : (acc_t)0;
    }
}

__device__ __forceinline__ void store_tile(io_t* __restrict__ dst, const acc_t* tile, long long stride, int row0,
                                           int n, int d) {
    for (int e = threadIdx.x; e < BB * d; e += NT) {
        int f = e / BB, r = e - f * BB, row = row0 + r;
        if (row < n) dst[(long long)row * stride + f] = from_acc(tile[e]);
    }
}

// A layer's bounds and this thread's first record, fetched one layer ahead (records do not depend on the tile, so
// their global-memory latency overlaps the current layer and its barrier).
struct Layer { int lo, units; int2 q; vec2_t r; };

__device__ __forceinline__ Layer fetch(const int2* __restrict__ ij, const vec2_t* __restrict__ cs,
                                       const int* __restrict__ offsets, int layer) {
    Layer L;
    L.lo = offsets[layer];
    L.units = (offsets[layer + 1] - L.lo) * G;
    L.q.x = L.q.y = -1;
    L.r.x = L.r.y = (acc_t)0;
    if ((int)threadIdx.x < L.units) {
        int p = L.lo + threadIdx.x / G;
        L.q = ij[p];
        L.r = cs[p];
    }
    return L;
}

extern "C" __global__ void __launch_bounds__(NT) kama_fwd(
        const io_t* __restrict__ x, io_t* __restrict__ y, const int2* __restrict__ ij,
        const vec2_t* __restrict__ cs, const int* __restrict__ offsets,
        int n, int d, int depth, int n_tiles, int stride_x, int stride_y, int transpose) {
    extern __shared__ __align__(16) unsigned char smem[];
    acc_t* tile = (acc_t*)smem;
    for (int t = blockIdx.x; t < n_tiles; t += gridDim.x) {
        load_tile(tile, x, stride_x, t * BB, n, d);
        __syncthreads();
        Layer cur;
        if (depth > 0) cur = fetch(ij, cs, offsets, transpose ? 0 : depth - 1);
        for (int step = 0; step < depth; ++step) {
            Layer nxt = cur;
            if (step + 1 < depth) nxt = fetch(ij, cs, offsets, transpose ? step + 1 : depth - 2 - step);
            for (int u = threadIdx.x; u < cur.units; u += NT) {
                int p = cur.lo + u / G, g = u % G;
                int2 q = cur.q;
                vec2_t r = cur.r;
                if (u != (int)threadIdx.x) { q = ij[p]; r = cs[p]; }
                if (q.x < 0) continue;  // padding of a bank-conflict-free group
                acc_t c = r.x, s = r.y;
                vec_t* pa = (vec_t*)(tile + q.x * BB) + g;
                vec_t* pb = (vec_t*)(tile + q.y * BB) + g;
                vec_t a = *pa, b = *pb, ra, rb;
                ra.x = c * a.x - s * b.x; rb.x = s * a.x + c * b.x;
                ra.y = c * a.y - s * b.y; rb.y = s * a.y + c * b.y;
#if V == 4
                ra.z = c * a.z - s * b.z; rb.z = s * a.z + c * b.z;
                ra.w = c * a.w - s * b.w; rb.w = s * a.w + c * b.w;
#endif
                *pa = ra; *pb = rb;
            }
            __syncthreads();
            cur = nxt;
        }
        store_tile(y, tile, stride_y, t * BB, n, d);
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(NT) kama_bwd(
        const io_t* __restrict__ y, const io_t* __restrict__ gy, io_t* __restrict__ gx, acc_t* __restrict__ gpart,
        const int2* __restrict__ ij, const vec2_t* __restrict__ cs, const int* __restrict__ offsets, int n, int d,
        int k, int depth, int n_tiles,
        int stride_y, int stride_gy, int stride_gx, int transpose) {
    extern __shared__ __align__(16) unsigned char smem[];
    acc_t* vt = (acc_t*)smem;
    acc_t* gt = vt + (long long)d * BB;
    acc_t* grow = gpart + (long long)blockIdx.x * k;
    for (int t = blockIdx.x; t < n_tiles; t += gridDim.x) {
        load_tile(vt, y, stride_y, t * BB, n, d);
        load_tile(gt, gy, stride_gy, t * BB, n, d);
        __syncthreads();
        Layer cur;  // the forward's layers, reversed
        if (depth > 0) cur = fetch(ij, cs, offsets, transpose ? depth - 1 : 0);
        for (int step = 0; step < depth; ++step) {
            Layer nxt = cur;
            if (step + 1 < depth) nxt = fetch(ij, cs, offsets, transpose ? depth - 2 - step : step + 1);
            for (int u = threadIdx.x; u < cur.units; u += NT) {
                int p = cur.lo + u / G, g = u % G;
                int2 q = cur.q;
                vec2_t r = cur.r;
                if (u != (int)threadIdx.x) { q = ij[p]; r = cs[p]; }
                if (q.x < 0) continue;
                acc_t c = r.x, s = r.y;
                int oi = q.x * BB, oj = q.y * BB;
                vec_t* pvi = (vec_t*)(vt + oi) + g;
                vec_t* pvj = (vec_t*)(vt + oj) + g;
                vec_t* pgi = (vec_t*)(gt + oi) + g;
                vec_t* pgj = (vec_t*)(gt + oj) + g;
                vec_t vi = *pvi, vj = *pvj, gi = *pgi, gj = *pgj, a, b, e, f;
                acc_t part = (gj.x * vi.x - gi.x * vj.x) + (gj.y * vi.y - gi.y * vj.y);
                a.x = c * vi.x + s * vj.x; b.x = c * vj.x - s * vi.x;
                e.x = c * gi.x + s * gj.x; f.x = c * gj.x - s * gi.x;
                a.y = c * vi.y + s * vj.y; b.y = c * vj.y - s * vi.y;
                e.y = c * gi.y + s * gj.y; f.y = c * gj.y - s * gi.y;
#if V == 4
                part += (gj.z * vi.z - gi.z * vj.z) + (gj.w * vi.w - gi.w * vj.w);
                a.z = c * vi.z + s * vj.z; b.z = c * vj.z - s * vi.z;
                e.z = c * gi.z + s * gj.z; f.z = c * gj.z - s * gi.z;
                a.w = c * vi.w + s * vj.w; b.w = c * vj.w - s * vi.w;
                e.w = c * gi.w + s * gj.w; f.w = c * gj.w - s * gi.w;
#endif
                *pvi = a; *pvj = b; *pgi = e; *pgj = f;
#if G > 1
                unsigned int mask = __activemask();
                for (int off = G / 2; off > 0; off /= 2) part += __shfl_xor_sync(mask, part, off);
#endif
                if (g == 0) grow[p] += part;
            }
            __syncthreads();
            cur = nxt;
        }
        store_tile(gx, gt, stride_gx, t * BB, n, d);
        __syncthreads();
    }
}
// Register-blocked plans (kama.ops.blocked): a group rotates its 8 rows 12 times in three butterfly rounds. A
// layer holds disjoint groups; each unit (group, V columns) loads its 8 rows' vectors into registers once,
// applies the 12 rotations there and stores them once (16 shared-memory accesses per 12 rotations instead of 48).
// gcs[12 g + q] is group g's q-th rotation in application order (sin already negated for the transpose, where the
// layers and each group's rotations run backwards). The tail (rotations after the last whole group) runs one
// rotation per step, after the groups (before them for the transpose).
__device__ __forceinline__ void rot_vec(vec_t& a, vec_t& b, acc_t c, acc_t s) {
    vec_t ra, rb;
    ra.x = c * a.x - s * b.x; rb.x = s * a.x + c * b.x;
    ra.y = c * a.y - s * b.y; rb.y = s * a.y + c * b.y;
#if V == 4
    ra.z = c * a.z - s * b.z; rb.z = s * a.z + c * b.z;
    ra.w = c * a.w - s * b.w; rb.w = s * a.w + c * b.w;
#endif
    a = ra; b = rb;
}

__device__ __forceinline__ void tail_step(acc_t* tile, const int2* __restrict__ tij, const vec2_t* __restrict__ tcs,
                                          int q) {
    if ((int)threadIdx.x < G) {
        int2 p = tij[q];
        vec2_t r = tcs[q];
        vec_t* pa = (vec_t*)(tile + p.x * BB) + threadIdx.x;
        vec_t* pb = (vec_t*)(tile + p.y * BB) + threadIdx.x;
        vec_t a = *pa, b = *pb;
        rot_vec(a, b, r.x, r.y);
        *pa = a; *pb = b;
    }
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(NT) kama_blk_fwd(
        const io_t* __restrict__ x, io_t* __restrict__ y, const int* __restrict__ slots,
        const vec2_t* __restrict__ gcs, const int* __restrict__ goff, const int2* __restrict__ tij,
        const vec2_t* __restrict__ tcs, int n, int d, int layers, int tail, int n_tiles, int stride_x,
        int stride_y, int transpose) {
    extern __shared__ __align__(16) unsigned char smem[];
    acc_t* tile = (acc_t*)smem;
    for (int t = blockIdx.x; t < n_tiles; t += gridDim.x) {
        load_tile(tile, x, stride_x, t * BB, n, d);
        __syncthreads();
        if (transpose)
            for (int q = tail - 1; q >= 0; --q) tail_step(tile, tij, tcs, q);
        for (int step = 0; step < layers; ++step) {
            int layer = transpose ? layers - 1 - step : step;
            int lo = goff[layer], units = (goff[layer + 1] - lo) * G;
            for (int u = threadIdx.x; u < units; u += NT) {
                int grp = lo + u / G, g = u % G;
                const int* sl = slots + 8 * grp;
                const vec2_t* q = gcs + 12 * grp;
                vec_t* p[8];
                vec_t v[8];
                for (int m = 0; m < 8; ++m) { p[m] = (vec_t*)(tile + sl[m] * BB) + g; v[m] = *p[m]; }
                if (!transpose) {
                    rot_vec(v[0], v[1], q[0].x, q[0].y);   rot_vec(v[2], v[3], q[1].x, q[1].y);
                    rot_vec(v[4], v[5], q[2].x, q[2].y);   rot_vec(v[6], v[7], q[3].x, q[3].y);
                    rot_vec(v[0], v[2], q[4].x, q[4].y);   rot_vec(v[1], v[3], q[5].x, q[5].y);
                    rot_vec(v[4], v[6], q[6].x, q[6].y);   rot_vec(v[5], v[7], q[7].x, q[7].y);
                    rot_vec(v[0], v[4], q[8].x, q[8].y);   rot_vec(v[1], v[5], q[9].x, q[9].y);
                    rot_vec(v[2], v[6], q[10].x, q[10].y); rot_vec(v[3], v[7], q[11].x, q[11].y);
                } else {
                    rot_vec(v[3], v[7], q[11].x, q[11].y); rot_vec(v[2], v[6], q[10].x, q[10].y);
                    rot_vec(v[1], v[5], q[9].x, q[9].y);   rot_vec(v[0], v[4], q[8].x, q[8].y);
                    rot_vec(v[5], v[7], q[7].x, q[7].y);   rot_vec(v[4], v[6], q[6].x, q[6].y);
                    rot_vec(v[1], v[3], q[5].x, q[5].y);   rot_vec(v[0], v[2], q[4].x, q[4].y);
                    rot_vec(v[6], v[7], q[3].x, q[3].y);   rot_vec(v[4], v[5], q[2].x, q[2].y);
                    rot_vec(v[2], v[3], q[1].x, q[1].y);   rot_vec(v[0], v[1], q[0].x, q[0].y);
                }
                for (int m = 0; m < 8; ++m) *p[m] = v[m];
            }
            __syncthreads();
        }
        if (!transpose)
            for (int q = 0; q < tail; ++q) tail_step(tile, tij, tcs, q);
        store_tile(y, tile, stride_y, t * BB, n, d);
        __syncthreads();
    }
}
"""

_IO = {torch.float32: ("float", 0), torch.float64: ("double", 0), torch.bfloat16: ("unsigned short", 1),
       torch.float16: ("unsigned short", 2)}


@functools.lru_cache(maxsize=1)
def _compiler() -> Any:
    fn = getattr(torch.cuda, "_compile_kernel", None)
    if fn is None:
        return RuntimeError(f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC)")
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return RuntimeError("no CUDA device")
    return fn


class CompileError(RuntimeError):
    """NVRTC could not compile or configure a kernel; :func:`available` is ``False`` from then on."""


_FAILED: list[str] = []


def available() -> bool:
    """Whether CUDA kernels can be compiled here (a CUDA device and PyTorch's NVRTC wrapper, no failure yet)."""
    return not _FAILED and not isinstance(_compiler(), Exception)


def import_error() -> str:
    """Why :func:`available` is ``False`` (empty if it is not)."""
    if _FAILED:
        return _FAILED[0]
    err = _compiler()
    return "" if not isinstance(err, Exception) else f"{type(err).__name__}: {err}"


def _vec(cdtype: torch.dtype) -> int:
    return 2 if cdtype == torch.float64 else 4


def _optin(device: torch.device) -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 48 * 1024))


def tile_rows(d: int, itemsize: int, buffers: int, vec: int, limit: int) -> int:
    """Rows per tile ``BB``: the largest power of two in ``[vec, 64]`` whose ``buffers`` tiles of ``d x BB``
    values fit ``TILE_BYTES`` (at least ``vec`` rows, which must fit ``limit`` bytes: else 0)."""
    if d * vec * itemsize * buffers > limit:
        return 0
    bb = vec
    while bb < 64 and d * 2 * bb * itemsize * buffers <= TILE_BYTES:
        bb *= 2
    return bb


def supports(d: int, cdtype: torch.dtype, device: torch.device) -> bool:
    """Whether the backward's two tiles of ``V`` rows fit one block's shared memory on ``device``."""
    return tile_rows(d, torch.finfo(cdtype).bits // 8, 2, _vec(cdtype), _optin(device)) > 0


_KERNELS: dict[tuple, Any] = {}


def _kernel(name: str, io: torch.dtype, cdtype: torch.dtype, bb: int, nt: int, smem: int) -> Any:
    key = (name, io, cdtype, bb, nt, torch.cuda.current_device() if torch.cuda.is_available() else -1)
    try:
        kern = _KERNELS.get(key)
        if kern is None:
            kern = _compiler()(source(io, cdtype, bb, nt), name)
            kern.max_smem = 0
            _KERNELS[key] = kern
        if smem > kern.max_smem:
            kern.set_shared_memory_config(smem)
            kern.max_smem = smem
    except Exception as exc:
        _FAILED.append(f"{type(exc).__name__}: {exc}")
        raise CompileError(f"kama: NVRTC could not build {name} ({_FAILED[-1]})") from exc
    return kern


def source(io: torch.dtype, cdtype: torch.dtype, bb: int, nt: int) -> str:
    """The CUDA C source of both kernels for ``io`` data, ``cdtype`` state, ``bb`` rows per tile, ``nt`` threads."""
    io_t, kind = _IO[io]
    vec = _vec(cdtype)
    acc = "double" if cdtype == torch.float64 else "float"
    return (_SOURCE.replace("__IO_T__", io_t).replace("__ACC_T__", acc).replace("__VEC_T__", f"{acc}{vec}")
            .replace("__VEC2_T__", f"{acc}2")
            .replace("__BB__", str(bb)).replace("__V__", str(vec)).replace("__NT__", str(nt))
            .replace("__IO_KIND__", str(kind)))


MAX_GRID: int | None = None
"""Cap on the blocks per launch (``None``: as many as fit the SMs at once); tests lower it to exercise the
persistent loop over tiles."""


def _grid(n_tiles: int, smem: int, device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    per_sm = int(getattr(props, "shared_memory_per_multiprocessor", 2 * smem + 2048))
    blocks = max(1, min(4, per_sm // (smem + 1024))) * props.multi_processor_count
    return max(1, min(n_tiles, blocks, MAX_GRID or blocks))


def _stride(t: torch.Tensor) -> int:
    return int(t.stride(0)) if t.shape[0] > 1 else int(t.shape[1])


def _plan_args(n: int, d: int, cdtype: torch.dtype, buffers: int, device: torch.device) -> tuple[int, int, int, int]:
    itemsize = torch.finfo(cdtype).bits // 8
    vec = _vec(cdtype)
    bb = tile_rows(d, itemsize, buffers, vec, _optin(device))
    while bb > vec and bb // 2 >= n:
        bb //= 2
    smem = d * bb * itemsize * buffers
    n_tiles = -(-n // bb)
    return bb, smem, n_tiles, _grid(n_tiles, smem, device)


def bank_groups(ii: list[int], jj: list[int], offsets: list[int], p: int) -> tuple[list[int], list[bool], list[int]]:
    r"""Order each layer's rotations in aligned groups of ``p`` whose first coordinates are distinct modulo ``p``
    and whose second coordinates are too, so that the ``p`` threads of one shared-memory phase (8 threads x 16
    bytes) hit distinct banks.

    Rotations of one layer commute, so they may be reordered; a rotation may also be *flipped*: ``(i, j, t)`` acts
    as ``(j, i, -t)``. First fit over the open groups of the layer; groups left open at the layer's end are padded.

    Returns ``(src, flip, offsets)``: per scheduled slot the layer-sorted position it holds (``-1``: padding) and
    whether it is flipped, and the new layer offsets. ``p <= 1`` keeps the order."""
    if p <= 1:
        return list(range(len(ii))), [False] * len(ii), list(offsets)
    src: list[int] = []
    flip: list[bool] = []
    new_off = [0]
    mask = p - 1
    for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
        groups: list[list] = []  # [first-class bits, second-class bits, slots]
        for q in range(lo, hi):
            a, b = ii[q] & mask, jj[q] & mask
            for grp in groups:
                if len(grp[2]) == p:
                    continue
                if not (grp[0] >> a) & 1 and not (grp[1] >> b) & 1:
                    grp[0] |= 1 << a
                    grp[1] |= 1 << b
                    grp[2].append((q, False))
                    break
                if not (grp[0] >> b) & 1 and not (grp[1] >> a) & 1:
                    grp[0] |= 1 << b
                    grp[1] |= 1 << a
                    grp[2].append((q, True))
                    break
            else:
                groups.append([1 << a, 1 << b, [(q, False)]])
        for grp in groups:
            slots = grp[2] + [(-1, False)] * (p - len(grp[2]))
            src.extend(q for q, _ in slots)
            flip.extend(f for _, f in slots)
        new_off.append(len(src))
    return src, flip, new_off


def _schedule(plan: Any, p: int, device: torch.device) -> tuple[Any, ...]:
    """``(ij, src, sign, offsets, valid)`` on ``device``, cached on the plan: the scheduled ``(i, j)`` (``-1`` for
    padding), the layer-sorted position of each slot (0 for padding), +1 / -1 / 0 (flipped / padding) by
    dtype (float32 and float64), the new layer offsets, and the slots that hold a rotation."""
    banks = plan.caches.on(device).gpu_banks
    hit = banks.get(p)
    if hit is None:
        ii, jj, offsets, _ = plan.sorted_pairs(torch.device("cpu"))
        src, flip, off = bank_groups(ii.tolist(), jj.tolist(), offsets.tolist(), p)
        srct = torch.tensor(src, dtype=torch.int64)
        pad = srct < 0
        srct[pad] = 0
        fl = torch.tensor(flip, dtype=torch.bool)
        ij = torch.stack([torch.where(fl, jj[srct], ii[srct]), torch.where(fl, ii[srct], jj[srct])], 1)
        ij[pad] = -1
        sign = torch.where(fl, -1.0, 1.0).masked_fill(pad, 0.0).to(torch.float64)
        hit = (ij.to(torch.int32).contiguous().to(device), srct.to(device),
               {dt: sign.to(device, dt) for dt in (torch.float32, torch.float64)},
               torch.tensor(off, dtype=torch.int32, device=device), torch.nonzero(~pad).flatten().to(device))
        banks[p] = hit
    return hit


def _records(plan: Any, c: torch.Tensor, s: torch.Tensor, p: int, device: torch.device):
    ij, src, signs, offsets, valid = _schedule(plan, p, device)
    sign = signs[s.dtype]
    cs = torch.stack([c.index_select(0, src), s.index_select(0, src) * sign], 1)
    return ij, cs, offsets, src, sign, valid


def _int32(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a row stride that fits a C int."""
    return t if _stride(t) < 2**31 and t.numel() < 2**31 else t.contiguous()


BANK_GROUPS = True
"""Order each layer's rotations so that the threads of one shared-memory phase hit distinct banks
(:func:`bank_groups`); ``False`` keeps the plan's order (for measuring the effect)."""


def _phase_pairs(bb: int, cdtype: torch.dtype) -> int:
    """Rotations that share one shared-memory phase (8 threads of 16-byte accesses): ``8 / G``, ``G = BB / V``."""
    return max(1, 8 // (bb // _vec(cdtype))) if BANK_GROUPS else 1


def forward(x: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor, c: torch.Tensor, s: torch.Tensor,
            offsets: torch.Tensor, depth: int, transpose: bool, cdtype: torch.dtype, *, plan: Any) -> torch.Tensor:
    """As :func:`kama.ops.gpu_triton.forward` (the caller checked :func:`supports`), plus the ``plan`` whose
    layer-sorted rotations ``ii, jj, c, s`` are: its bank-conflict-free schedule is cached on it."""
    x = _int32(x)
    n, d = x.shape
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    bb, smem, n_tiles, grid = _plan_args(n, d, cdtype, 1, x.device)
    ij, cs, offs = _records(plan, c, s, _phase_pairs(bb, cdtype), x.device)[:3]
    kern = _kernel("kama_fwd", x.dtype, cdtype, bb, THREADS, smem)
    kern(grid=(grid, 1, 1), block=(THREADS, 1, 1), shared_mem=smem,
         args=[x, y, ij, cs, offs, n, d, depth, n_tiles, _stride(x), _stride(y), int(transpose)])
    return y


def backward(y: torch.Tensor, gy: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor, c: torch.Tensor,
             s: torch.Tensor, offsets: torch.Tensor, depth: int, transpose: bool, cdtype: torch.dtype, *,
             plan: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`kama.ops.gpu_triton.backward` (a non-empty batch and plan), plus the ``plan`` (see :func:`forward`)."""
    y, gy = _int32(y), _int32(gy)
    n, d = y.shape
    k = int(ii.shape[0])
    gx = torch.empty((n, d), dtype=y.dtype, device=y.device)
    bb, smem, n_tiles, grid = _plan_args(n, d, cdtype, 2, y.device)
    ij, cs, offs, src, sign, valid = _records(plan, c, s, _phase_pairs(bb, cdtype), y.device)
    slots = int(ij.shape[0])
    gpart = torch.zeros((grid, slots), dtype=cdtype, device=y.device)
    kern = _kernel("kama_bwd", y.dtype, cdtype, bb, THREADS, smem)
    kern(grid=(grid, 1, 1), block=(THREADS, 1, 1), shared_mem=smem,
         args=[y, gy, gx, gpart, ij, cs, offs, n, d, slots, depth, n_tiles, _stride(y), _stride(gy),
               _stride(gx), int(transpose)])
    g = gpart.to(torch.float64).sum(0) * sign.to(torch.float64)  # sign is exact (+1, -1, 0) in any dtype
    return gx, torch.zeros(k, dtype=torch.float64, device=y.device).index_copy_(
        0, src.index_select(0, valid), g.index_select(0, valid))


BLOCKED_KERNEL = True
"""Run register-blocked plans' forward through the register-blocked kernel (``False``: the generic walk, for
measuring the difference). The backward of every plan runs through the generic kernel."""


@dataclass(frozen=True)
class BlockedSchedule:
    """A register-blocked plan's groups as the NVRTC kernel walks them.

    Attributes:
        slots: ``(groups, 8)`` int32 rows of every group, groups sorted by layer (disjoint within a layer, each
            after every earlier group it shares a row with: the product is unchanged).
        rot: ``(groups, 12)`` int64: the plan's rotation (product order) of each group's rotations in
            application order.
        offsets: ``(layers + 1,)`` int32 group offsets of the layers.
        tail_ij: ``(tail, 2)`` int32 pairs of the rotations after the last whole group, in application order;
            tail_rot: their rotation indices.
    """

    slots: torch.Tensor
    rot: torch.Tensor
    offsets: torch.Tensor
    tail_ij: torch.Tensor
    tail_rot: torch.Tensor

    @property
    def layers(self) -> int:
        return int(self.offsets.shape[0]) - 1


def blocked_schedule(plan: Any, device: torch.device) -> BlockedSchedule | None:
    """The :class:`BlockedSchedule` of a register-blocked ``plan`` on ``device`` (``None`` for other plans), cached
    on the plan."""
    cache = plan.caches.on(device)
    if cache.gpu_blocked is None:
        from .blocked import GROUP_ROTATIONS, structure

        st = structure(plan)
        if st is None:
            cache.gpu_blocked = False
        else:
            slots = st.slots.to(torch.int64)
            last = [-1] * plan.d  # the layer of the last group that touched each row
            layer_of = []
            for row in slots.tolist():
                layer = 1 + max(last[r] for r in row)
                for r in row:
                    last[r] = layer
                layer_of.append(layer)
            layer_t = torch.tensor(layer_of, dtype=torch.int64)
            order = torch.sort(layer_t, stable=True).indices
            counts = torch.bincount(layer_t, minlength=int(layer_t.max()) + 1 if layer_of else 0)
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
            k = plan.num_rotations
            g = torch.arange(st.groups, dtype=torch.int64)[:, None]
            rot = k - 1 - GROUP_ROTATIONS * g - torch.arange(GROUP_ROTATIONS, dtype=torch.int64)[None, :]
            tail_rot = torch.arange(st.tail - 1, -1, -1, dtype=torch.int64)
            cache.gpu_blocked = BlockedSchedule(
                slots[order].to(torch.int32).contiguous().to(device), rot[order].contiguous().to(device),
                offsets.to(torch.int32).to(device),
                plan.pairs_view.index_select(0, tail_rot).to(torch.int32).contiguous().to(device),
                tail_rot.to(device))
    return cache.gpu_blocked or None


def blocked_records(sched: BlockedSchedule, c: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gcs, tcs)``: the groups' and the tail's ``(cos, applied sin)`` records from per-rotation ``c, s``
    (product order)."""
    gcs = torch.stack([c.index_select(0, sched.rot.reshape(-1)), s.index_select(0, sched.rot.reshape(-1))], 1)
    tcs = torch.stack([c.index_select(0, sched.tail_rot), s.index_select(0, sched.tail_rot)], 1)
    return gcs.contiguous(), tcs.contiguous()


def forward_blocked(x: torch.Tensor, sched: BlockedSchedule, c: torch.Tensor, s: torch.Tensor, transpose: bool,
                    cdtype: torch.dtype) -> torch.Tensor:
    """``x M^T`` (``x M`` when ``transpose``) of a register-blocked plan, ``c, s`` its rotations' cos and applied
    sin in product order (the caller checked :func:`supports`)."""
    x = _int32(x)
    n, d = x.shape
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    bb, smem, n_tiles, grid = _plan_args(n, d, cdtype, 1, x.device)
    gcs, tcs = blocked_records(sched, c, s)
    kern = _kernel("kama_blk_fwd", x.dtype, cdtype, bb, THREADS, smem)
    kern(grid=(grid, 1, 1), block=(THREADS, 1, 1), shared_mem=smem,
         args=[x, y, sched.slots, gcs, sched.offsets, sched.tail_ij, tcs, n, d, sched.layers,
               int(sched.tail_ij.shape[0]), n_tiles, _stride(x), _stride(y), int(transpose)])
    return y
