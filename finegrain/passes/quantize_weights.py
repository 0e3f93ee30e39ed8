"""Quantize weights offline with the recipe's weight algorithm (``passes/weight_algorithms.py``):
``rtn``, ``clip`` (clip-ratio search per group) or ``gptq`` (optionally on clip-searched scales).

Requires: ``meta[WEIGHT_FORMAT]`` on quantizable ops; for ``gptq`` and the output-error clip
search, ``X^T X`` of each op's input in the stats store (calibration with ``recipe.needs_hessian``).
Ensures: ``meta[QWEIGHT]`` (a QTensor) on each of them, and a per-layer error record in
``ctx.report["layers"]``: the algorithm, weight SQNR (dB) and, when calibration statistics exist
for the op's input, the output SQNR ``E||W x||^2 / E||dW x||^2`` in dB, with the full ``E[x x^T]``
when it was collected, else its diagonal ``E[x_j^2]``. Layers run one at a time (memory: one
weight and one Hessian beside the model), with a progress bar.

Grouped (MoE) ops quantize each expert ``[N, K]`` slice of their ``[E, N, K]`` weight with its
own format (``ir.expert_formats``) and its own Hessian (the rows routed to it); ``meta[QWEIGHT]``
is then a tuple of QTensors and the record is per expert (``<weight>.<e>``). An expert no
calibration row reached has no Hessian: it is rounded to nearest and its record says so.
"""
from __future__ import annotations

import math

from torch.fx import GraphModule

from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import QWEIGHT, WEIGHT_FORMAT, expert_formats, expert_key, get_tensor, quantizable_ops
from finegrain.errors import InputError
from finegrain.passes.weight_algorithms import clip_search, gptq, rtn


def _db(noise: float, signal: float) -> float:
    return 10 * math.log10(signal / noise) if noise > 0 else float("inf")


def _quantize(ctx: PassContext, w, fmt, h, ex2, name: str, kind: str):
    """(QTensor, error record); the output SQNR uses the Hessian ``h`` when given, else the
    diagonal ``ex2`` = E[x_j^2] when given."""
    r = ctx.recipe
    algo = r.weight_algorithm
    if kind == "embedding" or (kind == "grouped" and h is None and r.needs_hessian):
        algo = "rtn"
    if algo == "rtn":
        q = rtn(w, fmt)
    elif algo == "clip":
        q, _ = clip_search(w, fmt, h if r.clip_objective == "output" else None, r.clip_grid, r.clip_min)
    else:
        params = clip_search(w, fmt, h, r.clip_grid, r.clip_min)[0] if r.gptq_clip else rtn(w, fmt)
        q = gptq(w, fmt, h, params, damp=r.gptq_damp, block=r.gptq_block, act_order=r.gptq_act_order, where=name)
    err = fmt.dequantize(q) - w
    rec = {"format": fmt.tag, "shape": list(w.shape), "algorithm": algo, "bits": fmt.storage_bits(tuple(w.shape)),
           "weight_sqnr_db": _db(err.pow(2).sum().item(), w.pow(2).sum().item())}
    if h is not None:
        rec["output_sqnr_db"] = _db((err @ h * err).sum().item(), (w @ h * w).sum().item())
    elif ex2 is not None:
        rec["output_sqnr_db"] = _db((err.pow(2).sum(0) * ex2).sum().item(), (w.pow(2).sum(0) * ex2).sum().item())
    return q, rec


def quantize_weights(gm: GraphModule, ctx: PassContext) -> GraphModule:
    r = ctx.recipe
    ops = [op for op in quantizable_ops(gm) if WEIGHT_FORMAT in op.node.meta]
    layers = ctx.report.setdefault("layers", {})
    for op in ctx.progress(ops, desc=f"quantize weights ({r.weight_algorithm})"):
        w = get_tensor(gm, op.weight.target).float()
        base = {"weight": op.weight_fqn, "role": op.role}
        if op.kind == "grouped":
            if r.needs_hessian and op.activation.name not in ctx.stats:
                raise InputError(f"{op.name}: weight algorithm {r.weight_algorithm!r} needs calibration statistics of "
                                 f"the experts' inputs {op.activation.name!r}; pass calibration data")
            qs = []
            for e, fmt in enumerate(expert_formats(op)):
                st = ctx.stats.nodes.get(expert_key(op.activation.name, e))
                q, rec = _quantize(ctx, w[e], fmt, None if st is None or st.xtx is None else st.hessian,
                                   None if st is None else st.mean_sq, f"{op.name}.{e}", op.kind)
                rec["calibration_rows"] = 0 if st is None else st.count
                layers[f"{op.name}.{e}"] = {**base, **rec}
                qs.append(q)
            op.node.meta[QWEIGHT] = tuple(qs)
            continue
        fmt = op.node.meta[WEIGHT_FORMAT]
        h = ctx.stats.hessian_of(op.activation.name)
        if r.needs_hessian and h is None and op.kind != "embedding":
            raise InputError(f"{op.name}: weight algorithm {r.weight_algorithm!r} needs the calibration Hessian of "
                             f"its input {op.activation.name!r}; pass calibration data")
        st = ctx.stats.nodes.get(op.activation.name)
        q, rec = _quantize(ctx, w, fmt, h, None if st is None else st.mean_sq, op.name, op.kind)
        op.node.meta[QWEIGHT] = q
        layers[op.name] = {**base, **rec}
    return gm
