#!/usr/bin/env bash
# Every CPU benchmark, each writing its section of BENCHMARKS.md for this machine (run from the repository root,
# on a quiet machine, at a clean commit so that the tables name it). About 30 minutes on 2 cores.
#   bash benchmarks/run_cpu.sh [BENCHMARKS.md]
set -euo pipefail
out=${1:-BENCHMARKS.md}
python benchmarks/bench_kernel_bounds.py --write "$out"
python benchmarks/bench_givens.py --dims 64 256 1024 4096 --batches 1 64 256 1024 --backends cpu reference dense \
    python-loop --threads 1 2 --repeats 7 --plans kac blocked --write "$out"
python benchmarks/bench_threads.py --write "$out"
python benchmarks/bench_features.py --write "$out"
python benchmarks/bench_manifold.py --write "$out"
python benchmarks/bench_inference.py --write "$out"
python benchmarks/bench_rl.py --normalize --write "$out"
