"""The KV cache quantized on write (passes/quantize_kv.py): the Hadamard rotation of keys and values
is exact without quantization; quantized caches give the same logits through the cache path
(prefill + decode) as in one full-sequence forward; fewer bits, larger error; bytes per token are
counted; a recipe that quantizes the cache without the cache in the graph, or with groups that
do not divide the head dim, is refused before any work; bad recipe fields are named."""
import dataclasses

import pytest
import torch

import finegrain
from finegrain.errors import InputError, RecipeError
from finegrain.formats.ops import QUANTIZE
from finegrain.compiler.ops import HADAMARD
from finegrain.formats.hadamard import apply_hadamard
from tests.test_kv_cache import _family, _incremental, _rel
from tests.backends.targets import BUILD


def _kv(key=None, value=None, rotate=False):
    return {"name": "kv", "rules": [], "kv_key": key, "kv_value": value, "kv_rotate": rotate}


@pytest.fixture(scope="module")
def llama():
    return _family("llama")  # GQA: 4 query heads over 2 K / V heads, head dim 16


X = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))


def test_rotation_alone_is_exact_with_the_value_rotation_folded_into_v_and_o_proj(llama):
    cm = finegrain.compile(llama, (IDS,), recipe=_kv(rotate=True), progress=False, kv_cache=True)
    with torch.no_grad():
        ref = llama(X).logits
    assert _rel(ref, cm(X)) <= 1e-5
    inc, _ = _incremental(cm, X, prefill=5)
    assert _rel(ref, inc) <= 1e-4
    assert sum(n.target is HADAMARD for n in cm.gm.graph.nodes) == 2 * 2  # k and q per layer, online
    assert cm.kv["quantization"]["rotate"] is True
    assert any(f["pass"] == "quantize_kv" and "Hadamard" in f["detail"] for f in cm.folds)
    folded = [f for f in cm.folds if f["pass"] == "fold_kv_rotation"]
    assert [f["action"] for f in folded] == ["folded"] * 2 and "v_proj" in folded[0]["detail"]
    from finegrain.compiler.ir import MODULE, get_tensor

    sd = llama.state_dict()
    lin = next(n for n in cm.gm.graph.nodes if n.meta.get(MODULE) == "model.layers.0.self_attn.v_proj")
    v = get_tensor(cm.gm, lin.args[1].target)
    h = apply_hadamard(torch.eye(16), torch.ones(1, 1))
    assert torch.allclose(v[:16], h @ sd["model.layers.0.self_attn.v_proj.weight"][:16], atol=1e-6)  # head 0's rows


@pytest.mark.parametrize("family", ["qwen2", "mistral", "phi3", "gemma3", "qwen3"])
def test_value_rotation_fold_across_families(family):
    """q/k/v biases (Qwen2), a fused qkv_proj whose value slice is folded (Phi-3), QK-norm and sliding
    windows (Gemma-3): folded and exact; a head dim that is not a power of two (Qwen3's 24) is not
    rotated, and says so."""
    model = _family(family)
    cm = finegrain.compile(model, (IDS,), recipe=_kv("int8-token-sym-fp32-dyn", "int8-token-sym-fp32-dyn", True),
                           progress=False, kv_cache=True)
    folds = [f for f in cm.folds if f["pass"] == "fold_kv_rotation"]
    if family == "qwen3":
        assert not folds and any("not a power of two" in f["detail"] for f in cm.folds)
        return
    assert [f["action"] for f in folds] == ["folded"] * 2, folds
    raw = finegrain.compile(model, (IDS,), recipe=_kv("int8-token-sym-fp32-dyn", "int8-token-sym-fp32-dyn"),
                            progress=False, kv_cache=True)
    plain = finegrain.compile(model, (IDS,), recipe=_kv(rotate=True), progress=False, kv_cache=True)
    with torch.no_grad():
        ref = model(X).logits
    assert _rel(ref, plain(X)) <= 1e-5  # the rotations alone change nothing
    assert _rel(ref, cm(X)) <= 0.05 and _rel(ref, raw(X)) <= 0.05  # 8-bit caches, rotated or not
    inc, _ = _incremental(cm, X, prefill=5)
    assert _rel(cm(X), inc) <= 1e-4


def test_value_rotation_stays_online_where_the_fold_cannot_apply(llama):
    """An op between the attention output and o_proj (here a scale the fold does not move) keeps the
    values' rotation online, logged as skipped with the node that stopped it."""
    from finegrain.compiler.capture import kv_inputs
    from finegrain.compiler.context import PassContext
    from finegrain.compiler.ir import KV
    from finegrain.compiler.recipe import Recipe
    from finegrain.passes.fold_kv_rotation import _output_linear, fold_kv_rotation
    from finegrain.passes.quantize_kv import attentions_reading, quantize_kv

    cm = finegrain.compile(llama, (IDS,), recipe={"name": "f", "rules": []}, progress=False, kv_cache=True)
    g = cm.gm.graph
    pres = next(n for n in g.nodes if KV in n.meta and n.meta[KV]["kind"] == "value")
    att = attentions_reading(pres)[0]
    assert _output_linear(att, 16).target is torch.ops.aten.linear.default
    with g.inserting_after(att):
        scaled = g.call_function(torch.ops.aten.mul.Tensor, (att, 2.0))
    scaled.meta["val"] = att.meta["val"]
    att.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
    assert "rearranges the head dim" in _output_linear(att, 16)
    g.lint()
    cm.gm.recompile()
    with torch.no_grad():
        ref = cm.gm(*kv_inputs(cm.kv, X))[0]
    ctx = PassContext(recipe=Recipe.from_dict(_kv("int8-token-sym-fp32-dyn", "int8-token-sym-fp32-dyn", True)))
    quantize_kv(fold_kv_rotation(cm.gm, ctx), ctx)
    skipped = [f for f in ctx.report["folds"] if f["pass"] == "fold_kv_rotation"]
    assert [f["action"] for f in skipped] == ["skipped", "folded"] and "mul" in skipped[0]["detail"]
    assert sum(n.target is HADAMARD for n in g.nodes) == 4 + 2  # layer 0: k, v, q, output; layer 1: k, q
    with torch.no_grad():
        assert _rel(ref, cm.gm(*kv_inputs(cm.kv, X))[0]) <= 0.05  # the 8-bit cache, still the same function


