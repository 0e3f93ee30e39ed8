"""The public API and its bad-input errors."""
import subprocess
import sys

import pytest
import torch

import finegrain
from finegrain.errors import InputError, RecipeError


def test_public_surface():
    assert set(finegrain.__all__) >= {"compile", "load", "Recipe", "QuantFormat", "PRESETS"}


def test_import_is_light():
    code = ("import time,sys; t=time.perf_counter(); import finegrain; dt=time.perf_counter()-t; "
            "bad=[m for m in ('onnxruntime','tvm','triton') if m in sys.modules]; print(dt, bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["[]"], out  # import time itself is measured by benchmarks/compile_cost.py


def test_compile_quantizes_with_dynamic_seq(compiled, tiny_inputs):
    cm = compiled("w4a16-g128")
    assert len(cm.quantized) == 14 and cm.quantized_bits_per_weight() > 4
    for seq in (3, 50):
        assert cm(torch.zeros(1, seq, dtype=torch.long)).shape == (1, seq, 256)


def test_unknown_preset(tiny_llama, tiny_inputs):
    with pytest.raises(RecipeError, match="unknown recipe"):
        finegrain.compile(tiny_llama, tiny_inputs[0], recipe="w4a4-magic")


def test_float_example_inputs_rejected(tiny_llama):
    with pytest.raises(InputError, match="input_ids' must be an integer tensor"):
        finegrain.compile(tiny_llama, (torch.randn(1, 8),), recipe="w8a8")
    with pytest.raises(InputError, match="outside"):
        finegrain.compile(tiny_llama, (torch.full((1, 8), 10_000),), recipe="w8a8")


def test_calibration_errors(tiny_llama, tiny_inputs):
    ex = tiny_inputs[0]
    with pytest.raises(InputError, match="calibration data is empty"):
        finegrain.compile(tiny_llama, ex, recipe="w8a8", calibration=[])
    with pytest.raises(InputError, match="calibration batch 1 'input_ids'"):
        finegrain.compile(tiny_llama, ex, recipe="w8a8", calibration=[ex, (torch.zeros(1, 4, 2, dtype=torch.long),)])
    with pytest.raises(InputError, match="needs calibration data"):
        finegrain.compile(tiny_llama, ex, recipe="w8a8-static")


def test_float_recipe_is_exact(tiny_llama, tiny_inputs):
    cm = finegrain.compile(tiny_llama, tiny_inputs[0], recipe=finegrain.Recipe(name="fp"), progress=False)
    x = tiny_inputs[2]
    with torch.no_grad():
        torch.testing.assert_close(cm(x), tiny_llama(x).logits, rtol=1e-5, atol=1e-5)
    assert cm.quantized == {}
