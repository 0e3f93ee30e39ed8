"""Quantize weights offline: round-to-nearest (RTN) with the format's reference quantizer.

Requires: ``meta[WEIGHT_FORMAT]`` on quantizable ops. Ensures: ``meta[QWEIGHT]`` (a QTensor) on
each of them, and a per-layer error record in ``ctx.report["layers"]``: weight SQNR (dB) and,
when calibration statistics exist for the op's input, the relative output-error proxy
``sum_j ||dW[:, j]||^2 E[x_j^2] / sum_j ||W[:, j]||^2 E[x_j^2]`` (diagonal approximation of
``E||dW x||^2 / E||W x||^2``). GPTQ / clip search (issue #4) replace the quantizer here.
"""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule

from finegrain.compiler.ir import QWEIGHT, WEIGHT_FORMAT, get_tensor, quantizable_ops


def _db(noise: float, signal: float) -> float:
    return 10 * math.log10(signal / noise) if noise > 0 else float("inf")


def quantize_weights(gm: GraphModule, ctx) -> GraphModule:
    ops = [op for op in quantizable_ops(gm) if WEIGHT_FORMAT in op.node.meta]
    for op in ctx.progress(ops, desc="quantize weights"):
        fmt = op.node.meta[WEIGHT_FORMAT]
        w = get_tensor(gm, op.weight.target).float()
        q = fmt.quantize(w)
        op.node.meta[QWEIGHT] = q
        err = fmt.dequantize(q) - w
        rec = {"weight": op.weight_fqn, "role": op.role, "format": fmt.tag, "shape": list(w.shape),
               "bits": fmt.storage_bits(tuple(w.shape)), "weight_sqnr_db": _db(err.pow(2).sum().item(), w.pow(2).sum().item())}
        if op.activation.name in ctx.stats:
            ex2 = ctx.stats[op.activation.name].mean_sq
            rec["output_sqnr_db"] = _db((err.pow(2).sum(0) * ex2).sum().item(), (w.pow(2).sum(0) * ex2).sum().item())
        ctx.report.setdefault("layers", {})[op.name] = rec
    return gm
