"""Speed of ``givens_apply`` against a dense ``nn.Linear`` of the same size, measured in the same run.

Usage::

    python benchmarks/bench_givens.py [--dims 64 256 1024] [--batches 1 64 256 1024] [--threads 1]
                                      [--repeats 7] [--write BENCHMARKS.md]

For every ``d`` and batch ``B``: ``k = ceil(5 d ln d)`` i.i.d. random pairs; the median over ``--repeats`` of
the forward time and of forward + backward (gradients w.r.t. input and angles; for ``nn.Linear`` w.r.t. input,
weight and bias) for each backend, the ratio ``nn.Linear time / backend time`` (> 1: the backend is faster),
and the effective GFLOP/s counting 6 flops per rotation per vector. Also the RL-size ``KamaLinear``
(64 x 64, k = 200, batch 64) against ``nn.Linear(64, 64)``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import time
from pathlib import Path

import torch

import kama
from kama.experiments.base import git_commit

MARK_BEGIN = "<!-- bench_givens:begin -->"
MARK_END = "<!-- bench_givens:end -->"


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (plans are cached, allocator warmed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_case(d: int, batch: int, backends: list[str], repeats: int) -> list[dict]:
    k = math.ceil(5 * d * math.log(d))
    g = torch.Generator().manual_seed(0)
    plan = kama.GivensPlan(kama.random_pairs(d, k, generator=g), d)
    angles = kama.random_angles(k, generator=g).requires_grad_(True)
    x = torch.randn(batch, d, generator=g, requires_grad=True)
    lin = torch.nn.Linear(d, d)
    rows = []

    def lin_fwd():
        with torch.no_grad():
            lin(x)

    def lin_fb():
        lin(x).sum().backward()

    t_lin_f = median_time(lin_fwd, repeats)
    t_lin_fb = median_time(lin_fb, repeats)
    for be in backends:
        def fwd(be=be):
            with torch.no_grad():
                kama.givens_apply(x, plan, angles, backend=be)

        def fb(be=be):
            kama.givens_apply(x, plan, angles, backend=be).sum().backward()

        t_f = median_time(fwd, repeats)
        t_fb = median_time(fb, repeats)
        rows.append({"d": d, "k": k, "depth": plan.depth, "batch": batch, "backend": be,
                     "fwd_ms": 1e3 * t_f, "linear_fwd_ms": 1e3 * t_lin_f, "fwd_speedup": t_lin_f / t_f,
                     "fb_ms": 1e3 * t_fb, "linear_fb_ms": 1e3 * t_lin_fb, "fb_speedup": t_lin_fb / t_fb,
                     "gflops": 6 * k * batch / t_f / 1e9})
    return rows


def bench_rl(repeats: int) -> dict:
    layer = kama.KamaLinear(64, 64, num_rotations=200, generator=torch.Generator().manual_seed(0))
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(64, 64)
    t_k = median_time(lambda: layer(x).sum().backward(), repeats * 5)
    t_l = median_time(lambda: lin(x).sum().backward(), repeats * 5)
    return {"kama_fb_ms": 1e3 * t_k, "linear_fb_ms": 1e3 * t_l, "ratio": t_k / t_l}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 1024])
    ap.add_argument("--backends", nargs="+", default=["reference", "dense"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--write", type=Path, default=None, help="update this Markdown file's bench_givens section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for d in args.dims:
        for b in args.batches:
            rows += bench_case(d, b, args.backends, args.repeats)
            r = rows[-len(args.backends):]
            print(" | ".join(f"d={x['d']} B={x['batch']} {x['backend']}: fwd {x['fwd_ms']:.2f} ms "
                             f"(x{x['fwd_speedup']:.2f} vs Linear), f+b {x['fb_ms']:.2f} ms "
                             f"(x{x['fb_speedup']:.2f})" for x in r), flush=True)
    rl = bench_rl(args.repeats)
    print(f"RL-size KamaLinear(64, 64, k=200), batch 64, fwd+bwd: {rl['kama_fb_ms']:.3f} ms vs nn.Linear "
          f"{rl['linear_fb_ms']:.3f} ms (KAMA / Linear = {rl['ratio']:.2f})")
    cmd = "python benchmarks/bench_givens.py " + " ".join(
        [f"--dims {' '.join(map(str, args.dims))}", f"--batches {' '.join(map(str, args.batches))}",
         f"--backends {' '.join(args.backends)}", f"--threads {args.threads}", f"--repeats {args.repeats}"])
    lines = [
        MARK_BEGIN,
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
        f"commit `{git_commit()}`; {datetime.date.today().isoformat()}.  ",
        "Times are medians; *speed-up* = nn.Linear time / backend time in the same run (> 1 is faster than "
        "dense). k = ceil(5 d ln d); GFLOP/s count 6 flops per rotation per vector (forward).",
        "",
        "| d | k | layers | batch | backend | fwd ms | Linear fwd ms | fwd speed-up | fwd+bwd ms | "
        "Linear fwd+bwd ms | fwd+bwd speed-up | GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['d']} | {r['k']} | {r['depth']} | {r['batch']} | {r['backend']} | {r['fwd_ms']:.3f} | "
                     f"{r['linear_fwd_ms']:.3f} | {r['fwd_speedup']:.3f} | {r['fb_ms']:.3f} | "
                     f"{r['linear_fb_ms']:.3f} | {r['fb_speedup']:.3f} | {r['gflops']:.2f} |")
    lines += ["", f"RL size, `KamaLinear(64, 64, num_rotations=200)` at batch 64, forward + backward: "
                  f"{rl['kama_fb_ms']:.3f} ms vs `nn.Linear(64, 64)` {rl['linear_fb_ms']:.3f} ms "
                  f"(KAMA / Linear = {rl['ratio']:.2f}).", MARK_END]
    if args.write:
        text = args.write.read_text() if args.write.exists() else "# Benchmarks\n"
        block = "\n".join(lines)
        if MARK_BEGIN in text and MARK_END in text:
            a, b = text.index(MARK_BEGIN), text.index(MARK_END) + len(MARK_END)
            text = text[:a] + block + text[b:]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        args.write.write_text(text)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
