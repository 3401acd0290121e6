"""Givens coordinate descent on SO(d): line searches, monotone decrease, Theorem 3, the returned KAMA matrix,
Brockett's eigenvectors, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from kama import givens_matrix
from kama.experiments.capacity import haar_rotation
from kama.manifold import RULES, Brockett, Linear, Procrustes, givens_coordinate_descent, minimize_trig


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sym(d, seed=0):
    a = torch.randn(d, d, generator=gen(seed), dtype=torch.float64)
    return a + a.T


@pytest.mark.parametrize("seed", range(20))
def test_trig_line_search_finds_the_global_minimum(seed):
    g = gen(seed)
    a1, b1, a2, b2 = (torch.randn(4, generator=g, dtype=torch.float64) * torch.tensor([1, 1, 2, 2])).tolist()
    if seed % 3 == 0:
        a2 = b2 = 0.0

    def f(t):
        return a1 * math.cos(t) + b1 * math.sin(t) + a2 * math.cos(2 * t) + b2 * math.sin(2 * t)

    t = minimize_trig(a1, b1, a2, b2)
    grid = min(f(2 * math.pi * q / 20000) for q in range(20000))
    assert f(t) <= grid + 1e-9


@pytest.mark.parametrize("rule", ["exact", "gradient"])
@pytest.mark.parametrize("objective", ["brockett", "procrustes", "linear"])
def test_monotone_decrease_and_theorem_3(rule, objective):
    d = 9
    if objective == "brockett":
        F = Brockett(sym(d, 1), torch.arange(1, d + 1, dtype=torch.float64))
    elif objective == "procrustes":
        a = torch.randn(d, 15, generator=gen(2), dtype=torch.float64)
        F = Procrustes(a, haar_rotation(d, gen(3)) @ a)
    else:
        F = Linear(torch.randn(d, d, generator=gen(4), dtype=torch.float64))
    res = givens_coordinate_descent(F, d=d, steps=120, rule=rule)
    for h in res.history:
        assert h["decrease"] >= -1e-10
        assert h["decrease"] >= h["bound"] * (1 - 1e-9) - 1e-12  # Theorem 3, B measured at every step
        assert h["B"] > 0
    objs = [h["objective"] for h in res.history]
    assert objs[-1] < objs[0]


@pytest.mark.parametrize("rule", RULES)
def test_pairs_and_angles_reproduce_M(rule):
    d = 7
    m0 = haar_rotation(d, gen(5))
    F = Brockett(sym(d, 6), torch.arange(d, dtype=torch.float64))
    res = givens_coordinate_descent(F, m0, steps=40, rule=rule, generator=gen(7))
    torch.testing.assert_close(m0 @ givens_matrix(res.pairs, res.angles, d), res.M)
    torch.testing.assert_close(res.M.T @ res.M, torch.eye(d, dtype=torch.float64))
    assert abs(float(torch.linalg.det(res.M)) - 1) < 1e-10
    assert res.history[-1]["objective"] == pytest.approx(F.value(res.M), rel=1e-12)


def test_brockett_converges_to_the_eigenvectors():
    d = 8
    a = sym(d, 8)
    n = torch.arange(1, d + 1, dtype=torch.float64)
    res = givens_coordinate_descent(Brockett(a, n), d=d, steps=400, rule="gradient")
    vals, vecs = torch.linalg.eigh(a)  # ascending eigenvalues: the minimizer pairs the largest with N = 1
    target = vecs.flip(1)
    # columns equal the eigenvectors up to sign
    cos = (res.M * target).sum(0).abs()
    assert float((1 - cos).max()) < 1e-8
    assert res.history[-1]["objective"] == pytest.approx(float(vals.flip(0) @ n), rel=1e-10)


def test_generic_callable_matches_structured():
    d = 6
    a, n = sym(d, 9), torch.arange(1, d + 1, dtype=torch.float64)

    def f(m):
        return torch.trace(m.T @ a @ m @ torch.diag(n))

    s = givens_coordinate_descent(Brockett(a, n), d=d, steps=30, rule="gradient")
    g = givens_coordinate_descent(f, d=d, steps=30, rule="gradient")
    assert torch.equal(s.pairs, g.pairs)
    # Brockett's line function has period pi: t and t + pi are both minima (columns change sign), so compare
    # objectives and gradients, not the matrices.
    for hs, hg in zip(s.history, g.history, strict=True):
        assert hg["objective"] == pytest.approx(hs["objective"], rel=1e-7, abs=1e-9)  # 1-D search tolerance
        assert hg["grad_norm_sq"] == pytest.approx(hs["grad_norm_sq"], rel=1e-4, abs=1e-6)
        assert hg["bound"] is None
    e = givens_coordinate_descent(f, d=d, steps=3, rule="exact")
    assert all(h["decrease"] >= -1e-12 for h in e.history)


def test_random_rule_is_reproducible_and_descends():
    d = 6
    F = Linear(torch.randn(d, d, generator=gen(1), dtype=torch.float64))
    a = givens_coordinate_descent(F, d=d, steps=50, rule="random", generator=gen(3))
    b = givens_coordinate_descent(F, d=d, steps=50, rule="random", generator=gen(3))
    assert torch.equal(a.pairs, b.pairs) and all(h["decrease"] >= -1e-12 for h in a.history)


def test_zero_steps_and_early_stop():
    res = givens_coordinate_descent(Linear(-torch.eye(3, dtype=torch.float64)), d=3, steps=0)
    assert res.pairs.shape == (0, 2) and torch.equal(res.M, torch.eye(3, dtype=torch.float64))
    stop = givens_coordinate_descent(Linear(-torch.eye(3, dtype=torch.float64)), d=3, steps=50, tol=1e-20)
    assert len(stop.history) == 0  # already optimal at M = I


@pytest.mark.parametrize("call, err, match", [
    (lambda: givens_coordinate_descent(lambda m: m.sum(), d=1, steps=1), ValueError, "d must be >= 2"),
    (lambda: givens_coordinate_descent(lambda m: m.sum(), d=3, steps=-1), ValueError, "steps must be >= 0"),
    (lambda: givens_coordinate_descent(lambda m: m, d=3, steps=1), ValueError, "scalar"),
    (lambda: givens_coordinate_descent(lambda m: m.sum() * float("nan"), d=3, steps=1), ValueError, "non-finite"),
    (lambda: givens_coordinate_descent(lambda m: m.sum(), 2 * torch.eye(3), steps=1), ValueError, "orthogonal"),
    (lambda: givens_coordinate_descent(lambda m: m.sum(), torch.diag(torch.tensor([1.0, 1.0, -1.0])), steps=1),
     ValueError, "determinant"),
    (lambda: givens_coordinate_descent(lambda m: m.sum(), torch.eye(2), d=3, steps=1), ValueError, "shape"),
    (lambda: givens_coordinate_descent(lambda m: m.sum(), steps=1), ValueError, "d must be given"),
    (lambda: givens_coordinate_descent("F", d=3, steps=1), TypeError, "callable"),
    (lambda: givens_coordinate_descent(lambda m: m.sum(), d=3, steps=1, rule="newton"), ValueError, "rule"),
    (lambda: givens_coordinate_descent(Linear(torch.eye(3)), d=4, steps=1), ValueError, "dimension 3"),
    (lambda: Linear(torch.ones(2, 3)), ValueError, "square"),
    (lambda: Procrustes(torch.ones(2, 3), torch.ones(3, 3)), ValueError, "one shape"),
    (lambda: Brockett(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.ones(2)), ValueError, "symmetric"),
    (lambda: Brockett(torch.eye(2), torch.ones(2, 2)), ValueError, "diagonal"),
    (lambda: Brockett(torch.eye(2), torch.ones(3)), ValueError, "2 diagonal entries"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()
