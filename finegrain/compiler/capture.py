"""Capture a PyTorch model with ``torch.export`` into finegrain's IR.

* non-strict export by default (``strict=True`` on request), dynamic sequence length (dim 1 of
  every 2-D integer input, up to the model's context) so one graph serves calibration,
  evaluation and any prompt length; the batch dim is dynamic when the example batch is >= 2;
  other inputs (images, audio, ...) vary in the dims the caller declares (``declared``);
* the graph is torch.export's ATen training IR (``decompose=False``, the default: decomposing
  costs ~2x the export itself on SmolLM2 with dynamic shapes and only rewrites ops like
  silu/transpose); ``decompose=True`` lowers to core ATen in the same one trace
  (:func:`export_decomposed`, also the TVM backend's import) while keeping ``aten.linear`` (and
  SDPA) whole, so linears stay findable either way;
* Hugging Face models are wrapped to take tensors positionally and return one tensor (logits for
  causal LMs with ``use_cache=False``, ``last_hidden_state`` for encoders);
* parameters, buffers and constants become ``get_attr`` nodes named by their FQN in the source
  model (tied weights are stored and read once); the result is a plain ``GraphModule`` whose
  placeholders are the user inputs, in order. (DESIGN.md keeps parameters as placeholders of the
  ExportedProgram; a self-contained GraphModule is simpler for passes that add and remove
  constants, re-exports cleanly, and serializes without an export signature.)

A model that does not export raises :class:`CaptureError` naming the module that failed.
"""
from __future__ import annotations

import functools
import traceback
from typing import Sequence

import torch
from torch.fx import Graph, GraphModule

from finegrain.compiler.ir import FQN, KV, MODULE, set_tensor
from finegrain.errors import CaptureError, InputError

_WRAPPED = "model"


class HFWrapper(torch.nn.Module):
    """Positional tensors in, one tensor out, for a ``transformers`` model."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)
        self.causal = is_causal_lm(model)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs))
        if self.causal:
            return self.model(**kwargs, use_cache=False).logits
        return self.model(**kwargs).last_hidden_state


class HFCacheWrapper(torch.nn.Module):
    """A ``transformers`` causal LM with its KV cache as graph tensors: ``forward(input_ids,
    position_ids, past_key_0, past_value_0, ...)`` -> ``(logits, present_key_0, present_value_0,
    ...)``, each past / present ``[batch, kv_heads, seq, head_dim]``. The model concatenates the new
    keys / values onto the past (a ``DynamicCache`` built from the inputs), so one graph serves
    prefill (past of length 0) and decode (one token, any past length)."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache()  # full per-layer caches: sliding-window layers are masked, not truncated
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True, **{cache_kwarg(self.model): cache})
        present = []
        for layer in cache.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name a ``transformers`` model's forward takes its cache by: ``cache`` from transformers
    5.2x (``past_key_values`` is deprecated there), ``past_key_values`` before (which would take an
    unknown ``cache=`` into ``**kwargs`` and silently run without one)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv_layout(model: torch.nn.Module) -> dict:
    """The KV cache of a ``transformers`` causal LM: layers, kv heads, head dim (read from a
    one-token forward, so GQA / MQA / explicit head_dim are what the model really does)."""
    if not is_hf_model(model) or not is_causal_lm(model):
        raise InputError(f"kv_cache=True needs a transformers causal LM, got {type(model).__name__}")
    from transformers import DynamicCache

    cache = DynamicCache()
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True, **{cache_kwarg(model): cache})
    except (ValueError, TypeError, AttributeError) as e:  # e.g. MiniMax: "uses cache of its own"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(f"{type(model).__name__}: its forward does not take transformers' DynamicCache, which the "
                           f"KV-cache capture passes it ({type(e).__name__}: {first}); compile without kv_cache") from e
    layers = len(cache.layers)
    if layers == 0 or any(lay.keys is None for lay in cache.layers):
        raise CaptureError(f"{type(model).__name__}: its cache has no per-layer keys / values to expose")
    k, v = cache.layers[0].keys, cache.layers[0].values
    for kind in ("keys", "values"):
        shapes = {tuple(getattr(lay, kind).shape[1::2]) for lay in cache.layers}
        if len(shapes) != 1:
            raise CaptureError(f"{type(model).__name__}: layers with different {kind[:-1]} head counts / dims "
                               f"{sorted(shapes)} are not supported by the KV-cache capture yet")
    out = {"layers": layers, "kv_heads": int(k.shape[1]), "head_dim": int(k.shape[3]),
           "dtype": str(k.dtype).removeprefix("torch."), "layout": "batch, kv_heads, seq, head_dim",
           "cache": "concat"}
    if v.shape[1::2] != k.shape[1::2]:  # DeepSeek's MLA caches a latent and a rotary key of their own widths
        out.update(value_heads=int(v.shape[1]), value_dim=int(v.shape[3]))
    return out


