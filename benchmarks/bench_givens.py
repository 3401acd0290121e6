"""Speed and memory of ``givens_apply`` against a dense ``nn.Linear`` of the same size, in the same run.

Usage::

    python benchmarks/bench_givens.py [--dims 64 256 1024 4096] [--batches 1 64 256 1024]
                                      [--backends cpu reference dense] [--threads 1 2]
                                      [--repeats 7] [--write BENCHMARKS.md]

For every thread count, ``d`` and batch ``B``: ``k = ceil(5 d ln d)`` i.i.d. random pairs; the median over
``--repeats`` of the forward time and of forward + backward (gradients w.r.t. input and angles; for
``nn.Linear`` w.r.t. input, weight and bias) for each backend, the ratio ``nn.Linear time / backend time``
(> 1: the backend is faster), and the effective GFLOP/s counting 6 flops per rotation per vector; calls
shorter than 2 ms are timed in blocks (``median_time``). A plain
Python loop over single rotations (``python-loop``) is timed on a 300-rotation prefix and scaled to ``k``.
Also the RL-size ``KamaLinear`` (64 x 64, k = 200, batch 64) against ``nn.Linear(64, 64)``, and the peak
extra memory of the backward (fresh subprocess with glibc mapping every allocation >= 64 KiB on its own:
peak RSS during ``backward()`` minus the RSS just before it, via ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import _bench
import kama
from _bench import make_plan, provenance_lines, write_section
from _timing import median_time


def bench_case(d: int, batch: int, backends: list[str], repeats: int, family: str = "kac") -> list[dict]:
    k = math.ceil(5 * d * math.log(d))
    g = torch.Generator().manual_seed(0)
    plan = make_plan(family, d, k, g)
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
        if be == "python-loop":
            rows.append(python_loop_row(d, k, batch, plan, angles, x, t_lin_f, t_lin_fb, repeats))
            continue
        if be == "reference" and d * batch > 1024 * 256 and d >= 4096:
            continue  # minutes per case; the ratio is already clear at smaller sizes

        def fwd(be=be):
            with torch.no_grad():
                kama.givens_apply(x, plan, angles, backend=be)

        def fb(be=be):
            kama.givens_apply(x, plan, angles, backend=be).sum().backward()

        t_f = median_time(fwd, repeats)
        t_fb = median_time(fb, repeats)
        rows.append({"d": d, "k": k, "depth": plan.depth, "batch": batch, "backend": be, "plans": family,
                     "fwd_ms": 1e3 * t_f, "linear_fwd_ms": 1e3 * t_lin_f, "fwd_speedup": t_lin_f / t_f,
                     "fb_ms": 1e3 * t_fb, "linear_fb_ms": 1e3 * t_lin_fb, "fb_speedup": t_lin_fb / t_fb,
                     "gflops": 6 * k * batch / t_f / 1e9})
    return rows


def python_loop_row(d, k, batch, plan, angles, x, t_lin_f, t_lin_fb, repeats) -> dict:
    """A Python loop applying one rotation at a time (autograd-tracked), timed on a prefix and scaled."""
    prefix = min(k, 300)
    pairs = plan.pairs[-prefix:].tolist()
    a = angles[-prefix:]

    def run():
        cols = list(x.unbind(1))
        for r in range(prefix - 1, -1, -1):
            i, j = pairs[r]
            c, s = torch.cos(a[r]), torch.sin(a[r])
            cols[i], cols[j] = c * cols[i] - s * cols[j], s * cols[i] + c * cols[j]
        return torch.stack(cols, 1)

    def fwd():
        with torch.no_grad():
            run()

    t_f = median_time(fwd, max(3, repeats // 2)) * k / prefix
    t_fb = median_time(lambda: run().sum().backward(), max(3, repeats // 2)) * k / prefix
    return {"d": d, "k": k, "depth": plan.depth, "batch": batch, "backend": "python-loop", "plans": "kac",
            "fwd_ms": 1e3 * t_f, "linear_fwd_ms": 1e3 * t_lin_f, "fwd_speedup": t_lin_f / t_f,
            "fb_ms": 1e3 * t_fb, "linear_fb_ms": 1e3 * t_lin_fb, "fb_speedup": t_lin_fb / t_fb,
            "gflops": 6 * k * batch / t_f / 1e9}


MEMORY_PROBE = """
import json, math, sys, torch, kama


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

