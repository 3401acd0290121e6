r"""Sampling planes and angles: Kac's walk (i.i.d. pairs), random matchings, live planes for truncated products.

Everything is drawn on the CPU from an explicit ``torch.Generator`` (``None``: the global RNG), in a fixed order,
then moved: a seed gives the same pairs and angles on every device.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_int
from .plans import GivensPlan, as_plan

__all__ = ["default_num_rotations", "random_pairs", "random_matching_pairs", "random_live_pairs", "random_angles",
           "dead_rotations"]


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
    rows = plan.pairs_view.tolist()
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
