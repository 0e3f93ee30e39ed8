"""Materialize quantization in the graph (the "materialize" step of PT2E's annotate/materialize).

* Weights: each quantized weight becomes bit-packed codes (``formats/packing.py``), scales as the
  format stores them (``formats/scales.py``), packed per-group metadata (zero points, BitMoD
  datatype ids) and, where the format has them, a second-level scale and a codebook, read by one
  ``finegrain::dequantize_packed`` node that replaces the float weight as the op's argument.
  A grouped (MoE) op's ``[E, N, K]`` weight becomes one such node per expert (``<fqn>_e<e>_q*``
  constants, each expert in its own format), stacked.
  A convolution's weight is dequantized as its matrix (``ir.conv_matrix``) and reshaped / permuted
  back to ``[O, I/groups, *kernel]`` by plain ATen ops.
  A float weight with no remaining user is removed from the module.
* Activations: ``finegrain::quantize`` -> ``finegrain::dequantize`` in front of the op. Dynamic
  formats choose scales at run time; static ones read calibrated constants (range from
  ``recipe.act_range``: absmax or a percentile of |x|). Consumers of one tensor with one format
  (q/k/v) share one Q/DQ pair.

Requires: ``meta[QWEIGHT]`` from quantize_weights; ``meta[ACT_FORMAT]``; stats for static
activations. Ensures: no quantizable op reads a quantized float weight; running it again adds
nothing (ops whose weight is already dequantize_packed, or whose input is already a dequantize,
are skipped).
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import (ACT_FORMAT, ACT_OUTLIERS, QWEIGHT, WEIGHT_FORMAT, QUANTIZABLE, drop_unused_constants,
                                  expert_formats, get_tensor, quantizable_ops, set_tensor)
from finegrain.errors import InputError
from finegrain.formats import QuantFormat, pack
from finegrain.formats import scales
from finegrain.formats.ops import DEQUANTIZE, DEQUANTIZE_PACKED, QUANTIZE


def _is_tensor(gm: GraphModule, path: str) -> bool:
    try:
        return isinstance(get_tensor(gm, path), torch.Tensor)
    except AttributeError:
        return False


def _constant(gm: GraphModule, graph, name: str, value: torch.Tensor) -> Node:
    set_tensor(gm, name, value.contiguous())
    return graph.get_attr(name)


def _dequantize_node(gm: GraphModule, op, fmt: QuantFormat, q, base: str) -> Node:
    g = gm.graph
    with g.inserting_before(op.node):
        packed = _constant(gm, g, f"{base}packed", pack(q.codes, fmt.bits, fmt.signed))
        scale = _constant(gm, g, f"{base}scale", scales.stored_scale(fmt, q))
        meta_bits = fmt.family.metadata_bits(fmt)
        zero_t = pack(q.zero.to(torch.uint8), meta_bits, False) if meta_bits else torch.empty(0, dtype=torch.uint8)
        zero = _constant(gm, g, f"{base}zero", zero_t)
        args = [packed, scale, zero, fmt.tag, list(q.codes.shape), op.node.meta.get("val", torch.empty(0)).dtype]
        if q.scale2 is not None or q.codebook is not None:
            args.append(None if q.scale2 is None else _constant(gm, g, f"{base}scale2", scales.stored_scale2(fmt, q)))
            args.append(None if q.codebook is None else _constant(gm, g, f"{base}codebook", q.codebook.to(torch.float16)))
        return g.call_function(DEQUANTIZE_PACKED, tuple(args))


def _weight_qdq(gm: GraphModule, op) -> None:
    q = op.node.meta.pop(QWEIGHT)
    if op.kind == "grouped":  # one packed weight per expert (each may have its own format), stacked
        parts = [_dequantize_node(gm, op, f, qe, f"{op.weight_fqn}_e{e}_q")
                 for e, (f, qe) in enumerate(zip(expert_formats(op), q))]
        with gm.graph.inserting_before(op.node):
            dq = gm.graph.call_function(torch.ops.aten.stack.default, (parts, 0))
    else:
        base = f"{op.weight_fqn}_q" if op.weight_fqn else f"{op.node.name}_weight_q"
        fmt = op.node.meta[WEIGHT_FORMAT]
        dq = _dequantize_node(gm, op, fmt, q, base)
        if op.kind == "conv":  # the matrix back to [O, I/groups, *kernel] (inverse of ir.conv_matrix)
            dq = _conv_layout(gm.graph, op, dq, list(get_tensor(gm, op.weight.target).shape), fmt)
    _, w_idx, _ = QUANTIZABLE[op.node.target]
    args = list(op.node.args)
    args[w_idx] = dq
    op.node.args = tuple(args)


def _conv_layout(g, op, dq: Node, shape: list[int], fmt: QuantFormat) -> Node:
    aten = torch.ops.aten
    with g.inserting_before(op.node):
        if fmt.granularity != "group":
            return g.call_function(aten.reshape.default, (dq, shape))
        spatial = shape[2:]
        t = g.call_function(aten.reshape.default, (dq, [shape[0], *spatial, shape[1]]))
        return g.call_function(aten.permute.default, (t, [0, len(shape) - 1, *range(1, len(shape) - 1)]))


def _act_params(ctx: PassContext, node: Node, fmt: QuantFormat, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    if node.name not in ctx.stats:
        raise InputError(f"{layer}: static activation format {fmt.tag} needs calibration statistics for its input "
                         f"{node.name!r}; pass calibration data")
    st = ctx.stats[node.name]
    rng = ctx.recipe.act_range
    if fmt.granularity != "tensor":
        raise InputError(f"{layer}: static activation formats must be per-tensor, got {fmt.granularity}")
    if fmt.symmetric:
        hi = float(st.absmax.max()) if rng == "absmax" else st.percentile(float(rng[1:]))
        lo = -hi
    else:
        lo, hi = float(st.min.min()), float(st.max.max())
    x = torch.tensor([[lo, hi]], dtype=torch.float32)
    q = fmt.quantize(x)  # the format's own parameter choice on the calibrated range
    return q.scale.reshape(1), q.zero.reshape(1)


def _act_dq(gm: GraphModule, ctx: PassContext, op, fmt: QuantFormat, shared: dict) -> Node:
    """The dequantized ``fmt`` copy of ``op``'s input (made once per input and format, before its
    first consumer: later consumers of the same tensor come after it)."""
    x = op.activation
    key = (x, fmt, None)
    if key not in shared:
        g = gm.graph
        with g.inserting_before(op.node):
            args = (x, fmt.tag)
            if not fmt.dynamic:
                s, z = _act_params(ctx, x, fmt, op.name)
                # under the op's module path; a model without modules (an imported ONNX graph names ops by
                # their weight tensor) gets them beside that tensor instead
                base = f"{op.name}_" if _is_tensor(gm, op.name) else f"{op.name}."
                args += (_constant(gm, g, f"{base}input_scale", s), _constant(gm, g, f"{base}input_zero", z))
            qn = g.call_function(QUANTIZE, args)
            parts = tuple(g.call_function(operator.getitem, (qn, i)) for i in range(3))
            dtype = x.meta.get("val", torch.empty(0)).dtype
            shared[key] = g.call_function(DEQUANTIZE, (*parts, fmt.tag, dtype))
    return shared[key]


def _act_qdq(gm: GraphModule, ctx: PassContext, op, fmt: QuantFormat, shared: dict) -> None:
    x = op.activation
    outliers = op.node.meta.get(ACT_OUTLIERS)
    if outliers is None:
        op.node.replace_input_with(x, _act_dq(gm, ctx, op, fmt, shared))
        return
    key = (x, fmt, outliers[0])
    if key not in shared:  # FMPQ: both quantizations, the outlier groups' columns from the high-precision one
        lo, hi = _act_dq(gm, ctx, op, fmt, shared), _act_dq(gm, ctx, op, outliers[0], shared)
        g = gm.graph
        with g.inserting_before(op.node):
            base = f"{op.name}_" if _is_tensor(gm, op.name) else f"{op.name}."
            mask = _constant(gm, g, f"{base}input_outlier_mask", outliers[1])
            shared[key] = g.call_function(torch.ops.aten.where.self, (mask, hi, lo))
    op.node.replace_input_with(x, shared[key])


def insert_qdq(gm: GraphModule, ctx: PassContext) -> GraphModule:
    shared: dict = {}
    for op in quantizable_ops(gm):
        if op.node.meta.get(WEIGHT_FORMAT) is not None and QWEIGHT in op.node.meta:
            _weight_qdq(gm, op)
        a_fmt = op.node.meta.get(ACT_FORMAT)
        already = op.activation.op == "call_function" and (op.activation.target == DEQUANTIZE or (
            op.activation.target == torch.ops.aten.where.self and ACT_OUTLIERS in op.node.meta))
        if a_fmt is not None and not already:
            _act_qdq(gm, ctx, op, a_fmt, shared)
    drop_unused_constants(gm)  # float weights nobody reads any more
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
