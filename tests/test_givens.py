"""The Givens-product operator against the dense oracle, its autograd, schedule, sampling and errors."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kama
from conftest import oracle_matrix, tol
from kama.ops import GivensPlan, as_plan, choose_backend, cpu_kernel_available, plane_scores
from kama.ops.reference import layered_matrix as _layered_matrix

BACK = ["reference", "cpu", "dense"]


def make(d: int, k: int, seed: int, dtype=torch.float64, matching: bool = False):
    g = torch.Generator().manual_seed(seed)
    sampler = kama.random_matching_pairs if matching else kama.random_pairs
    pairs = sampler(d, k, generator=g)
    angles = kama.random_angles(k, generator=g, dtype=dtype)
    return pairs, angles, g


# ---------------------------------------------------------------------------------------------------------
# Convention and oracle agreement
# ---------------------------------------------------------------------------------------------------------


def test_convention_matches_paper():
    t = 0.3
    m = kama.givens_matrix(torch.tensor([[1, 3]]), torch.tensor([t], dtype=torch.float64), 4)
    assert m[1, 1] == pytest.approx(math.cos(t)) and m[3, 3] == pytest.approx(math.cos(t))
    assert m[3, 1] == pytest.approx(math.sin(t)) and m[1, 3] == pytest.approx(-math.sin(t))
    assert m[0, 0] == 1 and m[2, 2] == 1 and m[0, 1] == 0
    # M = G_1 G_2: the last rotation acts on a vector first.
    p = torch.tensor([[0, 1], [1, 2]])
    a = torch.tensor([0.4, 1.1], dtype=torch.float64)
    x = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    expected = x @ oracle_matrix(p, a, 3).T
    assert torch.allclose(kama.givens_apply(x, p, a), expected)


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(2, 70),
    k=st.integers(0, 300),
    batch=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    backend=st.sampled_from(BACK),
    transpose=st.booleans(),
    matching=st.booleans(),
)
def test_apply_matches_oracle_outputs_and_gradients(d, k, batch, seed, dtype, backend, transpose, matching):
    pairs, angles, g = make(d, k, seed, dtype, matching)
    x = torch.randn(batch, d, generator=g, dtype=torch.float64).to(dtype)
    x.requires_grad_(True)
    angles.requires_grad_(True)
    y = kama.givens_apply(x, pairs, angles, transpose=transpose, backend=backend)

    x64 = x.detach().double().requires_grad_(True)
    a64 = angles.detach().double().requires_grad_(True)
    m = oracle_matrix(pairs, a64, d)
    y64 = x64 @ (m if transpose else m.T)
    t = tol(dtype, k, d)
    assert y.shape == (batch, d) and y.dtype == dtype
    torch.testing.assert_close(y.double(), y64, atol=t, rtol=t)

    w = torch.randn(batch, d, generator=g, dtype=torch.float64)
    gx, ga = torch.autograd.grad((y.double() * w).sum(), (x, angles), allow_unused=True)
    gx64, ga64 = torch.autograd.grad((y64 * w).sum(), (x64, a64), allow_unused=True)
    scale = max(1.0, batch)
    torch.testing.assert_close(gx.double(), gx64, atol=t, rtol=t)
    ga = torch.zeros(k, dtype=dtype) if ga is None else ga
    ga64 = torch.zeros(k, dtype=torch.float64) if ga64 is None else ga64
    torch.testing.assert_close(ga.double(), ga64, atol=t * scale * d, rtol=t)


@pytest.mark.parametrize("backend", BACK)
@pytest.mark.parametrize("transpose", [False, True])
def test_gradcheck_and_gradgradcheck(backend, transpose):
    pairs, angles, g = make(6, 25, 3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    angles.requires_grad_(True)

    def f(x, a):
        return kama.givens_apply(x, pairs, a, transpose=transpose, backend=backend)

    assert torch.autograd.gradcheck(f, (x, angles))
    assert torch.autograd.gradgradcheck(f, (x, angles))


def test_batched_leading_dims_and_noncontiguous_input():
    pairs, angles, g = make(9, 40, 1)
    x = torch.randn(3, 4, 18, generator=g, dtype=torch.float64)[..., ::2]  # strided view
    assert not x.is_contiguous()
    y = kama.givens_apply(x, pairs, angles)
    m = oracle_matrix(pairs, angles, 9)
    torch.testing.assert_close(y, x @ m.T)
    assert y.shape == (3, 4, 9)


def test_single_vector():
    pairs, angles, g = make(5, 10, 2)
    x = torch.randn(5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(kama.givens_apply(x, pairs, angles), oracle_matrix(pairs, angles, 5) @ x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_givens_matrix_orthogonal_det_one(dtype):
    pairs, angles, _ = make(33, 500, 4, dtype)
    m = kama.givens_matrix(pairs, angles, 33)
    eye = torch.eye(33, dtype=dtype)
    t = tol(dtype, 500, 33)
    torch.testing.assert_close(m @ m.T, eye, atol=t, rtol=0)
    assert abs(torch.linalg.det(m.double()).item() - 1.0) < 100 * t
    torch.testing.assert_close(kama.givens_matrix(pairs, angles, 33, transpose=True), m.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transpose_inverts_and_preserves_norm(dtype):
    pairs, angles, g = make(20, 200, 5, dtype)
    x = torch.randn(7, 20, generator=g, dtype=dtype)
    y = kama.givens_apply(x, pairs, angles)
    t = tol(dtype, 400, 20)
    torch.testing.assert_close(kama.givens_apply(y, pairs, angles, transpose=True), x, atol=t, rtol=t)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), atol=t, rtol=t)


def test_asap_schedule_equals_sequential_product():
    pairs, angles, g = make(12, 150, 6)
    layers = kama.asap_layers(pairs)
    # Layers hold disjoint pairs, and dependent rotations keep their order.
    for layer in layers.unique():
        coords = pairs[layers == layer].flatten()
        assert coords.unique().numel() == coords.numel()
    last = {}
    for r, (i, j) in enumerate(pairs.tolist()):
        assert layers[r] > max(last.get(i, -1), last.get(j, -1))
        last[i] = last[j] = int(layers[r])
    # Bit-for-bit: sequential right-multiplication vs the layered walk (both in float64).
    seq = torch.eye(12, dtype=torch.float64)
    for (i, j), t in zip(pairs.tolist(), angles.tolist(), strict=True):
        ci, cj = seq[:, i].clone(), seq[:, j].clone()
        c, s = math.cos(t), math.sin(t)
        seq[:, i] = c * ci + s * cj
        seq[:, j] = -s * ci + c * cj
    torch.testing.assert_close(kama.givens_matrix(pairs, angles, 12), seq, atol=1e-13, rtol=0)


def test_matching_pairs_are_perfect_matchings_with_shallow_schedule():
    pairs = kama.random_matching_pairs(10, 23, generator=torch.Generator().manual_seed(0))
    assert pairs.shape == (23, 2)
    for b in range(0, 20, 5):
        assert sorted(pairs[b : b + 5].flatten().tolist()) == list(range(10))
    assert GivensPlan(pairs, 10).depth == math.ceil(23 / 5)
    odd = kama.random_matching_pairs(7, 3, generator=torch.Generator().manual_seed(0))
    assert odd.flatten().unique().numel() == 6


def test_random_pairs_uniform_and_valid():
    pairs = kama.random_pairs(4, 60000, generator=torch.Generator().manual_seed(0))
    assert bool((pairs[:, 0] != pairs[:, 1]).all()) and int(pairs.min()) >= 0 and int(pairs.max()) < 4
    counts = torch.bincount(pairs[:, 0] * 4 + pairs[:, 1], minlength=16).float()
    offdiag = counts[torch.tensor([a * 4 + b for a in range(4) for b in range(4) if a != b])]
    # 12 ordered pairs, 5000 expected each; 5 sigma of a binomial is ~ 350.
    assert (offdiag - 5000).abs().max() < 350


def test_sampling_is_deterministic_per_generator():
    a = kama.random_pairs(30, 100, generator=torch.Generator().manual_seed(7))
    b = kama.random_pairs(30, 100, generator=torch.Generator().manual_seed(7))
    c = kama.random_pairs(30, 100, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    ta = kama.random_angles(50, generator=torch.Generator().manual_seed(7))
    tb = kama.random_angles(50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ta, tb) and bool(((ta >= 0) & (ta < 2 * math.pi)).all())


# ---------------------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", *BACK])
def test_zero_rotations_is_identity(backend):
    x = torch.randn(3, 5)
    y = kama.givens_apply(x, torch.empty(0, 2, dtype=torch.long), torch.empty(0), backend=backend)
    torch.testing.assert_close(y, x)
    x.requires_grad_(True)
    a = torch.empty(0, requires_grad=True)
    kama.givens_apply(x, torch.empty(0, 2, dtype=torch.long), a, backend=backend).sum().backward()
    assert a.grad.shape == (0,) and torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("backend", ["auto", *BACK])
def test_empty_batch(backend):
    pairs, angles, _ = make(6, 20, 0, torch.float32)
    angles.requires_grad_(True)
    x = torch.empty(0, 6, requires_grad=True)
    y = kama.givens_apply(x, pairs, angles, backend=backend)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert torch.equal(angles.grad, torch.zeros(20))


@pytest.mark.parametrize("backend", BACK)
def test_non_finite_rows_do_not_corrupt_others(backend):
    pairs, angles, g = make(8, 60, 9, torch.float32)
    x = torch.randn(4, 8, generator=g)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    y = kama.givens_apply(x, pairs, angles, backend=backend)
    clean = kama.givens_apply(x[[0, 3]], pairs, angles, backend=backend)
    torch.testing.assert_close(y[[0, 3]], clean)
    assert not torch.isfinite(y[1]).all() and not torch.isfinite(y[2]).all()
    xg = x.clone().requires_grad_(True)
    kama.givens_apply(xg, pairs, angles, backend=backend)[[0, 3]].sum().backward()
    assert torch.isfinite(xg.grad[[0, 3]]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs_rotate_in_float32(dtype):
    pairs, angles, g = make(32, 500, 1, torch.float32)
    x = torch.randn(16, 32, generator=g)
    y = kama.givens_apply(x.to(dtype), pairs, angles.to(dtype), backend="reference")
    assert y.dtype == dtype
    ref = kama.givens_apply(x.to(dtype).float(), pairs, angles.to(dtype).float())
    # Only the final rounding to 16 bits: error of one 16-bit ulp, not k of them.
    eps = torch.finfo(dtype).eps
    assert (y.float() - ref).abs().max() <= 2 * eps * ref.abs().max()


def test_dense_and_reference_agree_and_auto_chooses_by_cost():
    pairs, angles, g = make(16, 100, 2, torch.float32)
    plan = GivensPlan(pairs, 16)
    x = torch.randn(3000, 16, generator=g)
    torch.testing.assert_close(
        kama.givens_apply(x, plan, angles, backend="dense"),
        kama.givens_apply(x, plan, angles, backend="reference"),
        atol=1e-5,
        rtol=1e-5,
    )
    walk = "cpu" if cpu_kernel_available() else "reference"
    assert choose_backend(3000, 16, plan) == "dense"
    assert choose_backend(1, 16, plan) == walk
    big = GivensPlan(kama.random_pairs(1024, 5000, generator=g), 1024)
    assert choose_backend(64, 1024, big) == walk
    assert choose_backend(64, 1024, big, device="meta") == "reference"


def test_plan_cache_and_plans_as_pairs():
    pairs, angles, g = make(10, 30, 0, torch.float32)
    assert as_plan(pairs, 10) is as_plan(pairs.clone(), 10)
    assert as_plan(pairs, 10) is not as_plan(pairs, 11)
    plan = GivensPlan(pairs, 10)
    x = torch.randn(2, 10, generator=g)
    torch.testing.assert_close(kama.givens_apply(x, plan, angles), kama.givens_apply(x, pairs, angles))
    assert "num_rotations=30" in repr(plan)
    assert pickle.loads(pickle.dumps(plan)).num_rotations == 30


def test_plane_scores_match_finite_differences():
    pairs, angles, g = make(7, 30, 11)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    cand = kama.random_pairs(7, 30 * 3, generator=g).view(30, 3, 2)
    scores, current = plane_scores(x, w, pairs, angles, cand)
    a = angles.clone().requires_grad_(True)
    (kama.givens_apply(x, pairs, a) * w).sum().backward()
    torch.testing.assert_close(current, a.grad)
    # A rotation whose plane equals its candidate: identical score (layer boundary = its output).
    plan = GivensPlan(pairs, 7)
    r = int(plan.perm[0])  # a rotation of the first layer (acts last on the vector)
    cand2 = cand.clone()
    cand2[r, 0] = pairs[r]
    s2, _ = plane_scores(x, w, pairs, angles, cand2)
    # Inserting G(i, j, t) next to a rotation in the same plane changes its angle: same derivative.
    assert s2[r, 0] == pytest.approx(float(current[r]), rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def _ok():
    return torch.randn(2, 4), torch.tensor([[0, 1], [2, 3]]), torch.zeros(2)


@pytest.mark.parametrize(
    "mutate, err, match",
    [
        (lambda x, p, a: (torch.randn(2, 3), p, a), ValueError, "entries must lie in"),
        (lambda x, p, a: (x, torch.tensor([[0, 0], [1, 2]]), a), ValueError, "i != j"),
        (lambda x, p, a: (x, torch.tensor([[0, 4], [1, 2]]), a), ValueError, r"\[0, 4\)"),
        (lambda x, p, a: (x, torch.tensor([[-1, 2], [1, 2]]), a), ValueError, "entries must lie in"),
        (lambda x, p, a: (x, torch.tensor([0, 1]), a), ValueError, r"shape \(k, 2\)"),
        (lambda x, p, a: (x, torch.tensor([[0.0, 1.0], [2, 3]]), a), TypeError, "integer dtype"),
        (lambda x, p, a: (x, [[0, 1], [2, 3]], a), TypeError, "GivensPlan"),
        (lambda x, p, a: (x, p, torch.zeros(3)), ValueError, r"angles must have shape \(2,\)"),
        (lambda x, p, a: (x, p, torch.zeros(2, 1)), ValueError, r"angles must have shape \(k,\)"),
        (lambda x, p, a: (x, p, torch.zeros(2, dtype=torch.float64)), TypeError, "same dtype"),
        (lambda x, p, a: (x.long(), p, a), TypeError, "x must have a floating dtype"),
        (lambda x, p, a: (x, p, a.long()), TypeError, "angles must have a floating dtype"),
        (lambda x, p, a: ([1.0], p, a), TypeError, "x must be a torch.Tensor"),
        (lambda x, p, a: (torch.tensor(1.0), p, a), ValueError, "at least 1 dimension"),
        (lambda x, p, a: (torch.randn(2, 0), p, a), ValueError, "last dimension d >= 1"),
        (lambda x, p, a: (x, p, a.to("meta")), ValueError, "same device"),
        (lambda x, p, a: (x, p.to("meta"), a), ValueError, "pairs must be on the CPU"),
    ],
)
def test_bad_input_raises_typed_errors(mutate, err, match):
    x, p, a = mutate(*_ok())
    with pytest.raises(err, match=match):
        kama.givens_apply(x, p, a)


def test_bad_backend_and_plan_dimension():
    x, p, a = _ok()
    with pytest.raises(ValueError, match="backend must be one of"):
        kama.givens_apply(x, p, a, backend="gpu")
    with pytest.raises(ValueError, match="plan acts on dimension 5"):
        kama.givens_apply(x, GivensPlan(p, 5), a)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: kama.random_pairs(0, 3), ValueError, "d must be >= 1"),
        (lambda: kama.random_pairs(1, 3), ValueError, "d must be >= 2"),
        (lambda: kama.random_pairs(3, -1), ValueError, "k must be >= 0"),
        (lambda: kama.random_pairs(3.5, 1), TypeError, "d must be an int"),
        (lambda: kama.random_pairs(3, 1, generator=3), TypeError, "generator must be"),
        (lambda: kama.random_matching_pairs(1, 2), ValueError, "d must be >= 2"),
        (lambda: kama.random_angles(-2), ValueError, "k must be >= 0"),
        (lambda: kama.default_num_rotations(0), ValueError, "n must be >= 1"),
        (lambda: kama.givens_matrix(torch.tensor([[0, 1]]), torch.zeros(1), 0), ValueError, "d must be >= 1"),
        (lambda: GivensPlan(torch.tensor([[0, 1]]), True), TypeError, "d must be an int"),
        (lambda: plane_scores(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([[0, 1]]), torch.zeros(1),
                              torch.zeros(1, 2, 2, dtype=torch.long)), ValueError, "grad_y must have"),
        (lambda: plane_scores(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[0, 1]]), torch.zeros(1),
                              torch.zeros(2, 2, 2, dtype=torch.long)), ValueError, "candidates must have"),
        (lambda: plane_scores(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[0, 1]]), torch.zeros(1),
                              torch.tensor([[[0, -1]]])), ValueError, "candidates: pairs entries must lie in"),
        (lambda: plane_scores(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[0, 1]]), torch.zeros(1),
                              torch.tensor([[[0, 3]]])), ValueError, r"candidates: .*\[0, 3\)"),
        (lambda: plane_scores(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[0, 1]]), torch.zeros(1),
                              torch.tensor([[[1, 1]]])), ValueError, "candidates: pairs must have i != j"),
        (lambda: plane_scores(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[0, 1]]), torch.zeros(1),
                              torch.zeros(1, 1, 2)), TypeError, "candidates must be an integer tensor"),
        (lambda: kama.givens_apply(torch.zeros(1, 2), torch.tensor([[0, 1]]), torch.zeros(1), transpose="no"),
         TypeError, "transpose must be true or false"),
        (lambda: kama.givens_matrix(torch.tensor([[0, 1]]), torch.zeros(1), 2, transpose=1), TypeError,
         "transpose must be true or false"),
        (lambda: kama.random_angles(3, dtype=torch.int64), TypeError, "dtype must be a floating torch.dtype"),
        (lambda: kama.random_angles(3, dtype=torch.complex64), TypeError, "dtype must be a floating torch.dtype"),
    ],
)
def test_bad_arguments_of_helpers(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_default_num_rotations():
    assert kama.default_num_rotations(1) == 0
    assert kama.default_num_rotations(2) == math.ceil(2 * math.log(2))
    assert kama.default_num_rotations(64) == math.ceil(64 * math.log(64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    pairs, angles, g = make(50, 400, 1, torch.float32)
    x = torch.randn(33, 50, generator=g)
    for backend in ("auto", "reference", "cuda", "dense"):
        y = kama.givens_apply(x.cuda(), pairs, angles.cuda(), backend=backend)
        torch.testing.assert_close(y.cpu(), kama.givens_apply(x, pairs, angles), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="CPU generator"):
        kama.random_pairs(3, 1, generator=torch.Generator("cuda"))


@pytest.mark.parametrize("d, k", [(1, 0), (2, 1), (7, 12), (33, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transpose", [False, True])
def test_layered_matrix_matches_the_walk_and_is_twice_differentiable(d, k, dtype, transpose):
    g = torch.Generator().manual_seed(d + k)
    pairs = kama.random_pairs(d, k, generator=g) if k else torch.empty(0, 2, dtype=torch.long)
    plan = as_plan(pairs, d)
    angles = kama.random_angles(k, generator=g, dtype=dtype)
    x = torch.randn(5, d, generator=g, dtype=dtype)
    p = _layered_matrix(plan, angles, transpose)
    assert p.dtype == dtype and p.shape == (d, d)
    expected = kama.givens_apply(x, plan, angles, transpose=transpose, backend="reference")
    t = tol(dtype, k, d)
    torch.testing.assert_close(x @ p.T, expected, atol=t, rtol=t)
    if dtype == torch.float64 and k:
        a = angles.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a: _layered_matrix(plan, a, transpose), (a,))
        assert torch.autograd.gradgradcheck(lambda a: _layered_matrix(plan, a, transpose), (a,))


def test_plane_scores_accept_every_valid_candidate():
    x, g = torch.randn(5, 3), torch.randn(5, 3)
    scores, current = plane_scores(x, g, torch.tensor([[0, 1]]), torch.zeros(1), torch.tensor([[[2, 0], [1, 2]]]))
    assert scores.shape == (1, 2) and current.shape == (1,)


def test_bad_environment_settings_warn_and_keep_the_default(tmp_path):
    import subprocess
    import sys

    code = "import kama.ops.tuning as t; print(t.current().tile_budget_bytes)"
    for value, default_kept in (("abc", True), ("-4", True), ("4096", False)):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**__import__("os").environ, "KAMA_TILE_BYTES": value})
        assert proc.returncode == 0, proc.stderr
        assert (proc.stdout.strip() == str(2 * 1024 * 1024)) == default_kept
        assert ("KAMA_TILE_BYTES" in proc.stderr) == default_kept


def test_jit_trace_records_a_pure_torch_path():
    g = torch.Generator().manual_seed(3)
    pairs = kama.random_pairs(9, 30, generator=g)
    angles = kama.random_angles(30, generator=g)
    x = torch.randn(4, 9, generator=g)
    with torch.no_grad():  # a cold plan cache and no gradients: the path that once returned garbage
        traced = torch.jit.trace(lambda t: kama.givens_apply(t, pairs, angles), x, check_trace=False)
    x2 = torch.randn(7, 9, generator=g)
    assert torch.allclose(traced(x2), x2 @ oracle_matrix(pairs, angles, 9).T, atol=1e-5)
