r"""Givens coordinate descent on SO(d) (paper section 5, Algorithm 1, Theorem 3).

Every step right-multiplies the current rotation by one Givens rotation, :math:`M_t = M_{t-1} G(i_t, j_t,
\theta_t)`, so the result is itself a KAMA matrix: ``M = M0 @ givens_matrix(pairs, angles, d)``. A rotation
changes two columns of ``M`` (:math:`M_i \leftarrow c M_i + s M_j,\ M_j \leftarrow -s M_i + c M_j`); no
``d x d`` Givens matrix is ever formed.

The directional derivative of ``F`` along the pair ``(i, j)`` is
:math:`\partial_t F(M G(i, j, t))|_0 = Q_{ji} - Q_{ij}` with :math:`Q = M^\top \nabla F(M)`: one matrix product
gives all ``d (d - 1) / 2`` of them; the Riemannian gradient has :math:`\lVert\nabla F\rVert_F^2 =
2 \sum_{i<j} (Q_{ji} - Q_{ij})^2`.

Rules:

* ``"exact"``: Algorithm 1 as written: minimize :math:`F(M G(i, j, t))` over ``t`` for every pair, take the best.
* ``"gradient"``: the pair with the largest ``|directional derivative|``, then an exact line search on it.
* ``"random"``: a uniformly random pair, then the line search (Shalit and Chechik, 2014).

Structured objectives keep what their gradient needs updated in ``O(d)`` per step, so a ``"gradient"`` or
``"exact"`` step costs ``O(d^2)``, and ``t -> F(M G(t))`` is a trigonometric polynomial minimized in closed form:

* :class:`Linear`: :math:`\operatorname{tr}(A^\top M)` (keeps :math:`P = A^\top M`);
* :class:`Procrustes`: :math:`\lVert M A - B \rVert_F^2 = \lVert A\rVert^2 + \lVert B\rVert^2 -
  2 \operatorname{tr}((B A^\top)^\top M)`, a linear objective;
* :class:`Brockett`: :math:`\operatorname{tr}(M^\top A M N)`, ``A`` symmetric, ``N`` diagonal (keeps
  :math:`S = M^\top A M`); minimized by eigenvectors of ``A`` ordered against ``N``.

Any other ``F`` is a torch callable of ``M``: one autograd gradient per step, and a bounded one-dimensional
search from several starting points on ``[0, 2 pi)``.

Theorem 3: with ``B`` bounding :math:`|\Phi''_{ij}|` for :math:`\Phi_{ij}(t) = F(M G(i, j, t))`, each exact or
gradient step decreases ``F`` by at least :math:`\lVert\nabla F(M)\rVert^2 / (2 d (d-1) B)`. For structured
objectives the history records ``B`` measured at every step (the largest ``sup_t |Phi''|`` over all pairs, exact
for trigonometric polynomials) and that bound.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from ._checks import check_choice, check_int

__all__ = ["Linear", "Procrustes", "Brockett", "GivensResult", "givens_coordinate_descent", "RULES",
           "minimize_trig"]

RULES: tuple[str, ...] = ("exact", "gradient", "random")


def _rotate_columns(m: torch.Tensor, i: int, j: int, t: float) -> None:
    """In place: ``m <- m G(i, j, t)`` (two columns)."""
    c, s = math.cos(t), math.sin(t)
    mi, mj = m[:, i].clone(), m[:, j]
    m[:, i] = c * mi + s * mj
    m[:, j] = -s * mi + c * mj


def _rotate_both(s_mat: torch.Tensor, i: int, j: int, t: float) -> None:
    """In place: ``S <- G^T S G`` for symmetric ``S`` (two rows and two columns)."""
    _rotate_columns(s_mat, i, j, t)
    s_t = s_mat.T  # rows i, j of S are columns of S^T
    _rotate_columns(s_t, i, j, t)


def minimize_trig(a1: float, b1: float, a2: float = 0.0, b2: float = 0.0) -> float:
    r"""Global minimizer on ``[0, 2 pi)`` of :math:`a_1\cos t + b_1 \sin t + a_2 \cos 2t + b_2 \sin 2t`.

    The derivative times :math:`z^2` (:math:`z = e^{it}`) is a quartic in ``z``; its unit-modulus roots are the
    critical points, and the best is returned (closed form, no grid).

    Example:
        >>> round(minimize_trig(1.0, 0.0), 6)  # cos t is smallest at pi
        3.141593
    """
    if a2 == 0.0 and b2 == 0.0:
        return math.atan2(-b1, -a1) % (2 * math.pi)
    # f'(t) = -a1 sin t + b1 cos t - 2 a2 sin 2t + 2 b2 cos 2t; with sin = (z - 1/z)/2i, cos = (z + 1/z)/2
    # z^2 f'(t) = c4 z^4 + c3 z^3 + c2 z^2 + c1 z + c0
    c4 = (-2 * a2) / (2j) + 2 * b2 / 2
    c3 = -a1 / (2j) + b1 / 2
    c1 = a1 / (2j) + b1 / 2
    c0 = (2 * a2) / (2j) + 2 * b2 / 2
    roots = np.roots([c4, c3, 0.0, c1, c0])
    cands = [float(np.angle(r)) % (2 * math.pi) for r in roots if abs(abs(r) - 1) < 1e-6]
    cands += [0.0, math.pi / 2, math.pi, 3 * math.pi / 2]  # safety net for degenerate polynomials

    def f(t: float) -> float:
        return a1 * math.cos(t) + b1 * math.sin(t) + a2 * math.cos(2 * t) + b2 * math.sin(2 * t)

    return min(cands, key=f)


class _Structured(ABC):
    """An objective whose line function is a trigonometric polynomial with incrementally updated state."""

    d: int

    @abstractmethod
    def value(self, m: torch.Tensor) -> float:
        """``F(m)``."""

    @abstractmethod
    def start(self, m: torch.Tensor) -> None:
        """Initialize the incremental state at ``m``."""

    @abstractmethod
    def update(self, i: int, j: int, t: float) -> None:
        """Follow ``M <- M G(i, j, t)`` in ``O(d)``."""

    @abstractmethod
    def line(self) -> tuple[torch.Tensor, ...]:
        """``(a1, b1, a2, b2)``: ``d x d`` coefficient matrices with
        ``F(M G(i, j, t)) - F(M) = a1 (cos t - 1) + b1 sin t + a2 (cos 2t - 1) + b2 sin 2t`` (entries ``[i, j]``,
        ``i < j``)."""


class Linear(_Structured):
    r"""``F(M) = tr(A^T M)`` (to minimize).

    Example:
        >>> res = givens_coordinate_descent(Linear(-torch.eye(3, dtype=torch.float64)), d=3, steps=3)
        >>> round(res.history[-1]["objective"], 6)  # tr(-M) is smallest at M = I
        -3.0
    """

    def __init__(self, a: torch.Tensor) -> None:
        a = torch.as_tensor(a, dtype=torch.float64)
        if a.dim() != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"A must be a square matrix, got shape {tuple(a.shape)}")
        self.a = a
        self.d = a.shape[0]
        self.const = 0.0

    def value(self, m: torch.Tensor) -> float:
        return self.const + float((self.a * m).sum())

    def start(self, m: torch.Tensor) -> None:
        self.p = self.a.T @ m  # P = A^T M; M G changes columns i, j of P the same way

    def update(self, i: int, j: int, t: float) -> None:
        _rotate_columns(self.p, i, j, t)

    def line(self) -> tuple[torch.Tensor, ...]:
        diag = torch.diagonal(self.p)
        a1 = diag[:, None] + diag[None, :]  # P_ii + P_jj
        b1 = self.p - self.p.T  # P_ij - P_ji
        zero = torch.zeros_like(a1)
        return a1, b1, zero, zero


class Procrustes(Linear):
    r"""``F(M) = ||M A - B||_F^2`` for ``d x n`` matrices ``A``, ``B`` (orthogonal Procrustes), as the linear
    objective :math:`\lVert A\rVert^2 + \lVert B\rVert^2 - 2\operatorname{tr}((B A^\top)^\top M)`."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a = torch.as_tensor(a, dtype=torch.float64)
        b = torch.as_tensor(b, dtype=torch.float64)
        if a.shape != b.shape or a.dim() != 2:
            raise ValueError(f"A and B must be matrices of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        super().__init__(-2.0 * (b @ a.T))
        self.const = float(a.pow(2).sum() + b.pow(2).sum())


class Brockett(_Structured):
    r"""``F(M) = tr(M^T A M N)``, ``A`` symmetric, ``N`` diagonal (Brockett's cost; to minimize).

    With distinct eigenvalues of ``A`` and distinct diagonal of ``N``, its minimizers have the eigenvectors of
    ``A`` as columns, ordered so that large eigenvalues meet small entries of ``N``.
    """

    def __init__(self, a: torch.Tensor, n: torch.Tensor) -> None:
        a = torch.as_tensor(a, dtype=torch.float64)
        n = torch.as_tensor(n, dtype=torch.float64)
        if a.dim() != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"A must be a square matrix, got shape {tuple(a.shape)}")
        if not torch.allclose(a, a.T, atol=1e-12 * max(1.0, float(a.abs().max()))):
            raise ValueError("A must be symmetric")
        if n.dim() == 2:
            if not torch.equal(n, torch.diag(torch.diagonal(n))):
                raise ValueError("N must be diagonal (a vector of its diagonal is accepted)")
            n = torch.diagonal(n)
        if n.shape != (a.shape[0],):
            raise ValueError(f"N must have {a.shape[0]} diagonal entries, got shape {tuple(n.shape)}")
        self.a, self.n, self.d = a, n, a.shape[0]

    def value(self, m: torch.Tensor) -> float:
        return float(torch.diagonal(m.T @ self.a @ m) @ self.n)

    def start(self, m: torch.Tensor) -> None:
        self.s = m.T @ self.a @ m

    def update(self, i: int, j: int, t: float) -> None:
        _rotate_both(self.s, i, j, t)

    def line(self) -> tuple[torch.Tensor, ...]:
        sd, n = torch.diagonal(self.s), self.n
        dn = n[:, None] - n[None, :]
        a2 = dn * (sd[:, None] - sd[None, :]) / 2  # cos 2t
        b2 = dn * self.s  # sin 2t
        zero = torch.zeros_like(a2)
        # F(t) - F(0) = a2 (cos 2t - 1) + b2 sin 2t
        return zero, zero, a2, b2


