"""ONNX export and the ONNX Runtime backend, against the torch reference on a tiny Llama:
weight forms per style, exactness at accuracy level 0, activation quantization and online
Hadamard within their error bound, dynamic sequence length, clear refusals, atomic files."""
import re

import onnx
import pytest
import torch

from finegrain.backends.onnx import ExportError, OnnxSession

pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.onnx


def _w(tag, act=None, **kw):
    rule = {"role": "linear", "weight": tag}
    if act:
        rule["activation"] = act
    return {"name": tag, "rules": [rule], **kw}


def _ops(path):
    return [(n.domain, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.mark.parametrize("tag,qdq_form,nbits_form", [
    ("int4-g32-asym-fp16", "DequantizeLinear(uint4, block 32)", "MatMulNBits(bits=4, block_size=32"),  # odd block count
    ("int4-g64-asym-fp16", "DequantizeLinear(uint4, block 64)", "MatMulNBits(bits=4, block_size=64"),  # ragged K=96
    ("int4-g32-sym-fp16", "DequantizeLinear(int4, block 32)", "MatMulNBits(bits=4, block_size=32"),
    ("int8-channel-sym-fp16", "DequantizeLinear(int8, axis 1)", "MatMulNBits(bits=8, block_size="),
    ("int3-g32-asym-fp16", "DequantizeLinear(uint4, block 32)", "MatMulNBits(bits=4, block_size=32"),
])
def test_weight_only_is_exact_at_accuracy_level_0(compiled, tiny_inputs, tmp_path, tag, qdq_form, nbits_form):
    cm = compiled(_w(tag))
    _, _, test = tiny_inputs
    ref = cm(test)
    for style, form in (("qdq", qdq_form), ("matmulnbits", nbits_form)):
        info = cm.export_onnx(tmp_path / f"{style}.onnx", style=style)
        assert len(info["weights"]) == len(cm.quantized) == 14 and all(f.startswith(form) for f in info["weights"].values())
        ops = _ops(tmp_path / f"{style}.onnx")
        assert not any(d == "finegrain" for d, _ in ops)
        if style == "matmulnbits":
            assert ops.count(("com.microsoft", "MatMulNBits")) == 14
        else:
            assert ops.count(("", "DequantizeLinear")) == 14
        out = OnnxSession(cm, path=tmp_path / f"{style}.onnx").run(test)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), style


@pytest.mark.parametrize("tag", ["e2m1-g32-sym-e8m0",  # MXFP4
                                 "e2m1-g16-sym-e4m3",  # NVFP4 (two-level scales)
                                 "e4m3-g32-sym-e8m0",  # MXFP8
                                 "e2m3-g64-sym-fp16",  # FP6, ragged last group at K = 96
                                 "e5m2-channel-sym-fp32",
                                 "nf4-g32-sym-fp16",  # NormalFloat levels
                                 "lm4-g32-sym-fp16",  # Lloyd-Max: the tensor's own codebook
                                 "bitmod4-g32-sym-fp16", "bitmod3-g64-sym-fp16"])  # a datatype per group
def test_table_decoded_weights_are_exact(compiled, tiny_inputs, tmp_path, tag):
    """Minifloat weights DequantizeLinear does not take and codebook weights: codes gathered from the
    format's value table (BitMoD: at the group's datatype) times the gathered group scales, the
    reference's decode bit for bit; codes of up to 4 bits two per byte."""
    from finegrain.formats import QuantFormat

    cm = compiled(_w(tag))
    _, _, test = tiny_inputs
    ref = cm(test)
    info = cm.export_onnx(tmp_path / "m.onnx")
    assert len(info["weights"]) == len(cm.quantized) == 14
    assert all("Gather from" in form for form in info["weights"].values())
    ops = _ops(tmp_path / "m.onnx")
    assert not any(d == "finegrain" for d, _ in ops) and ops.count(("", "DequantizeLinear")) == 0
    nibbles = QuantFormat.parse(tag).bits <= 4
    assert (ops.count(("", "BitShift")) == 14) == nibbles
    m = onnx.load(str(tmp_path / "m.onnx"))
    name = "model.layers.0.self_attn.q_proj.weight"
    q = next(t for t in m.graph.initializer if t.name == f"{name}.qweight")
    n, k = next(v for v in cm.quantized.values() if v["weight"] == name)["shape"]
    assert onnx.numpy_helper.to_array(q).shape == ((k + 1) // 2 if nibbles else k, n)
    out = OnnxSession(cm, path=tmp_path / "m.onnx").run(test)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert cm.check("onnx") == []


def test_fp4_weights_with_an_odd_k(tmp_path):
    """FP4 codes two per byte along K with K odd (the last byte half padding, sliced off) and a ragged
    last group: ONNX Runtime equals the reference."""
    import finegrain

    torch.manual_seed(0)
    lin = torch.nn.Linear(37, 24)
    x = torch.randn(3, 37)
    cm = finegrain.compile(lin, (x,), recipe={"name": "fp4", "rules": [{"pattern": ".", "weight": "e2m1-g16-sym-e4m3"}]},
                           progress=False, dynamic=False)
    info = cm.export_onnx(tmp_path / "m.onnx")
    assert list(info["weights"].values())[0].startswith("4-bit codes two per byte")
    ref = cm(x)
    out = OnnxSession(cm, path=info["path"]).run(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (ref - lin(x)).abs().max() > 1e-3 * ref.abs().max()  # the weights are quantized


def test_packed_weights_are_smaller_than_float(compiled, tmp_path):
    cm = compiled(_w("int4-g32-asym-fp16"))
    fp = compiled({"name": "fp", "rules": []})
    q = cm.export_onnx(tmp_path / "q.onnx", style="matmulnbits")["bytes"]
    f = fp.export_onnx(tmp_path / "f.onnx")["bytes"]
    w = sum(v["shape"][0] * v["shape"][1] for v in cm.quantized.values())
    assert f - q > 0.75 * w * 4 * (1 - 4.6 / 32)  # the linears shrink from 32 to ~4.5 bits per weight


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-static", "w4a8-g128", "w4a4-rot", "w4a4-hadamard", "fp8"])
def test_activation_quantization_and_hadamard_match_the_reference(compiled, tiny_inputs, tmp_path, recipe):
    cm = compiled(recipe)
    _, _, test = tiny_inputs
    ref = cm(test)
    info = cm.export_onnx(tmp_path / "m.onnx", style="matmulnbits")
    ops = _ops(tmp_path / "m.onnx")
    if "rot" in recipe or "hadamard" in recipe:
        assert any(n.startswith("finegrain.hadamard") for n in _initializers(tmp_path / "m.onnx"))
    g = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph
    to_fp8 = [n for n in g.node if n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT8E4M3FN
                                                               for a in n.attribute)]
    assert ("", "Round") in ops or to_fp8  # the activation quantizer is in the graph
    out = OnnxSession(cm, path=info["path"]).run(test)
    # identical arithmetic up to fp32 rounding; a rounding tie flipping one code stays far below this
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()
    fake_free = compiled(_w(cm.recipe.rules[0].weight.tag))(test)
    assert (ref - fake_free).abs().max() > 10 * (out - ref).abs().max()  # the check can see activation error


@pytest.mark.parametrize("act", ["int4-g40-asym-fp16-dyn", "int4-g64-sym-fp32-dyn-clip0.85",
                                 "int8-g32-sym-e8m0-dyn", "int4-g40-sym-e4m3-dyn",  # MXINT8, NVINT4 scales
                                 "e2m1-g32-sym-e8m0-dyn", "e2m1-g16-sym-e4m3-dyn",  # MXFP4, NVFP4
                                 "e4m3-g32-sym-e8m0-dyn", "e3m2-g40-sym-fp16-dyn"])  # MXFP8, FP6 ragged
def test_activation_groups_along_the_row_match_the_reference(compiled, tiny_inputs, tmp_path, act):
    """Dynamic activation groups (W4A4 g64, the ``w4a4kv4`` preset's): a ragged last group (g40 over
    the tiny model's 64 / 96 features) padded as the reference pads it, scales per group."""
    cm = compiled({**_w("int8-channel-sym-fp32", act), "name": f"w8-{act}"})
    _, _, test = tiny_inputs
    ref = cm(test)
    out = OnnxSession(cm, path=cm.export_onnx(tmp_path / "m.onnx")["path"]).run(test)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    tok = re.sub(r"-g\d+-", "-token-", act)
    per_token = compiled({**_w("int8-channel-sym-fp32", tok), "name": f"w8-{tok}"})(test)
    assert (ref - per_token).abs().max() > 100 * (out - ref).abs().max()  # the groups are what the session computes


@pytest.mark.parametrize("preset", ["mxfp4", "nvfp4-rot", "mxfp8", "mxfp6"])
def test_mx_and_nv_presets_run_in_onnxruntime(compiled, tiny_inputs, tmp_path, preset):
    """The OCP MX / NVFP4 presets end to end (minifloat weights by table lookup, minifloat activations
    in groups with E8M0 / two-level E4M3 scales, NVFP4-rot's online Hadamard): ONNX Runtime within
    fp32 rounding of the reference, and far from the same weights with float activations."""
    cm = compiled(preset)
    assert cm.check("onnx") == []
    _, _, test = tiny_inputs
    ref = cm(test)
    out = OnnxSession(cm, path=cm.export_onnx(tmp_path / "m.onnx")["path"]).run(test)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    rule = cm.recipe.rules[0]
    weight_only = compiled({**cm.recipe.to_dict(), "name": f"{preset}-w", "rules": [
        {"role": rule.role, "weight": rule.weight.tag}]})(test)
    assert (ref - weight_only).abs().max() > 100 * (out - ref).abs().max()


def _initializers(path):
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer]


def test_accuracy_level_4_quantizes_activations(compiled, tiny_inputs, tmp_path):
    cm = compiled(_w("int4-g32-asym-fp16"))
    _, _, test = tiny_inputs
    ref = cm(test)
    info = cm.export_onnx(tmp_path / "m.onnx", style="matmulnbits", accuracy_level=4)
    nodes = [n for n in onnx.load(str(info["path"])).graph.node if n.op_type == "MatMulNBits"]
    assert all(next(a.i for a in n.attribute if a.name == "accuracy_level") == 4 for n in nodes)
    err4 = (OnnxSession(cm, path=info["path"], accuracy_level=4).run(test) - ref).abs().max()
    assert 1e-5 * ref.abs().max() < err4 < 0.1 * ref.abs().max()


def test_dynamic_sequence_length(compiled, tmp_path):
    cm = compiled(_w("int4-g32-asym-fp16"))
    s = OnnxSession(cm, style="matmulnbits")
    for n in (3, 57):
        ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n))
        assert (s.run(ids) - cm(ids)).abs().max() <= 1e-5 * cm(ids).abs().max()


