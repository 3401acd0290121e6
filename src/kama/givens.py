r"""Products of Givens rotations: plans, sampling, the apply operator and its autograd.

Conventions (the paper's, section 2). A Givens rotation :math:`G(i, j, t) \in \mathbb{R}^{d \times d}` is
the identity except for

.. math::
    G[i, i] = G[j, j] = \cos t, \qquad G[j, i] = \sin t, \qquad G[i, j] = -\sin t .

A *plan* is a sequence of ``k`` coordinate pairs ``(i_r, j_r)`` with angles ``t_r``; its matrix is
:math:`M = G_1 G_2 \cdots G_k`. For a batch of row vectors ``X (B x d)`` the operator computes
:math:`X M^\top` (each row ``x`` becomes ``M x``), so the *last* rotation of the product acts first.

Rotations on disjoint pairs commute. :class:`GivensPlan` groups the sequence into layers of disjoint pairs by
the as-soon-as-possible (ASAP) rule ``layer[r] = max(last[i_r], last[j_r]) + 1``; this reordering leaves the
product exactly unchanged, and each layer is applied with a handful of vectorized tensor operations on a
feature-major copy of the batch.

Backward saves only the output: it walks the layers in reverse, recovers each layer's input by the inverse
rotation and rotates the incoming gradient back, so the extra memory is ``O(B d)``, independent of ``k``.
The angle gradient of a rotation that maps ``u`` to ``v`` is ``sum_b g_j v_i - g_i v_j`` (a reduction over
the batch). The backward is itself differentiable (double backward, needed for Hessian-vector products as in
TRPO): when autograd records it, the same walk runs with out-of-place operations.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from . import _cuda, _triton
from ._checks import check_bool, check_choice, check_float_tensor, check_int, env_int

try:  # the optional compiled CPU kernel (built by setup.py; plain C, see _cgivens.c)
    from . import _cgivens  # type: ignore[attr-defined]

    _CGIVENS_ERROR: Exception | None = None
except ImportError as _e:  # pragma: no cover - exercised by simulating the failure in tests
    _cgivens = None
    _CGIVENS_ERROR = _e
_WARNED_NO_KERNEL = False
_WARNED_NO_TRITON = False


def _use_torch_openmp() -> bool:
    """Run the compiled kernel's threads on torch's own OpenMP team (found in this process's loaded
    libraries), so that they never compete with torch's spinning OpenMP workers. Returns success."""
    if _cgivens is None or not os.path.exists("/proc/self/maps") or os.environ.get("KAMA_PTHREADS"):
        return False
    try:
        import ctypes

        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line and line.strip().endswith(".so.1")}
        if "OpenMP" not in torch.__config__.parallel_info() or len(paths) != 1:
            return False
        lib = ctypes.CDLL(paths.pop(), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        addr = [ctypes.cast(getattr(lib, n), ctypes.c_void_p).value
                for n in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")]
        _cgivens.set_openmp(*addr)
        return True
    except (OSError, AttributeError, ValueError):  # pragma: no cover - other platforms
        return False


_KERNEL_OPENMP = _use_torch_openmp()

__all__ = [
    "GivensPlan",
    "givens_apply",
    "givens_matrix",
    "random_pairs",
    "random_matching_pairs",
    "random_live_pairs",
    "dead_rotations",
    "angle_sensitivities",
    "random_angles",
    "asap_layers",
    "default_num_rotations",
    "BACKENDS",
    "plane_scores",
    "choose_backend",
    "as_plan",
]

BACKENDS: tuple[str, ...] = ("auto", "reference", "cpu", "cuda", "dense")
"""Names accepted by ``givens_apply(..., backend=...)``.

* ``"reference"``: the vectorized pure-PyTorch layered walk (custom autograd, saves only the output); the
  oracle of the fast paths, on any device.
* ``"cpu"``: the compiled C kernel (``kama._cgivens``): batch tiles in cache, rotations in sequence with SIMD
  across the batch, threads across tiles, the same saved-output backward. Falls back to ``"reference"`` with
  one warning if the extension could not be built or loaded.
* ``"cuda"``: GPU kernels for CUDA tensors (``GPU_ENGINE``): CUDA C compiled at run time by NVRTC
  (``kama._cuda``: the batch tile feature-major in shared memory, each layer's rotations ordered to avoid bank
  conflicts) or Triton (``kama._triton``: the tile in an L1-cached global scratch); both persistent over
  tiles, all ASAP layers in one launch with a barrier between layers, float32 state for 16-bit input and
  output. Falls back to ``"reference"`` with one warning if neither can run. CPU tensors are accepted only
  under ``TRITON_INTERPRET=1`` (Triton's interpreter; for tests).
* ``"dense"``: materialize ``M`` (the reference walk applied to the identity), then one GEMM.
* ``"auto"``: the cost model in :func:`choose_backend`.
"""


def default_num_rotations(n: int) -> int:
    r"""Default number of rotations for an ``n x n`` product: :math:`\lceil n \ln n \rceil` (0 for n = 1).

    Kac's walk on the sphere mixes in :math:`O(n \log n)` steps (Pillai and Smith, 2015), the paper's
    section 3; ``n ln n`` rotations touch every coordinate ``2 ln n`` times on average.

    Example:
        >>> default_num_rotations(64)
        267
    """
    n = check_int("n", n, minimum=1)
    return int(math.ceil(n * math.log(n))) if n > 1 else 0


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator (samples are drawn on CPU), got {generator.device}")
    return generator


def random_pairs(
    d: int, k: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    r"""Sample ``k`` i.i.d. ordered pairs ``(i, j)``, uniform over ``i != j`` in ``[0, d)`` (Kac's walk).

    Pairs are drawn on the CPU with ``generator`` and then moved to ``device``, so a seed gives the same
    pairs on every device.

    Shape:
        Output: ``(k, 2)``, ``torch.int64``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> p = random_pairs(5, 3, generator=g)
        >>> p.shape, bool((p[:, 0] != p[:, 1]).all())
        (torch.Size([3, 2]), True)
    """
    d = check_int("d", d, minimum=1)
    k = check_int("k", k, minimum=0)
    generator = _cpu_generator(generator)
    if k > 0 and d < 2:
        raise ValueError(f"d must be >= 2 to sample k={k} rotation pairs, got d={d}")
    i = torch.randint(0, max(d, 1), (k,), generator=generator)
    j = torch.randint(0, max(d - 1, 1), (k,), generator=generator)
    j = j + (j >= i).long()
    return torch.stack([i, j], dim=1).to(device)


def random_matching_pairs(
    d: int, k: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    r"""Sample ``k`` pairs as a sequence of independent random perfect matchings of ``[0, d)``.

    Each block of ``d // 2`` consecutive pairs is a uniformly random perfect matching (one coordinate is
    left out when ``d`` is odd); the last block is truncated to reach ``k``. Every block is a single layer
    of disjoint rotations, which makes the ASAP schedule as shallow as possible (``ceil(2k / d)`` layers),
    at the price of a different walk than Kac's i.i.d. one.

    Shape:
        Output: ``(k, 2)``, ``torch.int64``.

    Example:
        >>> p = random_matching_pairs(6, 3, generator=torch.Generator().manual_seed(0))
        >>> sorted(p.flatten().tolist()) == list(range(6))
        True
    """
    d = check_int("d", d, minimum=1)
    k = check_int("k", k, minimum=0)
    generator = _cpu_generator(generator)
    if k > 0 and d < 2:
        raise ValueError(f"d must be >= 2 to sample k={k} rotation pairs, got d={d}")
    half = d // 2
    blocks = []
    total = 0
    while total < k:
        perm = torch.randperm(d, generator=generator)[: 2 * half]
        blocks.append(perm.view(half, 2))
        total += half
    if not blocks:
        return torch.empty(0, 2, dtype=torch.long, device=device)
    return torch.cat(blocks)[:k].to(device)


def _live_range(name: str, value: int | None, d: int) -> int:
    if value is None:
        return d
    value = check_int(name, value, minimum=1)
    if value > d:
        raise ValueError(f"{name} must be <= d={d}, got {value}")
    return value


def dead_rotations(pairs: torch.Tensor | GivensPlan, d: int, *, inputs: int | None = None,
                   outputs: int | None = None) -> torch.Tensor:
    r"""Which rotations of a truncated product can never act: a boolean mask ``(k,)``.

    The product :math:`M = G_1 \cdots G_k` acts on vectors whose coordinates ``inputs..d-1`` are zero (a widening
    layer's zero padding), and only its outputs ``0..outputs-1`` are kept (a narrowing layer's truncation).
    Rotation ``r`` is *dead* when neither of its coordinates can carry input yet (all of ``G_{r+1}, ..., G_k``,
    which act before it, left both at zero) or neither can still reach a kept output through
    ``G_{r-1}, ..., G_1``. A dead rotation does nothing, whatever the angles: its angle's gradient is exactly
    zero. In a square (untruncated) product no rotation is dead.

    Args:
        pairs: ``(k, 2)`` pairs or a :class:`GivensPlan` on dimension ``d``.
        d: the dimension of the product.
        inputs: number of leading coordinates that carry input (default ``d``).
        outputs: number of leading outputs that are kept (default ``d``).

    Example:
        >>> dead_rotations(torch.tensor([[2, 3], [0, 2], [1, 3]]), 4, inputs=2).tolist()
        [False, False, False]
        >>> dead_rotations(torch.tensor([[0, 1], [2, 3]]), 4, inputs=2).tolist()
        [False, True]
    """
    plan = as_plan(pairs, d)
    inputs = _live_range("inputs", inputs, d)
    outputs = _live_range("outputs", outputs, d)
    rows = plan._pairs.tolist()
    dead = [False] * len(rows)
    if inputs < d:  # in application order: G_k acts first
        carries = [c < inputs for c in range(d)]
        for r in range(len(rows) - 1, -1, -1):
            i, j = rows[r]
            if carries[i] or carries[j]:
                carries[i] = carries[j] = True
            else:
                dead[r] = True
    if outputs < d:  # from the output back: G_1 acts last
        reaches = [c < outputs for c in range(d)]
        for r, (i, j) in enumerate(rows):
            if reaches[i] or reaches[j]:
                reaches[i] = reaches[j] = True
            else:
                dead[r] = True
    return torch.tensor(dead, dtype=torch.bool)


def random_live_pairs(
    d: int, k: int, *, inputs: int | None = None, outputs: int | None = None,
    generator: torch.Generator | None = None, device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Sample ``k`` pairs like :func:`random_pairs` (Kac's walk), but with no dead rotation for a product that
    is truncated on one side (see :func:`dead_rotations`).

    Rotations are drawn one at a time from the side that is truncated, each from the uniform distribution over
    ordered pairs ``i != j`` conditioned on touching the live set so far (by rejection), which then grows by the
    pair: with ``inputs < d`` (a widening layer) from ``G_k``, the first to act, to ``G_1``; with ``outputs < d``
    (a narrowing layer) from ``G_1``, the last to act, to ``G_k``. Untruncated (``inputs = outputs = d``) it is
    exactly :func:`random_pairs`. A :class:`kama.KamaLinear` is truncated on one side only; both at once are
    not supported.

    Shape:
        Output: ``(k, 2)``, ``torch.int64``.

    Example:
        >>> p = random_live_pairs(64, 200, outputs=3, generator=torch.Generator().manual_seed(0))
        >>> int(dead_rotations(p, 64, outputs=3).sum())
        0
    """
    d = check_int("d", d, minimum=1)
    k = check_int("k", k, minimum=0)
    inputs = _live_range("inputs", inputs, d)
    outputs = _live_range("outputs", outputs, d)
    generator = _cpu_generator(generator)
    if inputs < d and outputs < d:
        raise ValueError(f"random_live_pairs samples products truncated on one side: inputs={inputs} and "
                         f"outputs={outputs} are both < d={d}")
    if inputs == d and outputs == d:
        return random_pairs(d, k, generator=generator, device=device)
    if k > 0 and d < 2:
        raise ValueError(f"d must be >= 2 to sample k={k} rotation pairs, got d={d}")
    live = [c < min(inputs, outputs) for c in range(d)]
    count = min(inputs, outputs)
    out: list[tuple[int, int]] = []
    pool: list[tuple[int, int]] = []
    while len(out) < k:
        if not pool:  # candidates in blocks (i.i.d. uniform pairs), consumed in order
            pool = [tuple(p) for p in random_pairs(d, max(64, 2 * (k - len(out))), generator=generator).tolist()]
            pool.reverse()
        i, j = pool.pop()
        if live[i] or live[j]:
            out.append((i, j))
            if count < d:
                count += (not live[i]) + (not live[j])
                live[i] = live[j] = True
    pairs = torch.tensor(out, dtype=torch.long).view(-1, 2)
    if inputs < d:  # drawn from the first rotation to act (G_k) on: reverse into product order
        pairs = pairs.flip(0)
    return pairs.to(device)


def random_angles(
    k: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample ``k`` angles uniformly on ``[0, 2 pi)``, drawn in float64 on the CPU, then cast and moved.

    Example:
        >>> a = random_angles(4, generator=torch.Generator().manual_seed(0))
        >>> bool(((a >= 0) & (a < 2 * torch.pi)).all())
        True
    """
    k = check_int("k", k, minimum=0)
    generator = _cpu_generator(generator)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype (angles are real numbers), got {dtype!r}")
    a = torch.rand(k, generator=generator, dtype=torch.float64) * (2 * math.pi)
    return a.to(dtype=dtype or torch.get_default_dtype(), device=device)


# ----------------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------------


def _check_pairs(pairs: object, d: int | None) -> torch.Tensor:
    if not isinstance(pairs, torch.Tensor):
        raise TypeError(f"pairs must be a torch.Tensor of shape (k, 2), got {type(pairs).__name__}")
    if pairs.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"pairs must have an integer dtype, got {pairs.dtype}")
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape (k, 2), got {tuple(pairs.shape)}")
    # a copy the caller cannot reach: plans are cached by value and must never see a later in-place write
    p = pairs.detach().to("cpu", torch.int64, copy=True)
    if p.numel():
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or (d is not None and hi >= d):
            bound = f"[0, {d})" if d is not None else ">= 0"
            raise ValueError(f"pairs entries must lie in {bound}, got values from {lo} to {hi}")
        same = (p[:, 0] == p[:, 1]).nonzero()
        if same.numel():
            r = int(same[0, 0])
            raise ValueError(f"pairs must have i != j in every row, got pairs[{r}] = {p[r].tolist()}")
    return p


def asap_layers(pairs: torch.Tensor) -> torch.Tensor:
    """Layer index of every rotation under the exact ASAP schedule ``max(last[i], last[j]) + 1``.

    Rotations in one layer act on disjoint coordinates; a rotation's layer is larger than that of every
    earlier rotation sharing a coordinate with it, so applying layers in order reproduces the product.

    Shape:
        pairs: ``(k, 2)``; output: ``(k,)`` ``int64`` layer ids starting at 0.

    Example:
        >>> asap_layers(torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3]])).tolist()
        [0, 0, 1, 1]
    """
    p = _check_pairs(pairs, None)
    rows = p.tolist()
    last: dict[int, int] = {}
    out = []
    for i, j in rows:
        layer = max(last.get(i, -1), last.get(j, -1)) + 1
        last[i] = layer
        last[j] = layer
        out.append(layer)
    return torch.tensor(out, dtype=torch.long)


class GivensPlan:
    """A validated, scheduled sequence of Givens pairs for vectors of dimension ``d``.

    Building a plan validates the pairs and computes the ASAP layering once; ``givens_apply`` accepts a plan
    wherever it accepts pairs (raw pairs are turned into plans through a small cache keyed on their values).

    Args:
        pairs: ``(k, 2)`` integer tensor, ``0 <= i, j < d``, ``i != j``.
        d: the dimension the plan acts on.

    A plan is immutable: it keeps its own copy of the pairs (a later in-place write to the tensor it was built
    from does not reach it), and :attr:`pairs` returns a fresh copy.

    Attributes:
        d, num_rotations, depth (number of layers), pairs (a CPU ``int64`` copy), layer_of (``(k,)`` layer ids).

    Example:
        >>> plan = GivensPlan(torch.tensor([[0, 1], [2, 3], [1, 2]]), d=4)
        >>> plan.depth, plan.num_rotations
        (2, 3)
    """

    def __init__(self, pairs: torch.Tensor, d: int) -> None:
        self.d = check_int("d", d, minimum=1)
        self._pairs = _check_pairs(pairs, self.d)
        self.num_rotations = int(self._pairs.shape[0])
        self._layers: dict[str, object] | None = None  # the ASAP schedule, built on first use
        self._device_cache: dict[object, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _schedule(self) -> dict[str, object]:
        if self._layers is not None:
            return self._layers
        k = self.num_rotations
        layer_of = asap_layers(self._pairs) if k else torch.empty(0, dtype=torch.long)
        depth = int(layer_of.max()) + 1 if k else 0
        # Rotations sorted by layer (stable: keeps product order inside a layer).
        perm = torch.sort(layer_of, stable=True).indices
        counts = torch.bincount(layer_of, minlength=depth) if depth else torch.zeros(0, dtype=torch.long)
        starts = torch.cumsum(counts, 0) - counts
        offsets = [0] + torch.cumsum(counts, 0).tolist()
        # Layer l holds rotations perm[a:b] (m = b - a); its gather index [I..., J...] sits at 2a : 2b, so the
        # rotation at sorted position q (layer l) has its I at a + q and its J at a + q + m.
        lay = layer_of[perm]
        a, m = starts[lay], counts[lay]
        q = torch.arange(k)
        index = torch.empty(2 * k, dtype=torch.long)
        rot = torch.empty(2 * k, dtype=torch.long)
        sign = torch.empty(2 * k, dtype=torch.float64)
        index[a + q] = self._pairs[perm, 0]
        index[a + q + m] = self._pairs[perm, 1]
        rot[a + q] = perm
        rot[a + q + m] = perm
        sign[a + q] = -1.0
        sign[a + q + m] = 1.0
        self._layers = {"layer_of": layer_of, "depth": depth, "perm": perm, "offsets": offsets, "index": index,
                        "rot_of_index": rot, "sign_of_index": sign}
        return self._layers

    @property
    def pairs(self) -> torch.Tensor:
        """The ``(k, 2)`` CPU ``int64`` pairs (a copy: writing to it does not change the plan)."""
        return self._pairs.clone()

    layer_of = property(lambda self: self._schedule()["layer_of"], doc="ASAP layer of every rotation.")
    depth = property(lambda self: self._schedule()["depth"], doc="Number of ASAP layers.")
    perm = property(lambda self: self._schedule()["perm"], doc="Rotations sorted by layer.")
    offsets = property(lambda self: self._schedule()["offsets"], doc="Layer l holds perm[offsets[l]:offsets[l+1]].")
    index = property(lambda self: self._schedule()["index"], doc="(2k,) gather index, [I...; J...] per layer.")
    rot_of_index = property(lambda self: self._schedule()["rot_of_index"], doc="Rotation of every gather entry.")
    sign_of_index = property(lambda self: self._schedule()["sign_of_index"], doc="-1 on I entries, +1 on J.")

    def __repr__(self) -> str:
        return f"GivensPlan(d={self.d}, num_rotations={self.num_rotations})"

    def __getstate__(self) -> dict:
        # caches (the compiled kernel's pairs are a capsule, which does not pickle) are rebuilt on use
        state = self.__dict__.copy()
        for key in ("_kernel_pairs", "_coef_cache"):
            state.pop(key, None)
        return state

    def sorted_pairs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(i, j, offsets, perm)`` on ``device`` (cached): the pairs sorted by layer as int32 columns, the
        int32 layer offsets ``(depth + 1,)`` and the permutation (rotation of every sorted position)."""
        key = ("sorted", device)
        hit = self._device_cache.get(key)  # type: ignore[call-overload]
        if hit is None:
            sp = self._pairs[self.perm].to(torch.int32)
            hit = (sp[:, 0].contiguous().to(device), sp[:, 1].contiguous().to(device),
                   torch.tensor(self.offsets, dtype=torch.int32, device=device), self.perm.to(device))
            self._device_cache[key] = hit  # type: ignore[index]
        return hit  # type: ignore[return-value]

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(index, rot_of_index, sign_of_index, perm)`` on ``device`` (cached)."""
        hit = self._device_cache.get(device)
        if hit is None:
            hit = tuple(  # type: ignore[assignment]
                t.to(device) for t in (self.index, self.rot_of_index, self.sign_of_index, self.perm)
            )
            self._device_cache[device] = hit  # type: ignore[assignment]
        return hit  # type: ignore[return-value]


_PLAN_CACHE: OrderedDict[tuple[int, bytes], GivensPlan] = OrderedDict()
_PLAN_CACHE_SIZE = 64
_PLAN_LOCK = threading.Lock()


def as_plan(pairs: torch.Tensor | GivensPlan, d: int) -> GivensPlan:
    """Return a :class:`GivensPlan` for ``pairs`` acting on dimension ``d`` (cached by the pairs' values)."""
    if isinstance(pairs, GivensPlan):
        if pairs.d != d:
            raise ValueError(f"plan acts on dimension {pairs.d}, but x has last dimension {d}")
        return pairs
    if not isinstance(pairs, torch.Tensor):
        raise TypeError(f"pairs must be a (k, 2) integer tensor or a GivensPlan, got {type(pairs).__name__}")
    if pairs.dtype.is_floating_point or pairs.dtype.is_complex or pairs.dtype == torch.bool:
        raise TypeError(f"pairs must have an integer dtype, got {pairs.dtype}")
    if pairs.dim() != 2 or pairs.shape[1] != 2:  # before the lookup: a cached plan must not admit other shapes
        raise ValueError(f"pairs must have shape (k, 2), got {tuple(pairs.shape)}")
    key = (d, pairs.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    with _PLAN_LOCK:
        plan = _PLAN_CACHE.get(key)
        if plan is not None:
            _PLAN_CACHE.move_to_end(key)
            return plan
    plan = GivensPlan(pairs, d)
    with _PLAN_LOCK:
        _PLAN_CACHE[key] = plan
        while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    return plan


# ----------------------------------------------------------------------------------------------------------
# The layered walk (pure PyTorch) and its autograd
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _coefficients(
    plan: GivensPlan, angles: torch.Tensor, cdtype: torch.dtype, transpose: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per gather position: ``C = cos t`` and ``S = -/+ sin t`` (sign flipped for the transpose)."""
    index, rot, sign, _ = plan.tensors(angles.device)
    a = angles.to(cdtype)
    c = torch.cos(a).index_select(0, rot)
    s = torch.sin(a).index_select(0, rot) * sign.to(cdtype)
    return c, (-s if transpose else s)


def _layer_order(plan: GivensPlan, transpose: bool) -> Sequence[int]:
    # M = G_1 ... G_k acts on a vector from the last rotation to the first; the transpose the other way.
    return range(plan.depth) if transpose else range(plan.depth - 1, -1, -1)


def _walk_forward(
    state: torch.Tensor, plan: GivensPlan, c: torch.Tensor, s: torch.Tensor, transpose: bool, inplace: bool
) -> torch.Tensor:
    """Rotate the feature-major ``state (d, N)``; in place when ``inplace`` (no autograd)."""
    index = plan.tensors(state.device)[0]
    off = plan.offsets
    for layer in _layer_order(plan, transpose):
        lo, hi = 2 * off[layer], 2 * off[layer + 1]
        m = off[layer + 1] - off[layer]
        idx = index[lo:hi]
        ab = state.index_select(0, idx)  # rows [x_I; x_J]
        new = torch.addcmul(ab * c[lo:hi, None], ab.roll(m, 0), s[lo:hi, None])
        state = state.index_copy_(0, idx, new) if inplace else state.index_copy(0, idx, new)
    return state


def _walk_backward(
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
    for layer in reversed(list(_layer_order(plan, transpose))):
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


TILE_BUDGET_BYTES = env_int("KAMA_TILE_BYTES", 2 * 1024 * 1024, minimum=1024)
"""Cache budget of the compiled kernel's tiles (environment ``KAMA_TILE_BYTES``, read at import)."""


def _tile_width(n_rows: int, d: int, itemsize: int, buffers: int) -> int:
    """Batch columns per tile of the compiled kernel.

    A power of two no wider than the batch needs (at most 128), narrowed while ``buffers`` tiles of ``d x T``
    exceed :data:`TILE_BUDGET_BYTES` (default 2 MiB, twice this machine's L2), but not below 64 columns for a
    one-buffer pass (forward) or 32 for a two-buffer pass (backward): narrower tiles leave too little SIMD work
    per rotation (measured: 16 columns run at a quarter of the speed of 32-128 on this EPYC; at d = 4096 a
    forward over 64-column tiles, 1 MiB each, is 20-25% faster than over 32-column ones). Tiles larger than
    the L2 are walked with software prefetches of the rows a few rotations ahead (the C kernel decides), so
    wider tiles pay: at d = 4096 a forward over 128 columns (2 MiB) runs at 41 GFLOP/s, over 64 at 33.
    """
    key = (n_rows, d, itemsize, buffers, TILE_BUDGET_BYTES)
    t = _TILE_WIDTHS.get(key)
    if t is None:
        t = 1
        while t < min(n_rows, 128):
            t *= 2
        floor = 64 if buffers == 1 else 32
        while t > floor and buffers * d * t * itemsize > TILE_BUDGET_BYTES:
            t //= 2
        if len(_TILE_WIDTHS) > 4096:
            _TILE_WIDTHS.clear()
        _TILE_WIDTHS[key] = t
    return t


_TILE_WIDTHS: dict[tuple[int, int, int, int, int], int] = {}


def _kernel_threads(n_rows: int, k: int) -> int:
    """Threads for the compiled kernel: torch's intra-op setting, one per ~1 MFLOP of work at least (threads
    split tiles, so batches of at most one tile run on one thread anyway). Measured at d = 64, batch 256 (2 MFLOP):
    18 us on one thread, 10.7 on two; the old 4 MFLOP floor kept it on one."""
    work = 6.0 * k * n_rows
    return max(1, min(torch.get_num_threads(), int(work // 1e6) or 1))


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, contiguous, without a call when it already is (small calls: RL policies). Only its
    memory is read (``data_ptr``), so ``t`` may require gradients: no ``detach`` is needed."""
    if t.dtype != dtype:
        t = t.detach().to(dtype)
    return t if t.is_contiguous() else t.detach().contiguous()


COEF_CACHE_MIN_ROTATIONS = 1024
"""Plans with at least this many rotations keep the cos/sin of the last angles they were applied with. Around
the break-even: at k = 1331 recomputing takes 1.7 us, a hit 0.3 us, a miss (changed angles) 1.6 us more."""


def _kernel_pairs(plan: GivensPlan) -> object:
    """The plan's pairs as the compiled kernel's capsule: validated once and copied into memory only the extension
    reaches (built on first use), so kernel calls skip a per-call index check (1.7 us at k = 35k)."""
    pairs = plan.__dict__.get("_kernel_pairs")
    if pairs is None:
        p32 = plan._pairs.to(torch.int32).contiguous()
        pairs = _cgivens.make_pairs(p32.data_ptr(), plan.num_rotations, plan.d)
        plan.__dict__["_kernel_pairs"] = pairs
    return pairs


def _c_coefficients(plan: GivensPlan, angles: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
    """``(k, 2)`` cos / sin of the angles for the C kernels (the layout they read: one load per rotation in the
    row walk), computed by the extension so that every C path (plain, scaled, fused KamaLinear) rounds them
    identically.

    Large plans reuse the coefficients of their last call while the angles keep their bytes (one ``memcmp``,
    ~1/40 of recomputing them), which is most of a batch-1 forward at d >= 1024."""
    a = _as(angles, cdtype)  # read through data_ptr only
    k = a.shape[0]
    cache = k >= COEF_CACHE_MIN_ROTATIONS
    if cache:  # (dtype, the angles' bytes, a copy of them, its address, the coefficients)
        hit = plan.__dict__.get("_coef_cache")
        if hit is not None and hit[0] == cdtype and _cgivens.same_bytes(hit[3], a.data_ptr(), hit[1]):
            return hit[4]
    cs = torch.empty(k, 2, dtype=cdtype)
    _cgivens.cos_sin(a.data_ptr(), cs.data_ptr(), k, int(cdtype == torch.float64))
    if cache:
        copy = a.detach().clone()
        plan.__dict__["_coef_cache"] = (cdtype, k * copy.element_size(), copy, copy.data_ptr(), cs)
    return cs


def _c_forward(x: torch.Tensor, angles: torch.Tensor, plan: GivensPlan, transpose: bool,
               coef: torch.Tensor | None = None, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The compiled forward; ``coef`` is :func:`_c_coefficients`' output when the caller has it. One row walks
    without a tile (the C side's row walk: tile width 1)."""
    cdtype = _compute_dtype(x.dtype)
    scale_ptr = _as(out_scale, cdtype).data_ptr() if out_scale is not None else 0
    xc = _as(x, cdtype)
    n, d = xc.shape
    y = torch.empty(n, d, dtype=cdtype)
    cs = coef if coef is not None else _c_coefficients(plan, angles, cdtype)
    k = plan.num_rotations
    _cgivens.forward(xc.data_ptr(), y.data_ptr(), n, d, _kernel_pairs(plan), cs.data_ptr(), k,
                     _tile_width(n, d, xc.element_size(), 1), _kernel_threads(n, k), int(cdtype == torch.float64),
                     int(transpose), scale_ptr)
    return y if cdtype == x.dtype else y.to(x.dtype)


def givens_apply_scaled(x: torch.Tensor, pairs: torch.Tensor | GivensPlan, angles: torch.Tensor,
                        scale: torch.Tensor) -> torch.Tensor:
    """``givens_apply(x, pairs, angles) * scale`` with the scaling fused into the compiled kernel's output pass
    when no gradient is needed (random features); otherwise the plain composition."""
    if (torch.is_grad_enabled() and (x.requires_grad or angles.requires_grad or scale.requires_grad)) \
            or x.device.type != "cpu" or _cgivens is None or x.dtype != angles.dtype:
        return givens_apply(x, pairs, angles) * scale
    d = int(x.shape[-1])
    plan = as_plan(pairs, d)
    if scale.shape != (d,) or angles.shape != (plan.num_rotations,):
        return givens_apply(x, plan, angles) * scale  # let givens_apply / broadcasting raise the errors
    keep = x.shape
    y = _c_forward(x.reshape(-1, d), angles, plan, False, out_scale=scale.detach())
    return y.reshape(keep)


def _c_backward(y: torch.Tensor, gy: torch.Tensor, angles: torch.Tensor, plan: GivensPlan, transpose: bool,
                coef: torch.Tensor | None = None):
    cdtype = _compute_dtype(y.dtype)
    yc = _as(y, cdtype)
    gc = _as(gy, cdtype)
    gx = torch.empty_like(yc)
    cs = coef if coef is not None else _c_coefficients(plan, angles, cdtype)
    n, d = yc.shape
    k = plan.num_rotations
    threads = _kernel_threads(n, k)
    gacc = torch.zeros(threads, k, dtype=torch.float64)
    _cgivens.backward(yc.data_ptr(), gc.data_ptr(), gx.data_ptr(), gacc.data_ptr(), n, d, _kernel_pairs(plan),
                      cs.data_ptr(), k, _tile_width(n, d, yc.element_size(), 2), threads,
                      int(cdtype == torch.float64), int(transpose))
    g_applied = gacc.sum(0) if threads > 1 else gacc[0]
    g_angles = _as(-g_applied if transpose else g_applied, angles.dtype)
    return (gx if gx.dtype == y.dtype else gx.to(y.dtype)), g_angles


def _rows(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` (2-D) with a unit column stride (rows may stay strided), optionally cast."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _t_coef(plan: GivensPlan, angles: torch.Tensor, cdtype: torch.dtype, transpose: bool):
    """cos / applied sin of the rotations in layer-sorted order, on the angles' device."""
    a = angles.detach().index_select(0, plan.sorted_pairs(angles.device)[3]).to(cdtype)
    s = torch.sin(a)
    return torch.cos(a), (-s if transpose else s)


GPU_ENGINE: str = os.environ.get("KAMA_GPU_ENGINE", "auto")
"""Which GPU kernels ``backend="cuda"`` runs: ``"nvrtc"`` (CUDA C with the tile in shared memory, compiled at run
time, :mod:`kama._cuda`, where it compiles and the tile fits shared memory, else Triton), ``"triton"``
(:mod:`kama._triton` always) or ``"auto"`` (currently the same as ``"nvrtc"``). Read from ``KAMA_GPU_ENGINE`` at
import; may be assigned."""

GPU_ENGINES: tuple[str, ...] = ("auto", "nvrtc", "triton")


def _gpu_engine(x: torch.Tensor, cdtype: torch.dtype):
    """The module (:mod:`kama._cuda` or :mod:`kama._triton`) whose kernels run on ``x``."""
    engine = check_choice("KAMA_GPU_ENGINE", GPU_ENGINE, GPU_ENGINES)
    if engine != "triton" and x.device.type == "cuda" and _cuda.available() \
            and _cuda.supports(int(x.shape[-1]), cdtype, x.device):
        return _cuda
    return _triton


def _gpu_call(name: str, x: torch.Tensor, plan: GivensPlan, *args):
    """``forward`` / ``backward`` of the GPU kernels chosen for ``x``; Triton's (with one warning) if NVRTC
    cannot build its kernel."""
    cdtype = _compute_dtype(x.dtype)
    engine = _gpu_engine(x, cdtype)
    try:
        if engine is _cuda:
            return getattr(_cuda, name)(*args, cdtype, plan=plan)
        return getattr(_triton, name)(*args, cdtype)
    except _cuda.CompileError as exc:
        warnings.warn(f"{exc}; using the Triton kernels from now on", RuntimeWarning, stacklevel=4)
        return getattr(_triton, name)(*args, cdtype)


def _t_forward(x: torch.Tensor, angles: torch.Tensor, plan: GivensPlan, transpose: bool,
               coef: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ii, jj, offsets, _ = plan.sorted_pairs(x.device)
    return _gpu_call("forward", x, plan, _rows(x), ii, jj, coef[0], coef[1], offsets, plan.depth, not transpose)


def _t_backward(y: torch.Tensor, gy: torch.Tensor, angles: torch.Tensor, plan: GivensPlan, transpose: bool,
                coef: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ii, jj, offsets, perm = plan.sorted_pairs(y.device)
    if y.shape[0] == 0 or plan.num_rotations == 0:  # nothing to walk: the identity's gradients
        return gy.to(y.dtype, copy=True), torch.zeros(plan.num_rotations, dtype=angles.dtype, device=y.device)
    gx, gt = _gpu_call("backward", y, plan, _rows(y), _rows(gy, y.dtype), ii, jj, coef[0], coef[1], offsets,
                       plan.depth, not transpose)
    g = torch.empty_like(gt).index_copy_(0, perm, gt)
    return gx, (-g if transpose else g).to(angles.dtype)


class _GivensFunction(torch.autograd.Function):
    """``y = x @ M^T`` (or ``x @ M``) on a 2-D batch; saves only ``y`` and the angles.

    ``kernel`` is ``"torch"`` (the layered walk), ``"c"`` (the compiled CPU kernel) or ``"triton"`` (the GPU
    kernels: Triton or NVRTC, see ``GPU_ENGINE``); the recorded (double) backward always uses the layered walk
    with out-of-place operations."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, angles: torch.Tensor, plan: GivensPlan, transpose: bool,  # type: ignore[override]
                kernel: str = "torch"):
        ctx.coef = None
        if kernel == "c":
            # cos/sin are kept for the backward (O(k) memory) instead of being recomputed there.
            ctx.coef = _c_coefficients(plan, angles, _compute_dtype(x.dtype))
            y = _c_forward(x, angles, plan, transpose, ctx.coef)
        elif kernel == "triton":
            ctx.coef = _t_coef(plan, angles, _compute_dtype(x.dtype), transpose)
            y = _t_forward(x, angles, plan, transpose, ctx.coef)
        else:
            cdtype = _compute_dtype(x.dtype)
            c, s = _coefficients(plan, angles, cdtype, transpose)
            state = x.t().to(cdtype, copy=True).contiguous()  # (d, N), feature-major
            state = _walk_forward(state, plan, c, s, transpose, inplace=True)
            y = state.t().to(x.dtype).contiguous()
        ctx.save_for_backward(y, angles)
        ctx.plan = plan
        ctx.transpose = transpose
        ctx.kernel = kernel
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        y, angles = ctx.saved_tensors
        plan: GivensPlan = ctx.plan
        transpose: bool = ctx.transpose
        cdtype = _compute_dtype(y.dtype)
        differentiable = torch.is_grad_enabled()  # create_graph=True: record the backward itself
        if ctx.kernel in ("c", "triton") and not differentiable:
            if ctx.kernel == "c":
                gx, gangles = _c_backward(y, gy, angles, plan, transpose, ctx.coef)
            else:
                gx, gangles = _t_backward(y, gy, angles, plan, transpose, ctx.coef)
            return (gx if ctx.needs_input_grad[0] else None, gangles if ctx.needs_input_grad[1] else None,
                    None, None, None)
        c, s = _coefficients(plan, angles, cdtype, transpose)
        v = y.t().to(cdtype).contiguous()
        g = gy.t().to(cdtype).contiguous()
        gx_t, gt = _walk_backward(v, g, plan, c, s, transpose, inplace=not differentiable)
        gx = gx_t.t().to(y.dtype).contiguous() if ctx.needs_input_grad[0] else None
        gangles = None
        if ctx.needs_input_grad[1]:
            perm = plan.tensors(gt.device)[3]
            if differentiable:
                gangles = torch.zeros_like(gt).index_copy(0, perm, gt)
            else:
                gangles = torch.empty_like(gt).index_copy_(0, perm, gt)
            if transpose:
                gangles = -gangles
            gangles = gangles.to(angles.dtype)
        return gx, gangles, None, None, None


def _apply_reference(x2: torch.Tensor, plan: GivensPlan, angles: torch.Tensor, transpose: bool) -> torch.Tensor:
    return _GivensFunction.apply(x2, angles, plan, transpose, "torch")


def _apply_traceable(x2: torch.Tensor, plan: GivensPlan, angles: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The layered walk in out-of-place tensor operations only (no custom autograd, no kernel): what
    ``torch.jit.trace`` records. Differentiated by autograd itself, so it saves every layer's state."""
    cdtype = _compute_dtype(x2.dtype)
    c, s = _coefficients(plan, angles, cdtype, transpose)
    state = _walk_forward(x2.t().to(cdtype), plan, c, s, transpose, inplace=False)
    return state.t().to(x2.dtype)


def cpu_kernel_available() -> bool:
    """Whether the compiled CPU kernel ``kama._cgivens`` loaded."""
    return _cgivens is not None


def _warn_no_kernel() -> None:
    global _WARNED_NO_KERNEL
    if not _WARNED_NO_KERNEL:
        _WARNED_NO_KERNEL = True
        warnings.warn(
            f"kama: the compiled CPU kernel could not be loaded ({_CGIVENS_ERROR}); using the slower "
            "pure-PyTorch path. Reinstall with a C compiler available (pip install -e .) to build it.",
            RuntimeWarning,
            stacklevel=3,
        )


def _apply_cpu(x2: torch.Tensor, plan: GivensPlan, angles: torch.Tensor, transpose: bool) -> torch.Tensor:
    if not x2.is_cpu:
        raise ValueError(f"backend='cpu' needs CPU tensors, got x on {x2.device}")
    if _cgivens is None:
        _warn_no_kernel()
        return _apply_reference(x2, plan, angles, transpose)
    if not (torch.is_grad_enabled() and (x2.requires_grad or angles.requires_grad)):
        return _c_forward(x2, angles, plan, transpose)  # no graph: skip the autograd.Function (~10 us)
    return _GivensFunction.apply(x2, angles, plan, transpose, "c")


def cuda_kernel_available() -> bool:
    """Whether GPU kernels can be used: Triton imports, or CUDA C kernels can be compiled (NVRTC)."""
    return _triton.available() or _cuda.available()


def _gpu_kernels_run(x2: torch.Tensor) -> bool:
    """Whether a GPU kernel (Triton, or NVRTC where the tile fits shared memory) can take ``x2``."""
    if _triton.available():
        return True
    return x2.device.type == "cuda" and GPU_ENGINE != "triton" and _cuda.available() \
        and _cuda.supports(int(x2.shape[-1]), _compute_dtype(x2.dtype), x2.device)


def _apply_cuda(x2: torch.Tensor, plan: GivensPlan, angles: torch.Tensor, transpose: bool) -> torch.Tensor:
    global _WARNED_NO_TRITON
    if x2.device.type != "cuda" and not (x2.device.type == "cpu" and _triton.interpreting()):
        raise ValueError(f"backend='cuda' needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                         f"got x on {x2.device}")
    if not _gpu_kernels_run(x2):
        if not _WARNED_NO_TRITON:
            _WARNED_NO_TRITON = True
            warnings.warn(f"kama: Triton is not available ({_triton.import_error()}) and the CUDA C kernels cannot "
                          f"run ({_cuda.import_error() or 'the tile does not fit shared memory'}); using the slower "
                          "pure-PyTorch path on the GPU. Install Triton with pip install triton.",
                          RuntimeWarning, stacklevel=3)
        return _apply_reference(x2, plan, angles, transpose)
    return _GivensFunction.apply(x2, angles, plan, transpose, "triton")


def _walk_kernel(device: torch.device, x: torch.Tensor | None = None) -> str:
    """The ``_GivensFunction`` kernel ``"auto"`` and ``"dense"`` use on ``device`` (for ``x``, if given)."""
    if device.type == "cpu":
        return "c" if _cgivens is not None else "torch"
    ok = cuda_kernel_available() if x is None else _gpu_kernels_run(x)
    return "triton" if device.type == "cuda" and ok else "torch"


def _layered_matrix(plan: GivensPlan, angles: torch.Tensor, transpose: bool = False) -> torch.Tensor:
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
    cdtype = _compute_dtype(angles.dtype)
    c, s = _coefficients(plan, angles, cdtype, transpose)
    key = ("layered", transpose, angles.device)
    flat = plan._device_cache.get(key)  # type: ignore[call-overload]
    if flat is None:
        # Flat positions in the (slots, d, d) stack, slot = the layer's place in application order, of every
        # gather entry's diagonal and partner element (row = the entry's coordinate, column = its partner's:
        # new[p] = c[p] x[index[p]] + s[p] x[index[p']]).
        index, off = plan.index, plan.offsets
        rows, cols, slots = [], [], []
        slot_of = {layer: slot for slot, layer in enumerate(_layer_order(plan, transpose))}
        for layer in range(depth):  # gather-position order, as c and s
            lo, hi, slot = 2 * off[layer], 2 * off[layer + 1], slot_of[layer]
            idx = index[lo:hi]
            rows.append(idx)
            cols.append(idx.roll((hi - lo) // 2, 0))
            slots.append(torch.full((hi - lo,), slot, dtype=torch.long))
        r, cc, sl = torch.cat(rows), torch.cat(cols), torch.cat(slots)
        flat = torch.cat([sl * d * d + r * d + r, sl * d * d + r * d + cc]).to(angles.device)
        plan._device_cache[key] = flat  # type: ignore[index]
    width = 1 << (depth - 1).bit_length()  # slots: a power of two, the extra ones identities
    eye = torch.eye(d, dtype=cdtype, device=angles.device)
    mats = torch.zeros(width * d * d, dtype=cdtype, device=angles.device).index_put(
        (flat,), torch.cat([c - 1.0, s])).view(width, d, d) + eye
    while width > 1:  # P = A_{L-1} ... A_0 over the slots in application order
        width //= 2
        first, second = mats.view(width, 2, d, d).unbind(1)
        mats = torch.bmm(second, first)
    return mats[0].to(angles.dtype)


def _apply_dense(x2: torch.Tensor, plan: GivensPlan, angles: torch.Tensor, transpose: bool) -> torch.Tensor:
    eye = torch.eye(plan.d, dtype=x2.dtype, device=x2.device)
    mt = _GivensFunction.apply(eye, angles, plan, transpose, _walk_kernel(eye.device, eye))  # M^T (or M)
    if x2.dtype in (torch.float16, torch.bfloat16) and x2.device.type == "cpu":
        return (x2.float() @ mt.float()).to(x2.dtype)
    return x2 @ mt


# Cost model for backend="auto". CPU throughputs measured on a 2-core EPYC, torch 2.13 CPU, 1 thread, fp32
# (BENCHMARKS.md). A walk over N vectors costs 6 k N flops at WALK_FLOPS[backend]; the dense path pays the walk
# on the d x d identity plus a GEMM of 2 N d^2 flops at GEMM_FLOPS[device type / precision]. Fixed per-call costs
# are about equal. CUDA rates measured on an H100 (bench_gpu.py, 8192 rows, d = 1024 and 4096, BENCHMARKS.md):
# fp32 GEMM 46-49 TFLOP/s with TF32 off, 230-340 with TF32, ~420-680 in bf16; the NVRTC walk 1.5-3.0 effective
# TFLOP/s (6 flops per rotation per vector), the pure-PyTorch layered walk 0.08-0.14.
WALK_FLOPS = {"reference": 2.0e9, "cpu": 30.0e9, "cuda": 2.0e12, "reference_cuda": 0.1e12}
GEMM_FLOPS = {"cpu": 60e9, "cuda": 50e12, "cuda_tf32": 300e12, "cuda_16bit": 500e12}


def _gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    if device.type != "cuda":
        return GEMM_FLOPS["cpu"]
    if dtype in (torch.float16, torch.bfloat16):
        return GEMM_FLOPS["cuda_16bit"]
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return GEMM_FLOPS["cuda_tf32"]
    return GEMM_FLOPS["cuda"]


def _throughputs(device: torch.device | str, dtype: torch.dtype = torch.float32) -> tuple[str, float, float]:
    """``(walk backend, its FLOP/s, GEMM FLOP/s)`` of the cost model on ``device`` for ``dtype`` data."""
    dev = device if isinstance(device, torch.device) else torch.device(device)
    kernel = _walk_kernel(dev)
    walk_backend = "cpu" if kernel == "c" else "cuda" if kernel == "triton" else "reference"
    w = WALK_FLOPS[walk_backend if walk_backend != "reference" or dev.type == "cpu" else "reference_cuda"]
    return walk_backend, w, _gemm_rate(dev, dtype)


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
        >>> plan = GivensPlan(random_pairs(64, 1331, generator=torch.Generator().manual_seed(0)), 64)
        >>> choose_backend(4096, 64, plan), choose_backend(64, 64, plan) in ("cpu", "reference")
        ('dense', True)
    """
    walk_backend, w, gemm = _throughputs(device, dtype)
    return _cheaper(n_rows, d, plan.num_rotations, walk_backend, w, gemm)


def _cheaper(n_rows: int, d: int, k: int, walk_backend: str, w: float, gemm: float) -> str:
    """:func:`choose_backend`'s comparison for a walk at ``w`` FLOP/s against a GEMM at ``gemm``."""
    if n_rows < d:  # materializing M alone (6 k d flops) costs more than the walk (6 k n_rows)
        return walk_backend
    return "dense" if 6.0 * k * d / w + 2.0 * n_rows * d * d / gemm < 6.0 * k * n_rows / w else walk_backend


_IMPLS = {"reference": _apply_reference, "cpu": _apply_cpu, "cuda": _apply_cuda, "dense": _apply_dense}


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
    plan = as_plan(pairs, d)
    if angles.shape[0] != plan.num_rotations:
        raise ValueError(
            f"angles must have shape ({plan.num_rotations},) to match pairs, got {tuple(angles.shape)}"
        )
    x2 = x if x.dim() == 2 else x.reshape(-1, d)  # (a reshape costs ~1 us: batch-1 calls notice)
    if torch.jit.is_tracing():  # kernels write through raw pointers and autograd.Functions do not trace
        y2 = _apply_traceable(x2, plan, angles, bool(transpose))
        return y2 if x.dim() == 2 else y2.reshape(x.shape)
    if backend == "auto":
        n_rows = x2.shape[0]
        if x.is_cpu and _cgivens is not None:  # choose_backend's answer without its device lookups (~1 us)
            backend = _cheaper(n_rows, d, plan.num_rotations, "cpu", WALK_FLOPS["cpu"], GEMM_FLOPS["cpu"])
        else:
            backend = choose_backend(n_rows, d, plan, device=x.device, dtype=x.dtype)
    y2 = _IMPLS[backend](x2, plan, angles, bool(transpose))
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
        m = givens_matrix(plan, a64, d)
        # rows = coordinates: A^T = (P L_r)^T (o columns) beside U = (R_r Q) (i columns); both are multiplied by
        # G_r from the left as r goes from k down to 1 (the order in which rotations act on a vector)
        state = torch.cat([m[:outputs, :].t(), torch.eye(d, dtype=torch.float64)[:, :inputs]], dim=1)
        c, s = _coefficients(plan, a64, torch.float64, False)
        index, off = plan.index, plan.offsets
        out = torch.zeros(plan.num_rotations, dtype=torch.float64)
        perm = plan.perm
        for layer in _layer_order(plan, False):
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
        _check_pairs(candidates.reshape(-1, 2), d)  # planes in [0, d), i != j: no negative index wraps around
    except ValueError as e:
        raise ValueError(f"candidates: {e}") from None
    cdtype = _compute_dtype(x.dtype)
    with torch.no_grad():
        c, s = _coefficients(plan, angles.detach(), cdtype, False)
        y = _walk_forward(x.detach().reshape(-1, d).t().to(cdtype, copy=True).contiguous(), plan, c, s,
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

        _, gt = _walk_backward(y, g, plan, c, s, False, inplace=True, visit=visit)
        current = torch.empty_like(gt).index_copy_(0, perm, gt)
    return scores, current