def test_quantized_cache_path_equals_the_full_forward_and_bits_order_the_error(llama, tmp_path):
    with torch.no_grad():
        ref = llama(X).logits
    errs = {}
    for bits in (8, 4, 2):
        fmt = "int8-token-sym-fp32-dyn" if bits == 8 else f"int{bits}-g16-asym-fp16-dyn"
        cm = finegrain.compile(llama, (IDS,), recipe=_kv(fmt, fmt), progress=False, kv_cache=True)
        assert sum(n.target is QUANTIZE for n in cm.gm.graph.nodes) == 4  # one per present
        full = cm(X)
        inc, _ = _incremental(cm, X, prefill=5)
        assert _rel(full, inc) <= 1e-4  # every token quantized once, on write, either way
        errs[bits] = _rel(ref, full)
        q = cm.kv["quantization"]
        # codes + one scale (+ a zero point, bit-packed to a whole byte per token) per group of 16
        per_head = 16 * bits / 8 + (4 if bits == 8 else 2 + 1)
        assert q["bytes_per_token"] == pytest.approx(2 * 2 * 2 * per_head)  # layers x kv heads x (K, V)
        assert q["fp32_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert 0 < errs[8] < errs[4] < errs[2], errs
    cm.save(tmp_path / "art")
    back = finegrain.load(tmp_path / "art")
    assert back.kv == cm.kv and _rel(cm(X), back(X)) == 0


def test_keys_only_leave_values_in_float(llama):
    cm = finegrain.compile(llama, (IDS,), recipe=_kv("int4-g16-asym-fp16-dyn"), progress=False, kv_cache=True)
    quantized = [n.args[0] for n in cm.gm.graph.nodes if n.target is QUANTIZE]
    assert len(quantized) == 2 and cm.kv["quantization"]["value"] is None


def test_refusals(llama):
    with pytest.raises(InputError, match="kv_cache=True"):
        finegrain.compile(llama, (IDS,), recipe=_kv("int4-g16-asym-fp16-dyn"), progress=False)
    with pytest.raises(InputError, match="do not divide the head dim 16"):
        finegrain.compile(llama, (IDS,), recipe=_kv("int4-g32-asym-fp16-dyn"), progress=False, kv_cache=True)
    with pytest.raises(RecipeError, match="kv_value"):
        finegrain.compile(llama, (IDS,), recipe=_kv(value="int4-g16-asym-fp16"), progress=False, kv_cache=True)
    with pytest.raises(RecipeError, match="kv_rotate"):
        finegrain.compile(llama, (IDS,), recipe=_kv(rotate="yes"), progress=False, kv_cache=True)


# ---- KIVI: keys per channel over token groups, a float residual window, attention sinks ---------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from finegrain.compiler.ops import KV_APPEND, kv_quantized_span  # noqa: E402
from finegrain.formats import QuantFormat  # noqa: E402

KIVI = {"kv_key": "int2-g8-asym-fp16-dyn", "kv_value": "int2-g16-asym-fp16-dyn", "kv_key_axis": "tokens",
        "kv_window": 4, "kv_sinks": 1}


def _append_in_chunks(x, cuts, *spec):
    cache = x[:, :, :0]
    for a, b in zip([0, *cuts], [*cuts, x.shape[2]]):
        cache = torch.ops.finegrain.kv_append(cache, x[:, :, a:b], *spec)
    return cache


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(1, 44), max_size=6, unique=True).map(sorted),
       axis=st.sampled_from(["tokens", "head_dim"]), window=st.integers(0, 9), sinks=st.integers(0, 3))
