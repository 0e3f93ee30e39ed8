"""Normalize the exported graph before any analysis.

Removes ``aten._assert_tensor_metadata`` / ``_assert_scalar`` checks that ``torch.export`` leaves
behind (they return nothing and would pin dtypes that later passes legitimately change) and
inference-mode dropouts (``aten.dropout(x, p, train=False)`` is the identity, and would hide
dataflow such as a residual add from the graph analyses), rewrites mixture-of-experts grouped
matmuls over a transposed constant ``[E, N, K]`` (``transformers::grouped_mm_fallback``,
``aten._grouped_mm``) into ``finegrain::grouped_linear`` on the constant itself (so expert
weights are quantizable ops with a linear's layout), rewrites ``addmm(bias, x, W)`` over a
constant (GPT-2's Conv1D) into a linear on ``W^T``, turns ``type_as`` casts into ``to`` (or
nothing when the dtypes agree), then removes dead code.
Requires: a captured graph. Ensures: no assertion nodes; same function.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import get_tensor, set_tensor
from finegrain.compiler.ops import GROUPED_LINEAR

_GROUPED_MM = ("transformers.grouped_mm_fallback.default", "aten._grouped_mm.default")
_TRANSPOSE = {torch.ops.aten.transpose.int, torch.ops.aten.permute.default}
_ASSERTIONS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default}


def _expert_weight(node):
    """The ``[E, N, K]`` constant that ``node`` transposes to ``[E, K, N]``, else None."""
    if not (node.op == "call_function" and node.target in _TRANSPOSE and node.args[0].op == "get_attr"):
        return None
    if node.target is torch.ops.aten.transpose.int:
        ok = sorted(d % 3 for d in node.args[1:]) == [1, 2]
    else:
        ok = [d % 3 for d in node.args[1]] == [0, 2, 1]
    return node.args[0] if ok else None


def _grouped_mm(gm: GraphModule, node) -> None:
    x, w = node.args[0], node.args[1]
    offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    const = _expert_weight(w)
    if const is None or offs is None or len(node.args) > 3 or set(node.kwargs) - {"offs"}:
        return  # another layout (bias, scales, non-transposed weights): left as the model wrote it
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(GROUPED_LINEAR, (x, const, offs))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _type_as(gm: GraphModule, node) -> None:
    """``type_as(a, b)`` (a cast back to the input's dtype, as norms computing in fp32 end) reads
    ``b`` only for its dtype: it becomes ``to(a, dtype)``, a pass-through cast, or nothing when
    the dtypes already agree, so ``b`` (often a residual stream) gains no reader."""
    a, b = node.args[0], node.args[1]
    va, vb = a.meta.get("val"), b.meta.get("val")
    if vb is None:
        return
    if va is not None and va.dtype == vb.dtype:
        node.replace_all_uses_with(a)
    else:
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.aten.to.dtype, (a, vb.dtype))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _addmm(gm: GraphModule, node) -> None:
    """``addmm(bias, x, W)`` with a constant ``W [K, N]`` read by nothing else (GPT-2's Conv1D) is
    a linear with the transposed weight: store ``W^T`` under the same name and make it
    ``linear(x, W^T, bias)``, so it is found, quantized and folded like every linear."""
    bias, x, w = node.args[:3]
    if (len(node.args) > 3 or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1
            or not (w.op == "get_attr" and len(w.users) == 1)
            or not (bias is None or (bias.op == "get_attr" and len(bias.users) == 1))):
        return
    t = get_tensor(gm, w.target)
    if t.dim() != 2:
        return
    set_tensor(gm, w.target, t.T.contiguous())
    w.meta["val"] = torch.empty(t.shape[1], t.shape[0], dtype=t.dtype, device="meta")
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(torch.ops.aten.linear.default, (x, w, bias))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def canonicalize(gm: GraphModule, ctx: PassContext) -> GraphModule:
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and str(node.target) in _GROUPED_MM:
            _grouped_mm(gm, node)
        elif node.op == "call_function" and node.target in _ASSERTIONS and not node.users:
            gm.graph.erase_node(node)
        elif (node.op == "call_function" and node.target is torch.ops.aten.dropout.default
              and len(node.args) > 2 and node.args[2] is False):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.ops.aten.type_as.default:
            _type_as(gm, node)
        elif node.op == "call_function" and node.target is torch.ops.aten.addmm.default:
            _addmm(gm, node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
