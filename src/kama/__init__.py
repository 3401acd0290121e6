"""kama-nn: KAMA-NNs, neural networks built from products of low-dimensional (Givens) rotations.

Reference implementation of Choromanski, Pacchiano, Pennington and Tang, "KAMA-NNs: low-dimensional
rotation based neural networks" (AISTATS 2019).
"""

from __future__ import annotations

from .nn import PAPER_SETTINGS, KamaLinear, ToeplitzLinear, to_linear
from .ops import (
    BACKENDS,
    GivensPlan,
    asap_layers,
    blocked_pairs,
    dead_rotations,
    default_num_rotations,
    givens_apply,
    givens_matrix,
    random_angles,
    random_live_pairs,
    random_matching_pairs,
    random_pairs,
)
from .ops.linear import kama_linear

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "GivensPlan",
    "KamaLinear",
    "PAPER_SETTINGS",
    "ToeplitzLinear",
    "asap_layers",
    "blocked_pairs",
    "dead_rotations",
    "default_num_rotations",
    "givens_apply",
    "givens_matrix",
    "kama_linear",
    "random_angles",
    "random_live_pairs",
    "random_matching_pairs",
    "random_pairs",
    "to_linear",
    "__version__",
]
