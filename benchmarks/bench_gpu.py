"""GPU speed of ``givens_apply(..., backend="cuda")`` (both kernel families: Triton, and the CUDA C compiled by
NVRTC, ``KAMA_GPU_ENGINE``) against dense matrix products and the pure-PyTorch layered walk, in one run on one
device. Prepared for a machine with a CUDA GPU (``benchmarks/gpu_checks.sh`` runs it with the GPU tests):

    python benchmarks/bench_gpu.py [--dims 1024 4096] [--batches 8192] [--repeats 20] [--write BENCHMARKS.md]

It first checks the kernels against the reference walk (float64 and float32, forward and backward), then for
each ``d`` and batch ``B`` (``k = ceil(5 d ln d)`` i.i.d. pairs, fp32 input and output) reports the median of
CUDA-event-timed repeats for: ``torch.matmul`` in fp32 with TF32 off, with TF32 on, and in bf16; the layered
pure-PyTorch walk (``backend="reference"``); each kernel family's forward in fp32 and with bf16 input/output
(fp32 state); forward + backward of the kernels against ``nn.Linear`` forward + backward (fp32, TF32 off); the
effective TFLOP/s (6 flops per rotation per vector); the peak extra memory of the backward; and sweeps of the
Triton scratch per program (``kama.ops.gpu_triton.SCRATCH_BYTES``) and of the NVRTC tile size, threads per block and
bank-conflict-free ordering (``kama.ops.gpu_nvrtc.TILE_BYTES``, ``THREADS``, ``BANK_GROUPS``).

``--smoke`` runs tiny sizes on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``) to check the
script itself on a machine without a GPU; its timings mean nothing and it never writes ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import kama  # noqa: E402
from _bench import provenance_lines, write_section  # noqa: E402
from kama.ops import gpu  # noqa: E402
from kama.ops import gpu_nvrtc as _cuda  # noqa: E402
from kama.ops import gpu_triton as _triton  # noqa: E402


def engines(device: str) -> list[str]:
    """The GPU kernel families to compare: Triton, and NVRTC-compiled CUDA C where it compiles."""
    return ["triton", "nvrtc"] if device == "cuda" and _cuda.available() else ["triton"]


def timer(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn`` (one warm-up call; CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check(device: str) -> list[str]:
    """Max deviations from the reference walk (outputs and gradients) on odd shapes."""
    lines = []
    g = torch.Generator().manual_seed(0)
    for dtype, d, k, n, sampler in ((torch.float64, 37, 800, 300, kama.random_pairs),
                                    (torch.float32, 257, 7000, 1000, kama.random_pairs),
                                    (torch.float32, 257, 7001, 1000, kama.blocked_pairs),
                                    (torch.float64, 64, 500, 300, kama.blocked_pairs)):
        pairs = sampler(d, k, generator=g)
        angles = kama.random_angles(k, generator=g, dtype=dtype).to(device)
        x = torch.randn(n, d, generator=g, dtype=dtype).to(device)
        w = torch.randn(n, d, generator=g, dtype=dtype).to(device)
        outs = {}
        for backend in ["reference", *engines(device)]:
            gpu.GPU_ENGINE = backend if backend != "reference" else "auto"
            xa, aa = x.clone().requires_grad_(True), angles.clone().requires_grad_(True)
            y = kama.givens_apply(xa, pairs, aa, backend="cuda" if backend != "reference" else backend)
            (y * w).sum().backward()
            outs[backend] = (y.detach(), xa.grad, aa.grad)
        for eng in engines(device):
            errs = [(a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
                    for a, b in zip(outs[eng], outs["reference"], strict=True)]
            lines.append(f"- {eng}, {dtype}, {sampler.__name__}, d={d}, k={k}, B={n}: max relative deviation from "
                         f"the reference walk: output {errs[0]:.1e}, input gradient {errs[1]:.1e}, "
                         f"angle gradient {errs[2]:.1e}")
    gpu.GPU_ENGINE = "auto"
    return lines


def bench(d: int, batch: int, repeats: int, device: str, reference: bool) -> tuple[list[str], list[str]]:
    k = math.ceil(5 * d * math.log(d))
    g = torch.Generator().manual_seed(0)
    plan = kama.GivensPlan(kama.random_pairs(d, k, generator=g), d)
    angles = kama.random_angles(k, generator=g).to(device)
    x = torch.randn(batch, d, generator=g).to(device)
    w = torch.randn(d, d, generator=g).to(device)
    gflop = 6.0 * k * batch / 1e9
    t = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    t["matmul fp32"] = timer(lambda: x @ w.T, repeats, device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        t["matmul tf32"] = timer(lambda: x @ w.T, repeats, device)
        torch.backends.cuda.matmul.allow_tf32 = False
        xb, wb = x.bfloat16(), w.bfloat16()
        t["matmul bf16"] = timer(lambda: xb @ wb.T, repeats, device)
    with torch.no_grad():
        if reference:
            t["reference walk"] = timer(lambda: kama.givens_apply(x, plan, angles, backend="reference"),
                                        max(3, repeats // 4), device)
        xb16, ab16 = x.bfloat16(), angles.bfloat16()
        blocked = kama.GivensPlan(kama.blocked_pairs(d, k, generator=g), d)
        for eng in engines(device):
            gpu.GPU_ENGINE = eng
            t[f"kama {eng} fp32"] = timer(lambda: kama.givens_apply(x, plan, angles, backend="cuda"), repeats, device)
            t[f"kama {eng} bf16 i/o"] = timer(lambda: kama.givens_apply(xb16, plan, ab16, backend="cuda"), repeats,
                                             device)
            # register-blocked plans: the NVRTC engine runs its register-blocked forward, Triton the generic walk
            t[f"kama {eng} blocked fp32"] = timer(lambda: kama.givens_apply(x, blocked, angles, backend="cuda"),
                                                  repeats, device)
            t[f"kama {eng} blocked bf16 i/o"] = timer(
                lambda: kama.givens_apply(xb16, blocked, ab16, backend="cuda"), repeats, device)
    base = t["matmul fp32"]
    rows = [f"| {d} | {batch} | {name} | {sec * 1e3:.3f} | {base / sec:.2f}x | "
            + (f"{gflop / sec / 1e3:.2f}" if name.startswith(("kama", "reference")) else "") + " |"
            for name, sec in t.items()]
    # forward + backward against nn.Linear (fp32, TF32 off)
    lin = torch.nn.Linear(d, d, device=device)
    xg = x.clone().requires_grad_(True)
    ag = angles.clone().requires_grad_(True)

    def lin_fb():
        lin(xg).sum().backward()

    def kama_fb():
        kama.givens_apply(xg, plan, ag, backend="cuda").sum().backward()

    t_lin = timer(lin_fb, repeats, device)
    fb = []
    for eng in engines(device):
        gpu.GPU_ENGINE = eng
        t_kama = timer(kama_fb, repeats, device)
        mem = ""
        if device == "cuda":
            y = kama.givens_apply(xg, plan, ag, backend="cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            y.sum().backward()
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - before
            mem = f"{extra / (x.numel() * x.element_size()):.2f}x input"
        fb.append(f"| {d} | {batch} | {eng} | {t_lin * 1e3:.3f} | {t_kama * 1e3:.3f} | {t_lin / t_kama:.2f}x | "
                  f"{3 * gflop / t_kama / 1e3:.2f} | {mem} |")
    gpu.GPU_ENGINE = "auto"
    return rows, fb


def sweep(d: int, batch: int, repeats: int, device: str) -> list[str]:
    k = math.ceil(5 * d * math.log(d))
    g = torch.Generator().manual_seed(0)
    plan = kama.GivensPlan(kama.random_pairs(d, k, generator=g), d)
    angles = kama.random_angles(k, generator=g).to(device)
    x = torch.randn(batch, d, generator=g).to(device)
    old = _triton.SCRATCH_BYTES, _cuda.TILE_BYTES, _cuda.THREADS, _cuda.BANK_GROUPS
    rows = []

    def run() -> float:
        with torch.no_grad():
            return timer(lambda: kama.givens_apply(x, plan, angles, backend="cuda"), repeats, device)

    try:
        gpu.GPU_ENGINE = "triton"
        for kib in (32, 96, 192):
            _triton.SCRATCH_BYTES = kib * 1024
            rows.append(f"| {d} | {batch} | triton | {kib} | | {_triton.tile_rows(batch, d, 4)} | {run() * 1e3:.3f} |")
        gpu.GPU_ENGINE = "nvrtc"
        for kib, threads, banks in ((16, 512, True), (32, 256, True), (32, 512, True), (64, 256, True),
                                    (64, 512, True), (64, 512, False), (64, 1024, True), (100, 512, True),
                                    (200, 1024, True)):
            if "nvrtc" not in engines(device):
                break
            _cuda.TILE_BYTES, _cuda.THREADS, _cuda.BANK_GROUPS = kib * 1024, threads, banks
            bb = _cuda.tile_rows(d, 4, 1, 4, 227 * 1024)
            name = "nvrtc" if banks else "nvrtc, plan order"
            rows.append(f"| {d} | {batch} | {name} | {kib} | {threads} | {bb} | {run() * 1e3:.3f} |")
    finally:
        _triton.SCRATCH_BYTES, _cuda.TILE_BYTES, _cuda.THREADS, _cuda.BANK_GROUPS = old
        gpu.GPU_ENGINE = "auto"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[8192])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) layered pure-PyTorch walk")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU through Triton's interpreter")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        device, args.dims, args.batches, args.repeats, args.write = "cpu", [16], [24], 1, None
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device (or --smoke to check the script on CPU)")
    else:
        device = "cuda"
    if not _triton.available():
        sys.exit(f"Triton is not available: {_triton.import_error()}")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter, smoke test)"
    lines = ["Triton and NVRTC kernels against dense products.", "",
             *provenance_lines("python " + " ".join(sys.argv), "GPU"), f"Device: {name}.", "",
             "Correctness on the device:", *check(device), "",
             "Forward, fp32 input and output (ratio = fp32 matmul time / time; > 1 is faster; TFLOP/s counts 6 "
             "flops per rotation per vector):", "",
             "| d | B | method | ms | vs fp32 matmul | TFLOP/s |", "|---|---|---|---|---|---|"]
    fb_lines = ["", "Forward + backward (input and angle gradients) vs `nn.Linear` (fp32, TF32 off):", "",
                "| d | B | kernels | nn.Linear ms | kama ms | ratio | TFLOP/s | backward peak extra memory |",
                "|---|---|---|---|---|---|---|---|"]
    sweep_lines = ["", "Tile size per program / block (sets rows per tile), forward fp32:", "",
                   "| d | B | kernels | scratch / tile KiB | threads | rows per tile | ms |",
                   "|---|---|---|---|---|---|---|"]
    for d in args.dims:
        for batch in args.batches:
            rows, fb = bench(d, batch, args.repeats, device, not args.no_reference)
            lines += rows
            fb_lines += fb
            sweep_lines += sweep(d, batch, max(3, args.repeats // 2), device)
            print("\n".join(rows + fb), flush=True)
    lines += fb_lines + sweep_lines
    print("\n".join(lines))
    write_section(args.write, "gpu", lines, device=name)


if __name__ == "__main__":
    main()
