"""Before / Expected structure tests (TVM's style): a small module is captured, one pass runs, and
the resulting graph must equal an Expected graph built by hand with the FX Graph API, op for op
and operand for operand (plus the folded tensors and the outputs)."""
import operator

import pytest
import torch
from torch.fx import Graph

from finegrain.compiler.capture import capture
from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import get_tensor
from finegrain.compiler.recipe import Recipe, get_recipe
from finegrain.driver.pipeline import ANALYZE, run_passes
from finegrain.formats.ops import DEQUANTIZE, DEQUANTIZE_PACKED, QUANTIZE
from finegrain.passes.canonicalize import canonicalize
from finegrain.passes.fold_norms import fold_norms
from finegrain.passes.insert_qdq import insert_qdq
from finegrain.passes.quantize_weights import quantize_weights

aten = torch.ops.aten


def canon(graph: Graph) -> list[tuple]:
    """The graph's call_function nodes in order, each operand named by what it is: a stored
    tensor (``attr``), an input (``in``), an earlier op (``op`` + index) or a constant."""
    index, out = {}, []

    def arg(a):
        if isinstance(a, torch.fx.Node):
            if a.op == "get_attr":
                return ("attr", a.target.replace("_", "."))
            if a.op == "placeholder":
                return ("in",)
            return ("op", index[a])
        if isinstance(a, (list, tuple)):
            return tuple(arg(x) for x in a)
        return a

    for n in graph.nodes:
        if n.op == "call_function":
            index[n] = len(out)
            out.append((n.target, tuple(arg(a) for a in n.args), tuple(sorted((k, arg(v)) for k, v in n.kwargs.items()))))
    return out


class RmsThenLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm_w = torch.nn.Parameter(torch.rand(64) + 0.5)
        self.lin = torch.nn.Linear(64, 32, bias=False)
        self.out = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.out(torch.relu(self.lin(self.norm_w * h)))


class LayerNormThenLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(64)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)
        self.lin = torch.nn.Linear(64, 32)
        self.out = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.out(torch.relu(self.lin(self.ln(x))))


def _run(module, x, fn, recipe):
    torch.manual_seed(0)
    gm = capture(module, (x,), input_names=("x",), dynamic=False)
    ctx = PassContext(recipe=recipe, calibration=[(x,)], show_progress=False)
    gm = canonicalize(gm, ctx)
    return fn(gm, ctx), ctx


def test_fold_norms_rms():
    torch.manual_seed(0)
    m, x = RmsThenLinears().eval(), torch.randn(3, 64)
    ref = m(x)
    gm, ctx = _run(m, x, fold_norms, Recipe(fold_norms=True))
    expected = Graph()  # the normalization stays, the weight multiply is gone, lin reads it directly
    xi = expected.placeholder("x")
    w_lin, w_out, b_out = (expected.get_attr(t) for t in ("lin.weight", "out.weight", "out.bias"))
    pw = expected.call_function(aten.pow.Tensor_Scalar, (xi, 2))
    mean = expected.call_function(aten.mean.dim, (pw, [-1], True))
    add = expected.call_function(aten.add.Tensor, (mean, 1e-6))
    rs = expected.call_function(aten.rsqrt.default, (add,))
    h = expected.call_function(aten.mul.Tensor, (xi, rs))
    lin = expected.call_function(aten.linear.default, (h, w_lin))
    r = expected.call_function(aten.relu.default, (lin,))
    expected.output(expected.call_function(aten.linear.default, (r, w_out, b_out)))
    assert canon(gm.graph) == canon(expected)
    assert torch.equal(get_tensor(gm, "lin.weight"), m.lin.weight.detach() * m.norm_w.detach())
    assert torch.allclose(gm(x), ref, atol=1e-5)
    assert [f["action"] for f in ctx.report["folds"]] == ["folded"]


def test_fold_norms_layernorm_bias():
    torch.manual_seed(0)
    m, x = LayerNormThenLinear().eval(), torch.randn(3, 64)
    ref = m(x)
    gm, _ = _run(m, x, fold_norms, Recipe(fold_norms=True))
    expected = Graph()  # layer_norm without affine; lin's weight scaled, its bias absorbs W beta
    xi = expected.placeholder("x")
    w_lin, b_lin, w_out, b_out = (expected.get_attr(t) for t in ("lin.weight", "lin.bias", "out.weight", "out.bias"))
    ln = expected.call_function(aten.layer_norm.default, (xi, [64], None, None, 1e-5, False))
    lin = expected.call_function(aten.linear.default, (ln, w_lin, b_lin))
    r = expected.call_function(aten.relu.default, (lin,))
    expected.output(expected.call_function(aten.linear.default, (r, w_out, b_out)))
    assert canon(gm.graph) == canon(expected)
    W, g, beta = m.lin.weight.detach(), m.ln.weight.detach(), m.ln.bias.detach()
    assert torch.allclose(get_tensor(gm, "lin.weight"), W * g)
    assert torch.allclose(get_tensor(gm, "lin.bias"), m.lin.bias.detach() + W @ beta, atol=1e-6)
    assert torch.allclose(gm(x), ref, atol=1e-5)


