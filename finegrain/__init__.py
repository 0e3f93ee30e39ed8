"""finegrain: a compiler for fine-grained low-bit quantization.

    cm = finegrain.compile(model, example_inputs, recipe="w8a8", calibration=batches)
    y = cm(*inputs); cm.save("out/"); cm2 = finegrain.load("out/")
"""
from finegrain.compiler.recipe import PRESETS, Recipe, Rule
from finegrain.driver.api import compile
from finegrain.formats import QuantFormat
from finegrain.runtime.artifact import load_artifact as load
from finegrain.version import __version__

__all__ = ["compile", "load", "Recipe", "Rule", "PRESETS", "QuantFormat", "__version__"]
