import copy

import pytest
import torch

from finegrain.compiler.capture import capture
from finegrain.compiler.ir import OBSERVED, quantizable_ops
from finegrain.driver.pipeline import PassContext
from finegrain.compiler.recipe import PRESETS
from finegrain.errors import InputError
from finegrain.passes.calibrate import calibrate


def test_observes_each_distinct_linear_input_and_keeps_graph(tiny_llama, tiny_inputs):
    example, calib, _ = tiny_inputs
    gm = capture(tiny_llama, example)
    before = [(n.op, n.target) for n in gm.graph.nodes]
    ctx = PassContext(recipe=PRESETS["w8a8-static"], calibration=calib, show_progress=False)
    gm = calibrate(gm, ctx)
    assert [(n.op, n.target) for n in gm.graph.nodes] == before  # instrumented copy only
    inputs = {o.activation.name for o in quantizable_ops(gm) if o.kind == "linear"}
    assert set(ctx.stats.nodes) == inputs
    # per layer: q/k/v share one input, gate/up share one: 4 distinct, plus the lm_head input
    assert len(inputs) == 4 * tiny_llama.config.num_hidden_layers + 1
    assert all(n.meta.get(OBSERVED) for n in gm.graph.nodes if n.name in inputs)
    st = next(iter(ctx.stats.nodes.values()))
    assert st.count == sum(b[0].numel() for b in calib)


def test_nan_activation_names_the_layer(tiny_llama, tiny_inputs):
    example, calib, _ = tiny_inputs
    bad = copy.deepcopy(tiny_llama)
    gm = capture(bad, example)
    with torch.no_grad():  # NaN appears only at run time, after capture's weight check
        gm.get_submodule("model.layers.1.post_attention_layernorm").weight[3] = float("nan")
    ctx = PassContext(recipe=PRESETS["w8a8-static"], calibration=calib, show_progress=False)
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.(gate|up)_proj"):
        calibrate(gm, ctx)
