r"""Random matrices and random-feature estimators of PNG kernels (paper section 4, 6.1).

Four samplers of an ``m x d`` random matrix ``W``, one interface (:class:`RandomMatrix`): each draws on the
CPU from an explicit generator (in float64, in a fixed order, then casts and moves) and applies itself to a
batch in its natural fast form, :math:`X W^\top`:

* :class:`GaussianMatrix` (URN): i.i.d. :math:`N(0, 1)` entries; ``O(m d)`` per vector.
* :class:`OrthogonalMatrix` (ORN): ``d x d`` blocks, a Gaussian orthogonalized by QR with the sign fix (Haar),
  rows renormalized by independent :math:`\chi(d)` norms; ``O(m d)`` per vector.
* :class:`HadamardMatrix` (HORN): ``p x p`` blocks (``p``: ``d`` rounded up to a power of two)
  :math:`H D_3 H D_2 H D_1` with normalized Walsh-Hadamard ``H`` and random sign diagonals ``D``, applied by
  the fast Walsh-Hadamard transform in ``O(p log p)``; the rows restricted to the ``d`` input coordinates
  are renormalized to :math:`\chi(d)` norms. Its rows are not exactly Gaussian (a discrete sign
  structure), so its estimators are only asymptotically unbiased (measured max bias of the angular kernel:
  0.03 at d = 8, within noise at d >= 32).
* :class:`KamaMatrix` (KRN): ``d x d`` blocks, Kac's walk :math:`G_1 \cdots G_k` with
  ``k = ceil(c d ln d)`` (``c = 5``) i.i.d. random Givens rotations, rows renormalized by :math:`\chi(d)`,
  applied through :func:`kama.givens_apply` in ``O(k)`` per vector without forming the matrix.

More features than ``d``: independent blocks, each row marginally like a Gaussian row (so estimators stay
unbiased); fewer: the first ``m`` rows (the KAMA truncation).

An estimator of :math:`K_f(x, y) = E[f(g^\top x) f(g^\top y)]` is the inner product of the feature maps
:math:`\phi(x) = f(W x) / \sqrt{m}` (:func:`feature_map`, :func:`estimate_kernel`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch

from ._checks import check_choice, check_int
from .ops import GivensPlan, blocked_pairs, givens_apply, givens_apply_scaled, random_angles, random_pairs
from .ops.blocked import BLOCK

__all__ = [
    "SAMPLERS",
    "RandomMatrix",
    "GaussianMatrix",
    "OrthogonalMatrix",
    "HadamardMatrix",
    "KamaMatrix",
    "BlockedKamaMatrix",
    "random_matrix",
    "chi_norms",
    "fwht",
    "feature_map",
    "estimate_kernel",
]

SAMPLERS: tuple[str, ...] = ("gaussian", "orthogonal", "hadamard", "kama", "kama_blocked")


def chi_norms(d: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""``n`` independent samples of :math:`\chi(d)`, the norm of a ``d``-dimensional standard Gaussian (float64).

    Drawn as square roots of chi-square variates (``O(n)``, not ``O(n d)``), from a NumPy generator seeded by
    one draw of ``generator``.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.from_numpy(np.sqrt(np.random.default_rng(seed).chisquare(d, size=n)))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized fast Walsh-Hadamard transform along the last dimension (a power of two), ``H / sqrt(p)``.

    Example:
        >>> fwht(torch.tensor([1.0, 0.0]))
        tensor([0.7071, 0.7071])
    """
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"the last dimension must be a power of two, got {p}")
    lead = x.shape[:-1]
    y = x.reshape(-1, p)
    h = 1
    while h < p:
        y = y.view(-1, p // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack([a + b, a - b], dim=2)
        h *= 2
    return (y.reshape(*lead, p) / math.sqrt(p)) if p > 1 else y.reshape(*lead, p)


class RandomMatrix(ABC):
    """An ``m x d`` random matrix that applies itself to batches in its natural fast form.

    Args:
        d: input dimension.
        m: number of rows (features).
        generator: CPU ``torch.Generator`` (``None``: the global RNG).
        dtype, device: of the stored matrix and of the computation.

    Attributes:
        name, d, m, dtype, device.
    """

    name = "base"

    def __init__(
        self,
        d: int,
        m: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.d = check_int("d", d, minimum=1)
        self.m = check_int("m", m, minimum=1)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    @abstractmethod
    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """``X @ W.T``: ``(..., d) -> (..., m)``."""

    def to_dense(self) -> torch.Tensor:
        """The ``(m, d)`` matrix (by applying the operator to the identity)."""
        return self.apply(torch.eye(self.d, dtype=self.dtype, device=self.device)).T

    def _check(self, X: torch.Tensor) -> torch.Tensor:
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
        if X.shape[-1] != self.d:
            raise ValueError(f"X must have last dimension d={self.d}, got shape {tuple(X.shape)}")
        return X.to(dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d={self.d}, m={self.m})"


class GaussianMatrix(RandomMatrix):
    """URN: i.i.d. standard Gaussian entries.

    Example:
        >>> GaussianMatrix(3, 5, generator=torch.Generator().manual_seed(0)).apply(torch.ones(2, 3)).shape
        torch.Size([2, 5])
    """

    name = "gaussian"

    def __init__(self, d: int, m: int, **kw) -> None:
        super().__init__(d, m, **kw)
        g = kw.get("generator")
        self.weight = torch.randn(self.m, self.d, generator=g, dtype=torch.float64).to(self.dtype).to(self.device)

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        return self._check(X) @ self.weight.T


class OrthogonalMatrix(RandomMatrix):
    """ORN: Haar-orthogonal ``d x d`` blocks (QR with the sign fix), rows renormalized by chi(d)."""

    name = "orthogonal"

    def __init__(self, d: int, m: int, **kw) -> None:
        super().__init__(d, m, **kw)
        g = kw.get("generator")
        blocks = []
        for _ in range(math.ceil(self.m / self.d)):
            q, r = torch.linalg.qr(torch.randn(self.d, self.d, generator=g, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))[None, :]
            blocks.append(q.T * chi_norms(self.d, self.d, g)[:, None])
        self.weight = torch.cat(blocks)[: self.m].to(self.dtype).to(self.device)

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        return self._check(X) @ self.weight.T


class HadamardMatrix(RandomMatrix):
    """HORN: ``H D3 H D2 H D1`` blocks (normalized Walsh-Hadamard, random signs) on ``d`` zero-padded to the next
    power of two ``p``; the rows restricted to the ``d`` input coordinates are renormalized to chi(d) norms.
    Rows within a block are exactly orthogonal when ``d`` is a power of two."""

    name = "hadamard"

    def __init__(self, d: int, m: int, **kw) -> None:
        super().__init__(d, m, **kw)
        g = kw.get("generator")
        self.p = 1 << max(0, (self.d - 1).bit_length())
        self.blocks = math.ceil(self.m / self.p)
        eye = torch.eye(self.d, dtype=torch.float64)
        signs, norms = [], []
        for _ in range(self.blocks):
            # With padding, a row may vanish on the d input coordinates (a useless, zero feature): redraw the
            # block's signs in that case (rare; never when d is a power of two).
            for _attempt in range(100):
                s_b = torch.randint(0, 2, (1, 3, self.p), generator=g).to(torch.float64) * 2 - 1
                n_b = self._transform(eye, s_b).norm(dim=0)  # (p,) norms of the (p x d) restriction
                if float(n_b.min()) > 1e-6:
                    break
            signs.append(s_b)
            norms.append(n_b)
        signs_t = torch.cat(signs)
        self.signs = signs_t.to(self.dtype).to(self.device)
        chi = chi_norms(self.d, self.blocks * self.p, g)
        self.row_scale = (chi / torch.cat(norms)).to(self.dtype).to(self.device)

    def _transform(self, X: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        lead = X.shape[:-1]
        x = torch.nn.functional.pad(X, (0, self.p - self.d))[..., None, :]  # (..., 1, p)
        for j in range(3):
            x = fwht(x * signs[:, j, :])  # broadcast over blocks: (..., blocks, p)
        return x.reshape(*lead, signs.shape[0] * self.p)

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        X = self._check(X)
        return (self._transform(X, self.signs) * self.row_scale)[..., : self.m]


class KamaMatrix(RandomMatrix):
    """KRN: ``d x d`` blocks of Kac's walk with ``num_rotations`` i.i.d. random Givens rotations (default
    ``ceil(c d ln d)``, ``c = 5``), rows renormalized by chi(d), applied by :func:`kama.givens_apply`.

    Example:
        >>> w = KamaMatrix(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to_dense()
        >>> g = w @ w.T
        >>> bool(torch.allclose(g, torch.diag(torch.diagonal(g))))
        True
    """

    name = "kama"

    def __init__(self, d: int, m: int, *, num_rotations: int | None = None, c: float = 5.0, **kw) -> None:
        super().__init__(d, m, **kw)
        g = kw.get("generator")
        if num_rotations is None:
            if not (isinstance(c, (int, float)) and c > 0):
                raise ValueError(f"c must be a positive number, got {c!r}")
            num_rotations = math.ceil(c * self.d * math.log(self.d)) if self.d > 1 else 0
        self.num_rotations = check_int("num_rotations", num_rotations, minimum=0)
        if self.d < 2 and self.num_rotations > 0:
            raise ValueError(f"num_rotations must be 0 when d == 1, got {self.num_rotations}")
        self.plans: list[GivensPlan] = []
        self.angles: list[torch.Tensor] = []
        scales = []
        for _ in range(math.ceil(self.m / self.d)):
            pairs = self._pairs(g)
            self.plans.append(GivensPlan(pairs, self.d))
            self.angles.append(random_angles(self.num_rotations, generator=g, dtype=torch.float64)
                               .to(self.dtype).to(self.device))
            scales.append(chi_norms(self.d, self.d, g))
        self.row_scale = torch.cat(scales)[: self.m].to(self.dtype).to(self.device)

    def _pairs(self, generator: torch.Generator | None) -> torch.Tensor:
        return random_pairs(self.d, self.num_rotations, generator=generator)

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        X = self._check(X)
        outs = []
        left = self.m
        for b, (plan, angles) in enumerate(zip(self.plans, self.angles, strict=True)):
            scale = self.row_scale[b * self.d : (b + 1) * self.d]
            if scale.numel() < self.d:  # truncated last block: scale the kept rows only
                outs.append(givens_apply(X, plan, angles)[..., : scale.numel()] * scale)
            else:
                outs.append(givens_apply_scaled(X, plan, angles, scale))  # scaling fused in the kernel
            left -= self.d
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class BlockedKamaMatrix(RandomMatrix):
    r"""KRN with register-blocked planes (:func:`kama.ops.blocked_pairs`: groups of 12 butterfly rotations on 8
    coordinates, a random permutation per phase) instead of Kac's i.i.d. ones, the same ``k`` (default
    ``ceil(c p ln p)``) and the same :math:`\chi(d)` row norms.

    The rotations act on ``p = max(d, 8)`` coordinates: below 8 inputs the input is zero-padded (a group needs 8
    coordinates) and, as for HORN, each row restricted to the ``d`` input coordinates is renormalized to a
    :math:`\chi(d)` norm. Blocks of ``p`` rows are stacked until ``m`` rows.

    Example:
        >>> w = BlockedKamaMatrix(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> w.to_dense().shape
        torch.Size([5, 3])
    """

    name = "kama_blocked"

    def __init__(self, d: int, m: int, *, num_rotations: int | None = None, c: float = 5.0, **kw) -> None:
        super().__init__(d, m, **kw)
        g = kw.get("generator")
        self.p = max(self.d, BLOCK)
        if num_rotations is None:
            if not (isinstance(c, (int, float)) and c > 0):
                raise ValueError(f"c must be a positive number, got {c!r}")
            num_rotations = math.ceil(c * self.p * math.log(self.p))
        self.num_rotations = check_int("num_rotations", num_rotations, minimum=0)
        self.plans: list[GivensPlan] = []
        self.angles: list[torch.Tensor] = []
        scales = []
        padded = self.p > self.d
        eye = torch.nn.functional.pad(torch.eye(self.d, dtype=torch.float64), (0, self.p - self.d)) if padded \
            else None
        for _ in range(math.ceil(self.m / self.p)):
            # A row of a padded block may nearly vanish on the d inputs (a useless feature): redraw that block.
            # Unpadded blocks are orthogonal on all d inputs: their rows have norm 1, nothing to check.
            norms = None
            for _attempt in range(100):
                plan = GivensPlan(blocked_pairs(self.p, self.num_rotations, generator=g), self.p)
                angles = random_angles(self.num_rotations, generator=g, dtype=torch.float64)
                if eye is None:
                    break
                norms = givens_apply(eye, plan, angles).norm(dim=0)  # (p,) norms of the rows' restrictions
                if float(norms.min()) > 1e-6:
                    break
            self.plans.append(plan)
            self.angles.append(angles.to(self.dtype).to(self.device))
            chi = chi_norms(self.d, self.p, g)
            scales.append(chi if norms is None else chi / norms)
        self.row_scale = torch.cat(scales)[: self.m].to(self.dtype).to(self.device)

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        X = self._check(X)
        if self.p > self.d:
            X = torch.nn.functional.pad(X, (0, self.p - self.d))
        outs = []
        for b, (plan, angles) in enumerate(zip(self.plans, self.angles, strict=True)):
            scale = self.row_scale[b * self.p : (b + 1) * self.p]
            if scale.numel() < self.p:  # truncated last block: scale the kept rows only
                outs.append(givens_apply(X, plan, angles)[..., : scale.numel()] * scale)
            else:
                outs.append(givens_apply_scaled(X, plan, angles, scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


_CLASSES: dict[str, type[RandomMatrix]] = {
    "gaussian": GaussianMatrix,
    "orthogonal": OrthogonalMatrix,
    "hadamard": HadamardMatrix,
    "kama": KamaMatrix,
    "kama_blocked": BlockedKamaMatrix,
}


def random_matrix(sampler: str, d: int, m: int, **kw) -> RandomMatrix:
    """Build a random matrix by name (one of :data:`SAMPLERS`); ``kw`` go to its constructor.

    Example:
        >>> random_matrix("kama", 4, 6, generator=torch.Generator().manual_seed(0))
        KamaMatrix(d=4, m=6)
    """
    sampler = check_choice("sampler", sampler, SAMPLERS)
    if not sampler.startswith("kama") and kw.get("num_rotations") is not None:
        raise ValueError(f"num_rotations applies to the 'kama' samplers only, got sampler={sampler!r}")
    if not sampler.startswith("kama"):
        kw.pop("num_rotations", None)
    return _CLASSES[sampler](d, m, **kw)


def feature_map(X: torch.Tensor, matrix: RandomMatrix, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    r"""Random features :math:`\phi(X) = f(X W^\top) / \sqrt{m}`.

    Shape:
        X: ``(n, d)``; output: ``(n, m')`` (``m' = m`` for scalar f, ``2m`` for the rbf pair).
    """
    return f(matrix.apply(X)) / math.sqrt(matrix.m)


def estimate_kernel(
    X: torch.Tensor, Y: torch.Tensor | None, matrix: RandomMatrix, f: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    r"""The random-feature estimate :math:`\hat K = \phi(X) \phi(Y)^\top` of :math:`K_f`.

    Example:
        >>> x = torch.randn(3, 16)
        >>> k = estimate_kernel(x, None, KamaMatrix(16, 64), torch.sign)
        >>> k.shape, bool(torch.allclose(torch.diagonal(k), torch.ones(3)))
        (torch.Size([3, 3]), True)
    """
    px = feature_map(X, matrix, f)
    py = px if Y is None else feature_map(Y, matrix, f)
    return px @ py.T
