"""KamaLinear and ToeplitzLinear: the nn.Linear contract (one parametrized test every layer joins), the dense
oracle, initialization scale, learned planes and bad input."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kama
from conftest import oracle_matrix, tol
from kama import KamaLinear, ToeplitzLinear


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Every structured layer joins the contract by adding a line here.
FACTORIES = {
    "kama": lambda i, o, **kw: KamaLinear(i, o, **kw),
    "kama_fixed_angles": lambda i, o, **kw: KamaLinear(i, o, learn_angles=False, **kw),
    "kama_k7": lambda i, o, **kw: KamaLinear(i, o, num_rotations=7, **kw),
    "kama_learn_planes": lambda i, o, **kw: KamaLinear(i, o, learn_planes=True, **kw),
    "toeplitz": lambda i, o, **kw: ToeplitzLinear(i, o, **kw),
}
SHAPES = [(5, 3), (3, 5), (6, 6), (1, 4), (4, 1)]


@pytest.fixture(params=sorted(FACTORIES))
def factory(request):
    return FACTORIES[request.param]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_contract_forward_and_grads_match_dense(factory, shape, bias, device):
    i, o = shape
    layer = factory(i, o, bias=bias, dtype=torch.float64, device=device, generator=gen(1))
    x = torch.randn(7, 2, i, dtype=torch.float64, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (7, 2, o) and y.dtype == torch.float64 and y.device.type == device
    w = layer.to_dense()
    assert w.shape == (o, i)
    ref = x @ w.T + (layer.bias if bias else 0)
    torch.testing.assert_close(y, ref)
    assert torch.equal(layer.weight, w)
    # Gradients of every learned parameter agree with autograd through to_dense().
    up = torch.randn_like(y)
    params = [p for p in layer.parameters() if p.requires_grad]
    g1 = torch.autograd.grad((y * up).sum(), [x, *params])
    g2 = torch.autograd.grad((ref * up).sum(), [x, *params])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)
    assert (layer.bias is None) == (not bias)


def test_contract_state_dict_pickle_deepcopy_repr(factory):
    # eval(): a learn_planes layer in training mode records plane scores every few steps through a different
    # (unfused) path whose last bits can differ; the round trip must reproduce the function exactly.
    a = factory(6, 4, generator=gen(2)).eval()
    b = factory(6, 4, generator=gen(3)).eval()
    x = torch.randn(5, 6)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c = factory(6, 4).eval()
    c.load_state_dict(torch.load(buf))
    torch.testing.assert_close(a(x), c(x), atol=0, rtol=0)
    for clone in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        torch.testing.assert_close(a(x), clone(x), atol=0, rtol=0)
    r = repr(a)
    assert "in_features=6" in r and "out_features=4" in r


def test_contract_determinism_and_reset(factory):
    a, b, c = factory(5, 7, generator=gen(4)), factory(5, 7, generator=gen(4)), factory(5, 7, generator=gen(5))
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(ta, tb)
    assert any(not torch.equal(ta, tc) for ta, tc in zip(a.state_dict().values(), c.state_dict().values(),
                                                         strict=True))
    before = {k: v.clone() for k, v in a.state_dict().items()}
    a.reset_parameters(generator=gen(9))
    assert any(not torch.equal(before[k], v) for k, v in a.state_dict().items())
    a.reset_parameters(generator=gen(4))
    for k, v in a.state_dict().items():
        assert torch.equal(before[k], v), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_contract_dtype(factory, dtype):
    layer = factory(4, 6, dtype=dtype)
    for p in layer.parameters():
        assert p.dtype == dtype
    assert layer(torch.randn(3, 4, dtype=dtype)).dtype == dtype


def test_contract_trains_every_parameter(factory):
    layer = factory(6, 4, generator=gen(0))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    x = torch.randn(32, 6)
    loss = (layer(x) - torch.randn(32, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    for n, p in layer.named_parameters():
        assert not torch.equal(before[n], p), n


def test_contract_bad_shapes(factory):
    with pytest.raises(ValueError, match="in_features must be >= 1, got 0"):
        factory(0, 3)
    with pytest.raises(ValueError, match="out_features must be >= 1, got 0"):
        factory(3, 0)
    with pytest.raises(TypeError, match="in_features must be an int"):
        factory(2.5, 3)
    layer = factory(3, 2)
    with pytest.raises(ValueError, match="last dimension in_features=3"):
        layer(torch.randn(4, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_contract_cuda_same_init_as_cpu(factory):
    a = factory(5, 3, generator=gen(0))
    b = factory(5, 3, generator=gen(0), device="cuda")
    for ta, tb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(ta, tb.cpu())


# ---------------------------------------------------------------------------------------------------------
# KamaLinear specifics
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    i=st.integers(1, 40),
    o=st.integers(1, 40),
    k=st.integers(0, 200),
    batch=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_kama_linear_against_explicit_givens_product(i, o, k, batch, seed, dtype):
    n = max(i, o)
    k = k if n > 1 else 0
    layer = KamaLinear(i, o, num_rotations=k, dtype=dtype, generator=gen(seed))
    with torch.no_grad():
        layer.scale.uniform_(0.5, 2.0)
    m = oracle_matrix(layer.pairs, layer.angles.detach().double(), n)
    s = layer.scale.detach().double()
    # Truncation, exactly as the paper states it: first d1 rows (d1 <= d2) or first d2 columns, renormalized.
    w = s[:, None] * m[:o, :] if o <= i else m[:, :i] * s[None, :]
    x = torch.randn(batch, i, dtype=dtype, generator=gen(seed + 1))
    y = layer(x)
    ref = x.double() @ w.T + layer.bias.detach().double()
    t = tol(dtype, k, n) * 4
    torch.testing.assert_close(y.double(), ref, atol=t, rtol=t)
    torch.testing.assert_close(layer.to_dense().double(), w, atol=t, rtol=t)
    # Zero-padding the input and dropping outputs is the same map.
    xp = torch.nn.functional.pad(x.double(), (0, n - i))
    sp = torch.ones(n, dtype=torch.float64)
    if o <= i:
        full = (xp @ m.T)[:, :o] * s
    else:
        sp[:i] = s
        full = (xp * sp) @ m.T
    torch.testing.assert_close(y.double(), full + layer.bias.detach().double(), atol=t, rtol=t)


@pytest.mark.parametrize("shape, batch", [((5, 3), 4), ((3, 4), 9)])  # < n: recorded walk; >= n: layer products
def test_kama_linear_gradcheck_and_gradgradcheck(shape, batch):
    layer = KamaLinear(*shape, num_rotations=20, dtype=torch.float64, generator=gen(0))
    x = torch.randn(batch, shape[0], dtype=torch.float64, requires_grad=True)

    def f(x, angles, scale, bias):
        return torch.func.functional_call(layer, {"angles": angles, "scale": scale, "bias": bias}, (x,))

    args = (x, *[p.detach().clone().requires_grad_(True) for p in (layer.angles, layer.scale, layer.bias)])
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("batch", [8, 64])  # < n: the recorded walk; >= n: the product of layer matrices
def test_recorded_backward_one_parameter_at_a_time_shares_one_recomputation(batch, monkeypatch):
    """sb3-contrib's TRPO takes the KL's gradient one parameter at a time (``create_graph=True``), then
    Hessian-vector products of the concatenation. Those gradients and products equal the ones of a single call,
    and each layer's recomputation is built once for all of them (it was built once per call)."""
    from kama.ops import linear as L

    torch.manual_seed(0)
    net = torch.nn.Sequential(KamaLinear(11, 32, num_rotations=60, dtype=torch.float64, generator=gen(3)),
                              torch.nn.Tanh(),
                              KamaLinear(32, 3, num_rotations=60, dtype=torch.float64, generator=gen(4)))
    x = torch.randn(batch, 11, dtype=torch.float64)
    params = list(net.parameters())
    calls = {"n": 0}
    layered, walk = L.layered_matrix, L.reference_linear

    def count(fn):
        def wrapped(*a, **k):
            calls["n"] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(L, "layered_matrix", count(layered))
    monkeypatch.setattr(L, "reference_linear", count(walk))
    loss = (net(x) ** 2).sum()
    one_by_one = [torch.autograd.grad(loss, p, create_graph=True, retain_graph=True)[0] for p in params]
    assert calls["n"] == 2  # one recomputation per layer, for all six parameters
    at_once = torch.autograd.grad((net(x) ** 2).sum(), params, create_graph=True)
    for a, b in zip(one_by_one, at_once, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    flat_a = torch.cat([g.reshape(-1) for g in one_by_one])
    flat_b = torch.cat([g.reshape(-1) for g in at_once])
    for _ in range(2):  # repeated products walk the shared graph again
        hvp_a = torch.autograd.grad(flat_a @ v, params, retain_graph=True)
        hvp_b = torch.autograd.grad(flat_b @ v, params, retain_graph=True)
        for a, b in zip(hvp_a, hvp_b, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_kama_initial_scale_matches_nn_linear(shape):
    i, o = shape
    g = gen(0)
    x = torch.randn(512, i, generator=g)
    kama_var, lin_var = [], []
    for seed in range(20):
        k = KamaLinear(i, o, bias=False, generator=gen(100 + seed))
        torch.manual_seed(seed)
        lin = nn.Linear(i, o, bias=False)
        with torch.no_grad():
            kama_var.append(k(x).var().item())
            lin_var.append(lin(x).var().item())
    ratio = sum(kama_var) / sum(lin_var)
    # Both target E[y^2] = |x|^2 / (3 in); over 20 layers the ratio is within a few percent of 1.
    assert 0.9 < ratio < 1.1, ratio
    # Bias bound as nn.Linear.
    b = KamaLinear(i, o, generator=gen(1)).bias
    assert b.abs().max() <= 1 / math.sqrt(i)


def test_kama_num_parameters_and_defaults():
    layer = KamaLinear(17, 64)
    assert layer.num_rotations == kama.default_num_rotations(64)
    assert layer.num_parameters() == layer.num_rotations + 17 + 64
    assert KamaLinear(64, 64, num_rotations=200).num_parameters() == 200 + 64 + 64
    assert KamaLinear(64, 6, num_rotations=200, bias=False).num_parameters() == 200 + 6
    fixed = KamaLinear(64, 6, num_rotations=200, learn_angles=False)
    assert fixed.num_parameters() == 6 + 6
    assert "angles" not in dict(fixed.named_parameters()) and "angles" in dict(fixed.named_buffers())
    assert "pairs" in dict(fixed.named_buffers())
    assert sum(p.numel() for p in layer.parameters()) == layer.num_parameters()
    assert "learn_angles=False" in repr(fixed)
    assert KamaLinear(1, 1).num_rotations == 0


def test_kama_learned_planes_fit_a_sparse_rotation_better_than_random_planes():
    """A target made of 6 rotations in specific planes: learned planes fit it far better (section 6.3)."""
    d = 8
    target = kama.givens_matrix(
        torch.tensor([[0, 5], [2, 7], [1, 3], [4, 6], [0, 2], [5, 7]]),
        torch.tensor([1.0, -0.8, 1.3, 0.7, -1.1, 0.9]),
        d,
    )
    losses = {}
    for learn in (False, True):
        finals = []
        for seed in range(3):
            layer = KamaLinear(d, d, bias=False, num_rotations=12, learn_planes=learn, plane_update_every=20,
                               generator=gen(seed))
            opt = torch.optim.Adam(layer.parameters(), lr=0.03)
            x = torch.randn(256, d, generator=gen(50 + seed))
            y = x @ target.T
            for _ in range(800):
                opt.zero_grad()
                loss = (layer(x) - y).pow(2).mean()
                loss.backward()
                opt.step()
            finals.append(loss.item())
        losses[learn] = sorted(finals)[1]  # median of 3 seeds
    assert losses[True] < 0.1 * losses[False], losses
    assert losses[True] < 0.03, losses


def test_kama_reselect_planes_by_hand_keeps_function_for_idle_rotations():
    layer = KamaLinear(6, 4, num_rotations=10, learn_planes=True, generator=gen(0))
    x = torch.randn(16, 6)
    before = layer(x).detach()
    pairs_before = layer.pairs.clone()
    moved = layer.reselect_planes(x, torch.randn(16, 4))
    assert 1 <= moved <= math.ceil(10 / 8)
    assert (layer.pairs != pairs_before).any(dim=1).sum() <= moved
    torch.testing.assert_close(layer(x).detach(), before)  # all angles were 0: same function
    with pytest.raises(ValueError, match="learn_planes=True"):
        KamaLinear(6, 4).reselect_planes(x, torch.randn(16, 4))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"num_rotations": -1}, ValueError, "num_rotations must be >= 0, got -1"),
        ({"num_rotations": 2.0}, TypeError, "num_rotations must be an int"),
        ({"learn_planes": True, "learn_angles": False}, ValueError, "learn_planes=True requires"),
        ({"plane_update_every": 0}, ValueError, "plane_update_every must be >= 1"),
        ({"plane_candidates": 0}, ValueError, "plane_candidates must be >= 1"),
        ({"plane_tol": 2.0}, ValueError, "plane_tol must be a number in"),
        ({"dtype": torch.complex64}, TypeError, "dtype must be None or one of"),
        ({"dtype": torch.int32}, TypeError, "dtype must be None or one of"),
    ],
)
def test_kama_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        KamaLinear(4, 4, **kwargs)


