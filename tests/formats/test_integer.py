"""Integer formats against an independent numpy reference; packing; size accounting."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finegrain.formats import QuantFormat, pack, unpack


def numpy_reference(x: np.ndarray, bits: int, group: int, symmetric: bool) -> np.ndarray:
    """Fake-quantize each row of ``x`` in groups of ``group`` (last group may be short)."""
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for g0 in range(0, x.shape[1], group):
            v = x[r, g0:g0 + group].astype(np.float64)
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                s = np.float32(np.float16(np.abs(v).max() / qmax))
                s = s if s > 0 else 1.0
                q = np.clip(np.round(v / s), -qmax - 1, qmax)
                out[r, g0:g0 + group] = q * s
            else:
                qmax = 2**bits - 1
                lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
                s = np.float32(np.float16((hi - lo) / qmax))
                s = s if s > 0 else 1.0
                z = np.clip(np.round(-lo / s), 0, qmax)
                q = np.clip(np.round(v / s) + z, 0, qmax)
                out[r, g0:g0 + group] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,group", [(256, 128), (576, 128), (100, 32)])
def test_matches_numpy_reference(bits, symmetric, k, group):
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(bits * 7 + k))
    fmt = QuantFormat(bits=bits, granularity="group", group_size=group, symmetric=symmetric)
    ours = fmt.fake_quantize(x).numpy()
    ref = numpy_reference(x.numpy(), bits, group, symmetric)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_ragged_last_group_has_its_own_scale():
    x = torch.randn(4, 576)
    x[:, 512:] *= 0.01  # the short last group (64 wide) is tiny: its scale must be too
    fmt = QuantFormat(bits=4, granularity="group", group_size=128, symmetric=True)
    q = fmt.quantize(x)
    assert q.scale.shape == (4, 5)
    expected = (x[:, 512:].abs().amax(-1) / 7).half().float()
    torch.testing.assert_close(q.scale[:, 4], expected)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), rows=st.integers(1, 4), k=st.integers(1, 300),
       group=st.sampled_from([16, 32, 64, 128]), seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-2, 1e3))
def test_error_bound(bits, symmetric, rows, k, group, seed, scale):
    """Every element is within half a step (plus fp16 scale rounding) of its group's grid."""
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) * scale
    fmt = QuantFormat(bits=bits, granularity="group", group_size=group, symmetric=symmetric)
    q = fmt.quantize(x)
    err = (fmt.dequantize(q) - x).abs()
    step = torch.repeat_interleave(q.scale, group, dim=-1)[:, :k]
    # fp16 rounding of the scale moves the grid's end by up to 2^-11 relative per level
    slack = 2.0**-10 * x.abs().amax(-1, keepdim=True) + 1e-6
    assert bool((err <= step / 2 + slack).all())


@pytest.mark.parametrize("gran", ["tensor", "channel", "token"])
def test_whole_row_granularities(gran):
    x = torch.randn(3, 5, 64)
    fmt = QuantFormat(bits=8, granularity=gran, symmetric=True, scale="fp32", dynamic=gran == "token")
    q = fmt.quantize(x)
    assert q.scale.shape == ((1,) if gran == "tensor" else (3, 5, 1))
    ref_absmax = x.abs().amax() if gran == "tensor" else x.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(q.scale.reshape(-1), (ref_absmax / 127).reshape(-1))
    assert (fmt.dequantize(q) - x).abs().max() <= ref_absmax.max() / 127 / 2 + 1e-6


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), signed=st.booleans(), rows=st.integers(1, 3), k=st.integers(1, 70),
       seed=st.integers(0, 2**31 - 1))
def test_pack_roundtrip(bits, signed, rows, k, seed):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    codes = torch.randint(lo, hi, (rows, k), generator=torch.Generator().manual_seed(seed))
    codes = codes.to(torch.int8 if signed else torch.uint8)
    packed = pack(codes, bits, signed)
    assert packed.shape == (rows, math.ceil(k * bits / 8))
    assert torch.equal(unpack(packed, bits, signed, k), codes)


def test_int4_nibble_order_matches_matmulnbits():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert pack(codes, 4, False).tolist() == [[0x21, 0x43]]  # low nibble = even element


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[8]], dtype=torch.int8), 4, True)


def test_bits_per_element_counts_scales_and_zeros():
    assert QuantFormat(bits=4, granularity="group", group_size=128, symmetric=False).bits_per_element() == 4 + 20 / 128
    assert QuantFormat(bits=4, granularity="group", group_size=64, symmetric=True).bits_per_element() == 4 + 16 / 64
    # ragged: 576 = 4*128 + 64 -> 5 groups per row
    fmt = QuantFormat(bits=4, granularity="group", group_size=128, symmetric=False)
    assert fmt.storage_bits((10, 576)) == 10 * 576 * 4 + 10 * 5 * 20
    dyn = QuantFormat(bits=8, granularity="token", symmetric=True, scale="fp32", dynamic=True)
    assert dyn.bits_per_element() == 8  # run-time scales are not stored


@pytest.mark.parametrize("kwargs,field", [
    (dict(bits=9), "bits"), (dict(bits=1), "bits"), (dict(granularity="group"), "group_size"),
    (dict(granularity="channel", group_size=64), "group_size"), (dict(kind="fp"), "kind"),
    (dict(scale="fp8"), "scale"), (dict(granularity="channel", dynamic=True), "dynamic"),
    (dict(granularity="rows"), "granularity"), (dict(clip=0.0), "clip"), (dict(clip=1.5), "clip"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantFormat(**kwargs)


@pytest.mark.parametrize("fmt", [
    QuantFormat(bits=4, granularity="group", group_size=128, symmetric=False),
    QuantFormat(bits=8, granularity="token", symmetric=True, scale="fp32", dynamic=True),
    QuantFormat(bits=3, granularity="channel", symmetric=True, scale="bf16"),
    QuantFormat(bits=4, granularity="token", symmetric=True, scale="fp32", dynamic=True, clip=0.9),
])
def test_tag_and_dict_roundtrip(fmt):
    assert QuantFormat.parse(fmt.tag) == fmt
    assert QuantFormat.from_dict(fmt.to_dict()) == fmt


def test_parse_rejects_garbage():
    with pytest.raises(ValueError, match="malformed"):
        QuantFormat.parse("int4-g128")


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_ratio_shrinks_the_range_and_saturates(symmetric):
    x = torch.tensor([[-3.0, -1.0, 0.25, 0.5, 4.0]])
    full = QuantFormat(bits=4, granularity="token", symmetric=symmetric, scale="fp32", dynamic=True)
    clipped = QuantFormat(bits=4, granularity="token", symmetric=symmetric, scale="fp32", dynamic=True, clip=0.5)
    assert clipped.tag.endswith("-clip0.5")
    qf, qc = full.quantize(x), clipped.quantize(x)
    assert torch.allclose(qc.scale, qf.scale * 0.5, rtol=1e-6)
    y = clipped.fake_quantize(x)
    step = float(qc.scale)
    assert float(y.max()) <= 2.0 + step + 1e-5 and float(y.min()) >= -2.0 - step - 1e-5  # 4.0, -3.0 saturate
    assert float((y[0, 2:4] - x[0, 2:4]).abs().max()) <= step / 2 + 1e-6  # small values: finer steps