def test_every_token_is_quantized_once_whatever_the_chunking(cuts, axis, window, sinks):
    x = torch.randn(1, 2, 45, 16, generator=torch.Generator().manual_seed(0))
    spec = ("int2-g8-asym-fp16-dyn", axis, window, sinks)
    one = torch.ops.finegrain.kv_append(x[:, :, :0], x, *spec)
    assert torch.equal(_append_in_chunks(x, cuts, *spec), one)  # bit-exact: no token re-quantized or skipped
    a, b = kv_quantized_span(axis, 8, 0, 45, window, sinks)
    assert torch.equal(one[:, :, :a], x[:, :, :a]) and torch.equal(one[:, :, b:], x[:, :, b:])  # sinks, window
    assert b - a == (((45 - window - sinks) // 8 * 8) if axis == "tokens" else 45 - window - sinks)
    assert (one[:, :, a:b] != x[:, :, a:b]).float().mean() > 0.5  # the rest quantized (2 bits: most values move)


def test_per_channel_groups_absorb_outlier_channels_that_per_token_scales_cannot():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 64, 16, generator=g)
    k[..., 3] += 30  # keys have a few channels of large magnitude (KIVI's observation)
    fmt = "int2-g16-asym-fp16-dyn"
    normal = [c for c in range(16) if c != 3]  # what a per-token scale sized by channel 3 crushes
    err = {axis: float((torch.ops.finegrain.kv_append(k[:, :, :0], k, fmt, axis, 0, 0) - k)[..., normal].norm()
                       / k[..., normal].norm()) for axis in ("tokens", "head_dim")}
    grouped = QuantFormat.parse(fmt).fake_quantize(k[0, 0, :16].T.contiguous()).T  # channel c over 16 tokens
    assert torch.equal(torch.ops.finegrain.kv_append(k[:, :, :0], k, fmt, "tokens", 0, 0)[0, 0, :16], grouped)
    assert err["tokens"] < 0.5 * err["head_dim"], err


def test_kivi_cache_path_stores_what_the_full_forward_stores(llama, tmp_path):
    cm = finegrain.compile(llama, (IDS,), recipe={"name": "kivi", "rules": [], **KIVI}, progress=False, kv_cache=True)
    assert sum(n.target is KV_APPEND for n in cm.gm.graph.nodes) == 4
    x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    s = cm.session()
    full, state_full = s.prefill(x)
    for prefill in (5, 17, 39):
        inc, state = _incremental(cm, x, prefill=prefill)
        # layer 0's K / V do not depend on the cache: each token quantized once, when it leaves the window, gives the
        # same stored cache whatever the chunking (up to the float noise of the projections). Deeper layers differ
        # by design: their inputs come from attention that saw the window in float during decode (KIVI's semantics)
        assert all(float((a.dequantize() - b.dequantize()).abs().max()) <= 1e-6  # the packed caches, as read
                   for a, b in zip(state_full["past"][:2], state["past"][:2]))
    # no window and no token groups (per-token values behind one sink): quantized on write, so decode == full forward
    sink = {"name": "sink", "rules": [], "kv_key": "int4-g16-asym-fp16-dyn", "kv_value": "int4-g16-asym-fp16-dyn",
            "kv_sinks": 1}
    cs = finegrain.compile(llama, (IDS,), recipe=sink, progress=False, kv_cache=True)
    assert sum(n.target is KV_APPEND for n in cs.gm.graph.nodes) == 4
    inc, _ = _incremental(cs, x, prefill=5)
    assert _rel(cs(x), inc) <= 1e-4
    q = cm.kv["quantization"]
    assert (q["key_axis"], q["window"], q["sinks"]) == ("tokens", 4, 1)
    per_head_k = 16 * 2 / 8 + 16 / 8 * (2 + 2 / 8)  # codes + a (scale, zero) per channel per 8 tokens
    per_head_v = 16 * 2 / 8 + (2 + 1)  # codes + one (scale, zero) per token group of 16 channels (zero: a whole byte)
    assert q["bytes_per_token"] == pytest.approx(2 * 2 * (per_head_k + per_head_v))
    assert q["fp32_bytes_per_token"] > q["bytes_per_token_at_context"] > q["bytes_per_token"]  # float window, sinks
    cm.save(tmp_path / "art")
    back = finegrain.load(tmp_path / "art")
    assert back.kv == cm.kv and _rel(cm(x), back(x)) == 0


def test_kivi_writes_are_taken_by_every_backend_and_zipcache_is_refused_by_name(llama):
    """KIVI's windowed writes are emulated on ONNX Runtime and TVM (``backends/tvm/lower_window.py``,
    ``onnx._kv_append_translation``); a ZipCache write, which ONNX does not lower, is refused there naming
    the node (TVM lowers it: ``tests/backends/test_tvm_kv_window.py``)."""
    from finegrain.backends import registry

    cm = finegrain.compile(llama, (IDS,), recipe={"name": "kivi", "rules": [], **KIVI}, progress=False, kv_cache=True)
    for name in ("torch", "onnx", "tvm"):
        assert not [r for r in registry.get(name).check(cm) if r.what == "kv_append"], name
    zip_ = {"name": "zip", "rules": [], **KIVI, "kv_key_axis": "head_dim", "kv_key": "int4-token-asym-fp16-dyn",
            "kv_zip_key": "int2-token-asym-fp16-dyn", "kv_zip_block": 8}
    cm = finegrain.compile(llama, (IDS,), recipe=zip_, progress=False, kv_cache=True)
    refusals = registry.get("onnx").check(cm)
    assert any(r.what == "kv_append" and "KV cache write" in r.where and "ZipCache" in r.why for r in refusals), refusals
    assert not [r for r in registry.get("tvm").check(cm) if r.what == "kv_append"]


def test_kivi_refusals(llama):
    with pytest.raises(InputError, match="needs a group size"):
        finegrain.compile(llama, (IDS,), recipe=_kv("int2-token-asym-fp16-dyn") | {"kv_key_axis": "tokens"},
                          progress=False, kv_cache=True)
    with pytest.raises(RecipeError, match="kv_key_axis"):
        finegrain.compile(llama, (IDS,), recipe=_kv("int2-g8-asym-fp16-dyn") | {"kv_key_axis": "channel"},
                          progress=False, kv_cache=True)
    with pytest.raises(RecipeError, match="kv_window"):
        finegrain.compile(llama, (IDS,), recipe=_kv("int2-g8-asym-fp16-dyn") | {"kv_window": -1},
                          progress=False, kv_cache=True)


@pytest.mark.parametrize("rotate", [False, True])
def test_pre_rope_keys_round_trip_exactly_and_change_what_is_quantized(llama, rotate):
    x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    base = {"name": "pre", "rules": [], "kv_key": "int8-g8-asym-fp32-dyn", "kv_key_axis": "tokens", "kv_rotate": rotate}
    post = finegrain.compile(llama, (IDS,), recipe=base, progress=False, kv_cache=True)
    pre = finegrain.compile(llama, (IDS,), recipe=base | {"kv_pre_rope": True}, progress=False, kv_cache=True)
    appends = [n for n in pre.gm.graph.nodes if n.target is KV_APPEND]
    assert len(appends) == 2 and all(str(n.args[6].target).endswith("inv_freq") and n.args[7] is rotate for n in appends)
    assert pre.kv["quantization"]["pre_rope"] is True
    with torch.no_grad():
        ref = llama(x).logits
    # 8 bits: both close to float; pre-RoPE quantizes other numbers (its error differs from the post-RoPE one)
    assert _rel(ref, pre(x)) < 0.02 and _rel(ref, post(x)) < 0.02 and _rel(pre(x), post(x)) > 0
    # the RoPE undone and applied again around an identity quantizer changes nothing (float64 angles)
    from finegrain.compiler.ops import _rope
    k = torch.randn(1, 2, 40, 16)
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    assert float((_rope(_rope(k, 7, inv, inverse=True), 7, inv, inverse=False) - k).abs().max()) < 1e-5


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3", "gemma3"])
def test_pre_rope_finds_each_layers_rope_across_families(family):
    model = _family(family)  # qwen3: QK-norm before RoPE; phi3: fused qkv; gemma3: a local and a global RoPE
    fields = {"kv_key": "int8-g8-asym-fp32-dyn", "kv_key_axis": "tokens", "kv_pre_rope": True, "kv_sinks": 1}
    cm = finegrain.compile(model, (IDS,), recipe={"name": "pre", "rules": [], **fields}, progress=False, kv_cache=True)
    appends = [n for n in cm.gm.graph.nodes if n.target is KV_APPEND]
    assert appends and all(n.args[6] is not None for n in appends)
    assert not [f for f in cm.folds if f["pass"] == "quantize_kv" and f["action"] == "skipped"]
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).logits
    assert _rel(ref, cm(x)) < 0.02  # 8 bits through undone / redone RoPE stay close to float