def test_kama_one_dimensional_needs_zero_rotations():
    with pytest.raises(ValueError, match="num_rotations must be 0"):
        KamaLinear(1, 1, num_rotations=3)
    layer = KamaLinear(1, 1)
    torch.testing.assert_close(layer(torch.ones(2, 1)), layer.scale * torch.ones(2, 1) + layer.bias)


def test_toeplitz_structure_and_count():
    layer = ToeplitzLinear(4, 3, generator=gen(0))
    w = layer.to_dense()
    for a in range(3):
        for b in range(4):
            assert w[a, b] == layer.coeffs[a - b + 3]
    assert layer.num_parameters() == 4 + 3 - 1 + 3
    assert ToeplitzLinear(4, 3, bias=False).num_parameters() == 6


def test_inference_cache_follows_every_write_including_data():
    layer = KamaLinear(16, 16, num_rotations=40, generator=gen(0))
    x = torch.randn(4096, 16)  # large batch: the cached dense matrix wins

    def fresh():  # the walk, not the cache
        return kama.givens_apply(x, layer.pairs, layer.angles, backend="reference") * layer.scale + layer.bias

    def bump_angles():
        layer.angles.data[3] += 0.5  # as TRPO's line search: no version bump

    def bump_scale():
        layer.scale.data.mul_(2.0)

    def move_plane():
        layer.pairs[0] = torch.tensor([2, 3]) if layer.pairs[0].tolist() == [1, 2] else torch.tensor([1, 2])

    outs = []
    with torch.no_grad():
        for change in (lambda: None, bump_angles, bump_scale, move_plane):
            change()
            y = layer(x)
            assert layer._cache.weight is not None  # the inference cache was used
            torch.testing.assert_close(y, fresh(), atol=1e-5, rtol=1e-5)
            outs.append(y)
    for a, b in zip(outs, outs[1:], strict=False):
        assert not torch.allclose(a, b)
    # With gradients the cache is not used and gradients flow to the angles.
    layer(x[:8]).sum().backward()
    assert layer.angles.grad is not None
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), layer(x))


