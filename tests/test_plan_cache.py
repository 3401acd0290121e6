"""Plans are cached by value and must never see a caller's later in-place writes: regression tests and a fuzz
test that mutates, reuses and reshapes pairs and layers across calls, checking every backend against the dense
oracle after each step."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import kama
from conftest import oracle_matrix
from kama.givens import as_plan

BACKENDS = ["reference", "cpu", "dense"]


def test_pairs_written_in_place_after_use_do_not_reach_cached_plans():
    p = kama.random_pairs(8, 20, generator=torch.Generator().manual_seed(5))
    a = kama.random_angles(20, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64)
    y = kama.givens_apply(x, p, a, backend="cpu")
    q = p.clone()
    p[:] = kama.random_pairs(8, 20, generator=torch.Generator().manual_seed(7))
    expected = x @ oracle_matrix(q, a, 8).T
    assert torch.allclose(y, expected, atol=1e-12)
    for backend in BACKENDS:
        assert torch.allclose(kama.givens_apply(x, q, a, backend=backend), expected, atol=1e-12), backend
    assert torch.allclose(kama.givens_matrix(q, a, 8), oracle_matrix(q, a, 8), atol=1e-12)
    # and the new values get their own plan
    assert torch.allclose(kama.givens_apply(x, p, a, backend="reference"), x @ oracle_matrix(p, a, 8).T, atol=1e-12)


def test_plan_keeps_its_own_pairs():
    p = torch.tensor([[0, 1], [1, 2]])
    plan = kama.GivensPlan(p, 3)
    p[0, 1] = 2
    assert plan.pairs.tolist() == [[0, 1], [1, 2]]
    plan.pairs[0, 0] = 2  # a copy: the plan does not change
    assert plan.pairs.tolist() == [[0, 1], [1, 2]]


@pytest.mark.parametrize("shape", [(4, 1), (1, 4), (4,), (2, 2, 1)])
def test_cached_plan_does_not_admit_pairs_of_another_shape(shape):
    p = torch.tensor([[0, 1], [2, 3]])
    x = torch.randn(2, 4)
    kama.givens_apply(x, p, torch.zeros(2))
    with pytest.raises(ValueError, match=r"pairs must have shape \(k, 2\)"):
        kama.givens_apply(x, p.reshape(shape), torch.zeros(2))
    with pytest.raises(ValueError, match=r"pairs must have shape \(k, 2\)"):
        as_plan(p.reshape(shape), 4)


def _layer_oracle(layer: kama.KamaLinear, x: torch.Tensor) -> torch.Tensor:
    m = oracle_matrix(layer.pairs, layer.angles.detach(), layer.n)
    i, o = layer.in_features, layer.out_features
    w = layer.scale.detach()[:, None] * m[:o, :] if o <= i else m[:, :i] * layer.scale.detach()[None, :]
    return x @ w.T + layer.bias.detach()


def test_deepcopy_after_backward_then_load_state_dict_keeps_the_copy_right():
    g = torch.Generator().manual_seed(0)
    a = kama.KamaLinear(11, 7, num_rotations=40, generator=g, dtype=torch.float64)
    other = kama.KamaLinear(11, 7, num_rotations=40, generator=g, dtype=torch.float64)
    x = torch.randn(64, 11, dtype=torch.float64, generator=g)
    a(x).sum().backward()
    b = copy.deepcopy(a)
    a.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.allclose(b(x), _layer_oracle(b, x), atol=1e-12)
        assert torch.allclose(b(x), x @ b.to_dense().T + b.bias, atol=1e-12)
        assert torch.allclose(a(x), _layer_oracle(a, x), atol=1e-12)
    # the recorded (TRPO) backward of the copy: a Hessian-vector product against the oracle's
    v = torch.randn(40, dtype=torch.float64, generator=g)

    def hvp(f):
        angles = b.angles
        loss = f().pow(3).sum()
        (grad,) = torch.autograd.grad(loss, angles, create_graph=True)
        (h,) = torch.autograd.grad(grad @ v, angles)
        return h

    def oracle_forward():
        m = oracle_matrix(b.pairs, b.angles, b.n)
        return x @ (b.scale[:, None] * m[:7, :]).T + b.bias

    assert torch.allclose(hvp(lambda: b(x)), hvp(oracle_forward), atol=1e-9)


def test_pairs_written_through_data_are_seen_by_the_inference_cache():
    g = torch.Generator().manual_seed(1)
    layer = kama.KamaLinear(16, 16, num_rotations=60, generator=g)
    x = torch.randn(4096, 16, generator=g)
    with torch.no_grad():
        layer(x)  # fills the inference cache (a dense batch)
        layer.pairs.data[0] = torch.tensor([layer.pairs[0, 1], (layer.pairs[0, 1] + 1) % 16])
        if layer.pairs[0, 0] == layer.pairs[0, 1]:
            layer.pairs.data[0, 1] = (layer.pairs[0, 1] + 1) % 16
        assert torch.allclose(layer(x), x @ layer.to_dense().T + layer.bias, atol=1e-5)
        assert torch.allclose(layer(x[:3]), x[:3] @ layer.to_dense().T + layer.bias, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Fuzz: a sequence of writes, copies, reloads and calls, every backend checked after every step
# ----------------------------------------------------------------------------------------------------------


class PlanAndLayerMutations(RuleBasedStateMachine):
    """Raw pairs reused and rewritten in place, layers copied, reloaded and rewritten through ``.data``."""

    @initialize(d=st.integers(2, 12), k=st.integers(0, 30), seed=st.integers(0, 2**20))
    def setup(self, d: int, k: int, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.d, self.k = d, k
        self.pairs = kama.random_pairs(d, k, generator=self.g)
        self.angles = kama.random_angles(k, generator=self.g, dtype=torch.float64)
        self.layers = [kama.KamaLinear(d, max(1, d - 1), num_rotations=k, generator=self.g, dtype=torch.float64)]

    def _x(self, rows: int, d: int) -> torch.Tensor:
        return torch.randn(rows, d, generator=self.g, dtype=torch.float64)

    @rule(seed=st.integers(0, 2**20))
    def rewrite_pairs_in_place(self, seed: int) -> None:
        self.pairs[:] = kama.random_pairs(self.d, self.k, generator=torch.Generator().manual_seed(seed))

    @rule(r=st.integers(0, 10**6), shift=st.integers(1, 11))
    def rewrite_one_pair(self, r: int, shift: int) -> None:
        if self.k:
            i = int(self.pairs[r % self.k, 0])
            self.pairs[r % self.k, 1] = (i + 1 + shift % (self.d - 1)) % self.d

    @rule()
    def clone_pairs(self) -> None:
        self.pairs = self.pairs.clone()

    @rule(rows=st.sampled_from([1, 3, 70]))
    def apply_every_backend(self, rows: int) -> None:
        x = self._x(rows, self.d)
        expected = x @ oracle_matrix(self.pairs, self.angles, self.d).T
        for backend in BACKENDS:
            y = kama.givens_apply(x, self.pairs, self.angles, backend=backend)
            assert torch.allclose(y, expected, atol=1e-10), backend
            yt = kama.givens_apply(y, self.pairs, self.angles, backend=backend, transpose=True)
            assert torch.allclose(yt, x, atol=1e-10), backend

    @rule()
    def copy_layer(self) -> None:
        self.layers.append(copy.deepcopy(self.layers[-1]))

    @rule(seed=st.integers(0, 2**20))
    def load_other_state(self, seed: int) -> None:
        other = kama.KamaLinear(self.d, max(1, self.d - 1), num_rotations=self.k, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(seed))
        self.layers[0].load_state_dict(other.state_dict())

    @rule(r=st.integers(0, 10**6), shift=st.integers(1, 11))
    def rewrite_layer_pairs_through_data(self, r: int, shift: int) -> None:
        layer = self.layers[r % len(self.layers)]
        if self.k:
            i = int(layer.pairs[r % self.k, 0])
            layer.pairs.data[r % self.k, 1] = (i + 1 + shift % (self.d - 1)) % self.d

    @rule(rows=st.sampled_from([1, 5, 300]), grad=st.booleans())
    def layers_forward_and_backward(self, rows: int, grad: bool) -> None:
        x = self._x(rows, self.d)
        for layer in self.layers:
            expected = _layer_oracle(layer, x)
            if grad:
                y = layer(x)
                y.sum().backward()
                assert layer.angles.grad is not None
                layer.zero_grad()
            else:
                with torch.no_grad():
                    y = layer(x)
            assert torch.allclose(y.detach(), expected, atol=1e-10)
            assert torch.allclose(layer.to_dense(), layer.to_dense(backend="auto"), atol=1e-10)

    @invariant()
    def plans_match_their_pairs(self) -> None:
        if hasattr(self, "pairs"):
            assert torch.equal(as_plan(self.pairs, self.d).pairs, self.pairs)


TestPlanAndLayerMutations = PlanAndLayerMutations.TestCase
TestPlanAndLayerMutations.settings = settings(max_examples=25, stateful_step_count=12, deadline=None)
