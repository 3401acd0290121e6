r"""The registered PyTorch operators: ``torch.ops.kama.givens_apply`` and its backward.

``torch.compile`` and ``torch.export`` trace :func:`kama.givens_apply` (and so :class:`kama.KamaLinear`) into
these operators: each has a schema, a fake (meta) implementation for tracing, and an implementation for every
device that runs the same backends as eager (:mod:`kama.ops.dispatch`); outputs never alias inputs. Autograd is
registered with the saved-output backward (memory ``O(B d)``), itself the operator
``torch.ops.kama.givens_apply_backward``; a recorded backward (``create_graph=True``, e.g. TRPO's Hessian-vector
products, in eager mode) differentiates the reference walk's out-of-place operations instead, so higher
derivatives stay exact.

Schemas::

    kama::givens_apply(Tensor x, Tensor pairs, Tensor angles, bool transpose, str backend) -> Tensor
    kama::givens_apply_backward(Tensor y, Tensor grad, Tensor pairs, Tensor angles, bool transpose,
                                str backend) -> (Tensor, Tensor)

``x`` is ``(N, d)`` or ``(..., d)``; ``pairs`` ``(k, 2)`` integer; ``angles`` ``(k,)`` with ``x``'s dtype and
device; ``backend`` one of :data:`kama.ops.BACKENDS`. Called directly, the operators check their arguments as
:func:`kama.givens_apply` does (typed errors before any kernel runs).

Example:
    >>> import torch, kama.ops.library
    >>> x = torch.tensor([[1.0, 0.0]])
    >>> torch.ops.kama.givens_apply(x, torch.tensor([[0, 1]]), torch.tensor([0.0]), False, "auto")
    tensor([[1., 0.]])
"""

from __future__ import annotations

import torch

from .dispatch import apply_plan, check_apply_args, walk_backend
from .plans import GivensPlan, as_plan
from .reference import coefficients, compute_dtype, walk_backward

__all__ = ["givens_apply_op", "givens_apply_backward_op"]


def _plan_of(pairs: torch.Tensor, angles: torch.Tensor, d: int) -> GivensPlan:
    plan = as_plan(pairs, d)
    if angles.shape[0] != plan.num_rotations:
        raise ValueError(f"angles must have shape ({plan.num_rotations},) to match pairs, got {tuple(angles.shape)}")
    return plan


def _fresh(out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """``out``, copied if it shares memory with an input (a registered op's outputs never alias its inputs)."""
    for t in inputs:
        if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() and out.numel() and t.numel():
            return out.clone()
    return out


@torch.library.custom_op("kama::givens_apply", mutates_args=())
def givens_apply_op(x: torch.Tensor, pairs: torch.Tensor, angles: torch.Tensor, transpose: bool,
                    backend: str) -> torch.Tensor:
    """``x M^T`` (``x M`` with ``transpose``) by ``backend``: :func:`kama.givens_apply` as a PyTorch operator."""
    d, transpose, backend = check_apply_args(x, pairs, angles, transpose, backend)
    plan = _plan_of(pairs, angles, d)
    with torch.no_grad():
        y = apply_plan(x.reshape(-1, d), plan, angles, transpose, backend).reshape(x.shape)
    return _fresh(y.contiguous(), x, angles)


@givens_apply_op.register_fake
def _givens_apply_fake(x: torch.Tensor, pairs: torch.Tensor, angles: torch.Tensor, transpose: bool,
                       backend: str) -> torch.Tensor:
    check_apply_args(x, pairs, angles, transpose, backend)
    return x.new_empty(x.shape)


def _backward_kernel(y: torch.Tensor, grad: torch.Tensor, plan: GivensPlan, angles: torch.Tensor,
                     transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dx, dL/dangles)`` from the saved output by the device's walk (whatever the forward's backend: its
    output is ``x M^T`` up to rounding)."""
    from . import cpu, gpu

    backend = walk_backend(y.device, y)
    if backend == "cpu":
        return cpu.backward(y, grad, angles, plan, transpose)
    if backend == "cuda":
        return gpu.backward(y, grad, angles, plan, transpose,
                            gpu.coefficients(plan, angles, compute_dtype(y.dtype), transpose))
    cdtype = compute_dtype(y.dtype)
    c, s = coefficients(plan, angles, cdtype, transpose)
    gx_t, gt = walk_backward(y.t().to(cdtype).contiguous(), grad.t().to(cdtype).contiguous(), plan, c, s, transpose,
                             inplace=True)
    perm = plan.tensors(gt.device)[3]
    ga = torch.empty_like(gt).index_copy_(0, perm, gt)
    return gx_t.t().to(y.dtype).contiguous(), (-ga if transpose else ga).to(angles.dtype)


@torch.library.custom_op("kama::givens_apply_backward", mutates_args=())
def givens_apply_backward_op(y: torch.Tensor, grad: torch.Tensor, pairs: torch.Tensor, angles: torch.Tensor,
                             transpose: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients ``(dL/dx, dL/dangles)`` of ``kama::givens_apply`` from its output ``y`` and ``dL/dy``."""
    d, transpose, backend = check_apply_args(y, pairs, angles, transpose, backend)
    if grad.shape != y.shape:
        raise ValueError(f"grad must have the shape of y {tuple(y.shape)}, got {tuple(grad.shape)}")
    plan = _plan_of(pairs, angles, d)
    with torch.no_grad():
        gx, ga = _backward_kernel(y.reshape(-1, d), grad.reshape(-1, d).to(y.dtype), plan, angles, transpose)
    return _fresh(gx.reshape(y.shape).contiguous(), y, grad), _fresh(ga.contiguous(), angles)


@givens_apply_backward_op.register_fake
def _givens_apply_backward_fake(y: torch.Tensor, grad: torch.Tensor, pairs: torch.Tensor, angles: torch.Tensor,
                                transpose: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_apply_args(y, pairs, angles, transpose, backend)
    return y.new_empty(y.shape), angles.new_empty(angles.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, pairs, angles, transpose, backend = inputs
    ctx.save_for_backward(output, pairs, angles)
    ctx.transpose, ctx.backend = transpose, backend


def _backward(ctx, grad: torch.Tensor):
    y, pairs, angles = ctx.saved_tensors
    need_x, _, need_a = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: differentiate the reference walk's out-of-place operations
        d = y.shape[-1]
        plan = _plan_of(pairs, angles, d)
        cdtype = compute_dtype(y.dtype)
        c, s = coefficients(plan, angles, cdtype, ctx.transpose)
        gx_t, gt = walk_backward(y.reshape(-1, d).t().to(cdtype), grad.reshape(-1, d).t().to(cdtype), plan, c, s,
                                 ctx.transpose, inplace=False)
        perm = plan.tensors(gt.device)[3]
        ga = torch.zeros_like(gt).index_copy(0, perm, gt)
        gx = gx_t.t().to(y.dtype).reshape(y.shape)
        return gx if need_x else None, None, (-ga if ctx.transpose else ga).to(angles.dtype) if need_a else None, \
            None, None
    gx, ga = givens_apply_backward_op(y, grad, pairs, angles, ctx.transpose, ctx.backend)
    return gx if need_x else None, None, ga if need_a else None, None, None


givens_apply_op.register_autograd(_backward, setup_context=_setup_context)
