"""Sequential weight quantization (recipe ``sequential``): each linear's Hessian is measured on the
outputs of the already-quantized linears upstream (``compiler/replay.py``)."""
import dataclasses

import torch

from finegrain.compiler.capture import capture
from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import QWEIGHT, quantizable_ops
from finegrain.compiler.recipe import Rule, get_recipe
from finegrain.driver.pipeline import ANALYZE, run_passes
from finegrain.passes.quantize_weights import quantize_weights
from finegrain.passes.weight_algorithms import gptq, rtn


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.fc3(self.fc2(torch.relu(self.fc1(x))) + x)


def _compiled(sequential: bool, batches):
    torch.manual_seed(0)
    m = TwoLayers().eval()
    base = get_recipe("w4a16-g128-gptq")  # fc3 feeds the output (an lm_head): a pattern rule takes it too
    recipe = dataclasses.replace(base, name="t", sequential=sequential, gptq_clip=False, gptq_damp=0.01,
                                 rules=(Rule(pattern="fc", weight=base.rules[0].weight),))
    gm = capture(m, (batches[0][0],), input_names=("x",), dynamic=False)
    ctx = PassContext(recipe=recipe, calibration=batches, show_progress=False)
    return m, quantize_weights(run_passes(gm, ctx, ANALYZE), ctx), ctx


def _hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return (x.T @ x / x.shape[0]).float()


def test_sequential_gptq_sees_quantized_upstream_outputs():
    torch.manual_seed(1)
    batches = [(torch.randn(4, 64) * torch.linspace(0.1, 3, 64),) for _ in range(3)]
    m, gm, ctx = _compiled(True, batches)
    ops = {op.name: op for op in quantizable_ops(gm) if QWEIGHT in op.node.meta}
    assert {"fc1", "fc2", "fc3"} <= set(ops) and all(ctx.report["layers"][k]["sequential"] for k in ("fc1", "fc2", "fc3"))
    fmt = ops["fc1"].node.meta["finegrain_weight_format"]
    x = torch.cat([b[0] for b in batches])
    # by hand: fc1 on x, fc2 on relu(x W1q^T), fc3 on fc2q(...) + x
    w1 = m.fc1.weight.detach()
    q1 = gptq(w1, fmt, _hessian(x), rtn(w1, fmt))
    a1 = torch.relu(x @ fmt.dequantize(q1).T + m.fc1.bias)
    w2 = m.fc2.weight.detach()
    q2 = gptq(w2, fmt, _hessian(a1), rtn(w2, fmt))
    a2 = a1 @ fmt.dequantize(q2).T + m.fc2.bias + x
    w3 = m.fc3.weight.detach()
    q3 = gptq(w3, fmt, _hessian(a2), rtn(w3, fmt))
    for name, q in (("fc1", q1), ("fc2", q2), ("fc3", q3)):
        got = ops[name].node.meta[QWEIGHT]
        assert (got.codes == q.codes).float().mean() > 0.999, name  # fp32 summation order may flip a rounding
    # the float-model Hessian gives other codes for fc2 (so the check above can fail)
    fp2 = gptq(w2, fmt, _hessian(torch.relu(x @ w1.T + m.fc1.bias)), rtn(w2, fmt))
    assert (fp2.codes != q2.codes).sum() > 10


def test_non_sequential_uses_the_float_model_hessians():
    torch.manual_seed(1)
    batches = [(torch.randn(4, 64) * torch.linspace(0.1, 3, 64),) for _ in range(3)]
    m, gm, ctx = _compiled(False, batches)
    ops = {op.name: op for op in quantizable_ops(gm) if QWEIGHT in op.node.meta}
    assert "sequential" not in ctx.report["layers"]["fc2"]
    fmt = ops["fc2"].node.meta["finegrain_weight_format"]
    x = torch.cat([b[0] for b in batches])
    w1, w2 = m.fc1.weight.detach(), m.fc2.weight.detach()
    fp2 = gptq(w2, fmt, _hessian(torch.relu(x @ w1.T + m.fc1.bias)), rtn(w2, fmt))
    assert (ops["fc2"].node.meta[QWEIGHT].codes == fp2.codes).float().mean() > 0.999


