"""Single-observation policy inference: the PPO-size actor (obs 17 -> 64 -> 64 -> 6, K = 200) through
:class:`kama.rl.fast.FastActor` (materialized matrices in NumPy) against the torch forward of the MLP policy's
actor, and rollout throughput against environment-only stepping, measured in one run.

Usage::

    python benchmarks/bench_inference.py [--env HalfCheetah-v5] [--calls 20000] [--steps 5000]
                                         [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO

from _bench import provenance_lines, write_section
from kama.rl import KamaActorCriticPolicy
from kama.rl.fast import FastActor


def per_call_us(fn, x, calls: int, repeats: int = 5) -> float:
    for _ in range(200):
        fn(x)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x)
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(out)


def rollout_steps_per_second(env_id: str, act, steps: int) -> float:
    env = gym.make(env_id)
    obs, _ = env.reset(seed=0)
    t0 = time.perf_counter()
    for _ in range(steps):
        obs, _, term, trunc, _ = env.step(act(obs))
        if term or trunc:
            obs, _ = env.reset()
    env.close()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="HalfCheetah-v5")
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = {arch: PPO(KamaActorCriticPolicy, args.env, device="cpu",
                        policy_kwargs={"architecture": arch, "hidden": 64, "num_rotations": 200})
              for arch in ("kama", "mlp")}
    obs_dim = models["kama"].observation_space.shape[0]
    x = np.random.default_rng(0).normal(size=obs_dim)
    mlp = models["mlp"].policy

    def torch_mlp(o):
        with torch.no_grad():
            return mlp.action_net(mlp.mlp_extractor.forward_actor(torch.as_tensor(o, dtype=torch.float32)))

    kama_policy = models["kama"].policy

    def torch_kama(o):
        with torch.no_grad():
            return kama_policy.action_net(kama_policy.mlp_extractor.forward_actor(
                torch.as_tensor(o, dtype=torch.float32)))

    fast = FastActor.from_policy(kama_policy)
    t_fast = per_call_us(fast, x, args.calls)
    t_mlp = per_call_us(torch_mlp, x, args.calls // 4)
    t_kama = per_call_us(torch_kama, x, args.calls // 4)
    zero_action = np.zeros(models["kama"].action_space.shape[0])
    env_only = rollout_steps_per_second(args.env, lambda o: zero_action, args.steps)
    with_fast = rollout_steps_per_second(args.env, fast, args.steps)  # MuJoCo clamps controls to their range
    print(f"FastActor (KAMA) {t_fast:.2f} us/obs; torch MLP actor {t_mlp:.2f} us ({t_mlp / t_fast:.1f}x); "
          f"torch KAMA actor {t_kama:.2f} us; rollout {with_fast:.0f} steps/s with the KAMA policy vs "
          f"{env_only:.0f} env-only ({env_only / with_fast:.3f}x)")
    cmd = f"python benchmarks/bench_inference.py --env {args.env} --calls {args.calls} --steps {args.steps}"
    lines = [*provenance_lines(cmd, 1),
             f"Single-observation forward of the PPO-size actor ({obs_dim} -> 64 -> 64 -> 6, K = 200), median "
             "microseconds per call, and rollout throughput with the policy in the loop.", "",
             "| what | value |", "|---|---|",
             f"| `FastActor` (KAMA, NumPy, materialized) | {t_fast:.2f} us |",
             f"| torch forward, MLP actor (`nn.Linear`) | {t_mlp:.2f} us |",
             f"| torch forward, KAMA actor | {t_kama:.2f} us |",
             f"| speed-up of `FastActor` over the torch MLP actor | {t_mlp / t_fast:.1f}x |",
             f"| environment-only steps/s ({args.env}) | {env_only:.0f} |",
             f"| steps/s with the KAMA `FastActor` in the loop | {with_fast:.0f} |",
             f"| env-only / with-policy | {env_only / with_fast:.3f} |"]
    write_section(args.write, "bench_inference", lines)


if __name__ == "__main__":
    main()
