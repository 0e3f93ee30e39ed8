"""ZipCache (recipe.kv_zip_*): the normalized attention score recomputed by hand, the salient
fraction of each released block quantized in the high format and the rest in the low one, keys
channel-separable token-wise, one saliency op per layer in the graph, bytes counted, the cache
path and the full forward both run, and the recipe mistakes named."""
import dataclasses
import math

import pytest
import torch

import finegrain
from finegrain.compiler.ops import KV_APPEND, KV_SALIENCY, probe_queries
from finegrain.backends import registry
from finegrain.errors import RecipeError
from finegrain.formats import QuantFormat
from tests.backends.test_kv_packed import IDS, _decode, _recipe
from tests.test_kv_cache import _family, _rel

HI = ("int4-token-asym-fp16-dyn", "int4-g16-asym-fp16-dyn")
LO = ("int2-token-asym-fp16-dyn", "int2-g16-asym-fp16-dyn")


@pytest.fixture(scope="module")
def llama():
    return _family("llama")


def test_probe_queries_take_the_newest_and_spread_the_rest():
    assert probe_queries(1, 0.1).tolist() == [0]
    p = probe_queries(100, 0.1)
    assert p.tolist() == [0, 19, 38, 57, 76, 95, 96, 97, 98, 99]  # 5 newest, 5 at every 19th of the other 95
    assert probe_queries(7, 1.0).tolist() == list(range(7))
    for s in range(1, 300):  # distinct, ascending, the newest always among them, ceil(0.1 s) of them
        p = probe_queries(s, 0.1).tolist()
        assert p == sorted(set(p)) and p[-1] == s - 1 and len(p) == max(1, math.ceil(0.1 * s)) and p[0] >= 0


def test_saliency_is_attention_summed_over_the_queries_that_see_a_token_divided_by_their_number():
    g = torch.Generator().manual_seed(0)
    q, past, new = torch.randn(1, 4, 5, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 5, 8,
                                                                                                            generator=g)
    got = torch.ops.finegrain.kv_saliency(q, past, new, 1.0, 0.3)
    k = torch.cat([past, new], 2)
    want = torch.zeros(1, 2, 8)
    for h in range(4):
        kv = h // 2  # two query heads per K / V head
        for i in range(5):  # query i sits at position 3 + i and sees keys 0 .. 3 + i
            att = torch.softmax(q[0, h, i] @ k[0, kv, :4 + i].T * 0.3, -1)
            want[0, kv, :4 + i] += att
    seen_by = torch.tensor([5, 5, 5, 5, 4, 3, 2, 1]) * 2
    assert torch.allclose(got, want / seen_by, atol=1e-6)


