r"""Structured linear layers: :class:`KamaLinear` (products of Givens rotations) and :class:`ToeplitzLinear`.

Both honour the ``torch.nn.Linear`` contract: ``(in_features, out_features, bias=True, *, device=None,
dtype=None)``, parameters created empty and filled by ``reset_parameters()``, ``extra_repr()``, a
``state_dict`` round trip, and ``to_dense()`` returning the ``(out_features, in_features)`` weight ``W``
with ``layer(x) == x @ W.T + bias``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ._checks import FLOAT_DTYPES, check_choice, check_int, check_real
from .ops import (
    GivensPlan,
    angle_sensitivities,
    dead_rotations,
    default_num_rotations,
    random_angles,
    random_live_pairs,
    random_pairs,
)
from .ops.linear import LinearCache, kama_linear, kama_weight
from .planes import PlaneSelector

__all__ = ["KamaLinear", "ToeplitzLinear", "to_linear", "dense_step_gain", "ANGLE_GAINS", "PLANE_SAMPLERS",
           "DEFAULT_ANGLE_GAIN", "DEFAULT_PLANE_SAMPLER", "PAPER_SETTINGS", "check_angle_gain"]

ANGLE_GAINS: tuple[str, ...] = ("dense",)
"""Named rules for ``KamaLinear(angle_gain=...)`` (a positive float is accepted too)."""

PLANE_SAMPLERS: tuple[str, ...] = ("iid", "live")
"""Values of ``KamaLinear(plane_sampler=...)``."""

DEFAULT_ANGLE_GAIN: float | str = 1.0
"""Default ``angle_gain`` of :class:`KamaLinear` and of the KAMA layers of :mod:`kama.rl`."""

DEFAULT_PLANE_SAMPLER: str = "live"
"""Default ``plane_sampler`` of :class:`KamaLinear` and of the KAMA layers of :mod:`kama.rl`."""

PAPER_SETTINGS: dict[str, float | str] = {"angle_gain": 1.0, "plane_sampler": "iid"}
"""The paper's parametrization of a learned KAMA layer (``KamaLinear(**PAPER_SETTINGS)``): angles in radians and
i.i.d. planes."""


def check_angle_gain(angle_gain: object) -> float | str:
    """``angle_gain`` validated: a rule of :data:`ANGLE_GAINS` (returned as is) or a positive finite number
    (returned as ``float``); else a ``ValueError`` / ``TypeError`` naming the argument.

    Example:
        >>> check_angle_gain("dense"), check_angle_gain(2)
        ('dense', 2.0)
    """
    if isinstance(angle_gain, str):
        return check_choice("angle_gain", angle_gain, ANGLE_GAINS)
    return check_real("angle_gain", angle_gain, minimum=0.0, strict_minimum=True)


def dense_step_gain(pairs: torch.Tensor, angles: torch.Tensor, in_features: int, out_features: int,
                    scale: float) -> float:
    r"""The angle gain ``g`` with which one unit step of every parameter of a :class:`KamaLinear` moves its weight
    as far as one step of every weight moves a dense layer of the same shape (Frobenius norm, steps of random
    signs, as Adam's first steps are):

    .. math::
        g^2\, s^2 \sum_r \lVert \partial M_{\mathrm{kept}} / \partial t_r \rVert_F^2 + \min(d_1, d_2)
        = d_1 d_2,

    where the ``min(d1, d2)`` scalars (each moving a unit-norm row or column of the kept block) contribute
    their part and the angles the rest. 1 when the layer has no live rotation.

    Args:
        pairs, angles: the planes and initial angles (radians) of the ``n x n`` product, ``n = max(d1, d2)``.
        in_features, out_features: ``d2``, ``d1``.
        scale: the initial value of every scalar.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> p = random_pairs(64, 200, generator=g)
        >>> round(dense_step_gain(p, random_angles(200, generator=g, dtype=torch.float64), 64, 64, 1.0), 2)
        3.17
    """
    n = max(in_features, out_features)
    sens = float(angle_sensitivities(pairs, angles.to(torch.float64), n, inputs=in_features,
                                     outputs=out_features).sum())
    budget = in_features * out_features - min(in_features, out_features)
    if sens <= 0.0 or budget <= 0 or scale == 0.0:
        return 1.0
    return math.sqrt(budget / (scale * scale * sens))


def _check_dtype(dtype: object) -> torch.dtype | None:
    """A layer's ``dtype``: ``None`` (the default dtype) or a real floating dtype (a rotation's angles, scalars
    and outputs are real; complex dtypes would silently drop imaginary parts)."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES):
        raise TypeError(f"dtype must be None or one of {[str(t) for t in FLOAT_DTYPES]}, got {dtype!r}")
    return dtype


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator | None) -> torch.Tensor:
    """U(-bound, bound) drawn in float64 on the CPU (same values on every device and dtype)."""
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


