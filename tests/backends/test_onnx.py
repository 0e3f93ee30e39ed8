"""ONNX export and the ONNX Runtime backend, against the torch reference on a tiny Llama:
weight forms per style, exactness at accuracy level 0, activation quantization and online
Hadamard within their error bound, dynamic sequence length, clear refusals, atomic files; MoE
experts (tiny Mixtral / Qwen2-MoE) unrolled per expert."""
import re

import onnx
import pytest
import torch

import finegrain
from finegrain.backends.onnx import ExportError, OnnxSession
from tests.backends.linears import cycled, weight_name

pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.onnx


def _w(tag, act=None, **kw):
    rule = {"role": "linear", "weight": tag}
    if act:
        rule["activation"] = act
    return {"name": tag, "rules": [rule], **kw}


def _ops(path):
    return [(n.domain, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node]


# weight format -> (its QDQ form, its MatMulNBits form); cycled over the 14 linears, the order puts
# int4-g64 on the first down_proj (K = 96: a ragged group) and int4-g32 on the last (an odd block count)
WEIGHT_FORMS = {
    "int4-g32-sym-fp16": ("DequantizeLinear(int4, block 32)", "MatMulNBits(bits=4, block_size=32"),
    "int4-g64-asym-fp16": ("DequantizeLinear(uint4, block 64)", "MatMulNBits(bits=4, block_size=64"),
    "int8-channel-sym-fp16": ("DequantizeLinear(int8, axis 1)", "MatMulNBits(bits=8, block_size="),
    "int4-g32-asym-fp16": ("DequantizeLinear(uint4, block 32)", "MatMulNBits(bits=4, block_size=32"),
    "int3-g32-asym-fp16": ("DequantizeLinear(uint4, block 32)", "MatMulNBits(bits=4, block_size=32"),
}


def _weights_cycled(tags: list, name: str, **kw) -> dict:
    """A recipe with ``tags`` cycled over the 14 linears as their weight formats."""
    return {"name": name, "rules": [{"role": "linear", "pattern": p, "weight": t} for p, t in cycled(tags)], **kw}


def test_weight_only_is_exact_at_accuracy_level_0(compiled, tiny_inputs, tmp_path):
    """Five weight formats over the 14 linears in one model, exported in both styles: each linear in
    its format's form, no finegrain op left, ONNX Runtime equal to the reference."""
    cm = compiled(_weights_cycled(list(WEIGHT_FORMS), "weight-forms"))
    _, _, test = tiny_inputs
    ref = cm(test)
    for style, which in (("qdq", 0), ("matmulnbits", 1)):
        info = cm.export_onnx(tmp_path / f"{style}.onnx", style=style)
        assert len(info["weights"]) == len(cm.quantized) == 14
        for p, tag in cycled(list(WEIGHT_FORMS)):
            assert info["weights"][weight_name(p)].startswith(WEIGHT_FORMS[tag][which]), (style, p, tag)
        ops = _ops(tmp_path / f"{style}.onnx")
        assert not any(d == "finegrain" for d, _ in ops)
        if style == "matmulnbits":
            assert ops.count(("com.microsoft", "MatMulNBits")) == 14
        else:
            assert ops.count(("", "DequantizeLinear")) == 14
        out = OnnxSession(cm, path=tmp_path / f"{style}.onnx").run(test)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), style


# cycled over the 14 linears: item 4 lands on a gate_proj and the last down_proj, item 6 on the first
# down_proj (K = 96: ragged groups of 64)
TABLE_TAGS = ["e2m1-g32-sym-e8m0",  # MXFP4
              "e2m1-g16-sym-e4m3",  # NVFP4 (two-level scales)
              "e4m3-g32-sym-e8m0",  # MXFP8
              "e5m2-channel-sym-fp32",
              "bitmod3-g64-sym-fp16",  # a datatype per group
              "nf4-g32-sym-fp16",  # NormalFloat levels
              "e2m3-g64-sym-fp16",  # FP6
              "lm4-g32-sym-fp16",  # Lloyd-Max: the tensor's own codebook
              "bitmod4-g32-sym-fp16"]


