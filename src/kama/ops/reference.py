r"""The reference walk: products of Givens rotations in plain PyTorch tensor operations (the oracle of every fast path).

Each ASAP layer of disjoint rotations is applied to a feature-major copy of the batch ``(d, N)`` with a gather,
two multiply-adds and a scatter. Backward saves only the output: it walks the layers in reverse, recovers each
layer's input by the inverse rotation and rotates the incoming gradient back, so the extra memory is
``O(B d)``, independent of ``k``. The angle gradient of a rotation that maps ``u`` to ``v`` is
``sum_b g_j v_i - g_i v_j`` (a reduction over the batch). With out-of-place operations the same walk is
differentiable by autograd (the recorded backward of Hessian-vector products).

Also here: the plan as a product of layer matrices (:func:`layered_matrix`), the per-angle sensitivities of a
truncated product (:func:`angle_sensitivities`) and the plane scores of Algorithm 1 (:func:`plane_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._checks import check_float_tensor
from .plans import GivensPlan, as_plan, check_pairs
from .sampling import _live_range, dead_rotations

__all__ = ["compute_dtype", "coefficients", "layer_order", "walk_forward", "walk_backward", "apply_traceable",
           "layered_matrix", "angle_sensitivities", "plane_scores"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a walk computes in: float64 for float64 data, float32 for everything else (16-bit included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def coefficients(
    plan: GivensPlan, angles: torch.Tensor, cdtype: torch.dtype, transpose: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per gather position: ``C = cos t`` and ``S = -/+ sin t`` (sign flipped for the transpose)."""
    index, rot, sign, _ = plan.tensors(angles.device)
    a = angles.to(cdtype)
    c = torch.cos(a).index_select(0, rot)
    s = torch.sin(a).index_select(0, rot) * sign.to(cdtype)
    return c, (-s if transpose else s)


def layer_order(plan: GivensPlan, transpose: bool) -> Sequence[int]:
    """The order in which a walk applies the plan's layers: ``M = G_1 ... G_k`` acts on a vector from the last
    rotation to the first, ``M^T`` the other way."""
    return range(plan.depth) if transpose else range(plan.depth - 1, -1, -1)


def walk_forward(
    state: torch.Tensor, plan: GivensPlan, c: torch.Tensor, s: torch.Tensor, transpose: bool, inplace: bool
) -> torch.Tensor:
    """Rotate the feature-major ``state (d, N)``; in place when ``inplace`` (no autograd)."""
    index = plan.tensors(state.device)[0]
    off = plan.offsets
    for layer in layer_order(plan, transpose):
        lo, hi = 2 * off[layer], 2 * off[layer + 1]
        m = off[layer + 1] - off[layer]
        idx = index[lo:hi]
        ab = state.index_select(0, idx)  # rows [x_I; x_J]
        new = torch.addcmul(ab * c[lo:hi, None], ab.roll(m, 0), s[lo:hi, None])
        state = state.index_copy_(0, idx, new) if inplace else state.index_copy(0, idx, new)
    return state


