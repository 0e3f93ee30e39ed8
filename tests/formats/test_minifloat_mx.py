"""Minifloat elements bit for bit against ml_dtypes (and torch's float8), OCP MX E8M0 scale
selection on worked examples, NVFP4 / NVINT4 two-level scales."""
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finegrain.formats import QuantFormat
from finegrain.formats import scales
from finegrain.formats.minifloat import MINIFLOATS

ML = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "e3m2": ml_dtypes.float6_e3m2fn,
      "e2m3": ml_dtypes.float6_e2m3fn, "e2m1": ml_dtypes.float4_e2m1fn}
TORCH = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _ml_bits(v: np.ndarray, name: str) -> np.ndarray:
    return v.astype(ML[name]).view(np.uint8)


def _halfway_points(name: str) -> np.ndarray:
    """Every midpoint between neighbouring finite values: the round-half-to-even cases."""
    vals = np.unique(MINIFLOATS[name].table.numpy())
    vals = vals[np.isfinite(vals)]
    return ((vals[1:] + vals[:-1]) / 2).astype(np.float32)


@pytest.mark.parametrize("name", list(ML))
def test_encoding_is_bit_exact_with_ml_dtypes(name):
    fam = MINIFLOATS[name]
    m = fam.max_value()
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0, m / 4, 20000), rng.uniform(-m, m, 20000), _halfway_points(name),
                        np.float32(2.0) ** np.arange(-12, 10)]).astype(np.float32)
    v = np.clip(v, -m, m)
    got = fam.cast(torch.from_numpy(v)).numpy()
    np.testing.assert_array_equal(got, _ml_bits(v, name))
    if name in TORCH:  # torch's float8 dtypes agree as well
        np.testing.assert_array_equal(torch.from_numpy(v).to(TORCH[name]).view(torch.uint8).numpy(), got)


@pytest.mark.parametrize("name", ["e3m2", "e2m3", "e2m1"])
def test_arithmetic_rounding_is_bit_exact_with_ml_dtypes(name):
    """FP6 / FP4 have no torch dtype: off the CPU (the GPU backend's activations) ``cast`` rounds by
    torch arithmetic (``_round_bits``). Its bits equal ml_dtypes' cast on every finite fp16 value
    (every binade and subnormal step of these elements, many times over), random fp32 values of
    every scale, each midpoint and its two fp32 neighbours, signed zeros and tiny values (negative
    ones round to -0, sign bit set)."""
    fam = MINIFLOATS[name]
    m = fam.max_value()
    rng = np.random.default_rng(1)
    half = np.arange(2 ** 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    mids = _halfway_points(name)
    v = np.concatenate([half[np.isfinite(half)], rng.normal(0, 1, 50000) * np.exp2(rng.integers(-14, 5, 50000)),
                        mids, -mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
                        np.array([0.0, -0.0, 1e-30, -1e-30, m, -m])]).astype(np.float32)
    v = np.clip(v, -m, m)
    got = fam._round_bits(torch.from_numpy(v)).numpy()
    want = _ml_bits(v, name)
    bad = np.nonzero(got != want)[0]
    assert not len(bad), (v[bad[:5]], got[bad[:5]], want[bad[:5]])
    assert got[-3] >> (fam.bits - 1) == 1  # -1e-30 rounds to -0


@pytest.mark.parametrize("name", list(ML))
def test_decode_table_is_ml_dtypes_values(name):
    pats = np.arange(2 ** MINIFLOATS[name].bits, dtype=np.uint8)
    want = pats.view(ML[name]).astype(np.float32)
    got = MINIFLOATS[name].table.numpy()
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[finite], want[finite])


@pytest.mark.parametrize("name", list(ML))
def test_saturates_instead_of_nan(name):
    fam = MINIFLOATS[name]
    m = fam.max_value()
    v = torch.tensor([m * 1.7, -m * 3, 1e30, -1e30])
    dec = fam.table[fam.cast(v).long()]
    assert torch.equal(dec, torch.tensor([m, -m, m, -m]))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["e4m3-g32-sym-e8m0", "e2m1-g32-sym-e8m0", "e2m3-g32-sym-e8m0", "e3m2-g32-sym-e8m0",
                        "int8-g32-sym-e8m0", "e2m1-g16-sym-e4m3", "int4-g16-sym-e4m3", "e4m3-channel-sym-fp32",
                        "e5m2-token-sym-fp32-dyn", "nf4-g64-sym-fp16", "int4-g32-asym-int8", "int3-g16-sym-int8"]),
       st.integers(1, 5), st.integers(1, 70), st.floats(1e-3, 1e3), st.integers(0, 2**31))
def test_roundtrip_is_idempotent_and_bounded(tag, rows, k, mag, seed):
    fmt = QuantFormat.parse(tag)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) * mag
    q = fmt.quantize(x)
    xh = fmt.dequantize(q)
    again = fmt.quantize(xh, q.scale, q.zero)  # the dequantized values are representable
    assert torch.equal(fmt.dequantize(again), xh)
    if fmt.scale == "int8":
        return  # DGQ's channel-scale search minimizes MSE and may clip on purpose: no per-element bound
    # error bound: half the largest element spacing times the scale, plus saturation beyond
    # max_value * scale (MX's floor rule, E4M3 block scales rounded down)
    fam = fmt.family
    tbl = getattr(fam, "table", None)
    if tbl is not None:
        vals = torch.unique(tbl[torch.isfinite(tbl)])
        half_step = (vals[1:] - vals[:-1]).max() / 2
    else:
        half_step = 0.5
    s = fmt._grouped(torch.ones_like(x)) * q.scale.reshape(*fmt._grouped(x).shape[:-1], 1)
    s = fmt._ungrouped(s, x.shape)
    bound = s * half_step + (x.abs() - fam.max_value(fmt) * s).clamp(min=0) + 1e-6 * mag
    assert ((xh - x).abs() <= bound).all()


