"""The operator as a PyTorch op: opcheck, torch.compile (no graph break), torch.export, autocast, merging into
nn.Linear and ONNX export of the merged model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kama
import kama.ops.library  # noqa: F401  (registers torch.ops.kama.*)
from conftest import oracle_matrix


def _args(d=7, k=30, n=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = kama.random_pairs(d, k, generator=g)
    angles = kama.random_angles(k, generator=g, dtype=dtype).requires_grad_()
    x = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    return x, pairs, angles


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "dense"])
def test_opcheck(dtype, transpose, backend):
    x, pairs, angles = _args(dtype=dtype)
    torch.library.opcheck(torch.ops.kama.givens_apply.default, (x, pairs, angles, transpose, backend))
    y = torch.ops.kama.givens_apply(x, pairs, angles, transpose, backend)
    m = oracle_matrix(pairs, angles.detach().double(), 7).to(dtype)
    torch.testing.assert_close(y, x @ (m if transpose else m.T), atol=1e-5, rtol=1e-5)
    torch.library.opcheck(torch.ops.kama.givens_apply_backward.default,
                          (y.detach(), torch.randn_like(y), pairs, angles.detach(), transpose, backend))


def test_op_gradients_and_double_backward_match_the_oracle():
    x, pairs, angles = _args()
    assert torch.autograd.gradcheck(lambda x, a: torch.ops.kama.givens_apply(x, pairs, a, False, "cpu"), (x, angles))
    assert torch.autograd.gradgradcheck(lambda x, a: torch.ops.kama.givens_apply(x, pairs, a, True, "auto"),
                                        (x, angles))


def test_op_output_never_aliases_its_input():
    x = torch.randn(3, 4)
    y = torch.ops.kama.givens_apply(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), False, "reference")
    assert torch.equal(y, x) and y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


@pytest.mark.parametrize("call, err, match", [
    (lambda x, p, a: (x, p, a.float(), False, "auto"), TypeError, "angles must have the same dtype as x"),
    (lambda x, p, a: (x.long(), p, a, False, "auto"), TypeError, "x must have a floating dtype"),
    (lambda x, p, a: (x, p, a, False, "gpu"), ValueError, "backend must be one of"),
    (lambda x, p, a: (x, p, a[:3], False, "auto"), ValueError, r"angles must have shape \(30,\)"),
    (lambda x, p, a: (x, p + 100, a, False, "auto"), ValueError, "pairs entries must lie in"),
    (lambda x, p, a: (x, p, a.to("meta"), False, "auto"), ValueError, "same device"),
])
def test_op_checks_its_arguments_before_any_kernel(call, err, match):
    x, pairs, angles = _args()
    with pytest.raises(err, match=match):
        torch.ops.kama.givens_apply(*call(x.detach(), pairs, angles.detach()))


def _policy_net(**kw) -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    return nn.Sequential(kama.KamaLinear(11, 64, generator=g, **kw), nn.Tanh(),
                         kama.KamaLinear(64, 64, generator=g, **kw), nn.Tanh(),
                         kama.KamaLinear(64, 3, generator=g, **kw))


def test_compile_fullgraph_matches_eager_and_export_works():
    model = _policy_net(angle_gain="dense", plane_sampler="live")
    x = torch.randn(32, 11)
    ref = model(x)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    out = compiled(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref.square().sum().backward()
    for a, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = compiled(x)
    assert low.dtype == torch.bfloat16 and float((low.float() - ref).abs().max()) < 0.05
    program = torch.export.export(model, (x,))
    assert "torch.ops.kama.givens_apply.default" in program.graph_module.code
    torch.testing.assert_close(program.module()(x), ref, atol=1e-5, rtol=1e-5)


def test_compiled_code_raises_the_typed_errors_of_eager():
    x, pairs, angles = _args(dtype=torch.float32)

    def f(x, a):
        return kama.givens_apply(x, pairs, a)

    with pytest.raises(Exception, match="angles must have the same dtype as x"):
        torch.compile(f, fullgraph=True)(x.detach(), angles.detach().double())
    with pytest.raises(Exception, match="angles must have the same dtype as x"):
        torch.export.export(kama.KamaLinear(4, 4).double(), (torch.randn(2, 4),))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_float32_state_and_the_autocast_output_dtype(dtype):
    model = _policy_net()
    x = torch.randn(16, 11)
    ref = model(x)
    with torch.autocast("cpu", dtype=dtype):
        low = model(x)
        dense = nn.Linear(11, 3)(x)
    assert low.dtype == dtype == dense.dtype
    # float32 walks rounded once per layer: within a few 16-bit ulps, not the 2-4 % of 16-bit state
    assert float((low.float() - ref).abs().max()) <= 8 * torch.finfo(dtype).eps * float(ref.abs().max()) + 1e-3
    with torch.autocast("cpu", dtype=dtype):
        model(x).float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    half_in = model(x.to(dtype))  # a 16-bit input to float32 parameters, without autocast
    assert half_in.dtype == dtype


def test_to_linear_merges_every_structured_layer_and_exports_to_onnx(tmp_path):
    model = nn.Sequential(kama.KamaLinear(11, 64), nn.Tanh(), kama.ToeplitzLinear(64, 32), nn.Tanh(),
                          nn.Sequential(kama.KamaLinear(32, 3, bias=False)))
    x = torch.randn(5, 11)
    dense = kama.to_linear(model)
    assert all(not isinstance(m, kama.KamaLinear | kama.ToeplitzLinear) for m in dense.modules())
    assert isinstance(model[0], kama.KamaLinear)  # a copy by default
    torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=1e-5)
    assert dense[4][0].bias is None
    layer = kama.KamaLinear(6, 9, angle_gain="dense", generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(layer.to_linear()(x[:, :6]), layer(x[:, :6]), atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        kama.to_linear([layer])
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    program = torch.onnx.export(dense.eval(), (x,), dynamo=True)
    proto = program.model_proto
    onnx.checker.check_model(proto)
    out = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("transpose", [False, True])
def test_opcheck_on_cuda(transpose):  # pragma: no cover - GPU machines only
    x, pairs, angles = _args(dtype=torch.float32)
    x, angles = x.detach().cuda().requires_grad_(), angles.detach().cuda().requires_grad_()
    torch.library.opcheck(torch.ops.kama.givens_apply.default, (x, pairs.cuda(), angles, transpose, "cuda"))
    ref = kama.givens_apply(x.cpu(), pairs, angles.cpu(), transpose=transpose, backend="reference")
    torch.testing.assert_close(torch.ops.kama.givens_apply(x, pairs.cuda(), angles, transpose, "auto").cpu(), ref,
                               atol=1e-5, rtol=1e-5)