def test_each_block_keeps_its_most_salient_tokens_in_the_high_format():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 20, 16, generator=g) * torch.linspace(0.2, 5, 16)  # channels of different ranges
    score = torch.rand(1, 2, 20, generator=g)
    out = torch.ops.finegrain.kv_append(x[:, :, :0], x, HI[0], "head_dim", 0, 0, None, False, score, LO[0], 0.25, 8, True)
    assert torch.equal(out[:, :, 16:], x[:, :, 16:])  # 4 tokens wait for their block of 8 in float
    hi, lo = QuantFormat.parse(HI[0]), QuantFormat.parse(LO[0])
    for h in range(2):
        top = set(score[0, h, :16].topk(4).indices.tolist())  # round(0.25 * 16) salient tokens of the write
        for t in range(16):
            blk = x[0, h, t // 8 * 8:t // 8 * 8 + 8]
            c = blk.abs().amax(dim=0).sqrt().half().float()  # the channel normalizer of the token's block
            want = (hi if t in top else lo).fake_quantize(x[0, h, t] / c) * c
            assert torch.equal(out[0, h, t], want), (h, t)
    # the past is passed through: a later write re-quantizes nothing
    more = torch.ops.finegrain.kv_append(out, x[:, :, :4], HI[0], "head_dim", 0, 0, None, False,
                                         torch.rand(1, 2, 24, generator=g), LO[0], 0.25, 8, True)
    assert torch.equal(more[:, :, :16], out[:, :, :16]) and torch.equal(more[:, :, 16:24], more[:, :, 16:24])


def test_zipcache_recipe_in_the_graph(llama, tmp_path):
    x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = llama(x).logits
    errs = {}
    for ratio in (1.0, 0.25, 0.0):
        r = _recipe(*HI, kv_zip_key=LO[0], kv_zip_value=LO[1], kv_zip_block=8, kv_zip_ratio=ratio, kv_zip_probes=1.0)
        cm = finegrain.compile(llama, (IDS,), recipe=r, progress=False, kv_cache=True)
        assert sum(n.target is KV_SALIENCY for n in cm.gm.graph.nodes) == 2  # one per layer, shared by K and V
        assert sum(n.target is KV_APPEND for n in cm.gm.graph.nodes) == 4
        full = cm(x)
        inc, _ = _decode(cm.session(), x, 17)
        errs[ratio] = (_rel(ref, full), _rel(ref, inc))
        assert math.isfinite(errs[ratio][1])
        q = cm.kv["quantization"]
        assert q["zip"]["ratio"] == ratio and q["zip"]["block"] == 8
        per_head_k = ratio * (8 + 2 + 1) + (1 - ratio) * (4 + 2 + 1) + 1 / 8 + 2 * 16 / 8  # codes, scale, zero
        per_head_v = ratio * (8 + 2 + 1) + (1 - ratio) * (4 + 2 + 1) + 1 / 8
        assert q["bytes_per_token"] == pytest.approx(2 * 2 * (per_head_k + per_head_v), abs=0.1)  # layers x heads
    # a quarter of the tokens at 4 bits, chosen by saliency, recovers most of what 2 bits lose
    assert errs[1.0][0] < errs[0.25][0] < 0.25 * errs[0.0][0], errs  # measured 0.050 < 0.072 < 0.363
    cm.save(tmp_path / "zip")
    back = finegrain.load(tmp_path / "zip")
    assert _rel(cm(x), back(x)) == 0
    # the write is a kv_append: refused by name by ONNX Runtime, which does not lower it; TVM does
    assert any(r.what == "kv_append" for r in registry.get("onnx").check(cm))
    assert not [r for r in registry.get("tvm").check(cm) if r.what == "kv_append"]


def test_zipcache_recipe_mistakes_are_named():
    for bad, msg in (({"kv_zip_key": LO[0]}, "kv_zip_key.*needs kv_key"),
                     ({"kv_value": HI[1], "kv_zip_value": LO[1], "kv_value_axis": "tokens"}, "token-wise"),
                     ({"kv_key": HI[0], "kv_zip_key": LO[0], "kv_zip_ratio": 1.5}, "kv_zip_ratio"),
                     ({"kv_key": HI[0], "kv_zip_key": LO[0], "kv_zip_probes": 0}, "kv_zip_probes"),
                     ({"kv_key": HI[0], "kv_zip_key": LO[0], "kv_zip_block": 0}, "kv_zip_block"),
                     ({"kv_key": HI[0], "kv_zip_key": "int2-g16-asym-fp16"}, "kv_zip_key")):
        with pytest.raises(RecipeError, match=msg):
            finegrain.compiler.recipe.get_recipe({"name": "z", "rules": [], **bad})


def test_keys_per_channel_at_ratio_one_or_zero_are_kivi_in_the_high_or_low_format(llama):
    x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    kivi_hi = ("int4-g8-asym-fp16-dyn", "int4-g16-asym-fp16-dyn")
    kivi_lo = ("int2-g8-asym-fp16-dyn", "int2-g16-asym-fp16-dyn")
    for ratio, same in ((1.0, kivi_hi), (0.0, kivi_lo)):
        z = _recipe(*kivi_hi, kv_key_axis="tokens", kv_zip_key=kivi_lo[0], kv_zip_value=kivi_lo[1], kv_zip_block=8,
                    kv_zip_ratio=ratio, kv_zip_probes=1.0)
        zc = finegrain.compile(llama, (IDS,), recipe=z, progress=False, kv_cache=True)
        kc = finegrain.compile(llama, (IDS,), recipe=_recipe(*same, kv_key_axis="tokens"), progress=False,
                               kv_cache=True)
        assert torch.equal(zc(x), kc(x))  # channel over the block of 8 tokens = KIVI's groups of G = 8 tokens
    half = _recipe(*kivi_hi, kv_key_axis="tokens", kv_zip_key=kivi_lo[0], kv_zip_value=kivi_lo[1], kv_zip_block=8,
                   kv_zip_ratio=0.5)
    q = finegrain.compile(llama, (IDS,), recipe=half, progress=False, kv_cache=True).kv["quantization"]
    k = 16 * (0.5 * 4 + 0.5 * 2) / 8 + 1 / 8 + 16 / 8 * ((2 + 0.5) + (2 + 0.25))  # codes, flag, per-subset params
    v = 0.5 * (8 + 2 + 1) + 0.5 * (4 + 2 + 1) + 1 / 8
    assert q["bytes_per_token"] == pytest.approx(2 * 2 * (k + v), abs=0.1)


def test_the_zip42_preset_is_zipcache_on_kivi_keys(llama):
    """``quantize --kv-quant zip42``: ZipCache 4/2 (half of each write's released tokens at 4 bits by
    saliency, the rest at 2) on per-channel pre-RoPE keys, one sink; TVM takes it, ONNX Runtime refuses
    it by name."""
    from finegrain.compiler.recipe import with_kv

    r = with_kv({"name": "float", "rules": []}, "zip42")
    assert (r.kv_key, r.kv_zip_key, r.kv_key_axis, r.kv_zip_ratio, r.kv_zip_block) == (
        "int4-g32-asym-fp16-dyn", "int2-g32-asym-fp16-dyn", "tokens", 0.5, 128)
    r = dataclasses.replace(r, kv_zip_block=8, kv_key="int4-g8-asym-fp16-dyn", kv_value="int4-g8-asym-fp16-dyn",
                            kv_zip_key="int2-g8-asym-fp16-dyn", kv_zip_value="int2-g8-asym-fp16-dyn")  # head dim 16
    cm = finegrain.compile(llama, (IDS,), recipe=r, progress=False, kv_cache=True)
    assert sum(n.target is KV_SALIENCY for n in cm.gm.graph.nodes) == 2
    assert cm.kv["quantization"]["zip"]["ratio"] == 0.5
    assert not [x for x in registry.get("tvm").check(cm) if x.what == "kv_append"]
    assert any(x.what == "kv_append" and "ZipCache" in x.why for x in registry.get("onnx").check(cm))