def kv_shape(kv: dict, i: int) -> tuple[int, int]:
    """(heads, width) of past input ``i`` (keys at even, values at odd indices): the values' own
    ``value_heads`` / ``value_dim`` where the layout has them (MLA), else ``kv_heads`` / ``head_dim``."""
    if i % 2 and "value_dim" in kv:
        return kv["value_heads"], kv["value_dim"]
    return kv["kv_heads"], kv["head_dim"]


def kv_widths_differ(kv: dict | None) -> bool:
    """Keys and values of different shapes (MLA's latent and rotary key): a float cache only."""
    return bool(kv) and "value_dim" in kv


KV_INPUTS = ("input_ids", "position_ids")


def kv_input_names(layers: int) -> list[str]:
    return [*KV_INPUTS, *[f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]]


def is_kv_specs(input_specs: list[dict]) -> bool:
    """The inputs of a KV-cache graph (``compile(kv_cache=True)``): ids, positions, past K / V."""
    names = [s["name"] for s in input_specs]
    return len(names) >= 4 and len(names) % 2 == 0 and names == kv_input_names((len(names) - 2) // 2)


def check_kv_layout(kv, inputs: list, where: str) -> None:
    """A KV-cache layout read from a file (an artifact's or a deployment's manifest): bounded
    integers, a float dtype, and exactly the inputs it implies; ``where`` names the file."""
    from finegrain.errors import ArtifactError
    from finegrain.io.signature import is_int

    ints = ("layers", "kv_heads", "head_dim", "max_seq_len")
    optional = [k for k in ("value_heads", "value_dim") if isinstance(kv, dict) and k in kv]
    if (not isinstance(kv, dict) or not all(is_int(kv.get(k)) and 1 <= kv[k] <= 1 << 20 for k in (*ints, *optional))
            or len(optional) == 1 or kv.get("dtype") not in ("float32", "float16", "bfloat16")):
        raise ArtifactError(f"{where}: field 'kv' must hold integer layers, kv_heads, head_dim, max_seq_len (and "
                            "value_heads with value_dim, or neither) in [1, 2^20] and a float dtype")
    want = kv_input_names(kv["layers"])
    if [s.get("name") if isinstance(s, dict) else None for s in inputs] != want:
        raise ArtifactError(f"{where}: a KV-cache artifact's inputs must be {want[:4]}... ({len(want)} in all)")


def kv_inputs(kv: dict, ids: torch.Tensor, past: "tuple | list | None" = None, start: int = 0) -> tuple:
    """The full input tuple of a KV-cache graph: ``ids``, their positions from ``start``, and the
    past (empty of the right shape when None)."""
    b = ids.shape[0]
    pos = torch.arange(start, start + ids.shape[1], dtype=torch.long).expand(b, -1)
    if past is None:
        dt = getattr(torch, kv["dtype"])
        past = [torch.zeros(b, h, 0, d, dtype=dt) for h, d in (kv_shape(kv, i) for i in range(2 * kv["layers"]))]
    return (ids, pos, *past)


def is_hf_model(model: torch.nn.Module) -> bool:
    """A ``transformers`` model (its class or a base class comes from the package)."""
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "lm_head") or type(model).__name__.endswith("ForCausalLM")


