"""BitMoD per-group datatypes, NormalFloat / Lloyd-Max codebooks, dual-grained (DGQ) scales."""
import math

import pytest
import torch

from finegrain.formats import QuantFormat
from finegrain.formats import scales
from finegrain.formats.bitmod import BITMOD
from finegrain.formats.codebook import lloyd_max, normal_float_levels

# QLoRA's NF4 levels as published (bitsandbytes' create_normal_map)
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def _gauss(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_nf4_levels_are_qlora_levels():
    torch.testing.assert_close(normal_float_levels(4), torch.tensor(NF4_PUBLISHED), atol=2e-7, rtol=0)


def test_bitmod_tables_have_one_special_value_each():
    for bits, special in ((4, (5, -5, 16, -16)), (3, (3, -3, 6, -6))):
        t = BITMOD.tables(bits)
        assert t.shape == (4, 2**bits)
        for row, sp in zip(t, special):
            assert len(set(row.tolist())) == 2**bits and sp in row.tolist()  # no redundant zero left


def test_bitmod_picks_the_best_datatype_per_group():
    fmt = QuantFormat.parse("bitmod4-g128-sym-fp16")
    w = _gauss(16, 512) + 0.3 * _gauss(16, 512, seed=1).pow(3)  # skewed groups
    q = fmt.quantize(w)
    err = (fmt.dequantize(q) - w).reshape(16, 4, 128).pow(2).sum(-1)
    for i in range(4):  # forcing datatype i everywhere is never better than the chosen mixture
        forced = fmt.quantize(w, torch.where(q.scale > 0, q.scale, q.scale), torch.full_like(q.zero, i))
        amax = w.reshape(16, 4, 128).abs().amax(-1)
        s = (amax / BITMOD.tables(4)[i].abs().max()).to(torch.float16).float()
        forced = fmt.quantize(w, s, torch.full_like(q.zero, i))
        ferr = (fmt.dequantize(forced) - w).reshape(16, 4, 128).pow(2).sum(-1)
        assert (err <= ferr * (1 + 1e-3) + 1e-9).all()
    assert len(torch.unique(q.zero)) > 1  # groups do choose different datatypes
    assert fmt.storage_bits((16, 512)) == 16 * 512 * 4 + 16 * 4 * (16 + 2)  # the 2-bit id is counted


def test_bitmod_beats_plain_fp4_at_the_same_scale_cost():
    w = _gauss(256, 1024)
    bm = QuantFormat.parse("bitmod4-g128-sym-fp16")
    fp4 = QuantFormat.parse("e2m1-g128-sym-fp16")
    assert (bm.fake_quantize(w) - w).pow(2).mean() < 0.9 * (fp4.fake_quantize(w) - w).pow(2).mean()


def test_lloyd_max_gaussian_reference_point():
    """Lloyd-Max 4-bit on a unit Gaussian is 3.86 dB above D(R) (Max 1960)."""
    w = _gauss(512, 2048)
    fmt = QuantFormat.parse("lm4-tensor-sym-fp32")
    mse = (fmt.fake_quantize(w) - w).pow(2).mean().item()
    rate = fmt.storage_bits(tuple(w.shape)) / w.numel()
    db = 10 * math.log10(mse / (w.pow(2).mean().item() * 2 ** (-2 * rate)))
    assert abs(db - 3.86) < 0.1


def test_lloyd_max_levels_are_centroids():
    v = _gauss(100000)
    lv = lloyd_max(v, 8, iters=200)
    mids = (lv[1:] + lv[:-1]) / 2
    idx = torch.bucketize(v, mids)
    cent = torch.stack([v[idx == i].mean() for i in range(8)])
    torch.testing.assert_close(lv, cent, atol=2e-3, rtol=0)  # fp16-rounded centroids


def test_codebook_is_counted_and_required():
    fmt = QuantFormat.parse("lm4-g128-sym-fp16")
    assert fmt.storage_bits((4, 256)) == 4 * 256 * 4 + 4 * 2 * 16 + 16 * 16
    q = fmt.quantize(_gauss(4, 256))
    with pytest.raises(ValueError, match="codebook"):
        fmt.dequantize(q._replace(codebook=None))


# ---- dual-grained ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", ["int4-g128-asym-int8", "int4-g128-sym-int8", "int3-g64-asym-int8"])
def test_dgq_int8_path_equals_float_reconstruction(tag):
    """S2 * (q - z) fits INT8 (so a kernel dequantizes INT4 -> INT8 and runs an INT8 GEMM), and
    times the channel scale s1 it is exactly the float reconstruction."""
    fmt = QuantFormat.parse(tag)
    w = _gauss(64, 576) * torch.logspace(-1, 1, 64).unsqueeze(1)
    q = fmt.quantize(w)
    s2 = scales.stored_scale(fmt, q)  # uint8 integer group scales
    assert s2.dtype == torch.uint8 and int(s2.min()) >= 1 and int(s2.max()) <= scales.dgq_max_factor(fmt)
    g = fmt._grouped(q.codes.to(torch.int32))
    w8 = (g - q.zero.unsqueeze(-1)) * s2.to(torch.int32).unsqueeze(-1)
    assert int(w8.min()) >= -128 and int(w8.max()) <= 127
    s1 = scales.stored_scale2(fmt, q)
    assert s1.dtype == torch.float16 and s1.shape == (64, 1)
    int8_path = fmt._ungrouped(w8.float() * s1.float().unsqueeze(-1), w.shape)
    assert torch.equal(int8_path, fmt.dequantize(q))


def test_dgq_rounding_cost_is_small():
    """The integer group scales cost little against fp16 group scales (rounding bound s1 / 2 on
    every group scale; the phase-2 search keeps the MSE within 15%)."""
    w = _gauss(256, 1024)
    dgq = QuantFormat.parse("int4-g128-asym-int8")
    ref = QuantFormat.parse("int4-g128-asym-fp16")
    mse = lambda f: (f.fake_quantize(w) - w).pow(2).mean().item()  # noqa: E731
    assert mse(dgq) < 1.15 * mse(ref)
    q = dgq.quantize(w)
    raw = ref.quantize(w).scale
    s1 = q.scale2
    inside = raw / s1 < scales.dgq_max_factor(dgq)  # groups whose scale S2 did not clamp
    assert ((q.scale - raw).abs()[inside] <= s1.expand_as(raw)[inside] / 2 * 1.001 + raw[inside] * 1e-3).all()


def test_dgq_rejects_what_int8_cannot_hold():
    with pytest.raises(ValueError, match="dual-grained"):
        QuantFormat.parse("int8-g128-asym-int8")
