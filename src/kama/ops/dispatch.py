r"""Dispatch: the backends of :func:`kama.givens_apply`, the one cost model that picks among them, and the autograd
that every walk shares.

Conventions (the paper's, section 2). A Givens rotation :math:`G(i, j, t)` is the identity except for
:math:`G[i, i] = G[j, j] = \cos t`, :math:`G[j, i] = \sin t`, :math:`G[i, j] = -\sin t`. A plan's matrix is
:math:`M = G_1 G_2 \cdots G_k`; for a batch of row vectors ``X (B x d)`` the operator computes :math:`X M^\top`
(each row ``x`` becomes ``M x``, so the *last* rotation acts first), or :math:`X M` with ``transpose=True``.
``transpose`` means exactly this in every function and kernel below.

Backends (one vocabulary, :data:`BACKENDS`): ``"reference"`` (the pure-PyTorch layered walk,
:mod:`kama.ops.reference`), ``"cpu"`` (the compiled kernel, :mod:`kama.ops.cpu`), ``"cuda"`` (the GPU kernels,
:mod:`kama.ops.gpu`), ``"dense"`` (materialize ``M``, then one GEMM) and ``"auto"`` (:class:`CostModel`).
"""

from __future__ import annotations

import warnings

import torch

from .._checks import check_bool, check_choice, check_float_tensor, check_int
from . import cpu, gpu, gpu_triton
from .plans import GivensPlan, as_plan
from .reference import apply_traceable, coefficients, compute_dtype, walk_backward, walk_forward

__all__ = ["BACKENDS", "WALK_FLOPS", "GEMM_FLOPS", "CostModel", "COST_MODEL", "choose_backend", "givens_apply",
           "givens_matrix", "givens_apply_scaled", "GivensFunction", "cpu_kernel_available", "cuda_kernel_available"]

BACKENDS: tuple[str, ...] = ("auto", "reference", "cpu", "cuda", "dense")
"""Names accepted by ``givens_apply(..., backend=...)``.

* ``"reference"``: the vectorized pure-PyTorch layered walk (custom autograd, saves only the output); the
  oracle of the fast paths, on any device.
* ``"cpu"``: the compiled C kernel (``kama._cgivens``): batch tiles in cache, rotations in sequence with SIMD
  across the batch, threads across tiles, the same saved-output backward. Falls back to ``"reference"`` with
  one warning if the extension could not be built or loaded.
* ``"cuda"``: GPU kernels for CUDA tensors (:data:`kama.ops.gpu.GPU_ENGINE`): CUDA C compiled at run time by
  NVRTC or Triton; both persistent over tiles, all ASAP layers in one launch with a barrier between layers,
  float32 state for 16-bit input and output. Falls back to ``"reference"`` with one warning if neither can run.
  CPU tensors are accepted only under ``TRITON_INTERPRET=1`` (Triton's interpreter; for tests).
* ``"dense"``: materialize ``M`` (the walk applied to the identity), then one GEMM.
* ``"auto"``: :class:`CostModel`.
"""

# CPU throughputs measured on a 2-core EPYC, torch 2.13 CPU, 1 thread, fp32 (BENCHMARKS.md). CUDA rates measured on
# an H100 (bench_gpu.py, 8192 rows, d = 1024 and 4096): fp32 GEMM 46-49 TFLOP/s with TF32 off, 230-340 with TF32,
# ~420-680 in bf16; the NVRTC walk 1.5-3.0 effective TFLOP/s (6 flops per rotation per vector), the pure-PyTorch
# layered walk 0.08-0.14.
WALK_FLOPS = {"reference": 2.0e9, "cpu": 30.0e9, "cuda": 2.0e12, "reference_cuda": 0.1e12}
"""Effective FLOP/s of a walk (6 flops per rotation per vector) by backend."""
GEMM_FLOPS = {"cpu": 60e9, "cuda": 50e12, "cuda_tf32": 300e12, "cuda_16bit": 500e12}
"""FLOP/s of a GEMM by device and precision."""


