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


@pytest.mark.parametrize("preset,runs", [("w8a8-static", True), ("w8a8-smooth", True), ("w4a16-g128", False),
                                         ("w8a8", False), ("w4a16-g128-gptq", False)])
def test_calibrates_only_when_a_pass_reads_the_statistics(tiny_llama, tiny_inputs, preset, runs):
    """Static scales and smoothing read the float statistics; round to nearest with dynamic
    activations reads none, and sequential GPTQ measures its Hessians in its own replay."""
    example, calib, _ = tiny_inputs
    ctx = PassContext(recipe=PRESETS[preset], calibration=calib, show_progress=False)
    calibrate(capture(tiny_llama, example), ctx)
    assert bool(ctx.stats.nodes) is runs and PRESETS[preset].needs_float_calibration is runs


def test_float_calibration_samples_runs_the_first_batches_only(tiny_llama, tiny_inputs):
    """AWQ's presets take their row sample from the first batches (``float_calibration_samples``);
    the statistics count exactly those batches' tokens."""
    import dataclasses

    example, calib, _ = tiny_inputs
    assert len(calib) > 1
    recipe = dataclasses.replace(PRESETS["w4a16-g128-awq-gptq"], float_calibration_samples=1)
    ctx = PassContext(recipe=recipe, calibration=calib, show_progress=False)
    calibrate(capture(tiny_llama, example), ctx)
    assert next(iter(ctx.stats.nodes.values())).count == calib[0][0].numel()
    with pytest.raises(ValueError, match="float_calibration_samples"):
        dataclasses.replace(recipe, float_calibration_samples=-1)
