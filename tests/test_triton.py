"""The Triton GPU kernels: agreement with the reference walk and the dense oracle (outputs and gradients),
16-bit input/output with float32 state, strided and empty inputs, the persistent loop over tiles, dispatch and
the fallback when Triton is missing.

On a machine with a CUDA device they run on the GPU; without one, on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py), which executes the same kernel source."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kama
from conftest import oracle_matrix, tol
from kama import ops as givens
from kama.ops import gpu
from kama.ops import gpu_nvrtc as _cuda
from kama.ops import gpu_triton as _triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not _triton.available() or not (CUDA or _triton.interpreting()),
                                reason="needs Triton and a CUDA device or TRITON_INTERPRET=1")
# On a GPU every test runs for both kernel families: Triton and the NVRTC-compiled CUDA C (kama._cuda).
ENGINES = ["triton", "nvrtc"] if CUDA and _cuda.available() else ["triton"]


@pytest.fixture(scope="module", params=ENGINES, autouse=True)
def engine(request: pytest.FixtureRequest):
    old = gpu.GPU_ENGINE
    gpu.GPU_ENGINE = request.param
    yield request.param
    gpu.GPU_ENGINE = old


def _problem(d, k, n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = kama.random_pairs(d, k, generator=g) if d > 1 else torch.zeros(0, 2, dtype=torch.long)
    angles = kama.random_angles(pairs.shape[0], generator=g, dtype=dtype).to(DEV)
    x = torch.randn(n, d, generator=g, dtype=dtype).to(DEV)
    return pairs, angles, x


def _fwd_bwd(x, pairs, angles, backend, transpose=False, w=None):
    x = x.detach().clone().requires_grad_(True)
    a = angles.detach().clone().requires_grad_(True)
    y = kama.givens_apply(x, pairs, a, backend=backend, transpose=transpose)
    w = torch.ones_like(y) if w is None else w
    (y * w).sum().backward()
    return y.detach(), x.grad, a.grad


@settings(max_examples=12, deadline=None)
@given(d=st.integers(2, 40), k=st.integers(0, 120), n=st.integers(0, 40), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64]), transpose=st.booleans())
def test_matches_dense_oracle(d, k, n, seed, dtype, transpose):
    pairs, angles, x = _problem(d, k, n, dtype, seed)
    w = torch.randn(n, d, dtype=dtype, generator=torch.Generator().manual_seed(seed)).to(DEV)
    y, gx, ga = _fwd_bwd(x, pairs, angles, "cuda", transpose, w)
    a64 = angles.detach().double().cpu().requires_grad_(True)
    x64 = x.detach().double().cpu().requires_grad_(True)
    m = oracle_matrix(pairs, a64, d)
    y64 = x64 @ (m if transpose else m.T)
    (y64 * w.double().cpu()).sum().backward()
    t = tol(dtype, k, d)
    assert y.shape == (n, d) and y.dtype == dtype
    torch.testing.assert_close(y.double().cpu(), y64.detach(), atol=t, rtol=t)
    torch.testing.assert_close(gx.double().cpu(), x64.grad, atol=t, rtol=t)
    ga64 = torch.zeros(k, dtype=torch.float64) if a64.grad is None else a64.grad
    torch.testing.assert_close(ga.double().cpu(), ga64, atol=t * max(1, n) * d, rtol=t)


@pytest.mark.parametrize("transpose", [False, True])
def test_blocked_plans_on_the_gpu_kernels(transpose):
    g = torch.Generator().manual_seed(7)
    d, k, n = 24, 5 * 12 + 4, 19
    pairs = kama.ops.blocked_pairs(d, k, generator=g)
    angles = kama.random_angles(k, generator=g, dtype=torch.float64).to(DEV)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(DEV)
    w = torch.randn(n, d, generator=g, dtype=torch.float64).to(DEV)
    y, gx, ga = _fwd_bwd(x, pairs, angles, "cuda", transpose, w)
    yr, gxr, gar = _fwd_bwd(x.cpu(), pairs, angles.cpu(), "reference", transpose, w.cpu())
    torch.testing.assert_close(y.cpu(), yr, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gx.cpu(), gxr, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ga.cpu(), gar, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("transpose", [False, True])
def test_persistent_loop_over_many_tiles_matches_reference(monkeypatch, transpose):
    # A 1 KiB scratch forces 8-row tiles: 70 rows = 9 tiles over 3 programs (or the GPU's grid); the CUDA C
    # kernels get 2-row tiles over at most 4 blocks.
    monkeypatch.setattr(_triton, "SCRATCH_BYTES", 1024)
    monkeypatch.setattr(_cuda, "TILE_BYTES", 1024)
    monkeypatch.setattr(_cuda, "MAX_GRID", 4)
    assert _cuda.tile_rows(33, 8, 2, 2, 48 * 1024) == 2
    assert _triton.tile_rows(70, 33, 8) == 8
    pairs, angles, x = _problem(33, 300, 70)
    w = torch.randn_like(x)
    out = _fwd_bwd(x, pairs, angles, "cuda", transpose, w)
    ref = _fwd_bwd(x, pairs, angles, "reference", transpose, w)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


def test_tile_rows_rule(monkeypatch):
    monkeypatch.setattr(_triton, "SCRATCH_BYTES", 96 * 1024)
    assert _triton.tile_rows(8192, 1024, 4) == 16
    assert _triton.tile_rows(8192, 4096, 4) == 8
    assert _triton.tile_rows(8192, 64, 4) == 64
    assert _triton.tile_rows(3, 64, 4) == 8
    assert _triton.tile_rows(20, 64, 4) == 32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_in_and_out_with_float32_state(dtype):
    pairs, angles, x = _problem(19, 200, 12, torch.float32)
    x16, a16 = x.to(dtype), angles.to(dtype)
    y = kama.givens_apply(x16, pairs, a16, backend="cuda")
    ref = kama.givens_apply(x16.float(), pairs, a16.float(), backend="reference")
    assert y.dtype == dtype
    # one rounding at the end: within one unit in the last place of the float32 result
    assert (y.float() - ref).abs().max() <= torch.finfo(dtype).eps * ref.abs().max()
    xg = x16.clone().requires_grad_(True)
    kama.givens_apply(xg, pairs, a16, backend="cuda").float().pow(2).sum().backward()
    assert xg.grad.dtype == dtype and torch.isfinite(xg.grad.float()).all()


def test_strided_batched_and_empty_inputs():
    pairs, angles, _ = _problem(9, 60, 1)
    base = torch.randn(4, 5, 18, dtype=torch.float64, device=DEV)
    for x in (base[..., ::2], base[::2, :, :9], base.transpose(0, 1)[..., 3:12]):
        y = kama.givens_apply(x, pairs, angles, backend="cuda")
        torch.testing.assert_close(y, kama.givens_apply(x, pairs, angles, backend="reference"), atol=1e-12,
                                   rtol=1e-12)
    empty = torch.zeros(0, 9, dtype=torch.float64, device=DEV, requires_grad=True)
    a = angles.clone().requires_grad_(True)
    y = kama.givens_apply(empty, pairs, a, backend="cuda")
    y.sum().backward()
    assert y.shape == (0, 9) and torch.equal(a.grad, torch.zeros_like(a))


def test_gradcheck_and_double_backward():
    pairs, angles, x = _problem(4, 5, 2)
    x.requires_grad_(True)
    angles.requires_grad_(True)
    fn = lambda x, a: kama.givens_apply(x, pairs, a, backend="cuda")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, angles))
    # the recorded backward (TRPO's Hessian-vector products) goes through the reference walk
    assert torch.autograd.gradgradcheck(fn, (x, angles))


def test_kama_linear_and_auto_dispatch_on_cuda():
    if not CUDA:
        pytest.skip("dispatch to 'cuda' needs CUDA tensors")
    layer = kama.KamaLinear(50, 30, generator=torch.Generator().manual_seed(0)).to("cuda")
    x = torch.randn(70, 50, device="cuda")
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias, atol=1e-5, rtol=1e-5)


def test_cuda_backend_rejects_cpu_tensors_outside_the_interpreter(monkeypatch):
    pairs, angles, x = _problem(5, 10, 3)
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        kama.givens_apply(x.cpu(), pairs, angles.cpu(), backend="cuda")


def test_missing_triton_falls_back_with_one_warning(monkeypatch):
    pairs, angles, x = _problem(5, 10, 3)
    expected = kama.givens_apply(x, pairs, angles, backend="reference")
    monkeypatch.setattr(_triton, "available", lambda: False)
    monkeypatch.setattr(_cuda, "available", lambda: False)
    monkeypatch.setattr(_triton, "import_error", lambda: "ImportError: simulated")
    monkeypatch.setattr(kama.ops.dispatch, "_WARNED_NO_GPU", False)
    with pytest.warns(RuntimeWarning, match="Triton is not available"):
        y = kama.givens_apply(x, pairs, angles, backend="cuda")
    torch.testing.assert_close(y, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kama.givens_apply(x, pairs, angles, backend="cuda")
    assert not givens.cuda_kernel_available()
    assert givens.choose_backend(4096, 1024, givens.as_plan(pairs, 5), device="cuda") in ("reference", "dense")


def test_cost_model_on_cuda_devices():
    g = torch.Generator().manual_seed(0)
    big = givens.GivensPlan(kama.random_pairs(4096, 170_360, generator=g), 4096)
    deep = givens.GivensPlan(kama.random_pairs(16, 5000, generator=g), 16)  # k >> d^2: materializing wins
    assert givens.choose_backend(8192, 4096, big, device="cuda") == "cuda"
    assert givens.choose_backend(8192, 16, deep, device="cuda") == "dense"
    # measured on an H100: at d = 1024 the fp32 GEMM (0.37 ms) beats the walk (0.83 ms) even after materializing
    mid = givens.GivensPlan(kama.random_pairs(1024, 35_496, generator=g), 1024)
    assert givens.choose_backend(8192, 1024, mid, device="cuda") == "dense"
    # with the matrix units in play (TF32, 16-bit) the GEMM wins at d = 4096 too
    for dtype in (torch.bfloat16, torch.float16):
        assert givens.choose_backend(8192, 4096, big, device="cuda", dtype=dtype) == "dense"
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert givens.choose_backend(8192, 4096, big, device="cuda") == "dense"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert givens.choose_backend(8192, 4096, big, device="cuda", dtype=torch.float64) == "cuda"


def test_cuda_c_tile_rule_and_availability():
    # rows per tile: largest power of two in [V, 64] whose tiles fit TILE_BYTES; 0 when V rows exceed the limit
    assert _cuda.TILE_BYTES == 64 * 1024
    assert _cuda.tile_rows(1024, 4, 1, 4, 227 * 1024) == 16
    assert _cuda.tile_rows(4096, 4, 1, 4, 227 * 1024) == 4
    assert _cuda.tile_rows(4096, 4, 2, 4, 227 * 1024) == 4  # over the target: V rows still fit the block
    assert _cuda.tile_rows(64, 4, 1, 4, 227 * 1024) == 64
    assert _cuda.tile_rows(16384, 4, 1, 4, 227 * 1024) == 0
    assert _cuda.tile_rows(4096, 8, 2, 2, 227 * 1024) == 2
    # the largest d the backward's two tiles fit on Hopper (227 KiB): 7264, in float32 and float64
    assert _cuda.tile_rows(7264, 4, 2, 4, 227 * 1024) == 4 and _cuda.tile_rows(7265, 4, 2, 4, 227 * 1024) == 0
    assert _cuda.tile_rows(7264, 8, 2, 2, 227 * 1024) == 2 and _cuda.tile_rows(7265, 8, 2, 2, 227 * 1024) == 0
    assert _cuda.available() == (CUDA and hasattr(torch.cuda, "_compile_kernel"))
    if not CUDA:
        assert "no CUDA device" in _cuda.import_error() or "_compile_kernel" in _cuda.import_error()


def test_unknown_gpu_engine_is_a_value_error(monkeypatch):
    pairs, angles, x = _problem(5, 10, 3)
    monkeypatch.setattr(gpu, "GPU_ENGINE", "cublas")
    with pytest.raises(ValueError, match=r"KAMA_GPU_ENGINE must be one of \['auto', 'nvrtc', 'triton'\], got 'cublas'"):
        kama.givens_apply(x, pairs, angles, backend="cuda")


@pytest.mark.skipif(not (CUDA and _cuda.available()), reason="needs a CUDA device and NVRTC")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, n", [(5, 3), (129, 77), (1000, 33), (4096, 9)])
def test_both_gpu_engines_agree(monkeypatch, dtype, d, n):
    g = torch.Generator().manual_seed(d)
    pairs = kama.random_pairs(d, 3 * d, generator=g)
    angles = kama.random_angles(3 * d, generator=g, dtype=torch.float32).to(DEV, dtype)
    x = torch.randn(n, d, generator=g).to(DEV, dtype)
    w = torch.randn(n, d, generator=g).to(DEV, dtype)
    out = {}
    for eng in ("triton", "nvrtc"):
        monkeypatch.setattr(gpu, "GPU_ENGINE", eng)
        out[eng] = _fwd_bwd(x, pairs, angles, "cuda", False, w)
    assert gpu._engine(x, kama.ops.reference.compute_dtype(dtype)) is _cuda
    t = 4 * torch.finfo(dtype).eps * (1 if dtype in (torch.float32, torch.float64) else 4)
    for a, b in zip(out["nvrtc"], out["triton"], strict=True):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= t * 50 * scale


@pytest.mark.skipif(not (CUDA and _cuda.available()), reason="needs a CUDA device and NVRTC")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("d, n, k, transpose", [(40, 37, 365, False), (257, 130, 7001, True), (4096, 9, 24000, False)])
def test_nvrtc_register_blocked_forward_matches_the_generic_walk(monkeypatch, dtype, d, n, k, transpose):
    g = torch.Generator().manual_seed(d)
    plan = kama.GivensPlan(kama.blocked_pairs(d, k, generator=g), d)
    angles = kama.random_angles(k, generator=g, dtype=torch.float32).to(DEV, dtype)
    x = torch.randn(n, d, generator=g).to(DEV, dtype)
    monkeypatch.setattr(gpu, "GPU_ENGINE", "nvrtc")
    blocked = kama.givens_apply(x, plan, angles, backend="cuda", transpose=transpose)
    assert _cuda.blocked_schedule(plan, x.device) is not None
    monkeypatch.setattr(_cuda, "BLOCKED_KERNEL", False)
    generic = kama.givens_apply(x, plan, angles, backend="cuda", transpose=transpose)
    scale = generic.float().abs().max().item()
    t = 8 * torch.finfo(dtype).eps * (1 if dtype in (torch.float32, torch.float64) else 4)
    assert (blocked.float() - generic.float()).abs().max().item() <= t * 50 * scale


def test_nvrtc_compile_failure_is_a_typed_error_and_disables_the_engine(monkeypatch):
    def broken(src, name):
        raise RuntimeError("CUDA error: simulated")

    monkeypatch.setattr(_cuda, "_compiler", lambda: broken)
    monkeypatch.setattr(_cuda, "_FAILED", [])
    monkeypatch.setattr(_cuda, "_KERNELS", {})
    assert "kama_fwd" in _cuda.source(torch.float32, torch.float32, 8, 256)
    msg = r"NVRTC could not build kama_fwd \(RuntimeError: CUDA error: simulated\)"
    with pytest.raises(_cuda.CompileError, match=msg):
        _cuda._kernel("kama_fwd", torch.float32, torch.float32, 8, 256, 1024)
    assert not _cuda.available() and "simulated" in _cuda.import_error()


@pytest.mark.skipif(not (CUDA and _cuda.available()), reason="needs a CUDA device and NVRTC")
def test_nvrtc_failure_falls_back_to_triton_with_a_warning(monkeypatch):
    pairs, angles, x = _problem(17, 40, 5, torch.float32)
    monkeypatch.setattr(gpu, "GPU_ENGINE", "nvrtc")

    def broken(*args, **kwargs):
        raise _cuda.CompileError("kama: NVRTC could not build kama_fwd (simulated)")

    monkeypatch.setattr(_cuda, "forward", broken)
    with pytest.warns(RuntimeWarning, match=r"simulated\); using the Triton kernels"):
        y = kama.givens_apply(x, pairs, angles, backend="cuda")
    torch.testing.assert_close(y, kama.givens_apply(x, pairs, angles, backend="reference"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_bank_groups_reorder_each_layer_into_conflict_free_groups(p):
    d = 64
    plan = givens.as_plan(kama.random_pairs(d, 700, generator=torch.Generator().manual_seed(p)), d)
    ii, jj, offsets, _ = plan.sorted_pairs(torch.device("cpu"))
    ii, jj, offsets = ii.tolist(), jj.tolist(), offsets.tolist()
    src, flip, new = _cuda.bank_groups(ii, jj, offsets, p)
    assert len(new) == len(offsets) and len(src) == len(flip) == new[-1]
    if p == 1:
        assert src == list(range(len(ii))) and not any(flip) and new == offsets
    for layer in range(plan.depth):
        lo, hi = new[layer], new[layer + 1]
        assert (hi - lo) % p == 0
        held = [q for q in src[lo:hi] if q >= 0]
        assert sorted(held) == list(range(offsets[layer], offsets[layer + 1]))  # same rotations, reordered
        for g0 in range(lo, hi, p):
            slots = [(q, f) for q, f in zip(src[g0:g0 + p], flip[g0:g0 + p], strict=True) if q >= 0]
            first = [(jj[q] if f else ii[q]) % p for q, f in slots]
            second = [(ii[q] if f else jj[q]) % p for q, f in slots]
            assert len(set(first)) == len(first) and len(set(second)) == len(second)
    # padding stays moderate: within 1.6x of the slots that aligned groups need at all
    aligned = sum(-(-(offsets[layer + 1] - offsets[layer]) // p) * p for layer in range(plan.depth))
    assert len(src) <= 1.6 * aligned
