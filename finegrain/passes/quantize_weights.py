"""Quantize weights offline with the recipe's weight algorithm (``passes/weight_algorithms.py``):
``rtn``, ``clip`` (clip-ratio search per group) or ``gptq`` (optionally on clip-searched scales).

Requires: ``meta[WEIGHT_FORMAT]`` on quantizable ops; for ``gptq`` and the output-error clip
search, ``X^T X`` of each op's input in the stats store (calibration with ``recipe.needs_hessian``).
Ensures: ``meta[QWEIGHT]`` (a QTensor) on each of them, and a per-layer error record in
``ctx.report["layers"]``: the algorithm, weight SQNR (dB) and, when calibration statistics exist
for the op's input, the output SQNR ``E||W x||^2 / E||dW x||^2`` in dB, with the full ``E[x x^T]``
when it was collected, else its diagonal ``E[x_j^2]``. Layers run one at a time (memory: one
weight and one Hessian beside the model), with a progress bar.
"""
from __future__ import annotations

import math

from torch.fx import GraphModule

from finegrain.compiler.ir import QWEIGHT, WEIGHT_FORMAT, get_tensor, quantizable_ops
from finegrain.errors import InputError
from finegrain.passes.weight_algorithms import clip_search, gptq, rtn


def _db(noise: float, signal: float) -> float:
    return 10 * math.log10(signal / noise) if noise > 0 else float("inf")


def quantize_weights(gm: GraphModule, ctx) -> GraphModule:
    r = ctx.recipe
    ops = [op for op in quantizable_ops(gm) if WEIGHT_FORMAT in op.node.meta]
    for op in ctx.progress(ops, desc=f"quantize weights ({r.weight_algorithm})"):
        fmt = op.node.meta[WEIGHT_FORMAT]
        w = get_tensor(gm, op.weight.target).float()
        h = ctx.stats.hessian_of(op.activation.name)
        if r.needs_hessian and h is None and op.kind != "embedding":
            raise InputError(f"{op.name}: weight algorithm {r.weight_algorithm!r} needs the calibration Hessian of "
                             f"its input {op.activation.name!r}; pass calibration data")
        if r.weight_algorithm == "rtn" or op.kind == "embedding":
            q = rtn(w, fmt)
        elif r.weight_algorithm == "clip":
            q, _ = clip_search(w, fmt, h if r.clip_objective == "output" else None, r.clip_grid, r.clip_min)
        else:
            params = clip_search(w, fmt, h, r.clip_grid, r.clip_min)[0] if r.gptq_clip else rtn(w, fmt)
            q = gptq(w, fmt, h, params, damp=r.gptq_damp, block=r.gptq_block, act_order=r.gptq_act_order,
                     where=op.name)
        op.node.meta[QWEIGHT] = q
        err = fmt.dequantize(q) - w
        rec = {"weight": op.weight_fqn, "role": op.role, "format": fmt.tag, "shape": list(w.shape),
               "algorithm": "rtn" if op.kind == "embedding" else r.weight_algorithm,
               "bits": fmt.storage_bits(tuple(w.shape)), "weight_sqnr_db": _db(err.pow(2).sum().item(), w.pow(2).sum().item())}
        if h is not None:
            rec["output_sqnr_db"] = _db((err @ h * err).sum().item(), (w @ h * w).sum().item())
        elif op.activation.name in ctx.stats:
            ex2 = ctx.stats[op.activation.name].mean_sq
            rec["output_sqnr_db"] = _db((err.pow(2).sum(0) * ex2).sum().item(), (w.pow(2).sum(0) * ex2).sum().item())
        ctx.report.setdefault("layers", {})[op.name] = rec
    return gm
