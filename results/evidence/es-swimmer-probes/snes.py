"""Probe: separable NES (per-parameter adaptive perturbation scales) on the same policies as the ARS evidence.

    python snes.py ARCH SEED OUT [STEPS [K [GAIN]]]     # ARCH: kama | toeplitz | mlp; K = 50, GAIN = 0.01

SNES (Schaul et al. 2011; Wierstra et al. 2014): a Gaussian search distribution N(mu, diag(sigma^2)) over the
policy's parameter vector; mirrored samples; rank utilities; mu += sigma * sum_i u_i z_i and
sigma *= exp(eta_sigma / 2 * sum_i u_i (z_i^2 - 1)), eta_sigma = (3 + ln n) / (5 sqrt n). Observations are
normalized by running statistics of every rollout (as ARS / VecNormalize do), actions by the policy's tanh.
Evaluation: every ~25k steps, 3 deterministic episodes of mu on a separately seeded environment, with the
statistics frozen. Writes OUT/returns.csv in the evidence format.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from kama.rl.es import ESConfig, make_es_model


class RunningNorm:
    def __init__(self, n: int) -> None:
        self.count, self.mean, self.m2 = 1e-4, np.zeros(n), np.ones(n)

    def update(self, obs: np.ndarray) -> None:
        b = obs.shape[0]
        bm, bv = obs.mean(0), obs.var(0)
        delta, tot = bm - self.mean, self.count + b
        self.mean = self.mean + delta * b / tot
        self.m2 = self.m2 * self.count + bv * b + delta ** 2 * self.count * b / tot
        self.m2 /= tot
        self.count = tot

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return np.clip((obs - self.mean) / np.sqrt(self.m2 + 1e-8), -10, 10)


def episode(env: gym.Env, policy, norm: RunningNorm, seed: int | None, record: list | None) -> tuple[float, int]:
    obs, _ = env.reset(seed=seed)
    total, steps, done = 0.0, 0, False
    fast = policy._fast_actor()
    while not done:
        if record is not None:
            record.append(obs)
        act = fast(norm(obs).astype(np.float32))
        obs, r, term, trunc, _ = env.step(policy.unscale_action(np.asarray(act)))
        total += float(r)
        steps += 1
        done = term or trunc
    return total, steps


def main(arch: str, seed: int, out: str, budget: int = 1_000_000, k: int = 50, gain: float = 0.01) -> None:
    model = make_es_model(ESConfig(architecture=arch, hidden=16, num_rotations=k, action_gain=gain, seed=seed))
    policy = model.policy
    mu = torch.nn.utils.parameters_to_vector(policy.parameters()).detach().double().numpy().copy()
    n = mu.size
    sigma = np.full(n, 0.05)
    pairs = max(2, (4 + int(3 * math.log(n))) // 2)
    lam = 2 * pairs
    ranks = np.arange(1, lam + 1)
    util = np.maximum(0.0, math.log(lam / 2 + 1) - np.log(ranks))
    util = util / util.sum() - 1.0 / lam
    eta_sigma = (3 + math.log(n)) / (5 * math.sqrt(n))
    rng = np.random.default_rng(seed)
    env, eval_env = gym.make("Swimmer-v5"), gym.make("Swimmer-v5")
    env.reset(seed=seed + 1)
    norm = RunningNorm(env.observation_space.shape[0])
    rows, steps, next_eval, t0 = [], 0, 0, time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)

    def evaluate() -> None:
        policy.load_from_vector(mu.astype(np.float32))
        rets = [episode(eval_env, policy, norm, 10_000 + seed + e, None)[0] for e in range(3)]
        rows.append({"timesteps": steps, "mean_return": float(np.mean(rets)), "std_return": float(np.std(rets)),
                     "episodes": 3, "wall_seconds": time.perf_counter() - t0})
        with open(Path(out) / "returns.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    while steps < budget:
        if steps >= next_eval:
            evaluate()
            next_eval += 25_000
        z = rng.standard_normal((pairs, n))
        z = np.concatenate([z, -z])
        fit, seen = np.empty(lam), []
        for i in range(lam):
            policy.load_from_vector((mu + sigma * z[i]).astype(np.float32))
            fit[i], st = episode(env, policy, norm, None, seen)
            steps += st
        norm.update(np.asarray(seen))
        order = np.argsort(-fit)  # best first
        u = np.empty(lam)
        u[order] = util
        mu = mu + sigma * (u @ z)
        sigma = sigma * np.exp(0.5 * eta_sigma * (u @ (z ** 2 - 1)))
    evaluate()
    names = [name for name, _ in policy.named_parameters()]
    sizes = [p.numel() for p in policy.parameters()]
    bounds = np.cumsum([0, *sizes])
    print({nm: round(float(sigma[a:b].mean()), 4) for nm, a, b in zip(names, bounds[:-1], bounds[1:], strict=True)})


if __name__ == "__main__":
    a = sys.argv
    main(a[1], int(a[2]), a[3], int(a[4]) if len(a) > 4 else 1_000_000, int(a[5]) if len(a) > 5 else 50,
         float(a[6]) if len(a) > 6 else 0.01)
