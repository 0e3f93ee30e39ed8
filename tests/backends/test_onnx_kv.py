"""The KV-cache graph through ONNX Runtime (past_key_i / present_key_i in and out of the exported
model) and through onnxruntime-genai, the real client of the exported folder: its logits at every
generated position equal finegrain's reference and its greedy tokens equal the reference's."""
import numpy as np
import pytest
import torch

import finegrain

pytestmark = pytest.mark.onnx
FLOAT = {"name": "float", "rules": [{"role": "linear"}]}


@pytest.fixture(scope="module")
def kv_models(tiny_llama):
    gen = torch.Generator().manual_seed(5)
    example = (torch.randint(0, 256, (1, 16), generator=gen),)
    calib = [(torch.randint(0, 256, (1, 32), generator=gen),) for _ in range(2)]
    return {r: finegrain.compile(tiny_llama, example, recipe=r, calibration=calib, progress=False, kv_cache=True)
            for r in ("w4a16-g128", "w8a8")}


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("recipe", ["w4a16-g128", "w8a8"])
@pytest.mark.parametrize("style", ["qdq", "matmulnbits"])
def test_onnx_session_decodes_over_the_cache(kv_models, recipe, style):
    cm = kv_models[recipe]
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(6))
    ref = cm(x)
    with cm.session("onnx", style=style) as s:
        assert _rel(ref, s.run(x)) <= 1e-4
        logits, state = s.prefill(x[:, :7])
        outs = [logits]
        for t in range(7, 20):
            logits, state = s.step(state, x[:, t:t + 1])
            outs.append(logits)
    assert _rel(ref, torch.cat(outs, 1)) <= 1e-4
    assert state["past"][0].shape[2] == 20


def test_onnxruntime_genai_loads_and_generates(kv_models, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    from finegrain.backends.onnx import export_genai

    cm = kv_models["w4a16-g128"]
    info = export_genai(cm, tmp_path / "genai")
    assert {"model.onnx", "genai_config.json"} <= set(info["files"])
    assert all(f.startswith("MatMulNBits") for f in info["weights"].values())
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(7))
    tokens, logits = _genai_greedy(og, tmp_path / "genai", prompt, 26)
    assert len(tokens) == 20
    ref = cm.generate(prompt, 20)
    assert tokens == ref.tokens
    # the logits genai decoded from, position by position, are the reference's
    seq = torch.cat([prompt, torch.tensor([tokens[:-1]])], 1)
    want = cm(seq)[0, prompt.shape[1] - 1:]
    got = torch.stack(logits[:len(want)])
    assert _rel(want, got) <= 1e-4


