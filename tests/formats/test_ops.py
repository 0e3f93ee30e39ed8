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


ACTIVATIONS = ["int8-token-sym-fp32-dyn", "int4-g64-sym-fp32-dyn", "int8-token-asym-fp16-dyn", "int8-tensor-sym-fp32",
               "int8-g32-sym-e8m0-dyn", "e4m3-g32-sym-e8m0-dyn", "e2m3-g32-sym-e8m0-dyn", "e3m2-g32-sym-e8m0-dyn",
               "e2m1-g32-sym-e8m0-dyn", "e2m1-g16-sym-e4m3-dyn", "int4-g16-sym-e4m3-dyn", "e4m3-token-sym-fp32-dyn",
               "e4m3-g128-sym-fp32-dyn"]


def test_activation_quantizers_run_on_their_inputs_device():
    """The GPU backend runs the activation ``quantize`` / ``dequantize`` reference ops on the device
    (MX / NV blocks, asymmetric, static: what its code-dot kernels do not take), not on host copies.
    With torch's default device set to ``meta``, a tensor they made without naming their input's
    device would be a meta tensor and mixing it with these CPU inputs raises: every activation format
    of the presets gives the same codes, parameters and values as with the default left alone; and on
    ``meta`` inputs (no data: FP6 / FP4 take the arithmetic rounding there, and a Python branch on a
    tensor's value, a host sync on a GPU, raises) every output stays on ``meta``."""
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0)) * 3

    from finegrain.formats.base import QTensor

    def run(tag, x):  # what the ops run (the functions: the dispatcher's op would not see the default device)
        f = QuantFormat.parse(tag)
        static = () if f.dynamic else (torch.full((1,), 0.05, device=x.device), torch.zeros(1, dtype=torch.int32,
                                                                                            device=x.device))
        q = f.quantize(x, *static)
        return q.codes, q.scale, q.zero, f.dequantize(QTensor(q.codes, q.scale, q.zero), torch.float32)

    want = [run(tag, x) for tag in ACTIVATIONS]
    torch.set_default_device("meta")
    try:
        got = [run(tag, x) for tag in ACTIVATIONS]
    finally:
        torch.set_default_device(None)
    for tag, g, w in zip(ACTIVATIONS, got, want):
        assert all(a.device.type == "cpu" and torch.equal(a, b) for a, b in zip(g, w)), tag
    for tag in ACTIVATIONS:
        out = run(tag, x.to("meta"))
        assert all(t.device.type == "meta" for t in out) and out[-1].shape == x.shape, tag
