r"""Plans: a validated sequence of Givens pairs, its ASAP schedule, and the caches every backend keeps on it.

A *plan* is a sequence of ``k`` coordinate pairs ``(i_r, j_r)`` on dimension ``d``; with angles ``t_r`` its matrix
is :math:`M = G_1 G_2 \cdots G_k`. Rotations on disjoint pairs commute, so :class:`GivensPlan` groups the
sequence into layers of disjoint pairs by the as-soon-as-possible (ASAP) rule
``layer[r] = max(last[i_r], last[j_r]) + 1``; this reordering leaves the product exactly unchanged.

A plan is immutable: it owns a copy of its pairs. :func:`as_plan` turns raw pairs into plans through a small
cache keyed on their values, so a tensor written in place after use never reaches a cached plan.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .._checks import check_int

__all__ = ["GivensPlan", "as_plan", "asap_layers", "check_pairs", "PlanCaches", "DeviceTensors", "Schedule"]


def check_pairs(pairs: object, d: int | None) -> torch.Tensor:
    """Validate ``(k, 2)`` integer pairs (``0 <= i, j < d``, ``i != j``) and return a CPU ``int64`` copy that the
    caller cannot reach (plans are cached by value and must never see a later in-place write)."""
    if not isinstance(pairs, torch.Tensor):
        raise TypeError(f"pairs must be a torch.Tensor of shape (k, 2), got {type(pairs).__name__}")
    if pairs.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"pairs must have an integer dtype, got {pairs.dtype}")
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape (k, 2), got {tuple(pairs.shape)}")
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
    p = check_pairs(pairs, None)
    last: dict[int, int] = {}
    out = []
    for i, j in p.tolist():
        layer = max(last.get(i, -1), last.get(j, -1)) + 1
        last[i] = layer
        last[j] = layer
        out.append(layer)
    return torch.tensor(out, dtype=torch.long)


@dataclass(frozen=True)
class Schedule:
    """The ASAP layering of a plan (CPU tensors).

    Attributes:
        layer_of: ``(k,)`` layer of every rotation. depth: number of layers.
        perm: ``(k,)`` rotations sorted by layer (stable: product order inside a layer).
        offsets: layer ``l`` holds ``perm[offsets[l]:offsets[l + 1]]`` (``depth + 1`` ints).
        index: ``(2k,)`` gather index, per layer ``[I...; J...]``: the rotation at sorted position ``q`` of a layer
            of ``m`` rotations starting at ``a`` has its ``I`` at ``a + q`` and its ``J`` at ``a + q + m``.
        rot_of_index: ``(2k,)`` rotation of every gather entry. sign_of_index: ``(2k,)`` -1 on I, +1 on J.
    """

    layer_of: torch.Tensor
    depth: int
    perm: torch.Tensor
    offsets: list[int]
    index: torch.Tensor
    rot_of_index: torch.Tensor
    sign_of_index: torch.Tensor

    @staticmethod
    def of(pairs: torch.Tensor) -> Schedule:
        k = int(pairs.shape[0])
        layer_of = asap_layers(pairs) if k else torch.empty(0, dtype=torch.long)
        depth = int(layer_of.max()) + 1 if k else 0
        perm = torch.sort(layer_of, stable=True).indices
        counts = torch.bincount(layer_of, minlength=depth) if depth else torch.zeros(0, dtype=torch.long)
        starts = torch.cumsum(counts, 0) - counts
        offsets = [0] + torch.cumsum(counts, 0).tolist()
        lay = layer_of[perm]
        a, m = starts[lay], counts[lay]
        q = torch.arange(k)
        index = torch.empty(2 * k, dtype=torch.long)
        rot = torch.empty(2 * k, dtype=torch.long)
        sign = torch.empty(2 * k, dtype=torch.float64)
        index[a + q] = pairs[perm, 0]
        index[a + q + m] = pairs[perm, 1]
        rot[a + q] = perm
        rot[a + q + m] = perm
        sign[a + q] = -1.0
        sign[a + q + m] = 1.0
        return Schedule(layer_of, depth, perm, offsets, index, rot, sign)


@dataclass
class DeviceTensors:
    """A plan's tensors on one device, each built on first use.

    Attributes:
        gather: ``(index, rot_of_index, sign_of_index, perm)`` of the layered walk.
        sorted: ``(i, j, offsets, perm)``: the pairs sorted by layer as int32 columns and the int32 offsets (the GPU
            kernels' input).
        layered: the flat positions of every layer's 2 x 2 blocks in the stacked layer matrices, by ``transpose``.
        gpu_banks: the NVRTC kernels' bank-conflict-free schedule, by the number of rotations per phase.
        gpu_blocked: the NVRTC register-blocked kernel's schedule of a blocked plan's groups, ``False`` for a plan
            without that structure, ``None`` until first use.
    """

    gather: tuple[torch.Tensor, ...] | None = None
    sorted: tuple[torch.Tensor, ...] | None = None
    layered: dict[bool, torch.Tensor] = field(default_factory=dict)
    gpu_banks: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    gpu_blocked: Any = None


@dataclass
class CoefficientCache:
    """The compiled CPU kernel's cos / sin of the angles a large plan was last applied with.

    Attributes:
        dtype: the coefficients' dtype. angles: a private copy of those angles (compared by bytes on reuse).
        coefficients: ``(k, 2)`` interleaved cos / sin.
    """

    dtype: torch.dtype
    angles: torch.Tensor
    coefficients: torch.Tensor


class PlanCaches:
    """What the backends compute once per plan. Owned by the plan, never pickled or copied (rebuilt on use).

    Attributes:
        kernel_pairs: the compiled CPU kernel's capsule of validated pairs (or ``None`` until first use).
        kernel_blocks: the compiled kernel's capsule of a register-blocked plan's groups, ``False`` for a plan
            without that structure, ``None`` until first use.
        coefficients: a :class:`CoefficientCache` or ``None``.
        linear_launch: the fused KamaLinear pass's launch settings by batch size, element size, thread count and
            kernel settings (:func:`kama.ops.cpu.linear_forward`).
        devices: :class:`DeviceTensors` by device.
    """

    def __init__(self) -> None:
        self.kernel_pairs: object | None = None
        self.kernel_blocks: object | None = None
        self.coefficients: CoefficientCache | None = None
        self.linear_launch: dict[tuple[int, int, int, int], tuple[object, int, int, int]] = {}
        self.devices: dict[torch.device, DeviceTensors] = {}

    def on(self, device: torch.device) -> DeviceTensors:
        """The :class:`DeviceTensors` of ``device`` (created empty on first use)."""
        hit = self.devices.get(device)
        if hit is None:
            hit = self.devices[device] = DeviceTensors()
        return hit


class GivensPlan:
    """A validated, scheduled sequence of Givens pairs for vectors of dimension ``d``.

    Building a plan validates the pairs; the ASAP layering is computed on first use. ``givens_apply`` accepts a
    plan wherever it accepts pairs (raw pairs are turned into plans through a small cache keyed on their values).

    A plan is immutable: it keeps its own copy of the pairs (a later in-place write to the tensor it was built
    from does not reach it), and :attr:`pairs` returns a fresh copy. It pickles as its ``d`` and pairs; its caches
    (:class:`PlanCaches`) are rebuilt on use.

    Args:
        pairs: ``(k, 2)`` integer tensor, ``0 <= i, j < d``, ``i != j``.
        d: the dimension the plan acts on.

    Attributes:
        d, num_rotations, depth (number of layers), pairs (a CPU ``int64`` copy), layer_of (``(k,)`` layer ids),
        caches (:class:`PlanCaches`).

    Example:
        >>> plan = GivensPlan(torch.tensor([[0, 1], [2, 3], [1, 2]]), d=4)
        >>> plan.depth, plan.num_rotations
        (2, 3)
    """

    def __init__(self, pairs: torch.Tensor, d: int) -> None:
        self.d = check_int("d", d, minimum=1)
        self._pairs = check_pairs(pairs, self.d)
        self.num_rotations = int(self._pairs.shape[0])
        self._schedule: Schedule | None = None
        self.caches = PlanCaches()

    @property
    def schedule(self) -> Schedule:
        """The ASAP :class:`Schedule` (computed on first use)."""
        if self._schedule is None:
            self._schedule = Schedule.of(self._pairs)
        return self._schedule

    @property
    def pairs(self) -> torch.Tensor:
        """The ``(k, 2)`` CPU ``int64`` pairs (a copy: writing to it does not change the plan)."""
        return self._pairs.clone()

    @property
    def pairs_view(self) -> torch.Tensor:
        """The plan's own pairs, for the backends (read only: writing to them would break the plan)."""
        return self._pairs

    layer_of = property(lambda self: self.schedule.layer_of, doc="ASAP layer of every rotation.")
    depth = property(lambda self: self.schedule.depth, doc="Number of ASAP layers.")
    perm = property(lambda self: self.schedule.perm, doc="Rotations sorted by layer.")
    offsets = property(lambda self: self.schedule.offsets, doc="Layer l holds perm[offsets[l]:offsets[l+1]].")
    index = property(lambda self: self.schedule.index, doc="(2k,) gather index, [I...; J...] per layer.")
    rot_of_index = property(lambda self: self.schedule.rot_of_index, doc="Rotation of every gather entry.")
    sign_of_index = property(lambda self: self.schedule.sign_of_index, doc="-1 on I entries, +1 on J.")

    def __repr__(self) -> str:
        return f"GivensPlan(d={self.d}, num_rotations={self.num_rotations})"

    def __getstate__(self) -> dict[str, Any]:
        return {"d": self.d, "pairs": self._pairs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["pairs"], state["d"])  # type: ignore[misc]

    def sorted_pairs(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(i, j, offsets, perm)`` on ``device`` (cached): the pairs sorted by layer as int32 columns, the
        int32 layer offsets ``(depth + 1,)`` and the permutation (rotation of every sorted position)."""
        dev = self.caches.on(device)
        if dev.sorted is None:
            sp = self._pairs[self.perm].to(torch.int32)
            dev.sorted = (sp[:, 0].contiguous().to(device), sp[:, 1].contiguous().to(device),
                          torch.tensor(self.offsets, dtype=torch.int32, device=device), self.perm.to(device))
        return dev.sorted

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(index, rot_of_index, sign_of_index, perm)`` on ``device`` (cached)."""
        dev = self.caches.on(device)
        if dev.gather is None:
            dev.gather = tuple(t.to(device) for t in (self.index, self.rot_of_index, self.sign_of_index, self.perm))
        return dev.gather


class _PlanCache:
    """Plans by ``(d, the pairs' bytes)``: least recently used ones are dropped beyond ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._plans: OrderedDict[tuple[int, bytes], GivensPlan] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, pairs: torch.Tensor, d: int) -> GivensPlan:
        key = (d, pairs.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = GivensPlan(pairs, d)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.size:
                self._plans.popitem(last=False)
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()


PLAN_CACHE = _PlanCache(64)
"""The cache :func:`as_plan` uses (64 plans)."""


def as_plan(pairs: torch.Tensor | GivensPlan, d: int) -> GivensPlan:
    """Return a :class:`GivensPlan` for ``pairs`` acting on dimension ``d`` (cached by the pairs' values).

    Example:
        >>> as_plan(torch.tensor([[0, 1]]), 2) is as_plan(torch.tensor([[0, 1]]), 2)
        True
    """
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
    return PLAN_CACHE.get(pairs, d)