def test_rotatekv_grouped_head_rotation_and_reordering(llama, tmp_path):
    """RotateKV's grouped-head rotation (``kv_head_group``: a Hadamard over both K / V heads' 32
    channels) and outlier-aware reordering (``kv_reorder``: the channels sorted by calibration RMS):
    the transform round-trips exactly, the cache path stores what the full forward does, 8 bits stay
    close to float, the permutation is the calibration's order, and bad settings are named."""
    from finegrain.compiler.ops import KV_APPEND, _from_head_groups, _to_head_groups

    k = torch.randn(1, 2, 7, 16)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    assert float((_from_head_groups(_to_head_groups(k, perm, 2), perm, 2) - k).abs().max()) < 1e-5
    x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    calib = [(torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(4)),)]
    base = {"name": "rkv", "rules": [], "kv_key": "int8-g16-asym-fp32-dyn", "kv_pre_rope": True, "kv_rotate": True}
    plain = finegrain.compile(llama, (IDS,), recipe=base, progress=False, kv_cache=True)
    grouped = finegrain.compile(llama, (IDS,), recipe=base | {"kv_head_group": 2, "kv_reorder": True},
                                calibration=calib, progress=False, kv_cache=True)
    appends = [n for n in grouped.gm.graph.nodes if n.target is KV_APPEND]
    assert len(appends) == 2 and all(n.kwargs["head_group"] == 2 for n in appends)
    perms = [grouped.gm.get_buffer(n.kwargs["perm"].target) for n in appends]
    assert all(sorted(p.tolist()) == list(range(32)) for p in perms)
    assert any(f["action"] == "rotated" and "reordered" in f["detail"] for f in grouped.folds)
    with torch.no_grad():
        ref = llama(x).logits
    assert _rel(ref, grouped(x)) < 0.02 and _rel(grouped(x), plain(x)) > 0  # another space, another error
    grouped.save(tmp_path / "rkv")  # the permutation and the keywords survive the artifact (data only)
    assert torch.equal(finegrain.load(tmp_path / "rkv")(x), grouped(x))
    through, _ = _incremental(grouped, x, 17)
    assert _rel(grouped(x), through) < 1e-4  # the cache path stores what the full forward does
    # layer 0's permutation sorts its pre-RoPE key channels (k_proj of the normed embeddings, heads
    # concatenated) by their RMS over the calibration tokens, largest first
    with torch.no_grad():
        h = llama.model.layers[0].input_layernorm(llama.model.embed_tokens(calib[0][0]))
        rms = llama.model.layers[0].self_attn.k_proj(h)[0].pow(2).mean(0).sqrt()
    assert str(appends[0].kwargs["perm"].target).startswith("kv_reorder") and appends[0].kwargs["perm"].target.endswith("0")
    assert torch.equal(perms[0], torch.argsort(rms, descending=True, stable=True))
    with pytest.raises(RecipeError, match="kv_head_group / kv_reorder"):
        finegrain.compile(llama, (IDS,), recipe=base | {"kv_pre_rope": False, "kv_head_group": 2}, kv_cache=True)
    with pytest.raises(InputError, match="kv_head_group 3 does not divide the 2 KV heads"):
        finegrain.compile(llama, (IDS,), recipe=base | {"kv_head_group": 3}, progress=False, kv_cache=True)
    with pytest.raises(InputError, match="kv_reorder orders the key channels by calibration"):
        finegrain.compile(llama, (IDS,), recipe=base | {"kv_reorder": True}, progress=False, kv_cache=True)


def test_kv_sink_search_finds_the_massive_activations_from_calibration(llama):
    """RotateKV's attention-sink-aware quantization (``kv_sink_search``): the leading positions whose
    residual stream carries a massive activation in at least half the calibration batches become the
    sinks (kept in float), exactly as naming ``kv_sinks`` does; massive tokens further on are counted
    and said not kept; finding none keeps ``kv_sinks``; no calibration data is refused by name."""
    import copy

    from finegrain.compiler.ops import KV_APPEND

    m = copy.deepcopy(llama)
    with torch.no_grad():
        m.model.embed_tokens.weight[7] *= 1000  # token 7's residual stream is massive from the embedding on
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(8, 256, (1, 32), generator=g) for _ in range(4)]
    for b in batches:
        b[0, 2] = 7  # position 2 in every batch
    batches[0][0, 0] = 7  # position 0 in one batch of four: not half of them
    batches[1][0, 20] = batches[2][0, 25] = 7  # past the searched positions
    calib = [(b,) for b in batches]
    base = {"name": "sinks", "rules": [], "kv_key": "int4-g16-asym-fp16-dyn", "kv_value": "int4-g16-asym-fp16-dyn",
            "kv_pre_rope": True}
    cm = finegrain.compile(m, (IDS,), recipe=base | {"kv_sink_search": 8}, calibration=calib, progress=False,
                           kv_cache=True)
    appends = [n for n in cm.gm.graph.nodes if n.target is KV_APPEND]
    assert len(appends) == 4 and all(n.args[5] == 3 for n in appends)  # sinks: positions 0..2
    q = cm.kv["quantization"]
    assert q["sinks"] == 3 and q["sinks_found"]["positions"] == [2] and q["sinks_found"]["ratio"][0] >= 20
    assert q["sinks_found"]["beyond"] == 2 and q["sinks_found"]["tokens"] == 4 * 24
    (entry,) = [f for f in cm.folds if "kv_sink_search" in f["site"]]
    assert entry["action"] == "calibrated" and "positions [2]" in entry["detail"] and "kv_sinks 3" in entry["detail"]
    assert "2 of 96 calibration tokens past position 7 are massive" in entry["detail"]
    assert "at model.embed_tokens (embedding)" in entry["detail"]  # the largest ratio: the embedding itself
    named = finegrain.compile(m, (IDS,), recipe=base | {"kv_sinks": 3}, progress=False, kv_cache=True)
    with torch.no_grad():
        assert torch.equal(cm(X), named(X))
        assert not torch.equal(cm(X), finegrain.compile(m, (IDS,), recipe=base | {"kv_sinks": 1}, progress=False,
                                                        kv_cache=True)(X))
    # no massive activation in the unmodified model: kv_sinks stays as given
    plain = finegrain.compile(llama, (IDS,), recipe=base | {"kv_sink_search": 8, "kv_sinks": 1}, calibration=calib,
                              progress=False, kv_cache=True)
    assert plain.kv["quantization"]["sinks"] == 1 and plain.kv["quantization"]["sinks_found"]["positions"] == []
    assert any("no massive activation" in f["detail"] and "kv_sinks stays 1" in f["detail"] for f in plain.folds)
    with pytest.raises(InputError, match="kv_sink_search finds the attention sinks from calibration"):
        finegrain.compile(m, (IDS,), recipe=base | {"kv_sink_search": 8}, progress=False, kv_cache=True)
    with pytest.raises(RecipeError, match="kv_sink_search: must be an integer"):
        finegrain.compile(m, (IDS,), recipe=base | {"kv_sink_search": -1}, progress=False, kv_cache=True)