d, batch, k, backend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
plan = kama.GivensPlan(kama.random_pairs(d, k, generator=g), d)
angles = kama.random_angles(k, generator=g).requires_grad_(True)
x = torch.randn(batch, d, generator=g, requires_grad=True)
# Warm up code paths and the plan cache on one row, so that the big buffers below are fresh allocations.
kama.givens_apply(x[:1].detach(), plan, angles, backend=backend).sum().backward()
angles.grad = None
y = kama.givens_apply(x, plan, angles, backend=backend)
loss = y.sum()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
loss.backward()
after = status("VmHWM")
print(json.dumps({"extra_bytes": after - before, "input_bytes": x.numel() * x.element_size()}))
"""


def bench_memory(d: int, batch: int, ks: list[int], backend: str) -> list[dict]:
    rows = []
    for k in ks:
        # Every allocation >= 64 KiB is its own mapping, returned on free: RSS follows live memory exactly.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(d), str(batch), str(k), backend],
                             capture_output=True, text=True, check=True, env=env)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"d": d, "batch": batch, "k": k, "backend": backend, **r,
                     "ratio": r["extra_bytes"] / r["input_bytes"]})
    return rows


def bench_rl(repeats: int) -> dict:
    layer = kama.KamaLinear(64, 64, num_rotations=200, generator=torch.Generator().manual_seed(0))
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(64, 64)
    fns = {"kama": lambda: layer(x).sum().backward(), "linear": lambda: lin(x).sum().backward()}
    # ~0.1 ms calls: time blocks of 50 calls after a warm-up, alternating the two so drift hits both alike
    block = 50
    for fn in fns.values():
        for _ in range(4 * block):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats * 5):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            times[name].append((time.perf_counter() - t0) / block)
    t_k, t_l = statistics.median(times["kama"]), statistics.median(times["linear"])
    return {"kama_fb_ms": 1e3 * t_k, "linear_fb_ms": 1e3 * t_l, "ratio": t_k / t_l}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 1024])
    ap.add_argument("--backends", nargs="+", default=["cpu", "reference", "dense", "python-loop"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--plans", nargs="+", default=["kac"], choices=["kac", "blocked"],
                    help="plan families: the paper's Kac walk and / or register-blocked plans (kama.ops.blocked_pairs)")
    ap.add_argument("--write", type=Path, default=None, help="update this Markdown file's bench_givens section")
    args = ap.parse_args()
    rows = []
    rl = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for d in args.dims:
            for b in args.batches:
                new = []
                for family in args.plans:
                    if family == "blocked" and d < 8:
                        continue
                    backends = args.backends if family == "kac" else [be for be in args.backends
                                                                       if be != "python-loop"]
                    new += bench_case(d, b, backends, args.repeats, family)
                for x in new:
                    x["threads"] = threads
                    print(f"{threads}t d={x['d']} B={x['batch']} {x['plans']} {x['backend']}: fwd {x['fwd_ms']:.3f} ms "
                          f"(x{x['fwd_speedup']:.2f} vs Linear, {x['gflops']:.1f} GFLOP/s), f+b {x['fb_ms']:.3f} ms "
                          f"(x{x['fb_speedup']:.2f})", flush=True)
                rows += new
        rl[threads] = bench_rl(args.repeats)
        print(f"{threads}t RL-size KamaLinear(64, 64, k=200), batch 64, fwd+bwd: {rl[threads]['kama_fb_ms']:.3f} ms "
              f"vs nn.Linear {rl[threads]['linear_fb_ms']:.3f} ms (KAMA / Linear = {rl[threads]['ratio']:.2f})")
    mem = []
    for backend in [b for b in ("cpu", "reference") if b in args.backends]:
        d0 = 1024 if 1024 in args.dims else args.dims[-1]
        k0 = math.ceil(5 * d0 * math.log(d0))
        mem += bench_memory(d0, 1024, [k0 // 4, k0, 4 * k0], backend)
    for m in mem:
        print(f"memory {m['backend']} d={m['d']} B={m['batch']} k={m['k']}: backward extra "
              f"{m['extra_bytes'] / 2**20:.1f} MiB = {m['ratio']:.2f} x input")
    cmd = "python benchmarks/bench_givens.py " + " ".join(
        [f"--dims {' '.join(map(str, args.dims))}", f"--batches {' '.join(map(str, args.batches))}",
         f"--backends {' '.join(args.backends)}", f"--threads {' '.join(map(str, args.threads))}",
         f"--repeats {args.repeats}", f"--plans {' '.join(args.plans)}"])
    from kama.ops import tuning

    print(f"machine: {_bench.machine().summary()}\nkernel settings: {tuning.current()}")
    lines = [
        *provenance_lines(cmd, " and ".join(map(str, args.threads))),
        "Times are medians; *speed-up* = nn.Linear time / backend time in the same run (> 1 is faster than "
        "dense). k = ceil(5 d ln d); GFLOP/s count 6 flops per rotation per vector (forward). `python-loop` is "
        "timed on a 300-rotation prefix and scaled to k.",
        "",
        f"Kernel settings: `{tuning.current()}`.",
        "",
        "| threads | d | k | layers | batch | plans | backend | fwd ms | Linear fwd ms | fwd speed-up | fwd+bwd ms | "
        "Linear fwd+bwd ms | fwd+bwd speed-up | GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['d']} | {r['k']} | {r['depth']} | {r['batch']} | {r['plans']} | "
                     f"{r['backend']} | "
                     f"{r['fwd_ms']:.3f} | {r['linear_fwd_ms']:.3f} | {r['fwd_speedup']:.3f} | {r['fb_ms']:.3f} | "
                     f"{r['linear_fb_ms']:.3f} | {r['fb_speedup']:.3f} | {r['gflops']:.2f} |")
    lines += [""]
    for threads, r in rl.items():
        lines.append(f"RL size, {threads} thread(s), `KamaLinear(64, 64, num_rotations=200)` at batch 64, forward + "
                     f"backward: {r['kama_fb_ms']:.3f} ms vs `nn.Linear(64, 64)` {r['linear_fb_ms']:.3f} ms "
                     f"(KAMA / Linear = {r['ratio']:.2f}).  ")
    lines += ["", "Peak extra memory of the backward (peak RSS during `backward()` minus RSS before it; fresh "
              "process, 1 thread, glibc mmap threshold 64 KiB so RSS follows live memory):", "",
              "| backend | d | batch | k | extra MiB | x input bytes |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {m['backend']} | {m['d']} | {m['batch']} | {m['k']} | {m['extra_bytes'] / 2**20:.2f} | "
              f"{m['ratio']:.2f} |" for m in mem]
    if args.write is not None:
        png = plot_speedups(rows, args.write.parent / "benchmarks" / "plots"
                            / f"bench_givens-{_bench.machine().slug()}.png")
        if png is not None:
            lines[2:2] = ["", f"![forward speed-up against d]({png.relative_to(args.write.parent).as_posix()})", ""]
    write_section(args.write, "bench_givens", lines)


def plot_speedups(rows: list[dict], path: Path) -> Path | None:
    """Forward speed-up over ``nn.Linear`` against ``d``, one line per batch (and plan family) of the compiled
    backend, one panel per thread count; ``None`` without matplotlib or rows of the cpu backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cpu = [r for r in rows if r["backend"] == "cpu"]
    if not cpu:
        return None
    threads = sorted({r["threads"] for r in cpu})
    fig, axes = plt.subplots(1, len(threads), figsize=(5.5 * len(threads), 4), squeeze=False)
    for ax, t in zip(axes[0], threads, strict=True):
        for (b, fam) in sorted({(r["batch"], r["plans"]) for r in cpu if r["threads"] == t}):
            pts = sorted((r["d"], r["fwd_speedup"]) for r in cpu
                         if r["threads"] == t and r["batch"] == b and r["plans"] == fam)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="-" if fam == "kac" else "--",
                    label=f"batch {b}" + ("" if fam == "kac" else f" ({fam})"))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("d")
        ax.set_ylabel("forward speed-up over nn.Linear")
        ax.set_title(f"{t} thread(s)")
        ax.legend(fontsize=8)
    fig.suptitle(_bench.machine().model, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
