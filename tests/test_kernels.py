"""The compiled CPU kernel: agreement with the reference walk across tile widths and threads, its fallback,
and its own argument checks (the kernel never sees unchecked indices)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import kama
from kama import givens

needs_kernel = pytest.mark.skipif(not givens.cpu_kernel_available(), reason="compiled kernel not built")


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
    monkeypatch.setattr(givens, "TILE_BUDGET_BYTES", budget)
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
            if not openmp:
                givens._cgivens.set_openmp(0, 0, 0)
            a = angles.clone().requires_grad_(True)
            y = kama.givens_apply(x, pairs, a, backend="cpu")
            y.pow(2).sum().backward()
            outs.append((y.detach(), a.grad))
            givens._use_torch_openmp()
    finally:
        torch.set_num_threads(old)
        givens._use_torch_openmp()
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
    inside a long plan, in the SIMD body rather than the remainder, is caught too); calls check their sizes and
    that the pairs were made for them."""
    def make(ij, d):
        ij = torch.as_tensor(ij, dtype=torch.int32).reshape(-1, 2).contiguous()
        return givens._cgivens.make_pairs(ij.data_ptr(), ij.shape[0], d)

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
    with pytest.raises(ValueError, match="invalid sizes: k=-1"):
        givens._cgivens.make_pairs(base.data_ptr(), -1, d)
    with pytest.raises(ValueError, match="invalid sizes: k=1 d=0"):
        givens._cgivens.make_pairs(base.data_ptr(), 1, 0)
    x = torch.randn(4, 3)
    y = torch.empty_like(x)
    cs = torch.tensor([[1.0, 0.0]]).repeat(k, 1)
    good = make(base, d)  # all valid: no error
    base[5] = 7  # the capsule holds its own copy: later writes to the source do not reach the kernel
    givens._cgivens.forward(x.data_ptr(), y.data_ptr(), 4, d, good, cs.data_ptr(), k, 4, 1, 0, 0)
    torch.testing.assert_close(y, x)
    for tile in (4, 1):  # the tiled walk and the row walk
        with pytest.raises(ValueError, match="pairs were made for k=203, d=3, not k=5, d=3"):
            givens._cgivens.forward(x.data_ptr(), y.data_ptr(), 4, d, good, cs.data_ptr(), 5, tile, 1, 0, 0)
        with pytest.raises(ValueError, match="pairs were made for k=203, d=3, not k=203, d=4"):
            givens._cgivens.forward(x.data_ptr(), y.data_ptr(), 1, 4, good, cs.data_ptr(), k, tile, 1, 0, 0)
        with pytest.raises(TypeError, match="capsule from _cgivens.make_pairs"):
            givens._cgivens.forward(x.data_ptr(), y.data_ptr(), 4, d, base.data_ptr(), cs.data_ptr(), k, tile, 1, 0,
                                    0)
    g = torch.zeros(1, k, dtype=torch.float64)
    with pytest.raises(TypeError, match="capsule from _cgivens.make_pairs"):
        givens._cgivens.backward(y.data_ptr(), x.data_ptr(), y.data_ptr(), g.data_ptr(), 4, 3, None, cs.data_ptr(),
                                 k, 4, 1, 0, 0)
    with pytest.raises(ValueError, match="invalid sizes"):
        givens._cgivens.forward(x.data_ptr(), y.data_ptr(), 4, 3, good, cs.data_ptr(), k, 3, 1, 0, 0)
    with pytest.raises(ValueError, match="invalid sizes"):
        givens._cgivens.backward(x.data_ptr(), x.data_ptr(), y.data_ptr(), y.data_ptr(), -1, 3, good, cs.data_ptr(),
                                 k, 4, 1, 0, 0)


def test_plans_pickle_without_their_kernel_caches():
    import copy
    import pickle

    pairs, angles, x = _problem(d=16, k=givens.COEF_CACHE_MIN_ROTATIONS, n=2)
    plan = givens.GivensPlan(pairs, 16)
    y = kama.givens_apply(x, plan, angles)  # builds the kernel's pairs and the coefficient cache
    for clone in (pickle.loads(pickle.dumps(plan)), copy.deepcopy(plan)):
        assert "_kernel_pairs" not in clone.__dict__ and "_coef_cache" not in clone.__dict__
        torch.testing.assert_close(kama.givens_apply(x, clone, angles), y)


def test_cpu_backend_needs_cpu_tensors():
    pairs, angles, x = _problem()
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        kama.givens_apply(x.to("meta"), pairs, angles.to("meta"), backend="cpu")