def test_the_rotatekv4_preset_rotates_all_kv_heads_together(llama):
    """``quantize --kv-quant rotatekv4``: ``kv_head_group: 0`` groups all the layer's KV heads (2 here),
    the channels reordered by calibration, keys and values at 4 bits; the same writes as naming the
    group size, and a negative size is refused."""
    from finegrain.compiler.ops import KV_APPEND
    from finegrain.compiler.recipe import KV_PRESETS, with_kv

    calib = [(torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(4)),)]
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    r = with_kv({"name": "float", "rules": []}, "rotatekv4")
    assert r.kv_head_group == 0 and r.kv_reorder and r.kv_pre_rope and r.kv_key.startswith("int4")
    assert r.kv_sinks == 0 and r.kv_sink_search == 16  # the sinks come from calibration (none in this random model)
    # groups of 64 (one per token and head at SmolLM2's head dim) cover this model's 16-channel heads as 16
    fmt = {"kv_key": "int4-g16-asym-fp16-dyn", "kv_value": "int4-g16-asym-fp16-dyn"}
    r = dataclasses.replace(r, **fmt)
    cm = finegrain.compile(llama, (IDS,), recipe=r, calibration=calib, progress=False, kv_cache=True)
    keys = [n for n in cm.gm.graph.nodes if n.target is KV_APPEND and "perm" in n.kwargs]
    assert len(keys) == 2 and all(n.kwargs["head_group"] == 2 for n in keys)
    assert cm.kv["quantization"]["sinks"] == 0 and cm.kv["quantization"]["sinks_found"]["positions"] == []
    named = finegrain.compile(llama, (IDS,), recipe={**KV_PRESETS["rotatekv4"], **fmt, "name": "g2",
                                                     "rules": [], "kv_head_group": 2}, calibration=calib, progress=False,
                              kv_cache=True)
    assert torch.equal(cm(x), named(x))
    with pytest.raises(RecipeError, match=r"kv_head_group: must be an integer number of KV heads in \[1, 1024\] \(0: all\)"):
        finegrain.compile(llama, (IDS,), recipe={**KV_PRESETS["rotatekv4"], "name": "bad", "rules": [],
                                                 "kv_head_group": -1}, kv_cache=True)


def test_a_bad_reordering_in_an_artifact_is_named():
    """A ``perm`` that is not a permutation of the key channels (a tampered artifact) is refused by name."""
    from finegrain.compiler.ops import kv_append

    past, new = torch.zeros(1, 2, 0, 16), torch.randn(1, 2, 3, 16)
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    with pytest.raises(ValueError, match="perm must be a permutation of the 32 key channels"):
        kv_append(past, new, "int4-g16-asym-fp16-dyn", "head_dim", 0, 0, inv, perm=torch.zeros(32, dtype=torch.long))
    with pytest.raises(ValueError, match="head_group 3 does not divide the 2 KV heads"):
        kv_append(past, new, "int4-g16-asym-fp16-dyn", "head_dim", 0, 0, inv, head_group=3)
    good = kv_append(past, new, "int4-g16-asym-fp16-dyn", "head_dim", 0, 0, inv, perm=torch.randperm(32), head_group=2)
    assert good.shape == (1, 2, 3, 16)


def test_kv_writes_make_their_tensors_on_their_inputs_device():
    """The GPU backend runs ``kv_append`` / ``kv_saliency`` on CUDA tensors as they are (not on CPU
    copies of the whole past). With torch's default device set to ``meta``, a tensor they made without
    naming their inputs' device would be a meta tensor, and mixing it with these CPU inputs raises: every
    kind of write (KIVI, pre-RoPE rotated keys, RotateKV's grouped heads, ZipCache token-wise and per
    channel, the saliency) gives the same values as with the default device left alone."""
    from finegrain.compiler.ops import kv_append_ref, kv_saliency_ref  # the functions, not the dispatcher's op

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 45, 16, generator=gen)
    past, new = x[:, :, :20], x[:, :, 20:]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    q = torch.randn(1, 4, 25, 16, generator=gen)
    score, perm = torch.rand(1, 2, 45, generator=gen), torch.randperm(32, generator=gen)
    fn = {"kv_append": kv_append_ref, "kv_saliency": kv_saliency_ref}
    cases = [("kv_append", (past, new, "int2-g8-asym-fp16-dyn", "tokens", 4, 1)),
             ("kv_append", (past, new, "int4-g8-asym-fp16-dyn", "head_dim", 4, 1)),
             ("kv_append", (past, new, "int2-g8-asym-fp16-dyn", "tokens", 4, 1, inv_freq, True)),
             ("kv_append", (past, new, "int4-g16-asym-fp16-dyn", "head_dim", 0, 1, inv_freq, True, None, None, 1.0, 1,
                            False, perm, 2)),
             ("kv_append", (past, new, "int4-token-asym-fp16-dyn", "head_dim", 0, 1, None, False, score,
                            "int2-token-asym-fp16-dyn", 0.5, 8, True)),
             ("kv_append", (past, new, "int4-g8-asym-fp16-dyn", "tokens", 0, 1, None, False, score,
                            "int2-g8-asym-fp16-dyn", 0.5, 8, False)),
             ("kv_saliency", (q, past, new, 0.2, 0.25))]
    want = [fn[name](*args) for name, args in cases]
    torch.set_default_device("meta")
    try:
        got = [fn[name](*args) for name, args in cases]
    finally:
        torch.set_default_device(None)
    for (name, args), g, w in zip(cases, got, want):
        assert g.device.type == "cpu" and torch.equal(g, w), (name, args[2:5])


