"""Bit allocation on a tiny Llama: fused groups from the graph, budgets to the bit and the byte,
monotone frontier, determinism, Fisher sensitivity, materialized frontier points."""
import pytest
import torch

import finegrain
from finegrain.driver.api import compile_frontier
from finegrain.errors import RecipeError
from finegrain.formats import QuantFormat

CANDS = ["int2-g32-asym-fp16", "int3-g32-asym-fp16", "int4-g32-asym-fp16", "int8-channel-sym-fp16"]


def _recipe(**kw):
    return {"name": "alloc", "rules": [{"role": "linear", "weight": "int4-g32-asym-fp16"}], "weight_candidates": CANDS,
            "sensitivity": "output", **kw}


def _formats(cm):
    return {name: q["format"] for name, q in cm.quantized.items()}


@pytest.fixture(scope="module")
def alloc_35(tiny_llama, tiny_inputs):
    example, calib, _ = tiny_inputs
    return finegrain.compile(tiny_llama, example, recipe=_recipe(budget_bits=3.5), calibration=calib, progress=False)


def test_fused_groups_share_a_format(alloc_35):
    f = _formats(alloc_35)
    for layer in (0, 1):
        p = f"model.layers.{layer}"
        assert f[f"{p}.self_attn.q_proj"] == f[f"{p}.self_attn.k_proj"] == f[f"{p}.self_attn.v_proj"]
        assert f[f"{p}.mlp.gate_proj"] == f[f"{p}.mlp.up_proj"]
    assert alloc_35.allocation["groups"] == 2 * 4  # qkv, o, gate/up, down per layer
    assert len(set(f.values())) > 1  # a real mixture at 3.5 bpw


def test_bits_budget_respected_and_tight(alloc_35):
    bpw = alloc_35.quantized_bits_per_weight()
    assert bpw <= 3.5
    assert alloc_35.allocation["chosen"]["bits_per_weight"] == pytest.approx(bpw, abs=1e-4)
    front = alloc_35.allocation["frontier"]
    assert all(a["cost"] < b["cost"] and a["predicted"] > b["predicted"] for a, b in zip(front, front[1:]))
    best_within = min(p["predicted"] for p in front if p["bits_per_weight"] <= 3.5)
    assert alloc_35.allocation["chosen"]["predicted"] == pytest.approx(best_within)


def test_byte_budget_respected_to_the_byte(tiny_llama, tiny_inputs):
    example, calib, _ = tiny_inputs
    top = finegrain.compile(tiny_llama, example, recipe=_recipe(budget_bits=8.3), calibration=calib, progress=False)
    low = finegrain.compile(tiny_llama, example, recipe=_recipe(budget_bits=2.6), calibration=calib, progress=False)
    for budget in (low.model_bytes(), (low.model_bytes() + top.model_bytes()) // 2, top.model_bytes()):
        cm = finegrain.compile(tiny_llama, example, recipe=_recipe(budget_bytes=budget), calibration=calib, progress=False)
        assert cm.model_bytes() <= budget
        fixed = cm.model_bytes() - sum(QuantFormat.parse(q["format"]).stored_bytes(tuple(q["shape"]))
                                       for q in cm.quantized.values())
        assert cm.allocation["chosen"]["cost"] + fixed == cm.model_bytes()  # the solver's bytes are the real bytes
    exact = finegrain.compile(tiny_llama, example, recipe=_recipe(budget_bytes=top.model_bytes()), calibration=calib,
                              progress=False)
    assert set(_formats(exact).values()) == {"int8-channel-sym-fp16"}  # every group upgraded when all fits


def test_budget_below_cheapest_is_refused(tiny_llama, tiny_inputs):
    example, calib, _ = tiny_inputs
    with pytest.raises(RecipeError, match="below the cheapest"):
        finegrain.compile(tiny_llama, example, recipe=_recipe(budget_bits=2.0), calibration=calib, progress=False)


def test_allocation_is_deterministic(tiny_llama, tiny_inputs, alloc_35):
    example, calib, _ = tiny_inputs
    again = finegrain.compile(tiny_llama, example, recipe=_recipe(budget_bits=3.5), calibration=calib, progress=False)
    assert _formats(again) == _formats(alloc_35)


def test_fisher_sensitivity_orders_candidates(tiny_llama, tiny_inputs):
    example, calib, _ = tiny_inputs
    cm = finegrain.compile(tiny_llama, example, recipe=_recipe(budget_bits=3.5, sensitivity="auto"),
                           calibration=calib, progress=False)  # auto: fisher for a causal LM
    assert cm.allocation["sensitivity"] == "fisher" and cm.quantized_bits_per_weight() <= 3.5
    front = cm.allocation["frontier"]
    assert front[0]["predicted"] > front[-1]["predicted"] > 0  # nats: more bits, less predicted ΔNLL


def test_frontier_models_and_validation(tiny_llama, tiny_inputs):
    example, calib, x = tiny_inputs
    alloc, models = compile_frontier(tiny_llama, example, _recipe(), calib, points=3, validate=4, progress=False)
    bpw = [cm.quantized_bits_per_weight() for cm in models]
    assert bpw == sorted(bpw) and bpw[0] == pytest.approx(2.625, abs=0.2)
    for cm in models:
        assert cm.allocation["chosen"]["bits_per_weight"] == pytest.approx(cm.quantized_bits_per_weight(), abs=1e-4)
        assert torch.isfinite(cm(x)).all()
    val = alloc.extra["validation"]
    assert len(val["pairs"]) == 4 and all("measured_delta_nll" in p for p in val["pairs"])
    assert -1.0 <= val["spearman"] <= 1.0


def test_auto_sensitivity_falls_back_to_output_for_encoders(minilm):
    from finegrain.jobs import compile_loaded

    recipe = {"name": "enc", "rules": [{"role": "linear", "weight": "int4-g32-asym-fp16"}],
              "weight_candidates": ["int3-g32-asym-fp16", "int8-channel-sym-fp16"], "budget_bits": 5.0}
    cm = compile_loaded(minilm, finegrain.compiler.recipe.Recipe.from_dict(recipe), samples=8, seq_len=32, progress=False)
    assert cm.allocation["sensitivity"] == "output" and cm.quantized_bits_per_weight() <= 5.0


def test_recipe_validation():
    from finegrain.compiler.recipe import Recipe

    with pytest.raises(ValueError, match="weight_candidates"):
        Recipe.from_dict({"budget_bits": 3.0})
    with pytest.raises(ValueError, match="weight_candidates\\[0\\]"):
        Recipe.from_dict({"weight_candidates": ["int9-g32-asym-fp16"]})
    with pytest.raises(ValueError, match="budget_bits"):
        Recipe.from_dict({"weight_candidates": CANDS, "budget_bits": 3.0, "budget_bytes": 100})
