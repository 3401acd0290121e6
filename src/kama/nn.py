r"""Structured linear layers: :class:`KamaLinear` (products of Givens rotations) and :class:`ToeplitzLinear`.

Both honour the ``torch.nn.Linear`` contract: ``(in_features, out_features, bias=True, *, device=None,
dtype=None)``, parameters created empty and filled by ``reset_parameters()``, ``extra_repr()``, a
``state_dict`` round trip, and ``to_dense()`` returning the ``(out_features, in_features)`` weight ``W``
with ``layer(x) == x @ W.T + bias``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import givens as _givens
from ._checks import FLOAT_DTYPES, check_choice, check_int, check_real
from .givens import (
    GivensPlan,
    _as,
    _c_backward,
    _c_coefficients,
    _c_forward,
    _compute_dtype,
    _kernel_pairs,
    _kernel_threads,
    _layered_matrix,
    _throughputs,
    _tile_width,
    angle_sensitivities,
    as_plan,
    choose_backend,
    cpu_kernel_available,
    dead_rotations,
    default_num_rotations,
    givens_apply,
    plane_scores,
    random_angles,
    random_live_pairs,
    random_pairs,
)

__all__ = ["KamaLinear", "ToeplitzLinear", "dense_step_gain", "ANGLE_GAINS", "PLANE_SAMPLERS"]

ANGLE_GAINS: tuple[str, ...] = ("dense",)
"""Named rules for ``KamaLinear(angle_gain=...)`` (a positive float is accepted too)."""

PLANE_SAMPLERS: tuple[str, ...] = ("iid", "live")
"""Values of ``KamaLinear(plane_sampler=...)``."""


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
    return dtype  # type: ignore[return-value]


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator | None) -> torch.Tensor:
    """U(-bound, bound) drawn in float64 on the CPU (same values on every device and dtype)."""
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def _pad_input(x: torch.Tensor, scale: torch.Tensor, out_features: int, n: int) -> torch.Tensor:
    """Widening layers (out > in) scale the input columns and zero-pad them to ``n``."""
    in_features = x.shape[-1]
    if out_features > in_features:
        x = F.pad(x * scale, (0, n - in_features))
    return x


def _finish_output(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                   out_features: int) -> torch.Tensor:
    """Narrowing layers (out <= in) keep the first ``out`` rotated coordinates and scale them; then the bias."""
    if out_features <= in_features:
        if out_features < y.shape[-1]:
            y = y[..., :out_features]
        if bias is not None:
            return torch.addcmul(bias, y, scale)
        return y * scale
    return y + bias if bias is not None else y


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
    planes ``pairs`` are a buffer: i.i.d. uniform coordinate pairs (Kac's walk) drawn at initialization.

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
    ``"live"`` draws the same walk conditioned on every rotation being live
    (:func:`kama.givens.random_live_pairs`); both are identical for square layers.

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
        plane_sampler: ``"iid"`` (the paper's i.i.d. planes) or ``"live"`` (no dead rotation, see above).
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

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        num_rotations: int | None = None,
        learn_angles: bool = True,
        learn_planes: bool = False,
        angle_gain: float | str = 1.0,
        plane_sampler: str = "iid",
        init_scale: float | None = None,
        plane_update_every: int = 50,
        plane_candidates: int = 16,
        plane_tol: float = 0.05,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": _check_dtype(dtype)}
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
        if isinstance(angle_gain, str):
            self._angle_gain_rule = check_choice("angle_gain", angle_gain, ANGLE_GAINS)
        else:
            check_real("angle_gain", angle_gain, minimum=0.0, strict_minimum=True)
            self._angle_gain_rule = float(angle_gain)
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
        self.plane_max_moves = max(1, math.ceil(self.num_rotations / 8))

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
        self._plane_seed = 0
        self._train_steps = 0
        self._pending_planes: tuple[torch.Tensor, torch.Tensor] | None = None
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
        self._pending_planes = None
        if self.learn_planes:  # seed of the candidate planes drawn during training
            self._plane_seed = int(torch.randint(0, 2**62, (1,), generator=generator))

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
        return dead_rotations(self._plan(), self.n, inputs=self.in_features, outputs=self.out_features)

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
    def _pad_input(self, x: torch.Tensor) -> torch.Tensor:
        return _pad_input(x, self.scale, self.out_features, self.n)

    def _finish_output(self, y: torch.Tensor) -> torch.Tensor:
        return _finish_output(y, self.scale, self.bias, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have last dimension in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
        record = False
        if self.learn_planes:
            self._apply_pending_planes()
            if self.training and torch.is_grad_enabled() and self.num_rotations > 0:
                record = self._train_steps % self.plane_update_every == 0
                self._train_steps += 1
        # One lookup each (nn.Module.__getattr__ is slow on RL-size hot paths); buffers (fixed angles) and
        # tensors swapped in by torch.func.functional_call take the ordinary attribute path.
        params = self._parameters
        angles = params["angles"] if "angles" in params else self.angles
        scale = params["scale"] if "scale" in params else self.scale
        bias = params["bias"] if "bias" in params else self.bias
        if x.is_meta or angles.is_meta:  # shape propagation (meta-device models): no values to rotate
            return x.new_empty(*x.shape[:-1], self.out_features)
        if torch.jit.is_tracing():  # the compiled paths write through raw pointers, which a trace cannot record
            return F.linear(x, self.to_dense(), bias)
        n_rows = x.numel() // self.in_features
        plan = self._plan()
        if not (torch.is_grad_enabled() and (angles.requires_grad or scale.requires_grad)):
            if self._dense_wins(n_rows, angles):
                return F.linear(x, self._cached_dense(angles, scale, plan), bias)
        if not record and x.device.type == "cpu" and x.dtype == angles.dtype and self._fused_wins(n_rows, plan):
            # One autograd node (one C pass) for pad, rotations, truncation, scalars and bias: RL-size layers are
            # dominated by per-op overhead.
            if x.dim() == 2:
                return _KamaLinearFunction.apply(x, angles, scale, bias, plan, self.out_features, self.angle_gain)
            y = _KamaLinearFunction.apply(x.reshape(-1, self.in_features), angles, scale, bias, plan,
                                          self.out_features, self.angle_gain)
            return y.reshape(*x.shape[:-1], self.out_features)
        xp = self._pad_input(x)
        y = givens_apply(xp, plan, self.rotation_angles())
        if record and y.requires_grad:
            xd = xp.detach()
            y.register_hook(lambda g: self._propose_planes(xd, g))
        return self._finish_output(y)

    def _fused_wins(self, n_rows: int, plan: GivensPlan) -> bool:
        """Whether ``choose_backend`` picks the compiled kernel for ``n_rows`` (cached per batch size and plan)."""
        cached = self.__dict__.get("_fused_cache")
        if cached is not None and cached[0] == n_rows and cached[1] is plan:
            return cached[2]
        wins = cpu_kernel_available() and choose_backend(n_rows, self.n, plan) == "cpu"
        self.__dict__["_fused_cache"] = (n_rows, plan, wins)
        return wins

    def _plan(self) -> GivensPlan:
        """The plan of ``pairs``, kept on the module while ``pairs`` keeps its values (checked each call)."""
        cached = self.__dict__.get("_plan_cache")
        current = self._buffers["pairs"] if "pairs" in self._buffers else self.pairs
        if cached is not None:
            pairs, plan = cached
            if pairs.device == current.device and pairs.shape == current.shape and torch.equal(pairs, current):
                return plan
        plan = as_plan(current, self.n)
        self.__dict__["_plan_cache"] = (current.clone(), plan)
        return plan

    # ------------------------------------------------------------------------------------------------------
    # Inference cache: without gradients, a materialized W is reused while angles and scale keep their values
    # and pairs is untouched. Angles and scalars are checked by value (O(k) per call), not by tensor versions:
    # writes through ``.data`` (TRPO's line search does this) do not bump versions.
    def _dense_wins(self, n_rows: int, angles: torch.Tensor) -> bool:
        """Whether materializing W beats the walk for ``n_rows`` rows (cached per batch size and device)."""
        dev = angles.device
        cached = self.__dict__.get("_dense_wins_cache")
        if cached is not None and cached[0] == n_rows and cached[1] == dev:
            return cached[2]
        _, walk, gemm = _throughputs(dev)
        dense_s = 3e-6 + 2.0 * n_rows * self.in_features * self.out_features / gemm
        walk_s = 20e-6 + 6.0 * self.num_rotations * n_rows / walk
        self.__dict__["_dense_wins_cache"] = (n_rows, dev, dense_s < walk_s)
        return dense_s < walk_s

    def _cached_dense(self, a: torch.Tensor, sc: torch.Tensor, plan: GivensPlan) -> torch.Tensor:
        """The materialized weight for the current ``angles`` ``a``, ``scale`` ``sc`` and ``plan`` (reused while
        the angles and scalars keep their values and the plan is the same object: :meth:`_plan` compares the
        ``pairs`` buffer by value, so writes through ``.data`` are seen)."""
        cache = self.__dict__.get("_dense_cache")
        if cache is not None:
            ca, cs, cplan, w = cache
            # by value: optimizers and ``.data`` writes (which do not bump versions) both change them
            if cplan is plan and ca.dtype == a.dtype and ca.device == a.device and torch.equal(ca, a) \
                    and torch.equal(cs, sc):
                return w
        with torch.no_grad():
            w = self.to_dense(backend="auto")
        self.__dict__["_dense_cache"] = (a.detach().clone(), sc.detach().clone(), plan, w)
        return w

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_dense_cache", "_plan_cache", "_fused_cache", "_dense_wins_cache"):
            state.pop(key, None)
        return state

    def to_dense(self, *, backend: str = "reference") -> torch.Tensor:
        """The ``(out_features, in_features)`` weight ``W`` (differentiable), ``layer(x) == x @ W.T + b``.

        Args:
            backend: how ``M`` is materialized (the walk over the ``n x n`` identity, see
                :func:`kama.givens_apply`): ``"reference"`` (pure PyTorch, the test oracle) by default;
                ``"auto"`` uses the compiled kernel where there is one (about 20x faster for RL-size layers).
        """
        if self.angles.is_meta:
            return self.angles.new_empty(self.out_features, self.in_features)
        eye = torch.eye(self.n, dtype=self.angles.dtype, device=self.angles.device)
        m = givens_apply(eye, self._plan(), self.rotation_angles(), transpose=True, backend=backend)
        return _weight_from_matrix(m, self.scale, self.in_features, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """Materialized weight, as ``nn.Linear.weight`` would be (read-only view of :meth:`to_dense`)."""
        return self.to_dense()

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
        if self.plane_sampler != "iid":
            s += f", plane_sampler={self.plane_sampler!r}"
        if self.learn_planes:
            s += f", learn_planes=True, plane_update_every={self.plane_update_every}"
        return s

    # ------------------------------------------------------------------------------------------------------
    def _candidate_planes(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self._plane_seed + self._train_steps)
        k, c = self.num_rotations, self.plane_candidates
        return random_pairs(self.n, k * c, generator=gen).view(k, c, 2)

    def _choose_planes(self, xp: torch.Tensor, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cand = self._candidate_planes().to(xp.device)
        scores, current = plane_scores(xp.reshape(-1, self.n), grad_y.reshape(-1, self.n), self.pairs,
                                       self.rotation_angles().detach(), cand)
        best = scores.abs().argmax(dim=1)
        best_score = scores.abs().gather(1, best[:, None])[:, 0]
        idle = torch.sin(self.rotation_angles().detach().to(scores.dtype) / 2).abs() <= self.plane_tol
        gain = torch.where(idle & (best_score > current.abs()), best_score - current.abs(), -1.0)
        # Greedy, as Algorithm 1: move only the rotations with the largest gains (at most plane_max_moves).
        top = torch.topk(gain, min(self.plane_max_moves, gain.numel())).indices
        rows = top[gain[top] > 0]
        new = cand[rows, best[rows]]
        return rows, new

    def _propose_planes(self, xp: torch.Tensor, grad_y: torch.Tensor) -> None:
        self._pending_planes = self._choose_planes(xp, grad_y)

    def _apply_pending_planes(self) -> int:
        pending, self._pending_planes = self._pending_planes, None
        if pending is None:
            return 0
        rows, new = pending
        if rows.numel():
            with torch.no_grad():
                self.pairs[rows] = new.to(self.pairs.device)
                self.angles[rows] = 0
        return int(rows.numel())

    def reselect_planes(self, x: torch.Tensor, grad_output: torch.Tensor) -> int:
        """One plane re-selection step now, from an input batch and ``dL/d(pre-bias output)``.

        Args:
            x: ``(*, in_features)`` input; grad_output: ``(*, out_features)`` gradient of the loss with
                respect to the layer's output.

        Returns:
            The number of rotations that moved to a new plane.
        """
        if not self.learn_planes:
            raise ValueError("reselect_planes needs a layer built with learn_planes=True, got learn_planes=False")
        with torch.no_grad():
            xp = self._pad_input(x)
            g = grad_output
            if self.out_features <= self.in_features:
                g = F.pad(g * self.scale, (0, self.n - self.out_features))
        self._pending_planes = self._choose_planes(xp, g)
        return self._apply_pending_planes()


def _weight_from_matrix(m: torch.Tensor, scale: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """KamaLinear's ``(out, in)`` weight from ``M`` (``n x n``): scaled leading rows or columns."""
    if out_features <= in_features:
        return scale[:, None] * m[:out_features, :]
    return m[:, :in_features] * scale[None, :]


