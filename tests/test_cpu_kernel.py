"""The compiled CPU kernel: agreement with the reference walk across tile widths and threads, its fallback,
and its own argument checks (the kernel never sees unchecked indices)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import kama
from conftest import set_tuning
from kama.ops import cpu, dispatch
from kama.ops.plans import GivensPlan, as_plan

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="compiled kernel not built")
C = cpu._cgivens


def _problem(d=37, k=400, n=300, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = kama.random_pairs(d, k, generator=g)
    angles = kama.random_angles(k, generator=g, dtype=dtype)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    return pairs, angles, x


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 17, 31, 32, 33, 100, 257])
@pytest.mark.parametrize("budget", [4096, 524288])
@pytest.mark.parametrize("transpose", [False, True])
def test_every_tile_width_matches_reference(monkeypatch, n, budget, transpose):
    set_tuning(monkeypatch, tile_budget_bytes=budget)
    pairs, angles, x = _problem(n=n, dtype=torch.float64)
    a1 = angles.clone().requires_grad_(True)
    a2 = angles.clone().requires_grad_(True)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1 = kama.givens_apply(x1, pairs, a1, backend="cpu", transpose=transpose)
    y2 = kama.givens_apply(x2, pairs, a2, backend="reference", transpose=transpose)
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a1.grad, a2.grad, atol=1e-10, rtol=1e-10)


@needs_kernel
def test_threads_and_thread_pools_agree():
    pairs, angles, x = _problem(d=64, k=2000, n=1000)
    old = torch.get_num_threads()
    try:
        outs = []
        for threads, openmp in ((1, True), (2, True), (2, False)):
            torch.set_num_threads(threads)
            cpu._module()  # threads set up on first use
            if not openmp:
                assert C.use_openmp(None) is False
            a = angles.clone().requires_grad_(True)
            y = kama.givens_apply(x, pairs, a, backend="cpu")
            y.pow(2).sum().backward()
            outs.append((y.detach(), a.grad))
            cpu._OPENMP = None  # set up again on the next use
    finally:
        torch.set_num_threads(old)
        cpu._OPENMP = None
    for y, g in outs[1:]:
        assert torch.equal(y, outs[0][0])  # tiles are independent: bit-identical outputs
        torch.testing.assert_close(g, outs[0][1], rtol=1e-5, atol=1e-3)  # reduction order differs


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_through_the_kernel(dtype):
    pairs, angles, x = _problem()
    y = kama.givens_apply(x.to(dtype), pairs, angles.to(dtype), backend="cpu")
    ref = kama.givens_apply(x.to(dtype).float(), pairs, angles.to(dtype).float(), backend="reference")
    assert y.dtype == dtype
    assert (y.float() - ref).abs().max() <= 2 * torch.finfo(dtype).eps * ref.abs().max()


@needs_kernel
def test_kernel_rejects_bad_indices_and_sizes_itself():
    """Pairs reach the kernels only through make_pairs, which validates them once (vectorized: a bad pair deep
    inside a long plan, in the SIMD body rather than the remainder, is caught too); calls check every tensor's
    dtype, device, contiguity and size, and that the pairs were made for them."""
    def make(ij, d):
        return C.make_pairs(torch.as_tensor(ij, dtype=torch.int32).reshape(-1, 2).contiguous(), d)

    for pair in ([0, 3], [-1, 1], [1, 1]):
        with pytest.raises(ValueError, match="pairs must lie in"):
            make([pair], 3)
    d, k = 3, 203
    base = torch.tensor([[0, 1]], dtype=torch.int32).repeat(k, 1)
    for where, pair in ((57, (0, 3)), (64, (-1, 1)), (128, (2, 2)), (100, (0, -2**31)), (202, (5, 1)),
                        (31, (2**31 - 1, 0))):
        ij = base.clone()
        ij[where] = torch.tensor(pair, dtype=torch.int32)
        with pytest.raises(ValueError, match="pairs must lie in"):
            make(ij, d)
    with pytest.raises(TypeError, match="pairs must have dtype torch.int32"):
        C.make_pairs(base.long(), d)
    with pytest.raises(ValueError, match="invalid sizes: d=0"):
        C.make_pairs(base, 0)
    with pytest.raises(TypeError, match="pairs must be a torch.Tensor"):
        C.make_pairs([0, 1], d)
    x = torch.randn(4, 3)
    y = torch.empty_like(x)
    cs = torch.tensor([[1.0, 0.0]]).repeat(k, 1)
    good = make(base, d)  # all valid: no error
    base[5] = 7  # the capsule holds its own copy: later writes to the source do not reach the kernel
    C.forward(x, y, good, cs, 4, d, 4, 1, False)
    torch.testing.assert_close(y, x)
    for tile in (4, 1):  # the tiled walk and the row walk
        with pytest.raises(ValueError, match="cs has 406 elements, the call needs 10"):
            C.forward(x, y, make(base[:5] * 0 + torch.tensor([0, 1], dtype=torch.int32), d), cs, 4, d, tile, 1,
                      False)
        with pytest.raises(ValueError, match="pairs were made for d=3, not d=4"):
            C.forward(x, y, good, cs, 3, 4, tile, 1, False)
        with pytest.raises(TypeError, match="capsule from _cgivens.make_pairs"):
            C.forward(x, y, base, cs, 4, d, tile, 1, False)
        with pytest.raises(ValueError, match="y has 12 elements, the call needs 15"):
            C.forward(torch.randn(5, 3), y, good, cs, 5, d, tile, 1, False)
    g = torch.zeros(1, k, dtype=torch.float64)
    with pytest.raises(TypeError, match="capsule from _cgivens.make_pairs"):
        C.backward(y, x, y, g, None, cs, 4, 3, 4, 1, False)
    with pytest.raises(ValueError, match="invalid sizes"):
        C.forward(x, y, good, cs, 4, 3, 3, 1, False)
    with pytest.raises(ValueError, match="invalid sizes"):
        C.backward(x, x, y, y, good, cs, -1, 3, 4, 1, False)
    with pytest.raises(ValueError, match="gacc has 203 elements, the call needs 406"):
        C.backward(x, x, y, g, good, cs, 4, 3, 4, 2, False)
    with pytest.raises(TypeError, match="gacc must have dtype torch.float64"):
        C.backward(x, x, y, g.float(), good, cs, 4, 3, 4, 1, False)
    with pytest.raises(TypeError, match="y must have dtype torch.float32"):
        C.forward(x, y.double(), good, cs, 4, d, 4, 1, False)
    with pytest.raises(ValueError, match="x must be contiguous"):
        C.forward(torch.randn(3, 4).t(), y, good, cs, 4, d, 4, 1, False)
    with pytest.raises(ValueError, match="x must be a CPU tensor"):
        C.forward(x.to("meta"), y, good, cs, 4, d, 4, 1, False)
    with pytest.raises(TypeError, match="x must have dtype torch.float32 or torch.float64"):
        C.forward(x.long(), y, good, cs, 4, d, 4, 1, False)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        C.forward(x, y.numpy(), good, cs, 4, d, 4, 1, False)
    with pytest.raises(ValueError, match="scale has 2 elements, the call needs 3"):
        C.forward(x, y, good, cs, 4, d, 4, 1, False, torch.ones(2))


OUT_OF_BOUNDS_PROBE = """
import sys, torch
from kama.ops import cpu
C = cpu._cgivens
d, k = 64, 10
pairs = C.make_pairs(torch.tensor([[0, 63]] * k, dtype=torch.int32), d)
cs = torch.zeros(k, 2)
big = torch.randn(4096, d)
calls = {
    "forward: y too short": lambda: C.forward(big, torch.empty(1, d), pairs, cs, 4096, d, 128, 1, False),
    "forward: rows claimed beyond x": lambda: C.forward(torch.randn(2, d), torch.empty(4096, d), pairs, cs, 4096, d,
                                                        128, 1, False),
    "backward: gx too short": lambda: C.backward(big, big, torch.empty(3), torch.zeros(1, k, dtype=torch.float64),
                                                 pairs, cs, 4096, d, 32, 1, False),
    "linear_forward: out too short": lambda: C.linear_forward(big, torch.empty(2), None, pairs, torch.zeros(k),
                                                               torch.ones(d), None, 4096, d, d, 128, 1),
    "linear_backward: ga too short": lambda: C.linear_backward(big, big, big, big, torch.empty(1), torch.ones(d),
                                                                None, pairs, torch.zeros(k), torch.ones(d), 4096, d,
                                                                d, 32, 1),
    "cos_sin: cs too short": lambda: C.cos_sin(torch.zeros(10_000), torch.empty(3, 2)),
}
for name, call in calls.items():
    try:
        call()
    except (ValueError, TypeError) as e:
        print(name, "->", type(e).__name__, e)
    else:
        print(name, "-> no error")
        sys.exit(1)
