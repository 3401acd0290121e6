"""Training throughput (environment steps per second) of PPO and TRPO with KAMA, Toeplitz and MLP policies.

Usage::

    python benchmarks/bench_rl.py [--env Hopper-v5] [--steps 8192] [--repeats 3] [--threads 1]
                                  [--write BENCHMARKS.md]

Each measurement trains a fresh model for ``--steps`` steps (rollouts and updates, SB3 defaults: PPO h = 64,
K = 200; TRPO h = 32, K = 100; the structured policies' default dense critic, and KAMA with a structured critic
as well; ``kama.rl.train.RunConfig``'s defaults for the KAMA layers, ``--normalize`` for ``VecNormalize``) and
reports steps / second. The architectures take turns within each repeat, so that a slow spell of a shared machine
hits them alike; medians over ``--repeats``; ratios against the MLP policy measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _bench import provenance_lines, write_section
from kama.rl.train import RunConfig, make_model


def steps_per_second(env: str, algo: str, arch: str, steps: int, seed: int, normalize: bool) -> float:
    hidden, k = (64, 200) if algo == "ppo" else (32, 100)
    model = make_model(RunConfig(env_id=env, algo=algo, architecture=arch.removesuffix("-sc"), hidden=hidden,
                                 num_rotations=k, structured_critic=arch.endswith("-sc"), normalize=normalize,
                                 seed=seed))
    t0 = time.perf_counter()
    model.learn(steps)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="Hopper-v5")
    ap.add_argument("--steps", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--normalize", action="store_true", help="VecNormalize for every architecture")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    archs = ("mlp", "kama", "toeplitz", "kama-sc")
    for algo in ("ppo", "trpo"):
        times: dict[str, list[float]] = {a: [] for a in archs}
        for seed in range(args.repeats):
            for arch in archs:
                times[arch].append(steps_per_second(args.env, algo, arch, args.steps, seed, args.normalize))
        res = {a: statistics.median(v) for a, v in times.items()}
        for arch in archs:
            print(f"{algo} {arch}: {res[arch]:.0f} steps/s (x{res[arch] / res['mlp']:.2f} vs MLP)", flush=True)
        rows.append((algo, res))
    cmd = (f"python benchmarks/bench_rl.py --env {args.env} --steps {args.steps} --repeats {args.repeats} "
           f"--threads {args.threads}" + (" --normalize" if args.normalize else ""))
    defaults = RunConfig()
    lines = [*provenance_lines(cmd, args.threads),
             f"Environment steps per second while training on {args.env} (rollouts + updates, SB3 defaults; KAMA "
             f"layers with angle_gain={defaults.angle_gain!r}, plane_sampler={defaults.plane_sampler!r}; "
             f"VecNormalize {'on' if args.normalize else 'off'}), median of fresh runs; ratio against the MLP "
             "policy in the same run.", "",
             "| algorithm | MLP steps/s | KAMA steps/s | KAMA / MLP | Toeplitz steps/s | Toeplitz / MLP | "
             "KAMA, structured critic, steps/s | its ratio / MLP |",
             "|---|---|---|---|---|---|---|---|"]
    for algo, r in rows:
        lines.append(f"| {algo.upper()} | {r['mlp']:.0f} | {r['kama']:.0f} | {r['kama'] / r['mlp']:.2f} | "
                     f"{r['toeplitz']:.0f} | {r['toeplitz'] / r['mlp']:.2f} | {r['kama-sc']:.0f} | "
                     f"{r['kama-sc'] / r['mlp']:.2f} |")
    write_section(args.write, "bench_rl", lines)


if __name__ == "__main__":
    main()
