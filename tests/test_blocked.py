"""Register-blocked plans: the sampler's structure, the kernel against the dense oracle on every backend and
size, its gradients (once and twice), its own argument checks, and the features and mixing built on it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kama
from conftest import oracle_matrix, set_tuning
from kama.ops import blocked_pairs, cpu, givens_apply
from kama.ops.blocked import BLOCK, GROUP_ROTATIONS, structure
from kama.ops.plans import GivensPlan

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="compiled kernel not built")


def test_sampler_structure():
    d, k = 20, 5 * GROUP_ROTATIONS + 7
    p = blocked_pairs(d, k, generator=torch.Generator().manual_seed(0))
    assert p.shape == (k, 2) and p.dtype == torch.long and bool((p[:, 0] != p[:, 1]).all())
    assert kama.blocked_pairs is blocked_pairs  # public at the top level
    app = p.flip(0)  # application order
    for g in range(5):
        grp = app[GROUP_ROTATIONS * g: GROUP_ROTATIONS * (g + 1)]
        assert len(set(grp.flatten().tolist())) == BLOCK  # 8 coordinates per group
        assert len(set(grp[:4].flatten().tolist())) == BLOCK  # round 1: disjoint
    st_ = structure(GivensPlan(p, d))
    assert st_.groups == 5 and st_.tail == 7 and st_.slots.shape == (5, BLOCK)
    # groups of one phase are disjoint: d // 8 = 2 groups per phase
    assert not set(app[:12].flatten().tolist()) & set(app[12:24].flatten().tolist())
    assert torch.equal(p, blocked_pairs(d, k, generator=torch.Generator().manual_seed(0)))  # explicit randomness


def test_structure_rejects_other_plans():
    assert structure(GivensPlan(kama.random_pairs(16, 48, generator=torch.Generator().manual_seed(0)), 16)) is None
    p = blocked_pairs(16, 24, generator=torch.Generator().manual_seed(1))
    q = p.clone()
    q[-3] = q[-3].flip(0)  # one rotation's orientation
    assert structure(GivensPlan(q, 16)) is None
    assert structure(GivensPlan(p[:11], 16)) is None  # no full group
    assert structure(GivensPlan(p, 16)) is not None


@settings(max_examples=40, deadline=None)
@given(d=st.integers(8, 70), groups=st.integers(0, 20), tail=st.integers(0, 11), batch=st.integers(0, 70),
       seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.float64]),
       backend=st.sampled_from(["reference", "cpu", "dense"]), transpose=st.booleans())
def test_blocked_plans_match_the_oracle(d, groups, tail, batch, seed, dtype, backend, transpose):
    g = torch.Generator().manual_seed(seed)
    k = groups * GROUP_ROTATIONS + tail
    pairs = blocked_pairs(d, k, generator=g)
    angles = kama.random_angles(k, generator=g, dtype=dtype)
    x = torch.randn(batch, d, generator=g, dtype=torch.float64).to(dtype)
    m = oracle_matrix(pairs, angles.double(), d)
    ref = x.double() @ (m if transpose else m.T)
    xr, ar = x.clone().requires_grad_(), angles.clone().requires_grad_()
    y = givens_apply(xr, pairs, ar, backend=backend, transpose=transpose)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(y.double(), ref, atol=tol * max(1, k) ** 0.5, rtol=tol)
    if k == 0 or batch == 0:
        return
    w = torch.randn(y.shape, generator=g, dtype=dtype)
    (y * w).sum().backward()
    ao = angles.double().clone().requires_grad_()
    xo = x.double().clone().requires_grad_()
    mo = oracle_matrix(pairs, ao, d)
    ((xo @ (mo if transpose else mo.T)) * w.double()).sum().backward()
    torch.testing.assert_close(xr.grad.double(), xo.grad, atol=tol * max(1, k) ** 0.5, rtol=tol)
    torch.testing.assert_close(ar.grad.double(), ao.grad, atol=tol * max(1, batch) * max(1, k) ** 0.5, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("n", [8, 9, 31, 64, 257])
@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_kernel_runs_and_agrees_across_tiles_and_threads(monkeypatch, n, threads):
    d, k = 40, 30 * GROUP_ROTATIONS + 5
    g = torch.Generator().manual_seed(n)
    plan = GivensPlan(blocked_pairs(d, k, generator=g), d)
    angles = kama.random_angles(k, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for cols in (8, 32, 128):
            set_tuning(monkeypatch, blocked_columns=cols)
            for transpose in (False, True):
                y = givens_apply(x, plan, angles, backend="cpu", transpose=transpose)
                torch.testing.assert_close(y, givens_apply(x, plan, angles, backend="reference", transpose=transpose),
                                           atol=1e-12, rtol=1e-12)
    finally:
        torch.set_num_threads(old)
    assert cpu.kernel_blocks(plan) is not None  # the register-blocked walk ran
    kac = GivensPlan(kama.random_pairs(d, k, generator=g), d)
    givens_apply(x, kac, angles, backend="cpu")
    assert cpu.kernel_blocks(kac) is None and kac.caches.kernel_blocks is False


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_backward_agrees_across_tile_widths(monkeypatch, dtype):
    """The register-blocked backward (its groups reordered for 16 vector registers) gives the reference walk's
    input and angle gradients at every tile width, transposed or not, on a batch that no width divides."""
    d, k, n = 264, 30 * GROUP_ROTATIONS + 5, 77
    g = torch.Generator().manual_seed(3)
    plan = GivensPlan(blocked_pairs(d, k, generator=g), d)
    angles = kama.random_angles(k, generator=g, dtype=dtype)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(n, d, generator=g, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-11

    def grads(backend: str, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
        xr, ar = x.clone().requires_grad_(), angles.clone().requires_grad_()
        (givens_apply(xr, plan, ar, backend=backend, transpose=transpose) * w).sum().backward()
        assert xr.grad is not None and ar.grad is not None
        return xr.grad, ar.grad

    for transpose in (False, True):
        want = grads("reference", transpose)
        for cols in (8, 16, 32, 64, 128):
            set_tuning(monkeypatch, blocked_columns=cols, blocked_backward_columns=cols)
            got = grads("cpu", transpose)
            torch.testing.assert_close(got[0], want[0], atol=tol, rtol=tol)
            torch.testing.assert_close(got[1], want[1], atol=tol * n, rtol=tol)
    assert cpu.kernel_blocks(plan) is not None  # the register-blocked walk ran


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_row_walk_matches_the_reference(dtype):
    """A batch of one runs the groups on scalars (forward_blocked with tile 1); the tail acts last (first when
    transposed). Several rows through the C call directly, with an output scale, against the generic row walk."""
    d, k = 264, 30 * GROUP_ROTATIONS + 5
    g = torch.Generator().manual_seed(5)
    plan = GivensPlan(blocked_pairs(d, k, generator=g), d)
    angles = kama.random_angles(k, generator=g, dtype=dtype)
    x = torch.randn(3, d, generator=g, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for transpose in (False, True):
        want = givens_apply(x[:1], plan, angles, backend="reference", transpose=transpose)
        got = givens_apply(x[:1], plan, angles, backend="cpu", transpose=transpose)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        C, cs, scale = cpu._cgivens, cpu.coefficients(plan, angles, dtype), torch.rand(d, generator=g, dtype=dtype)
        y_rows, y_walk = torch.empty_like(x), torch.empty_like(x)
        C.forward_blocked(x, y_rows, cpu.kernel_pairs(plan), cpu.kernel_blocks(plan), cs, 3, d, 1, 1, transpose,
                          scale)
        C.forward(x, y_walk, cpu.kernel_pairs(plan), cs, 3, d, 1, 1, transpose, scale)
        torch.testing.assert_close(y_rows, y_walk, atol=tol, rtol=tol)


def test_blocked_gradcheck_and_gradgradcheck():
    g = torch.Generator().manual_seed(3)
    pairs = blocked_pairs(10, 2 * GROUP_ROTATIONS + 3, generator=g)
    angles = kama.random_angles(pairs.shape[0], generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randn(9, 10, generator=g, dtype=torch.float64, requires_grad=True)
    for transpose in (False, True):
        f = lambda x, a, t=transpose: givens_apply(x, pairs, a, backend="cpu", transpose=t)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, angles))
        assert torch.autograd.gradgradcheck(f, (x, angles))


@needs_kernel
def test_blocked_kernel_checks_its_arguments():
    C = cpu._cgivens
    d, k = 16, 24
    plan = GivensPlan(blocked_pairs(d, k, generator=torch.Generator().manual_seed(0)), d)
    pairs = cpu.kernel_pairs(plan)
    blocks = cpu.kernel_blocks(plan)
    x, y, cs = torch.randn(8, d), torch.empty(8, d), torch.zeros(k, 2)
    C.forward_blocked(x, y, pairs, blocks, cs, 8, d, 8, 1, False)
    with pytest.raises(ValueError, match="tile=4 is not 1 or a multiple of the vector width"):
        C.forward_blocked(x, y, pairs, blocks, cs, 8, d, 4, 1, False)
    with pytest.raises(ValueError, match="tile=4 is not a multiple of the vector width"):
        C.backward_blocked(y, x, x.clone(), torch.zeros(1, k, dtype=torch.float64), pairs, blocks, cs, 8, d, 4, 1,
                           False)
    with pytest.raises(TypeError, match="capsule from _cgivens.make_blocks"):
        C.forward_blocked(x, y, pairs, pairs, cs, 8, d, 8, 1, False)
    other = C.make_pairs(torch.tensor([[0, 1]] * 12, dtype=torch.int32), d)
    with pytest.raises(ValueError, match="blocks were made for k=24"):
        C.forward_blocked(x, y, other, blocks, cs[:12], 8, d, 8, 1, False)
    with pytest.raises(ValueError, match="y has 64 elements"):
        C.forward_blocked(x, y[:4], pairs, blocks, cs, 8, d, 8, 1, False)
    g = torch.zeros(1, k, dtype=torch.float64)
    with pytest.raises(ValueError, match="gacc has 24 elements, the call needs 48"):
        C.backward_blocked(x, x, y, g, pairs, blocks, cs, 8, d, 8, 2, False)
    slots = torch.arange(8, dtype=torch.int32)[None]
    with pytest.raises(ValueError, match="8 distinct coordinates in"):
        C.make_blocks(slots * 0, d, 12)
    with pytest.raises(ValueError, match="8 distinct coordinates in"):
        C.make_blocks(slots + 10, d, 12)
    with pytest.raises(ValueError, match="invalid sizes"):
        C.make_blocks(slots, d, 11)  # one group needs 12 rotations
    with pytest.raises(TypeError, match="slots must have dtype torch.int32"):
        C.make_blocks(slots.long(), d, 12)


@pytest.mark.parametrize("call, err, match", [
    (lambda: blocked_pairs(7, 12), ValueError, "d must be >= 8"),
    (lambda: blocked_pairs(16, -1), ValueError, "k must be >= 0"),
    (lambda: blocked_pairs(16, 3.0), TypeError, "k must be an int"),
    (lambda: blocked_pairs(16, 12, generator=1), TypeError, "generator must be a torch.Generator"),
])
def test_sampler_bad_arguments(call, err, match):
    with pytest.raises(err, match=match):
        call()
    assert blocked_pairs(7, 0).shape == (0, 2)


def test_blocked_random_features_are_unbiased_and_orthogonal_per_block():
    from kama.features import random_matrix

    m = random_matrix("kama_blocked", 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = m.to_dense() / m.row_scale[:, None]
    torch.testing.assert_close(w @ w.T, torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)
    # below 8 inputs the rotations act on the zero-padded input; rows keep chi(d) norms on the d inputs
    small = random_matrix("kama_blocked", 3, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert small.p == 8 and len(small.plans) == 3
    norms = torch.cat([random_matrix("kama_blocked", 3, 8, generator=torch.Generator().manual_seed(s),
                                     dtype=torch.float64).to_dense().norm(dim=1) for s in range(200)])
    # chi(3): mean sqrt(2) Gamma(2) / Gamma(1.5) = 1.5958, sd 0.67; 1600 norms: 5 se ~ 0.085
    assert abs(float(norms.mean()) - 1.5958) < 0.085
    with pytest.raises(ValueError, match="c must be a positive"):
        random_matrix("kama_blocked", 4, 4, c=-1.0)
    with pytest.raises(ValueError, match="num_rotations must be >= 0"):
        random_matrix("kama_blocked", 4, 4, num_rotations=-2)


def test_blocked_walks_mix_like_kac_walks():
    from kama.experiments.capacity import mixing_statistics

    kac = mixing_statistics(64, (4.0,), 600, 0, "kac")[0]
    blk = mixing_statistics(64, (4.0,), 600, 0, "blocked")[0]
    # at k = 4 d ln d both are within sampling noise of the Haar law (fourth-moment ratio 1, KS near its floor)
    for r in (kac, blk):
        assert abs(r["m4_ratio"] - 1) < 0.05 and r["ks"] < 4 * r["ks_haar_floor"]