"""


@needs_kernel
def test_wrong_lengths_are_python_errors_never_writes_out_of_bounds(tmp_path):
    """Each call would write (or read) far past a too-small buffer if the sizes were not checked; in a child
    process, so a crash fails the test instead of the session."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", OUT_OF_BOUNDS_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("-> ValueError") == 6, proc.stdout


def test_plans_pickle_without_their_kernel_caches():
    import copy
    import pickle

    pairs, angles, x = _problem(d=16, k=cpu.COEF_CACHE_MIN_ROTATIONS, n=2)
    plan = GivensPlan(pairs, 16)
    y = kama.givens_apply(x, plan, angles)  # builds the kernel's pairs and the coefficient cache
    assert plan.caches.kernel_pairs is not None and plan.caches.coefficients is not None
    for clone in (pickle.loads(pickle.dumps(plan)), copy.deepcopy(plan)):
        assert clone.caches.kernel_pairs is None and clone.caches.coefficients is None and not clone.caches.devices
        torch.testing.assert_close(kama.givens_apply(x, clone, angles), y)
    assert set(plan.__getstate__()) == {"d", "pairs"}


def test_cpu_backend_needs_cpu_tensors():
    pairs, angles, x = _problem()
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        kama.givens_apply(x.to("meta"), pairs, angles.to("meta"), backend="cpu")