class CostModel:
    r"""Seconds of the ways to apply a plan, from :data:`WALK_FLOPS` and :data:`GEMM_FLOPS`.

    * A walk over ``N`` vectors: :math:`6 k N / W` (``W``: the walk backend's rate).
    * Materializing ``M`` (``d x d``): a walk over ``d`` vectors.
    * A GEMM of ``N`` rows by a ``(m, n)`` matrix: :math:`2 N m n / G` (``G``: the device's rate for the dtype).
    * Per call, measured with the layers' fused paths: ``LAYER_WALK_CALL_S`` for a layer's walk and
      ``LAYER_GEMM_CALL_S`` for its GEMM on a materialized weight (``givens_apply``'s two paths have about equal
      fixed costs, which cancel).
    """

    LAYER_WALK_CALL_S = 20e-6
    LAYER_GEMM_CALL_S = 3e-6

    def walk_backend(self, device: torch.device) -> str:
        """The walk backend ``"auto"`` uses on ``device``: ``"cpu"``, ``"cuda"`` or ``"reference"``."""
        if device.type == "cpu":
            return "cpu" if cpu.available() else "reference"
        return "cuda" if device.type == "cuda" and gpu.available() else "reference"

    def walk_rate(self, device: torch.device) -> float:
        backend = self.walk_backend(device)
        return WALK_FLOPS[backend if backend != "reference" or device.type == "cpu" else "reference_cuda"]

    def gemm_rate(self, device: torch.device, dtype: torch.dtype) -> float:
        if device.type != "cuda":
            return GEMM_FLOPS["cpu"]
        if dtype in (torch.float16, torch.bfloat16):
            return GEMM_FLOPS["cuda_16bit"]
        if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
            return GEMM_FLOPS["cuda_tf32"]
        return GEMM_FLOPS["cuda"]

    def apply_backend(self, n_rows: int, d: int, k: int, walk_backend: str, walk_rate: float,
                      gemm_rate: float) -> str:
        """``"dense"`` when materializing ``M`` and one GEMM beat the walk, else ``walk_backend``."""
        if n_rows < d:  # materializing M alone (6 k d flops) costs more than the walk (6 k n_rows)
            return walk_backend
        walk = 6.0 * k * n_rows / walk_rate
        dense = 6.0 * k * d / walk_rate + 2.0 * n_rows * d * d / gemm_rate
        return "dense" if dense < walk else walk_backend

    def cached_weight_wins(self, n_rows: int, in_features: int, out_features: int, k: int,
                           device: torch.device) -> bool:
        """Whether a layer's GEMM on its already materialized weight beats its walk (no gradient needed)."""
        gemm = self.LAYER_GEMM_CALL_S + 2.0 * n_rows * in_features * out_features / self.gemm_rate(
            device, torch.float32)
        walk = self.LAYER_WALK_CALL_S + 6.0 * k * n_rows / self.walk_rate(device)
        return gemm < walk


COST_MODEL = CostModel()
"""The cost model ``backend="auto"`` and :class:`kama.KamaLinear` use."""


