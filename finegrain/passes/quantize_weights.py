"""Quantize weights offline with the recipe's weight algorithm (``passes/weight_algorithms.py``):
``rtn``, ``clip`` (clip-ratio search per group) or ``gptq`` (optionally on clip-searched scales).

Sequential (``recipe.sequential``, the default, for GPTQ; the clip search stays on float Hessians): the
calibration batches are replayed through the graph node by node (``compiler/replay.py``); when
the replay reaches a quantizable op, its input Hessian ``E[x x^T]`` is measured on what the
already-quantized ops upstream produce, its weight is quantized, and the op runs with the
dequantized weight, so every later op sees the quantized model's activations (GPTQ's sequential
scheme, at the granularity of single linears, in dataflow order). An op with a dynamic
activation format reads its input fake-quantized in the replay, as it will when deployed. Memory: the live activations of
the replay for all batches plus one Hessian. Otherwise the Hessians come from the stats store
(one calibration pass over the float model, ``recipe.needs_float_hessian``).

Requires: ``meta[WEIGHT_FORMAT]`` on quantizable ops; for ``gptq`` and the output-error clip
search, calibration batches (sequential) or ``X^T X`` in the stats store.
Ensures: ``meta[QWEIGHT]`` (a QTensor) on each of them, and a per-layer error record in
``ctx.report["layers"]``: the algorithm, ``sequential`` when the Hessian came from the replay,
weight SQNR (dB) and, when calibration statistics exist for the op's input, the output SQNR
``E||W x||^2 / E||dW x||^2`` in dB, with the full ``E[x x^T]`` when it was collected, else its
diagonal ``E[x_j^2]``, with a progress bar. With ``recipe.act_clip_search`` (sequential GPTQ) the
dynamic integer activation format of each site gets the searched clip ratio (``meta[ACT_FORMAT]``,
:func:`act_clip`) before its rows are fake-quantized for the Hessian, and the layer record has
``act_clip``: the ratio and the relative output error of every candidate.

Convolutions are quantized as a matrix (``ir.conv_matrix``: groups along input channels, one row
per output channel and kernel tap; per channel: one row per output channel), rounded to nearest
or clip-searched on weight MSE (no input Hessian of the unfolded patches: an algorithm that needs
one rounds to nearest and the record's ``note`` says so).

Grouped (MoE) ops quantize each expert ``[N, K]`` slice of their ``[E, N, K]`` weight with its
own format (``ir.expert_formats``) and its own Hessian (the rows routed to it); ``meta[QWEIGHT]``
is then a tuple of QTensors and the record is per expert (``<weight>.<e>``). An expert no
calibration row reached has no Hessian: it is rounded to nearest and its record says so.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch.fx import GraphModule

from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import (ACT_FORMAT, ACT_OUTLIERS, QWEIGHT, WEIGHT_FORMAT, conv_matrix, conv_weight, expert_formats,
                                  expert_key, get_tensor, quantizable_ops)
from finegrain.compiler.replay import replay
from finegrain.compiler.stats import gram
from finegrain.errors import InputError
from finegrain.passes.weight_algorithms import clip_search, gptq, gptq_factor, rtn


def _db(noise: float, signal: float) -> float:
    return 10 * math.log10(signal / noise) if noise > 0 else float("inf")


def _quantize(ctx: PassContext, w, fmt, h, ex2, name: str, kind: str, factors: dict | None = None):
    """(QTensor, error record); the output SQNR uses the Hessian ``h`` when given, else the
    diagonal ``ex2`` = E[x_j^2] when given. ``factors``: GPTQ's factorizations by Hessian, kept
    for the next linear reading the same input (``id(h)`` -> ``(h, factor)``)."""
    r = ctx.recipe
    algo = r.weight_algorithm
    if kind == "embedding" or (kind == "grouped" and h is None and r.needs_hessian):
        algo = "rtn"
    if kind in ("conv", "recurrent") and r.needs_hessian:  # no input Hessian here: round to nearest, the record says so
        algo = "rtn"
    if algo == "rtn":
        q = rtn(w, fmt)
    elif algo == "clip":
        q, _ = clip_search(w, fmt, h if r.clip_objective == "output" else None, r.clip_grid, r.clip_min)
    else:
        choose = (lambda x: clip_search(x, fmt, h, r.clip_grid, r.clip_min)[0]) if r.gptq_clip else (lambda x: rtn(x, fmt))
        hit = factors.get(id(h)) if factors is not None else None
        factor = hit[1] if hit is not None and hit[0] is h else gptq_factor(h, r.gptq_damp, r.gptq_act_order, name)
        if factors is not None:
            factors[id(h)] = (h, factor)
        q = gptq(w, fmt, h, choose(w), damp=r.gptq_damp, block=r.gptq_block, act_order=r.gptq_act_order, where=name,
                 refresh=choose, factor=factor)
    err = fmt.dequantize(q) - w
    rec = {"format": fmt.tag, "shape": list(w.shape), "algorithm": algo, "bits": fmt.storage_bits(tuple(w.shape)),
           "weight_sqnr_db": _db(err.pow(2).sum().item(), w.pow(2).sum().item())}
    if h is not None:
        rec["output_sqnr_db"] = _db((err @ h * err).sum().item(), (w @ h * w).sum().item())
    elif ex2 is not None:
        rec["output_sqnr_db"] = _db((err.pow(2).sum(0) * ex2).sum().item(), (w.pow(2).sum(0) * ex2).sum().item())
    return q, rec


def _hessian(xs: list) -> tuple[torch.Tensor | None, int]:
    """E[x x^T] over the rows of per-batch activations ``xs`` ``[..., K]`` and the row count
    (None when there are no rows)."""
    k = xs[0].shape[-1] if xs else 0
    h, rows = torch.zeros(k, k), 0
    for x in xs:
        x = x.reshape(-1, k).float()
        h += gram(x)
        rows += x.shape[0]
    return (h / rows if rows else None), rows


def _stats_hessian(ctx: PassContext):
    """``h_of`` over the stats store (one float-model calibration pass)."""
    def h_of(key: str) -> tuple[torch.Tensor | None, int]:
        st = ctx.stats.nodes.get(key)
        return (None, 0) if st is None else (None if st.xtx is None else st.hessian, st.count)
    return h_of


def _quantize_op(gm: GraphModule, ctx: PassContext, op, h_of, sequential: bool = False,
                 target: torch.Tensor | None = None, factors: dict | None = None) -> torch.Tensor:
    """Quantize one op's weight (``meta[QWEIGHT]``, its error record); returns the dequantized
    weight. ``h_of(key)`` gives (Hessian or None, calibration rows) of an op input or of the rows a
    grouped op routes to one expert (``ir.expert_key``). ``target``: the float matrix GPTQ fits
    instead of the weight (``gptq_float_target``; a linear only). ``factors``: see :func:`_quantize`."""
    r = ctx.recipe
    layers = ctx.report.setdefault("layers", {})
    w0 = get_tensor(gm, op.weight.target)
    w = w0.float() if target is None else target
    base = {"weight": op.weight_fqn, "role": op.role, **({"sequential": True} if sequential else {})}
    if op.kind == "grouped":
        if r.needs_hessian and not sequential and op.activation.name not in ctx.stats:
            raise InputError(f"{op.name}: weight algorithm {r.weight_algorithm!r} needs calibration statistics of "
                             f"the experts' inputs {op.activation.name!r}; pass calibration data")
        qs = []
        for e, fmt in enumerate(expert_formats(op)):
            key = expert_key(op.activation.name, e)
            h, rows = h_of(key)
            st = ctx.stats.nodes.get(key)
            q, rec = _quantize(ctx, w[e], fmt, h, None if st is None else st.mean_sq, f"{op.name}.{e}", op.kind, factors)
            rec["calibration_rows"] = rows
            layers[f"{op.name}.{e}"] = {**base, **rec}
            qs.append(q)
        op.node.meta[QWEIGHT] = tuple(qs)
        return torch.stack([f.dequantize(q) for f, q in zip(expert_formats(op), qs)]).to(w0.dtype)
    fmt = op.node.meta[WEIGHT_FORMAT]
    if op.kind in ("conv", "recurrent"):  # no input Hessian here (no im2col / recurrence statistics)
        conv = op.kind == "conv"  # a conv's matrix view: groups along input channels (ir.conv_matrix)
        q, rec = _quantize(ctx, conv_matrix(w, fmt) if conv else w, fmt, None, None, op.name, op.kind)
        if r.needs_hessian:
            rec["note"] = f"{r.weight_algorithm} needs an input Hessian, not collected for {op.kind} ops: rounded to nearest"
        op.node.meta[QWEIGHT] = q
        layers[op.name] = {**base, **rec, **({"conv_shape": list(w.shape)} if conv else {})}
        deq = fmt.dequantize(q)
        return (conv_weight(deq, w.shape, fmt) if conv else deq).to(w0.dtype)
    h = h_of(op.activation.name)[0] if op.kind != "embedding" else None
    if r.needs_hessian and h is None and op.kind != "embedding":
        raise InputError(f"{op.name}: weight algorithm {r.weight_algorithm!r} needs the calibration Hessian of "
                         f"its input {op.activation.name!r}; pass calibration data")
    st = ctx.stats.nodes.get(op.activation.name)
    q, rec = _quantize(ctx, w, fmt, h, None if st is None else st.mean_sq, op.name, op.kind, factors)
    op.node.meta[QWEIGHT] = q
    layers[op.name] = {**base, **rec, **({"float_target": True} if target is not None else {})}
    return fmt.dequantize(q).to(w0.dtype)


def _cross(xs_q: list, xs_fp: list) -> torch.Tensor:
    """``C = E[x_fp x_q^T]`` over the rows of paired per-batch activations (float64)."""
    k = xs_q[0].shape[-1]
    c, rows = torch.zeros(k, k, dtype=torch.float64), 0
    for xq, xf in zip(xs_q, xs_fp):
        xq, xf = xq.reshape(-1, k).double(), xf.reshape(-1, k).double()
        c += xf.T @ xq
        rows += xq.shape[0]
    return c / rows


def _float_target(w: torch.Tensor, c: torch.Tensor, h: torch.Tensor, damp: float) -> torch.Tensor:
    """GPTAQ's target: the least-squares ``W~ = W C H^-1`` (``C = E[x_fp x_q^T]``, ``H = E[x_q x_q^T]``),
    so that ``||W X_fp - Q X_q||^2 = ||W X_fp - W~ X_q||^2 + ||(W~ - Q) X_q||^2`` and GPTQ on
    ``W~`` with ``H`` minimizes the error against the float model's output. Written as
    ``W + W (C - H) H_λ^-1`` (``H_λ`` damped as GPTQ damps it), which leaves ``W`` alone where the
    inputs agree (``W C H_λ^-1`` would shrink it)."""
    k = w.shape[-1]
    hd = h.double().clone()
    dead = torch.diag(hd) == 0
    hd[dead, dead] = 1.0
    hd += damp * torch.diag(hd).mean() * torch.eye(k, dtype=hd.dtype)
    w64 = w.double()
    out = w64 + torch.linalg.solve(hd, (c - h.double()).T @ w64.T).T  # H symmetric
    out[:, dead] = 0.0
    return out.float()


def _site_rows(xs: list, weights: list, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An activation site's rows ``xs`` (at most ``rows``, evenly spaced) and its linears' weights stacked."""
    k = weights[0].shape[-1]
    x = torch.cat([t.reshape(-1, k).float() for t in xs])
    if x.shape[0] > rows:
        x = x[torch.linspace(0, x.shape[0] - 1, rows).long()]
    return x, torch.cat([t.float() for t in weights])