def test_inference_cache_follows_the_angle_gain_and_serves_small_calls():
    """The materialized weight is keyed on ``angle_gain`` too (a changed gain, or a checkpoint loaded with another
    gain and the same angles, once served the old weight), and the next call finds it with one check of planes,
    angles, scalars, gain and batch size."""
    layer = KamaLinear(16, 16, num_rotations=40, generator=gen(2))
    x = torch.randn(4096, 16)

    def fresh():
        return kama.givens_apply(x, layer.pairs, layer.rotation_angles(), backend="reference") * layer.scale \
            + layer.bias

    with torch.no_grad():
        before = layer(x)
        layer.angle_gain = 2.0
        torch.testing.assert_close(layer(x), fresh(), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(layer(x), before)
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        state["angle_gain"] = torch.tensor(1.0, dtype=torch.float64)
        layer.load_state_dict(state)  # the same angles, another gain
        torch.testing.assert_close(layer(x), before)
        cache, n_rows = layer._cache, x.shape[0]
        w = cache.current_weight(layer.pairs, layer.angles, layer.scale, n_rows, layer.angle_gain)
        assert w is not None and w is cache.weight[-1]  # the last call's weight, found without re-planning
        assert cache.current_weight(layer.pairs, layer.angles, layer.scale, n_rows, 3.0) is None
        assert cache.current_weight(layer.pairs, layer.angles, layer.scale, n_rows + 1, layer.angle_gain) is None
        assert cache.current_weight(layer.pairs.flip(0), layer.angles, layer.scale, n_rows, layer.angle_gain) is None
        assert cache.current_weight(layer.pairs, layer.angles + 1, layer.scale, n_rows, layer.angle_gain) is None
        assert cache.current_weight(layer.pairs, layer.angles, layer.scale * 2, n_rows, layer.angle_gain) is None
        assert cache.current_weight(layer.pairs, layer.angles.double(), layer.scale, n_rows, layer.angle_gain) is None


@pytest.mark.parametrize("shape", [(5, 3), (3, 7), (6, 6)])
def test_kama_to_dense_backends_agree(shape):
    layer = KamaLinear(*shape, num_rotations=15, generator=gen(1))
    ref = layer.to_dense()
    fast = layer.to_dense(backend="auto")
    torch.testing.assert_close(fast, ref, atol=tol(torch.float32, 15, max(shape)), rtol=0)
    with pytest.raises(ValueError, match="backend"):
        layer.to_dense(backend="fastest")


@pytest.mark.parametrize("factory", [KamaLinear, ToeplitzLinear])
def test_complex_dtype_is_rejected(factory):
    with pytest.raises(TypeError, match="dtype must be None or one of"):
        factory(3, 3, dtype=torch.complex64)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_meta_device_shapes_then_materialize(shape):
    layer = KamaLinear(*shape, device="meta")
    assert layer(torch.empty(7, shape[0], device="meta")).shape == (7, shape[1])
    assert layer.to_dense().shape == (shape[1], shape[0]) and layer.to_dense().is_meta
    layer.to_empty(device="cpu")
    layer.reset_parameters(generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, shape[0])
    assert torch.allclose(layer(x), x @ layer.to_dense().T + layer.bias, atol=1e-5)


@pytest.mark.parametrize("rows", [4, 5000])
def test_jit_trace_of_a_layer_matches_eager(rows):
    layer = KamaLinear(16, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # no gradients and a cold cache: the compiled paths write through raw pointers
        traced = torch.jit.trace(layer, torch.randn(rows, 16), check_trace=False)
        x = torch.randn(rows, 16)
        assert torch.allclose(traced(x), layer(x), atol=1e-5)
