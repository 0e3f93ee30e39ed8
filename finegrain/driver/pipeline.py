"""The pass pipeline: named stages of literal pass lists, run top to bottom.

``ANALYZE`` (canonicalize, folds, calibration, bit allocation: decides every tensor's format)
and ``MATERIALIZE`` (weight codes and Q/DQ ops: writes them into the graph); ``PIPELINE`` is
both. ``compile_frontier`` / ``compile_joint`` run ``ANALYZE`` once and ``MATERIALIZE`` per point.
``run_passes`` times each pass, runs the verifier after it, and with ``FINEGRAIN_DUMP=dir``
writes the graph after each pass to ``dir/NN_<pass>.txt``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from torch.fx import GraphModule

from finegrain.compiler.context import PassContext
from finegrain.compiler.verify import verify
from finegrain.passes.allocate_bits import allocate_bits
from finegrain.passes.calibrate import calibrate, recalibrate
from finegrain.passes.canonicalize import canonicalize
from finegrain.passes.fold_kv_rotation import fold_kv_rotation
from finegrain.passes.fold_norms import fold_norms
from finegrain.passes.fold_rotation import fold_rotation
from finegrain.passes.fold_smoothing import fold_smoothing
from finegrain.passes.insert_qdq import insert_qdq
from finegrain.passes.quantize_kv import quantize_kv
from finegrain.passes.quantize_weights import quantize_weights

__all__ = ["ANALYZE", "MATERIALIZE", "PIPELINE", "PassContext", "run_passes"]

Pass = Callable[[GraphModule, PassContext], GraphModule]

ANALYZE: list[tuple[str, Pass]] = [
    ("canonicalize", canonicalize),  # drop export-time assertions, dead code
    ("fold_norms", fold_norms),  # norm affine -> following linears (recipe.fold_norms / rotate)
    ("fold_kv_rotation", fold_kv_rotation),  # kv_rotate's value Hadamard -> v_proj rows / o_proj columns
    ("fold_rotation", fold_rotation),  # Hadamard rotation of residual streams + online FWHT (recipe.rotate)
    ("calibrate", calibrate),  # fill the stats store from calibration batches
    ("fold_smoothing", fold_smoothing),  # SmoothQuant / OS+ scales and shifts (recipe.smoothing)
    ("recalibrate", recalibrate),  # refill the stats a fold invalidated, when a later pass needs them
    ("allocate_bits", allocate_bits),  # a QuantFormat per weight / activation (recipe rules)
]
MATERIALIZE: list[tuple[str, Pass]] = [
    ("quantize_weights", quantize_weights),  # RTN / clip search / GPTQ codes + scales, per-layer error record
    ("insert_qdq", insert_qdq),  # packed weights + Q/DQ custom ops
    ("quantize_kv", quantize_kv),  # the KV cache quantized on write, optionally rotated (recipe.kv_*)
]
PIPELINE: list[tuple[str, Pass]] = ANALYZE + MATERIALIZE


def run_passes(gm: GraphModule, ctx: PassContext, pipeline: list[tuple[str, Pass]] = PIPELINE) -> GraphModule:
    dump = os.environ.get("FINEGRAIN_DUMP")
    timings = ctx.report.setdefault("pass_seconds", {})
    for i, (name, fn) in enumerate(pipeline):
        t0 = time.perf_counter()
        gm = fn(gm, ctx)
        timings[name] = round(time.perf_counter() - t0, 3)
        verify(gm, name)
        if dump:
            Path(dump).mkdir(parents=True, exist_ok=True)
            (Path(dump) / f"{i:02d}_{name}.txt").write_text(gm.print_readable(print_output=False))
    return gm
