"""ONNX Runtime's own quantized KV cache for static INT8 writes (issue #17: "ONNX Runtime where its
attention ops take a quantized cache").

``com.microsoft::GroupQueryAttention`` (ORT 1.32) holds its past keys / values as INT8 codes with one
scale per tensor (``k_quant_type`` / ``v_quant_type`` ``PER_TENSOR``, ``kv_cache_bit_width`` 8): it
quantizes the new tokens (round half to even, clamped to [-128, 127]), appends their codes and
attends over the dequantized cache, causally. That is exactly what finegrain's static per-tensor
INT8 write (``kv_key`` / ``kv_value`` ``int8-tensor-sym-fp32``: one calibrated scale per layer,
``passes/quantize_kv.py``) followed by causal attention computes, so :func:`fuse` rewrites a copy of
a KV-cache graph, per layer whose keys and values are both written that way and read only by one
``scaled_dot_product_attention``, into one ``finegrain::kv_int8_attention`` op (torch reference
below) over INT8 past inputs, returning INT8 presents; the ONNX export translates it to a marker
that ``backends/onnx.py`` lowers to GroupQueryAttention. The session then carries the codes (one
byte per element) between steps, and so does onnxruntime-genai (``export_genai``: it allocates the
INT8 cache from the model's input types).

Not fused (left as the fp32 cache holding the format's values, said in ``skipped``): layers whose
attention is not plain causal (sliding windows: the model's config has one), writes in any other
format, presents read by anything but their attention (and the graph output). Measured against the
reference: ``tests/backends/test_onnx_kv.py``.
"""
from __future__ import annotations

import copy
import operator

import torch
from torch.fx import GraphModule, Node

from finegrain.compiler.ir import PASS_THROUGH
from finegrain.formats import QuantFormat

INT8_STATIC = "int8-tensor-sym-fp32"
SDPA = torch.ops.aten.scaled_dot_product_attention.default
# what transformers' repeat_kv puts between a present and its attention (as passes/quantize_kv.attentions_reading)
_VIEWS = PASS_THROUGH | {torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default, torch.ops.aten.slice.Tensor}


