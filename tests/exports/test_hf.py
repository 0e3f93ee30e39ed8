"""compressed-tensors export (exports/hf.py), proven by the real client: ``transformers`` with the
``compressed-tensors`` package loads the directory on CPU and its logits equal finegrain's
reference; asymmetric checkpoints (which this transformers / compressed-tensors pair cannot load:
its meta-device path leaves the packed zero point unpacked) are decoded by the library's own
decompressor instead."""
import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import finegrain
from finegrain.errors import ExportError
from finegrain.exports.hf import load_hf_export, pack_int32

ct = pytest.importorskip("compressed_tensors")


def _recipe(weight, act=None, **rule):
    r = {"role": "linear", "weight": weight, **rule}
    if act:
        r["activation"] = act
    return {"name": weight + (f"-{act}" if act else ""), "rules": [r]}


@pytest.fixture(scope="module")
def llama128(tiny128):
    get, inputs, model = tiny128
    return get, inputs(21), model


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()


@pytest.mark.parametrize("recipe", [_recipe("int4-g64-sym-fp16"), _recipe("int3-g64-sym-fp16"),
                                    _recipe("int2-g32-sym-fp16"), _recipe("int4-channel-sym-fp16"),
                                    "w8a16", "fp8"], ids=lambda r: r if isinstance(r, str) else r["name"])