def _decompositions() -> dict:
    table = torch.export.default_decompositions()
    for op in (torch.ops.aten.linear.default, torch.ops.aten.scaled_dot_product_attention.default):
        table.pop(op, None)
    return table


def export_decomposed(model: torch.nn.Module, example_inputs: tuple, table: dict, *, dynamic_shapes=None,
                      strict: bool = False, one_trace: bool | None = None, **kwargs) -> torch.export.ExportedProgram:
    """``torch.export.export(...).run_decompositions(table)`` in one trace instead of two.

    ``run_decompositions`` re-traces the whole program (fake tensors, symbolic shapes) a second
    time: on SmolLM2 with a dynamic sequence it costs ~2.5x the export (27 s after 11 s). torch's
    own ATen-dispatch export (``torch.export._trace._export(pre_dispatch=False)``) takes the
    decomposition table in its one trace, the table split the way ``run_decompositions`` splits it
    (CompositeImplicitAutograd ops to keep or override in a context, the rest to AOT dispatch):
    25 s for the same program, the same ops out (the training IR's ``_assert_tensor_metadata``
    checks aside). These are private names of torch 2.13, the version the setup pins and the tests
    check: any other torch (the GPU machine's 2.11 among them) takes the public two traces, slower,
    never wrong. ``one_trace``: None picks by the torch version; False forces the two traces
    (``benchmarks/tvm_build.py`` compares both)."""
    from unittest import mock

    if one_trace is None:
        one_trace = torch.__version__.startswith("2.13.")
    if not one_trace:
        ep = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=strict, **kwargs)
        return ep.run_decompositions(table)
    from torch.export import _trace
    from torch.export.exported_program import (_override_composite_implicit_decomp,
                                                _split_decomp_table_to_cia_and_python_decomp)

    aten_ir, export = _trace._export_to_aten_ir, _trace._export
    table = dict(table.materialize() if hasattr(table, "materialize") else table)
    cia, rest = _split_decomp_table_to_cia_and_python_decomp(table)
    with _override_composite_implicit_decomp(cia), \
            mock.patch.object(_trace, "_export_to_aten_ir", functools.partial(aten_ir, decomp_table=rest)):
        return export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=strict, pre_dispatch=False,
                      **kwargs)


def _dynamic_shapes(model: torch.nn.Module, inputs: tuple, dynamic: bool):
    """dim 1 (sequence) of every 2-D integer input is dynamic, up to the model's context; the
    batch dim is dynamic too when the example batch is >= 2 (export specializes size-1 dims)."""
    if not dynamic:
        return None
    config = getattr(getattr(model, "model", model), "config", None)
    max_seq = int(getattr(config, "max_position_embeddings", None) or 1 << 16)
    seq = torch.export.Dim("seq", min=2, max=max_seq)
    batch = torch.export.Dim("batch", min=2, max=1 << 16)
    specs = []
    for t in inputs:
        spec = {}
        if t.dim() == 2 and not t.is_floating_point():
            spec[1] = seq
            if t.shape[0] >= 2:
                spec[0] = batch
        specs.append(spec or None)
    import inspect

    star = any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values())
    return (tuple(specs),) if star else tuple(specs)  # forward(*inputs): one spec per input, as a tuple


def _failing_module(model: torch.nn.Module, exc: BaseException) -> str:
    """Name the innermost module whose ``forward`` was on the stack when export failed."""
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if id(obj) in names:
            found = f"{names[id(obj)]} ({type(obj).__name__}, {frame.f_code.co_filename}:{frame.f_lineno})"
    return found or "<unknown module>"


