"""kama-nn: KAMA-NNs, neural networks built from products of low-dimensional (Givens) rotations.

Reference implementation of Choromanski, Pacchiano, Pennington and Tang, "KAMA-NNs: low-dimensional
rotation based neural networks" (AISTATS 2019).
"""

from __future__ import annotations

from .givens import (
    BACKENDS,
    GivensPlan,
    asap_layers,
    default_num_rotations,
    givens_apply,
    givens_matrix,
    random_angles,
    random_matching_pairs,
    random_pairs,
)
from .nn import KamaLinear, ToeplitzLinear

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "GivensPlan",
    "KamaLinear",
    "ToeplitzLinear",
    "asap_layers",
    "default_num_rotations",
    "givens_apply",
    "givens_matrix",
    "random_angles",
    "random_matching_pairs",
    "random_pairs",
    "__version__",
]
