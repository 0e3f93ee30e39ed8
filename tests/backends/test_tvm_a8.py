"""The integer-dot kernel (INT2-4 weights x INT8 activation codes, vpmaddubsw / vpmaddwd, INT32
partial sums) against finegrain's reference: dequantized weight times dequantized activation."""
import numpy as np
import pytest
import torch

from finegrain.formats import QuantFormat

tvm = pytest.importorskip("tvm")

from finegrain.backends.tvm.kernels import a8  # noqa: E402

pytestmark = pytest.mark.tvm


TARGET = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}  # AVX2


def _run(f, m, rows, xq, xs, xsc, p):
    """``f`` on rows laid out as the lowering feeds it: ``[mq, R, ...]``, zero-padded."""
    rb = 1 if rows == 1 else a8.ROW_BLOCK
    mq = -(-m // rb)
    n = p["w"].shape[1]

    def pad(a):
        return a8.numpy_rows(a, mq * rb).reshape(mq, rb, *a.shape[1:])

    args = [tvm.runtime.tensor(a) for a in (pad(xq), pad(xs), pad(xsc), p["w"], p["ga"], p["gb"], p["cs"],
                                             np.zeros((mq, rb, n), np.float32))]
    f(*args)
    return args[-1].numpy().reshape(-1, n)[:m]


@pytest.mark.parametrize("tag,k,m,epilogue", [
    ("int4-g128-asym-int8", 512, 1, "int"),  # DGQ: integer group scales, INT32 across groups
    ("int4-g128-asym-int8", 576, 6, "int"),  # ragged last group (SmolLM2's K): kernel groups of 64
    ("int4-g128-sym-int8", 256, 1, "int"),
    ("int4-g128-asym-fp16", 512, 9, "float"),  # w4a8-g128
    ("int4-g64-sym-fp16", 256, 1, "float"),
    ("int3-g128-asym-fp16", 256, 2, "float"),
    ("int2-g64-asym-fp16", 256, 1, "float"),
    ("int4-channel-sym-fp16", 256, 3, "float"),
    ("int4-g16-sym-e4m3", 256, 1, "float"),  # NVINT4 weights: effective block scales
])
def test_int8_dot_kernel_matches_the_reference(tag, k, m, epilogue):
    torch.manual_seed(0)
    n = 64
    fmt = QuantFormat.parse(tag)
    q = fmt.quantize(torch.randn(n, k) * 0.05)
    p = a8.pack_weight(fmt, q)
    assert p["epilogue"] == epilogue and p["w"].shape == (k // 8, n, 4) and p["w"].dtype == np.uint8
    dq = fmt.dequantize(q)
    back = a8.unpack_weight_ref(*(torch.from_numpy(p[s]) for s in ("w", "ga", "gb", "cs")))
    assert torch.allclose(back, dq, atol=1e-6 * dq.abs().max().item())
    x = torch.randn(m, k)
    act = QuantFormat.parse("int8-token-sym-fp32-dyn")
    s = x.abs().amax(-1, keepdim=True) / 127
    xq, xs = a8.quantize_rows(x, s, p["group_size"], -128, 127)
    assert torch.equal(xq.float() * s, act.dequantize(act.quantize(x)))  # the codes the reference dequantizes
    ref = ((xq.float() * s) @ dq.T).numpy()
    for rows in ([1, None] if m == 1 else [None]):
        f = a8.compile_linear(rows, k, n, p["group_size"], epilogue, target=TARGET)
        out = _run(f, m, rows, xq.numpy(), xs.numpy(), s.numpy()[:, 0], p)
        assert np.abs(out - ref).max() <= 2e-6 * np.abs(ref).max(), (tag, rows)


def test_extreme_codes_do_not_saturate_the_int16_sums():
    """Weight codes 15 and activation codes -128 everywhere: every int16 lane reaches -30720 before
    widening (four k-blocks x two vpmaddubsw), the most the kernel ever sums in 16 bits."""
    k, n, gs = 256, 16, 128
    p = {"w": np.full((k // 8, n, 4), 0xFF, np.uint8), "ga": np.ones((k // gs, n), np.int32),
         "gb": np.zeros((k // gs, n), np.int32), "cs": np.ones(n, np.float32)}
    xq = np.full((1, k), -128, np.int8)
    xs = xq.astype(np.int32).reshape(1, -1, gs).sum(-1).astype(np.int32)
    for rows in (1, None):
        f = a8.compile_linear(rows, k, n, gs, "int", target=TARGET)
        out = _run(f, 1, rows, xq, xs, np.ones(1, np.float32), p)
        assert np.all(out == 15 * -128 * k)


def test_dgq_integer_epilogue_is_exact():
    """The INT32 result times the channel scale is exactly ``sum_k xq S2 (q - z)`` (integers)."""
    torch.manual_seed(1)
    k, n = 1024, 32
    fmt = QuantFormat.parse("int4-g128-asym-int8")
    q = fmt.quantize(torch.randn(n, k))
    p = a8.pack_weight(fmt, q)
    p["cs"] = np.ones(n, np.float32)  # leave the INT32 accumulator unscaled
    xq = torch.randint(-128, 128, (1, k), dtype=torch.int8)
    xs = xq.to(torch.int32).reshape(1, -1, 128).sum(-1).to(torch.int32)
    s2 = torch.from_numpy(p["ga"]).repeat_interleave(128, 0).T.long()  # [N, K]
    z = torch.from_numpy(p["gb"]).repeat_interleave(128, 0).T.long() // s2
    exact = ((q.codes.long() - z) * s2) @ xq[0].long()
    assert (((q.codes.long() - z) * s2).abs() <= 127).all()  # the INT4 -> INT8 weight fits INT8 (DGQ's bound)
    f = a8.compile_linear(1, k, n, 128, "int", target=TARGET)
    out = _run(f, 1, 1, xq.numpy(), xs.numpy(), np.ones(1, np.float32), p)
    assert np.array_equal(out[0].astype(np.int64), exact.numpy())


def test_refusals():
    with pytest.raises(ValueError, match="group % 8"):
        a8.linear_func(1, 100, 64, 100)
    with pytest.raises(ValueError, match="N % 8"):
        a8.linear_func(None, 128, 60, 128)
    w8 = QuantFormat.parse("int8-channel-sym-fp16")
    with pytest.raises(ValueError, match="not INT2-4"):
        a8.pack_weight(w8, w8.quantize(torch.randn(8, 64)))
    w4 = QuantFormat.parse("int4-g128-asym-fp16")
    with pytest.raises(ValueError, match="multiples of 8"):
        a8.pack_weight(w4, w4.quantize(torch.randn(8, 100)))
    assert not a8.act_ok(QuantFormat.parse("int8-token-asym-fp32-dyn"))  # a zero point: not plain INT8 codes
    assert a8.act_ok(QuantFormat.parse("int8-tensor-sym-fp32")) and a8.act_ok(QuantFormat.parse("int4-token-sym-fp32-dyn"))
    assert a8.has_avx2(TARGET) and not a8.has_avx2({"kind": "llvm", "mcpu": "x86-64"})
    with pytest.raises(ValueError, match="no AVX2"):
        a8.compile_linear(1, 128, 64, 128, target={"kind": "llvm", "mcpu": "x86-64"})