def _kama_linear_reference(x: torch.Tensor, angles: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                           plan: GivensPlan, out_features: int) -> torch.Tensor:
    """The unfused, twice-differentiable composition that :class:`_KamaLinearFunction` computes."""
    in_features = x.shape[-1]
    y = givens_apply(_pad_input(x, scale, out_features, plan.d), plan, angles)
    return _finish_output(y, scale, bias, in_features, out_features)


_FUSED_KERNEL = hasattr(_givens._cgivens, "linear_forward")


class _KamaLinearFunction(torch.autograd.Function):
    """KamaLinear's forward in one autograd node over the compiled kernel (CPU).

    Saves the input and the rotated (pre-truncation) output; backward runs the kernel's saved-output walk.
    A recorded backward (``create_graph=True``, e.g. TRPO's Hessian-vector products) recomputes the forward
    with differentiable operations and differentiates that, so higher derivatives stay exact."""

    @staticmethod
    def forward(ctx, x, angles, scale, bias, plan, out_features, gain=1.0):  # type: ignore[override]
        ctx.plan, ctx.out_features, ctx.gain = plan, out_features, gain
        rot = angles if gain == 1.0 else angles.detach() * gain  # the rotation angles
        ctx.fused = x.dtype in (torch.float32, torch.float64) and _FUSED_KERNEL
        if ctx.fused:  # pad, scale, rotate, truncate and bias in one C pass (cos/sin computed there too)
            dt, (n_rows, in_f), k = x.dtype, x.shape, plan.num_rotations
            xc, a, sc = _as(x, dt), _as(rot, dt), _as(scale, dt)  # read through data_ptr only
            b = _as(bias, dt) if bias is not None else None
            out = torch.empty(n_rows, out_features, dtype=dt)
            # the rotated state is an intermediate (not an input or output): a plain attribute, no SavedVariable
            ctx.y_rot = torch.empty(n_rows, plan.d, dtype=dt) if any(ctx.needs_input_grad[:4]) else None
            _givens._cgivens.linear_forward(
                xc.data_ptr(), out.data_ptr(), 0 if ctx.y_rot is None else ctx.y_rot.data_ptr(), n_rows, in_f,
                out_features, _kernel_pairs(plan), a.data_ptr(), k, sc.data_ptr(),
                0 if b is None else b.data_ptr(), _tile_width(n_rows, plan.d, xc.element_size(), 1),
                _kernel_threads(n_rows, k), int(dt == torch.float64))
            ctx.save_for_backward(xc, angles, scale, bias)
            return out
        coef = _c_coefficients(plan, rot, _compute_dtype(x.dtype))
        y_rot = _c_forward(_pad_input(x, scale, out_features, plan.d), rot, plan, False, coef)
        out = _finish_output(y_rot, scale, bias, x.shape[1], out_features)
        if out is y_rot:  # the output must not alias the saved rotated state
            out = y_rot.clone()
        ctx.save_for_backward(x, angles, scale, bias)
        ctx.y_rot = y_rot
        ctx.coef = coef
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, angles, scale, bias = ctx.saved_tensors
        y_rot, plan, out_features, gain = ctx.y_rot, ctx.plan, ctx.out_features, ctx.gain
        if torch.is_grad_enabled():  # create_graph: differentiate a differentiable recomputation
            inputs = (x, angles, scale, bias)
            want = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
            result: list[torch.Tensor | None] = [None] * 4
            with torch.enable_grad():
                # A recorded walk over the batch costs many graph nodes per layer of rotations; when the batch is
                # at least n rows (TRPO's Hessian-vector products over a whole rollout) the recorded graph is the
                # weight as a product of the plan's layer matrices (a few batched GEMMs) plus one GEMM.
                rot = angles if gain == 1.0 else angles * gain
                if x.shape[0] >= plan.d:
                    out = F.linear(x, _weight_from_matrix(_layered_matrix(plan, rot), scale, x.shape[1],
                                                          out_features), bias)
                else:
                    out = _kama_linear_reference(x, rot, scale, bias, plan, out_features)
                if want:
                    grads = torch.autograd.grad(out, [inputs[i] for i in want], g, create_graph=True,
                                                allow_unused=True)
                    for i, gr in zip(want, grads, strict=True):
                        result[i] = gr
            return (*result, None, None, None)
        if ctx.fused:
            dt, (n_rows, in_f), k = x.dtype, x.shape, plan.num_rotations
            rot = angles if gain == 1.0 else angles.detach() * gain
            gc, a, sc = _as(g, dt), _as(rot, dt), _as(scale, dt)
            gx = torch.empty(n_rows, in_f, dtype=dt)
            ga = torch.empty(k, dtype=dt)
            gs = torch.empty(sc.shape[0], dtype=dt)
            gb = torch.empty(out_features, dtype=dt) if bias is not None else None
            _givens._cgivens.linear_backward(
                gc.data_ptr(), y_rot.data_ptr(), x.data_ptr(), gx.data_ptr(), ga.data_ptr(), gs.data_ptr(),
                0 if gb is None else gb.data_ptr(), n_rows, in_f, out_features, _kernel_pairs(plan),
                a.data_ptr(), k, sc.data_ptr(), _tile_width(n_rows, plan.d, gc.element_size(), 2),
                _kernel_threads(n_rows, k), int(dt == torch.float64))
            need = ctx.needs_input_grad
            if gain != 1.0:
                ga = ga * gain
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
        rot = angles if gain == 1.0 else angles.detach() * gain
        g_xp, ga = _c_backward(y_rot, g_rot, rot, plan, False, ctx.coef)
        if gain != 1.0:
            ga = ga * gain
        if out_features > in_features:
            g_in = g_xp[:, :in_features]
            gs = (g_in * x).sum(0)
            gx = g_in * scale
        else:
            gx = g_xp
        return gx, ga, gs, gb, None, None, None


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
        factory = {"device": device, "dtype": _check_dtype(dtype)}
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
