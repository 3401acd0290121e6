"""This checkout's `givens_apply` against an older commit's on the same machine, in alternating processes.

Usage::

    git worktree add /tmp/base <commit> && (cd /tmp/base && python setup.py build_ext --inplace)
    python benchmarks/bench_vs_commit.py --baseline /tmp/base [--dims 1024 4096] [--batch 256] [--fb-batch 1024]
                                         [--rounds 3] [--repeats 7] [--threads 1] [--write BENCHMARKS.md]

Issue 17 asks the register-blocked plans for at least 2x the kernel of the day the issue was filed (826027c) at
``d >= 1024`` on the same machine. Timing two builds in one process is impossible (one ``kama`` per process), and a
machine's clock drifts by 20-30 % within minutes, so the script runs ``--rounds`` rounds, each one process of the
baseline checkout and one of this checkout, and every process times ``nn.Linear`` on the same shapes beside the
walk. Every process reads the same plans and angles (drawn here, saved to a temporary file): the Kac walk's
``k = 5 d ln d`` i.i.d. pairs and, in this checkout only, register-blocked plans with the same ``k``. Rows: forward
at batch ``--batch``, forward + backward (input and angle gradients) at ``--fb-batch``; the medians over rounds of
each process's median time, GFLOP/s (6 flops per rotation and vector) and the ratio to ``nn.Linear`` measured in
the same process; the last column is each row's speed-up over the baseline's Kac walk.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _timing import median_time


def time_case(kama, case: dict, repeats: int) -> dict:
    """The walk's and ``nn.Linear``'s median times on one case, interleaved so that a clock change touches both."""
    d, batch, k, fb = case["d"], case["batch"], case["k"], case["fb"]
    plan = kama.GivensPlan(case["pairs"], d)
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(0))
    lin = torch.nn.Linear(d, d)
    if fb:
        xg, ag = x.clone().requires_grad_(), case["angles"].clone().requires_grad_()

        def walk() -> None:
            kama.givens_apply(xg, plan, ag, backend="cpu").sum().backward()

        def dense() -> None:
            lin(xg).sum().backward()
    else:
        def walk() -> None:
            with torch.no_grad():
                kama.givens_apply(x, plan, case["angles"], backend="cpu")

        def dense() -> None:
            with torch.no_grad():
                lin(x)
    t_walk, t_dense = [], []
    for _ in range(3):
        t_walk.append(median_time(walk, repeats))
        t_dense.append(median_time(dense, repeats))
    tw, td = statistics.median(t_walk), statistics.median(t_dense)
    flops = 6 * k * batch * (3 if fb else 1)
    return {"family": case["family"], "d": d, "batch": batch, "fb": fb, "ms": 1e3 * tw, "gflops": flops / tw / 1e9,
            "ratio": td / tw}


def child(cases_path: str, repeats: int, threads: int) -> None:
    """Time the saved cases with whichever ``kama`` this process imports; one JSON line per case on stdout."""
    import kama

    torch.set_num_threads(threads)
    for case in torch.load(cases_path):
        if case["family"] == "blocked" and not hasattr(kama, "blocked_pairs"):
            continue
        print(json.dumps(time_case(kama, case, repeats)), flush=True)


def make_cases(dims: list[int], batch: int, fb_batch: int) -> list[dict]:
    import kama

    cases = []
    for d in dims:
        k = math.ceil(5 * d * math.log(d))
        g = torch.Generator().manual_seed(d)
        kac, blocked = kama.random_pairs(d, k, generator=g), kama.blocked_pairs(d, k, generator=g)
        angles = kama.random_angles(k, generator=g)
        for fb, b in ((False, batch), (True, fb_batch)):
            cases.append({"family": "kac", "d": d, "batch": b, "k": k, "fb": fb, "pairs": kac, "angles": angles})
            cases.append({"family": "blocked", "d": d, "batch": b, "k": k, "fb": fb, "pairs": blocked,
                          "angles": angles})
    return cases


def run_child(src: Path, cases_path: str, repeats: int, threads: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", cases_path,
                          "--repeats", str(repeats), "--threads", str(threads)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="a checkout of the baseline commit with its extension built")
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--fb-batch", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.repeats, args.threads)
        return
    if args.baseline is None or not (args.baseline / "src" / "kama").is_dir():
        ap.error(f"--baseline must be a checkout with src/kama, got {args.baseline}")
    import kama  # not at the top: a child process imports an older checkout, which may lack what _bench imports
    from _bench import OUTPUTS, provenance_lines, write_section
    from kama.records import git_commit

    base_commit = subprocess.run(["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip() or "baseline"
    here_src = Path(kama.__file__).resolve().parent.parent
    results: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases_path = str(Path(tmp) / "cases.pt")
        torch.save(make_cases(args.dims, args.batch, args.fb_batch), cases_path)
        for r in range(args.rounds):
            for label, src in ((base_commit, args.baseline / "src"), ("this checkout", here_src)):
                for row in run_child(src, cases_path, args.repeats, args.threads):
                    key = (label, row["family"], row["d"], row["fb"])
                    results.setdefault(key, []).append(row)
                    print(f"round {r + 1} {label} {row['family']} d={row['d']} B={row['batch']} "
                          f"{'f+b' if row['fb'] else 'fwd'}: {row['ms']:.3f} ms, {row['gflops']:.1f} GFLOP/s, "
                          f"x{row['ratio']:.2f} nn.Linear", flush=True)
    cmd = (f"python benchmarks/bench_vs_commit.py --baseline <checkout of {base_commit}> --dims "
           f"{' '.join(map(str, args.dims))} --batch {args.batch} --fb-batch {args.fb_batch} --rounds {args.rounds} "
           f"--repeats {args.repeats} --threads {args.threads}")
    lines = [*provenance_lines(cmd, args.threads),
             f"This checkout (`{git_commit(ignore=OUTPUTS)}`) against `{base_commit}` in alternating processes "
             f"({args.rounds} rounds); medians over rounds; the ratio to `nn.Linear` is measured in the same "
             "process.", "",
             "| code | plans | d | pass | batch | ms | GFLOP/s | x nn.Linear | x baseline Kac |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (label, family, d, fb), rows in results.items():
        base = results.get((base_commit, "kac", d, fb))
        ms = statistics.median(x["ms"] for x in rows)
        speedup = statistics.median(x["ms"] for x in base) / ms if base else float("nan")
        lines.append(f"| {label} | {family} | {d} | {'fwd + bwd' if fb else 'fwd'} | {rows[0]['batch']} | {ms:.3f} | "
                     f"{statistics.median(x['gflops'] for x in rows):.1f} | "
                     f"{statistics.median(x['ratio'] for x in rows):.2f} | {speedup:.2f} |")
    print("\n".join(lines))
    write_section(args.write, "bench_vs_commit", lines)


if __name__ == "__main__":
    main()
