"""Hugging Face directories: no remote code, and a checkpoint must cover the model exactly."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from finegrain.cli import main
from finegrain.errors import InputError
from finegrain.models import load_model


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from finegrain.models.tiny import tiny_llama

    path = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_llama(seed=3).save_pretrained(path, safe_serialization=True)
    return path


def _copy(src, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def _weights(d):
    return next(d.glob("*.safetensors"))


def test_clean_directory_loads(hf_model):
    assert load_model(hf_model).task == "causal-lm"


def test_auto_map_refused(hf_model, tmp_path, capsys):
    d = _copy(hf_model, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(InputError, match="auto_map.*trust_remote_code=False"):
        load_model(d)
    assert main(["quantize", "--model", str(d), "--recipe", "w8a16", "--out", str(tmp_path / "o")]) == 2
    assert "auto_map" in capsys.readouterr().err


def test_missing_weights_are_an_error(hf_model, tmp_path):
    d = _copy(hf_model, tmp_path)
    t = load_file(str(_weights(d)))
    del t["model.layers.1.mlp.down_proj.weight"]
    save_file(t, str(_weights(d)), metadata={"format": "pt"})
    with pytest.raises(InputError, match="missing keys .*down_proj"):
        load_model(d)


def test_unexpected_and_misshaped_weights_are_errors(hf_model, tmp_path):
    d = _copy(hf_model, tmp_path)
    t = load_file(str(_weights(d)))
    t["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(t, str(_weights(d)), metadata={"format": "pt"})
    with pytest.raises(InputError, match="unexpected keys"):
        load_model(d)
    t = load_file(str(_weights(d)))
    del t["model.layers.9.extra.weight"]
    t["model.norm.weight"] = torch.zeros(7)
    save_file(t, str(_weights(d)), metadata={"format": "pt"})
    with pytest.raises(InputError, match="cannot load|mismatched"):
        load_model(d)


def test_broken_config_is_one_clear_error(hf_model, tmp_path, capsys):
    d = _copy(hf_model, tmp_path)
    (d / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(InputError, match="cannot load this model"):
        load_model(d)
    (d / "config.json").write_text("{oops")
    assert main(["quantize", "--model", str(d), "--recipe", "w8a16", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
