"""Node-by-node execution of a graph over all calibration batches at once.

``replay`` runs the nodes a set of target ops depends on in graph order, each node over every
batch before the next node starts, and frees each value after its last reader ran. Before a
target runs, a hook sees the inputs of that target over all batches (already computed by the
upstream ops as they are *now*) and may replace some of the target's inputs (its weight) for
every batch. This is what sequential quantization needs (``passes/quantize_weights.py``): each
weight is quantized on the activations the already-quantized ops upstream produce, then its
quantized weight feeds the ops downstream.

Memory: the live values of the graph's frontier times the number of batches (for a decoder, a few
residual-stream tensors of ``tokens x hidden``), never the whole model's activations; the
ops after the last target (a float LM head) are not run.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from finegrain.compiler.ir import get_tensor

Hook = Callable[[Node, Callable[[Node], list]], dict]


class _Shared:
    """A value that is the same for every batch (a constant)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _ancestors(targets: Iterable[Node]) -> set[Node]:
    seen, stack = set(), list(targets)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def replay(gm: GraphModule, batches: Sequence[tuple], targets: Sequence[Node], hook: Hook) -> None:
    """Run the ancestors of ``targets`` (targets included) over ``batches``; call ``hook(target,
    values)`` before each target runs, where ``values(node)`` is that node's per-batch outputs.
    The hook returns ``{input_node: tensor}`` replacing those inputs of the target for all batches,
    or ``{input_node: [tensor per batch]}``."""
    needed = _ancestors(targets)
    order = [n for n in gm.graph.nodes if n in needed]
    target_set = set(targets)
    last = {}
    for i, n in enumerate(order):
        for a in n.all_input_nodes:
            last[a] = i
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    slot = {n: i for i, n in enumerate(placeholders)}
    env: dict[Node, object] = {}
    nb = len(batches)

    def per_batch(node: Node) -> list:
        v = env[node]
        return [v.value] * nb if isinstance(v, _Shared) else v

    with torch.inference_mode():
        for i, n in enumerate(order):
            if n.op == "placeholder":
                env[n] = [b[slot[n]] for b in batches]
            elif n.op == "get_attr":
                env[n] = _Shared(get_tensor(gm, n.target))
            elif n.op in ("call_function", "call_method", "call_module"):
                subst = hook(n, per_batch) if n in target_set else {}
                subst = {k: v if isinstance(v, list) else _Shared(v) for k, v in (subst or {}).items()}

                def pick(b: int):
                    def get(a: Node):
                        v = subst.get(a, env[a])
                        return v.value if isinstance(v, _Shared) else v[b]
                    return get

                if all(isinstance(subst.get(a, env[a]), _Shared) for a in n.all_input_nodes):  # constant folding
                    args, kwargs = map_arg(n.args, pick(0)), map_arg(n.kwargs, pick(0))
                    env[n] = _Shared(_call(gm, n, args, kwargs))
                else:
                    out = []
                    for b in range(nb):
                        args, kwargs = map_arg(n.args, pick(b)), map_arg(n.kwargs, pick(b))
                        out.append(_call(gm, n, args, kwargs))
                    env[n] = out
            else:  # output: never an ancestor of a target
                continue
            if n not in last:  # nothing in ``order`` reads it (the last targets)
                del env[n]
            for a in n.all_input_nodes:
                if last.get(a) == i:
                    del env[a]


def _call(gm: GraphModule, n: Node, args, kwargs):
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, n.target)(*rest, **kwargs)
    return gm.get_submodule(n.target)(*args, **kwargs)