def test_fp8_kv_cache_on_every_backend(llama):
    """The ``kv8-fp8`` preset (FP8 E4M3 keys / values, one fp32 scale per token and head): what the
    cache holds is E4M3 values times each row's scale; the bytes per token count one byte per element
    and 4 per scale; the reference stores it packed (the same logits as its fp32 storage), ONNX Runtime,
    TVM and the GPU backend (interpreted) decode the reference's logits over it; a windowed FP8 write
    (KIVI's per-channel keys) is stored packed by the reference and emulated by ONNX Runtime / TVM with
    the same logits; a non-E4M3 float format is refused."""
    from finegrain.backends import registry
    from finegrain.compiler.recipe import with_kv

    cm = finegrain.compile(llama, (IDS,), recipe=with_kv({"name": "f", "rules": []}, "kv8-fp8"), progress=False,
                           kv_cache=True)
    q = cm.kv["quantization"]
    heads, d, layers = cm.kv["kv_heads"], cm.kv["head_dim"], cm.kv["layers"]
    assert q["bytes_per_token"] == 2 * layers * heads * (d + 4)
    ref = cm.session("torch", kv_storage="float")
    la, sa = ref.prefill(X[:, :10])
    for p in sa["past"]:  # every row: E4M3 values times one scale
        s = p.abs().amax(-1, keepdim=True) / 448
        assert torch.allclose((p / s).to(torch.float8_e4m3fn).float() * s, p, rtol=0, atol=1e-6)
    sessions = {"packed": cm.session("torch"), "onnx": cm.session("onnx"), "tvm": cm.session("tvm", target=BUILD, max_seq_len=32),
                "gpu": cm.session("gpu")}  # the GPU backend's kernels interpreted where there is no CUDA (conftest)
    assert len(sessions["packed"].kv_packed) == 2 * layers
    states = {k: s.prefill(X[:, :10])[1] for k, s in sessions.items()}
    for i in range(10, 14):
        la, sa = ref.step(sa, X[:, i:i + 1])
        for k, s in sessions.items():
            lb, states[k] = s.step(states[k], X[:, i:i + 1])
            assert (la - lb.float().cpu()).abs().max() < 1e-4 * la.abs().max(), (k, i)
    windowed = finegrain.compile(llama, (IDS,), recipe=_kv("e4m3-g8-sym-fp16-dyn", "e4m3-token-sym-fp32-dyn")
                                 | {"kv_window": 4, "kv_key_axis": "tokens", "kv_sinks": 1}, progress=False, kv_cache=True)
    packed, floats = windowed.session("torch"), windowed.session("torch", kv_storage="float")
    (la, sa), (lb, sb) = packed.prefill(X[:, :10]), floats.prefill(X[:, :10])
    for i in range(10, 20):  # KIVI's windowed per-channel FP8 keys, stored packed: the same logits
        (la, sa), (lb, sb) = packed.step(sa, X[:, i:i + 1]), floats.step(sb, X[:, i:i + 1])
        assert torch.equal(la, lb)
    assert len(packed.kv_packed) == 2 * layers
    # ONNX Runtime and TVM emulate the windowed FP8 write (the E4M3 grid in their arithmetic): the same logits
    others = {"onnx": windowed.session("onnx"), "tvm": windowed.session("tvm", target=BUILD, max_seq_len=32)}
    (la, sa), states = packed.prefill(X[:, :10]), {k: s.prefill(X[:, :10])[1] for k, s in others.items()}
    for i in range(10, 20):  # past the window: groups of 8 keys released at 13 and 21 ... and values every step
        la, sa = packed.step(sa, X[:, i:i + 1])
        for k, s in others.items():
            lb, states[k] = s.step(states[k], X[:, i:i + 1])
            assert (la - lb).abs().max() < 1e-4 * la.abs().max(), (k, i)
    assert not any(r.what == "kv_append" for name in others for r in registry.get(name).check(windowed))
    with pytest.raises(RecipeError, match="integer or FP8 E4M3"):
        finegrain.compile(llama, (IDS,), recipe=_kv("e5m2-token-sym-fp32-dyn"), progress=False, kv_cache=True)


