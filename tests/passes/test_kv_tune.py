"""KVTuner-style layer-wise KV precision (driver/kv_tune.py): the attention-output sensitivity is
measured per layer and pair with only that layer quantized (fewer bits, larger error, every layer),
each layer's pairs are pruned to their Pareto front, the knapsack meets the average-bits budget,
and the chosen ``kv_layers`` compile into a cache whose per-layer formats and bytes are reported."""
import pytest
import torch

import finegrain
from finegrain.compiler.ops import KV_APPEND
from finegrain.compiler.recipe import Recipe
from finegrain.driver.kv_tune import kv_allocate, kv_sensitivity, layer_gain, pareto_pairs
from tests.test_kv_cache import _family

F = "int{}-g8-asym-fp16-dyn"
PAIRS = [(F.format(k), F.format(v)) for k in (2, 4, 8) for v in (2, 4, 8)]
FIELDS = {"kv_key_axis": "tokens", "kv_window": 4}


@pytest.fixture(scope="module")
def sens():
    model = _family("llama")
    calib = [torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    return model, kv_sensitivity(model, calib, FIELDS, PAIRS)


def test_sensitivity_orders_bits_in_every_layer(sens):
    _, s = sens
    assert len(s.errors) == 2 and s.bits == [4, 6, 10, 6, 8, 12, 10, 12, 16]
    for row in s.errors:
        e = dict(zip(PAIRS, row))
        assert e[(F.format(2), F.format(2))] > e[(F.format(4), F.format(4))] > e[(F.format(8), F.format(8))] > 0


def test_pareto_pruning_and_budget(sens):
    model, s = sens
    assert pareto_pairs([3.0, 1.0, 2.0, 0.5], [4, 6, 6, 8]) == [0, 1, 3]
    for budget in (2.0, 3.25, 5.0, 8.0):
        layers, info = kv_allocate(s, budget)
        assert info["average_bits"] <= budget and len(layers) == 2
        assert all(n <= len(PAIRS) for n in info["pairs_kept"])
    low, hi = kv_allocate(s, 2.0)[1], kv_allocate(s, 8.0)[1]
    assert low["predicted_error"] > hi["predicted_error"] and hi["average_bits"] == 8.0
    layers, _ = kv_allocate(s, 3.25)
    cm = finegrain.compile(model, (torch.randint(0, 256, (1, 8)),),
                           recipe={"name": "tuned", "rules": [], **FIELDS, "kv_layers": layers},
                           progress=False, kv_cache=True)
    from finegrain.compiler.ir import KV

    written = {(n.meta[KV]["layer"], n.meta[KV]["kind"]): n.args[2] for n in cm.gm.graph.nodes if n.target is KV_APPEND}
    assert written == {(i, kind): tag for i, k, v in layers for kind, tag in (("key", k), ("value", v))}
    assert cm.kv["quantization"]["layers"] == [list(x) for x in layers]
    assert Recipe.from_dict(Recipe.from_dict({"name": "t", "rules": [], "kv_layers": layers}).to_dict()).kv_layers == \
        tuple(tuple(x) for x in layers)


def test_kv_layers_refusals():
    from finegrain.errors import InputError, RecipeError

    with pytest.raises(RecipeError, match=r"kv_layers\[0\] key"):
        Recipe.from_dict({"name": "t", "rules": [], "kv_layers": [[0, "int4-g8-asym-fp16", None]]})
    with pytest.raises(RecipeError, match="listed twice"):
        Recipe.from_dict({"name": "t", "rules": [], "kv_layers": [[0, None, None], [0, None, None]]})
    with pytest.raises(InputError, match="layer 5 does not exist"):
        finegrain.compile(_family("llama"), (torch.randint(0, 256, (1, 8)),),
                          recipe={"name": "t", "rules": [], "kv_layers": [[5, F.format(4), None]]},
                          progress=False, kv_cache=True)


def test_loss_objective_is_that_layers_loss_increase():
    """``objective="loss"``: the entry of a layer / pair is the next-token NLL with only that layer's cache
    quantized minus the float cache's, recomputed here from a separately compiled model."""
    from finegrain.compiler.capture import kv_inputs

    model = _family("llama")
    calib = [torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    pairs = [PAIRS[0], PAIRS[-1]]  # K2V2, K8V8
    s = kv_sensitivity(model, calib, FIELDS, pairs, objective="loss")

    def nll(layers):
        cm = finegrain.compile(model, (calib[0][:, :8],), recipe={"name": "t", "rules": [], **FIELDS,
                               "kv_layers": layers}, progress=False, kv_cache=True)
        with torch.inference_mode():
            tot = sum(float(torch.nn.functional.cross_entropy(cm.gm(*kv_inputs(cm.kv, ids))[0][0, :-1], ids[0, 1:],
                                                              reduction="sum")) for ids in calib)
        return tot / sum(ids.shape[1] - 1 for ids in calib)

    with torch.inference_mode():
        fp = sum(float(torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum"))
                 for ids in calib) / sum(ids.shape[1] - 1 for ids in calib)
    for layer in (0, 1):
        other = 1 - layer
        want = nll([[layer, *pairs[0]], [other, None, None]]) - fp
        assert want != 0 and s.errors[layer][0] == pytest.approx(want, rel=1e-3, abs=1e-6)
        assert abs(s.errors[layer][1]) < abs(s.errors[layer][0]) / 10, s.errors  # 8 bits move the loss far less
    with pytest.raises(finegrain.errors.InputError, match="objective"):
        kv_sensitivity(model, calib, FIELDS, pairs, objective="kl")


def test_gain_objective_weighs_attention_errors_by_the_layers_loss_slope(sens):
    """``objective="gain"``: a layer's entries are its attention-output errors (the module fixture's,
    same calibration) times one per-layer factor, the least-squares slope of the loss objective's
    entries on them; so the ranking of a layer's pairs is the attention error's, and the layers' factors
    differ."""
    model, att = sens
    calib = [torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    loss = kv_sensitivity(model, calib, FIELDS, PAIRS, objective="loss")
    gain = kv_sensitivity(model, calib, FIELDS, PAIRS, objective="gain")
    factors = []
    for a, l_, g in zip(att.errors, loss.errors, gain.errors):
        slope = sum(x * y for x, y in zip(a, l_)) / sum(x * x for x in a)
        factor = max(slope, 1e-3 * abs(sum(l_)) / sum(a))  # a random model's loss may fall: then the floor
        assert factor > 0 and g == pytest.approx([factor * x for x in a], rel=1e-6)
        factors.append(factor)
    assert factors[0] != pytest.approx(factors[1], rel=1e-3)
    assert layer_gain([1.0, 2.0], [2.0, 4.1]) == pytest.approx(10.2 / 5)  # the slope through zero
    assert layer_gain([1.0, 2.0], [-1.0, -3.0]) == pytest.approx(1e-3 * 4 / 3)  # noise: the floor keeps it positive
    assert layer_gain([0.0, 0.0], [1.0, 1.0]) == 0.0


def test_joint_weights_and_cache_under_one_byte_budget():
    """KVTuner jointly with the weight formats (``compile_joint``): one knapsack over the weight groups
    (stored bytes, Fisher-predicted loss) and each layer's (K, V) pairs (bytes at the context, measured
    loss); every budget is met in true bytes (the artifact's stored bytes + the cache the manifest
    counts at that context), more bytes never predict more loss, and a long context moves bytes
    from the weights' choice into the cache's."""
    from finegrain.driver.api import compile_joint

    model = _family("llama")
    calib = [torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    pairs = [PAIRS[0], PAIRS[4], PAIRS[-1]]  # K2V2, K4V4, K8V8
    s = kv_sensitivity(model, calib, FIELDS, pairs, objective="loss")
    recipe = {"name": "mixed", "rules": [{"role": "linear", "weight": "int8-channel-sym-fp16"}],
              "weight_candidates": ["int2-g16-asym-fp16", "int4-g16-asym-fp16", "int8-channel-sym-fp16"],
              "sensitivity": "fisher"}
    batches = [(c,) for c in calib]
    joint, _ = compile_joint(model, (calib[0][:, :8],), recipe, batches, s, FIELDS, 2048, [], progress=False)
    lo, hi = joint.min_bytes, joint.max_bytes
    budgets = [lo + (hi - lo) * f // 8 for f in (1, 4, 8)]
    joint, out = compile_joint(model, (calib[0][:, :8],), recipe, batches, s, FIELDS, 2048, budgets, progress=False)
    preds = []
    for budget, (info, cm) in zip(budgets, out):
        q = cm.kv["quantization"]
        assert q["context"] == 2048 and [e[0] for e in q["layers"]] == [0, 1]
        assert cm.model_bytes() == joint.fixed_bytes + info["weight_bytes"]  # the artifact's stored bytes
        assert info["total_bytes"] <= budget
        assert q["bytes_per_token_at_context"] * 2048 == pytest.approx(info["kv_bytes"], abs=2048 * 0.05 + 2)
        assert cm.allocation["joint"] == info
        preds.append(info["predicted_weights"] + info["predicted_kv"])
    assert preds[0] >= preds[1] >= preds[2]
    with pytest.raises(finegrain.errors.InputError, match="below the cheapest"):
        joint.best(lo - 1)
    # the trade: the same weights, a cache whose low bits cost much (or nothing) in loss
    from finegrain.driver.kv_tune import Sensitivity, joint_allocate

    g = joint.weight_groups
    w_costs, w_values = joint.frontier.costs[:g], joint.frontier.values[:g]
    picks = {}
    for name, errs in (("costly cache", [1.0, 1e-3, 0.0]), ("free cache", [1e-9, 1e-10, 0.0])):
        alt = joint_allocate(w_costs, w_values, Sensitivity(pairs, [errs, errs], s.bits), joint.pair_bytes, 2048,
                             joint.fixed_bytes)
        step = alt.frontier.costs[g][1] - alt.frontier.costs[g][0]  # one layer's cache K2V2 -> K4V4
        picks[name] = alt.best(alt.min_bytes + step + alt.frontier.unit)[2]
    assert picks["costly cache"]["kv_average_bits"] > picks["free cache"]["kv_average_bits"] == 2.0
    assert picks["costly cache"]["weight_bytes"] < picks["free cache"]["weight_bytes"]
