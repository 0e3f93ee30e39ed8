"""``finegrain.compile``: capture -> passes -> CompiledModel; ``compile_frontier``: one analysis,
one materialization per point of the bit-allocation frontier; ``compile_joint``: the same with the
KV cache's per-layer bits in the allocation, under one byte budget for weights + cache."""
from __future__ import annotations

import json

import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch.fx import GraphModule

from finegrain.compiler.capture import (capture, is_hf_model, kv_input_names, kv_inputs, kv_layout, kv_shape,
                                        kv_widths_differ)
from finegrain.compiler.context import PassContext
from finegrain.compiler.recipe import Recipe, get_recipe
from finegrain.driver.pipeline import ANALYZE, MATERIALIZE, PIPELINE, run_passes
from finegrain.errors import InputError
from finegrain.io.signature import check_inputs, input_spec
from finegrain.runtime.compiled import CompiledModel


@dataclass
class Prepared:
    """A captured graph after some passes, with what finishing it into a CompiledModel needs."""

    gm: GraphModule
    ctx: PassContext
    specs: list[dict]
    t0: float  # perf_counter at the start of capture
    t_capture: float  # seconds capture took
    kv: dict | None = None  # the KV-cache layout when captured with kv_cache=True


def input_names_of(model: torch.nn.Module, count: int) -> list[str]:
    """Names of a model's first ``count`` positional inputs: an imported ONNX model's own input names,
    else ``forward``'s positional parameters in order (``input_ids``, ``attention_mask`` for
    ``transformers`` models, ``image`` for ``forward(self, image)``), ``input{i}`` past a ``*args``."""
    import inspect

    own = getattr(model, "input_names", None)
    if isinstance(own, (list, tuple)) and len(own) >= count and all(isinstance(n, str) for n in own):
        return list(own[:count])
    params = inspect.signature(model.forward).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [names[i] if i < len(names) else f"input{i}" for i in range(count)]


def _declared(inputs: dict | None, names: Sequence[str], example_inputs: tuple) -> list[dict[int, str]] | None:
    """Per input, {dim: label} of the dims declared dynamic by ``inputs={"image": {"dynamic": {3:
    "width"}}}`` (a list of dims gets labels ``<name>_<dim>``); None when nothing is declared.
    Inputs left out of ``inputs`` are static; inputs are named as in ``names``."""
    if inputs is None:
        return None
    if not isinstance(inputs, dict):
        raise InputError(f"inputs must be a dict {{name: {{'dynamic': {{dim: label}}}}}}, got {type(inputs).__name__}")
    unknown = [k for k in inputs if k not in names]
    if unknown:
        raise InputError(f"inputs: {', '.join(map(repr, unknown))} not among the model's inputs ({', '.join(names)})")
    out = []
    for name, t in zip(names, example_inputs):
        decl = inputs.get(name) or {}
        if not isinstance(decl, dict) or set(decl) - {"dynamic"}:
            raise InputError(f"inputs[{name!r}]: expected {{'dynamic': {{dim: label}}}} (or a list of dims)")
        dyn = decl.get("dynamic") or {}
        if isinstance(dyn, (list, tuple)):
            dyn = {d: f"{name}_{d}" for d in dyn}
        dims = {}
        for d, label in dyn.items():
            if isinstance(d, str) and d.lstrip("-").isdigit():  # from JSON / the command line
                d = int(d)
            if isinstance(d, bool) or not isinstance(d, int) or not -t.dim() <= d < t.dim():
                raise InputError(f"inputs[{name!r}]: dim {d!r} is not a dim of the example input of shape {list(t.shape)}")
            d %= t.dim()
            if not isinstance(label, str) or not label.isidentifier():
                raise InputError(f"inputs[{name!r}]: dim {d}'s label {label!r} must be an identifier (e.g. 'width')")
            if t.shape[d] < 2:
                raise InputError(f"inputs[{name!r}]: dim {d} is declared dynamic but the example has size "
                                 f"{t.shape[d]}; give an example of size >= 2 there (export specializes sizes 0 and 1)")
            dims[d] = label
        out.append(dict(sorted(dims.items())))
    return out


def _input_specs(example_inputs: tuple, names: Sequence[str], dynamic: bool,
                 declared: list[dict[int, str]] | None = None) -> list[dict]:
    specs = []
    for i, t in enumerate(example_inputs):
        dyn = []
        if declared is not None:
            dyn = sorted(declared[i]) if dynamic else []
        elif dynamic and t.dim() == 2 and not t.is_floating_point():  # as capture._dynamic_shapes
            dyn = [0, 1] if t.shape[0] >= 2 else [1]
        specs.append(input_spec(t, names[i] if i < len(names) else f"input{i}", dyn))
    return specs


