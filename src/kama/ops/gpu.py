r"""Glue of the GPU kernels: two engines behind ``backend="cuda"``, one contract.

* :mod:`kama.ops.gpu_nvrtc`: CUDA C compiled at run time by the NVRTC that ships with CUDA builds of torch, the
  batch tile feature-major in shared memory, each layer's rotations ordered to avoid bank conflicts.
* :mod:`kama.ops.gpu_triton`: Triton, the tile in an L1-cached global scratch; also runs in Triton's CPU
  interpreter (``TRITON_INTERPRET=1``), which the tests use without a GPU.

Both are persistent over tiles, apply all ASAP layers in one launch with a barrier between layers, keep float32
state for 16-bit input and output, and take the rotations sorted by layer with ``transpose`` meaning what it
means for :func:`kama.givens_apply`. :data:`GPU_ENGINE` picks one.
"""

from __future__ import annotations

import os
import warnings

import torch

from .._checks import check_choice
from . import gpu_nvrtc, gpu_triton
from .plans import GivensPlan
from .reference import compute_dtype

__all__ = ["GPU_ENGINE", "GPU_ENGINES", "available", "runs", "coefficients", "forward", "backward"]

GPU_ENGINE: str = os.environ.get("KAMA_GPU_ENGINE", "auto")
"""Which GPU kernels ``backend="cuda"`` runs: ``"nvrtc"`` (:mod:`kama.ops.gpu_nvrtc`, where it compiles and the tile
fits shared memory, else Triton), ``"triton"`` (:mod:`kama.ops.gpu_triton` always) or ``"auto"`` (currently the same
as ``"nvrtc"``). Read from ``KAMA_GPU_ENGINE`` at import; may be assigned (``kama.ops.gpu.GPU_ENGINE = ...``)."""

GPU_ENGINES: tuple[str, ...] = ("auto", "nvrtc", "triton")


def available() -> bool:
    """Whether GPU kernels can be used: Triton imports, or CUDA C kernels can be compiled (NVRTC)."""
    return gpu_triton.available() or gpu_nvrtc.available()


def runs(x2: torch.Tensor) -> bool:
    """Whether a GPU kernel (Triton, or NVRTC where the tile fits shared memory) can take ``x2``."""
    if gpu_triton.available():
        return True
    return x2.device.type == "cuda" and GPU_ENGINE != "triton" and gpu_nvrtc.available() \
        and gpu_nvrtc.supports(int(x2.shape[-1]), compute_dtype(x2.dtype), x2.device)


def unavailable_reason() -> str:
    """Why no GPU kernel runs (for the warning of the pure-PyTorch fallback)."""
    return (f"Triton is not available ({gpu_triton.import_error()}) and the CUDA C kernels cannot run "
            f"({gpu_nvrtc.import_error() or 'the tile does not fit shared memory'})")


def _rows(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` (2-D) with a unit column stride (rows may stay strided), optionally cast."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def coefficients(plan: GivensPlan, angles: torch.Tensor, cdtype: torch.dtype,
                 transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / applied sin of the rotations in layer-sorted order, on the angles' device."""
    a = angles.detach().index_select(0, plan.sorted_pairs(angles.device)[3]).to(cdtype)
    s = torch.sin(a)
    return torch.cos(a), (-s if transpose else s)


def _engine(x: torch.Tensor, cdtype: torch.dtype):
    """The module (:mod:`kama.ops.gpu_nvrtc` or :mod:`kama.ops.gpu_triton`) whose kernels run on ``x``."""
    engine = check_choice("KAMA_GPU_ENGINE", GPU_ENGINE, GPU_ENGINES)
    if engine != "triton" and x.device.type == "cuda" and gpu_nvrtc.available() \
            and gpu_nvrtc.supports(int(x.shape[-1]), cdtype, x.device):
        return gpu_nvrtc
    return gpu_triton


def _call(name: str, x: torch.Tensor, plan: GivensPlan, *args):
    """``forward`` / ``backward`` of the engine chosen for ``x``; Triton's (with one warning) if NVRTC cannot build
    its kernel."""
    cdtype = compute_dtype(x.dtype)
    engine = _engine(x, cdtype)
    try:
        if engine is gpu_nvrtc:
            return getattr(gpu_nvrtc, name)(*args, cdtype, plan=plan)
        return getattr(gpu_triton, name)(*args, cdtype)
    except gpu_nvrtc.CompileError as exc:
        warnings.warn(f"{exc}; using the Triton kernels from now on", RuntimeWarning, stacklevel=4)
        return getattr(gpu_triton, name)(*args, cdtype)


def forward(x: torch.Tensor, plan: GivensPlan, transpose: bool,
            coef: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``x M^T`` (``x M`` when ``transpose``) of a 2-D batch; ``coef`` from :func:`coefficients`. Register-blocked
    plans run through the NVRTC register-blocked kernel where the NVRTC engine runs."""
    ii, jj, offsets, perm = plan.sorted_pairs(x.device)
    cdtype = compute_dtype(x.dtype)
    if gpu_nvrtc.BLOCKED_KERNEL and _engine(x, cdtype) is gpu_nvrtc:
        sched = gpu_nvrtc.blocked_schedule(plan, x.device)
        if sched is not None:
            c = torch.empty_like(coef[0]).index_copy_(0, perm, coef[0])  # product order
            s = torch.empty_like(coef[1]).index_copy_(0, perm, coef[1])
            try:
                return gpu_nvrtc.forward_blocked(_rows(x), sched, c, s, transpose, cdtype)
            except gpu_nvrtc.CompileError as exc:
                warnings.warn(f"{exc}; using the Triton kernels from now on", RuntimeWarning, stacklevel=3)
    return _call("forward", x, plan, _rows(x), ii, jj, coef[0], coef[1], offsets, plan.depth, transpose)


def backward(y: torch.Tensor, gy: torch.Tensor, angles: torch.Tensor, plan: GivensPlan, transpose: bool,
             coef: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dx, dL/dangles)`` from the saved output ``y`` and its gradient ``gy``."""
    ii, jj, offsets, perm = plan.sorted_pairs(y.device)
    if y.shape[0] == 0 or plan.num_rotations == 0:  # nothing to walk: the identity's gradients
        return gy.to(y.dtype, copy=True), torch.zeros(plan.num_rotations, dtype=angles.dtype, device=y.device)
    gx, gt = _call("backward", y, plan, _rows(y), _rows(gy, y.dtype), ii, jj, coef[0], coef[1], offsets,
                   plan.depth, transpose)
    g = torch.empty_like(gt).index_copy_(0, perm, gt)
    return gx, (-g if transpose else g).to(angles.dtype)