def check_finite_parameters(model: torch.nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"weight {name!r} contains NaN or Inf; fix the checkpoint before quantizing")


def _kv_dynamic_shapes(model: "HFCacheWrapper", inputs: tuple, split: bool = False):
    """``seq`` and ``past`` each up to the model's positions; ``split``: ``seq`` up to half of them and
    ``past`` the rest, for a model that slices a fixed-size buffer by ``past + seq`` (GPT-Neo's causal
    mask), where export needs the sum bounded by the ranges."""
    config = model.model.config
    max_seq = int(getattr(config, "max_position_embeddings", None) or 1 << 16)
    seq = torch.export.Dim("seq", min=1, max=max_seq // 2 if split else max_seq)
    past = torch.export.Dim("past", min=0, max=max_seq - max_seq // 2 if split else max_seq)
    batch = torch.export.Dim("batch", min=2, max=1 << 16) if inputs[0].shape[0] >= 2 else None
    lead = {0: batch} if batch is not None else {}
    return ({**lead, 1: seq}, {**lead, 1: seq}, tuple({**lead, 2: past} for _ in inputs[2:]))


def _auto_dims(shapes):
    """``shapes`` with every named ``Dim`` replaced by ``Dim.AUTO`` (export infers the range). Some
    torch / transformers pairs (torch 2.11 with transformers 5.17, the GPU machine's) emit a guard such as
    ``min(16 * seq, 32 * seq) == 16 * seq`` that export's solver cannot prove over a named range and
    reports as a violated constraint; the inferred range holds it."""
    if isinstance(shapes, dict):
        return {k: _auto_dims(v) for k, v in shapes.items()}
    if isinstance(shapes, (tuple, list)):
        return type(shapes)(_auto_dims(v) for v in shapes)
    return torch.export.Dim.AUTO if isinstance(shapes, torch.export.Dim) else shapes


def _covers(ep, shapes) -> bool:
    """Every named ``Dim`` of ``shapes`` (nested as export takes them, leaves in input order) is, in
    ``ep`` (exported with :func:`_auto_dims`), still a free size whose inferred range holds the named
    one: export inferred nothing narrower than the range that was asked for."""
    from torch.utils._pytree import tree_leaves

    leaves = tree_leaves(shapes, is_leaf=lambda x: x is None or isinstance(x, dict))
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    users = ep.graph_signature.user_inputs
    for name, spec in zip(users, leaves):
        for d, dim in (spec or {}).items():
            if not isinstance(dim, torch.export.Dim):
                continue
            size = vals[name].shape[d] if vals.get(name) is not None else None
            if not isinstance(size, torch.SymInt) or not size.node.expr.is_symbol:
                return False
            vr = ep.range_constraints.get(size.node.expr)
            if vr is None or _finite(vr.lower, 0) > dim.min or _finite(vr.upper, 1 << 62) < dim.max:
                return False
    return True


def _declared_shapes(model: torch.nn.Module, declared: list[dict[int, str]]):
    """Dynamic shapes from per-input ``{dim: label}`` declarations: each declared dim is
    ``Dim.AUTO``, so export infers the range the model allows (a stride-2 conv needs width >= 3, a
    reshape may tie two dims) instead of failing on a guessed one; :func:`_dim_ranges` reads it back."""
    import inspect

    specs = tuple({d: torch.export.Dim.AUTO for d in dyn} or None for dyn in declared)
    star = any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values())
    return (specs,) if star else specs


def _finite(bound, default: int) -> int:
    """A sympy range bound as an int; ``default`` for infinity (``int_oo``) or none."""
    from torch.utils._sympy.numbers import IntInfinity, NegativeIntInfinity

    if bound is None or isinstance(bound, (IntInfinity, NegativeIntInfinity)) or not bool(getattr(bound, "is_finite", True)):
        return default
    return int(bound)


def _dim_ranges(ep, declared: list[dict[int, str]], names: Sequence[str]) -> list[dict[int, tuple[int, int]]]:
    """Per input, {dim: (min, max)} of each declared dim as export inferred it (max capped at 2^20);
    a dim the model fixes to one size is an InputError naming it."""
    users = ep.graph_signature.user_inputs
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    out = []
    for i, dyn in enumerate(declared):
        ranges = {}
        shape = vals[users[i]].shape if i < len(users) and vals.get(users[i]) is not None else None
        for d in dyn:
            size = shape[d] if shape is not None else None
            if not isinstance(size, torch.SymInt) or not size.node.expr.free_symbols:  # an int, or a SymInt constant
                raise InputError(f"input {names[i]!r}: dim {d} was declared dynamic, but the model only works with size "
                                 f"{int(size) if size is not None else size} there (export specialized it); declare it "
                                 "static")
            vr = ep.range_constraints.get(size.node.expr)
            lo = _finite(vr.lower if vr is not None else None, 2)
            hi = _finite(vr.upper if vr is not None else None, 1 << 20)
            if lo == hi:
                raise InputError(f"input {names[i]!r}: dim {d} was declared dynamic, but the model only works with size "
                                 f"{lo} there (export specialized it); declare it static")
            ranges[d] = (max(lo, 1), min(hi, 1 << 20))
        out.append(ranges)
    return out


def capture(model: torch.nn.Module, example_inputs: tuple, *, input_names: Sequence[str] = ("input_ids",),
            dynamic: bool = True, strict: bool = False, decompose: bool = False, kv: dict | None = None,
            declared: list[dict[int, str]] | None = None, check_finite: bool = True) -> GraphModule:
    """Export ``model`` on ``example_inputs`` and return finegrain's IR (see module docstring).
    ``declared``: per input, ``{dim: label}`` of the dims that vary (``compile(inputs=...)``), instead of
    the token-id default; the ranges export inferred for them are left in ``gm.meta["input_dim_ranges"]``.
    ``kv`` (:func:`kv_layout` of a causal LM): capture it with its KV cache as graph inputs and
    outputs (:class:`HFCacheWrapper`; ``example_inputs`` is then ``(input_ids,)``, the past is made up here)."""
    if not isinstance(example_inputs, tuple) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise InputError("example_inputs must be a tuple of tensors, e.g. (input_ids,)")
    if check_finite:  # off for a model whose weights are still on disk (driver/stream.py checks each as read)
        check_finite_parameters(model)
    prefix = ""
    if kv is not None:
        ids = example_inputs[0]
        dt = getattr(torch, kv["dtype"])
        gen = torch.Generator().manual_seed(0)  # a past of 2 so export does not specialize its length
        past = [torch.randn(ids.shape[0], kv_shape(kv, i)[0], 2, kv_shape(kv, i)[1], generator=gen).to(dt)
                for i in range(2 * kv["layers"])]
        example_inputs = kv_inputs(kv, ids, past, start=2)
        model, prefix = HFCacheWrapper(model, kv["layers"]), _WRAPPED + "."
    elif is_hf_model(model):
        model, prefix = HFWrapper(model, input_names[: len(example_inputs)]), _WRAPPED + "."
    model = model.eval()
    try:
        with torch.no_grad():
            if kv is not None:
                shapes = _kv_dynamic_shapes(model, example_inputs) if dynamic else None
            elif declared is not None:
                shapes = _declared_shapes(model, declared) if dynamic else None
            else:
                shapes = _dynamic_shapes(model, example_inputs, dynamic)

            def export(dims):
                if decompose:  # one trace to core ATen (export_decomposed)
                    return export_decomposed(model, example_inputs, _decompositions(), dynamic_shapes=dims,
                                             strict=strict)
                return torch.export.export(model, example_inputs, dynamic_shapes=dims, strict=strict)

            notes: list[str] = []  # warnings of the capture (a KV graph captured for a shorter context)
            try:
                ep = export(shapes)
            except Exception as e:  # a guard the named range cannot prove: let export infer the range
                if shapes is None or "Constraints violated" not in str(e):
                    raise
                ep = export(_auto_dims(shapes))
                if not _covers(ep, shapes):  # the model really narrows a range
                    ep = _export_split(export, model, example_inputs, notes) if kv is not None and dynamic else None
                    if ep is None:  # the named one's error stands
                        raise
    except Exception as e:  # torch raises many types here; all become one actionable error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("try strict=True" if not strict else "try strict=False") + \
            ", dynamic=False (static shapes), or wrap the model so forward takes and returns plain tensors"
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {first}\n"
                           f"  failing module: {_failing_module(model, e)}\n  what to try: {hint}") from e
    gm = _unlift(ep, prefix)
    if notes:
        gm.meta["capture_warnings"] = notes
    if declared is not None and dynamic:
        gm.meta["input_dim_ranges"] = _dim_ranges(ep, declared, input_names)
    if kv is not None:  # the present keys / values: a graph role passes and backends can address
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        for i, node in enumerate(out[1:]):
            node.meta[KV] = {"layer": i // 2, "kind": ("key", "value")[i % 2]}
    return gm


def _export_split(export, model, example_inputs, notes: list[str]):
    """The KV-cache graph exported with :func:`_kv_dynamic_shapes` ``split`` (``past + seq`` within the
    model's positions), with a warning that says so appended to ``notes``; None when that fails too."""
    shapes = _kv_dynamic_shapes(model, example_inputs, split=True)
    try:
        ep = export(shapes)
    except Exception:  # noqa: BLE001 - the caller re-raises the first, clearer error
        return None
    seq, past = shapes[0][1].max, shapes[2][0][2].max
    notes.append(
        f"the model bounds past + seq by its {seq + past} positions (a fixed-size buffer sliced by the total length, "
        f"e.g. a causal mask): its KV-cache graph was captured for up to {seq} new tokens per call and {past} past "
        "tokens")
    return ep


def _unlift(ep: torch.export.ExportedProgram, prefix: str) -> GraphModule:
    sig = ep.graph_signature
    kinds = {s.kind.name for s in sig.output_specs}
    if kinds != {"USER_OUTPUT"}:
        raise CaptureError(f"the model mutates state during forward ({sorted(kinds)}); finegrain needs a pure forward")
    sources = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    tensors = {**ep.state_dict, **ep.constants}
    graph, env, root = Graph(), {}, torch.nn.Module()
    by_storage: dict[tuple, str] = {}  # tied weights -> one FQN
    attr_nodes: dict[str, torch.fx.Node] = {}  # ... read by one get_attr node
    gm_tmp = GraphModule(root, Graph())
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in sources:
            fqn = sources[node.name]
            t = tensors[fqn]
            name = fqn[len(prefix):] if fqn.startswith(prefix) else fqn
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if key not in by_storage:
                by_storage[key] = name
                set_tensor(gm_tmp, name, t.detach())
            target = by_storage[key]
            if target not in attr_nodes:
                attr_nodes[target] = graph.get_attr(target)
                attr_nodes[target].meta.update(node.meta)
                attr_nodes[target].meta[FQN] = target
            new = attr_nodes[target]
        elif node.op == "output":
            outs = node.args[0]
            out = outs[0] if isinstance(outs, (tuple, list)) and len(outs) == 1 else outs
            new = graph.output(torch.fx.map_arg(out, lambda n: env[n]))
        else:
            new = graph.node_copy(node, lambda n: env[n])
            stack = node.meta.get("nn_module_stack")
            if stack:
                path = list(stack.values())[-1][0]
                new.meta[MODULE] = path[len(prefix):] if path.startswith(prefix) else path
        env[node] = new
    gm = GraphModule(gm_tmp, graph)
    gm.graph.eliminate_dead_code()  # e.g. a BERT pooler whose output the wrapper drops
    gm.recompile()
    gm.graph.lint()
    return gm
