"""Fold RMSNorm / LayerNorm affine parameters into the linears that read the normalized tensor.

For a norm output y = n * g + beta (n the normalized input, g and beta the affine weight and
bias) read by linears W_i, b_i:  W_i y + b_i = (W_i diag(g)) n + (b_i + W_i beta), so
W_i' = W_i diag(g), b_i' = b_i + W_i beta, and the norm keeps no affine. This is the first step of
computational invariance (SliceGPT, Ashkboos et al. 2024, Sec. 3; QuaRot, Sec. 4): a weightless
RMSNorm commutes with an orthogonal rotation of its input.

Norms, their readers and the weights are found from the graph (``compiler/regions.py``). A norm
whose output is read by anything but linears (a residual add in post-norm BERT, a graph output)
is refused: the fold would not be exact. Constants shared with other ops (a tied LM head) are
copied first, except that before a residual rotation a norm whose only reader is a tied LM head
is left to ``fold_rotation`` (which keeps the tie). Runs when ``recipe.fold_norms``, or
``recipe.rotate`` in ``residual`` mode; a second run finds no affine
left and changes nothing.

Requires: a canonicalized graph. Ensures: folded norms carry no weight/bias; the function is
unchanged; ``ctx.report["folds"]`` lists each norm as folded or refused (with the reason).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import drop_unused_constants, get_tensor
from finegrain.compiler.ops import GROUPED_LINEAR
from finegrain.compiler.regions import describe, find_norms, fold_into_readers, module_name, readers, tied_norm


def fold_norms(gm: GraphModule, ctx: PassContext) -> GraphModule:
    recipe = ctx.recipe
    if not (recipe.fold_norms or (recipe.rotate and recipe.rotation_mode == "residual")):
        return gm
    log = ctx.report.setdefault("folds", [])
    rotating = recipe.rotate and recipe.rotation_mode == "residual"
    changed = False
    for norm in find_norms(gm):
        if norm.weight is None and norm.bias is None:
            continue
        if rotating and tied_norm(norm):
            log.append({"pass": "fold_norms", "site": norm.name, "action": "kept",
                        "detail": "its reader shares its weight with the embedding (tied); fold_rotation "
                                  "keeps them tied and moves the norm weight into a d x d matmul"})
            continue
        r = readers(norm.output, experts=True)  # through a MoE's token dispatch into its experts
        grouped = any(lin.target is GROUPED_LINEAR for lin in r.linears)
        if r.others or not r.linears or (grouped and norm.bias is not None):
            why = (f"output also read by {describe(r.others[0])}" if r.others else "output read by no linear"
                   if not r.linears else "its bias cannot go into the experts' grouped linears (no bias)")
            log.append({"pass": "fold_norms", "site": norm.name, "action": "refused",
                        "detail": f"{norm.kind} norm: {why}; folding its affine would not be exact"})
            continue
        g = norm.gain_value(gm)
        beta = get_tensor(gm, norm.bias.target) if norm.bias is not None else None
        fold_into_readers(gm, r.linears, g, beta)
        _strip_affine(gm, norm)
        changed = True
        log.append({"pass": "fold_norms", "site": norm.name, "action": "folded",
                    "detail": f"{norm.kind} norm affine{f' (1 + w)' if norm.weight_offset == 1 else ''} into {len(r.linears)} linear(s): "
                              + ", ".join(module_name(lin) for lin in r.linears)})
    if changed:
        gm.graph.eliminate_dead_code()  # a `weight + offset` gain (Gemma) is left unread
        drop_unused_constants(gm)
        gm.recompile()
    return gm


def _strip_affine(gm: GraphModule, norm) -> None:
    n = norm.output
    if norm.affine is not None:  # rms pattern: mul(weight, normalized) -> normalized
        norm.affine.replace_all_uses_with(norm.affine_input)
        gm.graph.erase_node(norm.affine)
        return
    target = n.target if n.op == "call_function" else None
    if target is torch.ops.aten.rms_norm.default:
        n.args = (*n.args[:2], None, *n.args[3:])
        return
    ln = n if target is torch.ops.aten.layer_norm.default else n.args[0]  # native_layer_norm via getitem
    ln.args = (*ln.args[:2], None, None, *ln.args[4:])
