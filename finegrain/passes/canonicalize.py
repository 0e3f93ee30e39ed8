"""Normalize the exported graph before any analysis.

Removes ``aten._assert_tensor_metadata`` / ``_assert_scalar`` checks that ``torch.export`` leaves
behind (they return nothing and would pin dtypes that later passes legitimately change) and
inference-mode dropouts (``aten.dropout(x, p, train=False)`` is the identity, and would hide
dataflow such as a residual add from the graph analyses), then removes dead code. Requires: a captured graph. Ensures: no assertion nodes; same function.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

_ASSERTIONS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default}


def canonicalize(gm: GraphModule, ctx) -> GraphModule:
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTIONS and not node.users:
            gm.graph.erase_node(node)
        elif (node.op == "call_function" and node.target is torch.ops.aten.dropout.default
              and len(node.args) > 2 and node.args[2] is False):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
