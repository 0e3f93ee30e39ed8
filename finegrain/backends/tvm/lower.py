"""Quantized FX graph -> Relax IRModule (issue #7).

1. :func:`prepare` rewrites every ``aten.linear(x, finegrain::dequantize_packed(...), bias)`` whose
   format has a kernel here (INT2/3/4/8 per group / channel / tensor) into
   ``finegrain::packed_linear(x, w, scale, zs, bits, bias)`` on weights repacked for the kernel
   (``kernels/lowbit.py``), and turns every stored tensor into a parameter (so Relax keeps the
   weights as inputs, shipped beside the library, not baked into it). Formats without a kernel
   are refused naming the layer: a weight is never dequantized whole and then multiplied.
2. :func:`import_relax` exports that graph twice with ``torch.export``: ``prefill`` with a
   symbolic sequence length (>= 2) and ``decode`` with one token, and imports each with
   ``tvm.relax.frontend.torch.from_exported_program``; a converter turns each ``packed_linear``
   into one ``call_tir`` to the scheduled low-bit kernel (GEMM for prefill, GEMV for decode).
   Both functions share one parameter list.

Activation quantize/dequantize and the online Hadamard have no Relax lowering yet: they are refused.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule

from finegrain.errors import FinegrainError
from finegrain.formats import QuantFormat
from finegrain.formats.ops import DEQUANTIZE_PACKED, unpack_weight
from finegrain.backends.tvm.kernels.lowbit import (container_bits, linear_func, pack_weight, unpack_weight_ref,
                                                   vector_lanes)
from finegrain.runtime.compiled import example_inputs


class TvmError(FinegrainError):
    """The TVM backend cannot lower or build this model; the message names the node / layer."""


@torch.library.custom_op("finegrain::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zs: torch.Tensor, bits: int,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` with W in the TVM kernel's packed layout (reference implementation)."""
    return F.linear(x, unpack_weight_ref(w, scale, zs, bits, x.shape[-1]), bias)


@packed_linear.register_fake
def _(x, w, scale, zs, bits, bias=None):
    return x.new_empty((*x.shape[:-1], w.shape[1]))


PACKED_LINEAR = torch.ops.finegrain.packed_linear.default
_UNSUPPORTED = {
    "quantize": "activation quantization",
    "dequantize": "activation quantization",
    "hadamard": "the online Hadamard rotation",
    "grouped_linear": "mixture-of-experts grouped_linear",
}


def _layer(packed_node) -> str:
    return str(packed_node.target).removesuffix("_qpacked")


def _get(gm: GraphModule, node) -> torch.Tensor | None:
    if node is None:
        return None
    if node.op != "get_attr":
        raise TvmError(f"node {node.name}: a quantized weight's tensors must be stored constants, got {node.op}")
    return gm.get_submodule("").get_buffer(node.target) if "." not in node.target else _attr(gm, node.target)


