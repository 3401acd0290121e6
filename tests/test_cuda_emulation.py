"""The CUDA C source of the NVRTC kernels (``kama.ops.gpu_nvrtc``), run on CPU: each kernel is compiled as C++ with
``tests/cuda_emu/prelude.h`` (one std::thread per CUDA thread, std::barrier for ``__syncthreads``, an emulated
warp shuffle) and checked against the reference walk, forward and backward, through the same host-side
scheduling (bank-conflict-free groups with padding and flipped rotations) that ``kama.ops.gpu_nvrtc`` launches with.
This tests the kernels' indexing, layering, prefetching and reductions without a GPU; a GPU run
(``benchmarks/gpu_checks.sh``) tests the rest."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import kama
from kama import ops as givens
from kama.ops import gpu
from kama.ops import gpu_nvrtc as _cuda

HERE = Path(__file__).parent / "cuda_emu"
CXX = shutil.which("g++")


@pytest.fixture(scope="module")
def toolchain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory to build in, once a trivial C++20 program with std::barrier compiles (else skip)."""
    if CXX is None:
        pytest.skip("needs g++")
    build = tmp_path_factory.mktemp("cuda_emu")
    probe = build / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    res = subprocess.run([CXX, "-std=c++20", "-pthread", str(probe), "-o", str(build / "probe")],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"g++ lacks C++20 std::barrier: {res.stderr[:200]}")
    return build


