"""Bad input is a clear error before any work: calibration batches, recipe rules that match
nothing (warnings, errors with strict), models with nothing to quantize."""
import json

import pytest
import torch

import finegrain
from finegrain.errors import InputError, RecipeError


@pytest.mark.parametrize("batch,match", [
    (torch.full((1, 8), 10 ** 6), "ids outside"),
    (torch.full((1, 8), -1), "ids outside"),
    (torch.zeros(1, 0, dtype=torch.long), "is empty"),
    (torch.zeros(1, 8), "expected int64"),
    (torch.zeros(8, dtype=torch.long), "expected int64 with 2 dims"),
])
def test_calibration_batches_checked_like_the_example(tiny_llama, tiny_inputs, batch, match):
    example, calib, _ = tiny_inputs
    with pytest.raises(InputError, match=match):
        finegrain.compile(tiny_llama, example, recipe="w8a8-static", calibration=[calib[0], (batch,)], progress=False)


def test_rule_matching_nothing_warns_or_fails_strict(tiny_llama, tiny_inputs, tmp_path):
    example, calib, _ = tiny_inputs
    recipe = {"name": "typo", "rules": [{"role": "linear", "weight": "int8-channel-sym-fp16"},
                                        {"pattern": r"mlp\.dwn_proj", "weight": "int4-g64-asym-fp16"}]}
    with pytest.warns(UserWarning, match=r"rules\[1\].*matches no layer"):
        cm = finegrain.compile(tiny_llama, example, recipe=recipe, progress=False)
    assert len(cm.warnings) == 1 and "dwn_proj" in cm.warnings[0]
    cm.save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["warnings"] == cm.warnings
    assert finegrain.load(tmp_path / "a").warnings == cm.warnings
    with pytest.raises(RecipeError, match=r"rules\[1\].*matches no layer.*strict"):
        finegrain.compile(tiny_llama, example, recipe=recipe, progress=False, strict_recipe=True)


def test_nothing_to_quantize_warns_or_fails_strict(tiny_inputs):
    class NoLinears(torch.nn.Module):
        def forward(self, x):
            return x * 2

    x = (torch.randn(2, 8),)
    with pytest.warns(UserWarning, match="quantizes nothing"):
        cm = finegrain.compile(NoLinears(), x, recipe="w8a8", progress=False)
    assert any("quantizes nothing" in w for w in cm.warnings)
    with pytest.raises(RecipeError, match="quantizes nothing"):
        finegrain.compile(NoLinears(), x, recipe="w8a8", progress=False, strict_recipe=True)


def test_cli_strict(tmp_path, capsys, monkeypatch):
    """--strict on the command line turns the warning into exit status 2."""
    from finegrain.cli import main
    from finegrain.models.tiny import tiny_llama

    path = tmp_path / "hf"
    tiny_llama(seed=1).save_pretrained(path, safe_serialization=True)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "typo", "rules": [{"pattern": "nothing_like_this", "weight": "int8-channel-sym-fp16"}]}))
    from finegrain import jobs

    def fake_calibration(loaded, recipe, samples, seq_len, seed, *sources):  # no tokenizer: random ids
        return None, (torch.randint(0, 256, (1, 16)),), ("input_ids",)
    monkeypatch.setattr(jobs, "_calibration", fake_calibration)
    assert main(["quantize", "--model", str(path), "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--strict"]) == 2
    assert "matches no layer" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["quantize", "--model", str(path), "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 0
    assert "warning: rules[0]" in capsys.readouterr().out


def test_quantize_prints_a_folds_summary(tmp_path, capsys, monkeypatch):
    from finegrain import jobs
    from finegrain.cli import main
    from finegrain.models.tiny import tiny_llama

    path = tmp_path / "hf"
    tiny_llama(seed=1).save_pretrained(path, safe_serialization=True)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "fn", "fold_norms": True,
                                  "rules": [{"role": "linear", "weight": "int8-channel-sym-fp16"}]}))
    monkeypatch.setattr(jobs, "_calibration", lambda *a: (None, (torch.randint(0, 256, (1, 16)),), ("input_ids",)))
    assert main(["quantize", "--model", str(path), "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    folds = json.loads((tmp_path / "o" / "manifest.json").read_text())["folds"]
    n = sum(f["action"] == "folded" for f in folds)
    assert n > 0 and f"fold_norms: {n} folded" in out


def test_a_kv_cache_only_recipe_is_not_called_empty():
    """A recipe quantizing only the KV cache (float weights) quantizes something: no warning, and
    strict mode takes it."""
    import warnings

    from tests.test_kv_cache import _family

    recipe = {"name": "kv-only", "rules": [], "kv_key": "int8-token-sym-fp32-dyn", "kv_value": "int8-token-sym-fp32-dyn"}
    x = (torch.randint(0, 256, (1, 8)),)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cm = finegrain.compile(_family("llama"), x, recipe=recipe, progress=False, kv_cache=True, strict_recipe=True)
    assert not [w for w in seen if "quantizes nothing" in str(w.message)] and not cm.warnings
    assert cm.kv["quantization"]["bytes_per_token"] < cm.kv["quantization"]["fp32_bytes_per_token"]