def _check_token_ids(model: torch.nn.Module, example_inputs: tuple, what: str = "example input") -> None:
    """Language models take non-empty integer token ids of shape [batch, seq] below the vocabulary size."""
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and t.numel() == 0:
            raise InputError(f"{what}: a tensor of shape {list(t.shape)} is empty")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None or not example_inputs:
        return
    ids = example_inputs[0]
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool \
            or ids.dim() != 2:
        raise InputError(f"{what} 'input_ids' must be an integer tensor [batch, seq]; got "
                         f"{str(getattr(ids, 'dtype', type(ids).__name__)).removeprefix('torch.')} "
                         f"{list(getattr(ids, 'shape', []))}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise InputError(f"{what} 'input_ids' has ids outside [0, {vocab}) (the model's vocab_size)")


def _calibration_batches(calibration: Iterable | None, specs: list[dict], model: torch.nn.Module) -> list[tuple]:
    if calibration is None:
        return []
    batches = [b if isinstance(b, tuple) else (tuple(b) if isinstance(b, list) else (b,)) for b in calibration]
    if not batches:
        raise InputError("calibration data is empty; pass at least one batch (or calibration=None)")
    for i, b in enumerate(batches):
        check_inputs(specs, b, what=f"calibration batch {i}")
        _check_token_ids(model, b, what=f"calibration batch {i}")
    return batches


def compile(model: torch.nn.Module, example_inputs: tuple, recipe: "str | Recipe | dict" = "w8a8",
            calibration: Iterable | None = None, *, input_names: Sequence[str] | None = None,
            inputs: dict | None = None, dynamic: bool = True, strict: bool = False, tokenizer: Any = None,
            source: dict | None = None, progress: bool = True, strict_recipe: bool = False,
            kv_cache: bool = False) -> CompiledModel:
    """Quantize ``model`` per ``recipe``; return a callable, saveable :class:`CompiledModel`.

    ``example_inputs`` is a tuple of tensors (for language models, ``(input_ids,)``);
    ``calibration`` an iterable of batches shaped like it (sequence length may differ when
    ``dynamic``). Inputs are named by ``input_names``, else by the model (an imported ONNX model's
    input names, ``forward``'s parameters: ``input_ids``, ``image``, ...). Which dims vary:
    ``inputs={"image": {"dynamic": {3: "width"}}}`` declares them per input (dims sharing a label
    share one size; undeclared inputs are static); without it, dim 1 (sequence) of 2-D integer inputs,
    and dim 0 when the example batch is >= 2. Recipes with static activation scales require calibration. A recipe rule that
    matches no layer, or a recipe that quantizes nothing, is a warning (``cm.warnings``, the
    manifest) or, with ``strict_recipe``, a RecipeError. ``strict`` is torch.export's strict mode.
    ``kv_cache`` (a ``transformers`` causal LM, ``example_inputs = (input_ids,)``): capture the
    decoder with its KV cache as graph inputs / outputs (``capture.HFCacheWrapper``), so sessions
    decode one token at a time over the cache; calling the result with token ids alone still gives
    the logits (an empty past).
    """
    prep = _prepare(model, example_inputs, recipe, calibration, input_names, dynamic, strict, progress, PIPELINE,
                    strict_recipe, kv_cache, inputs)
    return _finish(prep, model, tokenizer, source)


def _prepare(model, example_inputs, recipe, calibration, input_names, dynamic, strict, progress, passes,
             strict_recipe=False, kv_cache=False, inputs=None) -> Prepared:
    recipe = get_recipe(recipe)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise InputError("example_inputs must be a tuple of tensors, e.g. (input_ids,) or (image,)")
    _check_token_ids(model, example_inputs)
    names = list(input_names) if input_names is not None else input_names_of(model, len(example_inputs))
    declared = _declared(inputs, names, example_inputs)
    if declared is not None and kv_cache:
        raise InputError("inputs=: a KV-cache graph's inputs are fixed (input_ids, position_ids, past_*)")
    specs = _input_specs(example_inputs, names, dynamic, declared)
    batches = _calibration_batches(calibration, specs, model)
    if recipe.needs_calibration and not batches:
        raise InputError(f"recipe {recipe.name!r} needs calibration data (static activation or KV-cache scales, "
                         "smoothing, GPTQ, the output-error clip search or bit allocation)")
    kv = None
    quantizes_kv = bool(recipe.kv_key or recipe.kv_value or recipe.kv_rotate or recipe.kv_pre_rope or recipe.kv_layers)
    if quantizes_kv and not kv_cache:
        raise InputError(f"recipe {recipe.name!r} quantizes the KV cache (kv_key / kv_value / kv_rotate), which is in "
                         "the graph only with kv_cache=True (--kv-cache)")
    if kv_cache:
        if len(example_inputs) != 1:
            raise InputError("kv_cache=True: example_inputs must be (input_ids,)")
        kv = {**kv_layout(model), "max_seq_len": int(getattr(model.config, "max_position_embeddings", None) or 2048)}
        if kv_widths_differ(kv) and quantizes_kv:
            raise InputError(f"recipe {recipe.name!r} quantizes the KV cache, but {type(model).__name__} caches keys "
                             f"{kv['kv_heads']} x {kv['head_dim']} and values {kv['value_heads']} x {kv['value_dim']} "
                             "per token (MLA's latent and rotary key): only a float cache is supported for it")
        batches = [kv_inputs(kv, b[0]) for b in batches]
        specs = _kv_specs(specs[0], kv)
    t0 = time.perf_counter()
    gm = capture(model, example_inputs, input_names=names, dynamic=dynamic, strict=strict, kv=kv, declared=declared)
    for spec, dyn, ranges in zip(specs, declared or [], gm.meta.pop("input_dim_ranges", [])):
        spec["dims"] = [{"label": dyn[d], "min": ranges[d][0], "max": ranges[d][1]} for d in spec["dynamic_dims"]]
        if not spec["dims"]:
            del spec["dims"]
    if declared is not None:  # the ranges export inferred hold for the calibration batches too
        for i, b in enumerate(batches):
            check_inputs(specs, b, what=f"calibration batch {i}")
    t_capture = time.perf_counter() - t0
    ctx = PassContext(recipe=recipe, calibration=batches, show_progress=progress, strict_recipe=strict_recipe)
    for w in gm.meta.pop("capture_warnings", []):  # e.g. a KV-cache graph captured for a shorter context
        warnings.warn(w, stacklevel=3)
        ctx.report.setdefault("warnings", []).append(w)
    gm = run_passes(gm, ctx, passes)
    return Prepared(gm, ctx, specs, t0, t_capture, kv)


def _kv_specs(ids_spec: dict, kv: dict) -> list[dict]:
    """Input specs of a KV-cache graph: ids and positions [batch, seq], each past [batch, kv_heads,
    past, head_dim] (dynamic seq / past; batch as the ids')."""
    lead = [0] if 0 in ids_spec["dynamic_dims"] else []
    b = ids_spec["shape"][0]
    names = kv_input_names(kv["layers"])
    specs = [dict(ids_spec, name=names[0]), dict(ids_spec, name=names[1], dtype="int64")]
    specs += [{"name": n, "dtype": kv["dtype"], "shape": [b, kv_shape(kv, i)[0], 1, kv_shape(kv, i)[1]],
               "dynamic_dims": lead + [2]} for i, n in enumerate(names[2:])]
    return specs


def hf_config(model) -> dict | None:
    """A ``transformers`` model's config as JSON data (with its class in ``architectures``), kept
    in the manifest so exports to Hugging Face formats (compressed-tensors, GGUF) can name the
    architecture; None for other models."""
    config = getattr(model, "config", None)
    if config is None or not is_hf_model(model) or not hasattr(config, "to_json_string"):
        return None
    d = json.loads(config.to_json_string(use_diff=False))
    d["architectures"] = [type(model).__name__]
    return d


def _finish(prep: Prepared, model, tokenizer, source) -> CompiledModel:
    gm, ctx, specs, t0, t_capture = prep.gm, prep.ctx, prep.specs, prep.t0, prep.t_capture
    quantized = {name: {k: rec[k] for k in ("weight", "format", "shape", "bits")}
                 for name, rec in ctx.report.get("layers", {}).items()}
    timings = {"capture": round(t_capture, 3), **ctx.report.get("pass_seconds", {})}
    timings["total"] = round(time.perf_counter() - t0, 3)
    source = dict(source or {"model": type(model).__name__})
    hf = hf_config(model)
    if hf is not None:
        source.setdefault("hf_config", hf)
    return CompiledModel(gm=gm, recipe=ctx.recipe, input_specs=specs, source=source,
                         quantized=quantized, layer_report=ctx.report.get("layers", {}),
                         folds=ctx.report.get("folds", []), allocation=ctx.report.get("allocation", {}),
                         tokenizer=tokenizer, timings=timings, warnings=list(ctx.report.get("warnings", [])),
                         kv={**prep.kv, "quantization": ctx.report["kv_cache"]} if prep.kv and "kv_cache" in ctx.report
                         else prep.kv)


def compile_frontier(model: torch.nn.Module, example_inputs: tuple, recipe: "str | Recipe | dict",
                     calibration: Iterable, budgets_bits: Sequence[float] | None = None, points: int = 4, *,
                     validate: int = 0, input_names: Sequence[str] | None = None, dynamic: bool = True,
                     strict: bool = False, tokenizer: Any = None, source: dict | None = None,
                     progress: bool = True, strict_recipe: bool = False) -> tuple[Any, list[CompiledModel]]:
    """Solve the recipe's bit allocation once (its ``weight_candidates``; any budget in it is
    ignored) and materialize one CompiledModel per budget in ``budgets_bits`` (bits per weight
    over the allocated linears), or ``points`` frontier points spread evenly in cost (the first
    and last included). With ``validate`` > 0, that many (group, cheapest candidate) pairs,
    spread over the sensitivity ranking, are also quantized alone and their real ΔNLL on four
    calibration batches measured (``alloc.extra["validation"]``, with the Spearman rank
    correlation against the predicted sensitivity). Returns (the Allocation, the models); each
    model's ``allocation`` holds its point."""
    import dataclasses

    recipe = get_recipe(recipe)
    if not recipe.weight_candidates:
        raise InputError(f"recipe {recipe.name!r} has no weight_candidates: nothing to allocate")
    base = dataclasses.replace(recipe, budget_bits=None, budget_bytes=None)
    prep = _prepare(model, example_inputs, base, calibration, input_names, dynamic, strict, progress, ANALYZE,
                    strict_recipe)
    gm, ctx = prep.gm, prep.ctx
    alloc = ctx.allocation
    if validate:
        alloc.extra["validation"] = _validate(gm, ctx, alloc, validate)
    pts = alloc.frontier.points()
    if budgets_bits is None:  # frontier points nearest to evenly spaced costs
        lo, hi = pts[0].cost, pts[-1].cost
        want = [lo + (hi - lo) * i / max(points - 1, 1) for i in range(points)]
        chosen = sorted({min(range(len(pts)), key=lambda j: abs(pts[j].cost - c)) for c in want})
        targets = [pts[j] for j in chosen]
    else:
        targets = [alloc.point_for_bits(b) for b in budgets_bits]
    t_head = time.perf_counter() - prep.t0
    models = []
    for point in targets:
        bpw = alloc.bits_per_weight(point)
        r = dataclasses.replace(base, name=f"{recipe.name}@{bpw:.3f}bpw", budget_bits=round(bpw, 6))
        models.append(_materialize(prep, alloc, point, r, t_head, model, tokenizer, source))
    return alloc, models


def _materialize(prep: Prepared, alloc, point, recipe: Recipe, t_head: float, model, tokenizer, source,
                 extra: dict | None = None) -> CompiledModel:
    """MATERIALIZE a copy of an analyzed graph at one allocation ``point`` under ``recipe`` (its KV
    fields included); timed as the analysis (``t_head``) plus this materialization."""
    import copy

    from finegrain.passes.allocate_bits import apply_point

    t1 = time.perf_counter()
    g2 = copy.deepcopy(prep.gm)
    apply_point(alloc, point, g2)
    sub = copy.copy(prep.ctx)
    sub.recipe = recipe
    sub.report = {**prep.ctx.report, "layers": {}, "pass_seconds": dict(prep.ctx.report.get("pass_seconds", {}))}
    sub.report["allocation"] = {**alloc.summary(point, point.cost), **(extra or {})}
    g2 = run_passes(g2, sub, MATERIALIZE)
    return _finish(Prepared(g2, sub, prep.specs, t1 - t_head, prep.t_capture, prep.kv), model, tokenizer, source)


def compile_joint(model: torch.nn.Module, example_inputs: tuple, recipe: "str | Recipe | dict", calibration: Iterable,
                  sens, kv_fields: dict, context: int, budgets_bytes: Sequence[int], *, tokenizer: Any = None,
                  source: dict | None = None, progress: bool = True,
                  strict_recipe: bool = False) -> tuple[Any, list[tuple[dict, CompiledModel]]]:
    """Weights and KV cache under one byte budget (issue #17, KVTuner jointly with the weight formats):
    the recipe's ``weight_candidates`` allocation (analyzed once on the KV-cache graph; its sensitivity
    should be ``fisher``, predicted nats, the unit of ``sens``) and the KV pairs of ``sens``
    (``driver/kv_tune.kv_sensitivity`` with ``objective="loss"``) in one knapsack
    (``kv_tune.joint_allocate``): for each total in ``budgets_bytes`` (stored weights + the cache at
    ``context`` tokens) one CompiledModel with its weight formats and ``kv_layers`` (``kv_fields``:
    the KV recipe fields besides the formats, as the sensitivity was measured). Returns
    (the JointAllocation, ``[(summary, model)]``)."""
    import dataclasses

    from finegrain.compiler.ir import quantizable_ops
    from finegrain.compiler.knapsack import Point
    from finegrain.driver.kv_tune import joint_allocate
    from finegrain.formats import QuantFormat
    from finegrain.passes.allocate_bits import _fixed_bytes
    from finegrain.passes.quantize_kv import token_bytes

    recipe = get_recipe(recipe)
    if not recipe.weight_candidates:
        raise InputError(f"recipe {recipe.name!r} has no weight_candidates: nothing to allocate jointly with the cache")
    base = dataclasses.replace(recipe, budget_bits=None, budget_bytes=None, kv_key=None, kv_value=None, kv_layers=(),
                               **kv_fields)
    prep = _prepare(model, example_inputs, base, calibration, None, True, False, progress, ANALYZE, strict_recipe,
                    kv_cache=True)
    alloc = prep.ctx.allocation
    wbytes = [[sum(c.stored_bytes(alloc.shapes[t.name]) * len(t.slices) for t in grp) for c in alloc.candidates]
              for grp in alloc.groups]
    fixed = _fixed_bytes(prep.gm, quantizable_ops(prep.gm), {t.op.name for grp in alloc.groups for t in grp})
    hd, heads = prep.kv["head_dim"], prep.kv["kv_heads"]
    pair_bytes = [heads * (token_bytes(base, QuantFormat.parse(k), "key", hd, context)
                           + token_bytes(base, QuantFormat.parse(v), "value", hd, context)) for k, v in sens.pairs]
    joint = joint_allocate(wbytes, alloc.values, sens, pair_bytes, context, fixed)
    t_head = time.perf_counter() - prep.t0
    out = []
    for budget in budgets_bytes:
        picks, kv_layers, info = joint.best(int(budget))
        point = Point(sum(alloc.costs[g][i] for g, i in enumerate(picks)),
                      sum(alloc.values[g][i] for g, i in enumerate(picks)), tuple(picks))
        r = dataclasses.replace(base, name=f"{recipe.name}-joint{budget / 2**20:.1f}MiB",
                                kv_layers=tuple(tuple(e) for e in kv_layers))
        cm = _materialize(prep, alloc, point, r, t_head, model, tokenizer, source, {"joint": info})
        out.append((info, cm))
    return joint, out


def _validate(gm, ctx, alloc, count: int) -> dict:
    """Measured ΔNLL of single (group, cheapest candidate) quantizations vs the predicted value."""
    from finegrain.passes.sensitivity import mean_nll, measured_delta_nll

    batches = ctx.calibration[:4]
    cheap = min(range(len(alloc.candidates)), key=lambda i: alloc.candidates[i].bits_per_element())
    order = sorted(range(len(alloc.groups)), key=lambda g: alloc.values[g][cheap])
    pick = sorted({order[round(j * (len(order) - 1) / max(count - 1, 1))] for j in range(count)})
    base = mean_nll(gm, batches)
    rows = []
    for g in ctx.progress(pick, desc="validate sensitivity"):
        grp = alloc.groups[g]
        d = measured_delta_nll(gm, batches, [(t.op.weight.target, e) for t in grp for e in t.slices],
                               alloc.candidates[cheap], base)
        rows.append({"group": [t.name for t in grp], "format": alloc.candidates[cheap].tag,
                     "predicted": alloc.values[g][cheap], "measured_delta_nll": d})
    rank = lambda xs: torch.tensor(xs, dtype=torch.float64).argsort().argsort().double()  # noqa: E731
    rp, rm = rank([r["predicted"] for r in rows]), rank([r["measured_delta_nll"] for r in rows])
    rho = float(torch.corrcoef(torch.stack([rp, rm]))[0, 1]) if len(rows) > 2 else float("nan")
    return {"base_nll": base, "pairs": rows, "spearman": rho}
