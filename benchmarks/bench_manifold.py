"""Cost of one Givens coordinate-descent step on SO(d), per rule, against a Riemannian gradient step with the
matrix exponential, measured in one run.

Usage::

    python benchmarks/bench_manifold.py [--d 256] [--steps 200] [--write BENCHMARKS.md]

Structured objective (Brockett, the O(d^2)-per-step path) and the same objective as a generic torch callable
(one autograd gradient per step); medians of per-step wall time over ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from _bench import provenance_lines, write_section
from kama.experiments.rotations import _problem, riemannian_gd
from kama.manifold import givens_coordinate_descent


def per_step(history: list[dict]) -> float:
    times = [h["seconds"] for h in history]
    return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    F, _, f = _problem("brockett", args.d, 0)
    rows = []
    for rule in ("exact", "gradient", "random"):
        res = givens_coordinate_descent(F, d=args.d, steps=args.steps, rule=rule,
                                        generator=torch.Generator().manual_seed(0))
        rows.append((f"structured Brockett, rule={rule}", per_step(res.history)))
    for rule in ("gradient", "random"):
        res = givens_coordinate_descent(f, d=args.d, steps=max(10, args.steps // 10), rule=rule,
                                        generator=torch.Generator().manual_seed(0))
        rows.append((f"generic callable, rule={rule}", per_step(res.history)))
    rgd = riemannian_gd(f, args.d, max(10, args.steps // 10))
    times = [t for t, _ in rgd]
    rows.append(("Riemannian GD, matrix exponential + Armijo", statistics.median(
        b - a for a, b in zip([0.0, *times], times, strict=False))))
    for name, sec in rows:
        print(f"d={args.d} {name}: {1e3 * sec:.3f} ms/step", flush=True)
    cmd = f"python benchmarks/bench_manifold.py --d {args.d} --steps {args.steps} --threads {args.threads}"
    lines = [*provenance_lines(cmd, args.threads),
             f"Median wall time of one step at d = {args.d} (float64).", "", "| method | ms / step |", "|---|---|"]
    lines += [f"| {name} | {1e3 * sec:.3f} |" for name, sec in rows]
    write_section(args.write, "bench_manifold", lines)


if __name__ == "__main__":
    main()