class KamaLinear(nn.Module):
    r"""A linear layer whose weight is a truncated, renormalized product of ``k`` Givens rotations.

    With ``n = max(in_features, out_features)`` and :math:`M = G_1 \cdots G_k \in SO(n)` (see
    :func:`kama.givens_apply` for the convention), the weight is

    .. math::
        W = \operatorname{diag}(s)\, M_{[:d_1, :]} \quad (d_1 \le d_2), \qquad
        W = M_{[:, :d_2]} \operatorname{diag}(s) \quad (d_1 > d_2),

    where ``d1 = out_features``, ``d2 = in_features`` and ``s`` holds ``min(d1, d2)`` learned
    renormalization scalars (the paper's section 2). The forward pass never forms ``W``: it zero-pads the
    input to ``n``, applies the ``k`` rotations in ``O(k)`` per vector and drops the extra outputs.

    Parameters are the ``k`` angles (a buffer when ``learn_angles=False``), the scalars and the bias. The
    planes ``pairs`` are a buffer: coordinate pairs of Kac's walk drawn at initialization (see Planes below).

    Initialization: angles uniform on ``[0, 2 pi)`` (a Kac-walk random rotation), scalars
    :math:`s = \sqrt{n / (3\, d_2)}` and bias :math:`U(-1/\sqrt{d_2}, 1/\sqrt{d_2})`. For a well-mixed
    ``M`` every output then has :math:`E[y_i^2] = \lVert x \rVert^2 / (3 d_2)` (plus the bias), the same second
    moment as ``nn.Linear``'s default (Kaiming-uniform with ``a = sqrt(5)``).

    Step size (``angle_gain``). The rotation angles are :math:`t = g\,\theta` with :math:`\theta` the ``angles``
    parameter and ``g`` a constant of the layer (:attr:`angle_gain`). Under Adam-type optimizers every parameter
    moves by about the learning rate per step, so an angle's step changes ``W`` by about
    :math:`g\,\mathrm{lr}\,\lVert \partial W / \partial t_r\rVert`, which is proportional to the scalars ``s``:
    with ``g = 1`` (the paper's parametrization) a layer whose scalars start small (a policy head at SB3's gain
    0.01) barely moves its angles. ``angle_gain="dense"`` sets ``g`` at initialization so that one step of
    every parameter moves ``W`` as far (in Frobenius norm, for unit steps of random signs) as it moves a dense
    ``nn.Linear`` of the same shape, whose ``d_1 d_2`` weights each step by the learning rate:

    .. math::
        g^2 \sum_r \lVert \partial W / \partial t_r \rVert_F^2 + \min(d_1, d_2) = d_1 d_2,

    computed exactly from the planes and the initial scalars (:func:`kama.givens.angle_sensitivities`). It also
    lifts the angles' gradients by ``g`` above Adam's ``eps``. The parametrization lives in the layer, so it holds
    under any optimizer and survives schedulers that reset learning rates (SB3 does). A float sets ``g``
    directly; ``angle_gain=1.0`` is the paper's parametrization.

    Planes (``plane_sampler``). In a truncated layer, i.i.d. planes (``"iid"``, the paper's Kac walk) leave some
    rotations *dead*: neither coordinate carries input yet, or neither reaches a kept output, so the rotation
    never acts and its gradient is exactly zero (:meth:`dead_rotations`; a third of a 64 -> 3 head's 200).
    ``"live"`` (the default) draws the same walk conditioned on every rotation being live
    (:func:`kama.givens.random_live_pairs`); both are identical for square layers. On Hopper-v5 under PPO
    (5 seeds, ``results/evidence/phase-a/``) live planes trained better than i.i.d. ones; ``"iid"`` with
    ``angle_gain=1.0`` (:data:`PAPER_SETTINGS`) is the paper's layer.

    Learned planes (``learn_planes=True``, the paper's section 6.3): angles start at 0 (``M = I``, as
    Algorithm 1 starts from ``M0 = I``) and the coordinate planes are re-selected during training by the
    Riemannian gradient. Every ``plane_update_every`` training forward passes, the backward pass scores
    ``plane_candidates`` random planes per rotation by the directional derivative of the loss
    (:func:`kama.givens.plane_scores`); each *idle* rotation (``|sin(t/2)| <= plane_tol``, i.e. within
    ``plane_tol`` of the identity) moves to its best candidate if that beats its current plane (greedily:
    at most ``ceil(k / 8)`` rotations per update, largest gain first, as Algorithm 1 picks one), with angle
    reset to 0, so the function changes by at most the idle rotations' tiny angles. The change is applied
    at the start of the next forward pass (optimizer state kept for those angles is then stale, like a
    re-initialized coordinate). :meth:`reselect_planes` does the same step by hand.

    Args:
        in_features: size of each input sample (``d2``).
        out_features: size of each output sample (``d1``).
        bias: learn an additive bias.
        num_rotations: ``k``; default :func:`kama.default_num_rotations` ``(n) = ceil(n ln n)``.
        learn_angles: angles are a parameter (else a fixed random buffer).
        learn_planes: re-select planes during training (see above).
        angle_gain: ``"dense"`` (a dense layer's step size, see above) or a positive float; ``1.0`` is the
            paper's parametrization. Fixed-angle layers (``learn_angles=False``) always use 1.
        plane_sampler: ``"live"`` (no dead rotation, the default) or ``"iid"`` (the paper's i.i.d. planes).
        init_scale: initial value of every renormalization scalar (default :math:`\sqrt{n / (3 d_2)}`, the
            second moment of ``nn.Linear``'s default); ``angle_gain="dense"`` is computed for it.
        plane_update_every, plane_candidates, plane_tol: the plane re-selection schedule.
        device, dtype: factory arguments, as in ``nn.Linear``.
        generator: CPU ``torch.Generator`` for the initialization (planes, angles, bias) and the candidate
            planes; ``None`` uses the global RNG.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.

    Attributes:
        pairs: ``(k, 2)`` ``int64`` buffer of coordinate planes.
        angles: ``(k,)`` angle parameters; the rotation angles in radians are ``angle_gain * angles``
            (:meth:`rotation_angles`).
        angle_gain: the float ``g`` (saved in the ``state_dict``; checkpoints without it load with 1).
        scale: ``(min(in_features, out_features),)`` renormalization scalars.
        bias: ``(out_features,)`` or ``None``.

    Example:
        >>> layer = KamaLinear(20, 30, generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(128, 20)
        >>> layer(x).shape
        torch.Size([128, 30])
        >>> torch.allclose(layer(x), x @ layer.to_dense().T + layer.bias, atol=1e-5)
        True
    """

    __constants__ = ["in_features", "out_features", "num_rotations"]
    in_features: int
    out_features: int
    num_rotations: int
    pairs: torch.Tensor
    angles: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    angle_gain: float

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        num_rotations: int | None = None,
        learn_angles: bool = True,
        learn_planes: bool = False,
        angle_gain: float | str = DEFAULT_ANGLE_GAIN,
        plane_sampler: str = DEFAULT_PLANE_SAMPLER,
        init_scale: float | None = None,
        plane_update_every: int = 50,
        plane_candidates: int = 16,
        plane_tol: float = 0.05,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": _check_dtype(dtype)}
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.out_features = check_int("out_features", out_features, minimum=1)
        self.n = max(self.in_features, self.out_features)
        if num_rotations is None:
            num_rotations = default_num_rotations(self.n)
        self.num_rotations = check_int("num_rotations", num_rotations, minimum=0)
        if self.n < 2 and self.num_rotations > 0:
            raise ValueError(
                f"num_rotations must be 0 when max(in_features, out_features) == 1, got {self.num_rotations}"
            )
        self.learn_angles = bool(learn_angles)
        self.learn_planes = bool(learn_planes)
        if self.learn_planes and not self.learn_angles:
            raise ValueError("learn_planes=True requires learn_angles=True, got learn_angles=False")
        self._angle_gain_rule: float | str = check_angle_gain(angle_gain)
        self.plane_sampler = check_choice("plane_sampler", plane_sampler, PLANE_SAMPLERS)
        if init_scale is not None:
            init_scale = check_real("init_scale", init_scale)
        self.init_scale = init_scale
        self.angle_gain = 1.0
        self.plane_update_every = check_int("plane_update_every", plane_update_every, minimum=1)
        self.plane_candidates = check_int("plane_candidates", plane_candidates, minimum=1)
        if not (isinstance(plane_tol, (int, float)) and 0.0 <= float(plane_tol) <= 1.0):
            raise ValueError(f"plane_tol must be a number in [0, 1], got {plane_tol!r}")
        self.plane_tol = float(plane_tol)

        k = self.num_rotations
        self.register_buffer("pairs", torch.zeros(k, 2, dtype=torch.long, device=device))
        angles = torch.empty(k, **factory)
        if self.learn_angles:
            self.angles = nn.Parameter(angles)
        else:
            self.register_buffer("angles", angles)
        self.scale = nn.Parameter(torch.empty(min(self.in_features, self.out_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._cache = LinearCache()
        self._planes: PlaneSelector | None = None
        if self.learn_planes:
            self._planes = PlaneSelector(k, self.plane_update_every, self.plane_candidates, self.plane_tol)
            self._planes.attach(self)
        self.reset_parameters(generator=generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Redraw planes and angles, reset the scalars and redraw the bias (see the class docstring)."""
        k, n = self.num_rotations, self.n
        with torch.no_grad():
            if self.plane_sampler == "live":
                pairs = random_live_pairs(n, k, inputs=self.in_features, outputs=self.out_features,
                                          generator=generator)
            else:
                pairs = random_pairs(n, k, generator=generator)
            self.pairs.copy_(pairs)
            angles = torch.zeros(k, dtype=torch.float64) if self.learn_planes else \
                random_angles(k, generator=generator, dtype=torch.float64)
            scale = self.init_scale if self.init_scale is not None else math.sqrt(n / (3.0 * self.in_features))
            self.angle_gain = self._initial_gain(pairs, angles, scale)
            self.angles.copy_(angles / self.angle_gain)
            self.scale.fill_(scale)
            if self.bias is not None:
                self.bias.copy_(_uniform((self.out_features,), 1.0 / math.sqrt(self.in_features), generator))
        if self._planes is not None:  # seed of the candidate planes drawn during training
            self._planes.reset(int(torch.randint(0, 2**62, (1,), generator=generator)))

    def _initial_gain(self, pairs: torch.Tensor, angles: torch.Tensor, scale: float) -> float:
        """``angle_gain`` for the initial planes, angles and scalars (see the class docstring)."""
        if not self.learn_angles:
            return 1.0
        if self._angle_gain_rule != "dense":
            return float(self._angle_gain_rule)
        return dense_step_gain(pairs, angles, self.in_features, self.out_features, scale)

    def rotation_angles(self) -> torch.Tensor:
        """The rotation angles in radians, ``angle_gain * angles`` (differentiable): ``givens_apply`` of the
        padded input with ``pairs`` and these angles is the layer before truncation and scalars."""
        return self.angles if self.angle_gain == 1.0 else self.angles * self.angle_gain

    def dead_rotations(self) -> torch.Tensor:
        """Boolean mask ``(k,)`` of the rotations that can never act in this truncated layer (their angles'
        gradients are exactly zero; see :func:`kama.givens.dead_rotations`). All ``False`` for square layers and
        for ``plane_sampler="live"`` (until learned planes move)."""
        return dead_rotations(self.pairs, self.n, inputs=self.in_features, outputs=self.out_features)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "angle_gain"] = torch.tensor(self.angle_gain, dtype=torch.float64)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        gain = state_dict.get(prefix + "angle_gain")
        # checkpoints written before angle_gain existed hold rotation angles in radians: gain 1
        self.angle_gain = float(gain) if gain is not None else 1.0
        rest = {k: v for k, v in state_dict.items() if k != prefix + "angle_gain"}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have last dimension in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
        # the module's dicts directly (nn.Module.__getattr__ costs ~0.7 us a name: RL-size layers notice); tensors
        # swapped in by torch.func.functional_call are found there too
        p: dict[str, Any] = self._parameters
        b: dict[str, Any] = self._buffers
        return kama_linear(x, b["pairs"] if "pairs" in b else self.pairs, p["angles"] if "angles" in p else self.angles,
                           p["scale"] if "scale" in p else self.scale, p["bias"] if "bias" in p else self.bias,
                           out_features=self.out_features, angle_gain=self.angle_gain, cache=self._cache)

    def to_dense(self, *, backend: str = "reference") -> torch.Tensor:
        """The ``(out_features, in_features)`` weight ``W`` (differentiable), ``layer(x) == x @ W.T + b``.

        Args:
            backend: how ``M`` is materialized (the walk over the ``n x n`` identity, see
                :func:`kama.givens_apply`): ``"reference"`` (pure PyTorch, the test oracle) by default;
                ``"auto"`` uses the compiled kernel where there is one (about 20x faster for RL-size layers).
        """
        if self.angles.is_meta:
            return self.angles.new_empty(self.out_features, self.in_features)
        return kama_weight(self._plan(), self.angles, self.scale, self.in_features, self.out_features,
                           angle_gain=self.angle_gain, backend=backend)

    def _plan(self) -> GivensPlan:
        """The plan of ``pairs`` (the layer's cache keeps it while ``pairs`` keeps its values)."""
        if self.pairs.is_meta:
            raise ValueError("a layer on the meta device has no planes to plan; move it with to_empty() first")
        return self._cache.plan_of(self.pairs, self.n)

    @property
    def weight(self) -> torch.Tensor:
        """Materialized weight, as ``nn.Linear.weight`` would be (read-only view of :meth:`to_dense`)."""
        return self.to_dense()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same function (the materialized weight and a copy of the bias), for
        deployment and export: ``layer.to_linear()(x) == layer(x)`` up to rounding.

        Example:
            >>> layer = KamaLinear(6, 4, generator=torch.Generator().manual_seed(0))
            >>> x = torch.randn(3, 6)
            >>> torch.allclose(layer.to_linear()(x), layer(x), atol=1e-6)
            True
        """
        return _linear_like(self, self.to_dense(backend="auto"))

    def num_parameters(self) -> int:
        """Learned parameters as the paper's Table 1 counts them: angles + scalars + bias (planes excluded)."""
        n = self.scale.numel() + (self.angles.numel() if self.learn_angles else 0)
        return n + (self.bias.numel() if self.bias is not None else 0)

    def extra_repr(self) -> str:
        s = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"num_rotations={self.num_rotations}"
        )
        if not self.learn_angles:
            s += ", learn_angles=False"
        if self.angle_gain != 1.0:
            s += f", angle_gain={self.angle_gain:.4g}"
        if self.plane_sampler != DEFAULT_PLANE_SAMPLER:
            s += f", plane_sampler={self.plane_sampler!r}"
        if self.learn_planes:
            s += f", learn_planes=True, plane_update_every={self.plane_update_every}"
        return s

    # ------------------------------------------------------------------------------------------------------
    @property
    def plane_max_moves(self) -> int:
        """Rotations moved per plane re-selection at most (``ceil(k / 8)``)."""
        return max(1, math.ceil(self.num_rotations / 8))

    def reselect_planes(self, x: torch.Tensor, grad_output: torch.Tensor) -> int:
        """One plane re-selection step now, from an input batch and ``dL/d(pre-bias output)``.

        Args:
            x: ``(*, in_features)`` input; grad_output: ``(*, out_features)`` gradient of the loss with
                respect to the layer's output.

        Returns:
            The number of rotations that moved to a new plane.
        """
        if self._planes is None:
            raise ValueError("reselect_planes needs a layer built with learn_planes=True, got learn_planes=False")
        self._planes.propose(self, x, grad_output)
        return self._planes.apply_pending(self)


class ToeplitzLinear(nn.Module):
    r"""A linear layer with a Toeplitz weight: ``W[a, b] = c[a - b + in_features - 1]``.

    The low-displacement-rank baseline of the paper's RL experiments (Choromanski et al., 2018,
    "Structured evolution"): ``in_features + out_features - 1`` weight parameters plus an optional bias.
    Initialized like ``nn.Linear`` (:math:`U(-1/\sqrt{d_2}, 1/\sqrt{d_2})` for coefficients and bias).

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.

    Attributes:
        coeffs: ``(in_features + out_features - 1,)`` diagonal values, from the bottom-left corner.
        bias: ``(out_features,)`` or ``None``.

    Example:
        >>> layer = ToeplitzLinear(3, 2, bias=False)
        >>> w = layer.to_dense()
        >>> bool(w[0, 0] == w[1, 1]) and bool(w[0, 1] == w[1, 2])
        True
    """

    __constants__ = ["in_features", "out_features"]
    in_features: int
    out_features: int
    coeffs: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": _check_dtype(dtype)}
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.out_features = check_int("out_features", out_features, minimum=1)
        self.coeffs = nn.Parameter(torch.empty(self.in_features + self.out_features - 1, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters(generator=generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Redraw coefficients and bias from ``U(-1/sqrt(in_features), 1/sqrt(in_features))``."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.coeffs.copy_(_uniform(tuple(self.coeffs.shape), bound, generator))
            if self.bias is not None:
                self.bias.copy_(_uniform((self.out_features,), bound, generator))

    def _index(self, device: torch.device) -> torch.Tensor:
        rows = torch.arange(self.out_features, device=device)[:, None]
        cols = torch.arange(self.in_features, device=device)[None, :]
        return rows - cols + (self.in_features - 1)

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` Toeplitz weight (differentiable)."""
        return self.coeffs[self._index(self.coeffs.device)]

    @property
    def weight(self) -> torch.Tensor:
        """Materialized weight (see :meth:`to_dense`)."""
        return self.to_dense()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same function (see :meth:`KamaLinear.to_linear`)."""
        return _linear_like(self, self.to_dense())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have last dimension in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
        return F.linear(x, self.to_dense(), self.bias)

    def num_parameters(self) -> int:
        """``in_features + out_features - 1`` coefficients plus the bias."""
        return self.coeffs.numel() + (self.bias.numel() if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _linear_like(layer: KamaLinear | ToeplitzLinear, weight: torch.Tensor) -> nn.Linear:
    bias = layer.bias
    lin = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.train(layer.training)
    return lin


def to_linear(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` with every :class:`KamaLinear` and :class:`ToeplitzLinear` replaced by the ``nn.Linear`` of the
    same function (:meth:`KamaLinear.to_linear`): for deployment, ONNX export or tools that expect dense layers.
    A copy unless ``inplace``; a structured layer passed itself is converted too.

    Example:
        >>> net = nn.Sequential(KamaLinear(4, 8), nn.Tanh(), ToeplitzLinear(8, 2))
        >>> dense = to_linear(net)
        >>> [type(m).__name__ for m in dense], type(net[0]).__name__
        (['Linear', 'Tanh', 'Linear'], 'KamaLinear')
    """
    if isinstance(model, KamaLinear | ToeplitzLinear):
        return model.to_linear()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    for name, child in list(model.named_children()):
        if isinstance(child, KamaLinear | ToeplitzLinear):
            setattr(model, name, child.to_linear())
        else:
            to_linear(child, inplace=True)
    return model