def test_missing_kernel_falls_back_with_one_warning(monkeypatch):
    pairs, angles, x = _problem()
    expected = kama.givens_apply(x, pairs, angles, backend="reference")
    monkeypatch.setattr(cpu, "_cgivens", None)
    monkeypatch.setattr(cpu, "KERNEL_ERROR", ImportError("simulated"))
    monkeypatch.setattr(cpu, "_WARNED", False)
    with pytest.warns(RuntimeWarning, match="compiled CPU kernel could not be loaded"):
        y = kama.givens_apply(x, pairs, angles, backend="cpu")
    torch.testing.assert_close(y, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kama.givens_apply(x, pairs, angles, backend="cpu")  # warned once only
        assert dispatch.choose_backend(10, 37, as_plan(pairs, 37)) == "reference"
    assert not kama.ops.cpu_kernel_available()


def test_tile_width_rule(monkeypatch):
    set_tuning(monkeypatch, tile_budget_bytes=512 * 1024)
    assert cpu.tile_width(1, 1024, 4, 1) == 1
    assert cpu.tile_width(5, 1024, 4, 1) == 8
    assert cpu.tile_width(2, 1024, 4, 1) == 8 and cpu.tile_width(3, 64, 4, 2) == 8  # one 256-bit vector
    assert cpu.tile_width(2, 1024, 8, 1) == 4 and cpu.tile_width(3, 64, 8, 2) == 4
    assert cpu.tile_width(64, 64, 4, 2) == 64
    assert cpu.tile_width(300, 1024, 4, 1) == 128
    assert cpu.tile_width(300, 1024, 4, 2) == 64
    assert cpu.tile_width(300, 4096, 8, 2) == 32
    assert cpu.tile_width(300, 4096, 4, 1) == 64  # a forward keeps 64 columns
    assert cpu.tile_width(300, 16384, 4, 1) == 64


@needs_kernel
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 203])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transpose", [False, True])
def test_row_walk_matches_reference(k, dtype, transpose):
    """One row takes the row walk (packed pairs and coefficients, unrolled by 4: every remainder of k), also
    with a fused output scale and from a strided row."""
    pairs, angles, x = _problem(d=11, k=k, n=3, dtype=dtype)
    row = x[1:2].clone()
    strided = x.t()[:, 1:2].t()  # (1, 11) with a column stride of 3
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    for v in (row, strided):
        assert cpu.tile_width(v.shape[0], 11, v.element_size(), 1) == 1
        with torch.no_grad():
            got = kama.givens_apply(v, pairs, angles, backend="cpu", transpose=transpose)
        ref = kama.givens_apply(v, pairs, angles, backend="reference", transpose=transpose)
        torch.testing.assert_close(got, ref, **tol)
    scale = torch.linspace(0.5, 2.0, 11, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(kama.ops.givens_apply_scaled(row, pairs, angles, scale),
                                   kama.givens_apply(row, pairs, angles, backend="reference") * scale, **tol)


def test_scaled_apply_matches_composition():
    pairs, angles, x = _problem(d=20, k=150, n=70, dtype=torch.float64)
    scale = torch.rand(20, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    ref = kama.givens_apply(x, pairs, angles, backend="reference") * scale
    with torch.no_grad():
        torch.testing.assert_close(kama.ops.givens_apply_scaled(x, pairs, angles, scale), ref)
    xg = x.clone().requires_grad_(True)
    out = kama.ops.givens_apply_scaled(xg, pairs, angles, scale)  # with gradients: the plain composition
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(kama.ops.givens_apply_scaled(x[None], pairs, angles, scale)[0], ref)


@needs_kernel
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (7, 7), (1, 6), (6, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kama_linear_matches_the_unfused_composition(monkeypatch, shape, bias, dtype):
    from kama.ops.linear import _KamaLinearFunction, reference_linear

    set_tuning(monkeypatch, tile_budget_bytes=1024)  # several tiles per call
    i, o = shape
    layer = kama.KamaLinear(i, o, bias=bias, num_rotations=40, dtype=dtype,
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.scale.uniform_(0.5, 2.0)
    params = [layer.angles, layer.scale] + ([layer.bias] if bias else [])
    t = 1e-5 if dtype == torch.float32 else 1e-12
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for n in (0, 1, 33, 200):
                x = torch.randn(n, i, dtype=dtype, generator=torch.Generator().manual_seed(n), requires_grad=True)
                y = _KamaLinearFunction.apply(x, layer.angles, layer.scale, layer.bias, layer._plan(), o)
                ref = reference_linear(x, layer.angles, layer.scale, layer.bias, layer._plan(), o)
                torch.testing.assert_close(y, ref, atol=t, rtol=t)
                w = torch.randn_like(ref)
                g1 = torch.autograd.grad((y * w).sum(), [x, *params], allow_unused=True)
                g2 = torch.autograd.grad((ref * w).sum(), [x, *params], allow_unused=True)
                for a, b in zip(g1, g2, strict=True):
                    torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), atol=t * max(n, 1),
                                               rtol=t)
    finally:
        torch.set_num_threads(old)


@needs_kernel
def test_fused_kama_linear_gradcheck_widening_without_bias():
    layer = kama.KamaLinear(3, 7, bias=False, num_rotations=25, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def f(x, angles, scale):
        return torch.func.functional_call(layer, {"angles": angles, "scale": scale}, (x,))

    args = (x, *[p.detach().clone().requires_grad_(True) for p in (layer.angles, layer.scale)])
    assert torch.autograd.gradcheck(f, args)


@needs_kernel
def test_fused_kernel_rejects_bad_sizes_itself():
    x = torch.randn(4, 3)
    ok = C.make_pairs(torch.tensor([[0, 1]], dtype=torch.int32), 3)
    a, s3 = torch.zeros(1), torch.ones(3)
    with pytest.raises(ValueError, match="invalid sizes: in_f=0"):
        C.linear_forward(x, x, None, ok, a, s3, None, 4, 0, 3, 4, 1)
    with pytest.raises(ValueError, match="invalid sizes: in_f=3 out_f=0"):
        C.linear_backward(x, x, x, x, a, s3, None, ok, a, s3, 4, 3, 0, 4, 1)
    with pytest.raises(ValueError, match="pairs were made for d=3, not d=4"):
        C.linear_forward(x, x, None, ok, a, s3, None, 4, 4, 3, 4, 1)
    with pytest.raises(TypeError, match="capsule from _cgivens.make_pairs"):
        C.linear_backward(x, x, x, x, a, s3, None, x, a, s3, 4, 3, 3, 4, 1)
    with pytest.raises(ValueError, match="ysave has 12 elements, the call needs 16"):
        C.linear_forward(torch.randn(4, 4), torch.empty(4, 3), x, C.make_pairs(torch.tensor([[0, 1]],
                         dtype=torch.int32), 4), a, s3, None, 4, 4, 3, 4, 1)
    with pytest.raises(ValueError, match="bias has 2 elements, the call needs 3"):
        C.linear_forward(x, torch.empty(4, 3), None, ok, a, s3, torch.zeros(2), 4, 3, 3, 4, 1)
    with pytest.raises(ValueError, match="cs has 2 elements, the call needs 4"):
        C.cos_sin(torch.zeros(2), torch.empty(2))
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])
    assert C.same_bytes(a, a.clone())
    assert not C.same_bytes(a, b)
    assert not C.same_bytes(a, a[:1].clone())  # another size: not the same bytes
    assert not C.same_bytes(a, a.double())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_cos_sin_is_accurate_everywhere(dtype):
    """The extension's branch-free cos/sin (range reduction + series): within one unit of the dtype's epsilon of
    libm's on small, large, negative and special angles, blocks over the 1e5 threshold included."""
    a = torch.cat([torch.linspace(-50.0, 50.0, 20_001, dtype=torch.float64),
                   torch.linspace(-99_999.0, 99_999.0, 20_001, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, 1e-300, math.pi / 4, math.pi / 2, 3 * math.pi / 2, -math.pi, 1e5, -2e6,
                                 1e300, math.nan, math.inf, -math.inf], dtype=torch.float64)]).to(dtype)
    cs = torch.empty(a.numel(), 2, dtype=dtype)
    C.cos_sin(a, cs)
    c, s = cs.unbind(1)
    finite = torch.isfinite(a)
    eps = torch.finfo(dtype).eps
    for got, ref in ((c, torch.cos(a.double()).to(dtype)), (s, torch.sin(a.double()).to(dtype))):
        assert float((got - ref)[finite].abs().max()) <= eps
        assert torch.isnan(got[~finite]).all()


