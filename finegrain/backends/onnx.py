"""ONNX export of a quantized graph and the ONNX Runtime backend.

Export (:func:`export_onnx`, ``CompiledModel.export_onnx``, ``finegrain export --onnx``) runs in
two steps:

1. ``torch.onnx.export(..., dynamo=True)`` of the quantized FX graph (opset 21, the inputs'
   dynamic dims dynamic) with a ``custom_translation_table`` for finegrain's ops:
   ``finegrain::quantize`` / ``dequantize`` (activations) become ONNX arithmetic that reproduces
   the reference quantizer (dynamic scales from ReduceMax/ReduceMin, Round = half to even like
   ``torch.round``, Clip; FP8 by a saturating ``Cast``, FP4 / FP6 rounded on their grid in fp32;
   groups along K over the row padded with ``Pad`` mode edge, E8M0 / two-level E4M3 block scales);
   ``kv_append`` (KIVI's windowed KV writes: per-channel key groups, a
   float window, sinks, pre-RoPE / rotated keys) becomes the same write in ONNX arithmetic over
   the run-time lengths (an fp32 cache holding the format's values; RotateKV's grouped-head keys
   too; ZipCache is refused); ``dequantize_packed`` (weights) and ``hadamard`` become *marker* nodes
   of the ``finegrain`` domain, because their lowering needs the constants' values. Before the
   export, layers whose keys and values are static INT8 per tensor are rewritten to one
   ``kv_int8_attention`` (``onnx_gqa.py``), exported as a marker lowered to
   ``com.microsoft::GroupQueryAttention`` over an INT8 past / present.
2. A lowering pass over the ONNX IR (``onnx_ir``), with every weight's codes and scales in hand
   (unpacked by the same :func:`finegrain.formats.ops.unpack_weight` the reference uses), picks
   per weight the node its ``style`` asks for:

   * ``style="qdq"`` (portable): ``DequantizeLinear`` of opset 21 on the transposed weight
     ``[K, N]`` feeding the ``MatMul`` directly: blocked along K for group-wise INT4/UINT4 and
     INT8/UINT8 (zero points for asymmetric formats), per output channel (axis 1) or per tensor;
     FP8 E4M3 per channel. ONNX Runtime fuses the INT4 blocked form into ``MatMulNBits``, at the
     accuracy level of the session option ``session.qdq_matmulnbits_accuracy_level``
     (:class:`OnnxSession` sets it from ``accuracy_level``; ORT's own default would be 4).
   * ``style="matmulnbits"``: ``com.microsoft::MatMulNBits`` (``bits`` 4 or 8) for integer
     weights whose groups fit its blocks (group size a power of two >= 16; per channel / per
     tensor as one block of the next power of two >= K, padded), with explicit ``accuracy_level``:
     0 = unset (the activation's type: fp32 compute here, matches the reference to fp32 rounding),
     1 fp32, 2 fp16, 3 bf16, 4 = activations quantized to int8 per block on the fly (faster on
     CPUs, with an int8 activation error on top of the weight format's). Weights it cannot take
     fall back to the ``qdq`` form.

   Scales are written as the effective fp32 values (E8M0 exponents, NV two-level E4M3 x fp32 and
   DGQ's integer x fp16 scales are exact in fp32), so MXINT8, NVINT4 and DGQ weights export
   exactly but with 32-bit scales; 2/3-bit codes ride in 4-bit and 5..7-bit codes in 8-bit
   containers (exact, not smaller). Minifloat weights ``DequantizeLinear`` does not take (MX / NV
   FP4, FP6, FP8 in groups, E5M2) are decoded by a ``Gather`` from the element's value table times
   the gathered group scales (:func:`_lut_weight`; codes of up to 4 bits two per byte), in either
   style, and so are codebook weights (NF4, Lloyd-Max, BitMoD's per-group datatypes). A weight none
   of these covers (2-D blocks) raises :class:`ExportError` naming the layer and format. ``hadamard`` becomes
   a ``MatMul`` by the dense orthonormal matrix (one ``[n, n]`` initializer per size, computed by
   the reference transform on the identity). A MoE ``grouped_linear`` (``[E, N, K]``) is exported with
   its experts apart (``onnx_experts``, a ``GroupedLinear`` marker) and unrolled over the E experts:
   each expert's rows, a ``Slice`` by the run-time offsets (rows come sorted by expert), times its
   own ``[N, K]`` weight, lowered like a linear's, then one ``Concat``.

Weights larger than 2 GB in total go to one external data file beside the model
(``<name>.onnx.data``); ``onnx.checker`` runs on every export. Writes are atomic (a temporary
directory renamed into place).

Runtime: :class:`OnnxSession` (``finegrain.load(path).session(backend="onnx")``) exports to a
temporary directory and runs the model in ``onnxruntime`` on the CPU.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finegrain.backends.base import BackendBase, Session, windowed_kv_refusals
from finegrain.errors import ExportError
from finegrain.formats import QuantFormat
from finegrain.compiler.ops import HADAMARD, KV_APPEND, WEIGHT
from finegrain.formats.ops import DEQUANTIZE, DEQUANTIZE_PACKED, QUANTIZE, unpack_weight
from finegrain.io.signature import check_inputs, example_inputs, export_dynamic_shapes

STYLES = ("qdq", "matmulnbits")
OPSET = 21
DOMAIN = "finegrain"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
_EXTERNAL_ABOVE = 2_000_000_000  # bytes of initializers beyond which they go to an external file


# ---- step 1: translation ---------------------------------------------------------------------
_OPS: dict[str, Any] = {}


@torch.library.custom_op("finegrain::onnx_experts", mutates_args=())
def _onnx_experts(x: torch.Tensor, offsets: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """``grouped_linear(x, stack(weights), offsets)`` with the experts' weights apart, so each is
    exported as its own [N, K] weight (quantized: its own DequantizePacked marker)."""
    from finegrain.compiler.ops import _grouped

    return _grouped(x, torch.stack(weights), offsets)


@_onnx_experts.register_fake
def _(x, offsets, weights):
    return x.new_empty(x.shape[0], weights[0].shape[0])


ONNX_EXPERTS = torch.ops.finegrain.onnx_experts.default


def _split_experts(gm):
    """A copy of ``gm`` (sharing its tensors) with each ``grouped_linear(x, W, offsets)`` as
    ``onnx_experts(x, offsets, [W_0, ..., W_E-1])``: the stacked per-expert dequantizations taken
    apart, a float ``[E, N, K]`` weight selected per expert. ``gm`` itself when it has none."""
    import copy

    from finegrain.compiler.ops import GROUPED_LINEAR

    if not any(n.op == "call_function" and n.target is GROUPED_LINEAR for n in gm.graph.nodes):
        return gm
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    g = gm.graph
    for node in [n for n in g.nodes if n.op == "call_function" and n.target is GROUPED_LINEAR]:
        x, w, offsets = node.args[:3]
        with g.inserting_before(node):
            if w.op == "call_function" and w.target is torch.ops.aten.stack.default and w.args[1:] in ((), (0,)):
                parts = list(w.args[0])
            else:
                parts = [g.call_function(torch.ops.aten.select.int, (w, 0, e)) for e in range(w.meta["val"].shape[0])]
                for e, p in enumerate(parts):
                    p.meta["val"] = w.meta["val"][e]
            new = g.call_function(ONNX_EXPERTS, (x, offsets, parts))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
    g.eliminate_dead_code()
    gm.recompile()
    return gm


def _experts(graph, node) -> None:
    """Lower a ``GroupedLinear(x, offsets, W_0..W_E-1)`` marker: the rows of expert e (``x[offsets[e-1]:
    offsets[e]]``, rows sorted by expert) times ``W_e^T`` (a Transpose -> MatMul, so a quantized
    ``W_e`` is then lowered like any linear's weight), concatenated in order. Unrolled over E."""
    import onnx_ir as ir

    # the weights are the last E inputs (onnxscript may repeat the leading ones before a variadic input)
    x, offsets, ws = node.inputs[0], node.inputs[1], list(node.inputs)[-node.attributes["experts"].value:]

    def const(name: str, v) -> Any:
        val = ir.Value(name=f"{node.name}.{name}", const_value=ir.tensor(np.asarray(v, dtype=np.int64)))
        graph.register_initializer(val)
        return val

    new = [ir.node("Cast", [offsets], {"to": ir.DataType.INT64})]
    ends = new[-1].outputs[0]
    new.append(ir.node("Slice", [ends, const("s0", [0]), const("s1", [len(ws) - 1])]))
    new.append(ir.node("Concat", [const("zero", [0]), new[-1].outputs[0]], {"axis": 0}))
    starts, axis0, outs = new[-1].outputs[0], const("axis0", [0]), []
    for e, w in enumerate(ws):
        a, b = const(f"e{e}", [e]), const(f"e{e}_end", [e + 1])
        lo, hi = ir.node("Slice", [starts, a, b]), ir.node("Slice", [ends, a, b])
        rows = ir.node("Slice", [x, lo.outputs[0], hi.outputs[0], axis0])
        tr = ir.node("Transpose", [w], {"perm": [1, 0]})
        mm = ir.node("MatMul", [rows.outputs[0], tr.outputs[0]])
        new += [lo, hi, rows, tr, mm]
        outs.append(mm.outputs[0])
    new.append(ir.node("Concat", outs, {"axis": 0}))
    for n in new:
        graph.insert_before(node, n)
    _replace(graph, node, new[-1])


def _marker_ops() -> dict[str, Any]:
    """onnxscript ops for the finegrain-domain markers (their schemas registered once)."""
    if _OPS:
        return _OPS
    import onnx
    import onnxscript
    from onnx.defs import OpSchema

    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schemas = {
        "DequantizePacked": OpSchema(
            "DequantizePacked", DOMAIN, 1,
            inputs=[fp("packed", "T1"), fp("scale", "T2"), fp("zero", "T1"), fp("scale2", "T3", param_option=opt),
                    fp("codebook", "T4", param_option=opt)],
            outputs=[fp("y", "T")],
            type_constraints=[("T1", ["tensor(uint8)"], ""),
                              ("T2", floats + ["tensor(uint8)", "tensor(float8e4m3fn)"], ""),
                              ("T3", ["tensor(float)"], ""), ("T4", ["tensor(float16)"], ""), ("T", floats, "")],
            attributes=[OpSchema.Attribute("fmt", OpSchema.AttrType.STRING, ""),
                        OpSchema.Attribute("shape", OpSchema.AttrType.INTS, "")]),
        "GroupedLinear": OpSchema(  # a MoE grouped GEMM, one weight [N, K] per expert (lowered in _experts)
            "GroupedLinear", DOMAIN, 1,
            inputs=[fp("x", "T"), fp("offsets", "I"),
                    fp("weights", "T", param_option=OpSchema.FormalParameterOption.Variadic)],
            outputs=[fp("y", "T")],
            type_constraints=[("T", floats, ""), ("I", ["tensor(int64)", "tensor(int32)", "tensor(float)"], "")],
            attributes=[OpSchema.Attribute("experts", OpSchema.AttrType.INT, "")]),
        "Hadamard": OpSchema(
            "Hadamard", DOMAIN, 1, inputs=[fp("x", "T"), fp("factor", "T3")], outputs=[fp("y", "T")],
            type_constraints=[("T", floats, ""), ("T3", ["tensor(float)", "tensor(double)"], "")]),
        "KvInt8Attention": OpSchema(  # lowered to com.microsoft::GroupQueryAttention (backends/onnx_gqa.py)
            "KvInt8Attention", DOMAIN, 1,
            inputs=[fp("query", "T"), fp("key", "T"), fp("value", "T"), fp("past_key", "C"), fp("past_value", "C"),
                    fp("seqlens_k", "M"), fp("total_sequence_length", "M"), fp("k_scale", "T"), fp("v_scale", "T")],
            outputs=[fp("output", "T"), fp("present_key", "C"), fp("present_value", "C")],
            type_constraints=[("T", ["tensor(float)"], ""), ("C", ["tensor(int8)"], ""), ("M", ["tensor(int32)"], "")],
            attributes=[OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")]),
    }
    opset = onnxscript.values.Opset(DOMAIN, 1)
    for name, schema in schemas.items():
        try:
            onnx.defs.get_schema(name, 1, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)
        _OPS[name] = onnxscript.values.Op(opset, name, schema)
    return _OPS


def _act_format(fmt: str) -> QuantFormat:
    from finegrain.formats.minifloat import MINIFLOATS

    f = QuantFormat.parse(fmt)
    kinds = ("int", *MINIFLOATS)
    grouped = f.granularity == "group" and f.kind in kinds and f.dynamic and not f.block_rows
    blocks = (f.kind in kinds and f.dynamic and f.symmetric and f.scale in ("e8m0", "e4m3")
              and f.granularity in ("group", "token"))
    if (f.kind not in kinds or not (f.granularity in ("token", "tensor") or grouped)
            or not (f.scale in ("fp32", "fp16", "bf16") or blocks)):
        raise ExportError(f"activation format {fmt}: the ONNX export covers integer and minifloat activations per "
                          "token or per tensor with float scales, and dynamic ones in groups along the row with "
                          "float, E8M0 (MX) or two-level E4M3 (NV) scales")
    return f


def _minifloat_round(op, v, f: QuantFormat):
    """``v`` (fp32, divided by its scale) on the minifloat grid of ``f`` as the reference's cast rounds
    it (``formats/minifloat.py``), in fp32: saturated at the largest finite value, then ``Round`` (half
    to even) on the step ``2^(max(floor(log2 |v|), emin) - mantissa bits)``; the floor of ``Log / ln 2``
    corrected by one either way against exact powers of two, as :func:`_block_scale`'s."""
    import math

    import onnx

    fl = onnx.TensorProto.FLOAT

    def const(x: float):
        return op.Constant(value_float=float(x))

    m = f.family.max_value(f)
    c = op.Clip(v, const(-m), const(m))
    a = op.Abs(c)
    two = const(2.0)
    e = op.Floor(op.Div(op.Log(a), const(math.log(2.0))))
    e = op.Add(e, op.Cast(op.LessOrEqual(op.Pow(two, op.Add(e, const(1.0))), a), to=fl))
    e = op.Sub(e, op.Cast(op.Greater(op.Pow(two, e), a), to=fl))
    step = op.Pow(two, op.Sub(op.Max(e, const(f.family.emin)), const(f.family.mantissa)))
    return op.Mul(op.Round(op.Div(c, step)), step)


def _translation_table() -> dict:
    import onnx
    from onnxscript import opset21 as op

    ops = _marker_ops()
    fl = onnx.TensorProto.FLOAT
    scale_types = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}

    def const(v: float):
        return op.Constant(value_float=float(v))

    def quantize(x, fmt: str, scale=None, zero=None):
        f = _act_format(fmt)
        lo, hi = f.family.code_range(f)
        xf = op.Cast(x, to=fl)
        if f.granularity == "group" and scale is not None:
            raise ExportError(f"activation format {fmt}: static scales in groups are not exported")
        if f.granularity == "group":  # scales per group of the padded row, expanded back over it
            return _grouped_quantize(op, xf, f, lambda g, tok: quantize(g, tok.tag))
        if scale is None:  # dynamic: the format's own parameter choice, at run time
            axes = op.Constant(value_ints=[-1]) if f.granularity == "token" else None
            keep = 1 if f.granularity == "token" else 0
            c = float(f.clip)
            if f.scale in ("e8m0", "e4m3"):  # MXINT / NVINT block scales (groups: per token of the group view)
                s = _block_scale(op, op.ReduceMax(op.Abs(xf), axes, keepdims=keep), f)
            elif f.symmetric:  # INT symmetric and FP8 alike: amax * clip / largest code value
                s = op.Mul(op.ReduceMax(op.Abs(xf), axes, keepdims=keep), const(c / f.family.max_value(f)))
            else:
                mn = op.Mul(op.Min(op.ReduceMin(xf, axes, keepdims=keep), const(0.0)), const(c))
                mx = op.Mul(op.Max(op.ReduceMax(xf, axes, keepdims=keep), const(0.0)), const(c))
                s = op.Div(op.Sub(mx, mn), const(2 ** f.bits - 1))
            if f.scale in scale_types:
                s = op.Cast(op.Cast(s, to=scale_types[f.scale]), to=fl)
            s = op.Where(op.Greater(s, const(0.0)), s, const(1.0))
            if f.granularity == "tensor":
                s = op.Reshape(s, op.Constant(value_ints=[1]))
            if f.symmetric:
                z = op.Mul(s, const(0.0))
            else:
                if f.granularity == "tensor":
                    mn = op.Reshape(mn, op.Constant(value_ints=[1]))
                z = op.Clip(op.Round(op.Div(op.Neg(mn), s)), const(0.0), const(2 ** f.bits - 1))
        else:
            s, z = op.Cast(scale, to=fl), op.Cast(zero, to=fl)
        if f.kind in ("e4m3", "e5m2"):  # FP8: saturating round-to-nearest-even cast (as ml_dtypes / torch do)
            to8 = onnx.TensorProto.FLOAT8E4M3FN if f.kind == "e4m3" else onnx.TensorProto.FLOAT8E5M2
            return op.Cast(op.Div(xf, s), to=to8, saturate=1), s, op.Cast(z, to=onnx.TensorProto.INT32)
        if f.kind != "int":  # FP4 / FP6 (no ONNX Runtime type): the element's value on its grid, in fp32
            return _minifloat_round(op, op.Div(xf, s), f), s, op.Cast(z, to=onnx.TensorProto.INT32)
        q = op.Clip(op.Add(op.Round(op.Div(xf, s)), z), const(lo), const(hi))
        codes = op.Cast(q, to=onnx.TensorProto.INT8 if f.symmetric else onnx.TensorProto.UINT8)
        return codes, s, op.Cast(z, to=onnx.TensorProto.INT32)

    def dequantize(codes, scale, zero, fmt: str, out_dtype):
        f = _act_format(fmt)
        if f.granularity == "group":
            scale, zero = _group_params(op, scale, codes, f), _group_params(op, zero, codes, f)
        y = op.Mul(op.Sub(op.Cast(codes, to=fl), op.Cast(zero, to=fl)), scale)
        to = _onnx_dtype(out_dtype)
        return y if to == fl else op.Cast(y, to=to)

    def dequantize_packed(packed, scale, zero, fmt: str, shape, out_dtype, scale2=None, codebook=None):
        y = ops["DequantizePacked"](packed, scale, zero, scale2, codebook, fmt=fmt, shape=list(shape))
        to = _onnx_dtype(out_dtype)
        return y if to == fl else op.Cast(y, to=to)

    def hadamard(x, factor):
        return ops["Hadamard"](x, factor)

    def weight(w):  # the recurrent-weight marker is the identity
        return op.Identity(w)

    def experts(x, offsets, weights):
        return ops["GroupedLinear"](x, offsets, *weights, experts=len(weights))

    from finegrain.backends import onnx_gqa

    return {QUANTIZE: quantize, DEQUANTIZE: dequantize, DEQUANTIZE_PACKED: dequantize_packed, HADAMARD: hadamard,
            WEIGHT: weight, KV_APPEND: _kv_append_translation(op), ONNX_EXPERTS: experts,
            onnx_gqa.KV_INT8_ATTENTION: onnx_gqa.translation(op)}


def _block_scale(op, amax, f: QuantFormat):
    """The scales of symmetric INT groups with block scale types, as ``formats/scales.choose``:
    ``e8m0``: ``2^(floor(log2(amax * clip)) - emax)`` (the floor of ``Log / ln 2`` corrected by one
    either way against exact powers of two; 1 for an all-zero group); ``e4m3``: ``round_e4m3(s_g / t) * t``
    with ``s_g = amax * clip / max_value``, ``t = max_g(s_g) / 448`` over the tensor (the E4M3 rounding is
    a saturating ``Cast`` to ``FLOAT8E4M3FN`` and back). The all-zero fix-up to 1 follows in the caller."""
    import math

    import onnx

    fl = onnx.TensorProto.FLOAT

    def const(v: float):
        return op.Constant(value_float=float(v))

    a = op.Mul(amax, const(f.clip))
    if f.scale == "e8m0":
        two = const(2.0)
        e = op.Floor(op.Div(op.Log(a), const(math.log(2.0))))
        e = op.Add(e, op.Cast(op.LessOrEqual(op.Pow(two, op.Add(e, const(1.0))), a), to=fl))
        e = op.Sub(e, op.Cast(op.Greater(op.Pow(two, e), a), to=fl))
        emax = math.floor(math.log2(f.family.max_value(f)))
        s = op.Pow(two, op.Clip(op.Sub(e, const(emax)), const(-127.0), const(127.0)))
        return op.Where(op.Greater(a, const(0.0)), s, const(1.0))
    raw = op.Div(a, const(f.family.max_value(f)))
    t = op.Div(op.ReduceMax(raw, keepdims=0), const(448.0))
    t = op.Where(op.Greater(t, const(0.0)), t, const(1.0))
    v = op.Clip(op.Div(raw, t), const(2.0 ** -9), const(448.0))
    return op.Mul(op.Cast(op.Cast(v, to=onnx.TensorProto.FLOAT8E4M3FN, saturate=1), to=fl), t)


def _grouped_quantize(op, xf, f: QuantFormat, per_token):
    """``quantize`` of ``xf[..., K]`` (fp32) in a format with groups of ``G`` along the row: the row
    padded to whole groups by repeating its last element (``Pad`` mode ``edge``: as
    ``QuantFormat._grouped``, no group's range changes), viewed as ``[..., ceil(K / G), G]`` and
    quantized per token there (``per_token(view, token format)``). Returns the codes ``[..., K]``
    and the scales / zero points ``[..., ceil(K / G)]``, the shapes the reference's ``quantize``
    gives (:func:`_group_params` expands them back for ``dequantize``)."""
    import onnx

    tok = f.per_row()
    g = f.group_size
    k = op.Shape(xf, start=-1)
    ng = op.Div(op.Add(k, op.Constant(value_ints=[g - 1])), op.Constant(value_ints=[g]))
    pad = op.Sub(op.Mul(ng, op.Constant(value_ints=[g])), k)
    padded = op.Pad(xf, op.Concat(op.Constant(value_ints=[0]), pad, axis=0), None,
                    op.Constant(value_ints=[-1]), mode="edge")
    rows = op.Shape(xf, end=-1)
    view = op.Reshape(padded, op.Concat(rows, ng, op.Constant(value_ints=[g]), axis=0))
    codes, s, z = per_token(view, tok)
    if f.kind in ("e4m3", "e5m2"):  # FP8 codes as their fp32 values (ONNX Runtime's Slice takes no float8)
        codes = op.Cast(codes, to=onnx.TensorProto.FLOAT)
    codes = op.Reshape(codes, op.Concat(rows, op.Constant(value_ints=[-1]), axis=0))
    codes = op.Slice(codes, op.Constant(value_ints=[0]), k, op.Constant(value_ints=[-1]))
    return codes, op.Reshape(s, op.Concat(rows, ng, axis=0)), op.Reshape(z, op.Concat(rows, ng, axis=0))


def _group_params(op, t, codes, f: QuantFormat):
    """Group scales / zero points ``t[..., ceil(K / G)]`` repeated over the ``K`` elements of ``codes``."""
    g = f.group_size
    rep = op.Expand(op.Unsqueeze(t, op.Constant(value_ints=[-1])),
                    op.Concat(op.Shape(t), op.Constant(value_ints=[g]), axis=0))
    flat = op.Reshape(rep, op.Concat(op.Shape(codes, end=-1), op.Constant(value_ints=[-1]), axis=0))
    return op.Slice(flat, op.Constant(value_ints=[0]), op.Shape(codes, start=-1), op.Constant(value_ints=[-1]))


def _kv_append_translation(op):
    """``kv_append`` (KIVI's per-channel keys, float window, sinks, pre-RoPE / rotated keys) as ONNX
    arithmetic, computed as ``compiler/ops.kv_append`` computes it: the tokens the write releases
    (``kv_quantized_span`` of the past and total lengths, from ``Shape`` at run time) sliced out of
    ``Concat(past, new)``, moved to the space they are quantized in (the per-head Hadamard a constant
    MatMul, RoPE undone at their positions with angles in double), fake-quantized with scales chosen as
    ``QuantFormat.quantize`` chooses them (``Round`` is half to even), moved back and put in place
    (an fp32 cache holding the format's values). RotateKV's grouped-head keys: the channels of all
    heads gathered in the calibrated order (``Gather``; back by its inverse, a ``ScatterElements`` of
    the order), the Hadamard over each group of heads a constant MatMul. Keys coded in their calibrated
    Karhunen-Loeve basis (``kv_key_klt``): the mean subtracted and each head's basis a MatMul, the code
    range of every component ``2^w - 1`` from the widths (``w = 0``: zero, the mean kept), the basis's
    transpose back. ZipCache's writes are refused before export (``base.windowed_kv_refusals``)."""
    import numpy as np
    import onnx
    import onnx_ir as ir

    from finegrain.compiler.ops import _hadamard

    fl, f64, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64

    def ints(*v):
        return op.Constant(value_ints=[int(x) for x in v])

    def const(v: float):
        return op.Constant(value_float=float(v))

    def group_hadamard(n: int, inverse: bool):  # x @ M = apply_hadamard(x, F) over n = g * d channels (or F^T)
        from finegrain.compiler.ops import _group_factor
        from finegrain.formats.hadamard import apply_hadamard

        m = apply_hadamard(torch.eye(n, dtype=torch.float64), _group_factor(n, inverse).double())
        return op.Constant(value=ir.tensor(m.numpy().astype(np.float32)))

    def kv_append(past, new, fmt: str, axis: str, window: int, sinks: int, inv_freq=None, rotated: bool = False,
                  score=None, fmt_low=None, ratio=1.0, block=1, channel_norm=False, perm=None, head_group=1,
                  basis=None, mean=None, widths=None):
        f = QuantFormat.parse(fmt)
        d = int(new.shape[-1])
        tokens = axis == "tokens"
        g = f.group_size if tokens else (f.group_size or d)
        unit = g if tokens else 1

        def done(t):  # kv_quantized_span's rule on a run-time length
            n = op.Max(op.Sub(t, ints(window + sinks)), ints(0))
            return op.Add(op.Mul(op.Div(n, ints(unit)), ints(unit)) if unit > 1 else n, ints(sinks))

        out = op.Concat(past, new, axis=2)
        a, b = done(op.Shape(past, start=2, end=3)), done(op.Shape(out, start=2, end=3))
        seg = op.Cast(op.Slice(out, a, b, ints(2)), to=fl)
        hm = op.Constant(value=ir.tensor(_hadamard(torch.eye(d)).numpy().astype(np.float32))) if rotated else None

        def rope(x, inverse: bool):
            half = int(inv_freq.shape[0])
            pos = op.Cast(op.Range(op.Squeeze(a, ints(0)), op.Squeeze(op.Max(a, b), ints(0)),
                                   op.Constant(value_int=1)), to=f64)
            ang = op.Mul(op.Unsqueeze(pos, ints(1)), op.Cast(inv_freq, to=f64))
            cos, sin = op.Cast(op.Cos(ang), to=fl), op.Cast(op.Sin(ang), to=fl)
            if inverse:
                sin = op.Neg(sin)
            x1, x2 = op.Slice(x, ints(0), ints(half), ints(3)), op.Slice(x, ints(half), ints(2 * half), ints(3))
            parts = [op.Sub(op.Mul(x1, cos), op.Mul(x2, sin)), op.Add(op.Mul(x2, cos), op.Mul(x1, sin))]
            if 2 * half < d:
                parts.append(op.Slice(x, ints(2 * half), ints(d), ints(3)))
            return op.Concat(*parts, axis=3)

        grouped = inv_freq is not None and (perm is not None or head_group > 1)  # RotateKV's grouped-head space
        klt = inv_freq is not None and basis is not None  # kv_key_klt: each head's calibrated basis, own widths
        per_head = rotated and not grouped and not klt
        if inv_freq is not None:
            seg = op.MatMul(seg, hm) if rotated else seg
            seg = rope(seg, True)
            seg = op.MatMul(seg, hm) if per_head else seg
        if klt:  # y = (x - mean) @ basis per head: [B, H, n, d] @ [H, d, d]
            mu = op.Unsqueeze(mean, ints(0, 2))
            seg = op.MatMul(op.Sub(seg, mu), basis)
        if grouped:  # [B, H, n, d] -> channels of all heads (reordered) -> [B, H / g, n, g * d], Hadamard per group
            heads, dq = int(new.shape[1]), head_group * d
            g = f.group_size or dq
            flat = op.Reshape(op.Transpose(seg, perm=[0, 2, 1, 3]), ints(0, 0, heads * d))
            flat = op.Gather(flat, perm, axis=2) if perm is not None else flat
            seg = op.MatMul(op.Transpose(op.Reshape(flat, ints(0, 0, heads // head_group, dq)), perm=[0, 2, 1, 3]),
                            group_hadamard(dq, False))
            d_in = d
            d = dq
        # groups: [B, H, n / G, G, d] reduced over axis 3 (per channel over tokens), or [B, H, n, d / G, G] over 4
        xg = op.Reshape(seg, ints(0, 0, -1, g, d) if tokens else ints(0, 0, 0, d // g, g))
        red = ints(3 if tokens else 4)
        lo_code, hi_code = f.family.code_range(f)
        c = float(f.clip)
        if klt:  # per component: codes 0 .. 2^w - 1 ([1, H, 1, 1, d] over the groups), w = 0 dropped to the mean
            kept = op.Unsqueeze(op.Greater(widths, op.Constant(value_int=0)), ints(0, 2, 3))
            hi_code = op.Unsqueeze(op.Sub(op.Pow(const(2.0), op.Cast(widths, to=fl)), const(1.0)), ints(0, 2, 3))
        if f.symmetric:
            raw = op.Div(op.Mul(op.ReduceMax(op.Abs(xg), red, keepdims=1), const(c)), const(f.family.max_value(f)))
        else:
            mn = op.Mul(op.Min(op.ReduceMin(xg, red, keepdims=1), const(0.0)), const(c))
            mx = op.Mul(op.Max(op.ReduceMax(xg, red, keepdims=1), const(0.0)), const(c))
            raw = op.Div(op.Sub(mx, mn), op.Max(hi_code, const(1.0)) if klt else const(2 ** f.bits - 1))
        stored = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}.get(f.scale)
        sc = op.Cast(op.Cast(raw, to=stored), to=fl) if stored else raw
        sc = op.Where(op.Greater(sc, const(0.0)), sc, const(1.0))
        z = (op.Mul(sc, const(0.0)) if f.symmetric
             else op.Clip(op.Round(op.Div(op.Neg(mn), sc)), const(0.0), const(2 ** f.bits - 1)) if not klt
             else op.Min(op.Max(op.Round(op.Div(op.Neg(mn), sc)), const(0.0)), hi_code))
        if klt:
            q = op.Min(op.Max(op.Add(op.Round(op.Div(xg, sc)), z), const(0.0)), hi_code)
            y = op.Where(kept, op.Mul(op.Sub(q, z), sc), const(0.0))
            y = op.Reshape(y, ints(0, 0, -1, d))
            y = op.Add(op.MatMul(y, op.Transpose(basis, perm=[0, 2, 1])), mu)
        elif f.kind == "e4m3":  # FP8 elements: the E4M3 grid, saturated (symmetric: no zero point)
            y = op.Reshape(op.Mul(_minifloat_round(op, op.Div(xg, sc), f), sc), ints(0, 0, -1, d))
        else:
            q = op.Clip(op.Add(op.Round(op.Div(xg, sc)), z), const(lo_code), const(hi_code))
            y = op.Reshape(op.Mul(op.Sub(q, z), sc), ints(0, 0, -1, d))
        if grouped:  # back: the group's inverse Hadamard, [B, n, H * d] in the order of the heads' channels
            flat = op.Reshape(op.Transpose(op.MatMul(y, group_hadamard(d, True)), perm=[0, 2, 1, 3]),
                              ints(0, 0, heads * d_in))
            if perm is not None:  # the inverse order: inv[perm[i]] = i
                idx = op.Range(op.Constant(value_int=0), op.Constant(value_int=heads * d_in),
                               op.Constant(value_int=1))
                inv = op.ScatterElements(idx, op.Cast(perm, to=i64), idx, axis=0)
                flat = op.Gather(flat, inv, axis=2)
            y = op.Transpose(op.Reshape(flat, ints(0, 0, heads, d_in)), perm=[0, 2, 1, 3])
        if inv_freq is not None:
            y = op.MatMul(y, hm) if per_head else y
            y = rope(y, False)
            y = op.MatMul(y, hm) if rotated else y
        y = op.CastLike(y, out)
        total = op.Shape(out, start=2, end=3)
        head = op.Slice(out, ints(0), op.Min(a, total), ints(2))
        return op.Concat(head, y, op.Slice(out, op.Max(a, b), total, ints(2)), axis=2)

    return kv_append


def _onnx_dtype(dtype) -> int:
    """ONNX element type of an op's ``out_dtype`` argument (the exporter passes it as an
    ``onnx_ir.DataType``; a torch dtype is mapped)."""
    import onnx

    if dtype is None:
        return onnx.TensorProto.FLOAT
    table = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
             torch.bfloat16: onnx.TensorProto.BFLOAT16}
    if isinstance(dtype, torch.dtype):
        if dtype not in table:
            raise ExportError(f"dtype {dtype} has no ONNX float type here")
        return table[dtype]
    return int(dtype)


# ---- step 2: lowering of the markers ---------------------------------------------------------
def _torch(value) -> torch.Tensor | None:
    if value is None:
        return None
    t = value.const_value
    if t is None:
        raise ExportError(f"ONNX value {value.name!r}: a quantized weight's codes / scales must be constants")
    arr = t.numpy()
    if arr.dtype.itemsize == 1 and arr.dtype != np.uint8 and arr.dtype != np.int8:  # float8 (ml_dtypes)
        return torch.from_numpy(arr.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(np.array(arr))


def _pow2_at_least(n: int) -> int:
    return 1 << max(4, math.ceil(math.log2(max(n, 1))))


def _weight_exportable(f: QuantFormat) -> bool:
    """Weight formats with an ONNX form: integers (any width, in 4/8-bit containers), FP8 E4M3
    per channel / tensor."""
    return f.kind == "int" or (f.kind == "e4m3" and f.granularity in ("channel", "tensor"))


def _lut_exportable(f: QuantFormat) -> bool:
    """Weights decoded by a table lookup (:func:`_lut_weight`): minifloats ``DequantizeLinear`` does
    not take (FP4 / FP6, MX / NV groups, E5M2) and codebooks (NormalFloat, Lloyd-Max, BitMoD's
    per-group datatypes); 1-D groups only."""
    from finegrain.formats.minifloat import MINIFLOATS

    lut = f.kind in (*MINIFLOATS, "nf", "lm", "bitmod")
    return lut and not f.block_rows and not _weight_exportable(f) and f.granularity in ("group", "channel", "tensor")


def _lut_table(f: QuantFormat, q) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(the value table, per-group offsets into it ``[N, G]`` or None, its name) of a table-decoded
    format: a minifloat's every bit pattern; NormalFloat / Lloyd-Max levels (the tensor's own
    codebook); BitMoD's four datatypes flattened, each group offset to its datatype's row."""
    from finegrain.formats.minifloat import MINIFLOATS

    if f.kind in MINIFLOATS:
        return MINIFLOATS[f.kind].table, None, f"the {f.kind.upper()} value table"
    if f.kind == "bitmod":
        t = f.family.tables(f.bits)
        return t.reshape(-1), q.zero.to(torch.int64) * t.shape[1], f"BitMoD's {t.shape[0]} datatypes per group"
    return f.family.levels(f, q.codebook).float(), None, f"the {f.kind.upper()}{f.bits} levels"


def _lut_weight(graph, layer: str, f: QuantFormat, q, n: int, k: int, before):
    """``W^T`` ``[K, N]`` in float from table-decoded codes (:func:`_lut_table`): ``Gather`` of each
    code's value (BitMoD: at its group's datatype offset), times its group's scale gathered per row
    (``k // G``: ragged last groups as the reference's) -- the reference's ``decode``, bit for bit.
    Codes of up to 4 bits are stored two per byte along K (unpacked by ``BitwiseAnd`` /
    ``BitShift``), wider ones one per byte; scales as decoded fp32 (E8M0 / two-level E4M3 kept exact
    in fp32). Inserted before ``before``; returns (the value, a form string)."""
    import onnx_ir as ir

    codes = q.codes.to(torch.uint8).T.contiguous()  # [K, N]
    table_t, offsets, table_name = _lut_table(f, q)

    def add(op_type, inputs, attrs=None):
        node = ir.node(op_type, inputs, attrs or {})
        graph.insert_before(before, node)
        return node.outputs[0]

    if f.bits <= 4:  # two codes per byte: row 2i in the low nibble, 2i + 1 in the high one
        if k % 2:
            codes = torch.cat([codes, torch.zeros(1, n, dtype=torch.uint8)])
        packed = codes[0::2] | (codes[1::2] << 4)
        pk, lo_mask, four, shape, ax1 = _initializers(graph, layer, {
            "qweight": packed.numpy(), "nibble_mask": np.array(15, np.uint8), "nibble_shift": np.array(4, np.uint8),
            "unpacked_shape": np.array([packed.shape[0] * 2, n], np.int64), "nibble_axis": np.array([1], np.int64)})
        lo = add("Unsqueeze", [add("BitwiseAnd", [pk, lo_mask]), ax1])
        hi = add("Unsqueeze", [add("BitShift", [pk, four], {"direction": "RIGHT"}), ax1])
        idx = add("Reshape", [add("Concat", [lo, hi], {"axis": 1}), shape])
        if k % 2:
            idx = add("Slice", [idx, *_initializers(graph, layer, {"rows_from": np.array([0], np.int64),
                                                                   "rows_to": np.array([k], np.int64),
                                                                   "rows_axis": np.array([0], np.int64)})])
        stored = f"{f.bits}-bit codes two per byte"
    else:
        (idx,) = _initializers(graph, layer, {"qweight": codes.numpy()})
        stored = f"{f.bits}-bit codes one per byte"
    idx = add("Cast", [idx], {"to": ir.DataType.INT32})
    groups = f.granularity == "group"
    rows = _initializers(graph, layer, {"scale_rows": (torch.arange(k) // f.group_size).numpy().astype(np.int64)})[0] \
        if groups else None
    if offsets is not None:  # BitMoD: each group's datatype row of the flattened tables
        off = offsets.reshape(n, -1).T.contiguous().to(torch.int32)
        (ov,) = _initializers(graph, layer, {"table_offsets": off.numpy()})
        idx = add("Add", [idx, add("Gather", [ov, rows], {"axis": 0}) if groups else ov])
    (table,) = _initializers(graph, layer, {"value_table": table_t.numpy().astype(np.float32)})
    values = add("Gather", [table, idx], {"axis": 0})
    scale = q.scale.float()
    if groups:
        (sc,) = _initializers(graph, layer, {"scale": scale.reshape(n, -1).T.contiguous().numpy()})
        scale_v = add("Gather", [sc, rows], {"axis": 0})
    else:
        shape = n if f.granularity == "channel" else ()
        (scale_v,) = _initializers(graph, layer, {"scale": scale.reshape(shape).numpy()})
    w = add("Mul", [values, scale_v])
    return w, f"{stored}, Gather from {table_name} x {f.scale} scales (emulated)"


def _container(bits: int) -> int:
    """The ONNX integer width that holds ``bits``-bit codes exactly (INT2/3 in 4, INT5-7 in 8)."""
    return 4 if bits <= 4 else 8


def _blocks(f: QuantFormat, k: int) -> int | None:
    """MatMulNBits block size for format ``f`` on K = ``k``, or None when its groups do not fit."""
    if f.granularity == "group":
        gs = f.group_size
        return gs if gs >= 16 and gs & (gs - 1) == 0 else None
    return _pow2_at_least(k)  # one block per row (per channel / per tensor), zero-padded


def _per_group(f: QuantFormat, t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A parameter tensor ([N, G], [N, 1] or [1]) as [N, G]."""
    g = math.ceil(k / f.group_size) if f.granularity == "group" else 1
    return t.reshape(-1, t.shape[-1]).expand(n, g) if t.numel() == 1 else t.reshape(n, g)


def _matmulnbits(f: QuantFormat, q, n: int, k: int, accuracy_level: int):
    """(B, scales, zero_points | None, attributes) in MatMulNBits' layout, or None if it does not fit."""
    if f.kind != "int" or q.codebook is not None:
        return None
    bits = _container(f.bits)
    bs = _blocks(f, k)
    if bs is None:
        return None
    nb = math.ceil(k / bs)
    scale = _per_group(f, q.scale.float(), n, k)
    if f.granularity != "group":
        scale = scale[:, :1]
    offset = 2 ** (bits - 1) if f.symmetric else 0
    zero = _per_group(f, q.zero, n, k)[:, :nb] + offset  # unsigned zero point per block
    codes = q.codes.to(torch.int32) + offset  # unsigned codes
    pad = nb * bs - k
    if pad:  # padded elements equal the block's zero point: they dequantize to 0
        codes = torch.cat([codes, zero[:, -1:].expand(n, pad)], dim=1)
    codes = codes.reshape(n, nb, bs).to(torch.uint8)
    if bits == 4:
        b = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
    else:
        b = codes.contiguous()
    zp = None
    if not f.symmetric:
        z = zero.to(torch.uint8)
        if bits == 4:
            if nb % 2:
                z = torch.cat([z, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
            z = z[:, 0::2] | (z[:, 1::2] << 4)
        zp = z.reshape(-1).contiguous()
    attrs = {"K": k, "N": n, "bits": bits, "block_size": bs, "accuracy_level": accuracy_level}
    return b.numpy(), scale.reshape(-1).contiguous().numpy().astype(np.float32), \
        None if zp is None else zp.numpy(), attrs


def _qdq(f: QuantFormat, q, n: int, k: int):
    """(codes [K, N] as an ONNX-typed numpy array, scale, zero | None, axis, block_size | None), or None."""
    import ml_dtypes

    if q.codebook is not None or not _weight_exportable(f):
        return None
    if f.kind == "int":
        np_t = {(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4, (8, True): np.int8, (8, False): np.uint8}
        ty = np_t[(_container(f.bits), f.symmetric)]
        codes = q.codes.to(torch.int32).T.contiguous().numpy().astype(ty)
        zero = None if f.symmetric else q.zero.to(torch.int32)
    else:  # FP8 E4M3 per channel / tensor
        codes = q.codes.to(torch.uint8).T.contiguous().numpy().view(ml_dtypes.float8_e4m3fn)
        zero = None
    scale = q.scale.float()
    if f.granularity == "group":
        scale_t = scale.reshape(n, -1).T.contiguous().numpy()
        zero_t = None if zero is None else zero.reshape(n, -1).T.contiguous().numpy().astype(codes.dtype)
        return codes, scale_t, zero_t, 0, f.group_size
    if f.granularity == "channel":
        return codes, scale.reshape(n).numpy(), None if zero is None else zero.reshape(n).numpy().astype(codes.dtype), 1, None
    if f.granularity == "tensor":
        return codes, scale.reshape(()).numpy(), None if zero is None else zero.reshape(()).numpy().astype(codes.dtype), None, None
    return None


def _initializers(graph, layer: str, arrays: dict) -> list:
    """Register ``<layer>.<key>`` initializers for the arrays that are not None, in order."""
    import onnx_ir as ir

    vals = [ir.Value(name=f"{layer}.{key}", const_value=ir.tensor(a)) for key, a in arrays.items() if a is not None]
    for v in vals:
        graph.register_initializer(v)
    return vals


def _replace(graph, old, new) -> None:
    """Route every use of ``old``'s output (graph outputs included, keeping their name) to
    ``new``'s, and remove ``old``."""
    import onnx_ir as ir

    o, v = old.outputs[0], new.outputs[0]
    v.type, v.shape = o.type, o.shape
    name = o.name
    ir.convenience.replace_all_uses_with(o, v, replace_graph_outputs=True)
    graph.remove(old, safe=True)
    v.name = name


def _gemm(graph, layer: str, f: QuantFormat, q, n: int, k: int, node, gemm, style: str, accuracy_level: int) -> str:
    """``Gemm(A, W, C, transB=1)`` (torch.onnx's linear on a 2-D input) over a quantized ``W``:
    MatMulNBits (+ Add of C) or a DequantizeLinear of ``W^T`` read by the Gemm with transB=0."""
    import onnx_ir as ir

    attr = lambda name, default: gemm.attributes[name].value if name in gemm.attributes else default  # noqa: E731
    if attr("transA", 0) or not attr("transB", 0) or attr("alpha", 1.0) != 1.0 or attr("beta", 1.0) != 1.0:
        raise ExportError(f"{layer}: quantized weight read by a Gemm with transA/transB/alpha/beta the export does not "
                          "cover")
    nbits = _matmulnbits(f, q, n, k, accuracy_level) if style == "matmulnbits" else None
    if nbits is not None:
        b, sc, zp, attrs = nbits
        vals = _initializers(graph, layer, {"qweight": b, "scales": sc, "zero_points": zp})
        new = ir.node("MatMulNBits", [gemm.inputs[0], *vals], attrs, domain="com.microsoft")
        graph.insert_before(gemm, new)
        if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
            add = ir.node("Add", [new.outputs[0], gemm.inputs[2]])
            graph.insert_before(gemm, add)
            new = add
        _replace(graph, gemm, new)
        form = f"MatMulNBits(bits={attrs['bits']}, block_size={attrs['block_size']}, accuracy_level={accuracy_level})"
    elif _lut_exportable(f):
        w, form = _lut_weight(graph, layer, f, q, n, k, gemm)
        gemm.replace_input_with(1, w)
        gemm.attributes["transB"] = ir.AttrInt64("transB", 0)
    else:
        parts = _qdq(f, q, n, k)
        if parts is None:
            raise ExportError(f"{layer}: format {f.tag} has no ONNX form yet")
        codes, sc, z, axis, block = parts
        attrs = {} if axis is None else {"axis": axis}
        if block is not None:
            attrs["block_size"] = block
        dq = ir.node("DequantizeLinear", _initializers(graph, layer, {"qweight": codes, "scale": sc, "zero_point": z}),
                     attrs)
        graph.insert_before(gemm, dq)
        gemm.replace_input_with(1, dq.outputs[0])
        gemm.attributes["transB"] = ir.AttrInt64("transB", 0)
        form = f"DequantizeLinear({codes.dtype.name}, " + (f"block {block})" if block else f"axis {axis})")
    if not any(True for _ in node.outputs[0].uses()):
        graph.remove(node, safe=True)
    return form


def _matrix_qdq(graph, layer: str, f: QuantFormat, q, n: int, k: int, node) -> str:
    """A DequantizeLinear of the weight matrix ``[N, K]`` itself (blocked along K for groups, axis 0
    per channel) replacing the marker, for readers other than a linear (LSTM / GRU gates: the
    exporter slices and reorders the matrix downstream, in float)."""
    _check_int_dq(f, q, layer, "this weight")
    scale, zero = q.scale.float(), None if f.symmetric else q.zero.to(torch.int32)
    if f.granularity == "group":
        scale, zero = scale.reshape(n, -1), None if zero is None else zero.reshape(n, -1)
        attrs, form = {"axis": 1, "block_size": f.group_size}, f"block {f.group_size}"
    elif f.granularity == "channel":
        scale, zero = scale.reshape(n), None if zero is None else zero.reshape(n)
        attrs, form = {"axis": 0}, "axis 0"
    else:
        scale, zero = scale.reshape(()), None if zero is None else zero.reshape(())
        attrs, form = {}, "per tensor"
    dq, ty = _int_dq(graph, layer, f, q.codes, scale, zero, attrs, node)
    _replace(graph, node, dq)
    return f"DequantizeLinear({ty}, {form}) of the matrix"


def _check_int_dq(f: QuantFormat, q, layer: str, what: str) -> None:
    if f.kind != "int" or q.codebook is not None or f.granularity not in ("group", "channel", "tensor"):
        raise ExportError(f"{layer}: format {f.tag} has no ONNX form for {what} (INT2..8 per group, channel or tensor)")


def _int_dq(graph, layer: str, f: QuantFormat, codes, scale, zero, attrs: dict, before):
    """A DequantizeLinear of integer ``codes`` (already in the reader's layout) with its initializers,
    inserted before ``before``; returns (the node, the codes' ONNX element type name)."""
    import ml_dtypes
    import onnx_ir as ir

    np_t = {(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4, (8, True): np.int8, (8, False): np.uint8}
    ty = np_t[(_container(f.bits), f.symmetric)]
    arrays = {"qweight": codes.to(torch.int32).numpy().astype(ty), "scale": scale.numpy(),
              "zero_point": None if zero is None else zero.numpy().astype(ty)}
    dq = ir.node("DequantizeLinear", _initializers(graph, layer, arrays), attrs)
    graph.insert_before(before, dq)
    return dq, np.dtype(ty).name


def _conv_reader(node):
    """(the chain of layout nodes, the Conv) when a DequantizePacked output reaches a Conv's weight
    input through Reshape / Transpose only (a convolution's matrix view, ``ir.conv_matrix``)."""
    chain, v = [], node.outputs[0]
    while True:
        uses = [u.node for u in v.uses()]
        if len(uses) != 1:
            return None
        user = uses[0]
        if user.op_type == "Conv" and user.inputs[1] is v:
            return (chain, user) if chain else None
        if user.op_type not in ("Reshape", "Transpose"):
            return None
        chain.append(user)
        v = user.outputs[0]


def _conv_qdq(graph, layer: str, f: QuantFormat, q, node, chain: list, conv) -> str:
    """A DequantizeLinear of the conv weight in its own ``[O, I, *kernel]`` layout: blocked along axis 1
    (input channels) for group formats, axis 0 per output channel, or one scale per tensor."""
    wshape = chain[-1].outputs[0].shape
    if wshape is None or not all(isinstance(d, int) for d in wshape):
        raise ExportError(f"{layer}: the convolution's weight shape is not static in the exported graph")
    o, i, spatial = wshape[0], wshape[1], list(wshape[2:])
    _check_int_dq(f, q, layer, "a conv weight")
    codes = q.codes.to(torch.int32)
    scale, zero = q.scale.float(), None if f.symmetric else q.zero.to(torch.int32)
    if f.granularity == "group":  # matrix [O * taps, I] -> [O, I, *kernel]; params [O * taps, G] -> [O, G, *kernel]
        def lay(t):
            return t.reshape(o, *spatial, -1).movedim(-1, 1).contiguous()
        codes, scale = lay(codes), lay(scale.reshape(o * math.prod(spatial), -1))
        zero = None if zero is None else lay(zero.reshape(o * math.prod(spatial), -1))
        attrs, form = {"axis": 1, "block_size": f.group_size}, f"block {f.group_size} along input channels"
    elif f.granularity == "channel":
        codes, scale = codes.reshape(o, i, *spatial), scale.reshape(o)
        zero = None if zero is None else zero.reshape(o)
        attrs, form = {"axis": 0}, "axis 0"
    else:
        codes, scale = codes.reshape(o, i, *spatial), scale.reshape(())
        zero = None if zero is None else zero.reshape(())
        attrs, form = {}, "per tensor"
    dq, ty = _int_dq(graph, layer, f, codes, scale, zero, attrs, conv)
    conv.replace_input_with(1, dq.outputs[0])
    for dead in [*reversed(chain), node]:
        if not any(True for _ in dead.outputs[0].uses()):
            graph.remove(dead, safe=True)
    return f"DequantizeLinear({ty}, {form}) -> Conv"


def _lower(model, style: str, accuracy_level: int) -> dict:
    """Replace the finegrain markers; returns {weight: the ONNX form it got}."""
    import onnx_ir as ir

    from finegrain.formats.hadamard import apply_hadamard

    graph = model.graph
    forms: dict[str, str] = {}
    hadamards: dict[tuple, Any] = {}
    for node in list(graph):  # first the experts, whose weights are then lowered like linears' below
        if node.domain == DOMAIN and node.op_type == "GroupedLinear":
            _experts(graph, node)
    for node in list(graph):
        if node.domain != DOMAIN:
            continue
        if node.op_type == "KvInt8Attention":
            from finegrain.backends.onnx_gqa import lower as lower_gqa

            lower_gqa(graph, node)
            continue
        if node.op_type == "Hadamard":
            x, factor = node.inputs
            n = x.shape[-1] if x.shape is not None else None
            if not isinstance(n, int):
                raise ExportError(f"online Hadamard at ONNX node {node.name!r}: its input's last dim must be static")
            fac = _torch(factor).double()
            key = (n, tuple(fac.flatten().tolist()))
            if key not in hadamards:
                mat = apply_hadamard(torch.eye(n, dtype=torch.float64), fac).float().numpy()
                hadamards[key] = ir.Value(name=f"finegrain.hadamard_{n}_{len(hadamards)}", const_value=ir.tensor(mat))
                graph.register_initializer(hadamards[key])
            mm = ir.node("MatMul", [x, hadamards[key]])
            graph.insert_before(node, mm)
            _replace(graph, node, mm)
            continue
        if node.op_type != "DequantizePacked":
            raise ExportError(f"unknown finegrain ONNX marker {node.op_type}")
        f = QuantFormat.parse(node.attributes["fmt"].value)
        shape = list(node.attributes["shape"].value)
        packed, scale, zero, scale2, codebook = (list(node.inputs) + [None, None])[:5]
        layer = packed.name.removesuffix("_qpacked")  # initializers keep the graph's constant names
        if len(shape) != 2:
            raise ExportError(f"{layer}: weight of shape {shape}; the ONNX export covers 2-D weights")
        q = unpack_weight(_torch(packed), _torch(scale), _torch(zero), f, shape, _torch(scale2), _torch(codebook))
        n, k = shape
        # the consumer: Transpose(perm [1, 0]) -> MatMul(A, .) (aten.linear as torch.onnx exports it)
        out = node.outputs[0]
        uses = [u.node for u in out.uses()]
        conv = _conv_reader(node)
        if conv is not None:  # Reshape (-> Transpose) -> Conv: one DequantizeLinear on the 4-D weight
            forms[layer] = _conv_qdq(graph, layer, f, q, node, *conv)
            continue
        if uses and not (len(uses) == 1 and uses[0].op_type in ("Transpose", "Gemm")):  # LSTM gates, a tied embedding
            forms[layer] = _matrix_qdq(graph, layer, f, q, n, k, node)
            continue
        tr = uses[0] if len(uses) == 1 else None
        if tr is not None and tr.op_type == "Gemm" and tr.inputs[1] is out:  # a linear on a 2-D input
            forms[layer] = _gemm(graph, layer, f, q, n, k, node, tr, style, accuracy_level)
            continue
        if tr is None or tr.op_type != "Transpose" or list(tr.attributes["perm"].value) != [1, 0]:
            raise ExportError(f"{layer}: quantized weight not read as a linear's transposed operand "
                              f"(read by {[u.op_type for u in uses]}); the ONNX export covers linear layers")
        matmuls = [u.node for u in tr.outputs[0].uses()]
        if not all(m.op_type == "MatMul" and m.inputs[1] is tr.outputs[0] for m in matmuls):
            raise ExportError(f"{layer}: transposed weight read by {[m.op_type for m in matmuls]}, not MatMul")
        nbits = _matmulnbits(f, q, n, k, accuracy_level) if style == "matmulnbits" else None
        if _lut_exportable(f):
            w, forms[layer] = _lut_weight(graph, layer, f, q, n, k, tr)
            for mm in matmuls:
                mm.replace_input_with(1, w)
        elif nbits is not None:
            b, s, zp, attrs = nbits
            vals = _initializers(graph, layer, {"qweight": b, "scales": s, "zero_points": zp})
            for mm in matmuls:
                new = ir.node("MatMulNBits", [mm.inputs[0], *vals], attrs, domain="com.microsoft")
                graph.insert_before(mm, new)
                _replace(graph, mm, new)
            forms[layer] = f"MatMulNBits(bits={attrs['bits']}, block_size={attrs['block_size']}, accuracy_level={accuracy_level})"
        else:
            parts = _qdq(f, q, n, k)
            if parts is None:
                raise ExportError(f"{layer}: format {f.tag} has no ONNX form yet (qdq covers INT2..8 per group, "
                                  "channel or tensor and FP8 E4M3 per channel / tensor; matmulnbits INT2..8 with "
                                  "power-of-two groups >= 16)")
            codes, s, z, axis, block = parts
            vals = _initializers(graph, layer, {"qweight": codes, "scale": s, "zero_point": z})
            attrs = {} if axis is None else {"axis": axis}
            if block is not None:
                attrs["block_size"] = block
            dq = ir.node("DequantizeLinear", vals, attrs)
            graph.insert_before(tr, dq)
            for mm in matmuls:
                mm.replace_input_with(1, dq.outputs[0])
            forms[layer] = f"DequantizeLinear({codes.dtype.name}, " + (f"block {block})" if block else f"axis {axis})")
        for dead in (tr, node):
            if not any(True for _ in dead.outputs[0].uses()):
                graph.remove(dead, safe=True)
    return forms


def output_names(cm) -> list[str]:
    """``output``; a KV-cache graph: ``logits`` then ``present_key_i`` / ``present_value_i``."""
    kv = getattr(cm, "kv", None)
    if not kv:
        return ["output"]
    return ["logits"] + [f"present_{k}_{i}" for i in range(kv["layers"]) for k in ("key", "value")]


def export_onnx(cm, path: str | Path, style: str = "qdq", accuracy_level: int = 0, overwrite: bool = False,
                kv_int8_cache: bool = True) -> dict:
    """Export ``cm`` (a CompiledModel) to the ONNX file ``path``; returns a summary: the file(s),
    their bytes, the ONNX form each quantized weight got and, for a KV-cache graph, ``kv_int8``:
    the past inputs held as INT8 codes by GroupQueryAttention (``kv_int8_cache``: layers whose keys
    and values are static INT8 per tensor, ``backends/onnx_gqa.py``) and why others were not."""
    import onnx
    import onnx_ir as ir
    import onnx_ir.passes.common as common

    if style not in STYLES:
        raise ExportError(f"style {style!r} is not one of {STYLES}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ExportError(f"accuracy_level {accuracy_level!r} is not one of {ACCURACY_LEVELS}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"{path}: the ONNX file name must end in .onnx")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    BACKEND.require(cm)  # every layer / op the export does not cover, named, before torch.onnx.export runs
    import warnings

    gm, specs, kv_int8 = _split_experts(cm.gm), cm.input_specs, {"inputs": [], "skipped": []}
    if kv_int8_cache and getattr(cm, "kv", None):
        from finegrain.backends.onnx_gqa import fuse

        gm, int8, kv_int8["skipped"] = fuse(gm, (cm.source or {}).get("hf_config"))
        specs = [{**s, "dtype": "int8"} if i in int8 else s for i, s in enumerate(cm.input_specs)]
        kv_int8["inputs"] = [specs[i]["name"] for i in sorted(int8)]
    # torch.onnx's registry logs a warning per torchvision op when torchvision is absent (it is, by design)
    # (and onnx_ir one per empty-list attribute torch.onnx writes, e.g. in a MoE block's routing ops)
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    attr_log = logging.getLogger("onnx_ir._convenience")
    level, attr_level = registry_log.level, attr_log.level
    registry_log.setLevel(logging.ERROR)
    attr_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(gm.eval(), example_inputs(specs), dynamo=True, opset_version=OPSET,
                                     custom_translation_table=_translation_table(), optimize=True, verbose=False,
                                     dynamic_shapes=export_dynamic_shapes(specs),
                                     input_names=[s["name"] for s in specs], output_names=output_names(cm))
        finally:
            registry_log.setLevel(level)
            attr_log.setLevel(attr_level)
    model = prog.model
    forms = _lower(model, style, accuracy_level)
    for p in (common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass()):
        p(model)
    if any(n.domain == "com.microsoft" for n in model.graph):
        model.opset_imports["com.microsoft"] = 1
    model.opset_imports.pop(DOMAIN, None)
    model.metadata_props.update(provenance(cm, style, accuracy_level))
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        data = f"{path.name}.data" if total > _EXTERNAL_ABOVE else None
        ir.save(model, tmp / path.name, external_data=data)
        onnx.checker.check_model(str(tmp / path.name))
        for f in tmp.iterdir():
            f.replace(path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = [path] + ([path.parent / data] if data else [])
    return {"path": str(path), "style": style, "accuracy_level": accuracy_level,
            "bytes": sum(f.stat().st_size for f in files), "files": [str(f) for f in files], "weights": forms,
            "kv_int8": kv_int8}


def provenance(cm, style: str, accuracy_level: int) -> dict[str, str]:
    """What an exported file records about where it came from (ONNX ``metadata_props``): the
    artifact's fingerprint, the weight style and the MatMulNBits accuracy level."""
    from finegrain.version import __version__

    return {"finegrain.artifact": cm.fingerprint(), "finegrain.style": style,
            "finegrain.accuracy_level": str(accuracy_level), "finegrain.version": __version__}


def read_provenance(path: str | Path) -> dict[str, str]:
    """The ``finegrain.*`` metadata of an ONNX file (its graph and weights are not read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf / IO errors: the file is not an ONNX model
        raise ExportError(f"{path}: not an ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("finegrain.")}


def reuse_or_export(cm, path: str | Path, style: str, accuracy_level: int) -> tuple[Path, bool]:
    """``path`` when it is an export of ``cm`` with this ``style`` (and, for MatMulNBits, this
    accuracy level, which is baked into the file); otherwise, when ``path`` does not exist, export
    there first. Returns (path, reused). A file exported from another artifact or with other
    options is an ExportError naming the difference, never silently used or replaced."""
    path = Path(path)
    if not path.exists():
        export_onnx(cm, path, style=style, accuracy_level=accuracy_level)
        return path, False
    got, want = read_provenance(path), provenance(cm, style, accuracy_level)
    keys = ["finegrain.artifact", "finegrain.style"] + (["finegrain.accuracy_level"] if style == "matmulnbits" else [])
    diff = [f"{k.removeprefix('finegrain.')} {got.get(k, 'unrecorded')!r} (wanted {want[k]!r})"
            for k in keys if got.get(k) != want[k]]
    if diff:
        raise ExportError(f"{path} is not an ONNX export of this artifact with these options: "
                          f"{'; '.join(d if not d.startswith('artifact') else 'artifact fingerprint differs' for d in diff)}"
                          "; remove it or give another file to export to")
    return path, True


GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
               "gemma2": "gemma2", "gemma3_text": "gemma3_text"}


def export_genai(cm, out: str | Path, style: str = "matmulnbits", accuracy_level: int = 0,
                 overwrite: bool = False) -> dict:
    """A folder onnxruntime-genai loads and generates with: ``model.onnx`` (the KV-cache graph:
    ``input_ids``, ``position_ids``, ``past_key_i`` / ``past_value_i`` in; ``logits``,
    ``present_key_i`` / ``present_value_i`` out; the past grows by concatenation, so
    ``past_present_share_buffer`` is false), ``genai_config.json`` naming them, and the tokenizer
    files. Needs an artifact compiled with ``kv_cache=True`` from a transformers causal LM."""
    from finegrain.io.files import atomic_directory, dumps_json

    kv = getattr(cm, "kv", None)
    cfg = (cm.source or {}).get("hf_config") or {}
    if not kv:
        raise ExportError("onnxruntime-genai needs the KV cache in the graph: re-compile with kv_cache=True "
                          "(finegrain quantize --kv-cache)")
    mtype = GENAI_TYPES.get(cfg.get("model_type"))
    if mtype is None:
        raise ExportError(f"model type {cfg.get('model_type')!r}: onnxruntime-genai types this export writes are "
                          f"{', '.join(GENAI_TYPES)}")

    def ids(key):
        v = cfg.get(key)
        return v if isinstance(v, int) or (isinstance(v, list) and all(isinstance(x, int) for x in v)) else None

    eos = ids("eos_token_id")
    tok = cm.tokenizer
    if eos is None and tok is not None:
        eos = tok.eos_token_id
    genai = {
        "model": {
            "bos_token_id": ids("bos_token_id") if ids("bos_token_id") is not None else getattr(tok, "bos_token_id", 0),
            "context_length": kv["max_seq_len"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": kv["head_dim"],
                "hidden_size": int(cfg.get("hidden_size", kv["head_dim"] * cfg.get("num_attention_heads", 1))),
                "inputs": {"input_ids": "input_ids", "position_ids": "position_ids",
                           "past_key_names": "past_key_%d", "past_value_names": "past_value_%d"},
                "outputs": {"logits": "logits", "present_key_names": "present_key_%d",
                            "present_value_names": "present_value_%d"},
                "num_attention_heads": int(cfg.get("num_attention_heads", kv["kv_heads"])),
                "num_hidden_layers": kv["layers"],
                "num_key_value_heads": kv["kv_heads"],
            },
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": ids("pad_token_id") if ids("pad_token_id") is not None else (
                eos[0] if isinstance(eos, list) else eos if eos is not None else 0),
            "type": mtype,
            "vocab_size": int(cfg.get("vocab_size", 0)),
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": kv["max_seq_len"], "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        # static INT8 caches as GroupQueryAttention's INT8 past / present: genai allocates and carries them as INT8
        info = export_onnx(cm, tmp / "model.onnx", style=style, accuracy_level=accuracy_level)
        (tmp / "genai_config.json").write_text(dumps_json(genai) + "\n")
        if tok is not None:
            tok.save_pretrained(str(tmp))
        (tmp / "finegrain_export.json").write_text(dumps_json({
            "finegrain_export": "onnxruntime-genai", "recipe": cm.recipe_name, "style": style,
            "accuracy_level": accuracy_level, "forms": info["weights"]}) + "\n")
    files = sorted(p.name for p in out.iterdir())
    return {"path": str(out), "files": files, "bytes": sum((out / f).stat().st_size for f in files),
            "weights": info["weights"], "style": style, "kv_int8": info.get("kv_int8")}


class OnnxSession(Session):
    """Runs a CompiledModel through ONNX Runtime (CPU). The model is exported to a temporary
    directory (kept for the session's life: ``self.path``; removed by ``close()``); with ``reuse``
    it is exported to that file once and the file is run again by later sessions while its
    recorded fingerprint and options match (``reuse_or_export``); ``path`` runs a file as is."""

    backend = "onnx"

    def __init__(self, cm, style: str = "qdq", accuracy_level: int = 0, threads: int | None = None,
                 path: str | Path | None = None, reuse: str | Path | None = None):
        self.input_specs = cm.input_specs
        self.kv = getattr(cm, "kv", None)
        self.max_seq_len = self.kv["max_seq_len"] if self.kv else None
        self._tmp = None
        self.reused = False
        if reuse is not None:  # export once to this file, run it again while it matches the artifact
            if path is not None:
                raise ExportError("OnnxSession: give path (a file to run as is) or reuse, not both")
            path, self.reused = reuse_or_export(cm, reuse, style, accuracy_level)
        elif path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="finegrain-onnx-")
            path = Path(self._tmp.name) / "model.onnx"
            self.export = export_onnx(cm, path, style=style, accuracy_level=accuracy_level)
        self.path = Path(path)
        self.session = make_session(self.path, accuracy_level, threads)
        # pasts the model holds as INT8 codes (GroupQueryAttention's cache, backends/onnx_gqa.py)
        int8 = {i.name for i in self.session.get_inputs() if i.type == "tensor(int8)"}
        self.input_specs = [{**s, "dtype": "int8"} if s["name"] in int8 else s for s in self.input_specs]

    def kv_forward(self, ids: torch.Tensor, past, start: int) -> tuple:
        if past is None:  # empty pasts in each input's own dtype (INT8 where ORT holds the codes) and shape
            from finegrain.compiler.capture import kv_shape

            b = ids.shape[0]
            shapes = [kv_shape(self.kv, i) for i in range(len(self.input_specs) - 2)]
            past = [torch.zeros(b, h, 0, d, dtype=getattr(torch, s["dtype"]))
                    for (h, d), s in zip(shapes, self.input_specs[2:])]
        return super().kv_forward(ids, past, start)

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.kv and len(inputs) == 1:
            return self.kv_forward(inputs[0], None, 0)[0]
        out = self.run_all(*inputs)
        return out if self.kv else out[0]

    def run_all(self, *inputs: torch.Tensor) -> tuple:
        check_inputs(self.input_specs, inputs)
        feed = {s["name"]: t.detach().cpu().numpy() for s, t in zip(self.input_specs, inputs)}
        return tuple(torch.from_numpy(o) for o in self.session.run(None, feed))


def make_session(path: str | Path, accuracy_level: int = 0, threads: int | None = None):
    """An onnxruntime CPU session; ``accuracy_level`` also sets the level ORT gives the
    MatMulNBits it fuses from DequantizeLinear(INT4) + MatMul. ``threads``: its intra-op threads
    (default ``$FINEGRAIN_ORT_THREADS``, else ORT's: one per physical core)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if not threads:
        env = os.environ.get("FINEGRAIN_ORT_THREADS", "").strip()
        if env and not env.isdigit():
            from finegrain.errors import InputError

            raise InputError(f"FINEGRAIN_ORT_THREADS={env!r}: expected a non-negative integer (0 = ORT's default)")
        threads = int(env or 0) or None
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxBackend(BackendBase):
    name = "onnx"
    kv_cache = True  # past_key_* / present_* in and out of the exported model (onnxruntime-genai reads it)
    kv_widths = True
    description = "ONNX export (QDQ / MatMulNBits) run by ONNX Runtime (CPU)"
    error = ExportError

    def available(self) -> str | None:
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime", "onnxscript", "onnx_ir") if importlib.util.find_spec(m) is None]
        return f"needs {', '.join(missing)} (pip install 'finegrain[onnx]')" if missing else None

    def check(self, compiled) -> list:  # and the kv_append variants the ONNX arithmetic does not cover
        return super().check(compiled) + windowed_kv_refusals(compiled.gm, "ONNX", klt_ok=True)

    def capability(self, fmt: QuantFormat, role: str, partner=None) -> tuple[str, str]:
        if role == "weight":
            if fmt.block_rows:
                return "refused", (f"weight format {fmt.tag}: 2-D block scales have no ONNX form (DequantizeLinear "
                                   "blocks along one axis)")
            if fmt.kind == "int":
                return "native", "DequantizeLinear INT4/INT8 (fused by ORT) or MatMulNBits"
            if _weight_exportable(fmt):
                return "emulated", "DequantizeLinear FP8 -> float MatMul"
            if _lut_exportable(fmt):
                return "emulated", ("codes (<= 4 bits two per byte) decoded by a Gather from the format's value "
                                    "table / codebook, times the group scales gathered per row -> float MatMul "
                                    "(linear layers)")
            return "refused", (f"weight format {fmt.tag} has no ONNX form (INT2..8, FP8 E4M3 per channel / tensor, "
                               "minifloats and codebooks in groups along K do)")
        if role == "kv" and fmt.tag == "int8-tensor-sym-fp32":
            return "native", ("com.microsoft::GroupQueryAttention holding an INT8 PER_TENSOR past / present where a "
                              "layer's keys and values both are (backends/onnx_gqa.py; sliding-window layers: an fp32 "
                              "cache holding the values)")
        try:
            _act_format(fmt.tag)
        except ExportError as e:
            return "refused", str(e)
        if role == "kv":
            return "emulated", "fp32 cache holding the format's values (the write's quantizer as ONNX arithmetic)"
        return "emulated", "activation quantizer exported as ONNX arithmetic"

    def op_capability(self, op: str) -> tuple[str, str]:
        if op == "hadamard":
            return "emulated", "online Hadamard as a dense MatMul"
        if op == "conv":
            return "emulated", "DequantizeLinear of the 4-D weight (blocked along input channels) -> float Conv"
        if op == "recurrent":
            return "emulated", "DequantizeLinear of the gate matrices -> float LSTM / GRU / RNN"
        if op == "kv_klt":
            return "emulated", ("fp32 cache holding the values: the released keys' pre-RoPE code in each head's "
                                "calibrated basis as arithmetic (MatMul by the basis, per-component code ranges from "
                                "the widths, MatMul back)")
        if op == "kv_append":
            return "emulated", ("fp32 cache holding the format's values: the tokens a write releases (KIVI's groups "
                                "per channel, float window, sinks, pre-RoPE / rotated keys) fake-quantized in ONNX "
                                "arithmetic, RotateKV's grouped-head / reordered keys too; ZipCache refused")
        if op == "act_outliers":
            return "emulated", ("activation groups in two precisions (FMPQ): both fake quantizations, the outlier "
                                "groups' columns taken from the 8-bit one")
        if op == "grouped_linear":
            return "emulated", ("mixture-of-experts grouped GEMM unrolled over the experts: each expert's rows "
                                "(Slice by the offsets) times its own weight, lowered as a linear's (MatMulNBits / "
                                "DequantizeLinear), concatenated")
        return "refused", f"op {op} has no ONNX lowering"

    def session(self, compiled, **options) -> OnnxSession:
        return OnnxSession(compiled, **options)  # its export checks the model first

    def export(self, compiled, out, **options) -> dict:
        return export_onnx(compiled, out, **options)


BACKEND = OnnxBackend()
