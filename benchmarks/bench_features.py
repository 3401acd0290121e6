"""Featurization speed of the four random matrices (sampling included), measured in one run.

Usage::

    python benchmarks/bench_features.py [--n 10000] [--dims 256 1024 2048] [--threads 1] [--repeats 5]
                                        [--write BENCHMARKS.md]

For every ``d``: the median over ``--repeats`` of sampling an ``m = d`` matrix and computing
``sign(X W^T)`` for ``n`` random points (float32), for URN, ORN, HORN, KAMA (k = ceil(5 d ln d)) and KAMA on
register-blocked plans (``sampler="kama_blocked"``, the same k), and both KAMA speed-ups against URN and ORN in the
same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _bench import provenance_lines, write_section
from kama.experiments.kernel_approx import LABELS, ORDER, featurize_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    samplers = (*ORDER, "kama_blocked")
    rows = []
    for d in args.dims:
        t = {s: featurize_seconds(s, d, args.n, args.repeats, 0) for s in samplers}
        rows.append((d, t))
        print(f"d={d}: " + ", ".join(f"{LABELS[s]} {1e3 * t[s]:.1f} ms" for s in samplers)
              + f"; KAMA x{t['gaussian'] / t['kama']:.2f} vs URN, x{t['orthogonal'] / t['kama']:.2f} vs ORN; "
              f"blocked x{t['gaussian'] / t['kama_blocked']:.2f}, x{t['orthogonal'] / t['kama_blocked']:.2f}",
              flush=True)
    cmd = (f"python benchmarks/bench_features.py --n {args.n} --dims {' '.join(map(str, args.dims))} "
           f"--threads {args.threads} --repeats {args.repeats}")
    lines = [*provenance_lines(cmd, args.threads),
             f"Median ms to sample an m = d matrix and featurize N = {args.n} points with sign(X W^T), float32.", "",
             "| d | " + " | ".join(f"{LABELS[s]} ms" for s in samplers)
             + " | KAMA speed-up vs URN | vs ORN | blocked vs URN | vs ORN |",
             "|---|" + "---|" * (len(samplers) + 4)]
    for d, t in rows:
        lines.append(f"| {d} | " + " | ".join(f"{1e3 * t[s]:.1f}" for s in samplers)
                     + f" | {t['gaussian'] / t['kama']:.2f} | {t['orthogonal'] / t['kama']:.2f}"
                     f" | {t['gaussian'] / t['kama_blocked']:.2f} | {t['orthogonal'] / t['kama_blocked']:.2f} |")
    write_section(args.write, "bench_features", lines)


if __name__ == "__main__":
    main()