@dataclass
class GivensResult:
    """Output of :func:`givens_coordinate_descent`.

    Attributes:
        pairs: ``(steps, 2)`` int64 planes, in product order.
        angles: ``(steps,)`` float64 angles; ``M == M0 @ givens_matrix(pairs, angles, d)``.
        M: the final rotation.
        history: one dict per step: ``objective`` (after the step), ``decrease``, ``grad_norm_sq`` (at the start
            of the step), ``B`` and ``bound`` (Theorem 3; ``None`` for generic callables), ``pair``, ``angle``,
            ``seconds`` (cumulative wall time).
    """

    pairs: torch.Tensor
    angles: torch.Tensor
    M: torch.Tensor
    history: list[dict[str, Any]] = field(default_factory=list)


def _check_rotation(m0: Any, d: int, dtype: torch.dtype) -> torch.Tensor:
    m = torch.as_tensor(m0, dtype=dtype).clone()
    if m.shape != (d, d):
        raise ValueError(f"M0 must have shape ({d}, {d}), got {tuple(m.shape)}")
    tol = 10 * d * torch.finfo(dtype).eps * 100
    err = float((m.T @ m - torch.eye(d, dtype=dtype)).abs().max())
    if not math.isfinite(err) or err > tol:
        raise ValueError(f"M0 must be orthogonal (max |M0^T M0 - I| <= {tol:.1e}), got {err:.3e}")
    det = float(torch.linalg.det(m))
    if det < 0:
        raise ValueError(f"M0 must have determinant +1 (a rotation), got {det:.6f}")
    return m