def _genai_greedy(og, folder, prompt, max_length: int) -> tuple[list[int], list[torch.Tensor]]:
    """onnxruntime-genai's greedy tokens after ``prompt`` and the logits it chose each from."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    g = og.Generator(model, params)
    g.append_tokens(prompt[0].numpy().astype(np.int32))
    tokens, logits = [], [torch.from_numpy(np.array(g.get_logits())).reshape(-1)]
    while not g.is_done():
        g.generate_next_token()
        tokens.append(int(g.get_next_tokens()[0]))
        if not g.is_done():
            logits.append(torch.from_numpy(np.array(g.get_logits())).reshape(-1))
    return tokens, logits


def test_genai_export_needs_the_cache_graph(compiled, tmp_path):
    from finegrain.backends.onnx import export_genai
    from finegrain.errors import ExportError

    with pytest.raises(ExportError, match="kv_cache=True"):
        export_genai(compiled("w8a16"), tmp_path / "g")
    assert not (tmp_path / "g").exists()


KIVI = {"name": "kivi", "rules": [{"role": "linear", "weight": "int4-g32-asym-fp16"}], "kv_key": "int4-g4-asym-fp16-dyn",
        "kv_value": "int4-g8-asym-fp16-dyn", "kv_key_axis": "tokens", "kv_window": 4, "kv_sinks": 1,
        "kv_pre_rope": True, "kv_rotate": True}


def _incremental(s, x, prefill):
    logits, state = s.prefill(x[:, :prefill])
    outs = [logits]
    for t in range(prefill, x.shape[1]):
        logits, state = s.step(state, x[:, t:t + 1])
        outs.append(logits)
    return torch.cat(outs, 1)


def test_windowed_kv_cache_in_onnxruntime_and_genai(tiny_llama, tmp_path):
    """KIVI's writes (per-channel key groups, a float window, a sink, pre-RoPE rotated keys) exported
    as ONNX arithmetic (``onnx._kv_append_translation``): ONNX Runtime decoding over the cache gives
    the reference's logits, and onnxruntime-genai, driving the cache itself, generates the
    reference's tokens from the reference's logits at every position."""
    gen = torch.Generator().manual_seed(5)
    cm = finegrain.compile(tiny_llama, (torch.randint(0, 256, (1, 16), generator=gen),), recipe=KIVI, progress=False,
                           kv_cache=True)
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(6))
    ref = _incremental(cm.session(), x, 11)  # prefill releases a group of new tokens, decode one every 4 steps
    fp = finegrain.compile(tiny_llama, (x[:, :16],), recipe=FLOAT, progress=False)
    assert _rel(fp(x), ref) > 1e-3  # the writes quantize
    with cm.session("onnx") as s:
        assert _rel(ref, _incremental(s, x, 11)) <= 1e-4
    _genai_generates_the_reference(cm, x[:, :9], tmp_path)


def _genai_generates_the_reference(cm, prompt, tmp_path):
    """onnxruntime-genai, driving the cache of ``cm``'s export itself, generates the reference's tokens
    from the reference's logits at every position (prompt of 9 tokens, 15 new)."""
    og = pytest.importorskip("onnxruntime_genai")
    from finegrain.backends.onnx import export_genai

    export_genai(cm, tmp_path / "genai")
    tokens, logits = _genai_greedy(og, tmp_path / "genai", prompt, 24)
    assert tokens == cm.generate(prompt, 15).tokens
    seq = torch.cat([prompt, torch.tensor([tokens[:-1]])], 1)
    want = _incremental(cm.session(), seq, 9)[0, 8:]
    assert _rel(want, torch.stack(logits[:len(want)])) <= 1e-4


@pytest.mark.parametrize("family", ["qwen2", "phi3", "gemma3"])
def test_windowed_kv_cache_in_onnxruntime_across_families(family):
    """Biases (Qwen2), a fused qkv projection (Phi-3), sliding-window layers and QK-norm (Gemma-3)."""
    from tests.test_kv_cache import _family

    model = _family(family)
    cm = finegrain.compile(model, (torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1)),),
                           recipe={**KIVI, "rules": [{"role": "linear"}]}, progress=False, kv_cache=True)
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    ref = _incremental(cm.session(), x, 7)
    with cm.session("onnx") as s:
        assert _rel(ref, _incremental(s, x, 7)) <= 1e-4


@pytest.mark.parametrize("family,rotate", [("llama", False), ("qwen2", True)])
def test_grouped_head_keys_in_onnxruntime(family, rotate):
    """RotateKV's grouped-head keys (pre-RoPE, the channels of 2 heads reordered by
    calibration RMS, one Hadamard per group; keys arriving per-head rotated too) exported as ONNX arithmetic: ONNX Runtime over the
    cache gives the reference's logits, which the writes move away from the float model's."""
    from tests.test_kv_cache import _family

    model = _family(family)
    recipe = {**FLOAT, "name": f"kv-grouped-{family}", "kv_key": "int2-g8-asym-fp16-dyn",
              "kv_value": "int4-g8-asym-fp16-dyn", "kv_pre_rope": True, "kv_head_group": 2, "kv_reorder": True,
              "kv_window": 3, "kv_sinks": 1, "kv_rotate": rotate}
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    cm = finegrain.compile(model, (ids,), recipe=recipe, calibration=[(ids,)], progress=False, kv_cache=True)
    from finegrain.compiler.ops import KV_APPEND

    keys = [n for n in cm.gm.graph.nodes if n.target is KV_APPEND and n.kwargs.get("perm") is not None]
    assert len(keys) == 2 and all(n.kwargs["head_group"] == 2 for n in keys)  # both layers' keys, reordered
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    ref = _incremental(cm.session(), x, 9)
    with torch.no_grad():
        assert _rel(model(x).logits, ref) > 1e-3  # the writes quantize
    with cm.session("onnx") as s:
        assert _rel(ref, _incremental(s, x, 9)) <= 1e-4


