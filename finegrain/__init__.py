"""finegrain: a compiler for fine-grained low-bit quantization.

    cm = finegrain.compile(model, example_inputs, recipe="w8a8", calibration=batches)
    y = cm(*inputs); cm.save("out/"); cm2 = finegrain.load("out/")
"""
from finegrain.compiler.api import compile
from finegrain.compiler.recipe import PRESETS, Recipe, Rule
from finegrain.formats import QuantFormat
from finegrain.runtime.artifact import load_artifact as load

__version__ = "0.1.0"
__all__ = ["compile", "load", "Recipe", "Rule", "PRESETS", "QuantFormat", "__version__"]
