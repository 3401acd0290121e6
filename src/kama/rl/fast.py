r"""Fast single-observation inference for compact policies (rollouts of evolution strategies, evaluation).

A :class:`FastActor` holds the actor's matrices materialized once (``to_dense()`` of the KAMA / Toeplitz
layers, the weights of dense ones) as contiguous NumPy arrays and evaluates
:math:`a = W_3\, \sigma(W_2\, \sigma(W_1 x + b_1) + b_2) + b_3` with no PyTorch dispatch or autograd overhead.
For these sizes (17 -> 64 -> 64 -> 6) three small mat-vecs cost far less than applying 200 rotations per layer
through any framework call, so the materialized form is the fast one. Rebuild it (:meth:`FastActor.refresh`)
after the policy's parameters change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..nn import KamaLinear, ToeplitzLinear

__all__ = ["FastActor"]

_LAYERS = (nn.Linear, KamaLinear, ToeplitzLinear)
_ACTIVATIONS = {nn.Tanh: np.tanh, nn.ReLU: lambda v: np.maximum(v, 0.0), nn.Identity: lambda v: v}


class FastActor:
    """Deterministic action of a feed-forward actor in NumPy (float64 by default).

    Args:
        modules: the actor as a sequence of linear-like layers (``nn.Linear``, ``KamaLinear``,
            ``ToeplitzLinear``) and activations (``Tanh``, ``ReLU``, ``Identity``), in order.
        dtype: NumPy dtype of the computation.

    Example:
        >>> import kama
        >>> net = [kama.KamaLinear(4, 8), torch.nn.Tanh(), kama.KamaLinear(8, 2)]
        >>> fast = FastActor(net)
        >>> x = np.ones(4)
        >>> bool(np.allclose(fast(x), torch.nn.Sequential(*net)(torch.ones(4)).detach().numpy(), atol=1e-6))
        True
    """

    def __init__(self, modules: Sequence[nn.Module], dtype: type = np.float64) -> None:
        self.modules = list(modules)
        self.dtype = dtype
        for m in self.modules:
            if not isinstance(m, _LAYERS) and type(m) not in _ACTIVATIONS:
                raise TypeError(f"unsupported module {type(m).__name__}: expected linear-like layers and "
                                f"{[a.__name__ for a in _ACTIVATIONS]}")
        self.refresh()

    @classmethod
    def from_policy(cls, policy: Any, dtype: type = np.float64) -> FastActor:
        """The actor of a :class:`kama.rl.KamaActorCriticPolicy` (or of SB3's ``ActorCriticPolicy`` with an MLP
        extractor): ``mlp_extractor.policy_net`` followed by ``action_net`` (the Gaussian mean)."""
        return cls([*policy.mlp_extractor.policy_net, policy.action_net], dtype=dtype)

    def refresh(self) -> None:
        """Re-materialize the matrices from the current parameters."""
        self._ops: list[tuple[str, Any, Any]] = []
        with torch.no_grad():
            for m in self.modules:
                if isinstance(m, _LAYERS):
                    w = m.weight if isinstance(m, nn.Linear) else (
                        m.to_dense(backend="auto") if isinstance(m, KamaLinear) else m.to_dense())
                    b = m.bias
                    self._ops.append(("linear", np.ascontiguousarray(w.detach().cpu().numpy(), dtype=self.dtype),
                                      None if b is None else b.detach().cpu().numpy().astype(self.dtype)))
                else:
                    self._ops.append(("act", _ACTIVATIONS[type(m)], None))
        # Preallocated buffers for one observation: no temporary arrays on the hot path of rollouts.
        self._bufs: list[Any] = [np.empty(op[1].shape[0], dtype=self.dtype) if op[0] == "linear" else None
                                 for op in self._ops]

    def _single(self, v: Any) -> np.ndarray:
        own = False  # v is one of our buffers (or a fresh array): activations may run in place
        for (kind, a, b), buf in zip(self._ops, self._bufs, strict=True):
            if kind == "linear":
                np.dot(a, v, out=buf)
                if b is not None:
                    buf += b
                v, own = buf, True
            elif a is np.tanh and own:
                np.tanh(v, out=v)
            else:
                v, own = a(v), True
        return v

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """Action for one observation ``(obs_dim,)`` or a batch ``(n, obs_dim)`` (a new array)."""
        v: Any = np.asarray(obs, dtype=self.dtype)
        if v.ndim == 1:
            return self._single(v).copy()
        for kind, a, b in self._ops:
            if kind == "linear":
                v = a @ v if v.ndim == 1 else v @ a.T
                if b is not None:
                    v += b
            else:
                v = a(v)
        return v