def _attr(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def prepare(gm: GraphModule) -> tuple[GraphModule, dict]:
    """The graph rewritten for the TVM lowering (see the module docstring) and, per quantized
    layer, the kernel it gets. ``gm`` itself is not modified."""
    graph = Graph()
    env: dict = {}
    graph.output(graph.graph_copy(gm.graph, env))
    root = torch.nn.Module()
    names: dict[str, str] = {}

    def param(name: str, t: torch.Tensor) -> str:
        key = name.replace(".", "_")
        root.register_parameter(key, torch.nn.Parameter(t.detach().contiguous(), requires_grad=False))
        names[name] = key
        return key

    kernels = {}
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
        if name in _UNSUPPORTED and "finegrain" in str(n.target):
            raise TvmError(f"node {n.name}: {_UNSUPPORTED[name]} has no TVM lowering yet (weight-only INT2/3/4/8 "
                           "models build)")
        if n.target is not DEQUANTIZE_PACKED:
            continue
        packed_node, scale_node, zero_node, tag, shape = n.args[:5]
        layer = _layer(packed_node)
        fmt = QuantFormat.parse(tag)
        users = list(n.users)
        if len(shape) != 2 or not users or any(u.target is not torch.ops.aten.linear.default or u.args[1] is not n
                                               for u in users):
            raise TvmError(f"{layer}: the dequantized weight (node {n.name}) feeds {[u.name for u in users]}, not only "
                           "linears; only linear weights have TVM kernels")
        extra = [a for a in n.args[6:] if a is not None] + [v for v in n.kwargs.values() if v is not None]
        if container_bits(fmt) is None or extra:
            raise TvmError(f"{layer}: weight format {fmt.tag} has no TVM kernel (INT2/3/4/8 per group / channel / "
                           "tensor do)")
        q = unpack_weight(_attr(gm, packed_node.target), _attr(gm, scale_node.target),
                          _attr(gm, zero_node.target) if zero_node is not None else None, fmt, list(shape))
        try:
            p = pack_weight(fmt, q)
        except ValueError as e:
            raise TvmError(f"{layer}: {e}") from None
        with graph.inserting_before(n):
            attrs = [graph.get_attr(param(f"{layer}_tvm_{part}", torch.from_numpy(p[part])))
                     for part in ("w", "scale", "zs")]
        for u in users:
            with graph.inserting_before(u):
                bias = u.args[2] if len(u.args) > 2 else u.kwargs.get("bias")
                new = graph.call_function(PACKED_LINEAR, (u.args[0], *attrs, p["bits"], bias))
            u.replace_all_uses_with(new)
            graph.erase_node(u)
        graph.erase_node(n)
        kernels[layer] = {"format": fmt.tag, "bits": p["bits"], "group_size": p["group_size"],
                          "shape": list(shape)}
    graph.eliminate_dead_code()
    for n in graph.nodes:
        if n.op == "get_attr" and n.target not in names.values():
            t = _attr(gm, n.target)
            key = names.get(n.target) or param(n.target, t)
            n.target = key
    out = GraphModule(root, graph)
    out.graph.lint()
    return out, kernels


def _fix_bool_cumsum(ep) -> None:
    """The Relax frontend converts cumsum of a bool tensor as a bool cumsum (LLVM then crashes):
    make the int64 result explicit."""
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.cumsum.default:
            val = n.args[0].meta.get("val") if hasattr(n.args[0], "meta") else None
            if val is not None and val.dtype == torch.bool and n.kwargs.get("dtype") is None:
                n.kwargs = {**n.kwargs, "dtype": torch.int64}
    ep.graph_module.recompile()


def _convert_packed_linear(cache: dict, prefix: str, lanes: int):
    from tvm import relax, tirx

    def convert(node, importer):
        bb = importer.block_builder
        args = importer.retrieve_args(node)
        x, w, sc, zs, bits = args[:5]
        bias = args[5] if len(args) > 5 else None
        shape = list(x.ty.shape)
        k, n = int(shape[-1]), int(w.ty.shape[1])
        gs = k // int(sc.ty.shape[0])
        rows = shape[0]
        for d in shape[1:-1]:
            rows = rows * d
        one = isinstance(rows, tirx.IntImm) and int(rows) == 1
        key = f"{prefix}int{bits}_{'gemv' if one else 'gemm'}_k{k}_n{n}_g{gs}"
        if key not in cache:
            func = linear_func(1 if one else None, k, n, gs, int(bits), lanes=lanes).with_attrs(
                {"op_pattern": 8, "global_symbol": key})  # opaque: elementwise ops are not fused into it
            cache[key] = bb.add_func(func, key)
        x2 = bb.emit(relax.op.reshape(x, [rows, k]))
        y = bb.emit(relax.call_tir(cache[key], [x2, w, sc, zs], relax.TensorType([rows, n], "float32")))
        y = bb.emit(relax.op.reshape(y, [*shape[:-1], n]))
        return bb.emit(relax.op.add(y, bias)) if bias is not None else y

    return convert


def _convert_diff(node, importer):
    """``aten.diff(x, 1, dim, prepend)`` (transformers' packed-sequence check on position ids).
    The decomposed form slices a concatenation, whose symbolic length (``min(1, s) + s - 1``)
    Relax cannot prove equal to ``s``, so the result loses its shape and cumsum refuses it; here
    the slices are cast to the known length."""
    from tvm import relax

    bb = importer.block_builder
    args = importer.retrieve_args(node)
    x, n = args[0], args[1] if len(args) > 1 else 1
    dim = args[2] if len(args) > 2 else -1
    prepend = args[3] if len(args) > 3 else None
    append = args[4] if len(args) > 4 else None
    if n != 1 or append is not None:
        raise TvmError(f"node {node.name}: diff with n={n}, append={append is not None} is not supported")
    shape = list(x.ty.shape)
    dim = dim % len(shape)
    parts = [prepend, x] if prepend is not None else [x]
    cat = bb.emit(relax.op.concat(parts, axis=dim)) if len(parts) > 1 else x
    length = shape[dim] + (prepend.ty.shape[dim] if prepend is not None else 0) - 1
    out_shape = [*shape[:dim], length, *shape[dim + 1:]]
    ty = relax.TensorType(out_shape, x.ty.dtype)
    hi = bb.match_cast(bb.emit(relax.op.strided_slice(cat, [dim], [1], [length + 1])), ty)
    lo = bb.match_cast(bb.emit(relax.op.strided_slice(cat, [dim], [0], [length])), ty)
    return bb.emit(relax.op.subtract(hi, lo))


def _convert_linear(prefix: str, lanes: int):
    """A float ``aten.linear`` as one ``dense`` (``x[M, K] . W[N, K]^T``) on the weight as stored:
    Relax's own linear legalizes to a transpose of the weight at every call (the 113 MB tied
    embedding of SmolLM2 per token) followed by a matmul."""

    cache: dict = {}

    def convert(node, importer):
        return _dense(node, importer, prefix, lanes, cache)

    return convert


def _dense(node, importer, prefix: str, lanes: int, cache: dict):
    from tvm import relax, tirx, topi

    from finegrain.backends.tvm.kernels.dense import gemv_func

    bb = importer.block_builder
    args = importer.retrieve_args(node)
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    shape = list(x.ty.shape)
    rows = shape[0]
    for d in shape[1:-1]:
        rows = rows * d
    n = w.ty.shape[0]
    k = shape[-1]
    x2 = bb.emit(relax.op.reshape(x, [rows, k]))
    if isinstance(rows, tirx.IntImm) and int(rows) == 1 and int(k) % lanes == 0 and x.ty.dtype == "float32":
        key = f"{prefix}dense_gemv_k{int(k)}_n{int(n)}"
        if key not in cache:
            func = gemv_func(int(k), int(n), lanes).with_attrs({"op_pattern": 8, "global_symbol": key})
            cache[key] = bb.add_func(func, key)
        y = bb.emit(relax.call_tir(cache[key], [x2, w], relax.TensorType([1, n], "float32")))
    else:
        y = bb.emit_te(topi.nn.dense, x2, w, primfunc_name_hint=f"{prefix}dense")
    y = bb.emit(relax.op.reshape(y, [*shape[:-1], n]))
    return bb.emit(relax.op.add(y, bias)) if bias is not None else y


def _import(gm: GraphModule, example: tuple, dynamic_shapes, prefix: str, lanes: int):
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.export(gm, example, dynamic_shapes=dynamic_shapes, strict=False)
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.diff.default, None)
    table.pop(torch.ops.aten.linear.default, None)
    ep = ep.run_decompositions(table)
    _fix_bool_cumsum(ep)
    mod = from_exported_program(ep, keep_params_as_input=True, run_ep_decomposition=False,
                                unwrap_unit_return_tuple=True,
                                custom_convert_map={"packed_linear.default": _convert_packed_linear({}, prefix, lanes),
                                                    "diff.default": _convert_diff,
                                                    "linear.default": _convert_linear(prefix, lanes)})
    return mod, [spec.target for spec in ep.graph_signature.input_specs if spec.kind.name == "PARAMETER"]