def test_table_decoded_weights_are_exact(compiled, tiny_inputs, tmp_path):
    """Minifloat weights DequantizeLinear does not take and codebook weights (nine formats over the
    14 linears in one model): codes gathered from the format's value table (BitMoD: at the group's
    datatype) times the gathered group scales, the reference's decode bit for bit; codes of up to 4
    bits two per byte."""
    from finegrain.formats import QuantFormat

    cm = compiled(_weights_cycled(TABLE_TAGS, "table-weights"))
    _, _, test = tiny_inputs
    ref = cm(test)
    info = cm.export_onnx(tmp_path / "m.onnx")
    assert len(info["weights"]) == len(cm.quantized) == 14
    assert all("Gather from" in form for form in info["weights"].values())
    ops = _ops(tmp_path / "m.onnx")
    assert not any(d == "finegrain" for d, _ in ops) and ops.count(("", "DequantizeLinear")) == 0
    nibbles = {p: QuantFormat.parse(tag).bits <= 4 for p, tag in cycled(TABLE_TAGS)}
    assert ops.count(("", "BitShift")) == sum(nibbles.values())
    m = onnx.load(str(tmp_path / "m.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    shapes = {v["weight"]: v["shape"] for v in cm.quantized.values()}
    for p, nib in nibbles.items():
        n, k = shapes[weight_name(p)]
        assert onnx.numpy_helper.to_array(inits[f"{weight_name(p)}.qweight"]).shape == ((k + 1) // 2 if nib else k, n), p
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


def _preset_or_mixed(compiled, name: str, mixed: str, presets: list):
    """The preset ``name``, or (``name == mixed``) the first rules of ``presets`` cycled over the 14 linears."""
    if name != mixed:
        return compiled(name)
    from finegrain.compiler.recipe import PRESETS

    # the session's ``compiled`` cache is keyed by recipe name and shared with other files' tests
    return compiled({"name": f"onnx-{name}", "rules": [{**PRESETS[n].to_dict()["rules"][0], "pattern": p}
                                                       for p, n in cycled(presets)]})


def _weights_only(compiled, cm):
    """``cm``'s recipe with every rule's activation format dropped (float activations)."""
    d = cm.recipe.to_dict()
    return compiled({**d, "name": f"{d['name']}-w", "rules": [{k: v for k, v in r.items() if k != "activation"}
                                                             for r in d["rules"]]})


A8_MIXED = ["w8a8", "w8a8-static", "w4a8-g128", "fp8"]  # per-linear presets: their rules cycled in one model


@pytest.mark.parametrize("recipe", ["a8-mixed", "w4a4-rot", "w4a4-hadamard"])
def test_activation_quantization_and_hadamard_match_the_reference(compiled, tiny_inputs, tmp_path, recipe):
    """Activations per token (INT8, INT4 with W4, FP8 E4M3), static per tensor (four presets' rules
    cycled over the 14 linears in one model), and the rotated presets' online Hadamard: ONNX Runtime
    within fp32 rounding of the reference, which is far from the same weights with float activations."""
    cm = _preset_or_mixed(compiled, recipe, "a8-mixed", A8_MIXED)
    _, _, test = tiny_inputs
    ref = cm(test)
    info = cm.export_onnx(tmp_path / "m.onnx", style="matmulnbits")
    ops = _ops(tmp_path / "m.onnx")
    if "rot" in recipe or "hadamard" in recipe:
        assert any(n.startswith("finegrain.hadamard") for n in _initializers(tmp_path / "m.onnx"))
    g = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph
    to_fp8 = [n for n in g.node if n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT8E4M3FN
                                                               for a in n.attribute)]
    assert ("", "Round") in ops  # the integer activation quantizers are in the graph
    assert bool(to_fp8) == (recipe == "a8-mixed")  # and FP8's
    out = OnnxSession(cm, path=info["path"]).run(test)
    # identical arithmetic up to fp32 rounding; a rounding tie flipping one code stays far below this
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert (ref - _weights_only(compiled, cm)(test)).abs().max() > 10 * (out - ref).abs().max()  # sees activation error


# cycled over the 14 linears: item 5 lands on an up_proj and the last down_proj (96 features: two groups
# of 64, where per token differs from g64)
GROUP_ACTS = ["int4-g40-asym-fp16-dyn", "int8-g32-sym-e8m0-dyn", "int4-g40-sym-e4m3-dyn",  # MXINT8, NVINT4 scales
              "e2m1-g32-sym-e8m0-dyn", "e2m1-g16-sym-e4m3-dyn",  # MXFP4, NVFP4
              "int4-g64-sym-fp32-dyn-clip0.85",
              "e4m3-g32-sym-e8m0-dyn", "e3m2-g40-sym-fp16-dyn"]  # MXFP8, FP6 ragged
W8 = {"role": "linear", "weight": "int8-channel-sym-fp32"}


def _acts_cycled(acts: list, name: str) -> dict:
    return {"name": name, "rules": [{**W8, "pattern": p, "activation": a} for p, a in cycled(acts)]}


def test_activation_groups_along_the_row_match_the_reference(compiled, tiny_inputs, tmp_path):
    """Dynamic activation groups (W4A4 g64, the ``w4a4kv4`` preset's; MX / NV scales; minifloat
    elements), eight formats over the 14 linears in one model: a ragged last group (g40 over the tiny
    model's 64 / 96 features) padded as the reference pads it, scales per group. For each format the
    reference with that format's linears per token differs by far more than the session's error, so
    the check sees each format's groups."""
    cm = compiled(_acts_cycled(GROUP_ACTS, "w8-group-acts"))
    _, _, test = tiny_inputs
    ref = cm(test)
    out = OnnxSession(cm, path=cm.export_onnx(tmp_path / "m.onnx")["path"]).run(test)
    err = (out - ref).abs().max()
    assert err <= 1e-4 * ref.abs().max()
    for i, act in enumerate(GROUP_ACTS):
        tok = re.sub(r"-g\d+-", "-token-", act)
        per_token = compiled(_acts_cycled(GROUP_ACTS[:i] + [tok] + GROUP_ACTS[i + 1:], f"w8-group-acts-{i}"))(test)
        assert (ref - per_token).abs().max() > 100 * err, act


MX_PRESETS = ["mxfp4", "mxfp8", "mxfp6"]  # per-linear presets: their rules cycled in one model


@pytest.mark.parametrize("preset", ["mx-mixed", "nvfp4-rot"])
def test_mx_and_nv_presets_run_in_onnxruntime(compiled, tiny_inputs, tmp_path, preset):
    """The OCP MX presets (their rules cycled over the 14 linears in one model) and NVFP4-rot end to
    end (minifloat weights by table lookup, minifloat activations in groups with E8M0 / two-level
    E4M3 scales, NVFP4-rot's online Hadamard): ONNX Runtime within fp32 rounding of the reference,
    and far from the same weights with float activations."""
    cm = _preset_or_mixed(compiled, preset, "mx-mixed", MX_PRESETS)
    assert cm.check("onnx") == []
    _, _, test = tiny_inputs
    ref = cm(test)
    out = OnnxSession(cm, path=cm.export_onnx(tmp_path / "m.onnx")["path"]).run(test)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (ref - _weights_only(compiled, cm)(test)).abs().max() > 100 * (out - ref).abs().max()


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
    import logging

    from finegrain.cli import main

    cm = compiled(_w("int4-g32-asym-fp16"))
    cm.save(tmp_path / "a")
    seen = []  # torch.onnx's registry logs a warning per torchvision op (absent here): silenced during the export
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    registry_log.addHandler(handler)
    try:
        assert main(["export", str(tmp_path / "a"), "--onnx", str(tmp_path / "m.onnx"), "--style", "matmulnbits",
                     "--check"]) == 0
    finally:
        registry_log.removeHandler(handler)
    assert not [m for m in seen if "torchvision" in m], seen
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



def test_session_threads_from_the_argument_or_the_environment(tmp_path, monkeypatch):
    """``make_session``'s intra-op threads: the argument, else ``$FINEGRAIN_ORT_THREADS``, else ORT's default."""
    from onnx import TensorProto, helper

    from finegrain.backends.onnx import make_session
    from finegrain.errors import InputError

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, tmp_path / "id.onnx")
    monkeypatch.setenv("FINEGRAIN_ORT_THREADS", "3")
    assert make_session(tmp_path / "id.onnx").get_session_options().intra_op_num_threads == 3
    assert make_session(tmp_path / "id.onnx", threads=1).get_session_options().intra_op_num_threads == 1
    monkeypatch.setenv("FINEGRAIN_ORT_THREADS", "two")
    with pytest.raises(InputError, match="FINEGRAIN_ORT_THREADS=.two."):
        make_session(tmp_path / "id.onnx")
    monkeypatch.delenv("FINEGRAIN_ORT_THREADS")
    assert make_session(tmp_path / "id.onnx").get_session_options().intra_op_num_threads == 0  # ORT chooses


@pytest.mark.parametrize("family, style", [("mixtral", "matmulnbits"), ("qwen_moe", "qdq")])
def test_moe_experts_export_apart_and_match_the_reference(family, style, tmp_path):
    """A MoE grouped GEMM is unrolled over its experts: each expert's rows (a Slice by the run-time
    offsets) times its own weight, which gets the linear's form (MatMulNBits / DequantizeLinear per
    expert); ONNX Runtime matches the reference session (before: refused, "no ONNX lowering yet")."""
    from collections import Counter

    from finegrain.models.tiny import tiny_mixtral, tiny_qwen_moe

    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (1, 16), generator=gen)
    model = (tiny_mixtral if family == "mixtral" else tiny_qwen_moe)(experts=4)
    cm = finegrain.compile(model, (x,), recipe="w4a16-g128", progress=False)
    summary = cm.export_onnx(tmp_path / "moe.onnx", style=style)
    experts = {k: v for k, v in summary["weights"].items() if ".experts." in k}
    assert sorted(experts) == sorted(f"model.layers.{i}.mlp.experts.{p}_e{e}" for i in range(2)
                                     for p in ("gate_up_proj", "down_proj") for e in range(4))
    form = "MatMulNBits(bits=4" if style == "matmulnbits" else "DequantizeLinear(uint4"
    assert all(v.startswith(form) for v in experts.values()), experts
    nodes = onnx.load(tmp_path / "moe.onnx").graph.node
    assert not any(n.domain == "finegrain" for n in nodes)
    assert Counter(n.op_type for n in nodes)[form.split("(")[0]] >= 16
    ref, sess = cm.session(), cm.session("onnx", style=style)
    for n in (16, 5):  # another length routes other rows to each expert (one may get none)
        ids = torch.randint(0, 256, (1, n), generator=gen)
        torch.testing.assert_close(sess(ids), ref(ids), rtol=1e-5, atol=1e-5)
