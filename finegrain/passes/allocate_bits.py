"""Choose a QuantFormat for every quantizable weight and activation.

From the recipe's rules (last matching rule wins; see ``compiler/recipe.py``), then, when the
recipe lists ``weight_candidates``, by bit allocation under a budget:

1. **Targets**: the linears a rule quantizes. Linears that read the same tensor (q/k/v; gate/up;
   found from the graph's dataflow, not from names) feed one fused kernel and form one *group*
   that gets one format.
2. **Candidates** per group: the recipe's formats, each with its exact cost: bits from
   ``QuantFormat.storage_bits`` for a bits-per-weight budget, stored bytes from
   ``QuantFormat.stored_bytes`` for a byte budget (the whole model's bytes, the fixed part
   included).
3. **Sensitivity** per group and candidate (``passes/sensitivity.py``): ``output`` (layer output
   error from the calibration Hessian) or ``fisher`` (predicted ΔNLL from the empirical Fisher);
   ``auto`` (default) takes ``fisher`` for causal LMs: on SmolLM2 its ranking of single-layer
   damage matched the measured ΔNLL (Spearman 0.83 over 8 groups) where ``output`` did not (0.17).
4. **Solver**: the exact multiple-choice knapsack DP of ``compiler/knapsack.py``, giving the whole
   Pareto frontier (cost vs summed sensitivity) at once; the budget picks one point.

Requires: stats with ``X^T X`` (``output``) or calibration batches (``fisher``).
Ensures: each quantizable op carries ``meta[ROLE]`` and, where the recipe quantizes it,
``meta[WEIGHT_FORMAT]`` / ``meta[ACT_FORMAT]``; ``ctx.allocation`` (the :class:`Allocation`) and
``ctx.report["allocation"]`` when candidates were given. A rule that would quantize what the
formats do not cover yet (weights of matmul/conv ops; activations of anything but a linear) is
refused with the op's name rather than done wrong.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from torch.fx import GraphModule

from finegrain.compiler.ir import ACT_FORMAT, ROLE, WEIGHT_FORMAT, QuantOp, get_tensor, quantizable_ops
from finegrain.compiler.knapsack import Frontier, Point
from finegrain.errors import InputError, RecipeError
from finegrain.formats import QuantFormat


@dataclass
class Allocation:
    """A bit-allocation instance and its solved frontier."""

    groups: list[list[QuantOp]]  # fused groups of linears (one format each)
    candidates: list[QuantFormat]
    unit: str  # "bits" or "bytes"
    costs: list[list[int]]
    values: list[list[float]]
    numel: int  # weights in the allocated linears
    shapes: dict[str, tuple[int, ...]]  # op name -> weight shape
    fixed_bytes: int  # stored bytes outside the allocated weights (for byte budgets)
    sensitivity: str
    frontier: Frontier
    solver_seconds: float
    chosen: Point | None = None
    budget: int | None = None
    extra: dict = field(default_factory=dict)

    def bits_per_weight(self, point: Point) -> float:
        bits = sum(self.candidates[i].storage_bits(self.shapes[op.name]) for grp, i in zip(self.groups, point.picks)
                   for op in grp)
        return bits / self.numel

    def point_for_bits(self, bpw: float) -> Point:
        if self.unit != "bits":
            raise ValueError("this allocation was solved in bytes")
        return self.frontier.best(math.floor(bpw * self.numel))

    def summary(self, chosen: Point | None = None, budget: int | None = None, max_points: int = 256) -> dict:
        """JSON-ready record (the manifest's ``allocation``) of ``chosen`` (default: the point the
        recipe's budget picked); the frontier thinned to at most ``max_points`` points, evenly
        spaced in rank (first and last kept)."""
        chosen, budget = (self.chosen, self.budget) if chosen is None else (chosen, budget)
        pts = self.frontier.points()
        if len(pts) > max_points:
            pts = [pts[round(i * (len(pts) - 1) / (max_points - 1))] for i in range(max_points)]
        out = {"sensitivity": self.sensitivity, "unit": self.unit, "groups": len(self.groups),
               "candidates": [c.tag for c in self.candidates], "weights": self.numel,
               "solver_seconds": round(self.solver_seconds, 3), "solver_resolution": self.frontier.unit,
               "frontier_points": len(self.frontier.points()),
               "frontier": [{"cost": p.cost, "bits_per_weight": round(self.bits_per_weight(p), 4),
                             "predicted": p.value} for p in pts], **self.extra}
        if chosen is not None:
            out["budget"] = budget
            out["chosen"] = {"cost": chosen.cost, "predicted": chosen.value,
                             "bits_per_weight": round(self.bits_per_weight(chosen), 4),
                             "formats": {op.name: self.candidates[i].tag for grp, i in zip(self.groups, chosen.picks)
                                         for op in grp}}
        return out


def _groups(targets: list[QuantOp]) -> list[list[QuantOp]]:
    by_input: dict[str, list[QuantOp]] = {}
    for op in targets:
        by_input.setdefault(op.activation.name, []).append(op)
    return list(by_input.values())


def _fixed_bytes(gm: GraphModule, ops: list[QuantOp], allocated: set[str]) -> int:
    """Stored bytes of everything but the allocated weights, as insert_qdq will leave them."""
    used = {id(t): t for t in (get_tensor(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr")}
    total = sum(t.numel() * t.element_size() for t in used.values())  # unread buffers are dropped later
    quantized = {op.node for op in ops if WEIGHT_FORMAT in op.node.meta or op.name in allocated}
    for op in ops:
        if op.node not in quantized or op.weight is None:
            continue
        if all(u in quantized for u in op.weight.users):  # the float weight goes away
            w = get_tensor(gm, op.weight.target)
            total -= w.numel() * w.element_size()
        if op.name not in allocated:
            total += op.node.meta[WEIGHT_FORMAT].stored_bytes(tuple(get_tensor(gm, op.weight.target).shape))
    sites = {(op.activation.name, op.node.meta[ACT_FORMAT]) for op in ops
             if ACT_FORMAT in op.node.meta and not op.node.meta[ACT_FORMAT].dynamic}
    return total + 8 * len(sites)  # static activation scale (fp32) and zero point (int32)


def build_allocation(gm: GraphModule, ctx, targets: list[QuantOp], ops: list[QuantOp]) -> Allocation:
    from finegrain.passes import sensitivity as sens

    r = ctx.recipe
    cands = list(r.candidate_formats)
    groups = _groups(targets)
    unit = "bytes" if r.budget_bytes is not None else "bits"
    shapes = {op.name: tuple(get_tensor(gm, op.weight.target).shape) for op in targets}
    costs = [[sum(c.stored_bytes(shapes[op.name]) if unit == "bytes" else c.storage_bits(shapes[op.name]) for op in grp)
              for c in cands] for grp in groups]
    kind = r.sensitivity
    if kind == "auto":
        kind = "fisher" if sens.fisher_applies(gm) and ctx.calibration else "output"
    fisher = None
    if kind == "fisher":
        if not ctx.calibration:
            raise InputError("sensitivity 'fisher' needs calibration batches")
        fisher = sens.fisher_diagonal(gm, ctx.calibration, sorted({op.weight.target for op in targets}), ctx.progress)
    values = []
    for grp in ctx.progress(groups, desc=f"sensitivity ({kind})"):
        row = [0.0] * len(cands)
        for op in grp:
            w = get_tensor(gm, op.weight.target).float()
            if fisher is None:
                h = ctx.stats.hessian_of(op.activation.name)
                if h is None:
                    raise InputError(f"{op.name}: sensitivity 'output' needs the calibration Hessian of its input "
                                     f"{op.activation.name!r}; pass calibration data")
            for i, c in enumerate(cands):
                dw = c.fake_quantize(w) - w
                row[i] += sens.output_error(dw, h) if fisher is None else sens.fisher_error(dw, fisher[op.weight.target])
        values.append(row)
    t0 = time.perf_counter()
    frontier = Frontier(costs, values)
    solve_s = time.perf_counter() - t0
    numel = sum(math.prod(shapes[op.name]) for op in targets)
    names = {op.name for op in targets}
    return Allocation(groups, cands, unit, costs, values, numel, shapes,
                      _fixed_bytes(gm, ops, names) if unit == "bytes" else 0, kind, frontier, solve_s)


def apply_point(alloc: Allocation, point: Point, gm: GraphModule | None = None) -> None:
    """Set each allocated op's weight format to its pick at ``point``; on ``gm``, a copy of the
    allocated graph, the ops are found by node name."""
    nodes = None if gm is None else {n.name: n for n in gm.graph.nodes}
    for grp, i in zip(alloc.groups, point.picks):
        for op in grp:
            (op.node if nodes is None else nodes[op.node.name]).meta[WEIGHT_FORMAT] = alloc.candidates[i]


def allocate_bits(gm: GraphModule, ctx) -> GraphModule:
    ops = quantizable_ops(gm)
    targets = []
    for op in ops:
        op.node.meta[ROLE] = op.role
        wfmt, afmt = ctx.recipe.formats_for(op.role, op.name)
        if (wfmt is not None or afmt is not None) and op.kind not in ("linear", "embedding"):
            raise RecipeError(f"{op.name}: the recipe quantizes this {op.kind} op, which finegrain does not "
                              "support yet; narrow the rule's role/pattern to linear layers")
        if wfmt is not None and op.weight is not None:
            w = get_tensor(gm, op.weight.target)
            if w.dim() != 2:
                raise RecipeError(f"{op.name}: weight {op.weight_fqn} has shape {tuple(w.shape)}; weight formats "
                                  "cover 2-D [N, K] weights only")
            op.node.meta[WEIGHT_FORMAT] = wfmt
            if op.kind == "linear":
                targets.append(op)
        if afmt is not None and op.kind != "embedding":  # an embedding's input is token ids
            op.node.meta[ACT_FORMAT] = afmt
    r = ctx.recipe
    if not r.weight_candidates:
        return gm
    if not targets:
        raise RecipeError("weight_candidates: no linear layer is quantized by the recipe's rules, nothing to allocate")
    alloc = build_allocation(gm, ctx, targets, ops)
    if r.budget_bits is not None or r.budget_bytes is not None:
        if r.budget_bits is not None:
            budget = math.floor(r.budget_bits * alloc.numel)
            what = f"budget_bits={r.budget_bits}"
        else:
            budget = r.budget_bytes - alloc.fixed_bytes
            what = f"budget_bytes={r.budget_bytes} ({alloc.fixed_bytes} of them outside the allocated weights)"
        try:
            alloc.chosen = alloc.frontier.best(budget)
        except ValueError:
            cheapest = min(alloc.candidates, key=lambda c: c.bits_per_element())
            raise RecipeError(f"{what}: below the cheapest allocation (every linear in {cheapest.tag}: "
                              f"{alloc.frontier.min_cost} {alloc.unit})") from None
        alloc.budget = budget
        apply_point(alloc, alloc.chosen)
    ctx.allocation = alloc
    ctx.report["allocation"] = alloc.summary()
    return gm