def act_clip(xs: list, fmt, weights: list, rows: int = 4096) -> tuple[float, dict]:
    """The clip ratio of ``fmt`` (from ``recipe.ACT_CLIP_GRID``) minimizing the output error
    ``sum_i ||(Q_c(X) - X) W_i^T||^2`` of the linears ``weights`` reading activation rows ``xs``
    (at most ``rows`` of them, evenly spaced), and the relative error of each candidate."""
    from finegrain.compiler.recipe import ACT_CLIP_GRID

    x, w = _site_rows(xs, weights, rows)
    ref = (x @ w.T).pow(2).sum().clamp_min(1e-30)
    errs = {c: float(((dataclasses.replace(fmt, clip=c).fake_quantize(x) - x) @ w.T).pow(2).sum() / ref)
            for c in ACT_CLIP_GRID}
    return min(errs, key=errs.get), errs


def act_fake_quantize(x: torch.Tensor, fmt, outliers=None) -> torch.Tensor:
    """``fmt``'s fake quantization of activation rows ``x``; with ``outliers`` (``(hi format, bool
    mask over the last dim)``, FMPQ) the masked columns take the high-precision format's."""
    q = fmt.fake_quantize(x)
    return q if outliers is None else torch.where(outliers[1], outliers[0].fake_quantize(x), q)


