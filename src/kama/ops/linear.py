r"""The functional form of :class:`kama.KamaLinear`: a truncated, renormalized product of Givens rotations as a
linear map, in one call (as ``F.linear`` is ``nn.Linear``'s).

With ``n = max(d_1, d_2)`` (``d_1 = out_features``, ``d_2 = in_features``), :math:`M = G_1 \cdots G_k \in SO(n)`
with rotation angles :math:`t = g\,\theta` (``angle_gain`` ``g``, angle parameters :math:`\theta`) and scalars
``s``, the weight is

.. math::
    W = \operatorname{diag}(s)\, M_{[:d_1, :]} \quad (d_1 \le d_2), \qquad
    W = M_{[:, :d_2]} \operatorname{diag}(s) \quad (d_1 > d_2),

and :func:`kama_linear` returns :math:`x W^\top + b` without forming ``W``: it zero-pads the input to ``n``,
applies the rotations in ``O(k)`` per vector and drops the extra outputs. On the CPU the whole layer is one pass
of the compiled kernel (:mod:`kama.ops.cpu`); without gradients and for batches where one GEMM beats the walk
(:data:`kama.ops.COST_MODEL`), a :class:`LinearCache` keeps the materialized ``W`` while the parameters keep their
values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from . import cpu
from .dispatch import COST_MODEL, choose_backend, givens_apply
from .plans import GivensPlan, as_plan
from .reference import compute_dtype, layered_matrix

__all__ = ["kama_linear", "kama_weight", "LinearCache", "weight_from_matrix"]


def pad_input(x: torch.Tensor, scale: torch.Tensor, out_features: int, n: int) -> torch.Tensor:
    """Widening layers (out > in) scale the input columns and zero-pad them to ``n``."""
    in_features = x.shape[-1]
    if out_features > in_features:
        x = F.pad(x * scale, (0, n - in_features))
    return x


def finish_output(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                  out_features: int) -> torch.Tensor:
    """Narrowing layers (out <= in) keep the first ``out`` rotated coordinates and scale them; then the bias."""
    if out_features <= in_features:
        if out_features < y.shape[-1]:
            y = y[..., :out_features]
        if bias is not None:
            return torch.addcmul(bias, y, scale)
        return y * scale
    return y + bias if bias is not None else y


def weight_from_matrix(m: torch.Tensor, scale: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """The ``(out, in)`` weight from ``M`` (``n x n``): scaled leading rows or columns."""
    if out_features <= in_features:
        return scale[:, None] * m[:out_features, :]
    return m[:, :in_features] * scale[None, :]


def rotation_angles(angles: torch.Tensor, angle_gain: float) -> torch.Tensor:
    """``angle_gain * angles`` (``angles`` itself for the gain 1)."""
    return angles if angle_gain == 1.0 else angles * angle_gain


def kama_weight(pairs: torch.Tensor | GivensPlan, angles: torch.Tensor, scale: torch.Tensor, in_features: int,
                out_features: int, *, angle_gain: float = 1.0, backend: str = "reference") -> torch.Tensor:
    """The ``(out_features, in_features)`` weight ``W`` (differentiable): the walk over the ``n x n`` identity by
    ``backend`` (see :func:`kama.givens_apply`), truncated and scaled."""
    n = max(in_features, out_features)
    if angles.is_meta:
        return angles.new_empty(out_features, in_features)
    eye = torch.eye(n, dtype=angles.dtype, device=angles.device)
    m = givens_apply(eye, pairs, rotation_angles(angles, angle_gain), transpose=True, backend=backend)
    return weight_from_matrix(m, scale, in_features, out_features)


def reference_linear(x: torch.Tensor, angles: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     plan: GivensPlan, out_features: int) -> torch.Tensor:
    """The unfused, twice-differentiable composition that the fused pass computes (``angles`` in radians)."""
    in_features = x.shape[-1]
    y = givens_apply(pad_input(x, scale, out_features, plan.d), plan, angles)
    return finish_output(y, scale, bias, in_features, out_features)


class LinearCache:
    """What one layer reuses between calls; owned by the layer, empty again after pickling or copying.

    Attributes:
        pairs, plan: a private copy of the planes last seen and their :class:`GivensPlan` (reused while the planes
            keep their values, compared each call, so writes through ``.data`` are seen).
        fused: ``(n_rows, plan, bool)``: whether the compiled kernel's walk wins for that batch size.
        dense: ``(n_rows, device, bool)``: whether the materialized weight's GEMM wins (no gradient).
        weight: ``(angles, scale, angle_gain, plan, W)``: the materialized weight for those values.
    """

    def __init__(self) -> None:
        self.pairs: torch.Tensor | None = None
        self.plan: GivensPlan | None = None
        self.fused: tuple[int, GivensPlan, bool] | None = None
        self.dense: tuple[int, torch.device, bool] | None = None
        self.weight: tuple[torch.Tensor, torch.Tensor, float, GivensPlan, torch.Tensor] | None = None

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]

    def __deepcopy__(self, memo: dict) -> LinearCache:
        return LinearCache()

    def plan_of(self, pairs: torch.Tensor, n: int) -> GivensPlan:
        """The plan of ``pairs`` (kept while ``pairs`` keeps its values, checked each call)."""
        if self.pairs is not None and self.plan is not None and cpu.same_values(self.pairs, pairs):
            return self.plan
        plan = as_plan(pairs, n)
        self.pairs, self.plan = pairs.clone(), plan
        return plan

    def fused_wins(self, n_rows: int, plan: GivensPlan) -> bool:
        """Whether :func:`kama.ops.choose_backend` picks the compiled kernel for ``n_rows`` (cached)."""
        hit = self.fused
        if hit is not None and hit[0] == n_rows and hit[1] is plan:
            return hit[2]
        wins = cpu.available() and choose_backend(n_rows, plan.d, plan) == "cpu"
        self.fused = (n_rows, plan, wins)
        return wins

    def dense_wins(self, n_rows: int, in_features: int, out_features: int, k: int, device: torch.device) -> bool:
        """Whether a GEMM on the materialized weight beats the walk for ``n_rows`` rows (cached)."""
        hit = self.dense
        if hit is not None and hit[0] == n_rows and hit[1] == device:
            return hit[2]
        wins = COST_MODEL.cached_weight_wins(n_rows, in_features, out_features, k, device)
        self.dense = (n_rows, device, wins)
        return wins

    def weight_for(self, plan: GivensPlan, angles: torch.Tensor, scale: torch.Tensor, in_features: int,
                   out_features: int, angle_gain: float) -> torch.Tensor:
        """The materialized weight, reused while angles, scalars and ``angle_gain`` keep their values (compared by
        value: optimizers and ``.data`` writes both change them) and the plan is the same object."""
        w = self._stored_weight(plan, angles, scale, angle_gain)
        if w is not None:
            return w
        with torch.no_grad():
            w = kama_weight(plan, angles, scale, in_features, out_features, angle_gain=angle_gain, backend="auto")
        self.weight = (angles.detach().clone(), scale.detach().clone(), angle_gain, plan, w)
        return w

    def current_weight(self, pairs: torch.Tensor | GivensPlan, angles: torch.Tensor, scale: torch.Tensor,
                       n_rows: int, angle_gain: float) -> torch.Tensor | None:
        """The weight of the last call if it is still the layer's and the GEMM won for ``n_rows`` rows, else
        ``None``: the checks of :meth:`plan_of`, :meth:`dense_wins` and :meth:`weight_for` in one place, so that
        a small no-gradient call (a policy step) pays three comparisons and one ``F.linear``."""
        dense = self.dense
        if dense is None or dense[0] != n_rows or not dense[2] or dense[1] != angles.device:
            return None
        if isinstance(pairs, GivensPlan):
            plan: GivensPlan | None = pairs
        elif self.pairs is not None and cpu.same_values(self.pairs, pairs):
            plan = self.plan
        else:
            return None
        return None if plan is None else self._stored_weight(plan, angles, scale, angle_gain)

    def _stored_weight(self, plan: GivensPlan, angles: torch.Tensor, scale: torch.Tensor,
                       angle_gain: float) -> torch.Tensor | None:
        """The stored weight if it was made from ``plan`` and these angles, scalars and gain, else ``None``."""
        hit = self.weight
        if hit is None:
            return None
        ca, cs, gain, cplan, w = hit
        ok = cplan is plan and gain == angle_gain and cpu.same_values(ca, angles) and cpu.same_values(cs, scale)
        return w if ok else None


def kama_linear(x: torch.Tensor, pairs: torch.Tensor | GivensPlan, angles: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, *, out_features: int, angle_gain: float = 1.0,
                cache: LinearCache | None = None) -> torch.Tensor:
    r""":math:`x W^\top + b` for the KAMA weight ``W`` of ``pairs``, ``angles`` and ``scale`` (see the module
    docstring); what :class:`kama.KamaLinear` calls.

    Under ``torch.autocast`` (float16 / bfloat16) the output takes the autocast dtype, as ``nn.Linear``'s does,
    while the rotations run in the parameters' dtype (float32 state inside the walk); a 16-bit ``x`` with
    float32 parameters likewise gives a 16-bit output.

    Args:
        x: ``(*, in_features)`` input.
        pairs: ``(k, 2)`` planes of the ``n x n`` product, ``n = max(in_features, out_features)``, or a plan.
        angles: ``(k,)`` angle parameters; the rotation angles are ``angle_gain * angles``.
        scale: ``(min(in_features, out_features),)`` renormalization scalars.
        bias: ``(out_features,)`` or ``None``.
        out_features: ``d_1``.
        angle_gain: the constant ``g`` of the parametrization (1: angles in radians).
        cache: a :class:`LinearCache` the caller owns (a layer's), or ``None``.

    Shape:
        x: ``(*, in_features)``; output: ``(*, out_features)``.

    Example:
        >>> import kama
        >>> g = torch.Generator().manual_seed(0)
        >>> p, a = kama.random_pairs(5, 12, generator=g), kama.random_angles(12, generator=g)
        >>> x = torch.randn(3, 4, generator=g)
        >>> y = kama_linear(x, p, a, torch.ones(4), out_features=5)
        >>> torch.allclose(y, x @ kama_weight(p, a, torch.ones(4), 4, 5).T, atol=1e-6)
        True
    """
    in_features = x.shape[-1]
    n = max(in_features, out_features)
    if x.is_meta or angles.is_meta:  # shape propagation (meta-device models): no values to rotate
        return x.new_empty(*x.shape[:-1], out_features)
    low = _low_precision(x, angles)
    if low is not None:  # autocast or 16-bit input: float32 state inside, the low precision outside
        with torch.autocast(x.device.type, enabled=False):
            return kama_linear(x.to(angles.dtype), pairs, angles, scale, bias, out_features=out_features,
                               angle_gain=angle_gain, cache=cache).to(low)
    if torch.jit.is_tracing():  # the compiled paths write through raw pointers, which a trace cannot record
        return F.linear(x, kama_weight(pairs, angles, scale, in_features, out_features, angle_gain=angle_gain),
                        bias)
    if torch.compiler.is_compiling():  # the registered op between the compiler's own pad / scale / bias ops
        y = givens_apply(pad_input(x, scale, out_features, n), pairs, rotation_angles(angles, angle_gain))
        return finish_output(y, scale, bias, in_features, out_features)
    n_rows = x.numel() // in_features if in_features else 0
    no_grad = not (torch.is_grad_enabled() and (angles.requires_grad or scale.requires_grad))
    if cache is not None and no_grad:
        w = cache.current_weight(pairs, angles, scale, n_rows, angle_gain)
        if w is not None:
            return F.linear(x, w, bias)
    plan = cache.plan_of(pairs, n) if cache is not None and not isinstance(pairs, GivensPlan) else as_plan(pairs, n)
    if cache is not None and no_grad and cache.dense_wins(n_rows, in_features, out_features, plan.num_rotations,
                                                          angles.device):
        return F.linear(x, cache.weight_for(plan, angles, scale, in_features, out_features, angle_gain), bias)
    if x.is_cpu and x.dtype == angles.dtype and (
            cache.fused_wins(n_rows, plan) if cache is not None else
            cpu.available() and choose_backend(n_rows, plan.d, plan) == "cpu"):
        # One autograd node (one C pass) for pad, rotations, truncation, scalars and bias: RL-size layers are
        # dominated by per-op overhead.
        if x.dim() == 2:
            return _KamaLinearFunction.apply(x, angles, scale, bias, plan, out_features, angle_gain)
        y = _KamaLinearFunction.apply(x.reshape(-1, in_features), angles, scale, bias, plan, out_features,
                                      angle_gain)
        return y.reshape(*x.shape[:-1], out_features)
    y = givens_apply(pad_input(x, scale, out_features, n), plan, rotation_angles(angles, angle_gain))
    return finish_output(y, scale, bias, in_features, out_features)


_LOW = (torch.float16, torch.bfloat16)
_FUSED_DTYPES = (torch.float32, torch.float64)


def _low_precision(x: torch.Tensor, angles: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype the layer's output takes, or ``None``: the autocast dtype where autocast is on (as
    ``nn.Linear``'s output), else ``x``'s dtype when ``x`` is 16-bit and the parameters are not. The rotations
    always run on the parameters' (float32 or float64) dtype."""
    if angles.dtype in _LOW:
        return None
    device = "cpu" if x.is_cpu else "cuda" if x.is_cuda else None
    if device is not None and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return dtype if dtype in _LOW else None
    return x.dtype if x.dtype in _LOW else None


def _engine_uses(ctx: Any, index: int) -> bool:
    """Whether the backward pass now running uses the gradient of the node's input ``index``: ``autograd.grad``
    with ``inputs`` asks for some only (sb3-contrib's TRPO takes the KL's gradient one parameter at a time, so a
    recorded backward that built every input's gradient built three to four times the graph its Hessian-vector
    products then walk). ``True`` where torch cannot say."""
    node = ctx.next_functions[index][0]
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # an older torch, or called outside the engine
        return True


class _KamaLinearFunction(torch.autograd.Function):
    """KamaLinear's forward in one autograd node over the compiled kernel (CPU).

    Saves the input and the rotated (pre-truncation) output; backward runs the kernel's saved-output walk.
    A recorded backward (``create_graph=True``, e.g. TRPO's Hessian-vector products) recomputes the forward
    with differentiable operations and differentiates that, so higher derivatives stay exact."""

    @staticmethod
    def forward(ctx, x, angles, scale, bias, plan, out_features, gain=1.0):
        ctx.plan, ctx.out_features, ctx.gain = plan, out_features, gain
        rot = angles if gain == 1.0 else angles.detach() * gain  # the rotation angles
        ctx.fused = x.dtype in _FUSED_DTYPES and cpu.has_linear_kernel()
        if ctx.fused:  # pad, scale, rotate, truncate and bias in one C pass (cos/sin computed there too)
            xc = cpu.as_dtype(x, x.dtype)
            out, ctx.y_rot = cpu.linear_forward(xc, rot, scale, bias, plan, out_features,
                                                keep_rotated=any(ctx.needs_input_grad[:4]))
            ctx.save_for_backward(xc, angles, scale, bias)
            return out
        coef = cpu.coefficients(plan, rot, compute_dtype(x.dtype))
        y_rot = cpu.forward(pad_input(x, scale, out_features, plan.d), rot, plan, False, coef)
        out = finish_output(y_rot, scale, bias, x.shape[1], out_features)
        if out is y_rot:  # the output must not alias the saved rotated state
            out = y_rot.clone()
        ctx.save_for_backward(x, angles, scale, bias)
        ctx.y_rot = y_rot
        ctx.coef = coef
        return out

    @staticmethod
    def backward(ctx, g):
        x, angles, scale, bias = ctx.saved_tensors
        y_rot, plan, out_features, gain = ctx.y_rot, ctx.plan, ctx.out_features, ctx.gain
        if torch.is_grad_enabled():  # create_graph: differentiate a differentiable recomputation
            inputs = (x, angles, scale, bias)
            want = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad and _engine_uses(ctx, i)]
            result: list[torch.Tensor | None] = [None] * 4
            with torch.enable_grad():
                # A recorded walk over the batch costs many graph nodes per layer of rotations; when the batch is
                # at least n rows (TRPO's Hessian-vector products over a whole rollout) the recorded graph is the
                # weight as a product of the plan's layer matrices (a few batched GEMMs) plus one GEMM. The
                # recomputation is kept on the node: every recorded backward through it (TRPO takes one per
                # parameter) then shares one graph, which a Hessian-vector product walks once, not once per call.
                out = getattr(ctx, "recorded", None)
                if out is None:
                    rot = rotation_angles(angles, gain)
                    if x.shape[0] >= plan.d:
                        out = F.linear(x, weight_from_matrix(layered_matrix(plan, rot), scale, x.shape[1],
                                                             out_features), bias)
                    else:
                        out = reference_linear(x, rot, scale, bias, plan, out_features)
                    ctx.recorded = out
                if want:
                    grads = torch.autograd.grad(out, [inputs[i] for i in want], g, create_graph=True,
                                                allow_unused=True)
                    for i, gr in zip(want, grads, strict=True):
                        result[i] = gr
            return (*result, None, None, None)
        rot = angles if gain == 1.0 else angles.detach() * gain
        if ctx.fused:
            gx, ga, gs, gb = cpu.linear_backward(g, y_rot, x, rot, scale, bias is not None, plan, out_features)
            if gain != 1.0:
                ga = ga * gain
            need = ctx.needs_input_grad
            return (gx if need[0] else None, ga if need[1] else None, gs if need[2] else None,
                    gb if need[3] else None, None, None, None)
        n, in_features = plan.d, x.shape[1]
        gb = g.sum(0) if bias is not None and ctx.needs_input_grad[3] else None
        if out_features <= in_features:
            gs = (g * y_rot[:, :out_features]).sum(0)
            g_rot = g * scale
            if out_features < n:
                g_rot = F.pad(g_rot, (0, n - out_features))
        else:
            g_rot = g
        g_xp, ga = cpu.backward(y_rot, g_rot, rot, plan, False, ctx.coef)
        if gain != 1.0:
            ga = ga * gain
        if out_features > in_features:
            g_in = g_xp[:, :in_features]
            gs = (g_in * x).sum(0)
            gx = g_in * scale
        else:
            gx = g_xp
        return gx, ga, gs, gb, None, None, None
