"""The fused CPU attention kernel against torch's decomposed attention (scores, mask, safe softmax,
values), and its lowering: every attention of a model becomes one call_tir, or none does."""
import math

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from finegrain.backends.tvm import lower_attention  # noqa: E402
from finegrain.backends.tvm.kernels.attention import (DECODE_MIN_CHUNK, DECODE_SPLITS, KEY_BLOCK,  # noqa: E402
                                                      attention_func, cache_decode_attention_func,
                                                      decode_attention_func, vexp)

pytestmark = pytest.mark.tvm


TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})


def _reference(q, k, v, mask, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.ops.aten._safe_softmax(scores.masked_fill(~mask, -math.inf), -1) @ v


@pytest.mark.parametrize("b,h,hk,s,d,kind", [
    (1, 4, 2, 9, 16, "causal"),  # grouped-query heads
    (1, 4, 4, 1, 16, "causal"),  # decode: one query, one key
    (2, 2, 1, 37, 8, "random"),  # ragged key blocks, a fully masked row
    (1, 3, 3, 70, 32, "causal"),
])
def test_attention_kernel_matches_torch(b, h, hk, s, d, kind):
    torch.manual_seed(0)
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, hk, s, d), torch.randn(b, hk, s, d)
    if kind == "causal":
        mask = torch.ones(s, s, dtype=torch.bool).tril()
    else:
        mask = torch.rand(s, s) > 0.4
        mask[3] = False
    scale = 1 / math.sqrt(d)
    lib = tvm.compile(tvm.IRModule({"main": attention_func(b, h, hk, d, 96, scale)}), target=TARGET)
    s32 = -(-s // KEY_BLOCK) * KEY_BLOCK
    kt = np.zeros((b, hk, d, s32), np.float32)
    kt[..., :s] = k.transpose(-1, -2).numpy()
    bias = np.full((s, s32), -np.inf, np.float32)
    bias[:, :s] = np.where(mask.numpy(), 0, -np.inf)
    args = [tvm.runtime.tensor(a) for a in (q.numpy(), kt, v.numpy(), bias, np.zeros((b, h, s, d), np.float32))]
    lib(*args)
    out = args[-1].numpy()
    ref = _reference(q, k, v, mask, scale).numpy()
    assert not np.isnan(out).any()
    assert np.abs(out - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max())
    if kind == "random":
        assert np.all(out[:, :, 3] == 0)  # the fully masked row: zeros, as _safe_softmax gives


def _bias(mask, t32):
    bias = np.full((mask.shape[0], t32), -np.inf, np.float32)
    bias[:, :mask.shape[1]] = np.where(mask.numpy(), 0, -np.inf)
    return bias


@pytest.mark.parametrize("s,past,hk,window", [(5, 11, 2, None), (1, 40, 1, None), (1, 70, 2, 16), (3, 0, 4, None)])
def test_queries_over_a_cache(s, past, hk, window):
    """S new queries over past + S keys (the KV-cache graph): the prefill kernel (K transposed) and,
    for one query, the decode kernel (K in the cache's layout, one task per K / V head)."""
    torch.manual_seed(1)
    b, h, d, t = 1, 4, 16, past + s
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, hk, t, d), torch.randn(b, hk, t, d)
    pos = torch.arange(past, t)[:, None]
    keys = torch.arange(t)[None]
    mask = (keys <= pos) & ((pos - keys < window) if window else True)  # causal (+ a sliding window)
    scale = 1 / math.sqrt(d)
    t32 = -(-t // KEY_BLOCK) * KEY_BLOCK
    ref = _reference(q, k, v, mask, scale).numpy()
    lib = tvm.compile(tvm.IRModule({"main": attention_func(b, h, hk, d, 96, scale)}), target=TARGET)
    kt = np.zeros((b, hk, d, t32), np.float32)
    kt[..., :t] = k.transpose(-1, -2).numpy()
    args = [tvm.runtime.tensor(a) for a in (q.numpy(), kt, v.numpy(), _bias(mask, t32), np.zeros((b, h, s, d), np.float32))]
    lib(*args)
    assert np.abs(args[-1].numpy() - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max())
    if s == 1:
        lib = tvm.compile(tvm.IRModule({"main": decode_attention_func(b, h, hk, d, 96, scale)}), target=TARGET)
        args = [tvm.runtime.tensor(a) for a in (q.numpy(), k.numpy(), v.numpy(), _bias(mask, t32),
                                                np.zeros((b, h, 1, d), np.float32))]
        lib(*args)
        assert np.abs(args[-1].numpy() - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("past,masked", [
    (0, "none"),  # nothing cached: the new key alone, no chunk
    (37, "small"),  # a kernel built for fewer keys than a chunk takes: one chunk of its whole row
    (1, "new"),  # one cached key, the new one masked
    (DECODE_MIN_CHUNK, "none"),  # exactly one full chunk
    (DECODE_MIN_CHUNK + 1, "chunk"),  # a second chunk of one key; the whole first chunk masked
    (3 * DECODE_MIN_CHUNK - 5, "random"),  # three chunks, the last ragged; random keys masked
    (DECODE_SPLITS * DECODE_MIN_CHUNK + 100, "random"),  # DECODE_SPLITS chunks longer than the shortest
    (2 * DECODE_MIN_CHUNK + 7, "all"),  # every key masked: zeros, as _safe_softmax gives
])
def test_split_decode_over_a_static_cache(past, masked):
    """The decode kernel over a static cache (``cache_decode_attention_func``) splits the cached keys
    into chunks (``decode_chunk``), one parallel item per K / V head and chunk, then merges their
    partial softmaxes with the new key: equal to attention over the whole row."""
    torch.manual_seed(2)
    b, h, hk, d, t = 2, 6, 2, 16, past + 1
    q = torch.randn(b, h, 1, d)
    k, v = torch.randn(b, hk, t, d) * 3, torch.randn(b, hk, t, d)  # wide scores: the chunks' maxima differ
    mask = torch.ones(1, t, dtype=torch.bool)
    if masked == "new":
        mask[0, -1] = False
    elif masked == "chunk":
        mask[0, :DECODE_MIN_CHUNK] = False
    elif masked in ("random", "small"):
        mask = torch.rand(1, t) > 0.3
    elif masked == "all":
        mask[:] = False
    scale = 1 / math.sqrt(d)
    longest = 40 if masked == "small" else DECODE_SPLITS * DECODE_MIN_CHUNK + 200
    t32 = -(-t // KEY_BLOCK) * KEY_BLOCK
    ref = _reference(q, k, v, mask, scale).numpy()
    lib = tvm.compile(tvm.IRModule({"main": cache_decode_attention_func(b, h, hk, d, longest, scale)}), target=TARGET)
    cached = [np.ascontiguousarray(x[:, :, :past].transpose(1, 2).numpy()) for x in (k, v)]  # token-major views
    new = [np.ascontiguousarray(x[:, :, past:].numpy()) for x in (k, v)]
    args = [tvm.runtime.tensor(a) for a in (q.numpy(), cached[0], new[0], cached[1], new[1], _bias(mask, t32),
                                            np.full((b, h, 1, d), np.nan, np.float32))]
    lib(*args)
    out = args[-1].numpy()
    assert not np.isnan(out).any()
    assert np.abs(out - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max())
    if masked == "all":
        assert np.all(out == 0)


def test_sequence_longer_than_built_is_refused():
    lib = tvm.compile(tvm.IRModule({"main": attention_func(1, 1, 1, 8, 32, 1.0)}), target=TARGET)
    s = 40
    args = [tvm.runtime.tensor(np.zeros(shape, np.float32)) for shape in
            ((1, 1, s, 8), (1, 1, 8, 64), (1, 1, s, 8), (s, 64), (1, 1, s, 8))]
    with pytest.raises(Exception, match="longer than the max_seq_len"):
        lib(*args)


def test_vectorized_exp_is_accurate():
    from tvm import te

    x = te.placeholder((4096,), "float32", name="x")
    y = te.compute(x.shape, lambda i: vexp(x[i]), name="y")
    lib = tvm.compile(te.create_prim_func([x, y]), target=TARGET)
    xs = np.concatenate([-np.logspace(-6, 2, 4000), [0.0, -87.0, -87.4, -np.inf] * 24]).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros_like(xs))
    lib(tvm.runtime.tensor(xs), out)
    got, ref = out.numpy(), np.exp(xs.astype(np.float64))
    ok = xs >= -87.3
    assert np.all(np.abs(got[ok] - ref[ok]) <= 4e-7 * ref[ok])  # a few ulp
    assert np.all(got[~ok] == 0)  # masked keys contribute exactly nothing


def _sdpa_node(d: int, mask_dims: int = 4, dropout: float = 0.0):
    class M(torch.nn.Module):
        def forward(self, q, k, v, m):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout)

    q = torch.randn(1, 2, 5, d)
    m = torch.ones([1] * (mask_dims - 2) + [5, 5], dtype=torch.bool) if mask_dims else None
    ep = torch.export.export(M(), (q, q, q, m), strict=False)
    return ep, next(n for n in ep.graph.nodes if n.target is lower_attention.SDPA)


def test_fits_names_what_the_kernel_does_not_take():
    ep, node = _sdpa_node(16)
    assert lower_attention.fits(node) is None
    table = torch.export.default_decompositions()
    kept_ep, kept = lower_attention.keep_undecomposed(ep, table)
    assert kept and kept_ep is ep
    assert "head dim 12" in lower_attention.fits(_sdpa_node(12)[1])
    ep, node = _sdpa_node(16, dropout=0.1)
    assert lower_attention.fits(node) == "dropout"
    ep, kept = lower_attention.keep_undecomposed(ep, table)  # decomposed as before
    ops = {n.target for n in ep.graph.nodes}
    assert not kept and lower_attention.SDPA not in ops and torch.ops.aten._softmax.default in ops


def test_model_attention_is_one_call_per_layer(compiled):
    from finegrain.backends.tvm.lower import import_relax

    cm = compiled("w4a16-g128")
    mod, _, _ = import_relax(cm.gm, cm.input_specs, 64, {"kind": "llvm", "mcpu": "znver3", "num-cores": 2})
    for fn in ("prefill", "decode"):
        lines = [ln for ln in mod[fn].script().splitlines() if "R.call_tir(" in ln]
        assert not any("softmax" in ln for ln in lines)
        # one per layer, on the 2 grouped K / V heads (transformers' repeat_kv copies are not made)
        kernel = "R.call_tir(attention_b1_h4_kv2_d16" if fn == "prefill" else "R.call_tir(decode_attention_one_b1_h4_kv2_d16"
        assert sum(kernel in ln for ln in lines) == 2, fn
        assert not any("kv4" in ln for ln in lines)
        assert sum("attention_bias, " in ln for ln in lines) == 1, fn  # the mask's bias, shared by both layers