def test_missing_kernel_falls_back_with_one_warning(monkeypatch):
    pairs, angles, x = _problem()
    expected = kama.givens_apply(x, pairs, angles, backend="reference")
    monkeypatch.setattr(givens, "_cgivens", None)
    monkeypatch.setattr(givens, "_CGIVENS_ERROR", ImportError("simulated"))
    monkeypatch.setattr(givens, "_WARNED_NO_KERNEL", False)
    with pytest.warns(RuntimeWarning, match="compiled CPU kernel could not be loaded"):
        y = kama.givens_apply(x, pairs, angles, backend="cpu")
    torch.testing.assert_close(y, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kama.givens_apply(x, pairs, angles, backend="cpu")  # warned once only
        assert givens.choose_backend(10, 37, givens.as_plan(pairs, 37)) == "reference"
    assert not givens.cpu_kernel_available()


def test_tile_width_rule(monkeypatch):
    monkeypatch.setattr(givens, "TILE_BUDGET_BYTES", 512 * 1024)
    assert givens._tile_width(1, 1024, 4, 1) == 1
    assert givens._tile_width(5, 1024, 4, 1) == 8
    assert givens._tile_width(64, 64, 4, 2) == 64
    assert givens._tile_width(300, 1024, 4, 1) == 128
    assert givens._tile_width(300, 1024, 4, 2) == 64
    assert givens._tile_width(300, 4096, 8, 2) == 32
    assert givens._tile_width(300, 4096, 4, 1) == 64  # a forward keeps 64 columns
    assert givens._tile_width(300, 16384, 4, 1) == 64


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
        assert givens._tile_width(v.shape[0], 11, v.element_size(), 1) == 1
        with torch.no_grad():
            got = kama.givens_apply(v, pairs, angles, backend="cpu", transpose=transpose)
        ref = kama.givens_apply(v, pairs, angles, backend="reference", transpose=transpose)
        torch.testing.assert_close(got, ref, **tol)
    scale = torch.linspace(0.5, 2.0, 11, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(givens.givens_apply_scaled(row, pairs, angles, scale),
                                   kama.givens_apply(row, pairs, angles, backend="reference") * scale, **tol)


def test_scaled_apply_matches_composition():
    pairs, angles, x = _problem(d=20, k=150, n=70, dtype=torch.float64)
    scale = torch.rand(20, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    ref = kama.givens_apply(x, pairs, angles, backend="reference") * scale
    with torch.no_grad():
        torch.testing.assert_close(givens.givens_apply_scaled(x, pairs, angles, scale), ref)
    xg = x.clone().requires_grad_(True)
    out = givens.givens_apply_scaled(xg, pairs, angles, scale)  # with gradients: the plain composition
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(givens.givens_apply_scaled(x[None], pairs, angles, scale)[0], ref)


@needs_kernel
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (7, 7), (1, 6), (6, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kama_linear_matches_the_unfused_composition(monkeypatch, shape, bias, dtype):
    from kama.nn import _kama_linear_reference, _KamaLinearFunction

    monkeypatch.setattr(givens, "TILE_BUDGET_BYTES", 1024)  # several tiles per call
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
                ref = _kama_linear_reference(x, layer.angles, layer.scale, layer.bias, layer._plan(), o)
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
    p = x.data_ptr()
    ij = torch.tensor([[0, 1]], dtype=torch.int32)
    ok = givens._cgivens.make_pairs(ij.data_ptr(), 1, 3)
    with pytest.raises(ValueError, match="invalid sizes: in_f=0"):
        givens._cgivens.linear_forward(p, p, 0, 4, 0, 3, ok, p, 1, p, 0, 4, 1, 0)
    with pytest.raises(ValueError, match="invalid sizes: in_f=3 out_f=0"):
        givens._cgivens.linear_backward(p, p, p, p, p, p, 0, 4, 3, 0, ok, p, 1, p, 4, 1, 0)
    with pytest.raises(ValueError, match="pairs were made for k=1, d=3, not k=1, d=4"):
        givens._cgivens.linear_forward(p, p, 0, 4, 4, 3, ok, p, 1, p, 0, 4, 1, 0)
    with pytest.raises(TypeError, match="capsule from _cgivens.make_pairs"):
        givens._cgivens.linear_backward(p, p, p, p, p, p, 0, 4, 3, 3, ij.data_ptr(), p, 1, p, 4, 1, 0)
    with pytest.raises(ValueError, match="invalid sizes: k=-1"):
        givens._cgivens.cos_sin(p, p, -1, 0)
    with pytest.raises(ValueError, match="invalid sizes: nbytes=-1"):
        givens._cgivens.same_bytes(p, p, -1)
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])
    assert givens._cgivens.same_bytes(a.data_ptr(), a.clone().data_ptr(), 8)
    assert not givens._cgivens.same_bytes(a.data_ptr(), b.data_ptr(), 8)
    assert givens._cgivens.same_bytes(a.data_ptr(), b.data_ptr(), 4)  # only the first float compared


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
    givens._cgivens.cos_sin(a.data_ptr(), cs.data_ptr(), a.numel(), int(dtype == torch.float64))
    c, s = cs.unbind(1)
    finite = torch.isfinite(a)
    eps = torch.finfo(dtype).eps
    for got, ref in ((c, torch.cos(a.double()).to(dtype)), (s, torch.sin(a.double()).to(dtype))):
        assert float((got - ref)[finite].abs().max()) <= eps
        assert torch.isnan(got[~finite]).all()


@needs_kernel
def test_large_plans_reuse_coefficients_only_while_the_angles_keep_their_values():
    d, k = 64, givens.COEF_CACHE_MIN_ROTATIONS
    pairs, angles, x = _problem(d=d, k=k, n=3, dtype=torch.float64)
    plan = givens.as_plan(pairs, d)
    first = kama.givens_apply(x, plan, angles, backend="cpu")
    cached = plan._coef_cache
    torch.testing.assert_close(kama.givens_apply(x, plan, angles, backend="cpu"), first)
    assert plan._coef_cache is cached  # same values: reused
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
