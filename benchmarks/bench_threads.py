"""Thread scaling of the compiled kernel's forward: one thread against ``--threads`` threads in alternating rounds.

Usage::

    python benchmarks/bench_threads.py [--dims 256 1024 4096] [--batches 256 1024] [--threads 2]
                                       [--plans kac blocked] [--rounds 9] [--write BENCHMARKS.md]

``bench_givens.py`` times every one-thread row before any row with more threads, minutes apart, so on a shared
machine whose one-thread times drift by 20-30 % within an hour the ratio of two of its rows carries that drift.
Here every round times the forward (``k = ceil(5 d ln d)`` rotations, no gradient) with one thread and then with
``--threads`` threads on the same tensors, back to back, and ``nn.Linear`` of the same size the same way; the
table gives each one's median time and the median and range of the per-round speed-ups (one-thread time /
many-thread time: 2 is perfect scaling on two threads).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

import kama
from _bench import make_plan, provenance_lines, write_section
from _timing import median_time


def scaling(fn: Callable[[], object], threads: int, rounds: int, repeats: int) -> dict:
    """Per-round times of ``fn`` with 1 and ``threads`` threads, alternating; medians and per-round speed-ups."""
    one, many = [], []
    for _ in range(rounds):
        for n, out in ((1, one), (threads, many)):
            torch.set_num_threads(n)
            out.append(median_time(fn, repeats))
    ratios = [a / b for a, b in zip(one, many, strict=True)]
    return {"one_ms": 1e3 * statistics.median(one), "many_ms": 1e3 * statistics.median(many),
            "speedup": statistics.median(ratios), "low": min(ratios), "high": max(ratios)}


def bench_case(d: int, batch: int, family: str, threads: int, rounds: int, repeats: int) -> dict:
    k = math.ceil(5 * d * math.log(d))
    g = torch.Generator().manual_seed(0)
    plan = make_plan(family, d, k, g)
    angles = kama.random_angles(k, generator=g)
    x = torch.randn(batch, d, generator=g)
    lin = torch.nn.Linear(d, d)

    def walk() -> None:
        kama.givens_apply(x, plan, angles, backend="cpu")

    def dense() -> None:
        lin(x)

    with torch.no_grad():
        kernel = scaling(walk, threads, rounds, repeats)
        linear = scaling(dense, threads, rounds, repeats)
    return {"d": d, "batch": batch, "plans": family, "kernel": kernel, "linear": linear}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plans", nargs="+", default=["kac", "blocked"], choices=["kac", "blocked"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    if args.threads < 2:
        ap.error(f"--threads must be at least 2, got {args.threads}")
    rows = []
    for family in args.plans:
        for d in args.dims:
            for batch in args.batches:
                r = bench_case(d, batch, family, args.threads, args.rounds, args.repeats)
                kr, lr = r["kernel"], r["linear"]
                print(f"{family} d={d} B={batch}: {kr['one_ms']:.3f} -> {kr['many_ms']:.3f} ms, x{kr['speedup']:.2f} "
                      f"({kr['low']:.2f}-{kr['high']:.2f}); nn.Linear x{lr['speedup']:.2f}", flush=True)
                rows.append(r)
    torch.set_num_threads(1)
    cmd = (f"python benchmarks/bench_threads.py --dims {' '.join(map(str, args.dims))} --batches "
           f"{' '.join(map(str, args.batches))} --threads {args.threads} --plans {' '.join(args.plans)} "
           f"--rounds {args.rounds} --repeats {args.repeats}")
    n = args.threads
    lines = [*provenance_lines(cmd, f"1 and {n}"),
             f"Forward (no gradient), `backend=\"cpu\"`, k = ceil(5 d ln d); each of {args.rounds} rounds times 1 "
             f"thread, then {n}, back to back (medians of {args.repeats} samples each); *speed-up* = 1-thread time / "
             f"{n}-thread time per round: its median and its range over the rounds; `nn.Linear` of the same size "
             "timed the same way.", "",
             f"| plans | d | batch | 1 thread ms | {n} threads ms | speed-up | range | nn.Linear speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kr, lr = r["kernel"], r["linear"]
        lines.append(f"| {r['plans']} | {r['d']} | {r['batch']} | {kr['one_ms']:.3f} | {kr['many_ms']:.3f} | "
                     f"{kr['speedup']:.2f} | {kr['low']:.2f}-{kr['high']:.2f} | {lr['speedup']:.2f} |")
    write_section(args.write, "bench_threads", lines)


if __name__ == "__main__":
    main()
