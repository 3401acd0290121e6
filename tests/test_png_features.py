"""PNG kernels (closed forms, quadrature), the four random matrices, the estimators' statistics (the paper's
claims as tests that can fail), the scikit-learn transformer and the packaged datasets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import check_estimator

from kama import datasets
from kama.features import SAMPLERS, chi_norms, estimate_kernel, fwht, random_matrix
from kama.png import angles_between, feature_function, png_kernel, png_kernel_quadrature
from kama.sklearn import PNGFeatures


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def points(n=6, d=9, seed=0):
    return torch.randn(n, d, generator=gen(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Exact kernels
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["angular", "arccos0", "arccos1", "arccos2"])
def test_quadrature_matches_closed_forms(kernel):
    X, Y = points(5), points(4, seed=1)
    Y[0] = X[0]  # identical
    Y[1] = -X[1]  # antipodal
    q = png_kernel_quadrature(feature_function(kernel), X, Y)
    c = png_kernel(X, Y, kernel)
    scale = max(1.0, float(c.abs().max()))
    assert (q - c).abs().max() < 1e-8 * scale


def test_quadrature_matches_rbf_through_cos_and_sin():
    X, Y = points(4), points(3, seed=1)
    gamma = 0.2
    a = math.sqrt(2 * gamma)
    q = png_kernel_quadrature(lambda u: torch.cos(a * u), X, Y)
    q = q + png_kernel_quadrature(lambda u: torch.sin(a * u), X, Y)
    assert (q - png_kernel(X, Y, "rbf", gamma=gamma)).abs().max() < 1e-8


def test_quadrature_of_a_generic_f_matches_monte_carlo():
    X, Y = points(2), points(2, seed=1)
    G = torch.randn(200000, 9, generator=gen(5), dtype=torch.float64)
    mc = torch.tanh(G @ X.T).T @ torch.tanh(G @ Y.T) / G.shape[0]
    q = png_kernel_quadrature(torch.tanh, X, Y)
    assert (mc - q).abs().max() < 5 / math.sqrt(G.shape[0])  # 5 standard errors (|tanh| <= 1)


def test_kernel_conventions_and_zero_vectors():
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    k = png_kernel(x, y, "angular")
    assert k[0].tolist() == pytest.approx([0.0, -1.0, 0.0])
    assert k[1].tolist() == [0.0, 0.0, 0.0]  # K(0, y) = sign(0) E[sign(g.y)] = 0, not NaN
    classic = png_kernel(x, y, "angular", variant="classic")
    assert classic[0].tolist() == pytest.approx([0.5, 0.0, 0.5])
    for name in ("arccos0", "arccos1", "arccos2"):
        kk = png_kernel(x, y, name)
        assert torch.isfinite(kk).all() and kk[1].abs().max() == 0
    # the quadrature agrees on zero vectors too
    assert png_kernel_quadrature(torch.sign, x, y)[1].abs().max() < 1e-12
    assert png_kernel(x, None, "arccos0")[0, 0] == pytest.approx(0.5)


def test_angles_between():
    theta, nx, ny = angles_between([[1.0, 0.0]], [[1.0, 1.0]])
    assert float(theta) == pytest.approx(math.pi / 4) and float(nx) == 1 and float(ny) == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: png_kernel([[1.0]], kernel="poly"), ValueError, "kernel must be one of"),
        (lambda: png_kernel([[1.0]], variant="new"), ValueError, "variant must be one of"),
        (lambda: png_kernel([[1.0]], kernel="rbf", gamma=0), ValueError, "gamma must be a positive"),
        (lambda: png_kernel([[1.0, 2.0]], [[1.0]]), ValueError, "same number of columns"),
        (lambda: png_kernel([[1.0, 2.0]], [[1.0]], kernel="rbf"), ValueError, "same number of columns"),
        (lambda: png_kernel([[float("nan")]]), ValueError, "finite"),
        (lambda: png_kernel(np.zeros((2, 2, 2))), ValueError, r"shape \(n, d\)"),
        (lambda: png_kernel_quadrature("sign", [[1.0]]), TypeError, "f must be callable"),
        (lambda: png_kernel_quadrature(torch.sign, [[1.0]], radial_nodes=0), ValueError, "radial_nodes"),
        (lambda: feature_function("poly"), ValueError, "kernel must be one of"),
    ],
)
def test_png_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------
# Random matrices
# ---------------------------------------------------------------------------------------------------------


def min_dim(sampler, d):
    """The register-blocked sampler needs d >= 8 (groups of 8 coordinates; tests/test_blocked.py checks the error)."""
    return max(d, 8) if sampler == "kama_blocked" else d


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("d, m", [(8, 8), (7, 3), (5, 17), (16, 40)])
def test_matrices_apply_equals_dense(sampler, d, m):
    d = min_dim(sampler, d)
    w = random_matrix(sampler, d, m, generator=gen(1), dtype=torch.float64)
    x = torch.randn(4, d, dtype=torch.float64, generator=gen(2))
    dense = w.to_dense()
    assert dense.shape == (m, d)
    torch.testing.assert_close(w.apply(x), x @ dense.T)


@pytest.mark.parametrize("sampler", ["orthogonal", "hadamard", "kama"])
def test_rows_are_orthogonal_within_each_block(sampler):
    d = 16  # a power of two: HORN needs no padding
    w = random_matrix(sampler, d, 3 * d, generator=gen(3), dtype=torch.float64).to_dense()
    for b in range(3):
        blk = w[b * d : (b + 1) * d]
        g = blk @ blk.T
        off = g - torch.diag(torch.diagonal(g))
        assert off.abs().max() < 1e-10 * float(torch.diagonal(g).max())
    across = w[:d] @ w[d : 2 * d].T  # independent blocks are not orthogonal to each other
    assert across.abs().max() > 1.0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_row_norms_follow_chi_d(sampler):
    d = 12
    norms = torch.cat([random_matrix(sampler, d, d, generator=gen(s), dtype=torch.float64).to_dense().norm(dim=1)
                       for s in range(300)])
    # chi(12): mean sqrt(2) Gamma(6.5) / Gamma(6) = 3.3641, sd ~ 0.70; 3600 norms: 5 se ~ 0.06
    assert abs(float(norms.mean()) - math.sqrt(2) * math.exp(math.lgamma(6.5) - math.lgamma(6))) < 0.06


def test_chi_norms_and_fwht():
    assert chi_norms(4, 3, gen()).shape == (3,)
    h = fwht(torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(h @ h.T, torch.eye(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.ones(6))


def test_sampling_is_deterministic_and_device_independent():
    for s in SAMPLERS:
        a = random_matrix(s, min_dim(s, 6), 10, generator=gen(4), dtype=torch.float64).to_dense()
        b = random_matrix(s, min_dim(s, 6), 10, generator=gen(4), dtype=torch.float64).to_dense()
        c = random_matrix(s, min_dim(s, 6), 10, generator=gen(5), dtype=torch.float64).to_dense()
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: random_matrix("sobol", 4, 4), ValueError, "sampler must be one of"),
        (lambda: random_matrix("gaussian", 4, 4, num_rotations=3), ValueError, "'kama' samplers only"),
        (lambda: random_matrix("kama", 0, 4), ValueError, "d must be >= 1"),
        (lambda: random_matrix("kama", 4, 0), ValueError, "m must be >= 1"),
        (lambda: random_matrix("kama", 4, 4, num_rotations=-1), ValueError, "num_rotations must be >= 0"),
        (lambda: random_matrix("kama", 4, 4, c=0), ValueError, "c must be a positive"),
        (lambda: random_matrix("kama", 1, 4, num_rotations=2), ValueError, "must be 0 when d == 1"),
        (lambda: random_matrix("gaussian", 4, 4).apply(torch.ones(2, 5)), ValueError, "last dimension d=4"),
        (lambda: random_matrix("gaussian", 4, 4).apply([1.0]), TypeError, "torch.Tensor"),
    ],
)
def test_matrix_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------
# Estimators: the paper's statistical claims
# ---------------------------------------------------------------------------------------------------------


def _estimates(sampler, X, reps, m, f, seed=0):
    g = gen(seed)
    return torch.stack([estimate_kernel(X, None, random_matrix(sampler, X.shape[1], m, generator=g,
                                                               dtype=torch.float64), f) for _ in range(reps)])


@pytest.mark.parametrize("sampler", ["gaussian", "orthogonal", "kama"])
@pytest.mark.parametrize("kernel", ["angular", "arccos1", "rbf"])
def test_every_estimator_is_unbiased(sampler, kernel):
    """URN, ORN and KRN rows are exactly marginally Gaussian: unbiased at every d."""
    X = points(5, 8, seed=3) / 3
    K = png_kernel(X, X, kernel, gamma=0.5)
    est = _estimates(sampler, X, 1500, 8, feature_function(kernel, 0.5))
    mean, se = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
    off = ~torch.eye(5, dtype=torch.bool)  # the diagonal of the sign estimator is exactly 1
    z = (mean - K).abs()[off] / se[off]
    # 20 entries (10 distinct): all within 4.5 standard errors (a false alarm has probability < 1e-4)
    assert float(z.max()) < 4.5, float(z.max())


def test_hadamard_estimator_is_only_asymptotically_unbiased():
    """HORN rows are not Gaussian (a discrete sign structure): biased at small d, the bias fading with d."""
    bias = {}
    for d in (8, 32):
        X = points(5, d, seed=3)
        K = png_kernel(X, X, "angular")
        est = _estimates("hadamard", X, 3000, d, torch.sign)
        off = ~torch.eye(5, dtype=torch.bool)
        bias[d] = float((est.mean(0) - K)[off].abs().max())
        se = float((est.std(0) / math.sqrt(est.shape[0]))[off].max())
    assert bias[8] > 0.01  # measured 0.03: a real bias (10 standard errors)
    assert bias[32] < 4.5 * se + 0.005  # within noise plus 0.005 at d = 32


def test_urn_matches_the_exact_mse_oracle():
    X = points(6, 16, seed=4)
    K = png_kernel(X, X, "angular")
    m = 16
    est = _estimates("gaussian", X, 3000, m, torch.sign)
    mse = (est - K).pow(2).mean(0)
    oracle = (1 - K**2) / m
    off = ~torch.eye(6, dtype=torch.bool)
    rel = (mse[off] - oracle[off]).abs() / oracle[off]
    # the MSE of 3000 draws has a relative standard error ~ sqrt(2 / 3000) ~ 2.6 %: allow 12 %
    assert float(rel.max()) < 0.12, rel


@pytest.mark.parametrize("sampler", ["orthogonal", "kama", "hadamard"])
def test_orthogonal_estimators_beat_iid_at_m_equals_d(sampler):
    X = torch.as_tensor(datasets.prepare(datasets.load("boston")[0])[:40])
    K = png_kernel(X, X, "angular")
    d = X.shape[1]
    off = ~torch.eye(40, dtype=torch.bool)
    mse_urn = (_estimates("gaussian", X, 400, d, torch.sign, 1) - K).pow(2).mean(0)[off].mean()
    mse = (_estimates(sampler, X, 400, d, torch.sign, 2) - K).pow(2).mean(0)[off].mean()
    # Paper: orthogonal (and Kac-walk) estimators have lower MSE. Measured ratio ~0.5-0.7; fail above 0.85.
    assert float(mse / mse_urn) < 0.85, float(mse / mse_urn)


def test_kama_converges_to_orn_as_k_grows():
    X = torch.as_tensor(datasets.prepare(datasets.load("wine")[0])[:30])
    K = png_kernel(X, X, "angular")
    d = X.shape[1]
    off = ~torch.eye(30, dtype=torch.bool)

    def mse(sampler, **kw):
        g = gen(7)
        est = torch.stack([estimate_kernel(X, None, random_matrix(sampler, d, d, generator=g, dtype=torch.float64,
                                                                  **kw), torch.sign) for _ in range(500)])
        return float((est - K).pow(2).mean(0)[off].mean())

    orn = mse("orthogonal")
    one = mse("kama", num_rotations=1)  # one rotation: nearly the identity, far worse than ORN
    full = mse("kama")  # 5 d ln d
    assert one > 1.5 * orn
    assert abs(full - orn) < 0.15 * orn


# ---------------------------------------------------------------------------------------------------------
# scikit-learn
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_check_estimator(sampler):
    check_estimator(PNGFeatures(sampler=sampler, n_components=20, random_state=0))


def test_transformer_shapes_determinism_pipeline():
    X = np.random.default_rng(0).normal(size=(30, 7))
    a = PNGFeatures(n_components=50, random_state=3).fit(X)
    b = PNGFeatures(n_components=50, random_state=3).fit(X)
    c = PNGFeatures(n_components=50, random_state=4).fit(X)
    assert a.transform(X).shape == (30, 50)
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    assert not np.array_equal(a.transform(X), c.transform(X))
    rbf = PNGFeatures(kernel="rbf", n_components=400, gamma=0.1, random_state=0).fit_transform(X)
    exact = png_kernel(X, X, "rbf", gamma=0.1).numpy()
    assert np.abs(rbf @ rbf.T - exact).mean() < 0.05
    custom = PNGFeatures(kernel=torch.tanh, n_components=10, random_state=0).fit_transform(X)
    assert custom.shape == (30, 10) and np.all(np.abs(custom) <= 1 / math.sqrt(10))
    assert list(a.get_feature_names_out())[:2] == ["pngfeatures0", "pngfeatures1"]
    pipe = make_pipeline(PNGFeatures(n_components=16, random_state=0), PNGFeatures(kernel="arccos1",
                                                                                 n_components=8, random_state=0))
    assert pipe.fit_transform(X).shape == (30, 8)
    zero = PNGFeatures(n_components=8, random_state=0).fit(X).transform(np.zeros((2, 7)))
    assert np.all(zero == 0)  # zero rows: sign(0) = 0, no NaN


@pytest.mark.parametrize(
    "params, X, match",
    [
        ({"n_components": 0}, None, "n_components must be an int >= 1"),
        ({"kernel": "poly"}, None, "kernel must be one of"),
        ({"sampler": "sobol"}, None, "sampler must be one of"),
        ({"gamma": -1.0}, None, "gamma must be a positive"),
        ({"num_rotations": -2}, None, "num_rotations must be None or an int"),
        ({"kernel": "rbf", "n_components": 3}, None, "must be even"),
        ({}, np.array([[1.0, np.nan]]), "NaN"),
        ({}, np.array([[1.0, np.inf]]), "infinity"),
    ],
)
def test_transformer_bad_input(params, X, match):
    X = np.ones((3, 2)) if X is None else X
    with pytest.raises(ValueError, match=match):
        PNGFeatures(**params).fit(X)


def test_transformer_wrong_feature_count_at_transform():
    t = PNGFeatures(n_components=4, random_state=0).fit(np.ones((3, 2)))
    with pytest.raises(ValueError, match="features"):
        t.transform(np.ones((3, 5)))


# ---------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------


def test_packaged_datasets():
    shapes = {"g50c": (550, 50), "boston": (506, 13), "cpu": (8192, 21), "insurance": (5822, 85),
              "wine": (6497, 12), "parkinson": (5875, 20), "wine_uci178": (178, 13),
              "parkinsons_oxford195": (195, 22)}
    for name, shape in shapes.items():
        X, y = datasets.load(name)
        assert X.shape == shape and y.shape == (shape[0],) and np.isfinite(X).all()
        assert len(datasets.feature_names(name)) == shape[1]
    assert "Provenance" in datasets.provenance() or "Source" in datasets.provenance()
    P = datasets.prepare(np.array([[1.0, 2.0], [3.0, 4.0], [3.0, 4.0]]))
    np.testing.assert_allclose(np.linalg.norm(P, axis=1), 1.0)
    assert np.all(datasets.prepare(np.zeros((2, 3)), standardize=False) == 0)
    with pytest.raises(ValueError, match="name must be one of"):
        datasets.load("iris")


@pytest.mark.parametrize("kernel", ["angular", "arccos0", "arccos1", "arccos2", "rbf"])
@pytest.mark.parametrize("sampler", ["kama", "orthogonal"])
def test_fitted_transformers_pickle_and_transform_identically(kernel, sampler, tmp_path):
    import pickle

    import joblib

    X = np.random.default_rng(0).normal(size=(20, 7))
    est = PNGFeatures(kernel=kernel, n_components=16, sampler=sampler, random_state=0).fit(X)
    for loaded in (pickle.loads(pickle.dumps(est)), joblib.load(joblib.dump(est, tmp_path / "est.joblib")[0])):
        assert np.array_equal(loaded.transform(X), est.transform(X))


@pytest.mark.parametrize("kernel, match", [
    (lambda u: u.sum(), "same shape"),
    (lambda u: float(u.sum()), "got float"),
    (lambda u: u[:, :1], "same shape"),
    (lambda u: (u > 0), "floating tensor"),
])
def test_callable_kernel_must_act_element_wise(kernel, match):
    X = np.random.default_rng(0).normal(size=(5, 4))
    with pytest.raises(ValueError, match=match):
        PNGFeatures(kernel=kernel, n_components=6).fit(X)
    assert PNGFeatures(kernel=torch.tanh, n_components=6).fit(X).transform(X).shape == (5, 6)
