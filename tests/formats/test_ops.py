"""The finegrain:: custom ops: equal to the reference, fake kernels, survive torch.export."""
import torch

from finegrain.formats import QuantFormat, pack
from finegrain.formats.ops import DEQUANTIZE, DEQUANTIZE_PACKED, QUANTIZE


def test_dequantize_packed_equals_reference():
    fmt = QuantFormat(bits=4, granularity="group", group_size=32, symmetric=False)
    w = torch.randn(16, 80)
    q = fmt.quantize(w)
    out = torch.ops.finegrain.dequantize_packed(pack(q.codes, 4, False), q.scale.half(),
                                                pack(q.zero.to(torch.uint8), 4, False), fmt.tag, [16, 80], torch.float32)
    assert torch.equal(out, fmt.dequantize(q))


def test_quantize_dequantize_static_and_dynamic():
    x = torch.randn(2, 7, 64)
    dyn = QuantFormat(bits=8, granularity="token", symmetric=True, scale="fp32", dynamic=True)
    c, s, z = torch.ops.finegrain.quantize(x, dyn.tag)
    assert c.dtype == torch.int8 and s.shape == (2, 7, 1)
    assert torch.equal(torch.ops.finegrain.dequantize(c, s, z, dyn.tag, torch.float32), dyn.fake_quantize(x))
    static = QuantFormat(bits=8, granularity="tensor", symmetric=True, scale="fp32")
    scale = torch.tensor([0.01])
    c, s, z = torch.ops.finegrain.quantize(x, static.tag, scale, torch.zeros(1, dtype=torch.int32))
    assert torch.equal(s, scale) and s.data_ptr() != scale.data_ptr()
    assert c.abs().max() == 127 if x.abs().max() > 1.27 else True


class _Mod(torch.nn.Module):
    def __init__(self):
        super().__init__()
        fmt = QuantFormat(bits=4, granularity="group", group_size=32, symmetric=True)
        q = fmt.quantize(torch.randn(8, 64))
        self.register_buffer("packed", pack(q.codes, 4, True))
        self.register_buffer("scale", q.scale.half())
        self.register_buffer("zero", torch.empty(0, dtype=torch.uint8))
        self.tag = fmt.tag

    def forward(self, x):
        w = torch.ops.finegrain.dequantize_packed(self.packed, self.scale, self.zero, self.tag, [8, 64], torch.float32)
        a = "int8-token-sym-fp32-dyn"
        c, s, z = torch.ops.finegrain.quantize(x, a)
        return torch.nn.functional.linear(torch.ops.finegrain.dequantize(c, s, z, a, torch.float32), w)


def test_custom_ops_survive_export():
    m = _Mod()
    x = torch.randn(3, 64)
    ep = torch.export.export(m, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert DEQUANTIZE_PACKED in targets and QUANTIZE in targets and DEQUANTIZE in targets
    assert torch.equal(ep.module()(x), m(x))
