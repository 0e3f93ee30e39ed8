"""Shapes and sizes read from files are checked against the real tensors and sane limits before
anything is allocated."""
import json
import struct

import pytest

import finegrain
from finegrain.errors import ArtifactError, RecipeError
from finegrain.compiler.recipe import Recipe


def _rewrite_header(path, edit):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


def _a_tensor(m):
    return sorted(m["tensors"])[0]


def test_safetensors_header_claiming_a_huge_tensor(tamper):
    """The header says 2^40 elements at offsets far past the end of the file: refused at the header."""
    holder = {}

    def files(d):
        def edit(h):
            name = sorted(k for k in h if k != "__metadata__")[0]
            holder["name"] = name
            h[name]["shape"] = [1 << 40]
            h[name]["data_offsets"] = [0, 4 << 40]
        _rewrite_header(d / "model.safetensors", edit)

    def manifest(m):
        m["tensors"][holder["name"]]["shape"] = [1 << 40]
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        finegrain.load(tamper(files=files, manifest=manifest))


def test_header_length_bomb(tamper):
    def files(d):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + data[8:])
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        finegrain.load(tamper(files=files))


def test_manifest_shape_must_equal_the_file(tamper):
    def manifest(m):
        m["tensors"][_a_tensor(m)]["shape"] = [3, 3]
    with pytest.raises(ArtifactError, match="in the file but .* in the manifest"):
        finegrain.load(tamper(manifest=manifest))

    def dtype(m):
        rec = m["tensors"][_a_tensor(m)]
        rec["dtype"] = "int8" if rec["dtype"] != "int8" else "uint8"
    with pytest.raises(ArtifactError, match="in the file but .* in the manifest"):
        finegrain.load(tamper(manifest=dtype))

    def extra(m):
        m["tensors"]["ghost"] = {"shape": [1], "dtype": "float32"}
    with pytest.raises(ArtifactError, match="differ from the manifest"):
        finegrain.load(tamper(manifest=extra))


@pytest.mark.parametrize("spec,match", [
    ({"shape": [1, 1 << 30]}, "each in 1..1048576"),
    ({"shape": [1 << 20, 1 << 20]}, "more than"),
    ({"shape": [1] * 9}, "at most 8 dims"),
    ({"dtype": "object"}, "dtype"),
    ({"dynamic_dims": [5]}, "dynamic_dims"),
    ({"name": "x); import os; ("}, "not an identifier"),
    ({"shape": [True, 16]}, "each in"),
])
def test_input_spec_limits(tamper, spec, match):
    def manifest(m):
        m["inputs"][0].update(spec)
    with pytest.raises(ArtifactError, match=match):
        finegrain.load(tamper(manifest=manifest))


@pytest.mark.parametrize("field,value", [("clip_grid", 10 ** 9), ("calibration_samples", True),
                                         ("gptq_block", 0), ("smoothing_alpha", False), ("name", 3),
                                         ("budget_bits", 1e300)])
def test_recipe_numbers_checked(field, value):
    d = Recipe().to_dict()
    d[field] = value
    if field == "budget_bits":
        d["weight_candidates"] = ["int4-g128-asym-fp16"]
    with pytest.raises(RecipeError, match=field):
        Recipe.from_dict(d)


def test_recipe_in_a_manifest_checked(tamper):
    def manifest(m):
        m["recipe"]["clip_grid"] = 10 ** 9
    with pytest.raises(ArtifactError, match="clip_grid"):
        finegrain.load(tamper(manifest=manifest))


def test_malformed_report_fields(tamper):
    def manifest(m):
        m["quantized"] = {"w": {"bits": "many", "shape": [2]}}
    with pytest.raises(ArtifactError, match="quantized"):
        finegrain.load(tamper(manifest=manifest))


@pytest.mark.parametrize("weight", [{"bits": 4, "granularity": "group", "group_size": True},
                                    {"bits": 4, "granularity": "group", "group_size": 10 ** 12},
                                    "int4-g99999999999999-asym-fp16"])
def test_format_group_sizes_checked(weight):
    with pytest.raises(RecipeError, match="group_size"):
        Recipe.from_dict({"rules": [{"role": "linear", "weight": weight}]})
