"""Packed KV-cache storage in the reference backend (backends/kv_packed.py): the session carries
bit-packed codes and stored scales between steps, the logits are bit-identical to the fp32-stored
cache, the bytes carried are exactly what the compile report counts (or counted independently for
KIVI's windowed caches), and what is not quantized stays fp32."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import finegrain
from finegrain.backends.kv_packed import PackedKV, WindowedKV, ZipKV, kv_packed_append, kv_windowed_append
from finegrain.errors import InputError
from finegrain.formats import QuantFormat
from finegrain.formats.ops import quantize
from tests.test_kv_cache import _family

IDS = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
X = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def llama():
    return _family("llama")  # 2 layers, 2 K / V heads, head dim 16


def _recipe(key, value, rotate=False, **extra):
    return {"name": "kv", "rules": [], "kv_key": key, "kv_value": value, "kv_rotate": rotate, **extra}


def _decode(session, x, prefill=5):
    logits, state = session.prefill(x[:, :prefill])
    out = [logits]
    for t in range(prefill, x.shape[1]):
        logits, state = session.step(state, x[:, t:t + 1])
        out.append(logits)
    return torch.cat(out, dim=1), state


@pytest.mark.parametrize("fmt,rotate", [("int8-token-sym-fp32-dyn", False), ("int4-g16-asym-fp16-dyn", True),
                                        ("int2-g8-asym-fp16-dyn", False), ("int3-g16-sym-fp16-dyn", True)])
def test_packed_cache_gives_the_float_caches_logits_in_the_reported_bytes(llama, fmt, rotate):
    cm = finegrain.compile(llama, (IDS,), recipe=_recipe(fmt, fmt, rotate), progress=False, kv_cache=True)
    packed, flt = cm.session(), cm.session(kv_storage="float")
    assert sorted(packed.kv_packed) == [0, 1, 2, 3] and packed.kv_float == [] and flt.kv_packed == {}
    a, sa = _decode(packed, X)
    b, sb = _decode(flt, X)
    assert torch.equal(a, b)  # storing the codes changes nothing attention reads
    assert all(isinstance(p, PackedKV) for p in sa["past"]) and all(isinstance(p, torch.Tensor) for p in sb["past"])
    assert all(torch.equal(p.dequantize(), f) for p, f in zip(sa["past"], sb["past"]))
    stored = sum(p.nbytes for p in sa["past"])
    assert stored == cm.kv["quantization"]["bytes_per_token"] * X.shape[1]
    assert sum(f.numel() * f.element_size() for f in sb["past"]) == cm.kv["quantization"]["fp32_bytes_per_token"] * 24
    f = QuantFormat.parse(fmt)
    assert sa["past"][0].codes.dtype == torch.uint8 and sa["past"][0].codes.shape[-1] == 16 * f.bits // 8
    assert sa["past"][0].scale.dtype == (torch.float16 if f.scale == "fp16" else torch.float32)


def test_mixed_layers_save_load_and_refusals(llama, tmp_path):
    # layer 0 keys in float (KVTuner's per-layer pairs): that present is not quantized, so it stays fp32
    r = _recipe("int4-g16-asym-fp16-dyn", "int2-g16-asym-fp16-dyn",
                kv_layers=[[0, None, "int4-g16-asym-fp16-dyn"]])
    cm = finegrain.compile(llama, (IDS,), recipe=r, progress=False, kv_cache=True)
    cm.save(tmp_path / "art")
    back = finegrain.load(tmp_path / "art")
    s = back.session()
    assert s.kv_packed == {1: "int4-g16-asym-fp16-dyn", 2: "int4-g16-asym-fp16-dyn", 3: "int2-g16-asym-fp16-dyn"}
    a, state = _decode(s, X)
    assert isinstance(state["past"][0], torch.Tensor) and torch.equal(a, _decode(back.session(kv_storage="float"), X)[0])
    with pytest.raises(InputError, match="past_key_1|past.*packed.*PackedKV"):
        s.step({"past": [p.dequantize() if isinstance(p, PackedKV) else p for p in state["past"]], "pos": 24},
               X[:, :1])
    with pytest.raises(InputError, match="kv_storage must be"):
        cm.session(kv_storage="int4")
    with pytest.raises(InputError, match="kv_storage"):
        cm.session(threads=2)


def _windowed_equals_float(cm, kinds=(WindowedKV, WindowedKV)):
    """Decodes 40 tokens (prefills of 5 and 17) with the packed and the fp32-stored cache: every present
    packed (keys, values: as ``kinds``), the same logits and caches bit for bit; the packed session's last
    state."""
    x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    packed, flt = cm.session(), cm.session(kv_storage="float")
    assert len(packed.kv_packed) == 4 and packed.kv_float == []
    for prefill in (5, 17):
        a, sa = _decode(packed, x, prefill)
        b, sb = _decode(flt, x, prefill)
        assert torch.equal(a, b)
        assert all(isinstance(p, kinds[i % 2]) and torch.equal(p.dequantize(), f)
                   for i, (p, f) in enumerate(zip(sa["past"], sb["past"])))
    return sa


@pytest.mark.parametrize("axis,window,sinks,pre_rope,rotate", [("tokens", 4, 1, True, False), ("tokens", 0, 2, True, True),
                                                              ("head_dim", 3, 1, True, True), ("tokens", 5, 0, False, False)])
def test_windowed_kivi_cache_is_packed_with_its_float_window(llama, axis, window, sinks, pre_rope, rotate):
    r = _recipe("int2-g8-asym-fp16-dyn", "int4-g16-asym-fp16-dyn", rotate, kv_key_axis=axis, kv_window=window,
                kv_sinks=sinks, kv_pre_rope=pre_rope)
    cm = finegrain.compile(llama, (IDS,), recipe=r, progress=False, kv_cache=True)
    sa = _windowed_equals_float(cm)

    def per_head(n_quantized, code_bytes, param_bytes):  # fp32 tokens + quantized tokens' codes + parameters
        return (40 - n_quantized) * 16 * 4 + n_quantized * code_bytes + param_bytes
    n_k = (40 - window - sinks) // 8 * 8 if axis == "tokens" else 40 - window - sinks
    k = per_head(n_k, 4, n_k // 8 * 16 * (2 + 2 / 8) if axis == "tokens"  # per channel
                 else n_k * (2 * 2 + 1))  # per token: two groups of 8, their 2-bit zeros in one byte
    v = per_head(40 - window - sinks, 8, (40 - window - sinks) * (2 + 1))  # values: one group of 16 per token
    assert sum(p.nbytes for p in sa["past"]) == 2 * 2 * (k + v)  # layers x heads


def test_kv_append_and_its_packed_cache_agree_bit_for_bit_whatever_the_chunking():
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    x = torch.randn(1, 2, 45, 16, generator=torch.Generator().manual_seed(0))
    for axis, fmt, window, sinks, rope, rotated in [("tokens", "int2-g8-asym-fp16-dyn", 6, 1, inv_freq, True),
                                                     ("head_dim", "int3-g8-sym-fp16-dyn", 0, 3, inv_freq, False),
                                                     ("tokens", "int4-g4-sym-e8m0-dyn", 9, 0, None, False)]:
        for cuts in ([45], [1] * 45, [7, 1, 1, 20, 16]):
            p = WindowedKV.empty({"fmt": fmt, "axis": axis, "window": window, "sinks": sinks}, 1, 2, 16)
            f, at = x[:, :, :0], 0
            for c in cuts:
                f = torch.ops.finegrain.kv_append(f, x[:, :, at:at + c], fmt, axis, window, sinks, rope, rotated)
                p = kv_windowed_append(p, x[:, :, at:at + c], rope, rotated)
                at += c
                assert torch.equal(p.dequantize(), f), (axis, cuts, at)


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 7), min_size=1, max_size=5),
       fmt=st.sampled_from(["int4-g8-asym-fp16-dyn", "int2-token-asym-fp32-dyn", "int3-g8-sym-e8m0-dyn",
                            "int8-g16-sym-fp16-dyn"]))
def test_appending_in_chunks_stores_the_format_values(cuts, fmt):
    x = torch.randn(2, 3, sum(cuts), 16, generator=torch.Generator().manual_seed(len(cuts)))
    p, at = PackedKV.empty(fmt, 2, 3, 16), 0
    for c in cuts:
        p = kv_packed_append(p, *quantize(x[:, :, at:at + c], fmt), fmt)
        at += c
    assert p.shape == x.shape
    assert torch.equal(p.dequantize(), QuantFormat.parse(fmt).fake_quantize(x))
    with pytest.raises(TypeError, match="expected a PackedKV in int4-g8-asym-fp16-dyn"):
        kv_packed_append(x, *quantize(x, "int4-g8-asym-fp16-dyn"), "int4-g8-asym-fp16-dyn")


@pytest.mark.parametrize("per_channel", [False, True])
def test_zipcache_cache_is_packed_with_a_salient_bit_per_token(llama, per_channel):
    keys = (("int4-g8-asym-fp16-dyn", "int2-g8-asym-fp16-dyn") if per_channel
            else ("int4-token-asym-fp16-dyn", "int2-token-asym-fp16-dyn"))
    r = _recipe(keys[0], "int4-g16-asym-fp16-dyn", not per_channel, kv_pre_rope=True, kv_sinks=1,
                kv_key_axis="tokens" if per_channel else "head_dim", kv_zip_key=keys[1],
                kv_zip_value="int2-g8-asym-fp16-dyn", kv_zip_block=8, kv_zip_ratio=0.25, kv_zip_probes=0.3)
    cm = finegrain.compile(llama, (IDS,), recipe=r, progress=False, kv_cache=True)
    x = torch.randint(0, 256, (1, 41), generator=torch.Generator().manual_seed(3))
    packed, flt = cm.session(), cm.session(kv_storage="float")
    assert len(packed.kv_packed) == 4 and packed.kv_float == []
    for prefill in (5, 17, 41):
        a, sa = _decode(packed, x, prefill)
        b, sb = _decode(flt, x, prefill)
        assert torch.equal(a, b)  # the saliency reads the packed key past's fp32 read: the same ranking
        assert all(isinstance(p, ZipKV) and torch.equal(p.dequantize(), f) for p, f in zip(sa["past"], sb["past"]))
    # 41 tokens: 1 sink + 5 released blocks of 8 (10 salient tokens: round(0.25 * 40) over one write, or 2 per
    # block when decoded one token at a time) + 0 waiting; count one head's bytes by hand for the values
    v = sa["past"][1]
    salient = int(v._salient().sum()) // 2  # per head (2 K / V heads)
    per_token = {"hi": 8 + 2 + 1,  # int4 g16: codes, one fp16 scale, a 4-bit zero in a byte
                 "lo": 4 + 2 * 2 + 1}  # int2 g8: codes, two fp16 scales, two 2-bit zeros in a byte
    want = 16 * 4 + salient * per_token["hi"] + (40 - salient) * per_token["lo"] + 5 * 1  # sink, codes, flags
    assert v.nbytes == 2 * want and salient == 10


@pytest.mark.parametrize("rotate", [False, True])
def test_rotatekv_grouped_head_keys_are_packed_in_their_rotated_space(llama, rotate):
    """RotateKV's grouped-head keys (pre-RoPE, the channels of both heads reordered by calibration RMS,
    one Hadamard over the group's 2 x 16 channels) are stored as the codes of that space, ``[B, H / 2, n,
    32]``, and read back through the inverse rotation: the logits and every cache equal the fp32-stored
    ones, in the bytes counted by hand (until 2026-12-06 these keys stayed fp32)."""
    r = _recipe("int2-g8-asym-fp16-dyn", "int4-g8-asym-fp16-dyn", rotate, kv_pre_rope=True, kv_head_group=2,
                kv_reorder=True, kv_window=3, kv_sinks=1)
    cm = finegrain.compile(llama, (IDS,), recipe=r, progress=False, kv_cache=True, calibration=[(IDS,)])
    sa = _windowed_equals_float(cm)
    keys = sa["past"][0]
    assert keys.grouped and keys.perm is not None and keys.codes.shape == (1, 1, 36, 32 * 2 // 8)
    n = 40 - 3 - 1  # quantized tokens
    # per token and group of 2 heads: 2-bit codes of 32 channels, 4 fp16 scales, 4 2-bit zero points in a byte
    assert keys.nbytes == 2 * (4 * 16 * 4) + n * (8 + 4 * 2 + 1)  # + 1 sink and 3 window tokens fp32 per head


def test_klt_coded_keys_are_packed_per_width(llama):
    """Keys coded in their calibrated Karhunen-Loeve basis (``kv_key_klt``) are stored as one record per
    component width (codes bit-packed at that width, an fp16 scale and a zero point per component and
    group of tokens; dropped components nothing): the logits and the caches equal the fp32-stored ones,
    in the bytes counted by hand from the widths (until 2026-12-08 these keys stayed fp32)."""
    from finegrain.backends.kv_packed import KltKV

    r = _recipe("int2-g8-asym-fp16-dyn", "int4-g8-asym-fp16-dyn", True, kv_pre_rope=True, kv_key_axis="tokens",
                kv_key_klt=True, kv_window=3, kv_sinks=1)
    calib = [(torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(s)),) for s in (4, 5)]
    cm = finegrain.compile(llama, (IDS,), recipe=r, progress=False, kv_cache=True, calibration=calib)
    keys = _windowed_equals_float(cm, (KltKV, WindowedKV))["past"][0]
    assert isinstance(keys, KltKV) and keys.coded == (40 - 3 - 1) // 8 * 8
    widths = cm.gm.get_buffer("kv_klt.0.widths").flatten().tolist()
    n, groups = keys.coded, keys.coded // 8
    coded = sum(n * -(-widths.count(w) * w // 8) + groups * (2 * widths.count(w) + -(-widths.count(w) * w // 8))
                for w in set(widths) - {0})  # codes and zeros packed per width over both heads; fp16 scales
    assert keys.nbytes == (40 - n) * 2 * 16 * 4 + coded  # + the sink, window and waiting tokens fp32
