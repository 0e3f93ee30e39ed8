"""Migrate activation outliers into weights: SmoothQuant scales, Outlier Suppression+ shift and
scales. Exact in floating point.

For an activation X read by linears W_i (b_i), a per-channel shift z and scale s give
X' = (X - z) diag(s)^-1 and
    X W_i^T + b_i = X' (W_i diag(s))^T + (b_i + W_i z),
so the consumers get W_i' = W_i diag(s), b_i' = b_i + W_i z, and the producer of X absorbs
(X - z) / s: a norm's affine weight and bias (g' = g / s, beta' = (beta - z) / s), a previous
linear's rows and bias (W_p' = diag(s)^-1 W_p, b_p' = (b_p - z) / s), or, for an elementwise
product with a linear (SwiGLU's up_proj), that linear's rows (scale only, z = 0). A weightless
norm (after ``fold_norms`` / ``fold_rotation``) gets a ``mul`` (and ``add``) by constants, the one
case where nodes are added. Producers are found from the graph; anything else (attention
output, a non-linear activation) is refused with the op named.

* ``smoothquant`` (Xiao et al. 2023, Eq. 4): s_j = max|X_j|^a / max_i max|W_i[:, j]|^(1-a), z = 0.
* ``os+`` (Wei et al. 2023, Sec. 4): z_j = (max X_j + min X_j) / 2 and s_j = max(1, r_j / t) with
  r_j = (max X_j - min X_j) / 2: channels whose shifted range exceeds t are scaled into it.

* ``awq`` (Lin et al. 2024, activation-aware weight quantization, Sec. 3.2): s_j = mean|X_j|^a,
  normalized by sqrt(max s min s), a on a grid 0, 0.05 .. 0.95, chosen per site to minimize the
  consumers' output error with their *weight* formats (activations as the recipe has them, float
  for W4A16); for weight-only recipes, where the other two methods do not apply. Sites are the
  linears that share an input (q/k/v at their norm, gate/up at theirs, down_proj at up_proj);
  o_proj's input comes out of attention and is refused, as AutoAWQ does under GQA. Weight
  algorithms (clip search, GPTQ) run after the fold, on the scaled weights.

With ``recipe.smoothing_search`` the migration strength a (SmoothQuant, grid 0.1..0.9) or the
threshold t (OS+, a geometric grid below max r_j) is chosen per site to minimize the consumers'
relative output error  sum_i ||Q_a(X') Q_w(W_i')^T + W_i z - X W_i^T||^2 / ||X W_i^T||^2  over the
calibration rows in the stats store, with each consumer's own weight and activation formats; the
unsmoothed candidate is in the grid, so a site is never made worse on those rows.

Requires: ``calibrate`` ran (per-channel min/max and rows of every linear input). Ensures: same
function; smoothed linears carry ``meta[SMOOTHED]`` (a second run skips them); the stats store is
emptied because the activations it describes changed (``recalibrate`` refills it when a later
pass needs statistics); ``ctx.report["folds"]`` has one entry per site with the error before/after.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Node

from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import MODULE, get_tensor, producer, quantizable_ops, set_tensor
from finegrain.compiler.regions import (describe, find_norms, fold_into_readers, linear_bias, linear_weight,
                                        module_name, new_constant, own_constant, readers, set_linear_bias,
                                        set_linear_weight)
from finegrain.compiler.stats import StatsStore

aten = torch.ops.aten
SMOOTHED = "finegrain_smoothed"
ALPHAS = [round(a, 2) for a in np.arange(0.1, 0.951, 0.1)]
T_GRID = 12  # OS+ thresholds per site
AWQ_ALPHAS = [round(a, 2) for a in np.arange(0.0, 0.951, 0.05)]  # AWQ's grid of 20


class _Producer:
    """How (X - z) / s is absorbed upstream of a site; ``shift`` says whether z can be."""

    def __init__(self, kind: str, node: Node, shift: bool, norm=None, linear: Node | None = None):
        self.kind, self.node, self.shift, self.norm, self.linear = kind, node, shift, norm, linear


def _classify(gm: GraphModule, p: Node, norm_by_out: dict) -> "_Producer | str":
    norm = norm_by_out.get(p)
    if norm is not None:
        return _Producer("norm", p, True, norm=norm)
    if p.op == "call_function" and p.target is aten.linear.default and isinstance(p.args[1], Node) \
            and p.args[1].op == "get_attr":
        return _Producer("linear", p, True, linear=p)
    if p.op == "call_function" and p.target is aten.mul.Tensor and len(p.args) == 2:
        for a in p.args:
            if not isinstance(a, Node):
                continue
            src = producer(a)
            if src.op == "call_function" and src.target is aten.linear.default and src.args[1].op == "get_attr":
                r = readers(src)
                if not r.linears and r.others == [p] and _channel_aligned(src, p):
                    return _Producer("product", p, False, linear=src)
    return f"the activation is produced by {describe(p)}, not a norm, a linear or a product with a linear"


def _channel_aligned(lin: Node, mul: Node) -> bool:
    a, b = lin.meta.get("val"), mul.meta.get("val")
    return a is not None and b is not None and a.shape[-1] == b.shape[-1]


def _absorb(gm: GraphModule, prod: _Producer, s: torch.Tensor, z: torch.Tensor | None) -> None:
    """Make the producer emit (X - z) / s."""
    inv = 1.0 / s
    if prod.kind in ("linear", "product"):
        lin = prod.linear
        w = linear_weight(gm, lin).double()
        b = linear_bias(gm, lin)
        set_linear_weight(gm, lin, w * inv[:, None])
        if z is not None or b is not None:
            bb = b.double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            set_linear_bias(gm, lin, (bb - (z if z is not None else 0.0)) * inv)
        return
    norm = prod.norm
    if norm.affine is not None:  # rms pattern with weight: scale it, add the shift as a node
        user, idx = norm.weight_reader
        c = own_constant(gm, user, idx, "weight")
        g = get_tensor(gm, c.target)  # gain = g + offset -> (g + offset) / s = (g + offset) / s - offset + offset
        off = norm.weight_offset
        set_tensor(gm, c.target, ((g.double() + off) * inv - off).to(g.dtype))
        if z is not None:
            _insert_after(gm, prod.node, aten.add.Tensor, f"{norm.name}.smooth_shift", -z * inv)
        return
    n = norm.output
    if n.op == "call_function" and n.target is aten.layer_norm.default:
        _scale_layer_norm(gm, n, norm, inv, z)
        return
    # weightless norm: multiply (and add) by constants
    node = _insert_after(gm, prod.node, aten.mul.Tensor, f"{norm.name}.smooth_scale", inv)
    if z is not None:
        _insert_after(gm, node, aten.add.Tensor, f"{norm.name}.smooth_shift", -z * inv)


def _scale_layer_norm(gm, ln: Node, norm, inv, z) -> None:
    d = inv.shape[0]
    g = norm.gain_value(gm).double() if norm.weight is not None else torch.ones(d, dtype=torch.float64)
    b = get_tensor(gm, norm.bias.target).double() if norm.bias is not None else torch.zeros(d, dtype=torch.float64)
    new_b = (b - (z if z is not None else 0.0)) * inv
    args = list(ln.args) + [None] * (5 - len(ln.args))
    off = norm.weight_offset  # Nemotron's LayerNorm1P: the weight arg computes w + 1; its constant keeps the offset
    for idx, node, val, suffix in ((2, norm.weight, g * inv, "weight"), (3, norm.bias, new_b, "bias")):
        if node is not None and len(node.users) == 1:
            set_tensor(gm, node.target, (val - off if idx == 2 else val).float())
        else:
            args[idx] = new_constant(gm, f"{norm.name}.{suffix}", val.float(), before=ln)
    ln.args = tuple(args)


def _insert_after(gm: GraphModule, node: Node, op, base: str, value: torch.Tensor) -> Node:
    dtype = node.meta["val"].dtype if "val" in node.meta else torch.float32
    c = new_constant(gm, base, value.to(dtype))
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(op, (node, c))
    node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    new.meta["val"] = node.meta.get("val")
    new.meta[MODULE] = node.meta.get(MODULE)
    return new


def _site_error(x, consumers, s, z) -> float:
    xs = (x - z) / s if z is not None else x / s
    total = 0.0
    for w, wf, af, ref, shift_out in consumers:
        xq = af.fake_quantize(xs) if af is not None else xs
        ws = w * s
        wq = wf.fake_quantize(ws) if wf is not None else ws
        out = xq @ wq.T
        if z is not None:
            out = out + shift_out
        total += float((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
    return total / len(consumers)


def _candidates(method: str, search: bool, alpha: float, st, w_absmax):
    ones = torch.ones_like(w_absmax)
    if method == "awq":  # always searched: the grid is the method
        xm = st.rows.float().abs().mean(0).clamp_min(1e-8)
        out = [("none", ones, None)]
        for a in AWQ_ALPHAS[1:]:
            sc = xm.pow(a).clamp_min(1e-4)
            out.append((f"alpha={a}", sc / (sc.max() * sc.min()).sqrt(), None))
        return out
    if method == "smoothquant":
        xa = st.absmax.clamp_min(1e-5)
        wa = w_absmax.clamp_min(1e-5)
        alphas = ALPHAS if search else [alpha]
        out = [(f"alpha={a}", (xa.pow(a) / wa.pow(1 - a)).clamp_min(1e-5), None) for a in alphas]
        return ([("none", ones, None)] if search else []) + out
    z = (st.max + st.min) / 2
    r = ((st.max - st.min) / 2).clamp_min(1e-8)
    if not search:  # OS+ shift, then SmoothQuant-style scales on the shifted ranges
        return [(f"shift, alpha={alpha}", (r.pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5), z)]
    rmax = float(r.max())
    ts = [rmax * f for f in np.geomspace(1.0, 1e-3, T_GRID)]
    return [("none", ones, None)] + [(f"shift, t={t:.4g}", torch.clamp(r / t, min=1.0), z) for t in ts]


@dataclass
class _Site:
    """One smoothing site: the linears reading one activation, what produces it, its statistics."""

    name: str
    ops: list
    linears: list[Node]
    prod: Any  # _classify's result: the producer the scales / shift are absorbed into
    stats: Any


def _find_sites(gm: GraphModule, ctx: PassContext, log: list) -> list[_Site]:
    """Sites whose consumers the recipe activation-quantizes (AWQ: weight-quantizes); refusals go to ``log``."""
    recipe = ctx.recipe
    norm_by_out = {}
    for nm in find_norms(gm):
        norm_by_out[producer(nm.output)] = nm
        norm_by_out[nm.output] = nm
    by_producer: dict[Node, list] = {}
    for op in quantizable_ops(gm):
        if op.kind == "linear" and op.weight is not None:
            by_producer.setdefault(producer(op.activation), []).append(op)
    sites = []
    for p, ops in by_producer.items():
        which = 0 if recipe.smoothing == "awq" else 1  # AWQ: quantized weights; the others: quantized inputs
        wanted = [op for op in ops if recipe.formats_for(op.role, op.name)[which] is not None]
        if not wanted or all(op.node.meta.get(SMOOTHED) for op in ops):
            continue
        name = ", ".join(op.name for op in ops)

        def refuse(detail: str) -> None:
            log.append({"pass": "fold_smoothing", "site": name, "action": "refused", "detail": detail})

        r = readers(p)
        if r.others:
            refuse(f"the activation is also read by {describe(r.others[0])}")
            continue
        prod = _classify(gm, p, norm_by_out)
        if isinstance(prod, str):
            refuse(prod)
            continue
        key = next((op.activation.name for op in ops if op.activation.name in ctx.stats), None)
        if key is None:
            refuse("no calibration statistics for its input")
            continue
        if ctx.stats[key].rows.shape[0] == 0:
            refuse("the stats store kept no calibration rows for its input")
            continue
        sites.append(_Site(name, ops, r.linears, prod, ctx.stats[key]))
    return sites


def _choose(gm: GraphModule, site: _Site, recipe) -> tuple[float, float, str, torch.Tensor, torch.Tensor | None]:
    """``(base error, best error, label, scales, shift)``: the candidate minimizing the site's
    quantized output error on the calibration rows (``none`` when nothing beats no smoothing)."""
    by_node = {op.node: op for op in site.ops}
    x = site.stats.rows.float()
    consumers = []
    for lin in site.linears:
        qop = by_node.get(lin)
        wf, af = recipe.formats_for(qop.role, qop.name) if qop else (None, None)
        w = linear_weight(gm, lin).float()
        consumers.append((w, wf, af, x @ w.T, None))
    w_absmax = torch.stack([linear_weight(gm, lin).float().abs().amax(0) for lin in site.linears]).amax(0)
    cands = _candidates(recipe.smoothing, recipe.smoothing_search, recipe.smoothing_alpha, site.stats, w_absmax)
    if not site.prod.shift:
        cands = [(label, s, None) for label, s, _ in cands]
    best = base = None
    for label, s, z in cands:
        cons = [(w, wf, af, ref, (z @ w.T) if z is not None else None) for w, wf, af, ref, _ in consumers]
        err = _site_error(x, cons, s, z)
        if label == "none" and z is None:
            base = err
        if best is None or err < best[0]:
            best = (err, label, s, z)
    err, label, s, z = best
    if base is None:
        base = _site_error(x, [(w, wf, af, ref, None) for w, wf, af, ref, _ in consumers], torch.ones_like(s), None)
    return base, err, label, s, z


def _apply(gm: GraphModule, site: _Site, s: torch.Tensor, z: torch.Tensor | None) -> float:
    """Fold ``(X - z) / s`` into the readers and the inverse into the producer; max|x| after."""
    s64 = s.double()
    z64 = z.double() if z is not None else None
    fold_into_readers(gm, site.linears, s64, z64)  # readers now take X' = (X - z) / s
    for lin in site.linears:
        lin.meta[SMOOTHED] = True
    _absorb(gm, site.prod, s64, z64)
    st, shift = site.stats, (z if z is not None else 0)
    return float((torch.maximum((st.max - shift).abs(), (st.min - shift).abs()) / s).max())


def fold_smoothing(gm: GraphModule, ctx: PassContext) -> GraphModule:
    recipe = ctx.recipe
    if recipe.smoothing is None:
        return gm
    log = ctx.report.setdefault("folds", [])
    changed = False
    for site in _find_sites(gm, ctx, log):
        base, err, label, s, z = _choose(gm, site, recipe)
        if label == "none" and z is None:
            for op in site.ops:
                op.node.meta[SMOOTHED] = True
            log.append({"pass": "fold_smoothing", "site": site.name, "action": "kept",
                        "detail": f"no candidate lowered the output error ({base:.3e})"})
            continue
        xmax_after = _apply(gm, site, s, z)
        changed = True
        log.append({"pass": "fold_smoothing", "site": site.name, "action": "folded",
                    "detail": f"{recipe.smoothing} ({label}) into {site.prod.kind} {module_name(site.prod.node)}: rel. "
                              f"output error {base:.3e} -> {err:.3e}, max|x| {float(site.stats.absmax.max()):.3g} -> "
                              f"{xmax_after:.3g}",
                    "error_before": base, "error_after": err})
    if changed:
        ctx.stats = StatsStore(seed=ctx.stats.seed, rows=0, hessian=ctx.stats.hessian)  # later passes may need X^T X
        ctx.report["stats_invalidated_by"] = "fold_smoothing"
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
