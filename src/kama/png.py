r"""Pointwise nonlinear Gaussian (PNG) kernels, exactly (paper section 4, Definition 2).

.. math::
    K_f(x, y) = \mathbb{E}_{g \sim N(0, I_d)}\big[f(g^\top x)\, f(g^\top y)\big].

Closed forms (``theta`` is the angle between ``x`` and ``y``):

* ``angular``, f = sign: :math:`1 - 2\theta/\pi` (the paper's convention);
* ``arccos0``, f = Heaviside ``1[u > 0]``: :math:`(\pi - \theta) / (2\pi)`;
* ``arccos1``, f = ReLU: :math:`\lVert x\rVert \lVert y\rVert (\sin\theta + (\pi - \theta)\cos\theta)/(2\pi)`;
* ``arccos2``, f = ReLU squared:
  :math:`\lVert x\rVert^2 \lVert y\rVert^2 (3\sin\theta\cos\theta + (\pi - \theta)(1 + 2\cos^2\theta))/(2\pi)`;
* ``rbf``, f = (cos, sin) of :math:`\sqrt{2\gamma}\,u`: :math:`\exp(-\gamma \lVert x - y\rVert^2)`.

The arc-cosine kernels are Cho and Saul's :math:`k_n / 2`. The older angular convention ``1 - theta / pi``
(``variant="classic"``, the probability that two signs agree) equals ``(1 + K) / 2``.

Zero vectors: the angle is undefined but the PNG kernel is not: :math:`K(0, y) = f(0)\, E[f(g^\top y)]`,
which is 0 for every built-in f (``sign(0) = relu(0) = 1[0 > 0] = 0``); the closed forms return that value
(and ``1/2`` for the classic variant), never NaN.

Any other f: :func:`png_kernel_quadrature`, exact up to quadrature error: polar coordinates for the
bivariate normal :math:`(g^\top x, g^\top y)`, Gauss-Laguerre in :math:`t = r^2 / 2` and Gauss-Legendre in
the angle on the arcs between the sign changes of the two arguments (where f may have a kink or a jump).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ._checks import check_choice, check_int

__all__ = ["KERNELS", "png_kernel", "png_kernel_quadrature", "angles_between", "feature_function"]

KERNELS: tuple[str, ...] = ("angular", "arccos0", "arccos1", "arccos2", "rbf")


def _as_2d(name: str, a: object) -> torch.Tensor:
    t = torch.as_tensor(a, dtype=torch.float64)
    if t.dim() == 1:
        t = t[None, :]
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (n, d) or (d,), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must contain only finite values")
    return t


def angles_between(X: object, Y: object | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Angles between every row of ``X`` and of ``Y`` (float64), with the row norms.

    Returns:
        ``(theta (n, m), |x| (n,), |y| (m,))``; ``theta`` is ``pi / 2`` where a row is zero (unused).
    """
    X = _as_2d("X", X)
    Y = X if Y is None else _as_2d("Y", Y)
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"X and Y must have the same number of columns, got {X.shape[1]} and {Y.shape[1]}")
    nx, ny = X.norm(dim=1), Y.norm(dim=1)
    denom = nx[:, None] * ny[None, :]
    cos = torch.where(denom > 0, (X @ Y.T) / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return torch.arccos(cos.clamp(-1.0, 1.0)), nx, ny


def png_kernel(
    X: object, Y: object | None = None, kernel: str = "angular", *, variant: str = "paper", gamma: float = 1.0
) -> torch.Tensor:
    r"""The exact PNG kernel matrix ``K[i, j] = K_f(X[i], Y[j])`` for a named kernel (float64).

    Args:
        X: ``(n, d)`` (or ``(d,)``) points; Y: ``(m, d)`` points, default ``X``.
        kernel: one of :data:`KERNELS`.
        variant: for ``angular`` only: ``"paper"`` (``1 - 2 theta / pi``) or ``"classic"`` (``1 - theta/pi``).
        gamma: for ``rbf``: :math:`\exp(-\gamma \lVert x - y \rVert^2)`.

    Shape:
        Output: ``(n, m)``.

    Example:
        >>> png_kernel([[1.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]])
        tensor([[0.0000, 0.5000]], dtype=torch.float64)
    """
    kernel = check_choice("kernel", kernel, KERNELS)
    variant = check_choice("variant", variant, ("paper", "classic"))
    if kernel == "rbf":
        if not (isinstance(gamma, (int, float)) and gamma > 0):
            raise ValueError(f"gamma must be a positive number, got {gamma!r}")
        X = _as_2d("X", X)
        Y = X if Y is None else _as_2d("Y", Y)
        if X.shape[1] != Y.shape[1]:
            raise ValueError(f"X and Y must have the same number of columns, got {X.shape[1]} and {Y.shape[1]}")
        return torch.exp(-gamma * torch.cdist(X, Y).pow(2))
    theta, nx, ny = angles_between(X, Y)
    zero = (nx[:, None] == 0) | (ny[None, :] == 0)
    pi = math.pi
    if kernel == "angular":
        k = 1 - 2 * theta / pi
        k = torch.where(zero, torch.zeros_like(k), k)
        return (1 + k) / 2 if variant == "classic" else k
    if kernel == "arccos0":
        return torch.where(zero, torch.zeros_like(theta), (pi - theta) / (2 * pi))
    c, s = torch.cos(theta), torch.sin(theta)
    if kernel == "arccos1":
        return nx[:, None] * ny[None, :] * (s + (pi - theta) * c) / (2 * pi)
    return (nx[:, None] * ny[None, :]) ** 2 * (3 * s * c + (pi - theta) * (1 + 2 * c * c)) / (2 * pi)


def _heaviside(u: torch.Tensor) -> torch.Tensor:
    return (u > 0).to(u.dtype)


def _relu_squared(u: torch.Tensor) -> torch.Tensor:
    return torch.relu(u).square()


class _CosSin:
    """``u -> [cos(c u), sin(c u)]`` (a class, not a closure, so that fitted transformers pickle)."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.cos(self.scale * u), torch.sin(self.scale * u)], dim=-1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _CosSin) and other.scale == self.scale

    def __hash__(self) -> int:
        return hash(("cos-sin", self.scale))

    def __repr__(self) -> str:
        return f"cos_sin(scale={self.scale!r})"


def feature_function(kernel: str, gamma: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""The f of a named kernel, applied to projections ``u = W x`` (``(..., m) -> (..., m')``).

    For ``rbf`` it returns ``[cos(c u), sin(c u)]`` with :math:`c = \sqrt{2\gamma}` (``m' = 2m``), whose inner
    products average to the Gaussian kernel. Every returned function is picklable.

    Example:
        >>> import pickle
        >>> f = pickle.loads(pickle.dumps(feature_function("rbf", gamma=0.5)))
        >>> f(torch.zeros(1, 2))
        tensor([[1., 1., 0., 0.]])
    """
    kernel = check_choice("kernel", kernel, KERNELS)
    if kernel == "angular":
        return torch.sign
    if kernel == "arccos0":
        return _heaviside
    if kernel == "arccos1":
        return torch.relu
    if kernel == "arccos2":
        return _relu_squared
    return _CosSin(math.sqrt(2.0 * gamma))


def png_kernel_quadrature(
    f: Callable[[torch.Tensor], torch.Tensor],
    X: object,
    Y: object | None = None,
    *,
    radial_nodes: int = 64,
    angular_nodes: int = 48,
) -> torch.Tensor:
    r"""``K_f(x, y)`` for any scalar function ``f`` by two-dimensional quadrature (float64).

    With :math:`(g^\top x, g^\top y) = (\lVert x\rVert r\cos\phi,\ \lVert y\rVert r\cos(\phi - \theta))` for a
    standard normal in polar coordinates and :math:`t = r^2/2`,

    .. math::
        K_f = \frac{1}{2\pi}\int_0^{2\pi}\!\!\int_0^\infty e^{-t}\,
        f\big(\lVert x\rVert \sqrt{2t}\cos\phi\big)\, f\big(\lVert y\rVert \sqrt{2t}\cos(\phi-\theta)\big)\,dt\,d\phi .

    The angle integral is split at the four zeros of the two cosines, so f may jump or kink at 0 (sign,
    Heaviside, ReLU^n) and the rule stays exact for those (agreement with the closed forms to ~1e-12).

    Args:
        f: vectorized torch function, float64 tensor to float64 tensor of the same shape.
        X, Y: points as in :func:`png_kernel`.
        radial_nodes, angular_nodes: Gauss-Laguerre nodes in ``t``; Gauss-Legendre nodes per arc.

    Example:
        >>> q = png_kernel_quadrature(torch.sign, [[1.0, 0.0]], [[1.0, 1.0]])
        >>> round(float(q), 10)
        0.5
    """
    radial_nodes = check_int("radial_nodes", radial_nodes, minimum=1)
    angular_nodes = check_int("angular_nodes", angular_nodes, minimum=1)
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    theta, nx, ny = angles_between(X, Y)
    n, m = theta.shape
    t_nodes, t_w = np.polynomial.laguerre.laggauss(radial_nodes)
    l_nodes, l_w = np.polynomial.legendre.leggauss(angular_nodes)
    r = torch.as_tensor(np.sqrt(2 * t_nodes))  # (R,)
    wr = torch.as_tensor(t_w)
    ln = torch.as_tensor(l_nodes)
    lw = torch.as_tensor(l_w)
    out = torch.empty(n, m, dtype=torch.float64)
    for i in range(n):
        th = theta[i]  # (m,)
        # Break points of cos(phi) and cos(phi - theta) on [0, 2 pi), sorted per column.
        half = math.pi / 2
        bps = torch.stack([torch.full_like(th, half), torch.full_like(th, 3 * half),
                           torch.remainder(th + half, 2 * math.pi), torch.remainder(th + 3 * half, 2 * math.pi)], 1)
        bps = torch.cat([torch.zeros(m, 1, dtype=torch.float64), bps.sort(dim=1).values,
                         torch.full((m, 1), 2 * math.pi, dtype=torch.float64)], 1)  # (m, 6)
        a, b = bps[:, :-1], bps[:, 1:]  # (m, 5) arcs
        phi = (a[..., None] + b[..., None]) / 2 + (b - a)[..., None] / 2 * ln  # (m, 5, Q)
        wphi = (b - a)[..., None] / 2 * lw  # (m, 5, Q)
        u = nx[i] * r[:, None, None, None] * torch.cos(phi)[None]  # (R, m, 5, Q)
        v = ny[None, :, None, None] * r[:, None, None, None] * torch.cos(phi - th[:, None, None])[None]
        vals = f(u) * f(v)
        out[i] = torch.einsum("r,rmaq,maq->m", wr, vals, wphi) / (2 * math.pi)
    return out