class HandLayerNorm(torch.nn.Module):
    """Cohere's LayerNorm, written out (the centering computed twice), then a linear; ``leak``
    also returns the mean, so the pattern's intermediate has another reader."""

    def __init__(self, leak=False):
        super().__init__()
        self.leak = leak
        self.norm_w = torch.nn.Parameter(torch.rand(64) + 0.5)
        self.lin = torch.nn.Linear(64, 32, bias=False)

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        y = self.lin(self.norm_w.to(torch.float32) * ((x - mean) * torch.rsqrt(var + 1e-5)))
        return (y, mean) if self.leak else y


def test_hand_written_layer_norm_becomes_aten_layer_norm():
    torch.manual_seed(0)
    m, x = HandLayerNorm().eval(), torch.randn(3, 64)
    ref = m(x)
    gm, ctx = _run(m, x, lambda gm, ctx: gm, Recipe(fold_norms=True))
    expected = Graph()
    xi = expected.placeholder("x")
    w_norm, w_lin = expected.get_attr("norm_w"), expected.get_attr("lin.weight")
    ln = expected.call_function(aten.layer_norm.default, (xi, [64], w_norm, None, 1e-5))
    expected.output(expected.call_function(aten.linear.default, (ln, w_lin)))
    assert canon(gm.graph) == canon(expected)
    assert torch.allclose(gm(x), ref, atol=1e-5)
    folded = fold_norms(gm, ctx)  # now a LayerNorm the fold understands: its gain moves into lin
    assert [f["action"] for f in ctx.report["folds"]] == ["folded"]
    assert torch.allclose(folded(x), ref, atol=1e-5)


def test_hand_written_layer_norm_with_a_shared_intermediate_is_left_alone():
    m, x = HandLayerNorm(leak=True).eval(), torch.randn(3, 64)
    gm, _ = _run(m, x, lambda gm, ctx: gm, Recipe())
    targets = [n.target for n in gm.graph.nodes]
    assert aten.layer_norm.default not in targets and aten.rsqrt.default in targets
    torch.testing.assert_close(gm(x), m(x))


def test_fold_norms_refuses_a_norm_read_by_a_residual():
    class PostNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.lin = torch.nn.LayerNorm(64), torch.nn.Linear(64, 64)

        def forward(self, x):
            h = self.ln(x)
            return self.lin(h) + h

    m, x = PostNorm().eval(), torch.randn(2, 64)
    before = capture(m, (x,), input_names=("x",), dynamic=False)
    gm, ctx = _run(m, x, fold_norms, Recipe(fold_norms=True))
    assert canon(gm.graph) == canon(before.graph)  # unchanged
    assert ctx.report["folds"][0]["action"] == "refused" and "also read by" in ctx.report["folds"][0]["detail"]


def _analyzed(recipe_name):
    torch.manual_seed(0)
    m, x = RmsThenLinears().eval(), torch.randn(3, 64)
    gm = capture(m, (x,), input_names=("x",), dynamic=False)
    ctx = PassContext(recipe=get_recipe(recipe_name), calibration=[(x,)], show_progress=False)
    gm = run_passes(gm, ctx, ANALYZE)
    return quantize_weights(gm, ctx), ctx, x


def _norm_prefix(g: Graph, xi):
    pw = g.call_function(aten.pow.Tensor_Scalar, (xi, 2))
    mean = g.call_function(aten.mean.dim, (pw, [-1], True))
    rs = g.call_function(aten.rsqrt.default, (g.call_function(aten.add.Tensor, (mean, 1e-6)),))
    h = g.call_function(aten.mul.Tensor, (xi, rs))
    return g.call_function(aten.mul.Tensor, (g.get_attr("norm_w"), h))


@pytest.mark.parametrize("recipe", ["w4a16-g64", "w8a8"])
def test_insert_qdq(recipe):
    gm, ctx, x = _analyzed(recipe)
    gm = insert_qdq(gm, ctx)
    wfmt = "int4-g64-asym-fp16" if recipe == "w4a16-g64" else "int8-channel-sym-fp16"
    expected = Graph()  # lin's weight packed + dequantize_packed; w8a8 also fake-quantizes its input
    xi = expected.placeholder("x")
    h = _norm_prefix(expected, xi)
    parts = [expected.get_attr(f"lin.weight_q{p}") for p in ("packed", "scale", "zero")]
    w = expected.call_function(DEQUANTIZE_PACKED, (*parts, wfmt, [32, 64], torch.float32))
    if recipe == "w8a8":
        q = expected.call_function(QUANTIZE, (h, "int8-token-sym-fp32-dyn"))
        codes, scale, zero = (expected.call_function(operator.getitem, (q, i)) for i in range(3))
        h = expected.call_function(DEQUANTIZE, (codes, scale, zero, "int8-token-sym-fp32-dyn", torch.float32))
    lin = expected.call_function(aten.linear.default, (h, w))
    r = expected.call_function(aten.relu.default, (lin,))
    expected.output(expected.call_function(aten.linear.default, (r, expected.get_attr("out.weight"),
                                                                 expected.get_attr("out.bias"))))
    assert canon(gm.graph) == canon(expected)
    assert "lin.weight" not in dict(gm.named_buffers())  # only the packed codes and scales are stored
