r"""GPU kernels (Triton) for the Givens product: forward and backward of :func:`kama.givens_apply`.

Design (one program = one streaming multiprocessor's worth of work, persistent over batch tiles):

* The batch is cut into tiles of ``BB`` rows. A program copies its tile, feature-major and in the compute
  dtype (float32 for 16/32-bit input, float64 for float64), into a private scratch of ``d x BB`` values that
  stays in the SM's L1 (``BB`` is chosen so the scratch is ~64-128 KiB), then walks the plan's ASAP layers:
  for each layer it loads ``BM`` pairs at a time (``BM x BB`` lanes, coalesced ``BB``-wide rows), rotates
  them and stores them back. Pairs inside a layer are disjoint, so the only synchronization is one barrier
  between layers; all layers run in one launch.
* The backward keeps two such scratches (the saved output ``v`` and the incoming gradient ``g``), walks the
  layers in reverse, undoes each rotation on both and accumulates ``dL/dt = sum_b (g_j v_i - g_i v_j)`` for
  the applied angle into a per-program row of partial sums (no atomics: the result is deterministic for a
  fixed grid); the host sums the rows in float64.
* Work is ``O(k)`` per vector and extra memory ``O(programs x d x BB)``, independent of ``k``.
* Launches use ``num_stages=1``: software pipelining could hoist a layer's loads above the barrier that
  publishes the previous layer's stores.

Triton is imported lazily and kernels are JIT-decorated on first use, so ``TRITON_INTERPRET=1`` (Triton's
CPU interpreter, used by the test suite on machines without a GPU) can be chosen by the environment before
the first call.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from .._checks import env_int

__all__ = ["available", "interpreting", "forward", "backward", "tile_rows"]


@functools.lru_cache(maxsize=1)
def _triton() -> Any:
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # pragma: no cover - depends on the installation
        return exc
    return triton, tl


def available() -> bool:
    """Whether Triton imports."""
    return not isinstance(_triton(), Exception)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def import_error() -> str:
    err = _triton()
    return "" if not isinstance(err, Exception) else f"{type(err).__name__}: {err}"


@functools.lru_cache(maxsize=1)
def _kernels() -> tuple[Any, Any]:
    from kama.ops import gpu_triton_kernels as kern

    return kern.givens_fwd, kern.givens_bwd


SCRATCH_BYTES = env_int("KAMA_GPU_SCRATCH_BYTES", 96 * 1024, minimum=1024)
"""Target size of one program's forward scratch (``d x BB`` values), meant to stay in an SM's L1."""


def tile_rows(n_rows: int, d: int, itemsize: int) -> int:
    """Batch rows per tile ``BB``: a power of two in [8, 64] with ``d * BB * itemsize <= SCRATCH_BYTES`` where
    possible, and no wider than the batch needs."""
    bb = 64
    while bb > 8 and d * bb * itemsize > SCRATCH_BYTES:
        bb //= 2
    while bb > 8 and bb // 2 >= n_rows:
        bb //= 2
    return bb


def _programs(n_tiles: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_tiles, 2 * sms))
    return max(1, min(n_tiles, 3))  # interpreter: a few programs, so the persistent loop is exercised


def _launch_shape(n: int, d: int, itemsize: int, device: torch.device) -> tuple[int, int, int, int]:
    bb = tile_rows(n, d, itemsize)
    bm = max(16, 2048 // bb)
    n_tiles = -(-n // bb)
    return bb, bm, n_tiles, _programs(n_tiles, device)


def _bd(d: int) -> int:
    return min(128, max(16, 1 << (d - 1).bit_length()))


def forward(x: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor, c: torch.Tensor, s: torch.Tensor,
            offsets: torch.Tensor, depth: int, transpose: bool, cdtype: torch.dtype) -> torch.Tensor:
    """Rotate the rows of the 2-D ``x``; ``ii, jj, c, s`` hold the rotations sorted by layer (layer ``l`` at
    ``offsets[l]:offsets[l+1]``) and are applied last layer first unless ``transpose`` (``x M^T``; ``x M`` with
    ``transpose``). ``x`` may be
    strided along rows; its last dimension must be contiguous."""
    n, d = x.shape
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    itemsize = torch.finfo(cdtype).bits // 8
    bb, bm, n_tiles, progs = _launch_shape(n, d, itemsize, x.device)
    scratch = torch.empty(progs * d * bb, dtype=cdtype, device=x.device)
    fwd, _ = _kernels()
    fwd[(progs,)](x, y, scratch, ii, jj, c, s, offsets, n, d, depth, n_tiles, x.stride(0), y.stride(0),
                  TRANSPOSE=bool(transpose), BB=bb, BD=_bd(d), BM=bm, num_warps=4, num_stages=1)
    return y


def backward(y: torch.Tensor, gy: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor, c: torch.Tensor,
             s: torch.Tensor, offsets: torch.Tensor, depth: int, transpose: bool,
             cdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients from the saved output ``y`` and ``gy``: ``(gx, dL/d applied angle)`` with the angle gradient in
    the same (layer-sorted) order as ``ii``; the forward ran with ``transpose``. The caller handles an empty batch
    or plan."""
    n, d = y.shape
    k = int(ii.shape[0])
    gx = torch.empty((n, d), dtype=y.dtype, device=y.device)
    itemsize = torch.finfo(cdtype).bits // 8
    bb, bm, n_tiles, progs = _launch_shape(n, d, 2 * itemsize, y.device)
    scratch = torch.empty(progs * 2 * d * bb, dtype=cdtype, device=y.device)
    gpart = torch.zeros((progs, k), dtype=cdtype, device=y.device)
    _, bwd = _kernels()
    bwd[(progs,)](y, gy, gx, gpart, scratch, ii, jj, c, s, offsets, n, d, k, depth, n_tiles,
                  y.stride(0), gy.stride(0), gx.stride(0),
                  TRANSPOSE=bool(transpose), BB=bb, BD=_bd(d), BM=bm, num_warps=4, num_stages=1)
    return gx, gpart.to(torch.float64).sum(0)