def act_outlier_groups(xs: list, fmt, hi, weights: list, fraction: float, rows: int = 4096) -> tuple[torch.Tensor, list]:
    """FMPQ's groups of activation ``fmt`` to keep at ``hi``: the ``max(1, round(fraction * groups))``
    groups along K whose switch from ``fmt`` to ``hi`` removes the most output error
    ``||(Q(X) - X)_g W_g^T||^2`` of the linears ``weights`` on rows ``xs`` (at most ``rows``, evenly
    spaced). Returns the column mask ``[K]`` and the chosen group indices."""
    x, w = _site_rows(xs, weights, rows)
    k = x.shape[-1]
    d_lo, d_hi = fmt.fake_quantize(x) - x, hi.fake_quantize(x) - x
    g = fmt.group_size
    starts = range(0, k, g)
    gain = torch.tensor([float((d_lo[:, s:s + g] @ w[:, s:s + g].T).pow(2).sum()
                               - (d_hi[:, s:s + g] @ w[:, s:s + g].T).pow(2).sum()) for s in starts])
    n = min(len(gain), max(1, round(fraction * len(gain))))
    chosen = sorted(gain.topk(n).indices.tolist())
    mask = torch.zeros(k, dtype=torch.bool)
    for i in chosen:
        mask[i * g:(i + 1) * g] = True
    return mask, chosen