def choose_backend(n_rows: int, d: int, plan: GivensPlan, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> str:
    """The backend ``"auto"`` picks for ``n_rows`` vectors of dimension ``d`` and ``dtype`` on ``device``.

    The walk backend is ``"cpu"`` (the compiled kernel) for CPU tensors and ``"cuda"`` (the GPU kernels) for
    CUDA tensors when they are available, else ``"reference"``. ``"dense"`` replaces it when the batch is much
    larger than ``d`` and ``d`` is small (RL policies), or on a GPU whose matrix units the data can use: when
    ``6 k n_rows / W > 6 k d / W + 2 n_rows d^2 / G`` with ``W = WALK_FLOPS[walk]`` and ``G`` the GEMM rate of the
    device for ``dtype`` (``GEMM_FLOPS``: on CUDA, fp32 with or without TF32
    (``torch.backends.cuda.matmul.allow_tf32``), or 16-bit). Forward and backward scale alike, so gradients do
    not change the decision.

    Example:
        >>> from kama.ops import random_pairs
        >>> plan = GivensPlan(random_pairs(64, 1331, generator=torch.Generator().manual_seed(0)), 64)
        >>> choose_backend(4096, 64, plan), choose_backend(64, 64, plan) in ("cpu", "reference")
        ('dense', True)
    """
    dev = device if isinstance(device, torch.device) else torch.device(device)
    m = COST_MODEL
    return m.apply_backend(n_rows, d, plan.num_rotations, m.walk_backend(dev), m.walk_rate(dev),
                           m.gemm_rate(dev, dtype))


class GivensFunction(torch.autograd.Function):
    """``y = x @ M^T`` (or ``x @ M``) on a 2-D batch by the walk of ``backend`` (``"reference"``, ``"cpu"`` or
    ``"cuda"``); saves only ``y`` and the angles. The recorded (double) backward always uses the reference walk
    with out-of-place operations."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, angles: torch.Tensor, plan: GivensPlan, transpose: bool,
                backend: str = "reference"):
        ctx.coef = None
        cdtype = compute_dtype(x.dtype)
        if backend == "cpu":
            # cos/sin are kept for the backward (O(k) memory) instead of being recomputed there.
            ctx.coef = cpu.coefficients(plan, angles, cdtype)
            y = cpu.forward(x, angles, plan, transpose, ctx.coef)
        elif backend == "cuda":
            ctx.coef = gpu.coefficients(plan, angles, cdtype, transpose)
            y = gpu.forward(x, plan, transpose, ctx.coef)
        else:
            c, s = coefficients(plan, angles, cdtype, transpose)
            state = x.t().to(cdtype, copy=True).contiguous()  # (d, N), feature-major
            state = walk_forward(state, plan, c, s, transpose, inplace=True)
            y = state.t().to(x.dtype).contiguous()
        ctx.save_for_backward(y, angles)
        ctx.plan = plan
        ctx.transpose = transpose
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        y, angles = ctx.saved_tensors
        plan: GivensPlan = ctx.plan
        transpose: bool = ctx.transpose
        cdtype = compute_dtype(y.dtype)
        differentiable = torch.is_grad_enabled()  # create_graph=True: record the backward itself
        if ctx.backend in ("cpu", "cuda") and not differentiable:
            if ctx.backend == "cpu":
                gx, gangles = cpu.backward(y, gy, angles, plan, transpose, ctx.coef)
            else:
                gx, gangles = gpu.backward(y, gy, angles, plan, transpose, ctx.coef)
            return (gx if ctx.needs_input_grad[0] else None, gangles if ctx.needs_input_grad[1] else None,
                    None, None, None)
        c, s = coefficients(plan, angles, cdtype, transpose)
        v = y.t().to(cdtype).contiguous()
        g = gy.t().to(cdtype).contiguous()
        gx_t, gt = walk_backward(v, g, plan, c, s, transpose, inplace=not differentiable)
        gx_out = gx_t.t().to(y.dtype).contiguous() if ctx.needs_input_grad[0] else None
        ga_out = None
        if ctx.needs_input_grad[1]:
            perm = plan.tensors(gt.device)[3]
            if differentiable:
                ga = torch.zeros_like(gt).index_copy(0, perm, gt)
            else:
                ga = torch.empty_like(gt).index_copy_(0, perm, gt)
            if transpose:
                ga = -ga
            ga_out = ga.to(angles.dtype)
        return gx_out, ga_out, None, None, None


def cpu_kernel_available() -> bool:
    """Whether the compiled CPU kernel ``kama._cgivens`` loaded."""
    return cpu.available()


def cuda_kernel_available() -> bool:
    """Whether GPU kernels can be used: Triton imports, or CUDA C kernels can be compiled (NVRTC)."""
    return gpu.available()


def _apply_reference(x2: torch.Tensor, plan: GivensPlan, angles: torch.Tensor, transpose: bool) -> torch.Tensor:
    return GivensFunction.apply(x2, angles, plan, transpose, "reference")


def _apply_cpu(x2: torch.Tensor, plan: GivensPlan, angles: torch.Tensor, transpose: bool) -> torch.Tensor:
    if not x2.is_cpu:
        raise ValueError(f"backend='cpu' needs CPU tensors, got x on {x2.device}")
    if not cpu.available():
        cpu.warn_unavailable()
        return _apply_reference(x2, plan, angles, transpose)
    if not (torch.is_grad_enabled() and (x2.requires_grad or angles.requires_grad)):
        return cpu.forward(x2, angles, plan, transpose)  # no graph: skip the autograd.Function (~10 us)
    return GivensFunction.apply(x2, angles, plan, transpose, "cpu")


_WARNED_NO_GPU = False


def _apply_cuda(x2: torch.Tensor, plan: GivensPlan, angles: torch.Tensor, transpose: bool) -> torch.Tensor:
    global _WARNED_NO_GPU
    if x2.device.type != "cuda" and not (x2.device.type == "cpu" and gpu_triton.interpreting()):
        raise ValueError(f"backend='cuda' needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                         f"got x on {x2.device}")
    if not gpu.runs(x2):
        if not _WARNED_NO_GPU:
            _WARNED_NO_GPU = True
            warnings.warn(f"kama: {gpu.unavailable_reason()}; using the slower pure-PyTorch path on the GPU. "
                          "Install Triton with pip install triton.", RuntimeWarning, stacklevel=3)
        return _apply_reference(x2, plan, angles, transpose)
    return GivensFunction.apply(x2, angles, plan, transpose, "cuda")


def walk_backend(device: torch.device, x: torch.Tensor | None = None) -> str:
    """The walk ``"auto"`` and ``"dense"`` use on ``device`` (for ``x``, if given)."""
    if device.type == "cpu":
        return "cpu" if cpu.available() else "reference"
    ok = gpu.available() if x is None else gpu.runs(x)
    return "cuda" if device.type == "cuda" and ok else "reference"


def _apply_dense(x2: torch.Tensor, plan: GivensPlan, angles: torch.Tensor, transpose: bool) -> torch.Tensor:
    eye = torch.eye(plan.d, dtype=x2.dtype, device=x2.device)
    mt = GivensFunction.apply(eye, angles, plan, transpose, walk_backend(eye.device, eye))  # M^T (or M)
    if x2.dtype in (torch.float16, torch.bfloat16) and x2.device.type == "cpu":
        return (x2.float() @ mt.float()).to(x2.dtype)
    return x2 @ mt


_IMPLS = {"reference": _apply_reference, "cpu": _apply_cpu, "cuda": _apply_cuda, "dense": _apply_dense}


def apply_plan(x2: torch.Tensor, plan: GivensPlan, angles: torch.Tensor, transpose: bool, backend: str) -> torch.Tensor:
    """:func:`givens_apply` on a 2-D batch and a plan, arguments already checked."""
    if backend == "auto":
        n_rows = x2.shape[0]
        if x2.is_cpu and cpu.available():  # choose_backend's answer without its device lookups (~1 us)
            backend = COST_MODEL.apply_backend(n_rows, plan.d, plan.num_rotations, "cpu", WALK_FLOPS["cpu"],
                                               GEMM_FLOPS["cpu"])
        else:
            backend = choose_backend(n_rows, plan.d, plan, device=x2.device, dtype=x2.dtype)
    return _IMPLS[backend](x2, plan, angles, transpose)


def check_apply_args(x: torch.Tensor, pairs: torch.Tensor | GivensPlan, angles: torch.Tensor, transpose: object,
                     backend: object) -> tuple[int, bool, str]:
    """Typed errors for :func:`givens_apply`'s arguments; returns ``(d, transpose, backend)``."""
    x = check_float_tensor("x", x)
    angles = check_float_tensor("angles", angles)
    backend = check_choice("backend", backend, BACKENDS)
    transpose = check_bool("transpose", transpose)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., d), got a 0-d tensor")
    d = int(x.shape[-1])
    if d < 1:
        raise ValueError(f"x must have a last dimension d >= 1, got shape {tuple(x.shape)}")
    if angles.dim() != 1:
        raise ValueError(f"angles must have shape (k,), got {tuple(angles.shape)}")
    if angles.device != x.device:
        raise ValueError(f"angles and x must be on the same device, got angles on {angles.device}, x on {x.device}")
    if isinstance(pairs, torch.Tensor) and pairs.device != x.device and pairs.device.type != "cpu":
        raise ValueError(f"pairs must be on the CPU or on x's device {x.device}, got {pairs.device}")
    if angles.dtype != x.dtype:
        raise TypeError(f"angles must have the same dtype as x ({x.dtype}), got {angles.dtype}")
    return d, transpose, backend