def test_transformers_loads_the_export_and_matches_the_reference(llama128, recipe, tmp_path):
    get, x, _ = llama128
    cm = get(recipe)
    info = cm.export_hf(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(n.removesuffix(".weight") for n in cm.quantized)
    hf = load_hf_export(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        ref, got = cm(x), hf(x).logits
    assert _rel(ref, got) <= 1e-4, (recipe, _rel(ref, got), info["forms"])
    # the weights really are stored packed: the file is smaller than the float model's
    assert info["weights_bytes"] < 0.75 * sum(p.numel() * 4 for p in llama128[2].parameters())


def test_w8a8_dynamic_activations_follow_the_clients_convention(llama128, tmp_path):
    """INT8 weights x INT8 dynamic per-token activations (int-quantized): compressed-tensors scales a
    token by max|x| / 127.5, finegrain by max|x| / 127, so the logits agree to activation rounding."""
    get, x, model = llama128
    cm = get("w8a8")
    cm.export_hf(tmp_path / "hf")
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    assert next(iter(qc["config_groups"].values()))["input_activations"]["strategy"] == "token"
    hf = load_hf_export(tmp_path / "hf")
    with torch.no_grad():
        ref, got, fp = cm(x), hf(x).logits, model(x).logits
    # activations are quantized by the client: its output is not the weight-only model's ...
    w_only = get("w8a16")(x)
    assert _rel(w_only, got) > 1e-4
    # ... and it is as close to finegrain's W8A8 as two roundings of the same activations allow
    assert _rel(ref, got) < 0.25 * _rel(fp.logits if hasattr(fp, "logits") else fp, ref) + 2e-2


def test_mixed_formats_are_one_config_group_each(llama128, tmp_path):
    get, x, _ = llama128
    recipe = {"name": "mixed", "rules": [{"role": "linear", "weight": "int8-channel-sym-fp16"},
                                         {"role": "linear", "pattern": r"mlp\.", "weight": "int4-g64-sym-fp16"}]}
    cm = get(recipe)
    cm.export_hf(tmp_path / "hf")
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    bits = {g["weights"]["num_bits"]: sorted(g["targets"]) for g in qc["config_groups"].values()}
    assert all(".mlp." in t for t in bits[4]) and all(".self_attn." in t for t in bits[8])
    with torch.no_grad():
        assert _rel(cm(x), load_hf_export(tmp_path / "hf")(x).logits) <= 1e-4


def test_asymmetric_weights_decode_with_the_librarys_decompressor(llama128, tmp_path):
    """``w4a16-g64`` (asymmetric, zero points packed along the output dim): compressed-tensors'
    PackedQuantizationCompressor.decompress gives finegrain's dequantized weights exactly, and a
    Llama with them gives the reference logits."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    from finegrain.models.tiny import tiny_llama

    get, x, _ = llama128
    cm = get("w4a16-g64")
    cm.export_hf(tmp_path / "hf")
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["weights"]["symmetric"] is False and qc["format"] == "pack-quantized"
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    model = tiny_llama(seed=5, hidden=128)  # different random weights: every tensor must come from the file
    state = {}
    for key in list(sd):
        if key.endswith(".weight_packed"):
            mod = key.removesuffix(".weight_packed")
            local = {k.removeprefix(mod + "."): sd.pop(f"{mod}.{k.removeprefix(mod + '.')}")
                     for k in [f"{mod}.weight_packed", f"{mod}.weight_scale", f"{mod}.weight_zero_point",
                               f"{mod}.weight_shape"]}
            assert local["weight_zero_point"].shape[0] == -(-local["weight_shape"][0].item() * 4 // 32)
            w = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            ref = _dequantized(cm, mod + ".weight")
            assert torch.equal(w.float(), ref), mod
            state[mod + ".weight"] = w.float()
    state.update({k: v for k, v in sd.items() if not k.endswith("weight_shape")})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    with torch.no_grad():
        assert _rel(cm(x), model(x).logits) <= 1e-5


def _dequantized(cm, name):
    from finegrain.exports.graph import read_graph

    lin = read_graph(cm.gm).linears[name]
    return lin.fmt.dequantize(lin.q, torch.float32)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), cols=st.integers(1, 90), seed=st.integers(0, 2**31 - 1))
def test_packing_is_the_librarys(bits, rows, cols, seed):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    rng = np.random.default_rng(seed)
    vals = rng.integers(0, 1 << bits, size=(rows, cols))
    ours = pack_int32(vals.astype(np.uint32), bits)
    theirs = pack_to_int32(torch.from_numpy(vals - (1 << (bits - 1))).to(torch.int8), bits)
    assert np.array_equal(ours, theirs.numpy())


def test_encoder_without_its_pooler_is_refused_by_name(minilm, tmp_path):
    """Capture keeps last_hidden_state and drops BertModel's pooler, so its weights are not in the
    artifact: the export says so instead of writing a checkpoint with a made-up pooler."""
    from finegrain.jobs import compile_loaded

    cm = compile_loaded(minilm, _recipe("int4-g64-sym-fp16"), samples=8, seq_len=32, progress=False)
    with pytest.raises(ExportError, match=r"pooler\.dense\.weight, pooler\.dense\.bias: the BertModel checkpoint needs this tensor"):
        cm.export_hf(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("recipe, needle", [
    ("w4a16-g128", "K = 192 is not a multiple of the group size 128"),
    ("w4a8-rot", "online Hadamard"),
    ("w8a8-os+", r"smooth_shift[^\n]*: a tensor in the compiled graph \(a fold added it\)"),  # a line per reason
    ("mxfp6", "has no compressed-tensors form here"),
    ("bitmod-w4", "bitmod4"),
    ("w8a8-static", "static activation format"),
])
def test_refusals_name_the_layer_and_write_nothing(llama128, recipe, needle, tmp_path):
    get, _, _ = llama128
    with pytest.raises(ExportError) as e:
        get(recipe).export_hf(tmp_path / "hf")
    assert re.search(needle, str(e.value)) and "model.layers." in str(e.value), str(e.value)
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == []


def test_non_transformers_model_is_refused(tmp_path):
    lin = torch.nn.Sequential(torch.nn.Linear(64, 64))
    cm = finegrain.compile(lin, (torch.randn(2, 64),), recipe="w8a16", progress=False)
    with pytest.raises(ExportError, match="no Hugging Face config"):
        cm.export_hf(tmp_path / "hf")


def test_the_config_survives_save_and_load(llama128, tmp_path):
    get, x, _ = llama128
    cm = get(_recipe("int4-g64-sym-fp16"))
    cm.save(tmp_path / "art")
    loaded = finegrain.load(tmp_path / "art")
    loaded.export_hf(tmp_path / "hf")
    with torch.no_grad():
        assert _rel(cm(x), load_hf_export(tmp_path / "hf")(x).logits) <= 1e-4


@pytest.mark.parametrize("weight, fmt_name", [("e2m1-g16-sym-e4m3", "nvfp4-pack-quantized"),
                                              ("e2m1-g32-sym-e8m0", "mxfp4-pack-quantized")], ids=["nvfp4", "mxfp4"])
def test_fp4_weights(llama128, weight, fmt_name, tmp_path):
    """NVFP4 / MXFP4 weight-only: the library's own FP4 unpacker and scale decoding give finegrain's
    codes and scales (fp32, to an ulp of the NVFP4 tensor-scale division); transformers runs the
    directory, in bfloat16 (compressed-tensors decodes FP4 to bf16 only)."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from safetensors.torch import load_file

    get, x, _ = llama128
    cm = get(_recipe(weight))
    cm.export_hf(tmp_path / "hf")
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == fmt_name
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    from finegrain.exports.graph import read_graph

    for name, lin in read_graph(cm.gm).linears.items():
        mod = name.removesuffix(".weight")
        n, k = lin.shape
        vals = unpack_fp4_from_uint8(sd[f"{mod}.weight_packed"], n, k, dtype=torch.float32)
        scale = sd[f"{mod}.weight_scale"]
        if fmt_name.startswith("nv"):
            eff = scale.float() / sd[f"{mod}.weight_global_scale"]
        else:
            eff = torch.exp2(scale.float() - 127)
        w = (vals.reshape(n, -1, lin.fmt.group_size) * eff.unsqueeze(-1)).reshape(n, k)
        ref = lin.fmt.dequantize(lin.q, torch.float32)
        assert ((w - ref).abs() <= 2e-7 * ref.abs().max()).all(), mod
    hf = load_hf_export(tmp_path / "hf", dtype=torch.bfloat16)
    with torch.no_grad():
        assert _rel(cm(x), hf(x).logits) < 2e-2


def test_fp4_activations_are_refused(llama128, tmp_path):
    get, _, _ = llama128
    with pytest.raises(ExportError, match="FP4 weights with e2m1-g16-sym-e4m3-dyn activations"):
        get("nvfp4").export_hf(tmp_path / "hf")


def test_decode_with_the_librarys_compressors_gives_the_reference(llama128, tmp_path):
    from finegrain.exports.hf import asymmetric_groups, decode_hf_export

    get, x, _ = llama128
    for recipe in ("w4a16-g64", _recipe("int3-g64-sym-fp16")):
        cm = get(recipe)
        out = tmp_path / (recipe if isinstance(recipe, str) else recipe["name"])
        cm.export_hf(out)
        assert bool(asymmetric_groups(out)) == (recipe == "w4a16-g64")
        with torch.no_grad():
            assert _rel(cm(x), decode_hf_export(out)(x).logits) <= 1e-5


def test_half_precision_export_is_smaller_and_close(llama128, tmp_path):
    get, x, _ = llama128
    cm = get(_recipe("int4-g64-sym-fp16"))
    full = cm.export_hf(tmp_path / "fp32")
    half = cm.export_hf(tmp_path / "fp16", dtype="float16")
    assert half["weights_bytes"] < 0.8 * full["weights_bytes"]
    from safetensors.torch import load_file

    sd32, sd16 = load_file(str(tmp_path / "fp32" / "model.safetensors")), load_file(str(tmp_path / "fp16" / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight_scale"
    assert sd16[key].dtype == torch.float16 and torch.equal(sd16[key].float(), sd32[key])  # fp16 scales: exact
    hf = load_hf_export(tmp_path / "fp16")  # dtype float32: the fp16 tensors widen on load
    with torch.no_grad():
        assert _rel(cm(x), hf(x).logits) < 1e-2
    with pytest.raises(ExportError, match="dtype 'int8'"):
        cm.export_hf(tmp_path / "bad", dtype="int8")


def test_overwrite_replaces_only_a_finegrain_export(llama128, tmp_path):
    get, _, _ = llama128
    cm = get(_recipe("int4-g64-sym-fp16"))
    cm.export_hf(tmp_path / "hf")
    prov = json.loads((tmp_path / "hf" / "finegrain_export.json").read_text())
    assert prov["finegrain_export"] == "compressed-tensors" and prov["recipe"] == "int4-g64-sym-fp16"
    with pytest.raises(finegrain.errors.InputError, match="already exists"):
        cm.export_hf(tmp_path / "hf")
    cm.export_hf(tmp_path / "hf", overwrite=True)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep me")
    with pytest.raises(finegrain.errors.InputError, match="not a finegrain artifact"):
        cm.export_hf(tmp_path / "theirs", overwrite=True)
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def kv_static(tiny128):
    """The tiny Llama compiled over its KV cache with W4 weights and vLLM's static FP8 cache, and with
    the float weights and the same cache."""
    from finegrain.compiler.recipe import with_kv

    _, inputs, model = tiny128
    gen = torch.Generator().manual_seed(11)
    calib = [(torch.randint(0, 256, (1, 32), generator=gen),) for _ in range(3)]
    return {name: finegrain.compile(model, inputs(16), recipe=with_kv(r, "kv8-fp8-static"), calibration=calib,
                                    progress=False, kv_cache=True)
            for name, r in (("w4", _recipe("int4-g64-sym-fp16")), ("w4-asym", _recipe("int4-g64-asym-fp16")),
                            ("float", {"name": "f", "rules": []}))}


@pytest.mark.parametrize("weights", ["w4", "w4-asym", "float"])
def test_static_fp8_kv_cache_exports_as_the_kv_cache_scheme(kv_static, tiny128, weights, tmp_path):
    """The static FP8 cache is written as compressed-tensors' ``kv_cache_scheme`` (FP8, per tensor,
    static) with each layer's ``self_attn.k_scale`` / ``v_scale``: what vLLM reads for its FP8 cache.
    Loaded by transformers + compressed-tensors (the library's QuantizedKVCache quantizing each cache
    update), the full forward gives finegrain's logits, and so does decoding one token at a time over
    transformers' own cache; a cache-less export of the same weights gives other logits. Asymmetric
    weights (which from_pretrained cannot load here) go through the library's decompressor, hooked
    the same way."""
    from safetensors.torch import load_file

    from finegrain.exports.hf import decode_hf_export, hook_kv_cache_scheme

    cm = kv_static[weights]
    cm.save(tmp_path / "art")
    cm = finegrain.load(tmp_path / "art")
    info = cm.export_hf(tmp_path / "hf")
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"] | {"observer": None} == {
        "num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False, "group_size": None,
        "block_structure": None, "observer": None, "actorder": None}
    assert qc["format"] == ("dense" if weights == "float" else "pack-quantized")
    assert len(qc["config_groups"]) == (0 if weights == "float" else 1)
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for i in range(cm.kv["layers"]):
        for kind in ("key", "value"):
            assert torch.equal(sd[f"model.layers.{i}.self_attn.{kind[0]}_scale"],
                               getattr(getattr(cm.gm.kv_scale, str(i)), kind).reshape(1))
    x = tiny128[1](21)
    hf = (decode_hf_export if weights == "w4-asym" else load_hf_export)(tmp_path / "hf")
    assert hook_kv_cache_scheme(hf, qc["kv_cache_scheme"], tmp_path / "hf" / "model.safetensors") == 0  # hooked once
    with torch.no_grad():
        ref, got = cm(x), hf(x).logits
        assert _rel(ref, got) <= 1e-5, (weights, _rel(ref, got))
        out = hf(x[:, :6], use_cache=True)  # prefill, then decode over transformers' own (quantized) cache
        steps = [out.logits]
        for t in range(6, 21):
            out = hf(x[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    assert _rel(ref, torch.cat(steps, 1)) <= 1e-4
    plain = finegrain.compile(tiny128[2], tiny128[1](16), recipe={
        "w4": _recipe("int4-g64-sym-fp16"), "w4-asym": _recipe("int4-g64-asym-fp16"),
        "float": {"name": "f", "rules": [{"role": "linear"}]}}[weights], progress=False)
    assert _rel(ref, plain(x)) > 100 * _rel(ref, got) + 1e-4  # the cache's FP8 rounding is in the logits


def test_kv_caches_with_no_checkpoint_form_are_refused_by_name(tiny128, kv_static, tmp_path):
    """Dynamic per-token KV quantizers and KIVI's windowed writes have no compressed-tensors form:
    refused by node, nothing written (never exported as a float cache); GGUF has no cache scales."""
    from finegrain.compiler.recipe import with_kv

    _, inputs, model = tiny128
    for kv, needle in (("kv8-fp8", "dynamic KV-cache quantizer (e4m3-token-sym-fp32-dyn"),
                       ("kivi4", "windowed KV-cache write (int4-g32-asym-fp16-dyn, axis tokens, window 128")):
        cm = finegrain.compile(model, inputs(16), recipe=with_kv(_recipe("int4-g64-sym-fp16"), kv), progress=False,
                               kv_cache=True)
        with pytest.raises(ExportError, match="kv8-fp8-static") as e:
            cm.export_hf(tmp_path / "hf")
        assert needle in str(e.value) and not (tmp_path / "hf").exists()
    with pytest.raises(ExportError, match="static scales .* have no GGUF form"):
        kv_static["w4"].export_gguf(tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_export_refusals_name_each_reason_once_on_their_own_lines(tiny128, tmp_path, capsys):
    """Many places refused for one reason (every layer's windowed write, every online Hadamard) make
    one line naming the first few and how many more; the CLI prints the lines as lines."""
    from finegrain.cli import main
    from finegrain.compiler.recipe import with_kv
    from finegrain.errors import listed

    assert listed([f"node n{i}: why" for i in range(5)] + ["w: other", "loose"]) == \
        "node n0, node n1, node n2 and 2 more: why\n  w: other\n  loose"
    _, inputs, model = tiny128
    cm = finegrain.compile(model, inputs(16), recipe=with_kv(_recipe("int4-g64-sym-fp16"), "kivi4"), progress=False,
                           kv_cache=True)
    cm.save(tmp_path / "a")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "a"), "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "\\x0a" not in err and not (tmp_path / "hf").exists()
    windowed = [line for line in err.splitlines() if "windowed KV-cache write" in line]
    assert len(windowed) == 2  # keys (axis tokens) and values (axis head_dim): one line each, both layers on it
    assert all(line.count("kv_append") == 2 for line in windowed), windowed


@pytest.mark.parametrize("family", ["qwen2", "mistral", "qwen3", "phi3", "gemma3"])
def test_static_fp8_kv_cache_export_across_families(family, tmp_path):
    """Each family's static FP8 cache (q/k/v biases, QK-norm, fused qkv, sliding-window layers): the
    decode over finegrain's cache equals its full forward, and transformers + compressed-tensors
    loading the export give those logits exactly."""
    from finegrain.compiler.recipe import with_kv
    from tests.test_kv_cache import _family, _incremental

    model = _family(family)
    gen = torch.Generator().manual_seed(5)
    calib = [(torch.randint(0, 256, (1, 32), generator=gen),) for _ in range(2)]
    cm = finegrain.compile(model, (torch.randint(0, 256, (1, 8), generator=gen),),
                           recipe=with_kv({"name": "f", "rules": []}, "kv8-fp8-static"), calibration=calib,
                           progress=False, kv_cache=True)
    x = torch.randint(0, 256, (1, 24), generator=gen)
    full = cm(x)
    assert _rel(full, _incremental(cm, x, 5)[0]) <= 1e-5
    with torch.no_grad():
        assert _rel(model(x).logits, full) > 1e-3  # the cache's FP8 rounding is in the logits
    cm.export_hf(tmp_path / "hf")
    with torch.no_grad():
        assert _rel(full, load_hf_export(tmp_path / "hf")(x).logits) <= 1e-6