def quantize_weights(gm: GraphModule, ctx: PassContext) -> GraphModule:
    r = ctx.recipe
    ops = [op for op in quantizable_ops(gm) if WEIGHT_FORMAT in op.node.meta]
    if not (r.sequential_gptq and ctx.calibration):
        for op in ctx.progress(ops, desc=f"quantize weights ({r.weight_algorithm})"):
            _quantize_op(gm, ctx, op, _stats_hessian(ctx))
        return gm
    # sequential: each weight on the inputs the already-quantized ops upstream produce
    ops = [op for op in ops if op.weight is not None]
    by_node = {op.node: op for op in ops}
    bar = iter(ctx.progress(ops, desc=f"quantize weights ({r.weight_algorithm}, sequential)"))
    # ops reading one input with one activation format (q/k/v) share its (quantized) rows and Hessians
    shared: dict = {"key": None, "xs": None, "hessians": {}}

    searched: dict = {}  # activation node -> chosen clip (act_clip_search)
    outliers: dict = {}  # activation node -> (hi format, column mask) (act_outlier_fraction)

    nb = len(ctx.calibration)
    two = r.gptq_float_target  # batches [nb, 2nb) replay the float model beside the quantized one

    full = {}  # the replay's values(), both halves

    def hook(node, values):
        full["values"] = values
        sub = _hook(node, (lambda n: values(n)[:nb]) if two else values)
        if not two:
            return sub
        op = by_node[node]
        out = {}
        for k, v in sub.items():
            orig = values(k)[nb:] if k is op.activation else [get_tensor(gm, k.target)] * nb
            out[k] = (v if isinstance(v, list) else [v] * nb) + orig
        return out

    def _hook(node, values):
        op = by_node[node]
        next(bar, None)
        afmt = op.node.meta.get(ACT_FORMAT)
        act_q = afmt is not None and afmt.dynamic and op.kind != "grouped"
        if act_q and r.act_clip_search and afmt.kind == "int" and op.kind == "linear" \
                and op.activation not in searched:
            readers = [o for o in ops if o.activation is op.activation and o.kind == "linear"
                       and o.node.meta.get(ACT_FORMAT) == afmt]
            clip, errs = act_clip(values(op.activation), afmt, [get_tensor(gm, o.weight.target) for o in readers])
            searched[op.activation] = clip
            for o in readers:
                o.node.meta[ACT_FORMAT] = dataclasses.replace(afmt, clip=clip)
                ctx.report.setdefault("act_clip", {})[o.name] = {"clip": clip,
                                                                 "rel_err": {f"{c:g}": e for c, e in errs.items()}}
            afmt = op.node.meta[ACT_FORMAT]
        if act_q and r.act_outlier_fraction and afmt.kind == "int" and afmt.granularity == "group" \
                and op.kind == "linear" and op.activation not in outliers:
            readers = [o for o in ops if o.activation is op.activation and o.kind == "linear"
                       and o.node.meta.get(ACT_FORMAT) == afmt]
            hi = dataclasses.replace(afmt, bits=r.act_outlier_bits, clip=1.0)
            mask, chosen = act_outlier_groups(values(op.activation), afmt, hi,
                                              [get_tensor(gm, o.weight.target) for o in readers], r.act_outlier_fraction)
            outliers[op.activation] = (hi, mask)
            for o in readers:
                o.node.meta[ACT_OUTLIERS] = (hi, mask)
                ctx.report.setdefault("act_outliers", {})[o.name] = {"format": hi.tag, "groups": chosen,
                                                                     "of": -(-mask.numel() // afmt.group_size)}
        key = (op.activation.name, afmt.tag if act_q else None)
        if op.kind in ("conv", "recurrent"):  # rounded without a Hessian; later ops see its dequantized weight
            return {op.weight: _quantize_op(gm, ctx, op, lambda k: (None, 0), sequential=True)}
        if shared["key"] != key:
            xs = values(op.activation)
            if act_q:  # the deployed op sees its input quantized: so do the Hessian and the op's output
                xs = [act_fake_quantize(x, afmt, op.node.meta.get(ACT_OUTLIERS)) for x in xs]
            hessians = {op.activation.name: _hessian(xs)}
            if op.kind == "grouped":  # rows [start, end) of each batch go to expert e (offsets: args[2])
                bounds = [[0] + offs.tolist() for offs in values(op.node.args[2])]
                for e in range(op.experts):
                    rows = [x[b[e]:b[e + 1]] for x, b in zip(xs, bounds)]
                    hessians[expert_key(op.activation.name, e)] = _hessian(rows)
            cross = _cross(xs, full["values"](op.activation)[nb:]) if two else None
            shared.update(key=key, xs=xs, hessians=hessians, cross=cross, factors={})
        h_of = lambda k: shared["hessians"].get(k, (None, 0))  # noqa: E731
        target = None
        if two and op.kind == "linear":  # fit the float model's output (GPTAQ)
            target = _float_target(get_tensor(gm, op.weight.target).float(), shared["cross"],
                                   shared["hessians"][op.activation.name][0], r.gptq_damp)
        sub = {op.weight: _quantize_op(gm, ctx, op, h_of, sequential=True, target=target, factors=shared["factors"])}
        if act_q:
            sub[op.activation] = shared["xs"]
        return sub

    replay(gm, list(ctx.calibration) * (2 if two else 1), [op.node for op in ops], hook)
    for _ in bar:
        pass
    for name, rec in ctx.report.pop("act_clip", {}).items():  # into each linear's layer record
        ctx.report["layers"][name]["act_clip"] = rec
    for name, rec in ctx.report.pop("act_outliers", {}).items():
        ctx.report["layers"][name]["act_outliers"] = rec
    return gm