def test_static_fp8_kv_cache_calibrates_one_scale_per_layer_on_every_backend(llama, tmp_path):
    """The ``kv8-fp8-static`` preset (vLLM's FP8 cache: E4M3 keys / values, one calibrated fp32 scale
    per layer for the keys and one for the values): each scale is the largest |key| (|value|) the
    calibration batches write to that layer's cache, over 448, as transformers' own cache holds them;
    the cache holds E4M3 values times that scale; a token costs one byte per element (no per-token
    scale); the reference stores the codes packed with the same logits as its fp32 storage, TVM's
    static build holds the codes packed too (the scale a constant), and ONNX Runtime, TVM
    and the GPU backend (interpreted) decode the reference's logits; the scales survive
    save / load; static formats are refused where the write is windowed and without calibration."""
    from transformers import DynamicCache

    from finegrain.compiler.recipe import with_kv
    from finegrain.errors import InputError

    gen = torch.Generator().manual_seed(7)
    calib = [(torch.randint(0, 256, (1, 12), generator=gen),) for _ in range(3)]
    cm = finegrain.compile(llama, (IDS,), recipe=with_kv({"name": "f", "rules": []}, "kv8-fp8-static"),
                           calibration=calib, progress=False, kv_cache=True)
    heads, d, layers = cm.kv["kv_heads"], cm.kv["head_dim"], cm.kv["layers"]
    hi = {}
    for (ids,) in calib:  # what transformers writes to its cache, post-RoPE
        cache = DynamicCache(config=llama.config)
        with torch.no_grad():
            llama(ids, cache=cache, use_cache=True)
        for i, lay in enumerate(cache.layers):
            for kind, t in (("key", lay.keys), ("value", lay.values)):
                hi[(i, kind)] = max(hi.get((i, kind), 0.0), float(t.abs().amax()))
    scales = {(i, kind): float(getattr(getattr(cm.gm.kv_scale, str(i)), kind)) for i in range(layers)
              for kind in ("key", "value")}
    assert scales == pytest.approx({k: v / 448 for k, v in hi.items()}, rel=1e-6)
    assert len(set(scales.values())) == len(scales)
    assert cm.kv["quantization"]["bytes_per_token"] == 2 * layers * heads * d
    ref = cm.session("torch", kv_storage="float")
    la, sa = ref.prefill(X[:, :10])
    for j, p in enumerate(sa["past"]):  # every element: an E4M3 value times its layer's one scale
        s = scales[(j // 2, ("key", "value")[j % 2])]
        assert torch.equal((p / s).to(torch.float8_e4m3fn).float() * s, p)
    sessions = {"packed": cm.session("torch"), "onnx": cm.session("onnx"), "tvm": cm.session("tvm", target=BUILD, max_seq_len=32),
                "gpu": cm.session("gpu")}
    assert len(sessions["packed"].kv_packed) == 2 * layers
    # TVM's static build holds the E4M3 codes alone (4 per int32 word), the bytes the format counts; the layer's
    # scale is a constant its decode and attention kernels read (was a float32 slot per token and head)
    assert [(b["dtype"], b["width"]) for b in sessions["tvm"].cache_buffers] == [("int32", d // 4)] * (2 * layers)
    assert sessions["tvm"].cache_bytes(10) == 10 * cm.kv["quantization"]["bytes_per_token"]
    states = {k: s.prefill(X[:, :10])[1] for k, s in sessions.items()}
    assert sum(p.codes.numel() for p in states["packed"]["past"]) == 10 * cm.kv["quantization"]["bytes_per_token"]
    for i in range(10, 14):
        la, sa = ref.step(sa, X[:, i:i + 1])
        for k, s in sessions.items():
            lb, states[k] = s.step(states[k], X[:, i:i + 1])
            assert (la - lb.float().cpu()).abs().max() < 1e-4 * la.abs().max(), (k, i)
    cm.save(tmp_path / "art")
    back = finegrain.load(tmp_path / "art")
    assert torch.equal(back(X), cm(X)) and back.kv == cm.kv
    static = "e4m3-tensor-sym-fp32"
    with pytest.raises(RecipeError, match="static format .* float window"):
        finegrain.compile(llama, (IDS,), recipe=_kv(static, static) | {"kv_window": 4}, calibration=calib,
                          progress=False, kv_cache=True)
    with pytest.raises(RecipeError, match="kv_zip_key"):
        finegrain.compile(llama, (IDS,), recipe=_kv("int4-g16-asym-fp16-dyn") | {"kv_zip_key": static},
                          progress=False, kv_cache=True)
    with pytest.raises(RecipeError, match="static symmetric one per tensor"):
        finegrain.compile(llama, (IDS,), recipe=_kv("int8-tensor-asym-fp32"), progress=False, kv_cache=True)
    with pytest.raises(InputError, match="static activation or KV-cache scales"):
        finegrain.compile(llama, (IDS,), recipe=_kv(static, static), progress=False, kv_cache=True)


def test_kv_sink_search_where_a_norm_follows_the_embedding():
    """Bloom: a LayerNorm follows the embedding, so no residual stream starts at the embedding; the
    search measures what every norm reads instead and finds a token planted massive there."""
    from tests.test_kv_cache import _family

    m = _family("bloom")
    with torch.no_grad():
        m.transformer.word_embeddings.weight[7] *= 1000
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(8, 256, (1, 32), generator=g) for _ in range(2)]
    for b in batches:
        b[0, 1] = 7
    cm = finegrain.compile(m, (IDS,), recipe={"name": "sinks", "rules": [], "kv_key": "int8-g8-asym-fp16-dyn",
                                              "kv_value": "int8-g8-asym-fp16-dyn", "kv_sink_search": 4},
                           calibration=[(b,) for b in batches], progress=False, kv_cache=True)
    q = cm.kv["quantization"]
    assert q["sinks"] == 2 and q["sinks_found"]["positions"] == [1], q["sinks_found"]
    (entry,) = [f for f in cm.folds if "kv_sink_search" in f["site"]]
    assert "the input of transformer.word_embeddings_layernorm" in entry["detail"], entry["detail"]


_NO_ROPE = {"gpt2", "opt", "bloom"}
_EAGER = {"gemma2", "bloom"}  # no scaled_dot_product_attention (softcapping, ALiBi)


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox", "phi", "falcon", "olmo2", "gemma2", "bloom"])
def test_kv_methods_on_models_that_are_not_llama_shaped(family):
    """KIVI's and RotateKV's settings (8-bit, so a wrong transform shows against float) on families
    other than Llama: learned or ALiBi positions, partial rotary, fused and split qkv, parallel
    residuals, post-norms, eager attention. Each compiles, decodes over its cache close to the float
    model, and says in the manifest what it could not apply: pre-RoPE without RoPE, the K / V
    rotation without a scaled_dot_product_attention."""
    from tests.test_kv_cache import _family

    model = _family(family)
    calib = [(torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(4)),)]
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).logits
    fmt = {"kv_key": "int8-g8-asym-fp16-dyn", "kv_value": "int8-g8-asym-fp16-dyn", "kv_pre_rope": True,
           "kv_rotate": True, "kv_sink_search": 4}
    kivi = {**fmt, "kv_key_axis": "tokens", "kv_window": 4}
    rotatekv = {**fmt, "kv_head_group": 0, "kv_reorder": True}
    for name, fields in (("kivi", kivi), ("rotatekv", rotatekv)):
        cm = finegrain.compile(model, (IDS,), recipe={"name": name, "rules": [], **fields}, calibration=calib,
                               progress=False, kv_cache=True)
        inc, _ = _incremental(cm, x, prefill=5)
        assert _rel(ref, inc) < 0.03, (family, name, _rel(ref, inc))
        if name == "rotatekv":  # no window: each token quantized once as written, whatever the chunking
            assert _rel(cm(x), inc) < 1e-4, (family, _rel(cm(x), inc))
        skipped = " | ".join(f["detail"] for f in cm.folds if f["action"] == "skipped")
        assert ("kv_pre_rope: no RoPE" in skipped) == (family in _NO_ROPE), (family, skipped)
        if family in _NO_ROPE and name == "rotatekv":
            assert "grouped-head rotation / channel reordering (of pre-RoPE keys) not applied" in skipped
        assert ("no scaled_dot_product_attention reads this cache" in skipped) == (family in _EAGER), (family, skipped)
        assert cm.kv["quantization"]["rotate"] == (family not in _EAGER)
        found = cm.kv["quantization"]["sinks_found"]
        # measured on every family (28 tokens past the 4 searched): Bloom's stream starts at a LayerNorm after the
        # embedding, so its norms' inputs are the sites
        assert found["batches"] == 1 and found["tokens"] == 28, (family, found)
        assert "no residual stream" not in skipped, (family, skipped)


def test_klt_coded_keys_calibrated_basis_widths_within_the_format_bytes(llama, tmp_path):
    """``kv_key_klt``: each head's pre-RoPE keys coded in the eigenvectors of their calibration
    covariance, per-component widths allocated within the key format's bytes: the basis is
    orthonormal and sorted by variance, the widths fit the budget and favour the large components,
    an 8-bit budget round-trips the keys almost exactly, the cache path stores what the full forward
    does, the artifact keeps it, the GPU session decodes as the reference, TVM refuses it by name, and bad
    settings are named."""
    from finegrain.compiler.ops import KV_APPEND, klt_fake_quantize
    from finegrain.passes.quantize_kv import klt_allocate, klt_cost
    from finegrain.formats import QuantFormat

    f = QuantFormat.parse("int2-g4-asym-fp16-dyn")
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(2, 8, 16, generator=gen) * torch.logspace(1, -2, 8)[None, :, None]  # decreasing variance
    widths, err = klt_allocate(y, f)
    assert sum(klt_cost(f, int(b)) for b in widths) <= 8 * klt_cost(f, 2) + 1e-9
    assert widths[0] >= widths[-1] and widths[0] > 2 and (widths == 0).any()  # energy buys bits; the tail is dropped
    uniform = (dataclasses.replace(f, bits=2).fake_quantize(y) - y).pow(2).mean(dim=(0, 2)).sum()
    assert float(err.sum()) < float(uniform)  # better than every component at the format's own width
    basis = torch.linalg.qr(torch.randn(2, 16, 16, generator=gen))[0]
    mean = torch.randn(2, 16, generator=gen)
    k = torch.randn(1, 2, 8, 16, generator=gen)
    full = torch.full((2, 16), 8)
    back = klt_fake_quantize(k, f, basis, mean, full)
    assert _rel(k, back) < 0.02 and not torch.equal(back, k)  # 8 bits in any orthonormal basis: near exact
    assert torch.allclose(klt_fake_quantize(k, f, basis, mean, torch.zeros(2, 16, dtype=torch.long)),
                          mean[None, :, None].expand_as(k))  # every component dropped: the mean

    x = torch.randint(0, 256, (1, 41), generator=torch.Generator().manual_seed(3))  # 1 sink + 5 groups of 8
    calib = [(torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(s)),) for s in (4, 5)]
    base = {"name": "klt", "rules": [], "kv_key": "int2-g8-asym-fp16-dyn", "kv_value": None, "kv_pre_rope": True,
            "kv_key_axis": "tokens", "kv_sinks": 1, "kv_rotate": True}
    plain = finegrain.compile(llama, (IDS,), recipe=base, progress=False, kv_cache=True)
    cm = finegrain.compile(llama, (IDS,), recipe=base | {"kv_key_klt": True}, calibration=calib, progress=False,
                           kv_cache=True)
    appends = [n for n in cm.gm.graph.nodes if n.target is KV_APPEND]
    assert len(appends) == 2 and all(n.kwargs["basis"].target == f"kv_klt.{i}.basis" for i, n in enumerate(appends))
    b0 = cm.gm.get_buffer("kv_klt.0.basis")
    assert torch.allclose(b0.transpose(1, 2) @ b0, torch.eye(16).expand(2, 16, 16), atol=1e-5)
    w0 = cm.gm.get_buffer("kv_klt.0.widths")
    fk = QuantFormat.parse(base["kv_key"])
    assert w0.shape == (2, 16) and all(sum(klt_cost(fk, int(b)) for b in w) <= 16 * klt_cost(fk, 2) + 1e-9 for w in w0)
    assert cm.kv["quantization"]["key_klt"]["0"] == w0.tolist()
    assert any(e["action"] == "calibrated" and "Karhunen-Loeve" in e["detail"] for e in cm.folds)
    # the bytes counted are the widths' (never above the format's): per head and token, averaged over layers
    assert cm.kv["quantization"]["bytes_per_token"] <= plain.kv["quantization"]["bytes_per_token"] + 1e-6
    with torch.no_grad():
        ref = llama(x).logits
    assert _rel(ref, cm(x)) < 0.5 and _rel(cm(x), plain(x)) > 0  # another space, another error
    through, _ = _incremental(cm, x, 17)
    # the cache path stores what the full forward does: once every group is full (the last token), the
    # last query reads the same keys both ways (earlier ones read their unfilled group in float); to a few
    # 2-bit codes flipped by float rounding, as for plain KIVI keys (1.3e-4 here)
    assert _rel(cm(x)[:, -1], through[:, -1]) < 1e-3
    cm.save(tmp_path / "klt")
    assert torch.equal(finegrain.load(tmp_path / "klt")(x), cm(x))
    with cm.session("gpu") as s:  # the reference op on the device (here: the Triton interpreter's CPU)
        logits, state = s.prefill(x[:, :17])
        outs = [logits]
        for t in range(17, x.shape[1]):
            logits, state = s.step(state, x[:, t:t + 1])
            outs.append(logits)
    assert _rel(through, torch.cat(outs, 1).float()) < 1e-5
    from finegrain.backends import registry

    assert any("Karhunen-Loeve" in r.why for r in registry.get("tvm").check(cm))
    assert not registry.get("onnx").check(cm)  # run in tests/backends/test_onnx_kv.py
    with pytest.raises(InputError, match="kv_key_klt codes the keys in a basis"):
        finegrain.compile(llama, (IDS,), recipe=base | {"kv_key_klt": True}, progress=False, kv_cache=True)
    with pytest.raises(RecipeError, match="kv_key_klt"):
        finegrain.compile(llama, (IDS,), recipe=base | {"kv_key_klt": True, "kv_key_axis": "head_dim"},
                          kv_cache=True)