def test_kv_cache_in_head_dim_groups_in_onnxruntime_and_genai(tiny_llama, tmp_path):
    """Keys / values quantized per token in groups of 8 along the head dim (a ``quantize`` /
    ``dequantize`` pair on each write, no window): ONNX Runtime over the cache gives the
    reference's logits, onnxruntime-genai its tokens."""
    recipe = {"name": "kv-g8", "rules": [{"role": "linear", "weight": "int4-g32-asym-fp16"}],
              "kv_key": "int4-g8-asym-fp16-dyn", "kv_value": "int4-g8-asym-fp16-dyn"}
    gen = torch.Generator().manual_seed(5)
    cm = finegrain.compile(tiny_llama, (torch.randint(0, 256, (1, 16), generator=gen),), recipe=recipe,
                           progress=False, kv_cache=True)
    assert not cm.check("onnx")
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(6))
    ref = _incremental(cm.session(), x, 7)
    per_token = {**recipe, "name": "kv-token", "kv_key": "int4-token-asym-fp16-dyn",
                 "kv_value": "int4-token-asym-fp16-dyn"}
    tok = finegrain.compile(tiny_llama, (x[:, :16],), recipe=per_token, progress=False, kv_cache=True)
    with cm.session("onnx") as s:
        err = _rel(ref, _incremental(s, x, 7))
    assert err <= 1e-4 and _rel(ref, _incremental(tok.session(), x, 7)) > 100 * err  # the groups are computed
    og = pytest.importorskip("onnxruntime_genai")
    from finegrain.backends.onnx import export_genai

    export_genai(cm, tmp_path / "genai")
    prompt = x[:, :6]
    tokens, _ = _genai_greedy(og, tmp_path / "genai", prompt, 20)
    assert tokens == cm.generate(prompt, 14).tokens


def test_static_fp8_kv_cache_in_onnxruntime_genai(tiny_llama, tmp_path):
    """``kv8-fp8-static`` (one calibrated E4M3 scale per layer for K and one for V) exported for
    onnxruntime-genai: the static QuantizeLinear / DequantizeLinear pair on each write, genai driving
    an fp32 cache holding the E4M3 values generates the reference's tokens from its logits."""
    from finegrain.compiler.recipe import with_kv

    gen = torch.Generator().manual_seed(5)
    calib = [(torch.randint(0, 256, (1, 32), generator=gen),) for _ in range(2)]
    cm = finegrain.compile(tiny_llama, (torch.randint(0, 256, (1, 16), generator=gen),),
                           recipe=with_kv(FLOAT, "kv8-fp8-static"), calibration=calib, progress=False, kv_cache=True)
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(6))
    fp = finegrain.compile(tiny_llama, (x[:, :16],), recipe=FLOAT, progress=False)
    assert _rel(fp(x), cm(x)) > 1e-4  # the writes quantize
    _genai_generates_the_reference(cm, x[:, :9], tmp_path)


def _saved(cm, tmp_path):
    cm.save(tmp_path / "art")
    return tmp_path / "art"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "gemma3"])
