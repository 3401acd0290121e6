r"""Plane re-selection for :class:`kama.KamaLinear` with ``learn_planes=True`` (the paper's section 6.3).

Every ``update_every`` training forward passes, the backward pass scores ``candidates`` random planes per rotation
by the directional derivative of the loss (:func:`kama.ops.plane_scores`: the coordinate of the Riemannian
gradient that Algorithm 1 maximizes); each *idle* rotation (``|sin(t/2)| <= tol``, within ``tol`` of the identity)
moves to its best candidate if that beats its current plane (greedily: at most ``ceil(k / 8)`` rotations per
update, largest gain first, as Algorithm 1 picks one), with its angle reset to 0, so the function changes by at
most the idle rotations' tiny angles. The change is applied at the start of the next forward pass.

A :class:`PlaneSelector` is the unit a layer owns: it hooks the layer's forward (module hooks), so the layer's
``forward`` stays one call to :func:`kama.ops.kama_linear`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .ops import plane_scores, random_pairs
from .ops.linear import pad_input

__all__ = ["PlaneSelector"]


class PlaneSelector:
    """The plane re-selection schedule and state of one layer.

    Args:
        num_rotations: ``k`` of the layer.
        update_every: training forward passes between re-selections.
        candidates: random candidate planes scored per rotation.
        tol: a rotation is idle when ``|sin(t / 2)| <= tol``.
        seed: seed of the candidate planes (one generator per training step).

    Attributes:
        steps: training forward passes seen; max_moves: rotations moved per update at most.
    """

    def __init__(self, num_rotations: int, update_every: int, candidates: int, tol: float, seed: int = 0) -> None:
        self.update_every, self.candidates, self.tol, self.seed = update_every, candidates, tol, seed
        self.max_moves = max(1, math.ceil(num_rotations / 8))
        self.steps = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._record = False

    def attach(self, layer: nn.Module) -> None:
        """Hook the layer's forward: apply pending moves before it, propose new ones from its gradient after."""
        layer.register_forward_pre_hook(self.before_forward)
        layer.register_forward_hook(self.after_forward)

    def reset(self, seed: int) -> None:
        self.seed, self._pending = seed, None

    def before_forward(self, layer: Any, inputs: tuple) -> None:
        self.apply_pending(layer)
        self._record = False
        if layer.training and torch.is_grad_enabled() and layer.num_rotations > 0:
            self._record = self.steps % self.update_every == 0
            self.steps += 1

    def after_forward(self, layer: Any, inputs: tuple, output: torch.Tensor) -> None:
        if self._record and output.requires_grad:
            x = inputs[0].detach()
            output.register_hook(lambda g: self.propose(layer, x, g))
        self._record = False

    def _candidate_planes(self, layer: Any) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + self.steps)
        k, c = layer.num_rotations, self.candidates
        return random_pairs(layer.n, k * c, generator=gen).view(k, c, 2)

    def choose(self, layer: Any, x: torch.Tensor, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rotations, new planes)`` from an input batch and the gradient of the loss w.r.t. the output."""
        with torch.no_grad():
            xp = pad_input(x, layer.scale, layer.out_features, layer.n)
            g = grad_output
            if layer.out_features <= layer.in_features:  # the gradient w.r.t. the rotated (pre-truncation) state
                g = F.pad(g * layer.scale, (0, layer.n - layer.out_features))
            cand = self._candidate_planes(layer).to(xp.device)
            theta = layer.rotation_angles().detach()
            scores, current = plane_scores(xp.reshape(-1, layer.n), g.reshape(-1, layer.n), layer.pairs, theta, cand)
            best = scores.abs().argmax(dim=1)
            best_score = scores.abs().gather(1, best[:, None])[:, 0]
            idle = torch.sin(theta.to(scores.dtype) / 2).abs() <= self.tol
            gain = torch.where(idle & (best_score > current.abs()), best_score - current.abs(), -1.0)
            # Greedy, as Algorithm 1: move only the rotations with the largest gains (at most max_moves).
            top = torch.topk(gain, min(self.max_moves, gain.numel())).indices
            rows = top[gain[top] > 0]
            return rows, cand[rows, best[rows]]

    def propose(self, layer: Any, x: torch.Tensor, grad_output: torch.Tensor) -> None:
        self._pending = self.choose(layer, x, grad_output)

    def apply_pending(self, layer: Any) -> int:
        """Move the rotations chosen by the last proposal; returns how many moved."""
        pending, self._pending = self._pending, None
        if pending is None:
            return 0
        rows, new = pending
        if rows.numel():
            with torch.no_grad():
                layer.pairs[rows] = new.to(layer.pairs.device)
                layer.angles[rows] = 0
        return int(rows.numel())