# ---- OCP MX v1.0 scale selection: X = 2^(floor(log2(amax)) - emax_elem) -------------------------
@pytest.mark.parametrize("tag,amax,scale", [
    ("e2m1-g32-sym-e8m0", 6.0, 1.0),  # emax(E2M1) = 2: 6 = 1.5 * 2^2 fits exactly
    ("e2m1-g32-sym-e8m0", 7.0, 1.0),  # 7 saturates to 6 (the spec's floor, not a ceil)
    ("e2m1-g32-sym-e8m0", 8.0, 2.0),
    ("e2m1-g32-sym-e8m0", 0.75, 0.125),
    ("e4m3-g32-sym-e8m0", 448.0, 1.0),  # emax(E4M3) = 8
    ("e4m3-g32-sym-e8m0", 1.0, 2.0**-8),
    ("e5m2-g32-sym-e8m0", 1.0, 2.0**-15),  # emax(E5M2) = 15
    ("e2m3-g32-sym-e8m0", 3.0, 0.5),  # emax(E2M3) = 2
    ("e3m2-g32-sym-e8m0", 3.0, 2.0**-3),  # emax(E3M2) = 4
    ("int8-g32-sym-e8m0", 1.5, 2.0**-6),  # MXINT8: 1.6 fixed point, code step 2^-6 at X = 1
    ("int8-g32-sym-e8m0", 0.0, 1.0),  # an all-zero block
])
def test_mx_scale_selection(tag, amax, scale):
    fmt = QuantFormat.parse(tag)
    x = torch.zeros(1, 32)
    x[0, 5] = amax
    x[0, 9] = -amax / 3
    q = fmt.quantize(x)
    assert q.scale.item() == scale
    stored = scales.stored_scale(fmt, q)
    assert stored.dtype == torch.uint8  # the E8M0 byte, the same bits as ml_dtypes' float8_e8m0fnu
    assert stored.item() == np.array([scale], np.float32).astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)[0]
    assert torch.equal(scales.load_scale(fmt, stored, None), q.scale)


def test_mx_saturation_and_exactness():
    fmt = QuantFormat.parse("e2m1-g32-sym-e8m0")
    x = torch.tensor([[7.0, 6.0, 3.0, -1.5, 0.5, 0.25] + [0.0] * 26])
    xh = fmt.fake_quantize(x)
    assert xh[0, :6].tolist() == [6.0, 6.0, 3.0, -1.5, 0.5, 0.0]  # 0.25 is a tie between 0 and 0.5: even -> 0


def test_nv_two_level_scales():
    fmt = QuantFormat.parse("e2m1-g16-sym-e4m3")
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 64)
    q = fmt.quantize(x)
    block_amax = x.reshape(8, 4, 16).abs().amax(-1)
    t = (block_amax / 6).max() / 448
    assert torch.allclose(q.scale2, t.reshape(1))
    stored = scales.stored_scale(fmt, q)
    assert stored.dtype == torch.float8_e4m3fn
    want = (block_amax / 6 / t).numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(stored.view(torch.uint8).numpy(), want)  # block scales = E4M3 RNE of s / t
    assert torch.equal(scales.load_scale(fmt, stored, q.scale2), q.scale)
    assert fmt.storage_bits((8, 64)) == 8 * 64 * 4 + 8 * 4 * 8 + 32


def test_nvint4_uses_symmetric_range():
    fmt = QuantFormat.parse("int4-g16-sym-e4m3")
    q = fmt.quantize(torch.randn(64, 64, generator=torch.Generator().manual_seed(1)))
    assert int(q.codes.min()) >= -7 and int(q.codes.max()) <= 7


@pytest.mark.parametrize("tag", ["e4m3-g32-sym-e8m0", "e5m2-channel-sym-fp32", "e2m3-g32-sym-e8m0-dyn",
                                 "e3m2-tensor-sym-bf16", "e2m1-g16-sym-e4m3", "int4-g16-sym-e4m3-dyn",
                                 "int4-g128-asym-int8", "bitmod3-g128-sym-fp16", "nf4-g64-sym-fp16",
                                 "lm2-channel-sym-fp32", "int8-g32-sym-e8m0-clip0.9"])
def test_tags_round_trip(tag):
    fmt = QuantFormat.parse(tag)
    assert fmt.tag == tag and QuantFormat.from_dict(fmt.to_dict()) == fmt


def test_block_scale_types_reject_what_they_cannot_hold():
    with pytest.raises(ValueError, match="scale"):
        QuantFormat.parse("int4-g32-asym-e8m0")
    with pytest.raises(ValueError, match="bits"):
        QuantFormat(kind="e2m1", bits=8)
    with pytest.raises(ValueError, match="symmetric"):
        QuantFormat(kind="e4m3", bits=8, symmetric=False)
