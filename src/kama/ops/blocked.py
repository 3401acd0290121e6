r"""Register-blocked plans: products of Givens rotations built for a CPU's vector registers.

The i.i.d. Kac walk touches two random coordinates per rotation, so every rotation costs two loads and two
stores of the batch tile. A *blocked* plan applies its rotations in groups: each group takes ``BLOCK = 8``
coordinates (its slots ``s_0 .. s_7``) and rotates them 12 times in three butterfly rounds,

.. math::
    (s_0 s_1)(s_2 s_3)(s_4 s_5)(s_6 s_7),\quad (s_0 s_2)(s_1 s_3)(s_4 s_6)(s_5 s_7),\quad
    (s_0 s_4)(s_1 s_5)(s_2 s_6)(s_3 s_7),

each rotation with its own angle; after three rounds every slot depends on all eight. A *phase* draws a uniform
random permutation of the ``d`` coordinates and cuts it into ``d // 8`` disjoint groups (the ``d mod 8`` left over
sit the phase out), so the next phase mixes across the previous phase's groups. The compiled kernel loads a
group's 8 rows into vector registers once, applies the 12 rotations there and stores them once: 16 memory
operations per 12 rotations instead of 48.

A blocked plan is an ordinary sequence of pairs (:func:`blocked_pairs`): every backend and the reference walk
apply it as they apply any plan; the compiled CPU kernel recognizes the structure (:func:`structure`) and runs
the register-blocked walk. It is an option beside the paper's Kac walk, never a silent replacement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_int
from .plans import GivensPlan
from .sampling import _cpu_generator

__all__ = ["BLOCK", "GROUP_ROTATIONS", "blocked_pairs", "BlockedStructure", "structure"]

BLOCK = 8
"""Coordinates per group."""

GROUP_ROTATIONS = 12
"""Rotations per group: three butterfly rounds of four."""

_ROUNDS = ((0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7))


def blocked_pairs(d: int, k: int, *, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    r"""Sample the pairs of a register-blocked plan: ``k`` rotations in groups of 12 on 8 coordinates (see the
    module docstring), groups drawn phase by phase from uniform random permutations of ``[0, d)``.

    The pairs are in product order (``M = G_1 \cdots G_k``; ``G_k`` acts first), like :func:`kama.random_pairs`;
    the first group to act is ``G_k, ..., G_{k-11}``. When ``k`` is not a multiple of 12 the last group to act
    keeps only its first ``k mod 12`` rotations. Drawn on the CPU with ``generator``, then moved to ``device``.

    Shape:
        Output: ``(k, 2)``, ``torch.int64``.

    Example:
        >>> p = blocked_pairs(16, 24, generator=torch.Generator().manual_seed(0))
        >>> p.shape, structure(GivensPlan(p, 16)).groups
        (torch.Size([24, 2]), 2)
    """
    d = check_int("d", d, minimum=1)
    k = check_int("k", k, minimum=0)
    generator = _cpu_generator(generator)
    if k > 0 and d < BLOCK:
        raise ValueError(f"d must be >= {BLOCK} for a blocked plan (groups of {BLOCK} coordinates), got d={d}")
    per_phase = d // BLOCK if d >= BLOCK else 1
    groups = -(-k // GROUP_ROTATIONS)
    rounds = torch.tensor(_ROUNDS, dtype=torch.long)  # (12, 2) slot pairs
    slots: list[torch.Tensor] = []
    while len(slots) * per_phase < groups:
        perm = torch.randperm(d, generator=generator)[: per_phase * BLOCK]
        slots.append(perm.view(per_phase, BLOCK))
    if not slots:
        return torch.empty(0, 2, dtype=torch.long, device=device)
    sl = torch.cat(slots)[:groups]  # (groups, 8), application order
    app = sl[:, rounds].reshape(-1, 2)[:k]  # application order: group after group, rounds in order
    return app.flip(0).contiguous().to(device)  # product order


@dataclass(frozen=True)
class BlockedStructure:
    """The groups of a blocked plan.

    Attributes:
        slots: ``(groups, 8)`` int32 coordinates of every full group, in application order.
        groups: full groups; their rotations are the plan's last ``12 * groups`` (product order).
        tail: rotations after the last full group (the plan's first ``tail``, product order), which the kernel
            applies as the generic walk does.
    """

    slots: torch.Tensor
    groups: int
    tail: int


def structure(plan: GivensPlan) -> BlockedStructure | None:
    """The :class:`BlockedStructure` of ``plan`` if its pairs are those of a blocked plan with at least one full
    group, else ``None`` (checked in ``O(k)`` tensor operations; cache the answer with the plan)."""
    k, d = plan.num_rotations, plan.d
    groups = k // GROUP_ROTATIONS
    if groups == 0 or d < BLOCK:
        return None
    app = plan.pairs_view.flip(0)[: groups * GROUP_ROTATIONS].view(groups, GROUP_ROTATIONS, 2)
    slots = torch.stack([app[:, 0, 0], app[:, 0, 1], app[:, 1, 0], app[:, 1, 1], app[:, 2, 0], app[:, 2, 1],
                         app[:, 3, 0], app[:, 3, 1]], dim=1)  # round 1 names the slots
    rounds = torch.tensor(_ROUNDS, dtype=torch.long)
    if not torch.equal(slots[:, rounds], app):
        return None
    srt = slots.sort(dim=1).values
    if bool((srt[:, 1:] == srt[:, :-1]).any()):  # 8 distinct coordinates per group
        return None
    return BlockedStructure(slots.to(torch.int32).contiguous(), groups, k - groups * GROUP_ROTATIONS)