def test_refusals_name_the_layer_and_leave_nothing(compiled, tmp_path):
    cm = compiled(_w("e4m3-g32x32-sym-fp32"))  # 2-D weight blocks
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj.*e4m3-g32x32-sym-fp32"):
        cm.export_onnx(tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []
    ok = compiled(_w("int4-g32-asym-fp16"))
    with pytest.raises(ExportError, match="style"):
        ok.export_onnx(tmp_path / "z.onnx", style="gguf")
    ok.export_onnx(tmp_path / "z.onnx")
    with pytest.raises(ExportError, match="exists"):
        ok.export_onnx(tmp_path / "z.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.onnx"]  # no temporary directories left


def test_cli_export_check(compiled, tmp_path, capsys):
    from finegrain.cli import main

    cm = compiled(_w("int4-g32-asym-fp16"))
    cm.save(tmp_path / "a")
    assert main(["export", str(tmp_path / "a"), "--onnx", str(tmp_path / "m.onnx"), "--style", "matmulnbits",
                 "--check"]) == 0
    out = capsys.readouterr().out
    assert "MatMulNBits" in out and "max |diff|" in out
    assert main(["export", str(tmp_path / "a"), "--onnx", str(tmp_path / "m.onnx")]) == 2  # exists


def test_a_reused_export_must_match_its_artifact_and_options(compiled, tiny_inputs, tmp_path):
    """``reuse``: export once, run the same file later; a file from another artifact or another
    style / MatMulNBits level is refused by name, never run or replaced."""
    from finegrain.backends.onnx import read_provenance

    cm, other = compiled("w4a16-g64"), compiled("w8a16")
    _, _, test = tiny_inputs
    f = tmp_path / "m.onnx"
    s1 = OnnxSession(cm, style="matmulnbits", reuse=f)
    assert not s1.reused and f.is_file()
    meta = read_provenance(f)
    assert meta["finegrain.artifact"] == cm.fingerprint() and meta["finegrain.style"] == "matmulnbits"
    mtime = f.stat().st_mtime_ns
    s2 = OnnxSession(cm, style="matmulnbits", reuse=f)
    assert s2.reused and f.stat().st_mtime_ns == mtime
    assert torch.equal(s1.run(test), s2.run(test))
    with pytest.raises(ExportError, match="artifact fingerprint differs"):
        OnnxSession(other, style="matmulnbits", reuse=f)
    with pytest.raises(ExportError, match=r"style 'matmulnbits' \(wanted 'qdq'\)"):
        OnnxSession(cm, style="qdq", reuse=f)
    with pytest.raises(ExportError, match=r"accuracy_level '0' \(wanted '4'\)"):
        OnnxSession(cm, style="matmulnbits", accuracy_level=4, reuse=f)
    f.with_suffix(".txt").write_text("not onnx")
    with pytest.raises(ExportError, match="not an ONNX model"):
        OnnxSession(cm, reuse=f.with_suffix(".txt"))
    assert f.stat().st_mtime_ns == mtime

