r"""The operator: products of Givens rotations applied to batches, with every backend beside its oracle.

The package is laid out by concern:

* :mod:`~kama.ops.plans`: :class:`GivensPlan` (validated pairs, the ASAP schedule, the caches every backend keeps
  on a plan) and :func:`as_plan`.
* :mod:`~kama.ops.sampling`: Kac's walk and the other plane and angle samplers.
* :mod:`~kama.ops.reference`: the pure-PyTorch layered walk, the oracle of every fast path.
* :mod:`~kama.ops.cpu`: the compiled CPU kernel's glue. :mod:`~kama.ops.gpu`: the GPU kernels' glue
  (:mod:`~kama.ops.gpu_nvrtc`, :mod:`~kama.ops.gpu_triton`).
* :mod:`~kama.ops.dispatch`: :func:`givens_apply`, the backends and the one cost model.
* :mod:`~kama.ops.linear`: :func:`kama_linear`, the functional form of :class:`kama.KamaLinear`.
* :mod:`~kama.ops.library`: the registered PyTorch operators (``torch.ops.kama.*``) that ``torch.compile`` and
  ``torch.export`` see.
"""

from __future__ import annotations

from . import library  # noqa: F401  (registers torch.ops.kama.*)
from .blocked import blocked_pairs
from .dispatch import (
    BACKENDS,
    COST_MODEL,
    GEMM_FLOPS,
    WALK_FLOPS,
    CostModel,
    choose_backend,
    cpu_kernel_available,
    cuda_kernel_available,
    givens_apply,
    givens_apply_scaled,
    givens_matrix,
)
from .plans import GivensPlan, as_plan, asap_layers
from .reference import angle_sensitivities, plane_scores
from .sampling import (
    dead_rotations,
    default_num_rotations,
    random_angles,
    random_live_pairs,
    random_matching_pairs,
    random_pairs,
)

__all__ = [
    "BACKENDS",
    "COST_MODEL",
    "CostModel",
    "GEMM_FLOPS",
    "GivensPlan",
    "WALK_FLOPS",
    "angle_sensitivities",
    "as_plan",
    "asap_layers",
    "blocked_pairs",
    "choose_backend",
    "cpu_kernel_available",
    "cuda_kernel_available",
    "dead_rotations",
    "default_num_rotations",
    "givens_apply",
    "givens_apply_scaled",
    "givens_matrix",
    "plane_scores",
    "random_angles",
    "random_live_pairs",
    "random_matching_pairs",
    "random_pairs",
]