def walk_backward(
    v: torch.Tensor, g: torch.Tensor, plan: GivensPlan, c: torch.Tensor, s: torch.Tensor, transpose: bool,
    inplace: bool, visit: Callable[[int, int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """From output ``v`` and its gradient ``g`` (both ``(d, N)``) return (input gradient, gradient w.r.t.
    the applied angles in gather-position order, one value per rotation laid out like ``plan.perm``).

    ``visit(a, b, state)``, when given, sees the stacked ``(v, g)`` state right after the layer holding the
    rotations ``plan.perm[a:b]`` (before it is undone)."""
    index = plan.tensors(v.device)[0]
    off = plan.offsets
    state = torch.stack([v, g])  # (2, d, N)
    grads: list[tuple[int, torch.Tensor]] = []
    for layer in reversed(list(layer_order(plan, transpose))):
        lo, hi = 2 * off[layer], 2 * off[layer + 1]
        m = off[layer + 1] - off[layer]
        idx = index[lo:hi]
        if visit is not None:
            visit(off[layer], off[layer + 1], state)
        both = state.index_select(1, idx)  # (2, 2m, N): [v_I; v_J], [g_I; g_J]
        swapped = both.roll(m, 1)
        prod = (both[1] * swapped[0]).sum(-1)  # [g_I v_J; g_J v_I]
        grads.append((off[layer], prod[m:] - prod[:m]))  # d L / d(applied angle)
        new = torch.addcmul(both * c[lo:hi, None], swapped, s[lo:hi, None], value=-1.0)  # inverse rotation
        state = state.index_copy_(1, idx, new) if inplace else state.index_copy(1, idx, new)
    grads.sort(key=lambda t: t[0])
    if grads:
        gt = torch.cat([t[1] for t in grads])
    else:
        gt = v.new_zeros(0)
    return state[1], gt


def apply_traceable(x2: torch.Tensor, plan: GivensPlan, angles: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The layered walk in out-of-place tensor operations only (no custom autograd, no kernel): what
    ``torch.jit.trace`` records. Differentiated by autograd itself, so it saves every layer's state."""
    cdtype = compute_dtype(x2.dtype)
    c, s = coefficients(plan, angles, cdtype, transpose)
    state = walk_forward(x2.t().to(cdtype), plan, c, s, transpose, inplace=False)
    return state.t().to(x2.dtype)



def layered_matrix(plan: GivensPlan, angles: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    r"""The ``d x d`` matrix :math:`P` with ``givens_apply(x, plan, angles, transpose=transpose) == x @ P.T``,
    built as a product of the plan's ``L`` layer matrices: :math:`P = R_{L} \cdots R_{1}` in application
    order, each :math:`R_l` the identity with the ``2 x 2`` blocks of its disjoint rotations written in (one
    ``index_put`` for all layers, padded with identities to a power of two), the product taken as a balanced
    tree of ``log2 L`` batched matrix products.

    It costs ``O(L d^3)`` flops instead of the walk's ``O(k d)``, but only about ``3 log2 L + 5`` autograd
    nodes instead of several per layer: the right form when the materialization is differentiated twice (the
    recorded backward of TRPO's Hessian-vector products), where per-node overhead dominates at RL sizes.

    Shape:
        angles: ``(k,)``; output: ``(d, d)`` with the dtype and device of ``angles``.
    """
    d, depth = plan.d, plan.depth
    if depth == 0:
        return torch.eye(d, dtype=angles.dtype, device=angles.device)
    cdtype = compute_dtype(angles.dtype)
    c, s = coefficients(plan, angles, cdtype, transpose)
    flat = plan.caches.on(angles.device).layered.get(transpose)
    if flat is None:
        # Flat positions in the (slots, d, d) stack, slot = the layer's place in application order, of every
        # gather entry's diagonal and partner element (row = the entry's coordinate, column = its partner's:
        # new[p] = c[p] x[index[p]] + s[p] x[index[p']]).
        index, off = plan.index, plan.offsets
        rows, cols, slots = [], [], []
        slot_of = {layer: slot for slot, layer in enumerate(layer_order(plan, transpose))}
        for layer in range(depth):  # gather-position order, as c and s
            lo, hi, slot = 2 * off[layer], 2 * off[layer + 1], slot_of[layer]
            idx = index[lo:hi]
            rows.append(idx)
            cols.append(idx.roll((hi - lo) // 2, 0))
            slots.append(torch.full((hi - lo,), slot, dtype=torch.long))
        r, cc, sl = torch.cat(rows), torch.cat(cols), torch.cat(slots)
        flat = torch.cat([sl * d * d + r * d + r, sl * d * d + r * d + cc]).to(angles.device)
        plan.caches.on(angles.device).layered[transpose] = flat
    width = 1 << (depth - 1).bit_length()  # slots: a power of two, the extra ones identities
    eye = torch.eye(d, dtype=cdtype, device=angles.device)
    mats = torch.zeros(width * d * d, dtype=cdtype, device=angles.device).index_put(
        (flat,), torch.cat([c - 1.0, s])).view(width, d, d) + eye
    while width > 1:  # P = A_{L-1} ... A_0 over the slots in application order
        width //= 2
        first, second = mats.view(width, 2, d, d).unbind(1)
        mats = torch.bmm(second, first)
    return mats[0].to(angles.dtype)


def angle_sensitivities(pairs: torch.Tensor | GivensPlan, angles: torch.Tensor, d: int, *, inputs: int | None = None,
                        outputs: int | None = None) -> torch.Tensor:
    r"""Per rotation, the squared Frobenius norm of the truncated product's derivative by its angle.

    With :math:`M = G_1 \cdots G_k` and the kept block :math:`W = M_{[:o, :i]}` (``o = outputs`` rows, ``i = inputs``
    columns), returns :math:`\lVert \partial W / \partial t_r \rVert_F^2` for every ``r``. Writing
    :math:`\partial M / \partial t_r = L_r J_r R_r` with :math:`L_r = G_1 \cdots G_r`,
    :math:`R_r = G_{r+1} \cdots G_k` and :math:`J_r = e_j e_i^\top - e_i e_j^\top`, it is
    :math:`|a_j|^2 |u_i|^2 + |a_i|^2 |u_j|^2 - 2 (a_i \cdot a_j)(u_i \cdot u_j)`
    with :math:`a` the columns of :math:`(L_r)_{[:o, :]}` and :math:`u` the rows of :math:`(R_r)_{[:, :i]}`; both
    are carried through the plan's layers in one walk (``O(k (o + i))``). Dead rotations
    (:func:`dead_rotations`) give exactly 0; in a square product every entry is 2.

    Shape:
        angles: ``(k,)``; output: ``(k,)`` float64.

    Example:
        >>> angle_sensitivities(torch.tensor([[0, 1]]), torch.tensor([0.3]), 3)
        tensor([2.], dtype=torch.float64)
    """
    angles = check_float_tensor("angles", angles)
    plan = as_plan(pairs, d)
    inputs = _live_range("inputs", inputs, d)
    outputs = _live_range("outputs", outputs, d)
    if angles.shape != (plan.num_rotations,):
        raise ValueError(f"angles must have shape ({plan.num_rotations},), got {tuple(angles.shape)}")
    with torch.no_grad():
        a64 = angles.detach().to("cpu", torch.float64)
        # M itself: the transposed walk over the identity (feature-major), transposed back
        m = walk_forward(torch.eye(d, dtype=torch.float64), plan, *coefficients(plan, a64, torch.float64, True),
                         True, inplace=True).t()
        # rows = coordinates: A^T = (P L_r)^T (o columns) beside U = (R_r Q) (i columns); both are multiplied by
        # G_r from the left as r goes from k down to 1 (the order in which rotations act on a vector)
        state = torch.cat([m[:outputs, :].t(), torch.eye(d, dtype=torch.float64)[:, :inputs]], dim=1)
        c, s = coefficients(plan, a64, torch.float64, False)
        index, off = plan.index, plan.offsets
        out = torch.zeros(plan.num_rotations, dtype=torch.float64)
        perm = plan.perm
        for layer in layer_order(plan, False):
            lo, hi = 2 * off[layer], 2 * off[layer + 1]
            mm = off[layer + 1] - off[layer]
            idx = index[lo:hi]
            rows = state.index_select(0, idx)
            ai, aj = rows[:mm, :outputs], rows[mm:, :outputs]
            ui, uj = rows[:mm, outputs:], rows[mm:, outputs:]
            val = (aj.square().sum(1) * ui.square().sum(1) + ai.square().sum(1) * uj.square().sum(1)
                   - 2 * (ai * aj).sum(1) * (ui * uj).sum(1))
            out[perm[off[layer]:off[layer + 1]]] = val.clamp_min(0.0)
            new = torch.addcmul(rows * c[lo:hi, None], rows.roll(mm, 0), s[lo:hi, None])
            state.index_copy_(0, idx, new)
        # P L_r is carried by undoing rotations, so a dead rotation's columns are zero only up to rounding
        out[dead_rotations(plan, d, inputs=inputs, outputs=outputs)] = 0.0
    return out


def plane_scores(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    pairs: torch.Tensor | GivensPlan,
    angles: torch.Tensor,
    candidates: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Directional derivatives of a loss for rotating in candidate planes at every position of the product.

    For ``y = givens_apply(x, pairs, angles)`` with upstream gradient ``grad_y = dL/dy``, the score of
    candidate plane ``(I, J)`` for rotation ``r`` is :math:`\partial L / \partial t` of a rotation
    :math:`G(I, J, t)` inserted at ``t = 0`` next to rotation ``r`` (at the boundary of its ASAP layer):
    :math:`\sum_b g_J v_I - g_I v_J`, with ``v`` the state and ``g`` its gradient there. This is the
    coordinate of the Riemannian gradient that Algorithm 1 of the paper maximizes, restricted to the
    candidates. Cost ``O(k (c + 1) batch)``.

    Args:
        x: ``(N, d)`` input batch; grad_y: ``(N, d)`` gradient of the loss w.r.t. the output.
        pairs, angles: the product, as in :func:`givens_apply`.
        candidates: ``(k, c, 2)`` integer tensor of candidate planes for every rotation.

    Returns:
        ``(scores (k, c), current (k,))``: candidate scores and ``dL/dt_r`` of the current planes.
    """
    x = check_float_tensor("x", x)
    d = int(x.shape[-1])
    plan = as_plan(pairs, d)
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y must have the shape of x {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    k = plan.num_rotations
    if not isinstance(candidates, torch.Tensor) or candidates.dtype.is_floating_point \
            or candidates.dtype.is_complex or candidates.dtype == torch.bool:
        raise TypeError(f"candidates must be an integer tensor of shape ({k}, c, 2), got "
                        f"{getattr(candidates, 'dtype', type(candidates).__name__)}")
    if candidates.dim() != 3 or candidates.shape[0] != k or candidates.shape[2] != 2:
        raise ValueError(f"candidates must have shape ({k}, c, 2), got {tuple(candidates.shape)}")
    try:
        check_pairs(candidates.reshape(-1, 2), d)  # planes in [0, d), i != j: no negative index wraps around
    except ValueError as e:
        raise ValueError(f"candidates: {e}") from None
    cdtype = compute_dtype(x.dtype)
    with torch.no_grad():
        c, s = coefficients(plan, angles.detach(), cdtype, False)
        y = walk_forward(x.detach().reshape(-1, d).t().to(cdtype, copy=True).contiguous(), plan, c, s,
                          False, inplace=True)
        g = grad_y.detach().reshape(-1, d).t().to(cdtype).contiguous()
        perm = plan.perm.to(x.device)
        cand = candidates.to(x.device, torch.long)
        scores = torch.zeros(k, candidates.shape[1], dtype=cdtype, device=x.device)

        def visit(a: int, b: int, state: torch.Tensor) -> None:
            rot = perm[a:b]
            cd = cand.index_select(0, rot)  # (m, c, 2)
            vi, vj = state[0][cd[..., 0]], state[0][cd[..., 1]]  # (m, c, N)
            gi, gj = state[1][cd[..., 0]], state[1][cd[..., 1]]
            scores[rot] = (gj * vi - gi * vj).sum(-1)

        _, gt = walk_backward(y, g, plan, c, s, False, inplace=True, visit=visit)
        current = torch.empty_like(gt).index_copy_(0, perm, gt)
    return scores, current
