"""What bounds the CPU walk on this core: micro-benchmarks of its inner loop (``benchmarks/probes/kernel_bounds.c``,
compiled here with ``gcc -O3 -march=native``).

Usage::

    python benchmarks/bench_kernel_bounds.py [--dims 64 1024 4096] [--tiles 32 64 128] [--write BENCHMARKS.md]

For a tile of ``d`` rows of ``T`` batch columns (float32), times per *rotation-vector* (one rotation on 8 columns:
one 256-bit vector) of the production loop (2 loads, 2 stores, 2 multiplies and 2 FMAs) and of variants that keep
one part of it: loads only, stores only, the arithmetic only (registers), the loop on disjoint rows (no
store-to-load dependence) and the register-blocked groups (16 memory operations per 12 rotations), and the walk and
the groups with 512-bit vectors (``walk512``, ``blocked512``: the kernel's wide loops; tiles of 16 columns or more),
groups of 16 coordinates in four butterfly rounds (``blocked16``: 32 memory operations per 32 rotations, 512-bit) and
the arithmetic alone at 512 bits (``fp_only512``: the wide loops' FP bound at the clock the core keeps under them).
A second table does the same for the register-blocked backward at 512 bits (``bwd512``: a group's 8 rows of the
saved output and 8 of its gradient in registers, 12 rotations back with their angle gradients, the accumulators'
lanes added once per group), its loads and stores alone (``bwd512_mem``) and its arithmetic alone (``bwd512_fp``,
10 multiplies or FMAs and an add per rotation-vector), on two ``d x T`` tiles.
A chain of dependent adds estimates the clock; the table states every variant as a multiple of the arithmetic-only
one, which does not depend on the clock. The variant closest to the full loop names its bound (``docs/cpu-kernel.md``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import _bench
from _bench import provenance_lines, write_section

PROBE = Path(__file__).resolve().parent / "probes" / "kernel_bounds.c"
FORWARD = ("walk", "loads", "stores", "fp_only", "nodep", "blocked", "walk512", "blocked512", "blocked16",
           "fp_only512")
BACKWARD = ("bwd512", "bwd512_mem", "bwd512_fp")
VARIANTS = FORWARD + BACKWARD


def run(dims: list[int], tiles: list[int], reps: int) -> list[dict]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("bench_kernel_bounds needs a C compiler (gcc)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in tiles:
            exe = Path(tmp) / f"probe_{t}"
            subprocess.run([cc, "-O3", "-march=native", "-ffp-contract=fast", f"-DT={t}", str(PROBE), "-o", str(exe),
                            "-lm"], check=True)
            for d in dims:
                out = subprocess.run([str(exe), str(d), str(reps)], capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout))
                r = rows[-1]
                print(f"d={d} T={t} ({r['tile_kib']:.0f} KiB tile; clock chain {r['ghz']:.2f} GHz): ns per "
                      "rotation-vector " + ", ".join(f"{v} {r[f'{v}_ns']:.3f}" for v in VARIANTS), flush=True)
    # a clock reading is lowered by any interruption of the chain: the highest one is the core's clock
    ghz = max(r["ghz"] for r in rows)
    for r in rows:
        r["clock_ghz"] = ghz
    return rows


def _gflops(ns: float) -> str:
    return f"{48 / ns:.1f}" if ns > 0 else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 1024, 4096])
    ap.add_argument("--tiles", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    rows = run(args.dims, args.tiles, args.reps)
    cmd = (f"python benchmarks/bench_kernel_bounds.py --dims {' '.join(map(str, args.dims))} "
           f"--tiles {' '.join(map(str, args.tiles))} --reps {args.reps}")
    others = [v for v in FORWARD if v != "fp_only"]
    lines = [*provenance_lines(cmd, 1),
             f"Time per rotation-vector (one rotation on 8 float32 columns), the fastest of {args.reps} repeats, as a "
             "multiple of the arithmetic-only variant (`fp_only`: 2 multiplies + 2 FMAs from registers, a clock-free "
             "unit: 2 cycles on a core with two FMA pipes), and `fp_only` in ns and in cycles at "
             f"{rows[0]['clock_ghz']:.2f} GHz (the highest reading of a dependent-add chain; a shared machine's "
             "readings vary). 48 flops per rotation-vector: GFLOP/s = 48 / ns.", "",
             "| d | T | tile KiB | fp_only ns | fp_only cycles | " + " | ".join(f"{v} / fp" for v in others)
             + " | walk GFLOP/s | blocked GFLOP/s | walk512 GFLOP/s | blocked512 GFLOP/s | blocked16 GFLOP/s |",
             "|---|---|---|---|---|" + "---|" * (len(others) + 5)]
    for r in rows:
        fp = r["fp_only_ns"]
        lines.append(f"| {r['d']} | {r['T']} | {r['tile_kib']:.0f} | {fp:.3f} | {fp * r['clock_ghz']:.2f} | "
                     + " | ".join(f"{r[f'{v}_ns'] / fp:.2f}" if r[f"{v}_ns"] > 0 else "-" for v in others)
                     + f" | {48 / r['walk_ns']:.1f} | {48 / r['blocked_ns']:.1f} | {_gflops(r['walk512_ns'])} | "
                     f"{_gflops(r['blocked512_ns'])} | {_gflops(r['blocked16_ns'])} |")
    if any(r["bwd512_ns"] > 0 for r in rows):
        lines += ["", "The register-blocked backward, 512-bit (two tiles of `d x T`: the saved output's and its "
                  "gradient's), in ns per rotation-vector of 8 columns as above, and `bwd512_fp` in cycles per 512-bit "
                  "rotation-vector (16 columns; its FP bound on two FMA pipes: 5).", "",
                  "| d | T | tiles KiB | bwd512 ns | bwd512_mem ns | bwd512_fp ns | bwd512 / bwd512_fp | "
                  "(bwd512_mem + bwd512_fp) / bwd512_fp | bwd512_fp cycles | bwd512 / blocked512 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["bwd512_ns"] > 0):  # 512-bit rows only (T >= 16 on AVX-512 cores)
            b, m, f = r["bwd512_ns"], r["bwd512_mem_ns"], r["bwd512_fp_ns"]
            lines.append(f"| {r['d']} | {r['T']} | {2 * r['tile_kib']:.0f} | {b:.3f} | {m:.3f} | {f:.3f} | "
                         f"{b / f:.2f} | {(m + f) / f:.2f} | {2 * f * r['clock_ghz']:.2f} | "
                         f"{b / r['blocked512_ns']:.2f} |")
    write_section(args.write, "bench_kernel_bounds", lines)
    print(_bench.machine().summary())


if __name__ == "__main__":
    main()