def givens_apply(
    x: torch.Tensor,
    pairs: torch.Tensor | GivensPlan,
    angles: torch.Tensor,
    *,
    transpose: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Apply the Givens product :math:`M = G(i_1, j_1, t_1) \cdots G(i_k, j_k, t_k)` to a batch.

    Returns :math:`x M^\top` (every row ``x`` becomes ``M x``), or :math:`x M` (the inverse,
    :math:`M^{-1} = M^\top`) when ``transpose=True``, in ``O(k)`` work per vector. Differentiable in ``x`` and
    ``angles`` (also twice). Only the output is saved for backward: extra memory ``O(batch x d)``.

    Under ``torch.compile`` and ``torch.export`` this is the registered operator ``torch.ops.kama.givens_apply``
    (same kernels, a fake implementation for tracing); ``torch.jit.trace`` records a pure-PyTorch walk.

    Args:
        x: ``(..., d)`` floating tensor (float16, bfloat16, float32 or float64; 16-bit inputs are rotated in
            float32 and rounded once at the end).
        pairs: ``(k, 2)`` integer tensor of coordinates, ``0 <= i, j < d``, ``i != j``, or a
            :class:`GivensPlan`.
        angles: ``(k,)`` tensor of angles in radians, same dtype and device as ``x``.
        transpose: apply :math:`M^\top` instead of :math:`M`.
        backend: one of :data:`BACKENDS`.

    Shape:
        x: ``(..., d)``; pairs: ``(k, 2)``; angles: ``(k,)``; output: ``(..., d)``.

    Example:
        >>> x = torch.tensor([[1.0, 0.0]])
        >>> givens_apply(x, torch.tensor([[0, 1]]), torch.tensor([torch.pi / 2]))
        tensor([[-4.3711e-08,  1.0000e+00]])
    """
    d, transpose, backend = check_apply_args(x, pairs, angles, transpose, backend)
    if torch.compiler.is_compiling():  # torch.compile / torch.export trace the registered op
        from .library import givens_apply_op

        return givens_apply_op(x, pairs.pairs_view if isinstance(pairs, GivensPlan) else pairs, angles, transpose,
                               backend)
    plan = as_plan(pairs, d)
    if angles.shape[0] != plan.num_rotations:
        raise ValueError(
            f"angles must have shape ({plan.num_rotations},) to match pairs, got {tuple(angles.shape)}"
        )
    x2 = x if x.dim() == 2 else x.reshape(-1, d)  # (a reshape costs ~1 us: batch-1 calls notice)
    if torch.jit.is_tracing():  # kernels write through raw pointers and autograd.Functions do not trace
        y2 = apply_traceable(x2, plan, angles, transpose)
    else:
        y2 = apply_plan(x2, plan, angles, transpose, backend)
    return y2 if x.dim() == 2 else y2.reshape(x.shape)


def givens_matrix(
    pairs: torch.Tensor | GivensPlan, angles: torch.Tensor, d: int, *, transpose: bool = False
) -> torch.Tensor:
    r"""The dense ``d x d`` matrix :math:`M = G_1 \cdots G_k` (or :math:`M^\top`), differentiable in ``angles``.

    Computed by the layered walk on the identity (``O(k d)`` work, never a product of dense matrices).

    Shape:
        pairs: ``(k, 2)``; angles: ``(k,)``; output: ``(d, d)`` with the dtype and device of ``angles``.

    Example:
        >>> m = givens_matrix(torch.tensor([[0, 1]]), torch.tensor([0.3]), 3)
        >>> torch.allclose(m @ m.T, torch.eye(3))
        True
    """
    d = check_int("d", d, minimum=1)
    angles = check_float_tensor("angles", angles)
    transpose = check_bool("transpose", transpose)
    eye = torch.eye(d, dtype=angles.dtype, device=angles.device)
    return givens_apply(eye, pairs, angles, transpose=not transpose, backend="reference")


def givens_apply_scaled(x: torch.Tensor, pairs: torch.Tensor | GivensPlan, angles: torch.Tensor,
                        scale: torch.Tensor) -> torch.Tensor:
    """``givens_apply(x, pairs, angles) * scale`` with the scaling fused into the compiled kernel's output pass
    when no gradient is needed (random features); otherwise the plain composition."""
    if (torch.is_grad_enabled() and (x.requires_grad or angles.requires_grad or scale.requires_grad)) \
            or x.device.type != "cpu" or not cpu.available() or x.dtype != angles.dtype:
        return givens_apply(x, pairs, angles) * scale
    d = int(x.shape[-1])
    plan = as_plan(pairs, d)
    if scale.shape != (d,) or angles.shape != (plan.num_rotations,):
        return givens_apply(x, plan, angles) * scale  # let givens_apply / broadcasting raise the errors
    keep = x.shape
    y = cpu.forward(x.reshape(-1, d), angles, plan, False, out_scale=scale.detach())
    return y.reshape(keep)
