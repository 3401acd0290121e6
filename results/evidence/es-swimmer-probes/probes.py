"""Diagnostic probes of ARS with KAMA policies on Swimmer-v5 (why KAMA stays on the ~33 plateau).

Usage (one run per call; 1M steps take 4-7 minutes on one core of the 2-core machine):

    python probes.py run VARIANT SEED OUT            # VARIANT: see VARIANTS
    python probes.py sensitivity                     # action change per parameter group under ES noise

Variants change one thing of the evidence configuration (h = 16, K = 50, population 16, sigma 0.05,
lr 0.02, action gain 0.01) through public objects: a ``torch.nn.utils.parametrize`` multiplier on a
group (ARS then perturbs ``u`` with ``theta = c u``) or a layer swapped for SB3's dense layer.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

import kama.rl.es as es
from kama import KamaLinear
from kama.rl.policies import structured_layer

VARIANTS = {
    "scale_x_sqrt_n": "every KAMA scalar perturbed in units of sqrt(n) (scale = sqrt(n) u)",
    "scale_and_angles": "as scale_x_sqrt_n, and angles = n / sqrt(2K) u",
    "scale_x_sqrt_n_gain1": "as scale_x_sqrt_n, with action gain 1",
    "h64_k200": "hidden 64, K = 200 (the PPO policy's size)",
    "kama_hidden_dense_head": "KAMA hidden layers, dense action layer",
    "dense_hidden_kama_head": "dense hidden layers, KAMA action layer",
}


class _Mul(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.c

    def right_inverse(self, t: torch.Tensor) -> torch.Tensor:
        return t / self.c


def _patched(variant: str, seed: int):
    orig = es.make_es_model

    def make(cfg: es.ESConfig):
        model = orig(cfg)
        net = model.policy.action_net
        for m in net:
            if isinstance(m, KamaLinear) and variant.startswith("scale_"):
                parametrize.register_parametrization(m, "scale", _Mul(math.sqrt(m.n)))
                if variant == "scale_and_angles":
                    parametrize.register_parametrization(m, "angles", _Mul(m.n / math.sqrt(2 * m.num_rotations)))
        if variant.endswith("_head"):
            torch.manual_seed(seed)  # the swapped-in layers' initialization
        if variant == "kama_hidden_dense_head":
            net[4] = structured_layer("mlp", cfg.hidden, 2, gain=cfg.action_gain)
        if variant == "dense_hidden_kama_head":
            net[0] = structured_layer("mlp", 8, cfg.hidden, gain=math.sqrt(2))
            net[2] = structured_layer("mlp", cfg.hidden, cfg.hidden, gain=math.sqrt(2))
        model.policy._fast = None
        model.weights = torch.nn.utils.parameters_to_vector(model.policy.parameters()).detach()
        model.n_params = len(model.weights)
        return model

    return make


def run(variant: str, seed: int, out: str) -> None:
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}: {sorted(VARIANTS)}")
    hidden, k = (64, 200) if variant == "h64_k200" else (16, 50)
    es.make_es_model = _patched(variant, seed)
    cfg = es.ESConfig(env_id="Swimmer-v5", architecture="kama", hidden=hidden, num_rotations=k,
                      total_timesteps=1_000_000, population=16, sigma=0.05, learning_rate=0.02, eval_every=25_000,
                      eval_episodes=3, seed=seed, action_gain=1.0 if variant.endswith("_gain1") else 0.01)
    es.train_es(cfg, out)


def sensitivity(sigma: float = 0.05) -> None:
    """Mean L2 change of the pre-tanh action over 500 standard-normal observations when ES noise of ``sigma``
    hits one parameter group (10 draws), at the initial parameters, for action gains 0.01 and 1."""
    obs = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    print("| policy | action gain | all groups | per group |\n|---|---|---|---|")
    for arch in ("mlp", "toeplitz", "kama"):
        for gain in (0.01, 1.0):
            pol = es.make_es_model(es.ESConfig(architecture=arch, action_gain=gain, seed=0)).policy
            params = list(pol.parameters())
            theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                def out(v: torch.Tensor, params: list = params, pol: nn.Module = pol) -> torch.Tensor:
                    torch.nn.utils.vector_to_parameters(v, params)
                    return pol.action_net[:-1](obs)

                base = out(theta)
                every = np.mean([(out(theta + sigma * torch.randn(theta.shape, generator=g)) - base).norm(dim=1)
                                 .mean().item() for _ in range(10)])
                groups, off = [], 0
                for name, p in pol.named_parameters():
                    changes = []
                    for _ in range(10):
                        eps = torch.zeros_like(theta)
                        eps[off:off + p.numel()] = sigma * torch.randn(p.numel(), generator=g)
                        changes.append((out(theta + eps) - base).norm(dim=1).mean().item())
                    groups.append(f"{name.removeprefix('action_net.')} {np.mean(changes):.3f}")
                    off += p.numel()
                out(theta)
            print(f"| {arch} | {gain} | {every:.3f} | {', '.join(groups)} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif sys.argv[1:2] == ["sensitivity"]:
        sensitivity()
    else:
        raise SystemExit(__doc__)
