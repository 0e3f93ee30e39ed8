"""Choose a QuantFormat for every quantizable weight and activation.

From the recipe's rules (last matching rule wins; see ``compiler/recipe.py``), then, when the
recipe lists ``weight_candidates``, by bit allocation under a budget:

1. **Targets**: the linears a rule quantizes. Linears that read the same tensor (q/k/v; gate/up;
   found from the graph's dataflow, not from names) feed one fused kernel and form one *group*
   that gets one format. Mixture-of-experts grouped ops (``ir.py``, kind ``grouped``) give one
   target per expert (``recipe.expert_allocation="expert"``, named ``<weight>.<e>``) or one for
   all their experts (``"grouped"``).
2. **Candidates** per group: the recipe's formats, each with its exact cost: bits from
   ``QuantFormat.storage_bits`` for a bits-per-weight budget, stored bytes from
   ``QuantFormat.stored_bytes`` for a byte budget (the whole model's bytes, the fixed part
   included).
3. **Sensitivity** per group and candidate (``passes/sensitivity.py``): ``output`` (layer output
   error from the calibration Hessian; an expert's is ``dW_e X_e^T X_e dW_e^T / T`` over the
   rows routed to it, i.e. its Hessian weighted by its routing frequency, QuantMoE-Bench's
   weighting; an expert no calibration token reached counts 0) or ``fisher`` (predicted ΔNLL from
   the empirical Fisher, which weights experts by their routing through the gradients);
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
import warnings
from dataclasses import dataclass, field

from torch.fx import GraphModule

from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import (ACT_FORMAT, ROLE, WEIGHT_FORMAT, QuantOp, expert_formats, expert_key, get_tensor,
                                  quantizable_ops)
from finegrain.compiler.knapsack import Frontier, Point
from finegrain.errors import InputError, RecipeError
from finegrain.formats import QuantFormat


@dataclass(frozen=True)
class Target:
    """One allocated weight: a linear's, one expert's slice of a grouped op (``expert``), or all
    experts of a grouped op (``expert=None`` on a grouped op)."""

    op: QuantOp
    expert: int | None = None

    @property
    def name(self) -> str:
        return self.op.name if self.expert is None else f"{self.op.name}.{self.expert}"

    @property
    def slices(self) -> list[int | None]:
        """The ``[N, K]`` weights it covers: expert indices of a grouped op, else ``[None]``."""
        if self.op.kind != "grouped":
            return [None]
        return [self.expert] if self.expert is not None else list(range(self.op.experts))


@dataclass
class Allocation:
    """A bit-allocation instance and its solved frontier."""

    groups: list[list[Target]]  # fused groups (one format each)
    candidates: list[QuantFormat]
    unit: str  # "bits" or "bytes"
    costs: list[list[int]]
    values: list[list[float]]
    numel: int  # weights in the allocated linears
    shapes: dict[str, tuple[int, ...]]  # target name -> the [N, K] shape of each of its slices
    fixed_bytes: int  # stored bytes outside the allocated weights (for byte budgets)
    sensitivity: str
    frontier: Frontier
    solver_seconds: float
    chosen: Point | None = None
    budget: int | None = None
    extra: dict = field(default_factory=dict)

    def bits_per_weight(self, point: Point) -> float:
        bits = sum(self.candidates[i].storage_bits(self.shapes[t.name]) * len(t.slices)
                   for grp, i in zip(self.groups, point.picks) for t in grp)
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
                             "formats": {t.name: self.candidates[i].tag for grp, i in zip(self.groups, chosen.picks)
                                         for t in grp}}
        return out


def _groups(targets: list[QuantOp], expert_allocation: str) -> list[list[Target]]:
    by_input: dict[str, list[Target]] = {}
    for op in targets:
        if op.kind == "grouped" and expert_allocation == "expert":
            for e in range(op.experts):
                by_input[expert_key(op.activation.name, e)] = [Target(op, e)]
        else:
            by_input.setdefault(op.activation.name, []).append(Target(op))
    return list(by_input.values())


def slice_shape(gm: GraphModule, op: QuantOp) -> tuple[int, ...]:
    """Shape of one quantized weight of ``op``: its weight, or one expert's ``[N, K]``."""
    shape = tuple(get_tensor(gm, op.weight.target).shape)
    return shape[1:] if op.kind == "grouped" else shape