def test_sequential_hessians_see_quantized_activations():
    """With a dynamic activation format the deployed op reads its input quantized: the replay
    quantizes it too, for the Hessian and for the op's output downstream."""
    from finegrain.formats import QuantFormat

    torch.manual_seed(1)
    batches = [(torch.randn(4, 64) * torch.linspace(0.1, 3, 64),) for _ in range(3)]
    torch.manual_seed(0)
    m = TwoLayers().eval()
    base = get_recipe("w4a16-g128-gptq")
    afmt = QuantFormat.parse("int4-token-sym-fp32-dyn")
    recipe = dataclasses.replace(base, name="t", gptq_clip=False, gptq_damp=0.01,
                                 rules=(Rule(pattern="fc", weight=base.rules[0].weight, activation=afmt),))
    gm = capture(m, (batches[0][0],), input_names=("x",), dynamic=False)
    ctx = PassContext(recipe=recipe, calibration=batches, show_progress=False)
    gm = quantize_weights(run_passes(gm, ctx, ANALYZE), ctx)
    ops = {op.name: op for op in quantizable_ops(gm) if QWEIGHT in op.node.meta}
    fmt = ops["fc1"].node.meta["finegrain_weight_format"]
    x = afmt.fake_quantize(torch.cat([b[0] for b in batches]))  # per token: batching does not matter
    w1, w2 = m.fc1.weight.detach(), m.fc2.weight.detach()
    q1 = gptq(w1, fmt, _hessian(x), rtn(w1, fmt))
    a1 = afmt.fake_quantize(torch.relu(x @ fmt.dequantize(q1).T + m.fc1.bias))
    q2 = gptq(w2, fmt, _hessian(a1), rtn(w2, fmt))
    assert (ops["fc1"].node.meta[QWEIGHT].codes == q1.codes).float().mean() > 0.999
    assert (ops["fc2"].node.meta[QWEIGHT].codes == q2.codes).float().mean() > 0.999
    a1_float = torch.relu(x @ fmt.dequantize(q1).T + m.fc1.bias)  # unquantized input: other codes
    assert (gptq(w2, fmt, _hessian(a1_float), rtn(w2, fmt)).codes != q2.codes).sum() > 10


def test_act_clip_picks_the_ratio_with_the_least_output_error():
    """Heavy-tailed rows (a few huge values per row): INT4 per token clipped below the row max
    has less output error than the full range, and the error table is the measured one."""
    from finegrain.formats import QuantFormat
    from finegrain.passes.quantize_weights import act_clip

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    x[torch.arange(256), torch.randint(0, 64, (256,), generator=gen)] *= 12.0
    w = torch.randn(32, 64, generator=gen)
    fmt = QuantFormat.parse("int4-token-sym-fp32-dyn")
    clip, errs = act_clip([x], fmt, [w])
    assert clip < 1.0 and errs[clip] == min(errs.values()) < errs[1.0]
    direct = ((dataclasses.replace(fmt, clip=clip).fake_quantize(x) - x) @ w.T).pow(2).sum() / (x @ w.T).pow(2).sum()
    assert abs(errs[clip] - float(direct)) < 1e-6


def test_act_clip_search_sets_each_sites_format(tiny_llama, tiny_inputs):
    """W4A4 with ``act_clip_search``: every activation site's format carries its searched ratio
    (q / k / v one ratio: they read one tensor), recorded in the layer report, and the model runs."""
    import finegrain
    from finegrain.formats import QuantFormat

    example, calib, test = tiny_inputs
    recipe = dataclasses.replace(get_recipe("w4a4-rot"), name="w4a4-clip", weight_algorithm="gptq",
                                 act_clip_search=True)
    cm = finegrain.compile(tiny_llama, example, recipe=recipe, calibration=calib, progress=False)
    found = {k: v["act_clip"] for k, v in cm.layer_report.items() if "act_clip" in v}
    assert len(found) == 14 and all(v["clip"] in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6) for v in found.values())
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"):
        assert found[layer]["clip"] == found["model.layers.0.self_attn.v_proj"]["clip"]
    from finegrain.formats.ops import QUANTIZE

    in_graph = {QuantFormat.parse(n.args[1]).clip for n in cm.gm.graph.nodes if n.target is QUANTIZE}
    assert in_graph == {v["clip"] for v in found.values()}
    assert torch.isfinite(cm(test)).all()


def test_act_clip_search_needs_sequential_gptq():
    import pytest

    with pytest.raises(ValueError, match="act_clip_search"):
        dataclasses.replace(get_recipe("w4a4-rot"), act_clip_search=True)


