"""Block-by-block compilation: models larger than RAM (issue #18 item 2).

``compile_streamed`` quantizes a model whose weights stay on disk until the block that reads them
is compiled:

1. the model is built with empty parameters (``models/hf_dir.load_hf_lazy``: ``torch.empty``
   pages that are never written take no memory) and captured whole by ``torch.export`` (a graph
   needs no weight values);
2. the graph is cut into segments by the source module each op ran in (``node.meta[MODULE]``): the
   ops of one repeated layer (the first module path component that is an index, ``model.layers.7``)
   form a block; ops before the first block form the prologue (embedding, rotary tables, mask),
   ops after the last the epilogue (final norm, LM head); an op outside any layer between two
   blocks joins the next block. A layer whose ops are not contiguous in the graph is an error;
3. each segment becomes a graph of its own (its inputs: the values earlier segments produce; its
   outputs: the values later segments or the model output read), its weights are read from the
   checkpoint (``io/checkpoint.py``, float32, one tensor at a time), and the whole pass pipeline
   runs on it with the segment's inputs over the calibration batches as calibration data. Those
   inputs are the outputs of the **already quantized** earlier segments, so GPTQ, the clip
   searches and smoothing see the quantized model's activations, as sequential GPTQ does in one
   graph;
4. the quantized segment runs on the calibration batches to produce the next segments' inputs;
   its float weights are dropped (only its packed weights stay), and the segments are stitched back
   into one graph, which saves as an ordinary artifact.

Peak memory: one segment's float weights and pass work (the prologue / epilogue hold the
embedding / LM head), the calibration activations at one segment boundary, and the quantized
weights done so far. Recipes whose passes span blocks are refused by name: the residual rotation
(``rotate``: it rewrites the embedding and every block together), bit allocation under a budget
(``weight_candidates``: one solve over every layer), the KV cache (``kv_*``) and GPTQ's float
target (``gptq_float_target``: the float model's activations would have to cross blocks too).
"""
from __future__ import annotations

import re
import time
from typing import Any, Iterable, Sequence

import torch
from torch.fx import Graph, GraphModule, Node

from finegrain.compiler.capture import capture
from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import FQN, MODULE, ROLE, get_tensor, quantizable_ops, set_tensor
from finegrain.compiler.recipe import Recipe, get_recipe
from finegrain.driver.api import _calibration_batches, _check_token_ids, _input_specs, hf_config, input_names_of
from finegrain.driver.pipeline import PIPELINE, run_passes
from finegrain.errors import InputError, RecipeError
from finegrain.io.checkpoint import SafetensorsCheckpoint
from finegrain.io.spool import TensorSpool
from finegrain.runtime.compiled import CompiledModel

_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")  # the first module path prefix ending in an index component


def layer_of(node: Node) -> str | None:
    """The repeated layer a node's op ran in (``model.layers.3``), None outside any."""
    m = _LAYER.match(node.meta.get(MODULE) or "")
    return m.group(1) if m else None


def segments(gm: GraphModule) -> tuple[list[str], list[list[Node]]]:
    """The graph's compute nodes cut into prologue, one segment per layer, epilogue (module
    docstring); returns (segment names, node lists in graph order). Empty prologue / epilogue kept."""
    body = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    keys = [layer_of(n) for n in body]
    order: list[str] = []
    for k in keys:
        if k is not None and (not order or order[-1] != k):
            if k in order:
                raise InputError(f"layer {k}: its ops are not contiguous in the graph (another layer's ops run between "
                                 "them); block-by-block compilation needs each layer to run as one block")
            order.append(k)
    names = ["prologue", *order, "epilogue"]
    out: list[list[Node]] = [[] for _ in names]
    index = {k: i + 1 for i, k in enumerate(order)}
    nxt = len(names) - 1  # for each node, the segment of the next layer op at or after it
    assign = [0] * len(body)
    seen_layer = False
    for j in range(len(body) - 1, -1, -1):
        if keys[j] is not None:
            nxt = index[keys[j]]
        assign[j] = nxt
    for j, n in enumerate(body):
        if keys[j] is not None:
            seen_layer = True
        out[assign[j] if seen_layer or keys[j] is not None else 0].append(n)
    return names, out


def _extract(gm: GraphModule, nodes: list[Node], later: set[Node], load) -> tuple[GraphModule, list[Node], list[Node]]:
    """One segment as a GraphModule: placeholders for the values it reads from earlier segments,
    its own constants (``load(get_attr node)`` gives each tensor), an output tuple of the values
    read after it (``later``). Returns (module, input nodes, output nodes) in the source graph."""
    own = set(nodes)
    inputs: list[Node] = []
    consts: list[Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a in own:
                continue
            if a.op == "get_attr":
                if a not in consts:
                    consts.append(a)
            elif a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if n in later]
    g, env = Graph(), {}
    root = torch.nn.Module()
    for a in inputs:
        env[a] = g.placeholder(a.name)
        env[a].meta.update(a.meta)
    for c in consts:
        env[c] = g.get_attr(c.target)
        env[c].meta.update(c.meta)
        set_tensor(root, c.target, load(c))
    for n in nodes:
        env[n] = g.node_copy(n, lambda x: env[x])
    g.output(tuple(env[o] for o in outputs))
    return GraphModule(root, g), inputs, outputs


