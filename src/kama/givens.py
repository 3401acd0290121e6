"""Products of Givens rotations: the public operator API (an alias of :mod:`kama.ops`, kept for imports written
against earlier versions; new code imports from :mod:`kama` or :mod:`kama.ops`).

Example:
    >>> import torch
    >>> from kama.givens import givens_apply
    >>> givens_apply(torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]]), torch.tensor([0.0]))
    tensor([[1., 0.]])
"""

from __future__ import annotations

from .ops import *  # noqa: F403
from .ops import __all__  # noqa: F401
