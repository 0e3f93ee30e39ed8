"""The TVM low-bit linear kernels and the fp32 GEMV against finegrain's reference dequantize +
matmul, for each code width, granularity, ragged groups, static and symbolic row counts."""
import numpy as np
import pytest
import torch

from finegrain.formats import QuantFormat

tvm = pytest.importorskip("tvm")

from finegrain.backends.tvm.kernels.dense import gemv_func  # noqa: E402
from finegrain.backends.tvm.kernels.lowbit import (ROW_BLOCK, compile_linear, pack_weight,  # noqa: E402
                                                   unpack_weight_ref, vector_lanes)

pytestmark = pytest.mark.tvm


TARGET = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}  # AVX2: runs on any x86-64 CI machine with it


def _run(f, *arrays):
    args = [tvm.runtime.tensor(a) for a in arrays]
    f(*args)
    return args[-1].numpy()


def _linear(f, x: torch.Tensor, p: dict, rows: int | None, n: int) -> np.ndarray:
    """The kernel ``f`` on ``x [m, k]`` with the packed weight ``p``; ``rows=None`` (the symbolic-row
    prefill kernel) takes the rows in whole blocks ``[mq, ROW_BLOCK, k]``, zero-padded, as the lowering
    feeds it."""
    m, k = x.shape
    if rows is None:
        mq = -(-m // ROW_BLOCK)
        xb = np.zeros((mq * ROW_BLOCK, k), np.float32)
        xb[:m] = x.numpy()
        return _run(f, xb.reshape(mq, ROW_BLOCK, k), p["w"], p["scale"], p["zs"],
                    np.zeros((mq, ROW_BLOCK, n), np.float32)).reshape(-1, n)[:m]
    return _run(f, x.numpy(), p["w"], p["scale"], p["zs"], np.zeros((m, n), np.float32))


@pytest.mark.parametrize("tag,k,m", [
    ("int4-g128-asym-fp16", 512, 1),
    ("int4-g128-asym-fp16", 512, 16),
    ("int4-g64-sym-fp16", 512, 3),
    ("int4-g128-asym-fp16", 576, 1),  # ragged last group (SmolLM2's K)
    ("int8-channel-sym-fp16", 256, 5),
    ("int8-g128-asym-fp16", 256, 1),
    ("int3-g128-asym-fp16", 256, 2),  # 4-bit container
    ("int3-g64-sym-fp16", 256, 1),
    ("int2-g64-asym-fp16", 256, 1),
    ("int8-tensor-sym-fp16", 96, 2),
    ("int4-g16-sym-e4m3", 256, 1),  # NVINT4: FP8 block scales x a tensor scale
    ("int8-g32-sym-e8m0", 256, 2),  # MXINT8: power-of-two block scales
    ("e2m1-g32-sym-e8m0", 256, 1),  # MXFP4: E2M1 bit patterns decoded in registers
    ("e2m1-g16-sym-e4m3", 256, 3),  # NVFP4: FP8 block scales x a tensor scale
    ("e4m3-channel-sym-fp32", 256, 1),  # FP8: E4M3 bit patterns decoded in registers
    ("e4m3-g32-sym-e8m0", 256, 3),  # MXFP8
    ("e2m3-g32-sym-e8m0", 256, 1),  # MXFP6: FP6 bit patterns in 8-bit containers
    ("e3m2-g32-sym-e8m0", 256, 2),
    ("e5m2-channel-sym-fp32", 256, 1),  # FP8 E5M2
    ("e2m1-channel-sym-fp32", 256, 2),  # FP4 per channel
    ("e4m3-g32x32-sym-fp32", 256, 2),  # FP8 2-D blocks: per-row scales, groups along K
])
def test_lowbit_kernel_matches_the_reference(tag, k, m):
    torch.manual_seed(0)
    n = 128
    fmt = QuantFormat.parse(tag)
    q = fmt.quantize(torch.randn(n, k) * 0.05)
    p = pack_weight(fmt, q)
    dq = fmt.dequantize(q)
    # the packed layout decodes back to the reference weight
    back = unpack_weight_ref(torch.from_numpy(p["w"]), torch.from_numpy(p["scale"]), torch.from_numpy(p["zs"]),
                             p["bits"], k, p["kind"])
    assert torch.allclose(back, dq, atol=1e-6 * dq.abs().max().item() + 1e-7)
    x = torch.randn(m, k)
    ref = (x @ dq.T).numpy()
    for rows in ([1, None] if m == 1 else [m, None]):  # static GEMV/GEMM and the symbolic-row prefill kernel
        f = compile_linear(rows, k, n, p["group_size"], p["bits"], target=TARGET, kind=p["kind"])
        out = _linear(f, x, p, rows, n)
        assert np.abs(out - ref).max() <= 2e-5 * np.abs(ref).max(), (tag, rows)


@pytest.mark.parametrize("tag", ["int8-channel-sym-fp16", "int4-g128-asym-fp16"])
@pytest.mark.parametrize("rows", [1, 5, None])
def test_activations_with_a_large_common_offset_stay_accurate(tag, rows):
    """Activations far from zero mean (mean 4, spread 1: a final norm's output on some models) against
    weights whose outputs nearly cancel, and an all-zero weight row: the kernels sum centered codes, so
    the error stays near that of an fp32 dot product. Summing ``1 + q / 2^b`` and subtracting ``xsum Z``
    afterwards left two large terms that cancel: with 8-bit codes the zero row's output, 0, came out as
    0.5 .. 2.5 against outputs up to 26 (Gemma-2's tied head), 4-bit errors up to 1.6x the bound."""
    torch.manual_seed(0)
    n, k, m = 64, 2048, 5 if rows != 1 else 1
    fmt = QuantFormat.parse(tag)
    weight = torch.randn(n, k) * 0.05
    weight[0] = 0  # a padding token's row of a tied embedding: its groups get scale 1, all codes at the center
    q = fmt.quantize(weight)
    p = pack_weight(fmt, q)
    x = torch.randn(m, k) + 4.0
    ref = (x.double() @ fmt.dequantize(q).double().T).numpy()
    f = compile_linear(rows, k, n, p["group_size"], p["bits"], target=TARGET)
    out = _linear(f, x, p, rows, n)
    fp32 = np.abs((x @ fmt.dequantize(q).T).numpy() - ref).max()  # torch's own fp32 rounding, for scale
    assert np.abs(out - ref).max() <= max(4 * fp32, 1.5e-5 * np.abs(ref).max()), (tag, rows)
    assert not out[:, 0].any(), (tag, rows)  # the zero row: exactly 0 (pack_weight gives its groups S = Z = 0)


def _every_pattern(kind: str, scale: torch.Tensor, n: int = 64, k: int = 256):
    """``(family, format, patterns, q)``: a per-channel ``kind`` weight ``[n, k]`` whose codes cycle
    through every finite bit pattern, with the per-row ``scale`` ``[n, 1]``."""
    from finegrain.formats.base import QTensor
    from finegrain.formats.minifloat import MINIFLOATS

    fam = MINIFLOATS[kind]
    pats = torch.tensor([p for p in range(2 ** fam.bits) if fam.table[p].isfinite()], dtype=torch.uint8)
    codes = pats[torch.arange(n * k) % len(pats)].reshape(n, k)
    q = QTensor(codes, scale, torch.zeros(n, 1, dtype=torch.int32))
    return fam, QuantFormat.parse(f"{kind}-channel-sym-fp32"), pats, q


@pytest.mark.parametrize("kind,finite,subnormal", [("e4m3", 254, 16), ("e5m2", 248, 8), ("e3m2", 64, 8),
                                                    ("e2m3", 64, 16)])
def test_every_fp8_and_fp6_bit_pattern_decodes(kind, finite, subnormal):
    """Every finite FP8 / FP6 pattern (subnormals, both zeros, the largest value) through the packed
    layout and the GEMV (E4M3: 254 patterns, 14 subnormals and +-0)."""
    n, k = 64, 256
    fam, fmt, pats, q = _every_pattern(kind, torch.linspace(0.5, 2.0, n).reshape(n, 1), n, k)
    dq = fmt.dequantize(q)
    small = (fam.table[pats.long()].abs() < 2.0 ** fam.emin).sum()
    assert len(pats) == finite and dq.isfinite().all() and small == subnormal
    p = pack_weight(fmt, q)
    back = unpack_weight_ref(torch.from_numpy(p["w"]), torch.from_numpy(p["scale"]), torch.from_numpy(p["zs"]),
                             p["bits"], k, p["kind"])
    assert torch.equal(back, dq)
    x = torch.randn(1, k)
    f = compile_linear(1, k, n, p["group_size"], p["bits"], target=TARGET, kind=p["kind"])
    out = _run(f, x.numpy(), p["w"], p["scale"], p["zs"], np.zeros((1, n), np.float32))
    ref = (x.double() @ dq.double().T).numpy()
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("kind", ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1"])
def test_minifloat_patterns_decode_exactly_under_flush_to_zero(kind):
    """The kernels read a minifloat pattern as fp16 (``lowbit.minifloat_half``): with x = I the GEMM
    gives every weight back bit for bit, subnormal patterns included, also with the calling thread's
    flush-to-zero / denormals-are-zero mode on (``torch.set_flush_denormal``; N = 64 is one parallel
    task, which the calling thread runs). Subnormal patterns read through fp32 denormals would come
    back 0 here."""
    n, k = 64, 256
    fam, fmt, _, q = _every_pattern(kind, torch.full((n, 1), 2.0 ** -10), n, k)
    dq = fmt.dequantize(q)
    assert (dq.abs() < 2.0 ** (fam.emin - 10)).logical_and(dq != 0).any()  # subnormal patterns are there
    p = pack_weight(fmt, q)
    f = compile_linear(k, k, n, p["group_size"], p["bits"], target=TARGET, kind=p["kind"])
    flushing = torch.set_flush_denormal(True)  # False where the CPU has no such mode
    try:
        assert not flushing or torch.tensor([1e-40]).item() == 0.0
        out = _linear(f, torch.eye(k), p, k, n)
    finally:
        torch.set_flush_denormal(False)
    assert np.array_equal(out, dq.T.numpy()), kind


def test_minifloat_decode_on_a_target_without_f16c():
    """LLVM's generic x86-64 has no F16C: the fp16 -> fp32 conversion becomes a library call that
    TVM's runtime resolves; the result is the same."""
    torch.manual_seed(0)
    fmt = QuantFormat.parse("e4m3-channel-sym-fp32")
    n, k = 64, 256
    q = fmt.quantize(torch.randn(n, k))
    p = pack_weight(fmt, q)
    x = torch.randn(1, k)
    f = compile_linear(1, k, n, p["group_size"], p["bits"], target={"kind": "llvm", "num-cores": 2}, kind="e4m3")
    ref = (x.double() @ fmt.dequantize(q).double().T).numpy()
    assert np.abs(_linear(f, x, p, 1, n) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_ragged_groups_use_a_common_divisor():
    fmt = QuantFormat.parse("int4-g128-asym-fp16")
    p = pack_weight(fmt, fmt.quantize(torch.randn(64, 576)))
    assert p["group_size"] == 64 and p["scale"].shape == (9, 64) and p["w"].shape == (72, 64)


def test_refusals_name_the_problem():
    fmt = QuantFormat.parse("int4-g128-asym-fp16")
    with pytest.raises(ValueError, match="group"):
        compile_linear(1, 100, 64, 100, 4, target=TARGET)
    nf4 = QuantFormat.parse("nf4-g32-sym-fp16")  # a codebook
    with pytest.raises(ValueError, match="not INT2/3/4/8"):
        pack_weight(nf4, nf4.quantize(torch.randn(64, 64)))
    w6 = QuantFormat.parse("int6-g32-asym-fp16")
    with pytest.raises(ValueError, match="not INT2/3/4/8"):
        pack_weight(w6, w6.quantize(torch.randn(8, 64)))
    assert vector_lanes(TARGET) == 8 and vector_lanes({"kind": "llvm", "mcpu": "skylake-avx512"}) == 16
    del fmt


def test_dense_gemv_matches_torch():
    torch.manual_seed(0)
    x, w = torch.randn(1, 96), torch.randn(200, 96)
    f = tvm.compile(tvm.IRModule({"main": gemv_func(96, 200, 8, 2, 64)}), target=tvm.target.Target(TARGET))
    out = _run(f, x.numpy(), w.numpy(), np.zeros((1, 200), np.float32))
    ref = (x @ w.T).numpy()
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    with pytest.raises(ValueError, match="multiple of 8"):
        gemv_func(100, 200, 8)


def test_kernel_builders_build_once_per_distinct_arguments():
    """``kernels.memoized``: the same plain arguments (a layout dict in any key order) give the same
    PrimFunc; other arguments, or -0.0 for 0.0, build again; arguments that are not plain data
    build every time; naming a cached kernel (``with_attrs``) leaves the cached one as it was."""
    from finegrain.backends.tvm.kernels import memoized
    from finegrain.backends.tvm.kernels.attention import attention_func

    calls = []

    @memoized
    def build(n, lay, scale=1.0):
        calls.append(n)
        return object()

    a = build(2, {"bits": 4, "axis": "tokens"})
    assert build(2, {"axis": "tokens", "bits": 4}) is a and len(calls) == 1
    assert build(2, {"axis": "tokens", "bits": 2}) is not a and build(3, {"bits": 4, "axis": "tokens"}) is not a
    assert build(2, {"bits": 4, "axis": "tokens"}, scale=-0.0) is not build(2, {"bits": 4, "axis": "tokens"}, 0.0)
    n = len(calls)
    build(object(), {}), build(object(), {})
    assert len(calls) == n + 2
    f = attention_func(1, 4, 2, 16, 64, 0.25)
    named = f.with_attrs({"global_symbol": "layer0_attention"})
    assert attention_func(1, 4, 2, 16, 64, 0.25) is f and f.attrs["global_symbol"] == "func"
    assert named.attrs["global_symbol"] == "layer0_attention"
    assert attention_func(1, 4, 2, 16, 64, 0.5) is not f
