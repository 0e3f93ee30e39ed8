"""Save / load: round trip, byte-identical re-save, corruption detection, atomicity, no pickle."""
import json

import pytest
import torch

import finegrain
from finegrain.errors import ArtifactError, InputError
from finegrain.runtime import artifact as artifact_mod


ISSUE4 = ["mxint8", "mxfp8", "mxfp6", "mxfp4", "nvfp4", "nvint4", "nvfp4-rot", "fp8", "w4a16-g128-clip",
          "w4a16-g128-gptq", "w3a16-g128-gptq", "w4a8-dgq", "bitmod-w4", "bitmod-w3", "nf4-g64"]


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-static", "w4a16-g128", "w3a16-g128", "w4a4-rot-smooth", "w8a8-os+",
                                    *ISSUE4])
def test_roundtrip_same_outputs(compiled, tiny_inputs, tmp_path, recipe):
    cm = compiled(recipe)
    cm.save(tmp_path / "a")
    cm2 = finegrain.load(tmp_path / "a")
    x = tiny_inputs[2]
    assert torch.equal(cm2(x), cm(x))
    assert cm2.recipe == cm.recipe and cm2.quantized == cm.quantized
    assert cm2.model_bytes() == cm.model_bytes()
    assert cm2.folds == cm.folds
    if "rot" in recipe:  # the online Hadamard op is in the saved graph
        assert any(n.target is torch.ops.finegrain.hadamard.default for n in cm2.gm.graph.nodes)
        assert any(f["pass"] == "fold_rotation" and f["action"] == "folded" for f in cm2.folds)


def test_resave_is_byte_identical(compiled, tmp_path):
    cm = compiled("w4a16-g128")
    cm.save(tmp_path / "a")
    finegrain.load(tmp_path / "a").save(tmp_path / "b")
    for i in range(6):  # safetensors once wrote a 2-key metadata map in random order: repeat
        cm.save(tmp_path / f"c{i}")
    for f in ("manifest.json", "graph.json", "model.safetensors"):
        a = (tmp_path / "a" / f).read_bytes()
        assert a == (tmp_path / "b" / f).read_bytes(), f
        assert all(a == (tmp_path / f"c{i}" / f).read_bytes() for i in range(6)), f


def test_identical_inputs_give_identical_outputs(compiled, tiny_inputs):
    cm = compiled("w8a8")
    x = tiny_inputs[2]
    assert torch.equal(cm(x), cm(x.clone()))


def test_lloyd_max_codebook_roundtrip(tiny_llama, tiny_inputs, tmp_path):
    """A per-tensor codebook travels in the artifact (stored fp16, counted in the bytes)."""
    example, calib, x = tiny_inputs
    recipe = {"name": "lm3", "rules": [{"role": "linear", "weight": "lm3-g64-sym-fp16"}], "weight_algorithm": "gptq"}
    cm = finegrain.compile(tiny_llama, example, recipe=recipe, calibration=calib, progress=False)
    cm.save(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    cb = manifest["tensors"]["model.layers.0.mlp.down_proj.weight_qcodebook"]
    assert cb["dtype"] == "float16" and cb["shape"] == [8]
    cm2 = finegrain.load(tmp_path / "a")
    assert torch.equal(cm2(x), cm(x))
    fp = tiny_llama(x).logits
    assert torch.nn.functional.cosine_similarity(cm2(x).flatten(), fp.flatten(), dim=0) > 0.9


def test_packed_bytes_are_what_the_format_says(compiled, tmp_path):
    cm = compiled("w4a16-g128")
    cm.save(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    t = manifest["tensors"]["model.layers.0.mlp.down_proj.weight_qpacked"]
    assert t["dtype"] == "uint8" and t["shape"] == [64, 96 * 4 // 8]


def test_corrupted_file_detected(compiled, tmp_path):
    compiled("w8a8").save(tmp_path / "a")
    f = tmp_path / "a" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors is corrupted"):
        finegrain.load(tmp_path / "a")


def test_missing_files_detected(compiled, tmp_path):
    compiled("w8a8").save(tmp_path / "a")
    (tmp_path / "a" / "graph.json").unlink()
    with pytest.raises(ArtifactError, match="graph.json listed in the manifest is missing"):
        finegrain.load(tmp_path / "a")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        finegrain.load(tmp_path / "nothing-here")


def test_graph_json_cannot_name_arbitrary_callables(compiled, tmp_path):
    from finegrain.runtime.graph_json import graph_from_json

    with pytest.raises(ArtifactError, match="disallowed target"):
        graph_from_json([{"name": "x", "op": "call_function", "target": "os.system", "args": {"tuple": ["ls"]},
                          "kwargs": {}}])


def test_existing_directory_refused_then_overwritten(compiled, tmp_path):
    """--overwrite replaces an artifact or an empty directory, never a directory of other files."""
    cm = compiled("w8a8")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        cm.save(tmp_path / "a")
    with pytest.raises(InputError, match="not a finegrain artifact"):
        cm.save(tmp_path / "a", overwrite=True)
    assert (tmp_path / "a" / "keep.txt").read_text() == "x"
    (tmp_path / "a" / "keep.txt").unlink()
    cm.save(tmp_path / "a", overwrite=True)  # empty: replaced
    (tmp_path / "a" / "extra.txt").write_text("x")
    cm.save(tmp_path / "a", overwrite=True)  # an artifact: replaced whole
    assert not (tmp_path / "a" / "extra.txt").exists() and (tmp_path / "a" / "manifest.json").exists()


def test_failed_save_leaves_nothing(compiled, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifact_mod, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        compiled("w8a8").save(tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_loaded_model_checks_inputs(compiled, tmp_path):
    compiled("w8a8").save(tmp_path / "a")
    cm = finegrain.load(tmp_path / "a")
    with pytest.raises(InputError, match="expected int64 with 2 dims"):
        cm(torch.randn(1, 8))
    with pytest.raises(InputError, match="dim 0 must be 1"):
        cm(torch.zeros(3, 8, dtype=torch.long))


@pytest.mark.parametrize("recipe", ["w4a16-g128", "w3a16-g128", "nvfp4", "w4a8-dgq", "bitmod-w3", "mxfp6", "fp8"])
def test_stored_bytes_match_the_artifact(compiled, recipe):
    """QuantFormat.stored_bytes (what bit allocation budgets with) is what insert_qdq stores."""
    from finegrain.formats import QuantFormat

    cm = compiled(recipe)
    buffers = dict(cm.gm.named_buffers())
    assert cm.quantized
    for q in cm.quantized.values():
        fmt = QuantFormat.parse(q["format"])
        stored = sum(t.numel() * t.element_size() for name, t in buffers.items()
                     if name.startswith(q["weight"].replace(".", "_") + "_q") or name.startswith(q["weight"] + "_q"))
        assert stored == fmt.stored_bytes(tuple(q["shape"])), q["weight"]