def _weight_slice(gm: GraphModule, op: QuantOp, expert: int | None):
    w = get_tensor(gm, op.weight.target)
    return w if expert is None else w[expert]


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
            total += sum(f.stored_bytes(slice_shape(gm, op)) for f in expert_formats(op))
    sites = {(op.activation.name, op.node.meta[ACT_FORMAT]) for op in ops
             if ACT_FORMAT in op.node.meta and not op.node.meta[ACT_FORMAT].dynamic}
    return total + 8 * len(sites)  # static activation scale (fp32) and zero point (int32)


def _hessian(ctx: PassContext, op: QuantOp, expert: int | None):
    """E[x x^T] of a linear's input; for an expert, its rows' X^T X over all calibration tokens
    (the expert's Hessian times its routing frequency); None for an expert no row reached."""
    key = op.activation.name if expert is None else expert_key(op.activation.name, expert)
    if expert is not None:
        if op.activation.name not in ctx.stats or ctx.stats.nodes[op.activation.name].xtx is None:
            raise InputError(f"{op.name}: sensitivity 'output' needs the calibration Hessians of the experts' "
                             f"inputs {op.activation.name!r}; pass calibration data")
        st = ctx.stats.nodes.get(key)
        return None if st is None else st.xtx / max(ctx.stats.tokens, 1)
    h = ctx.stats.hessian_of(key)
    if h is None:
        raise InputError(f"{op.name}: sensitivity 'output' needs the calibration Hessian of its input "
                         f"{key!r}; pass calibration data")
    return h


def build_allocation(gm: GraphModule, ctx: PassContext, targets: list[QuantOp], ops: list[QuantOp]) -> Allocation:
    from finegrain.passes import sensitivity as sens

    r = ctx.recipe
    cands = list(r.candidate_formats)
    groups = _groups(targets, r.expert_allocation)
    unit = "bytes" if r.budget_bytes is not None else "bits"
    shapes = {t.name: slice_shape(gm, t.op) for grp in groups for t in grp}
    costs = [[sum((c.stored_bytes(shapes[t.name]) if unit == "bytes" else c.storage_bits(shapes[t.name])) * len(t.slices)
                  for t in grp) for c in cands] for grp in groups]
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
        for t in grp:
            op = t.op
            for e in t.slices:
                w = _weight_slice(gm, op, e).float()
                if fisher is None:
                    h = _hessian(ctx, op, e)
                    if h is None:
                        continue  # an expert no calibration row reached: no predicted damage
                    damage = lambda dw, h=h: sens.output_error(dw, h)  # noqa: E731
                else:
                    fw = fisher[op.weight.target] if e is None else fisher[op.weight.target][e]
                    damage = lambda dw, fw=fw: sens.fisher_error(dw, fw)  # noqa: E731
                for i, c in enumerate(cands):
                    row[i] += damage(c.fake_quantize(w) - w)
        values.append(row)
    t0 = time.perf_counter()
    frontier = Frontier(costs, values)
    solve_s = time.perf_counter() - t0
    numel = sum(math.prod(shapes[t.name]) * len(t.slices) for grp in groups for t in grp)
    names = {op.name for op in targets}
    alloc = Allocation(groups, cands, unit, costs, values, numel, shapes,
                       _fixed_bytes(gm, ops, names) if unit == "bytes" else 0, kind, frontier, solve_s)
    routing = routing_frequency(ctx, [op for op in targets if op.kind == "grouped"])
    if routing:
        alloc.extra["routing"] = routing
    return alloc


def routing_frequency(ctx: PassContext, grouped: list[QuantOp]) -> dict[str, list[float]]:
    """Per grouped op, the fraction of calibration tokens routed to each expert (sums to top-k)."""
    tokens = ctx.stats.tokens
    out = {}
    for op in grouped:
        if tokens and op.activation.name in ctx.stats:
            out[op.name] = [round(ctx.stats.nodes[expert_key(op.activation.name, e)].count / tokens, 4)
                            if expert_key(op.activation.name, e) in ctx.stats else 0.0 for e in range(op.experts)]
    return out