def _generic_value(f: Callable[[torch.Tensor], torch.Tensor], m: torch.Tensor) -> float:
    with torch.no_grad():
        v = f(m)
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        raise ValueError(f"F must return a scalar tensor, got {v!r}")
    value = float(v)
    if not math.isfinite(value):
        raise ValueError(f"F returned a non-finite value: {value}")
    return value


def _generic_line_search(f: Callable, m: torch.Tensor, i: int, j: int, starts: int) -> tuple[float, float]:
    from scipy.optimize import minimize_scalar

    def phi(t: float) -> float:
        mm = m.clone()
        _rotate_columns(mm, i, j, t)
        return _generic_value(f, mm)

    grid = [2 * math.pi * q / starts for q in range(starts)]
    vals = [phi(t) for t in grid]
    q = int(np.argmin(vals))
    h = 2 * math.pi / starts
    res = minimize_scalar(phi, bounds=(grid[q] - h, grid[q] + h), method="bounded",
                          options={"xatol": 1e-10})
    t, v = (float(res.x), float(res.fun)) if res.fun <= vals[q] else (grid[q], vals[q])
    return t % (2 * math.pi), v


def givens_coordinate_descent(
    F: _Structured | Callable[[torch.Tensor], torch.Tensor],
    M0: torch.Tensor | None = None,
    *,
    steps: int,
    d: int | None = None,
    rule: str = "exact",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    line_search_starts: int = 16,
    tol: float = 0.0,
) -> GivensResult:
    r"""Minimize ``F`` over SO(d) by appending one Givens rotation per step (Algorithm 1 and variants).

    Args:
        F: a :class:`Linear`, :class:`Procrustes` or :class:`Brockett` objective, or a torch callable
            ``M (d x d) -> scalar``.
        M0: starting rotation (orthogonal, determinant +1); default the identity.
        steps: number of rotations appended (>= 0).
        d: dimension (>= 2); taken from ``M0`` or a structured ``F`` when omitted.
        rule: ``"exact"``, ``"gradient"`` or ``"random"`` (see the module docstring).
        generator: CPU generator for ``rule="random"``.
        dtype: working dtype (float64 by default).
        line_search_starts: grid points of the one-dimensional search for generic callables.
        tol: stop early once the squared Riemannian gradient norm falls below ``tol``.

    Returns:
        A :class:`GivensResult`; ``M == M0 @ givens_matrix(pairs, angles, d)``.

    Example:
        >>> a = torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))
        >>> res = givens_coordinate_descent(Brockett(a, torch.tensor([1.0, 2.0, 3.0])), d=3, steps=10)
        >>> round(res.history[-1]["objective"], 6)  # sum of eigenvalues x reversed weights: 3*1+2*2+1*3
        10.0
    """
    rule = check_choice("rule", rule, RULES)
    steps = check_int("steps", steps, minimum=0)
    line_search_starts = check_int("line_search_starts", line_search_starts, minimum=2)
    structured = isinstance(F, _Structured)
    if not structured and not callable(F):
        raise TypeError(f"F must be a Linear/Procrustes/Brockett objective or a callable, got {type(F).__name__}")
    # one of the two views below is used, as ``structured`` says
    obj = cast(_Structured, F)
    fn = cast(Callable[[torch.Tensor], torch.Tensor], F)
    if d is None:
        d = obj.d if structured else (int(torch.as_tensor(M0).shape[0]) if M0 is not None else None)
        if d is None:
            raise ValueError("d must be given when F is a callable and M0 is None")
    d = check_int("d", d, minimum=2)
    if structured and obj.d != d:
        raise ValueError(f"the objective acts on dimension {obj.d}, got d={d}")
    m = _check_rotation(M0, d, dtype) if M0 is not None else torch.eye(d, dtype=dtype)
    iu = torch.triu_indices(d, d, offset=1)
    pairs, angles, history = [], [], []
    t0 = time.perf_counter()
    if structured:
        obj.start(m)
        value = obj.value(m)
    else:
        value = _generic_value(fn, m)
    for _ in range(steps):
        bound = b_meas = None
        if structured:
            a1, b1, a2, b2 = obj.line()
            g = b1 + 2 * b2  # derivative at t = 0
            grad_sq = float(2 * g[iu[0], iu[1]].pow(2).sum())
            amp1 = torch.sqrt(a1**2 + b1**2)
            amp2 = torch.sqrt(a2**2 + b2**2)
            b_meas = float((amp1 + 4 * amp2)[iu[0], iu[1]].max()) if d > 1 else 0.0
            bound = grad_sq / (2 * d * (d - 1) * b_meas) if b_meas > 0 else 0.0
            if rule == "exact":
                # best achievable decrease per pair; exact for degree-1 and for pure degree-2 polynomials
                gain = torch.where(amp2 > 0, amp2 + a2, amp1 + a1)[iu[0], iu[1]]
                q = int(torch.argmax(gain))
            elif rule == "gradient":
                q = int(torch.argmax(g[iu[0], iu[1]].abs()))
            else:
                q = int(torch.randint(0, iu.shape[1], (1,), generator=generator))
            i, j = int(iu[0, q]), int(iu[1, q])
            t = minimize_trig(float(a1[i, j]), float(b1[i, j]), float(a2[i, j]), float(b2[i, j]))
        else:
            mm = m.clone().requires_grad_(True)
            out = fn(mm)
            if not isinstance(out, torch.Tensor) or out.numel() != 1:
                raise ValueError(f"F must return a scalar tensor, got {out!r}")
            (egrad,) = torch.autograd.grad(out.reshape(()), mm)
            qm = m.T @ egrad
            g = qm.T - qm  # g[i, j] = Q_ji - Q_ij
            grad_sq = float(2 * g[iu[0], iu[1]].pow(2).sum())
            if rule == "exact":
                best: tuple[int, float, float] | None = None
                for q in range(iu.shape[1]):
                    ti, vi = _generic_line_search(fn, m, int(iu[0, q]), int(iu[1, q]), line_search_starts)
                    if best is None or vi < best[2]:
                        best = (q, ti, vi)
                assert best is not None  # d >= 2: at least one pair
                q, t = best[0], best[1]
            else:
                if rule == "gradient":
                    q = int(torch.argmax(g[iu[0], iu[1]].abs()))
                else:
                    q = int(torch.randint(0, iu.shape[1], (1,), generator=generator))
                t, _ = _generic_line_search(fn, m, int(iu[0, q]), int(iu[1, q]), line_search_starts)
            i, j = int(iu[0, q]), int(iu[1, q])
        if tol > 0 and grad_sq < tol:
            break
        _rotate_columns(m, i, j, t)
        if structured:
            obj.update(i, j, t)
            new_value = value + _trig_delta(obj, i, j, t, a1, b1, a2, b2)  # O(1), no O(d^3) re-evaluation
        else:
            new_value = _generic_value(fn, m)
        pairs.append((i, j))
        angles.append(t)
        history.append({"step": len(pairs), "objective": new_value, "decrease": value - new_value,
                        "grad_norm_sq": grad_sq, "B": b_meas, "bound": bound, "pair": (i, j), "angle": t,
                        "seconds": time.perf_counter() - t0})
        value = new_value
    if structured and history:  # re-synchronize the last value exactly
        history[-1]["objective"] = obj.value(m)
    pairs_t = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return GivensResult(pairs=pairs_t, angles=torch.tensor(angles, dtype=torch.float64), M=m, history=history)


def _trig_delta(F: _Structured, i: int, j: int, t: float, a1, b1, a2, b2) -> float:
    """``F(M G(t)) - F(M)`` from the line coefficients (O(1); avoids an O(d^3) re-evaluation)."""
    return float(a1[i, j] * (math.cos(t) - 1) + b1[i, j] * math.sin(t) + a2[i, j] * (math.cos(2 * t) - 1)
                 + b2[i, j] * math.sin(2 * t))
