"""``finegrain.compile``: capture -> passes -> CompiledModel."""
from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import torch

from finegrain.compiler.capture import capture
from finegrain.compiler.pipeline import PassContext, run_passes
from finegrain.compiler.recipe import Recipe, get_recipe
from finegrain.errors import InputError
from finegrain.runtime.compiled import CompiledModel, check_inputs, input_spec


def _input_specs(example_inputs: tuple, names: Sequence[str], dynamic: bool) -> list[dict]:
    specs = []
    for i, t in enumerate(example_inputs):
        dyn = []
        if dynamic and t.dim() == 2 and not t.is_floating_point():  # as capture._dynamic_shapes
            dyn = [0, 1] if t.shape[0] >= 2 else [1]
        specs.append(input_spec(t, names[i] if i < len(names) else f"input{i}", dyn))
    return specs


def _check_token_ids(model: torch.nn.Module, example_inputs: tuple) -> None:
    """Language models take integer token ids of shape [batch, seq] below the vocabulary size."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None or not example_inputs:
        return
    ids = example_inputs[0]
    if ids.is_floating_point() or ids.dim() != 2:
        raise InputError(f"example input 'input_ids' must be an integer tensor [batch, seq]; got "
                         f"{str(ids.dtype).removeprefix('torch.')} {list(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InputError(f"example input 'input_ids' has ids outside [0, {vocab}) (the model's vocab_size)")


def _calibration_batches(calibration: Iterable | None, specs: list[dict]) -> list[tuple]:
    if calibration is None:
        return []
    batches = [b if isinstance(b, tuple) else (tuple(b) if isinstance(b, list) else (b,)) for b in calibration]
    if not batches:
        raise InputError("calibration data is empty; pass at least one batch (or calibration=None)")
    for i, b in enumerate(batches):
        check_inputs(specs, b, what=f"calibration batch {i}")
    return batches


def compile(model: torch.nn.Module, example_inputs: tuple, recipe: "str | Recipe | dict" = "w8a8",
            calibration: Iterable | None = None, *, input_names: Sequence[str] = ("input_ids", "attention_mask"),
            dynamic: bool = True, strict: bool = False, tokenizer: Any = None, source: dict | None = None,
            progress: bool = True) -> CompiledModel:
    """Quantize ``model`` per ``recipe``; return a callable, saveable :class:`CompiledModel`.

    ``example_inputs`` is a tuple of tensors (for language models, ``(input_ids,)``);
    ``calibration`` an iterable of batches shaped like it (sequence length may differ when
    ``dynamic``). Recipes with static activation scales require calibration.
    """
    recipe = get_recipe(recipe)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise InputError("example_inputs must be a tuple of tensors, e.g. (input_ids,)")
    _check_token_ids(model, example_inputs)
    specs = _input_specs(example_inputs, input_names, dynamic)
    batches = _calibration_batches(calibration, specs)
    if recipe.needs_calibration and not batches:
        raise InputError(f"recipe {recipe.name!r} needs calibration data (static activation scales, smoothing, GPTQ or the output-error clip search)")
    t0 = time.perf_counter()
    gm = capture(model, example_inputs, input_names=input_names, dynamic=dynamic, strict=strict)
    t_capture = time.perf_counter() - t0
    ctx = PassContext(recipe=recipe, calibration=batches, show_progress=progress)
    gm = run_passes(gm, ctx)
    quantized = {name: {k: rec[k] for k in ("weight", "format", "shape", "bits")}
                 for name, rec in ctx.report.get("layers", {}).items()}
    timings = {"capture": round(t_capture, 3), **ctx.report.get("pass_seconds", {})}
    timings["total"] = round(time.perf_counter() - t0, 3)
    return CompiledModel(gm=gm, recipe=recipe, input_specs=specs, source=source or {"model": type(model).__name__},
                         quantized=quantized, layer_report=ctx.report.get("layers", {}),
                         folds=ctx.report.get("folds", []), tokenizer=tokenizer, timings=timings)
