"""Q/DQ insertion: structure before/after, numerics against an independent fake-quant model,
idempotence."""
import copy
import operator
from collections import Counter

import pytest
import torch

from finegrain.compiler.capture import capture
from finegrain.compiler.ir import quantizable_ops
from finegrain.driver.pipeline import PIPELINE, PassContext, run_passes
from finegrain.compiler.recipe import PRESETS
from finegrain.formats.ops import DEQUANTIZE, DEQUANTIZE_PACKED, QUANTIZE
from finegrain.passes.insert_qdq import insert_qdq


def _ops(gm):
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _run(tiny_llama, tiny_inputs, recipe):
    example, calib, _ = tiny_inputs
    gm = capture(tiny_llama, example)
    before = _ops(gm)
    ctx = PassContext(recipe=PRESETS[recipe], calibration=calib, show_progress=False)
    return before, run_passes(gm, ctx), ctx


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16-g128"])
def test_structure(tiny_llama, tiny_inputs, recipe):
    before, gm, _ = _run(tiny_llama, tiny_inputs, recipe)
    after = _ops(gm)
    layers = tiny_llama.config.num_hidden_layers
    assert after[DEQUANTIZE_PACKED] == 7 * layers  # every linear but lm_head
    acts = 4 * layers if recipe == "w8a8" else 0  # shared inputs share one Q/DQ pair
    assert after[QUANTIZE] == acts and after[DEQUANTIZE] == acts
    assert after[operator.getitem] - before.get(operator.getitem, 0) == 3 * acts
    added = set(after) - set(before)
    assert added <= {DEQUANTIZE_PACKED, QUANTIZE, DEQUANTIZE, operator.getitem}
    for op in quantizable_ops(gm):
        if op.role == "linear":
            assert op.weight is None and op.node.args[1].target == DEQUANTIZE_PACKED
    buffers = dict(gm.named_buffers())
    assert not any(k.endswith("proj.weight") for k in buffers)  # float weights are gone
    assert "model.embed_tokens.weight" in buffers  # still read by embedding and lm_head


def test_idempotent(tiny_llama, tiny_inputs):
    _, gm, ctx = _run(tiny_llama, tiny_inputs, "w8a8")
    code = gm.code
    gm = insert_qdq(gm, ctx)
    assert gm.code == code


def _fake_quant_reference(model, recipe):
    """Independent construction: weights replaced by their fake-quantized values, activations
    fake-quantized by forward pre-hooks on the same linears."""
    ref = copy.deepcopy(model)
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            wfmt, afmt = PRESETS[recipe].formats_for("linear", name)
            with torch.no_grad():
                mod.weight.copy_(wfmt.fake_quantize(mod.weight))
            if afmt is not None:
                mod.register_forward_pre_hook(lambda m, args, f=afmt: (f.fake_quantize(args[0]),))
    return ref


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16-g128", "w3a16-g128", "w4a8-g128"])
def test_numerics_match_fake_quant_reference(tiny_llama, tiny_inputs, compiled, recipe):
    _, _, test = tiny_inputs
    ref = _fake_quant_reference(tiny_llama, recipe)
    with torch.no_grad():
        expected = ref(test).logits
        fp = tiny_llama(test).logits
    got = compiled(recipe)(test)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - fp).abs().max() > 1e-4  # quantization did change the function


def test_static_activation_scale_from_calibration(tiny_llama, tiny_inputs):
    _, gm, ctx = _run(tiny_llama, tiny_inputs, "w8a8-static")
    scales = {k: v for k, v in gm.named_buffers() if k.endswith("input_scale")}
    assert len(scales) == 4 * tiny_llama.config.num_hidden_layers
    q_in = next(o for o in quantizable_ops(gm) if o.name == "model.layers.0.self_attn.q_proj")
    src = q_in.activation.args[0].args[0]  # dequantize <- getitem <- quantize(x, ...)
    absmax = float(ctx.stats[src.args[0].name].absmax.max())
    assert scales["model.layers.0.self_attn.q_proj.input_scale"].item() == pytest.approx(absmax / 127, rel=1e-6)


def test_pipeline_is_a_literal_list_and_dumps(tiny_llama, tiny_inputs, tmp_path, monkeypatch):
    assert [name for name, _ in PIPELINE] == ["canonicalize", "fold_norms", "fold_kv_rotation", "fold_rotation",
                                              "calibrate", "fold_smoothing", "recalibrate", "allocate_bits",
                                              "quantize_weights", "insert_qdq", "quantize_kv"]
    monkeypatch.setenv("FINEGRAIN_DUMP", str(tmp_path))
    _, gm, ctx = _run(tiny_llama, tiny_inputs, "w4a16-g128")
    assert sorted(p.name for p in tmp_path.iterdir())[-2:] == ["09_insert_qdq.txt", "10_quantize_kv.txt"]
    assert set(ctx.report["pass_seconds"]) == {name for name, _ in PIPELINE}


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


def test_unsupported_op_kinds_are_refused_by_name():
    import finegrain
    from finegrain.errors import RecipeError

    class _Matmul(torch.nn.Module):  # x @ W on a constant: a matmul op, not a linear
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return torch.relu(x @ self.mix)

    recipe = finegrain.Recipe(rules=(finegrain.Rule(pattern="mix", weight=finegrain.QuantFormat(bits=8)),))
    with pytest.raises(RecipeError, match="mix: the recipe quantizes this matmul op"):
        finegrain.compile(_Matmul(), (torch.randn(2, 8),), recipe=recipe, progress=False)
    # convolutions are quantized (tests/passes/test_conv.py)
    conv = finegrain.Recipe(rules=(finegrain.Rule(pattern="conv", weight=finegrain.QuantFormat(bits=8)),))
    assert set(finegrain.compile(_Conv(), (torch.randn(1, 3, 8, 8),), recipe=conv, progress=False).quantized) == {"conv"}


def test_quantized_graph_survives_re_export(compiled, tiny_inputs):
    cm = compiled("w4a8-g128")
    x = tiny_inputs[2]
    ep = torch.export.export(cm.gm, (x,))
    found = Counter(n.target for n in ep.graph.nodes if n.op == "call_function")
    assert found[DEQUANTIZE_PACKED] == 14 and found[QUANTIZE] == 8 and found[DEQUANTIZE] == 8
    assert torch.equal(ep.module()(x), cm(x))


def test_percentile_act_range_clips_below_absmax(tiny_llama, tiny_inputs):
    import dataclasses

    example, calib, _ = tiny_inputs
    recipe = dataclasses.replace(PRESETS["w8a8-static"], act_range="p99.9")
    gm = capture(tiny_llama, example)
    ctx = PassContext(recipe=recipe, calibration=calib, show_progress=False)
    gm = run_passes(gm, ctx)
    scale = dict(gm.named_buffers())["model.layers.0.mlp.down_proj.input_scale"].item()
    down = next(o for o in quantizable_ops(gm) if o.name == "model.layers.0.mlp.down_proj")
    st = ctx.stats[down.activation.args[0].args[0].args[0].name]
    assert scale == pytest.approx(st.percentile(99.9) / 127, rel=1e-6)
    assert scale < float(st.absmax.max()) / 127