@torch.library.custom_op("finegrain::kv_int8_attention", mutates_args=())
def kv_int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                      k_scale: torch.Tensor, v_scale: torch.Tensor, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention of ``q`` ``[B, H, S, d]`` over INT8 caches: the new keys / values ``k`` /
    ``v`` ``[B, Hkv, S, d]`` quantized per tensor (``k_scale`` / ``v_scale`` ``[1]``) and appended
    to the codes ``past_k`` / ``past_v`` ``[B, Hkv, P, d]``; returns (output ``[B, H, S, d]``, the
    present codes)."""
    f = QuantFormat.parse(INT8_STATIC)
    zero = torch.zeros(1, dtype=torch.int32)
    pk = torch.cat([past_k, f.quantize(k.float(), k_scale, zero).codes], 2)
    pv = torch.cat([past_v, f.quantize(v.float(), v_scale, zero).codes], 2)
    rep = q.shape[1] // pk.shape[1]
    keys = (pk.float() * k_scale).repeat_interleave(rep, 1)
    values = (pv.float() * v_scale).repeat_interleave(rep, 1)
    p, s = past_k.shape[2], q.shape[2]
    mask = torch.ones(s, p + s, dtype=torch.bool, device=q.device).tril(p)
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), keys, values, attn_mask=mask, scale=scale)
    return out.to(q.dtype), pk, pv


@kv_int8_attention.register_fake
def _(q, k, v, past_k, past_v, k_scale, v_scale, scale):
    b, hk, p, d = past_k.shape
    s = q.shape[2]
    return (torch.empty_like(q), past_k.new_empty(b, hk, p + s, d), past_v.new_empty(b, hk, p + s, d))


KV_INT8_ATTENTION = torch.ops.finegrain.kv_int8_attention.default


def _int8_write(present: Node, gm: GraphModule):
    """``(past placeholder, new tokens, scale constant)`` when ``present`` is ``cat(past,
    dequantize(quantize(x, int8-tensor-sym-fp32, scale, zero)))``, else None."""
    from finegrain.backends.kv_packed import _quantized_present

    found = _quantized_present(present, gm)
    if found is None or found[2] != INT8_STATIC:
        return None
    past, q, _ = found
    return past, q.args[0], q.args[2]


def _attention(present: Node) -> tuple[Node | None, int]:
    """The one SDPA reading ``present`` through views (and how many other readers there are)."""
    found, others, todo = [], 0, [present]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.op == "call_function" and u.target is SDPA and n in u.args[1:3]:
                found.append(u)
            elif u.op == "call_function" and u.target in _VIEWS and u.args[0] is n:
                todo.append(u)
            elif u.op != "output":
                others += 1
    return (found[0] if len(found) == 1 else None), others


def sliding(cfg: dict | None, layer: int) -> bool:
    """Whether layer ``layer`` of a transformers config attends over a sliding window (its
    ``layer_types`` entry, else the config's ``sliding_window``)."""
    cfg = cfg if isinstance(cfg, dict) else {}  # the artifact's manifest: data, whatever it holds
    types = cfg.get("layer_types")
    if isinstance(types, list) and layer < len(types):
        return types[layer] != "full_attention"  # anything but a plain causal layer is not fused
    return bool(cfg.get("sliding_window") and cfg.get("use_sliding_window", True))


def fuse(gm: GraphModule, hf_config: dict | None = None) -> tuple[GraphModule, set[int], list[str]]:
    """A copy of KV-cache graph ``gm`` with each fusable layer's INT8 writes and attention as one
    ``kv_int8_attention`` (see the module docstring): ``(graph, indices of the past inputs now INT8,
    why the other static INT8 layers were not fused)``."""
    gm = copy.deepcopy(gm)
    g = gm.graph
    out = g.output_node()
    results = list(out.args[0])
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    layers: dict[int, dict] = {}  # outputs 1, 2, ..: layer 0's key, value, layer 1's .. (the KV-cache graph's
    for i, r in enumerate(results[1:], 1):  # contract; a loaded graph carries no KV meta)
        if isinstance(r, Node):
            layers.setdefault((i - 1) // 2, {})[("key", "value")[(i - 1) % 2]] = (i, r)
    int8, skipped = set(), []
    for layer, kinds in sorted(layers.items()):
        writes = {k: _int8_write(r, gm) for k, (_, r) in kinds.items()}
        if not all(writes.get(k) for k in ("key", "value")):
            if any(writes.values()):
                skipped.append(f"layer {layer}: keys and values are not both {INT8_STATIC}")
            continue
        if sliding(hf_config, layer):
            skipped.append(f"layer {layer}: sliding-window attention; GroupQueryAttention is fused only over plain "
                           "causal attention")
            continue
        (ki, kp), (vi, vp) = kinds["key"], kinds["value"]
        (att, ko), (att_v, vo) = _attention(kp), _attention(vp)
        if att is None or att is not att_v or ko or vo or att.kwargs.get("enable_gqa") or (
                len(att.args) > 4 and att.args[4]) or att.kwargs.get("dropout_p"):
            skipped.append(f"layer {layer}: its keys / values are read by something other than one attention")
            continue
        (pk, xk, sk), (pv, xv, sv) = writes["key"], writes["value"]
        q = att.args[0]
        d = int(q.meta["val"].shape[-1]) if q.meta.get("val") is not None else None
        scale = att.kwargs.get("scale") or (1 / d ** 0.5 if d else None)
        if scale is None:
            skipped.append(f"layer {layer}: the attention's head dim is unknown")
            continue
        with g.inserting_before(att):
            fused = g.call_function(KV_INT8_ATTENTION, (q, xk, xv, pk, pv, sk, sv, float(scale)))
            parts = [g.call_function(operator.getitem, (fused, j)) for j in range(3)]
        parts[0].meta = dict(att.meta)
        att.replace_all_uses_with(parts[0])
        results[ki], results[vi] = parts[1], parts[2]
        int8.update(placeholders.index(p) for p in (pk, pv))
    out.args = (tuple(results),)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm, int8, skipped


def translation(op):
    """The torch.onnx translation of ``kv_int8_attention``: a finegrain-domain ``KvInt8Attention``
    marker over GroupQueryAttention's layouts (``[B, S, heads * d]``, the past and total lengths),
    which ``backends/onnx.py`` lowers to the com.microsoft node."""
    import onnx

    from finegrain.backends.onnx import _marker_ops

    i32 = onnx.TensorProto.INT32

    def kv_int8_attention(q, k, v, past_k, past_v, k_scale, v_scale, scale: float):
        flat = op.Constant(value_ints=[0, 0, -1])

        def bsh(x):
            return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), flat)

        total64 = op.Add(op.Shape(past_k, start=2, end=3), op.Shape(q, start=2, end=3))  # [1] int64
        total = op.Cast(total64, to=i32)
        seqlens = op.Cast(op.Expand(op.Sub(total64, op.Constant(value_ints=[1])), op.Shape(q, start=0, end=1)),
                          to=i32)
        out, pk, pv = _marker_ops()["KvInt8Attention"](
            bsh(q), bsh(k), bsh(v), past_k, past_v, seqlens, op.Squeeze(total), k_scale, v_scale, scale=float(scale))
        heads_d = op.Concat(op.Shape(q, start=0, end=1), op.Shape(q, start=2, end=3), op.Shape(q, start=1, end=2),
                            op.Shape(q, start=3, end=4), axis=0)
        return op.Transpose(op.Reshape(out, heads_d), perm=[0, 2, 1, 3]), pk, pv

    return kv_int8_attention


def lower(graph, node) -> None:
    """Replace a ``KvInt8Attention`` marker by ``com.microsoft::GroupQueryAttention`` (INT8 cache,
    one scale per tensor; the heads from its inputs' static shapes)."""
    import onnx_ir as ir

    from finegrain.errors import ExportError

    q, k, _v, past_k, *_ = node.inputs
    d = past_k.shape[-1] if past_k.shape is not None else None
    hk = past_k.shape[1] if past_k.shape is not None else None
    hidden = q.shape[-1] if q.shape is not None else None
    if not all(isinstance(x, int) for x in (d, hk, hidden)):
        raise ExportError(f"ONNX node {node.name!r}: GroupQueryAttention needs static heads and head dim")
    q, k, v, pk, pv, seqlens, total, ks, vs = node.inputs
    attrs = {"num_heads": hidden // d, "kv_num_heads": hk, "scale": node.attributes["scale"].value,
             "k_quant_type": "PER_TENSOR", "v_quant_type": "PER_TENSOR", "kv_cache_bit_width": 8}
    new = ir.node("GroupQueryAttention", [q, k, v, pk, pv, seqlens, total, None, None, None, None, None, ks, vs],
                  attrs, domain="com.microsoft", num_outputs=3)
    graph.insert_before(node, new)
    for old, val in zip(node.outputs, new.outputs):
        val.type, val.shape = old.type, old.shape
        name = old.name
        ir.convenience.replace_all_uses_with(old, val, replace_graph_outputs=True)
        val.name = name
    graph.remove(node, safe=True)