def apply_point(alloc: Allocation, point: Point, gm: GraphModule | None = None) -> None:
    """Set each allocated op's weight format to its pick at ``point``; on ``gm``, a copy of the
    allocated graph, the ops are found by node name."""
    nodes = None if gm is None else {n.name: n for n in gm.graph.nodes}
    per_expert: dict = {}
    for grp, i in zip(alloc.groups, point.picks):
        for t in grp:
            node = t.op.node if nodes is None else nodes[t.op.node.name]
            if t.expert is None:
                node.meta[WEIGHT_FORMAT] = alloc.candidates[i]
            else:
                per_expert.setdefault(node, [None] * t.op.experts)[t.expert] = alloc.candidates[i]
    for node, fmts in per_expert.items():
        node.meta[WEIGHT_FORMAT] = tuple(fmts)


def check_rule_coverage(ops: list, ctx: PassContext) -> None:
    """A rule that matches no op, or a recipe that quantizes nothing, is a warning in the report
    (``ctx.report["warnings"]``, the manifest, the terminal) or, with ``ctx.strict_recipe``, an error."""
    from finegrain.compiler.recipe import PRESETS

    rules = ctx.recipe.rules
    preset = PRESETS.get(ctx.recipe.name) == ctx.recipe  # a preset's rules are broad by design: not per rule
    problems = [f"rules[{i}] (role={r.role!r}, pattern={r.pattern!r}) matches no layer of the model"
                for i, r in enumerate(rules) if not preset and not any(r.matches(op.role, op.name or "") for op in ops)]
    r = ctx.recipe  # a KV-only recipe quantizes the cache: not "nothing"
    if not r.kv_formats and not any(f != (None, None) for f in (r.formats_for(op.role, op.name or "") for op in ops)):
        problems.append(f"recipe {ctx.recipe.name!r} quantizes nothing in this model ({len(ops)} quantizable ops, "
                        f"roles {sorted({op.role for op in ops})})")
    left = {}  # conv / recurrent weights no rule quantizes: said, as a linear's would be by the rules
    for op in ops:
        if op.kind in ("conv", "recurrent") and op.weight is not None and \
                ctx.recipe.formats_for(op.role, op.name or "")[0] is None:
            n, numel = left.get(op.role, (0, 0))
            left[op.role] = (n + 1, numel + get_tensor(op.node.graph.owning_module, op.weight.target).numel())
    for role, (n, numel) in sorted(left.items()):
        problems.append(f"{n} {role} weight(s) ({numel} weights) stay float: recipe {ctx.recipe.name!r} has no rule for "
                        f"role {role!r} (the *-conv presets quantize them)")
    if problems and getattr(ctx, "strict_recipe", False):
        raise RecipeError("; ".join(problems) + " (strict mode)")
    for p in problems:
        warnings.warn(p, stacklevel=2)
    ctx.report.setdefault("warnings", []).extend(problems)


def allocate_bits(gm: GraphModule, ctx: PassContext) -> GraphModule:
    ops = quantizable_ops(gm)
    targets = []
    if ctx.check_rules:
        check_rule_coverage(ops, ctx)
    for op in ops:
        op.node.meta[ROLE] = op.role
        wfmt, afmt = ctx.recipe.formats_for(op.role, op.name)
        if (wfmt is not None or afmt is not None) and op.kind not in ("linear", "grouped", "embedding", "conv",
                                                                      "recurrent"):
            raise RecipeError(f"{op.name}: the recipe quantizes this {op.kind} op, which finegrain does not "
                              "support yet; narrow the rule's role/pattern to linear / conv layers")
        if op.kind == "conv" and afmt is not None and afmt.granularity != "tensor":
            raise RecipeError(f"{op.name}: activation format {afmt.tag} on a conv input [N, C, ...]: only per-tensor "
                              "activation formats apply to convolutions")
        if op.kind == "conv" and wfmt is not None and op.weight is None:
            raise RecipeError(f"{op.name}: the conv's weight is not a constant; nothing to quantize offline")
        if wfmt is not None and op.weight is not None:
            w = get_tensor(gm, op.weight.target)
            if op.kind != "conv" and w.dim() != (3 if op.kind == "grouped" else 2):
                raise RecipeError(f"{op.name}: weight {op.weight_fqn} has shape {tuple(w.shape)}; weight formats "
                                  "cover 2-D [N, K] weights (3-D [E, N, K] for experts) only")
            op.node.meta[WEIGHT_FORMAT] = wfmt
            if op.kind in ("linear", "grouped"):
                targets.append(op)
        if afmt is not None and op.kind not in ("embedding", "recurrent"):  # token ids / no input of its own
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