def test_static_int8_kv_cache_is_groupqueryattentions_own_int8_cache(family, tmp_path):
    """``kv8-static`` (INT8, one calibrated scale per layer for K and one for V) is the cache ONNX
    Runtime's GroupQueryAttention holds itself (``k_quant_type`` PER_TENSOR): each layer's writes and
    attention become one com.microsoft node over INT8 past inputs, the session carries the codes
    (one byte per element) between steps, and its logits equal the reference's through prefill and
    decode; the fused graph in torch equals the unfused one; onnxruntime-genai runs the same INT8 cache
    and generates the reference's tokens from its logits. Sliding-window layers (Gemma 3) are not
    fused, said per layer, and run over the fp32 cache holding the same values."""
    import onnx

    from finegrain.backends.onnx_gqa import fuse
    from finegrain.compiler.capture import kv_inputs
    from finegrain.compiler.recipe import with_kv
    from tests.test_kv_cache import _family

    model = _family(family)
    gen = torch.Generator().manual_seed(5)
    calib = [(torch.randint(0, 256, (1, 32), generator=gen),) for _ in range(2)]
    cm = finegrain.compile(model, (torch.randint(0, 256, (1, 8), generator=gen),), recipe=with_kv(FLOAT, "kv8-static"),
                           calibration=calib, progress=False, kv_cache=True)
    x = torch.randint(0, 256, (1, 24), generator=gen)
    ref = _incremental(cm.session(), x, 7)
    with torch.no_grad():
        assert _rel(model(x).logits, ref) > 1e-4  # the writes quantize
    fused, int8, skipped = fuse(finegrain.load(_saved(cm, tmp_path)).gm, cm.source.get("hf_config"))  # no node meta
    sliding = family == "gemma3"
    assert (int8 == set()) if sliding else (int8 == set(range(2, 2 + 2 * cm.kv["layers"])) and not skipped)
    assert not sliding or skipped == [f"layer {i}: sliding-window attention; GroupQueryAttention is fused only over "
                                      "plain causal attention" for i in range(cm.kv["layers"])]
    if not sliding:
        ins = list(kv_inputs(cm.kv, x))
        ins[2:] = [p.to(torch.int8) for p in ins[2:]]
        with torch.no_grad():
            out = fused(*ins)
        assert _rel(cm(x), out[0]) <= 1e-5 and all(p.dtype == torch.int8 for p in out[1:])
    with finegrain.load(tmp_path / "art").session("onnx") as s:  # the artifact as a user loads it
        ops = {n.op_type for n in onnx.load(str(s.path)).graph.node}
        assert ("GroupQueryAttention" in ops) != sliding
        assert _rel(ref, _incremental(s, x, 7)) <= 1e-5
        _, state = s.prefill(x[:, :7])
        want = torch.float32 if sliding else torch.int8
        assert all(p.dtype == want and p.shape[2] == 7 for p in state["past"])
        assert _rel(cm(x), s.run(x)) <= 1e-5
    if family == "llama":  # onnxruntime-genai allocates and carries GroupQueryAttention's INT8 cache itself
        _genai_generates_the_reference(cm, x[:, :9], tmp_path)
        pasts = [i for i in onnx.load(str(tmp_path / "genai" / "model.onnx")).graph.input if i.name.startswith("past")]
        assert {i.type.tensor_type.elem_type for i in pasts} == {onnx.TensorProto.INT8}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_klt_coded_keys_in_onnxruntime_and_genai(family, tmp_path):
    """Keys coded in their calibrated Karhunen-Loeve basis (``kv_key_klt``: per-head basis, mean and
    per-component widths as constants) exported as ONNX arithmetic: ONNX Runtime over the cache gives the
    reference's logits, and onnxruntime-genai generates the reference's tokens from its logits (Llama)."""
    from tests.test_kv_cache import _family

    model = _family(family)
    recipe = {**KIVI, "rules": [{"role": "linear"}], "name": f"kv-klt-{family}", "kv_key": "int2-g4-asym-fp16-dyn",
              "kv_key_klt": True}
    calib = [(torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(s)),) for s in (1, 2)]
    cm = finegrain.compile(model, (calib[0][0][:, :8],), recipe=recipe, calibration=calib, progress=False,
                           kv_cache=True)
    assert cm.kv["quantization"]["key_klt"] is not None
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    ref = _incremental(cm.session(), x, 7)
    with cm.session("onnx") as s:
        assert _rel(ref, _incremental(s, x, 7)) <= 1e-5
    if family == "llama":
        _genai_generates_the_reference(cm, x[:, :9], tmp_path)