@needs_kernel
def test_large_plans_reuse_coefficients_only_while_the_angles_keep_their_values():
    d, k = 64, cpu.COEF_CACHE_MIN_ROTATIONS
    pairs, angles, x = _problem(d=d, k=k, n=3, dtype=torch.float64)
    plan = as_plan(pairs, d)
    first = kama.givens_apply(x, plan, angles, backend="cpu")
    cached = plan.caches.coefficients
    torch.testing.assert_close(kama.givens_apply(x, plan, angles, backend="cpu"), first)
    assert plan.caches.coefficients is cached  # same values: reused
    with torch.no_grad():
        angles[5] += 0.25  # in place: same storage, new value
    again = kama.givens_apply(x, plan, angles, backend="cpu")
    torch.testing.assert_close(again, kama.givens_apply(x, plan, angles, backend="reference"), atol=1e-10, rtol=0)
    assert not torch.allclose(again, first)
    angles.data[7] -= 0.5  # through .data, as TRPO's line search writes: no version bump, still noticed
    latest = kama.givens_apply(x, plan, angles, backend="reference")
    torch.testing.assert_close(kama.givens_apply(x, plan, angles, backend="cpu"), latest, atol=1e-10, rtol=0)
    assert not torch.allclose(latest, again)
    f32 = kama.givens_apply(x.float(), plan, angles.float(), backend="cpu")  # another dtype: recomputed
    torch.testing.assert_close(f32, latest.float(), atol=1e-4, rtol=0)
