#!/usr/bin/env bash
# One prepared GPU session: build, test and benchmark the GPU kernels in one call (a lent GPU's time is short).
#   bash benchmarks/gpu_checks.sh [OUTDIR]        (from the repository root, on a machine with a CUDA GPU)
# Writes env.txt, build.log, bench.log, tests.log and a copy of BENCHMARKS.md with the GPU section filled in under
# OUTDIR (default: $OUT, else gpu-out). BENCH_ARGS, BENCH_TIMEOUT and TEST_TIMEOUT override the defaults below.
# Uses the Python that has torch (python3), the package from src/ (no install) and builds the optional C kernel
# in place, in the background, for the CPU-vs-GPU tests.
set -u
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi -L; nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(),
torch.cuda.get_device_properties(0))"; } 2>&1 | tee "$out/env.txt"
python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 &
build=$!
cp BENCHMARKS.md "$out/BENCHMARKS.md"
set -o pipefail
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-210}" python3 benchmarks/bench_gpu.py ${BENCH_ARGS:-} --write "$out/BENCHMARKS.md" \
    2>&1 | tee "$out/bench.log" | grep -v '^|' ; echo "bench exit: $?"
wait $build; echo "C extension build exit: $?"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_triton.py \
    "tests/test_givens.py" "tests/test_nn.py" -k "triton or cuda or nvrtc or engine" > "$out/tests.log" 2>&1
echo "tests exit: $?"; tail -25 "$out/tests.log"
sed -n '/<!-- gpu:.*:begin/,/<!-- gpu:.*:end/p' "$out/BENCHMARKS.md"
