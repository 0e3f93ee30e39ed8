"""Calibration: run calibration batches once and fill the stats store.

Observes the activation input of every quantizable op (shared inputs, e.g. q/k/v's, once) with
per-channel min / max / absmax / E[x^2] (channels: the last dim; dim 1 of a convolution's input) and a bounded sample for percentiles
(``compiler/stats.py``). The input of a grouped (MoE) op is also observed per expert, under
``ir.expert_key(node, e)``, from the rows its offsets give expert ``e``: per-expert Hessians for
GPTQ / clip search / allocation and the routing frequency (rows per expert) for allocation. The graph is truncated after the last observed node, so ops that no
statistic needs (e.g. a float LM head over a 49k vocabulary) are not run.

Requires: ``ctx.calibration`` (a list of input tuples). Ensures: ``ctx.stats`` holds an entry for
every observed node (keyed by node name) and those nodes carry ``meta[OBSERVED]``. The input
graph is not modified (the instrumented copy is discarded).
"""
from __future__ import annotations

import copy

import torch
from torch.fx import GraphModule

from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import OBSERVED, expert_key, get_tensor, quantizable_ops, set_tensor
from finegrain.errors import InputError


class _Observer(torch.nn.Module):
    def __init__(self, ctx: PassContext, key: str, layer: str, channels_first: bool = False):
        super().__init__()
        self.ctx, self.key, self.layer, self.channels_first = ctx, key, layer, channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise InputError(f"calibration activation at node {self.key!r} (input of {self.layer}) contains "
                             "NaN or Inf; check the calibration data and the weights feeding this layer")
        # a conv's input [N, C, ...]: channels to the last dim, so statistics are per channel whatever the size
        self.ctx.stats.update(self.key, x.movedim(1, -1) if self.channels_first else x)
        return x.new_empty(0)


class _ExpertObserver(_Observer):
    """Observes a grouped op's input as a whole and per expert (rows split by its offsets)."""

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        super().forward(x)
        self.ctx.stats.grouped.add(self.key)
        start = 0
        for e, end in enumerate(offsets.tolist()):
            if end > start:
                self.ctx.stats.update(expert_key(self.key, e), x[start:end])
            start = end
        return x.new_empty(0)


def _instrumented(gm: GraphModule, ctx) -> tuple[GraphModule, list[str]]:
    targets = {}
    for op in quantizable_ops(gm):
        a = op.activation
        if op.kind not in ("embedding", "recurrent") and a.name not in targets:
            targets[a.name] = (op.name, op.node if op.kind == "grouped" else None, op.kind == "conv")
    if not targets:
        return None, []
    root = torch.nn.Module()
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    outs = []
    for i, (name, (layer, grouped, channels_first)) in enumerate(targets.items()):
        node = by_name[name]
        if grouped is None:
            root.add_module(f"obs{i}", _Observer(ctx, name, layer, channels_first))
            with graph.inserting_after(node):
                outs.append(graph.call_module(f"obs{i}", (node,)))
        else:  # x and its offsets both exist just before the grouped op
            root.add_module(f"obs{i}", _ExpertObserver(ctx, name, layer))
            with graph.inserting_before(by_name[grouped.name]):
                outs.append(graph.call_module(f"obs{i}", (node, by_name[grouped.args[2].name])))
    out_node = next(n for n in graph.nodes if n.op == "output")
    out_node.args = (tuple(outs),)
    for n in graph.nodes:  # constants are shared, not copied
        if n.op == "get_attr":
            set_tensor(root, n.target, get_tensor(gm, n.target))
    inst = GraphModule(root, graph)
    inst.graph.eliminate_dead_code()  # drops everything after the last observer
    inst.recompile()
    return inst, list(targets)


def calibrate(gm: GraphModule, ctx: PassContext, all_batches: bool = False) -> GraphModule:
    """Run ``ctx.calibration`` (its first ``recipe.float_calibration_samples`` batches unless
    ``all_batches``) through an observed copy of ``gm``; fill ``ctx.stats``. Skipped when no pass
    reads the float model's statistics (``Recipe.needs_float_calibration``)."""
    if not ctx.calibration or not ctx.recipe.needs_float_calibration:
        return gm
    inst, keys = _instrumented(gm, ctx)
    if inst is None:
        return gm
    first = ctx.recipe.float_calibration_samples
    batches = list(ctx.calibration) if all_batches or not first else list(ctx.calibration)[:first]
    with torch.inference_mode():
        for batch in ctx.progress(batches, desc="calibrate"):
            inst(*batch)
    for n in gm.graph.nodes:
        if n.name in keys:
            n.meta[OBSERVED] = True
    return gm


def recalibrate(gm: GraphModule, ctx: PassContext) -> GraphModule:
    """Refill the stats store after a fold emptied it (the activations it described changed), when
    a later pass needs statistics (static activation scales, Hessians of a non-sequential GPTQ / clip
    search or of bit allocation).
    Otherwise a no-op."""
    if ctx.stats.nodes or not ctx.calibration or not (ctx.recipe.needs_static_stats or ctx.recipe.needs_float_hessian):
        return gm
    return calibrate(gm, ctx, all_batches=True)