def _build(build: Path, io: torch.dtype, cdtype: torch.dtype, bb: int, nt: int) -> Path:
    tag = f"{str(io)[6:]}_{bb}_{nt}"
    src = build / tag
    src.mkdir(exist_ok=True)
    (src / "kernel.cu").write_text(_cuda.source(io, cdtype, bb, nt))
    exe = src / "harness"
    res = subprocess.run([CXX, "-std=c++20", "-O1", "-pthread", f"-I{src}", f"-I{HERE}", str(HERE / "main.cpp"),
                          "-o", str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return exe


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t).numpy().tobytes()


def _read(path: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype, np.int16)
    t = torch.from_numpy(np.fromfile(path, dtype=np_dtype).copy())
    return (t.view(dtype) if dtype in (torch.bfloat16, torch.float16) else t).reshape(shape)


CASES = [  # io dtype, state dtype, rows per tile, threads, n, d, k, transpose, blocks, register-blocked plan
    (torch.float64, torch.float64, 4, 32, 13, 37, 300, False, 2, False),
    (torch.float64, torch.float64, 8, 64, 30, 37, 300, True, 3, False),
    (torch.float32, torch.float32, 16, 64, 40, 70, 600, False, 2, False),
    (torch.float32, torch.float32, 4, 32, 9, 129, 900, True, 1, False),
    (torch.bfloat16, torch.float32, 8, 32, 20, 33, 200, False, 2, False),
    (torch.float32, torch.float32, 8, 32, 11, 200, 2000, False, 2, False),  # several rotations per thread and layer
    (torch.float32, torch.float32, 4, 32, 5, 6, 0, False, 1, False),
    (torch.float32, torch.float32, 8, 32, 17, 40, 365, False, 2, True),  # blocked plans: the generic GPU walk
    (torch.float64, torch.float64, 4, 32, 9, 64, 240, True, 1, True),
]


@pytest.mark.parametrize("io, cdtype, bb, nt, n, d, k, transpose, grid, blocked", CASES)
def test_emulated_cuda_kernels_match_the_reference_walk(toolchain, io, cdtype, bb, nt, n, d, k, transpose, grid,
                                                        blocked):
    exe = _build(toolchain, io, cdtype, bb, nt)
    work = exe.parent
    g = torch.Generator().manual_seed(d + k)
    sampler = kama.ops.blocked_pairs if blocked else kama.random_pairs
    pairs = sampler(d, k, generator=g) if k else torch.empty(0, 2, dtype=torch.long)
    plan = givens.as_plan(pairs, d)
    angles = kama.random_angles(k, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(io)
    gy = torch.randn(n, d, generator=g, dtype=torch.float64).to(io)
    c, s = gpu.coefficients(plan, angles.to(cdtype), cdtype, transpose)
    ij, cs, offsets, src, sign, valid = _cuda._records(plan, c, s, _cuda._phase_pairs(bb, cdtype),
                                                       torch.device("cpu"))
    slots = int(ij.shape[0])
    for name, t in (("x.bin", x), ("gy.bin", gy), ("ij.bin", ij), ("cs.bin", cs), ("off.bin", offsets)):
        (work / name).write_bytes(_raw(t))
    args = [str(n), str(d), str(slots), str(plan.depth), str(-(-n // bb)), str(grid), str(int(transpose)),
            str(work)]
    subprocess.run([str(exe), "fwd", *args], check=True, timeout=120)
    y = _read(work / "y.bin", io, (n, d))

    xr = x.double().requires_grad_(True)
    ar = angles.clone().requires_grad_(True)
    yr = kama.givens_apply(xr, plan, ar, backend="reference", transpose=transpose)
    (yr * gy.double()).sum().backward()
    tol = 8 * torch.finfo(io).eps * max(1.0, yr.detach().abs().max().item())
    torch.testing.assert_close(y.double(), yr.detach().to(io).double(), atol=tol, rtol=0)
    if k == 0:
        return
    (work / "x.bin").write_bytes(_raw(yr.detach().to(io)))  # the backward starts from the saved output
    subprocess.run([str(exe), "bwd", *args], check=True, timeout=120)
    gx = _read(work / "gx.bin", io, (n, d))
    gpart = _read(work / "gpart.bin", cdtype, (grid, slots)).double().sum(0) * sign.double()
    gsorted = torch.zeros(k, dtype=torch.float64).index_copy_(0, src[valid], gpart[valid])
    perm = plan.sorted_pairs(torch.device("cpu"))[3]
    ga = torch.empty_like(gsorted).index_copy_(0, perm, gsorted)
    ga = -ga if transpose else ga
    torch.testing.assert_close(gx.double(), xr.grad, atol=tol, rtol=0)
    scale = ar.grad.abs().max().item()
    torch.testing.assert_close(ga, ar.grad, atol=16 * torch.finfo(io).eps * scale * max(1, n), rtol=0)


BLOCKED_CASES = [  # io dtype, state dtype, rows per tile, threads, n, d, k (a tail when k % 12), transpose, blocks
    (torch.float32, torch.float32, 8, 32, 17, 40, 365, False, 2),
    (torch.float32, torch.float32, 16, 64, 21, 64, 240, True, 2),
    (torch.float64, torch.float64, 4, 32, 9, 35, 131, True, 1),
    (torch.bfloat16, torch.float32, 8, 32, 10, 24, 100, False, 1),
]


@pytest.mark.parametrize("io, cdtype, bb, nt, n, d, k, transpose, grid", BLOCKED_CASES)
def test_emulated_register_blocked_forward_matches_the_reference_walk(toolchain, io, cdtype, bb, nt, n, d, k,
                                                                     transpose, grid):
    exe = _build(toolchain, io, cdtype, bb, nt)
    work = exe.parent
    g = torch.Generator().manual_seed(d + k + 1)
    plan = givens.as_plan(kama.ops.blocked_pairs(d, k, generator=g), d)
    sched = _cuda.blocked_schedule(plan, torch.device("cpu"))
    assert sched is not None and int(sched.tail_ij.shape[0]) == k % 12
    angles = kama.random_angles(k, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(io)
    a = angles.to(cdtype)
    gcs, tcs = _cuda.blocked_records(sched, torch.cos(a), -torch.sin(a) if transpose else torch.sin(a))
    for name, t in (("x.bin", x), ("slots.bin", sched.slots), ("gcs.bin", gcs), ("goff.bin", sched.offsets),
                    ("tij.bin", sched.tail_ij), ("tcs.bin", tcs)):
        (work / name).write_bytes(_raw(t))
    groups = int(sched.slots.shape[0])
    subprocess.run([str(exe), "bfwd", str(n), str(d), str(groups), str(sched.layers), str(-(-n // bb)), str(grid),
                    str(int(transpose)), str(work), str(k % 12)], check=True, timeout=120)
    y = _read(work / "y.bin", io, (n, d))
    yr = kama.givens_apply(x.double(), plan, angles, backend="reference", transpose=transpose)
    tol = 8 * torch.finfo(io).eps * max(1.0, yr.abs().max().item())
    torch.testing.assert_close(y.double(), yr.to(io).double(), atol=tol, rtol=0)
    # each layer's groups are disjoint, and far fewer barriers than the generic walk's layers
    for lo, hi in zip(sched.offsets[:-1].tolist(), sched.offsets[1:].tolist(), strict=True):
        rows = sched.slots[lo:hi].reshape(-1)
        assert rows.unique().numel() == rows.numel()
    assert sched.layers * 3 <= plan.depth + 3


def test_blocked_schedule_is_none_for_other_plans():
    plan = givens.as_plan(kama.random_pairs(32, 120, generator=torch.Generator().manual_seed(0)), 32)
    assert _cuda.blocked_schedule(plan, torch.device("cpu")) is None
    assert plan.caches.on(torch.device("cpu")).gpu_blocked is False  # decided once per plan