def import_relax(gm: GraphModule, input_specs: list[dict], max_seq_len: int = 2048, target: dict | None = None):
    """``(IRModule with "prefill" and "decode", parameters (name, tensor) in call order, kernels per
    layer)``. ``max_seq_len`` bounds prefill's sequence length: TVM plans memory statically for it;
    ``target`` sets the kernels' vector width."""
    import tvm

    lanes = vector_lanes(target)

    if len(input_specs) != 1 or input_specs[0]["dynamic_dims"] != [1]:
        raise TvmError(f"the TVM build takes one input whose dim 1 (sequence) is dynamic, got {input_specs}")
    pgm, kernels = prepare(gm)
    spec = input_specs[0]
    seq = torch.export.Dim("seq", min=2, max=max_seq_len)
    prefill, names = _import(pgm, example_inputs(input_specs), ({1: seq},), "", lanes)
    one = torch.ones([1 if i == 1 else d for i, d in enumerate(spec["shape"])], dtype=getattr(torch, spec["dtype"]))
    decode, names_d = _import(pgm, (one,), None, "decode_", lanes)
    if names != names_d:
        raise TvmError("prefill and decode exports list different parameters")
    funcs = {}
    for name, part in (("prefill", prefill), ("decode", decode)):
        for gv, f in part.functions_items():
            if gv.name_hint == "main":
                gv, f = tvm.ir.GlobalVar(name), f.with_attr("global_symbol", name)
            funcs[gv] = f
    mod = tvm.IRModule(funcs)
    params = dict(pgm.named_parameters())
    return mod, [(name, params[name]) for name in names], kernels