def _check_recipe(recipe: Recipe) -> None:
    why = []
    if recipe.rotate:
        why.append("rotate (the residual rotation rewrites the embedding and every block together)")
    if recipe.weight_candidates or recipe.budget_bits is not None or recipe.budget_bytes is not None:
        why.append("weight_candidates / budget (bit allocation solves over every layer at once)")
    if recipe.kv_key or recipe.kv_value or recipe.kv_rotate or recipe.kv_pre_rope or recipe.kv_layers:
        why.append("kv_* (the KV cache is captured only with kv_cache=True, which block-by-block compilation "
                   "does not take)")
    if recipe.gptq_float_target:
        why.append("gptq_float_target (it needs the float model's activations beside the quantized ones across "
                   "blocks; only the quantized ones cross a block boundary here)")
    if why:
        raise RecipeError(f"recipe {recipe.name!r} cannot be compiled block by block: {'; '.join(why)}. Compile the "
                          "model whole (without --stream) or drop those fields")


def compile_streamed(model: torch.nn.Module, checkpoint: SafetensorsCheckpoint, example_inputs: tuple,
                     recipe: "str | Recipe | dict" = "w4a16-g128", calibration: Iterable | None = None, *,
                     input_names: Sequence[str] | None = None, tokenizer: Any = None, source: dict | None = None,
                     progress: bool = True, strict_recipe: bool = False,
                     param_names: dict[str, str] | None = None, spool_dir=None) -> CompiledModel:
    """Compile ``model`` (its parameters empty, e.g. ``load_hf_lazy``) block by block, reading each
    weight from ``checkpoint`` when its block is compiled (module docstring). ``param_names`` maps a
    graph constant's FQN to its checkpoint key where they differ (tied weights); constants that are
    neither (rotary tables, buffers computed at construction) are taken from the model.
    Each finished segment's tensors go to a :class:`~finegrain.io.spool.TensorSpool` in ``spool_dir``
    (default: the temporary directory; on the output's file system, saving copies them file to file)
    and stay memory-mapped from it. Same results as ``finegrain.compile`` for recipes whose passes stay inside a block."""
    recipe = get_recipe(recipe)
    _check_recipe(recipe)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    _check_token_ids(model, example_inputs)
    names = list(input_names) if input_names is not None else input_names_of(model, len(example_inputs))
    specs = _input_specs(example_inputs, names, True)
    batches = _calibration_batches(calibration, specs, model)
    if recipe.needs_calibration and not batches:
        raise InputError(f"recipe {recipe.name!r} needs calibration data")
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    keys = dict(param_names or {})
    for n in params:
        if n not in keys:
            keys[n] = n
    t0 = time.perf_counter()
    gm = capture(model, example_inputs, input_names=names, check_finite=False)
    t_capture = time.perf_counter() - t0

    # rule coverage and roles over the whole graph: a segment alone would miss the LM head's rule
    whole = PassContext(recipe=recipe, show_progress=False, strict_recipe=strict_recipe)
    from finegrain.passes.allocate_bits import check_rule_coverage

    check_rule_coverage(quantizable_ops(gm), whole)
    for op in quantizable_ops(gm):
        op.node.meta[ROLE] = op.role

    seg_names, segs = segments(gm)
    seg_of = {n: i for i, s in enumerate(segs) for n in s}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    last_reader: dict[Node, int] = {}
    for i, s in enumerate(segs):
        for n in s:
            for a in n.all_input_nodes:
                last_reader[a] = max(last_reader.get(a, -1), i)
    for a in out_node.all_input_nodes:
        last_reader[a] = len(segs)

    shared: dict[str, torch.Tensor] = {}  # weights more than one segment reads (a tied embedding / LM head): read once
    readers = {c: {seg_of[u] for u in c.users if u in seg_of} for c in gm.graph.nodes if c.op == "get_attr"}

    def load(c: Node) -> torch.Tensor:
        fqn = c.meta.get(FQN, c.target)
        if fqn in keys:
            key = keys[fqn]
            if key in shared:
                return shared[key]
            t = checkpoint.load(key)
            if len(readers.get(c, ())) > 1:
                shared[key] = t
            want = tuple(get_tensor(gm, c.target).shape)
            if tuple(t.shape) != want:
                raise InputError(f"{checkpoint.path}: tensor {key!r} is {list(t.shape)} in the checkpoint but the model "
                                 f"its config describes needs {list(want)}")
            return t
        return get_tensor(gm, c.target)

    spool = TensorSpool(spool_dir)
    values: dict[Node, list] = {p: [b[i] for b in batches] for i, p in
                                enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    done: list[tuple[GraphModule, list[Node], list[Node]]] = []
    report: dict = {"layers": {}, "folds": [], "warnings": list(whole.report.get("warnings", [])),
                    "pass_seconds": {}, "segments": []}
    bar = iter(_progress(progress, len(segs)))
    for i, nodes in enumerate(segs):
        t1 = time.perf_counter()
        later = {n for n in nodes if last_reader.get(n, -1) > i}
        sub, inputs, outputs = _extract(gm, nodes, later, load)
        ctx = PassContext(recipe=recipe, calibration=[tuple(values[a][b] for a in inputs) for b in range(len(batches))],
                          show_progress=False, strict_recipe=strict_recipe, check_rules=False)
        sub = run_passes(sub, ctx, PIPELINE)
        report["layers"].update(ctx.report.get("layers", {}))
        report["folds"] += ctx.report.get("folds", [])
        report["warnings"] += [w for w in ctx.report.get("warnings", []) if w not in report["warnings"]]
        for k, v in ctx.report.get("pass_seconds", {}).items():
            report["pass_seconds"][k] = round(report["pass_seconds"].get(k, 0.0) + v, 3)
        if any(last_reader.get(o, -1) > i for o in outputs) and batches:
            with torch.inference_mode():
                outs = [sub(*(values[a][b] for a in inputs)) for b in range(len(batches))]
            for j, o in enumerate(outputs):
                values[o] = [r[j] for r in outs]
            del outs
        for c, segs_reading in readers.items():  # a shared weight's last reader is done
            if max(segs_reading, default=-1) == i:
                shared.pop(keys.get(c.meta.get(FQN, c.target), ""), None)
        for a in list(values):  # free boundary values no later segment reads
            if last_reader.get(a, -1) <= i:
                del values[a]
        del ctx
        _spool_constants(sub, spool)
        done.append((sub, inputs, outputs))
        report["segments"].append({"name": seg_names[i], "ops": len(nodes), "seconds": round(time.perf_counter() - t1, 3)})
        next(bar, None)
    final = _stitch(gm, done)
    del gm, values
    cm = _compiled(final, recipe, specs, report, model, tokenizer, source, t_capture, t0)
    cm.spool = spool
    return cm


def _spool_constants(sub: GraphModule, spool: TensorSpool) -> None:
    """A finished segment's constants written to the spool and replaced by their memory-mapped
    copies (each distinct tensor once), so its packed weights leave RAM."""
    moved: dict[int, torch.Tensor] = {}
    for n in sub.graph.nodes:
        if n.op == "get_attr":
            t = get_tensor(sub, n.target)
            if isinstance(t, torch.Tensor):
                if id(t) not in moved:
                    moved[id(t)] = spool.put(t.detach())
                set_tensor(sub, n.target, moved[id(t)])


def _progress(show: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(range(total), desc="compile block by block", disable=not show, leave=False)


def _stitch(gm: GraphModule, done: list[tuple[GraphModule, list[Node], list[Node]]]) -> GraphModule:
    """One graph from the compiled segments in order: each segment's placeholders read the nodes that
    produce them; constants keep their names (two segments' constants of one name stored once when
    equal, e.g. a tied weight quantized alike for the embedding and the LM head, else renamed)."""
    g, env = Graph(), {}
    root = torch.nn.Module()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = g.placeholder(n.name)
            env[n].meta.update(n.meta)
    attrs: dict[str, tuple[torch.Tensor, Node]] = {}
    for sub, inputs, outputs in done:
        local: dict[Node, Node] = {}
        phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for ph, src in zip(phs, inputs):
            local[ph] = env[src]
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "get_attr":
                t = get_tensor(sub, n.target)
                name = n.target
                if name in attrs and attrs[name][0] is not t and not _same(attrs[name][0], t):
                    k = 1
                    while f"{n.target}_{k}" in attrs:
                        k += 1
                    name = f"{n.target}_{k}"
                if name not in attrs:
                    node = g.get_attr(name)
                    node.meta.update(n.meta)
                    attrs[name] = (t, node)
                    set_tensor(root, name, t)
                local[n] = attrs[name][1]
            elif n.op == "output":
                for src, val in zip(outputs, n.args[0]):
                    env[src] = local[val]
            else:
                local[n] = g.node_copy(n, lambda x: local[x])
    out = next(n for n in gm.graph.nodes if n.op == "output")
    g.output(torch.fx.map_arg(out.args[0], lambda n: env[n]))
    final = GraphModule(root, g)
    final.graph.lint()
    return final


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors (a tied weight quantized the same way by two segments is stored once)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _compiled(gm, recipe, specs, report, model, tokenizer, source, t_capture, t0) -> CompiledModel:
    quantized = {name: {k: rec[k] for k in ("weight", "format", "shape", "bits")}
                 for name, rec in report["layers"].items()}
    source = dict(source or {"model": type(model).__name__})
    hf = hf_config(model)
    if hf is not None:
        source.setdefault("hf_config", hf)
    source["compiled"] = {"mode": "block by block", "segments": len(report["segments"])}
    timings = {"capture": round(t_capture, 3), **report["pass_seconds"], "total": round(time.perf_counter() - t0, 3)}
    return CompiledModel(gm=gm, recipe=recipe, input_specs=specs, source=source, quantized=quantized,
                         layer_report=report["layers"], folds=report["folds"], allocation={}, tokenizer=tokenizer,
                         timings=timings, warnings=report["warnings"])
