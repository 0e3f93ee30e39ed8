import json

import pytest

from finegrain.compiler.recipe import PRESETS, Recipe, Rule, get_recipe
from finegrain.errors import RecipeError
from finegrain.formats import QuantFormat


def test_required_presets_exist():
    for name in ("w8a8", "w8a8-static", "w4a16-g128", "w4a16-g64", "w3a16-g128", "w4a8-g128"):
        assert get_recipe(name).name == name
    w, a = PRESETS["w8a8"].formats_for("linear", "model.layers.0.mlp.up_proj")
    assert w.granularity == "channel" and a.granularity == "token" and a.dynamic
    assert PRESETS["w8a8"].formats_for("lm_head", "lm_head") == (None, None)
    assert PRESETS["w8a8-static"].needs_calibration and not PRESETS["w8a8"].needs_calibration


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_roundtrip_files(tmp_path, name, suffix):
    path = tmp_path / f"r{suffix}"
    PRESETS[name].save(path)
    assert Recipe.load(path) == PRESETS[name]


def test_last_matching_rule_wins():
    r = Recipe(rules=(Rule(role="linear", weight=QuantFormat(bits=4, granularity="group", group_size=128)),
                      Rule(pattern=r"down_proj$", weight=None)))
    assert r.formats_for("linear", "model.layers.0.mlp.down_proj") == (None, None)
    assert r.formats_for("linear", "model.layers.0.mlp.up_proj")[0].bits == 4


def test_rule_accepts_format_tags():
    r = Recipe.from_dict({"rules": [{"role": "linear", "weight": "int4-g64-sym-fp16"}]})
    assert r.rules[0].weight == QuantFormat(bits=4, granularity="group", group_size=64, symmetric=True)


@pytest.mark.parametrize("data,where", [
    ({"rules": [{"role": "linear", "weight": {"bits": 12}}]}, "rules[0].weight"),
    ({"rules": [{"role": "lineer"}]}, "rules[0].role"),
    ({"rules": [{"role": "linear", "weight": {"bitz": 4}}]}, "rules[0].weight"),
    ({"rules": [{"pattern": "(unclosed"}]}, "rules[0].pattern"),
    ({"rules": [{}]}, "rules[0]"),
    ({"weight_algorithm": "magic"}, "weight_algorithm"),
    ({"calibration_samples": 0}, "calibration_samples"),
    ({"colour": "blue"}, "colour"),
])
def test_validation_errors_name_the_field(data, where):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict(data)
    assert where in str(e.value)


def test_unknown_preset_and_bad_file(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'w5a5'"):
        get_recipe("w5a5")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RecipeError, match="not valid json"):
        get_recipe(str(bad))
    with pytest.raises(RecipeError, match="does not exist"):
        get_recipe(str(tmp_path / "missing.yaml"))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"rules": [{"role": "linear", "activation": {"bits": 8, "granularity": "group"}}]}))
    with pytest.raises(RecipeError, match=r"wrong.json: rules\[0\]\.activation"):
        get_recipe(str(wrong))