def test_float_target_fits_the_float_models_output():
    """``gptq_float_target`` (GPTAQ): fc2 is GPTQ'd on ``W2 + W2 (C - H) H_λ^-1`` with ``H`` from the
    quantized upstream's rows and ``C = E[x_fp x_q^T]`` with the float model's rows, computed by
    hand here; its output error against the float model is lower than plain sequential GPTQ's."""
    torch.manual_seed(1)
    batches = [(torch.randn(4, 64) * torch.linspace(0.1, 3, 64),) for _ in range(3)]
    torch.manual_seed(0)
    m = TwoLayers().eval()
    base = get_recipe("w4a16-g128-gptq")
    recipe = dataclasses.replace(base, name="t", gptq_clip=False, gptq_damp=0.01, gptq_float_target=True,
                                 rules=(Rule(pattern="fc", weight=base.rules[0].weight),))
    gm = capture(m, (batches[0][0],), input_names=("x",), dynamic=False)
    ctx = PassContext(recipe=recipe, calibration=batches, show_progress=False)
    gm = quantize_weights(run_passes(gm, ctx, ANALYZE), ctx)
    ops = {op.name: op for op in quantizable_ops(gm) if QWEIGHT in op.node.meta}
    assert all(ctx.report["layers"][k].get("float_target") for k in ("fc1", "fc2", "fc3"))
    fmt = ops["fc1"].node.meta["finegrain_weight_format"]
    x = torch.cat([b[0] for b in batches])
    w1, w2 = m.fc1.weight.detach(), m.fc2.weight.detach()
    q1 = gptq(w1, fmt, _hessian(x), rtn(w1, fmt))  # fc1's inputs agree: C = H, the target is W1
    assert (ops["fc1"].node.meta[QWEIGHT].codes == q1.codes).float().mean() > 0.999
    a_q = torch.relu(x @ fmt.dequantize(q1).T + m.fc1.bias).double()
    a_fp = torch.relu(x @ w1.T + m.fc1.bias).double()
    h, c = a_q.T @ a_q / a_q.shape[0], a_fp.T @ a_q / a_q.shape[0]
    hd = h + 0.01 * torch.diag(h).mean() * torch.eye(128, dtype=h.dtype)
    target = (w2.double() + w2.double() @ (c - h) @ torch.linalg.inv(hd)).float()
    q2 = gptq(target, fmt, h.float(), rtn(target, fmt))
    got = ops["fc2"].node.meta[QWEIGHT]
    assert (got.codes == q2.codes).float().mean() > 0.99
    plain = gptq(w2, fmt, h.float(), rtn(w2, fmt))  # sequential GPTQ without the float target
    ref = a_fp.float() @ w2.T
    err = lambda q: (a_q.float() @ fmt.dequantize(q).T - ref).pow(2).sum()  # noqa: E731
    assert err(got) < 0.9 * err(plain)


def test_float_target_needs_sequential_gptq():
    import pytest

    with pytest.raises(ValueError, match="gptq_float_target"):
        dataclasses.replace(get_recipe("w4a16-g128-gptq"), sequential=False, gptq_float_target=True)


def test_act_outlier_groups_pick_the_groups_whose_error_moves_the_output_most():
    """FMPQ's selection on rows whose channels 16-31 are 20x larger: that group of 16 is the one kept
    at 8 bits, and the gain table is what switching each group alone measures."""
    from finegrain.formats import QuantFormat
    from finegrain.passes.quantize_weights import act_fake_quantize, act_outlier_groups

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 64, generator=gen)
    x[:, 16:32] *= 20.0
    w = torch.randn(24, 64, generator=gen)
    lo, hi = QuantFormat.parse("int4-g16-sym-fp32-dyn"), QuantFormat.parse("int8-g16-sym-fp32-dyn")
    mask, chosen = act_outlier_groups([x], lo, hi, [w], 0.25)
    assert chosen == [1] and mask.sum() == 16 and mask[16:32].all()
    mixed = act_fake_quantize(x, lo, (hi, mask))
    assert torch.equal(mixed[:, 16:32], hi.fake_quantize(x)[:, 16:32]) and torch.equal(mixed[:, :16], lo.fake_quantize(x)[:, :16])
    err = lambda q: float(((q - x) @ w.T).pow(2).sum())  # noqa: E731
    assert err(mixed) < err(lo.fake_quantize(x))


def test_act_outlier_fraction_in_the_graph(tiny_llama, tiny_inputs, tmp_path):
    """W4A4 g16 with FMPQ: each activation site gets a constant mask and a where over its INT4 and INT8
    copies, the layer report names the groups, more groups at 8 bits lower the error, and the artifact
    round-trips."""
    import finegrain

    example, calib, test = tiny_inputs
    with torch.no_grad():
        ref = tiny_llama(test).logits
    errs = {}
    for frac in (0.0, 0.5, 1.0):
        r = {"name": "fmpq", "rules": [{"role": "linear", "weight": "int4-g16-asym-fp16", "activation":
                                        "int4-g16-sym-fp32-dyn"}], "weight_algorithm": "gptq", "act_outlier_fraction": frac}
        cm = finegrain.compile(tiny_llama, example, recipe=r, calibration=calib, progress=False)
        wheres = [n for n in cm.gm.graph.nodes if n.target is torch.ops.aten.where.self]
        recs = {k: v["act_outliers"] for k, v in cm.layer_report.items() if "act_outliers" in v}
        if frac:
            assert len(wheres) == 4 * 2 and len(recs) == 14  # 4 activation sites per layer, 7 linears per layer
            assert all(v["format"] == "int8-g16-sym-fp32-dyn" and len(v["groups"]) == max(1, round(frac * v["of"]))
                       for v in recs.values())
        else:
            assert not wheres and not recs
        out = cm(test)
        errs[frac] = float((out - ref).norm() / ref.norm())
    assert errs[1.0] < errs[0.5] < errs[0.0], errs
    cm.save(tmp_path / "fmpq")
    assert torch.equal(finegrain.load(tmp_path / "fmpq")(test), out)
    import pytest

    with pytest.raises(ValueError, match="act_outlier_fraction"):
        dataclasses.replace(get_recipe("w4a4-rot"), act_outlier_fraction=0.1)
