"""Fold the KV cache's value rotation into ``v_proj`` and ``o_proj`` (``recipe.kv_rotate``; QuaRot's
R2, RotateKV's values), exactly, before calibration and weight quantization.

``kv_rotate`` stores every head's values rotated, ``v H`` (``H``: the normalized Walsh-Hadamard
matrix over the head dim, symmetric and its own inverse), so the attention output of each head is
``P v H`` and must be rotated back before ``o_proj``. Both rotations are linear maps on the head
dim next to a linear layer, so instead of two online Hadamard ops per layer:

* ``v_proj``'s output rows of each head ``j`` become ``H W[jD:(j+1)D]`` (and its bias ``H b``): the
  projection writes rotated values (a fused ``qkv_proj`` only in its value slice);
* ``o_proj``'s input columns of each head ``j`` become ``W[:, jD:(j+1)D] H``: it reads the rotated
  attention output, ``(P v H)(W H)^T = (P v) W^T``.

The fold needs the value to reach the cache from the linear through views, transposes and a slice
of the last dim only (heads contiguous blocks of ``D`` features), and each attention output to reach
a linear through views / transposes merging ``(heads, D)``, every step read by nothing else. A
layer where that does not hold is logged as skipped in the manifest's folds and ``quantize_kv``
rotates its values online, as before. A folded layer's value present carries ``VALUE_ROTATED`` in
its meta: ``quantize_kv`` then adds no Hadamard for that layer's values nor its attention output
(the keys, rotated around RoPE, stay online).

Requires: a KV-cache graph (``compile(kv_cache=True)``); runs after ``fold_norms`` and before
``fold_rotation`` (whose online Hadamard on ``o_proj``'s input would otherwise sit between the
attention output and the weight; both transforms act on different sides of the weights and commute).
Ensures: the graph computes what it did, with the values and attention outputs in the rotated basis.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import KV
from finegrain.compiler.regions import linear_bias, linear_weight, module_name, set_linear_bias, set_linear_weight
from finegrain.formats.hadamard import apply_hadamard
from finegrain.passes.quantize_kv import VALUE_ROTATED, attentions_reading

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SAME = {aten.contiguous.default, aten.clone.default, aten.alias.default}


def _shape(n: Node) -> tuple | None:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None  # not a list (a split's outputs)


def _keeps_last(n: Node) -> bool:
    """``n`` moves whole vectors of the last dim around (a transpose / permute not touching it, a
    copy, a view whose input and output end in the same dim)."""
    if n.target in _SAME:
        return True
    src, out = _shape(n.args[0]), _shape(n)
    if src is None or out is None:
        return False
    if n.target is aten.transpose.int:
        last = len(src) - 1
        return all(int(d) % len(src) != last for d in n.args[1:3])
    if n.target is aten.permute.default:
        return int(n.args[1][-1]) % len(src) == len(src) - 1
    return n.target in _VIEWS and src[-1] == out[-1]


def _feature_slice(n: Node) -> tuple[int, int] | None:
    """``[start, end)`` of the last dim that ``n`` (an ``aten.slice`` with step 1) takes, else None."""
    if not isinstance(n, Node) or n.target is not aten.slice.Tensor or _shape(n.args[0]) is None:
        return None
    rank, width = len(_shape(n.args[0])), _shape(n.args[0])[-1]
    dim, start, end, step = (list(n.args[1:]) + [0, None, None, 1][len(n.args) - 1:])[:4]
    if int(dim) % rank != rank - 1 or step != 1 or not isinstance(start or 0, int) or not isinstance(end or 0, int):
        return None
    start = int(start or 0) % width if (start or 0) < 0 else int(start or 0)
    end = width if end is None else min(int(end) % width if end < 0 else int(end), width)
    return start, end


def _value_linear(new: Node, d: int, rows: int) -> tuple[Node, int] | str:
    """(the linear writing the value ``new``, the first of its ``rows`` value features), or why not."""
    n = new
    while True:
        if not isinstance(n, Node) or n.op != "call_function":
            return f"the value comes from {getattr(n, 'name', n)}, not a linear"
        if len(n.users) != 1:
            return f"{n.name} has {len(n.users)} readers"
        src = n.args[0]
        if _keeps_last(n):
            n = src
            continue
        if n.target in _VIEWS and _shape(n) and _shape(src) and _shape(n)[-1] == d and _shape(src)[-1] == rows:
            break  # the split of the projection's value features into (heads, d): blocks of d
        if n.target is operator.getitem:
            return f"the value is {n.name}, one output of {getattr(src, 'name', src)} ({getattr(src, 'target', '?')})"
        return f"{n.name} ({n.target}) reshapes the head dim"
    feat, offset = n.args[0], 0
    if len(feat.users) != 1:
        return f"{feat.name} has {len(feat.users)} readers"
    if feat.target is aten.slice.Tensor:  # a fused qkv projection: the value rows are one slice of it
        lin = feat.args[0]
        span = _feature_slice(feat)
        if span is None:
            return f"{feat.name} slices another dim than the features"
        offset = span[0]
        for u in lin.users:  # the other readers must be slices of other features
            other = _feature_slice(u) if u is not feat else None
            if u is not feat and (other is None or (other[0] < span[1] and span[0] < other[1])):
                return f"{lin.name} is read by {u.name} besides its value slice"
        feat = lin
    if feat.target is not aten.linear.default or feat.args[1].op != "get_attr":
        return f"the value comes from {feat.name} ({feat.target}), not a linear with a constant weight"
    return feat, offset


def _output_linear(att: Node, d: int) -> Node | str:
    """The linear reading the attention output ``att`` (heads merged into its input features), or why not."""
    n = att
    while True:
        if len(n.users) != 1:
            return f"{n.name} has {len(n.users)} readers"
        u = next(iter(n.users))
        if u.op != "call_function" or u.args[0] is not n:
            return f"{n.name} is read by {u.name}"
        if u.target is aten.linear.default:
            if _shape(n) and _shape(n)[-1] % d == 0 and u.args[1].op == "get_attr":
                return u
            return f"{u.name} reads the attention output without its heads merged"
        if not _keeps_last(u) and not (u.target in _VIEWS and _shape(n)[-1] == d and _shape(u)[-1] % d == 0):
            return f"{u.name} ({u.target}) rearranges the head dim"
        n = u


def fold_kv_rotation(gm: GraphModule, ctx: PassContext) -> GraphModule:
    if not ctx.recipe.kv_rotate:
        return gm
    log = ctx.report.setdefault("folds", [])
    folded = 0
    for pres in [n for n in gm.graph.nodes if KV in n.meta and n.meta[KV]["kind"] == "value"]:
        where = f"layer {pres.meta[KV]['layer']} values (node {pres.name})"
        if pres.target is not aten.cat.default or len(pres.args[0]) != 2 or _shape(pres) is None:
            continue  # quantize_kv names this
        d = int(_shape(pres)[-1])
        if d & (d - 1):
            continue  # not rotated at all (quantize_kv reports it)
        rows = _shape(pres)[1] * d  # the kv heads' value features
        v = _value_linear(pres.args[0][-1], d, rows)
        atts = attentions_reading(pres)
        outs = [_output_linear(a, d) for a in atts] or ["no attention reads the values"]
        why = v if isinstance(v, str) else next((o for o in outs if isinstance(o, str)), None)
        if why is not None:
            log.append({"pass": "fold_kv_rotation", "site": where, "action": "skipped",
                        "detail": f"{why}: the values are rotated online"})
            continue
        h = apply_hadamard(torch.eye(d, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
        lin, offset = v
        w = linear_weight(gm, lin).double()
        blocks = w[offset:offset + rows].reshape(-1, d, w.shape[1])
        w[offset:offset + rows] = torch.einsum("ij,hjk->hik", h, blocks).reshape(rows, -1)
        set_linear_weight(gm, lin, w)
        b = linear_bias(gm, lin)
        if b is not None:
            b = b.double()
            b[offset:offset + rows] = (b[offset:offset + rows].reshape(-1, d) @ h).reshape(-1)
            set_linear_bias(gm, lin, b)
        for o in dict.fromkeys(outs):
            wo = linear_weight(gm, o).double()
            set_linear_weight(gm, o, (wo.reshape(wo.shape[0], -1, d) @ h).reshape(wo.shape))
        pres.meta[VALUE_ROTATED] = True
        folded += 1
        log.append({"pass": "fold_kv_rotation", "site": where, "action": "folded",
                    "detail": f"the values' Hadamard into {module_name(lin)} (rows {offset}..{offset + rows}) and the "
                              f"attention output's into {', '.join(module_name(o) for o in dict.fromkeys(outs))}"})
    if folded:
        gm.recompile()
    return gm
