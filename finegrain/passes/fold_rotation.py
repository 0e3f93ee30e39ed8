"""Rotate residual streams by a random Hadamard matrix (QuaRot), offline where the graph allows,
online (fast Walsh-Hadamard custom op) where it does not.

Computational invariance (SliceGPT, Ashkboos et al. 2024, Thm. 1; QuaRot, Ashkboos et al. 2024,
Sec. 4): with weightless RMSNorms (``fold_norms`` first), RMSNorm(x Q) = RMSNorm(x) Q for any
orthogonal Q, because ||x Q|| = ||x||. Rotating the residual stream x -> x Q is then exact when

* every embedding writing the stream becomes E' = E Q (rows are stream vectors);
* every linear writing the stream (o_proj, down_proj, ...) becomes W' = Q^T W, b' = b Q
  (torch's y = x W^T + b convention, W is [out, in]);
* every linear reading a norm of the stream (q/k/v, gate/up, the LM head) becomes W' = W Q.

Q = diag(random signs) H / sqrt(d) (``formats/hadamard.py``; any d with a known Hadamard factor,
else block-diagonal, reported). The stream, its writers, norms and readers come from
``compiler/regions.py``; a stream that breaks a condition (a norm still carrying an affine, a
stream tensor read by another op, e.g. post-norm BERT) is refused with the reason and left
unchanged. LayerNorm streams (OPT, GPT-2-style, ViT) are first made mean-free (SliceGPT Sec. 3.1:
embeddings and writers centered, exact because every reader is a norm), after which their
LayerNorms are RMSNorms and are rewritten as such; then they rotate like Llama's.

Online rotations (``recipe.online_hadamard``): the inputs of activation-quantized linears that no
offline rotation reaches (down_proj after the SwiGLU product, o_proj after attention; with
``recipe.rotation_mode="online"`` every one of them, q/k/v and gate/up included) get a
``finegrain::hadamard`` node computing x M (M = H / sqrt(K), O(K log K)), and M^T is folded into
the weight: x W^T = (x M)(W M)^T, so W' = W M. One node per activation tensor, shared by its
readers. QuaRot's per-head V/O rotation and the K rotation only matter for a quantized KV cache:
they are ``recipe.kv_rotate`` (``passes/fold_kv_rotation.py`` folds the V/O one, ``quantize_kv``
adds the K one online).

A tied LM head stays tied: ``fold_norms`` leaves the final norm's weight g alone, the embedding
becomes E Q for both readers, and its gain g (Gemma: 1 + w) moves into a d x d ``aten.matmul`` by M = Q^T diag(g) Q on the
norm output (1.3 MB for SmolLM2, instead of a 113 MB untied fp32 LM head).

Requires: ``fold_norms`` ran. Ensures: the function is unchanged (up to float rounding); the only
nodes added are ``finegrain::hadamard`` ops and their factor constants (plus the RMSNorm
arithmetic replacing a LayerNorm, and the matmul of a tied LM head); a second run changes
nothing (rotated streams and existing online rotations are marked / recognized).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import MODULE, get_tensor, producer, quantizable_ops, set_tensor
from finegrain.compiler.regions import (Stream, describe, find_norms, find_streams, linear_bias, linear_weight,
                                        module_name, new_constant, own_constant, readers, set_linear_bias,
                                        set_linear_weight, tied_embedding, tied_norm)
from finegrain.formats.hadamard import hadamard_matrix, hadamard_parts, random_orthogonal_hadamard
from finegrain.compiler.ops import HADAMARD

aten = torch.ops.aten

ROTATED = "finegrain_rotated"  # meta on a stream's embedding node: the stream is rotated


def _check(st: Stream) -> str | None:
    if st.refusal:
        return st.refusal
    for nm in st.norms:
        if nm.kind == "layer" and list(nm.output.args[1] if nm.output.target is aten.layer_norm.default
                                       else nm.output.args[0].args[1]) != [st.dim]:
            return f"LayerNorm {nm.name} normalizes over more than the last dimension"
        if (nm.weight is not None or nm.bias is not None) and not (
                tied_norm(nm) and all(tied_embedding(lin) in st.sources for lin in readers(nm.output).linears)):
            return f"norm {nm.name} still has an affine weight (fold_norms refused it; see its entry)"
        r = readers(nm.output, experts=True)
        if r.others:
            return f"output of norm {nm.name} is read by {describe(r.others[0])}, not only by linears"
    if not st.norms:
        return "no norm reads the stream"
    return None


def _center_stream(gm: GraphModule, st: Stream) -> None:
    """SliceGPT's LayerNorm -> RMSNorm conversion (Ashkboos et al. 2024, Sec. 3.1): make every
    write to the stream mean-free (embedding rows E' = E - mean_j E, writers W' = W - mean_rows W,
    b' = b - mean b). Every reader is a norm, and a LayerNorm subtracts the mean anyway, so the
    function is unchanged; the stream then has zero mean per token, where LayerNorm = RMSNorm."""
    for emb in st.sources:
        w = own_constant(gm, emb, 0, "weight")
        e = get_tensor(gm, w.target)
        set_tensor(gm, w.target, (e.double() - e.double().mean(1, keepdim=True)).to(e.dtype))
    for lin in st.writers:
        w = linear_weight(gm, lin).double()
        set_linear_weight(gm, lin, w - w.mean(-2, keepdim=True))  # over outputs (N of [N, K] / [E, N, K])
        b = linear_bias(gm, lin)
        if b is not None:
            set_linear_bias(gm, lin, b.double() - b.double().mean())


def _layer_to_rms(gm: GraphModule, nm) -> None:
    """Replace a weightless LayerNorm on a mean-free stream by x * rsqrt(mean(x^2) + eps)."""
    ln = nm.output if nm.output.target is aten.layer_norm.default else nm.output.args[0]
    eps = ln.args[4] if len(ln.args) > 4 else 1e-5
    x = nm.input
    g = gm.graph
    with g.inserting_before(nm.output):
        sq = g.call_function(aten.pow.Tensor_Scalar, (x, 2))
        mean = g.call_function(aten.mean.dim, (sq, [-1], True))
        add = g.call_function(aten.add.Tensor, (mean, eps))
        rs = g.call_function(aten.rsqrt.default, (add,))
        out = g.call_function(aten.mul.Tensor, (x, rs))
    for n in (sq, mean, add, rs, out):
        n.meta[MODULE] = nm.name
    out.meta["val"] = nm.output.meta.get("val")
    nm.output.replace_all_uses_with(out)
    g.erase_node(nm.output)
    if ln in g.nodes and not ln.users:
        g.erase_node(ln)


def _rotate_stream(gm: GraphModule, st: Stream, q: torch.Tensor) -> list[str]:
    tied = [nm for nm in st.norms if nm.weight is not None]  # _check: only tied-LM-head norms remain
    tied_weights = {lin.args[1] for nm in tied for lin in readers(nm.output).linears}
    for emb in st.sources:
        w = emb.args[0] if emb.args[0] in tied_weights else own_constant(gm, emb, 0, "weight")
        e = get_tensor(gm, w.target)
        set_tensor(gm, w.target, (e.double() @ q).to(e.dtype))  # tied readers read E Q too
        emb.meta[ROTATED] = True
    for nm in tied:
        # logits = n(x) diag(g) E^T = n(x Q) M (E Q)^T with M = Q^T diag(g) Q: the d x d M replaces
        # the norm weight so the LM head keeps reading the (rotated) embedding
        g = nm.gain_value(gm).double()  # Gemma's (1 + w), not w: random init has w = 0
        m = new_constant(gm, f"{nm.name}.rotated_weight", (q.T @ torch.diag(g) @ q).float())
        with gm.graph.inserting_after(nm.affine):
            mm = gm.graph.call_function(aten.matmul.default, (nm.affine_input, m))
        mm.meta.update({k: v for k, v in nm.affine.meta.items() if k in ("val", MODULE)})
        nm.affine.replace_all_uses_with(mm)
        gm.graph.erase_node(nm.affine)
    for lin in st.writers:
        w = linear_weight(gm, lin).double()
        b = linear_bias(gm, lin)
        set_linear_weight(gm, lin, q.T @ w)  # [d, d] @ [N = d, K], or per expert [E, d, K]
        if b is not None:
            set_linear_bias(gm, lin, b.double() @ q)
    read = []
    for nm in st.norms:
        if nm in tied:
            continue
        for lin in readers(nm.output, experts=True).linears:  # [N, K] or the experts' [E, N, K]
            set_linear_weight(gm, lin, linear_weight(gm, lin).double() @ q)
            read.append(lin)
    return read


def fold_rotation(gm: GraphModule, ctx: PassContext) -> GraphModule:
    recipe = ctx.recipe
    if not recipe.rotate:
        return gm
    log = ctx.report.setdefault("folds", [])
    norms = find_norms(gm)
    streams = find_streams(gm, norms) if recipe.rotation_mode == "residual" else []
    if recipe.rotation_mode == "residual" and not streams:  # never a silent fallback
        log.append({"pass": "fold_rotation", "site": "residual streams", "action": "refused",
                    "detail": "no residual stream starting at an embedding was found, so none is rotated"
                              + ("; activation-quantized linears get an online Hadamard instead"
                                 if recipe.online_hadamard else "")})
    for i, st in enumerate(streams):
        site = f"residual stream {i} (dim {st.dim}, from {', '.join(module_name(s) for s in st.sources)})"
        if any(s.meta.get(ROTATED) for s in st.sources):
            continue
        why = _check(st)
        if why:
            log.append({"pass": "fold_rotation", "site": site, "action": "refused", "detail": why})
            continue
        layer_norms = [nm for nm in st.norms if nm.kind == "layer"]
        if layer_norms:
            _center_stream(gm, st)
            for nm in layer_norms:
                _layer_to_rms(gm, nm)
            st = next(s2 for s2 in find_streams(gm) if set(s2.sources) == set(st.sources))
        q, exact = random_orthogonal_hadamard(st.dim, recipe.rotation_seed + i)
        read = _rotate_stream(gm, st, q)
        kind = "randomized Hadamard" if exact else "block-diagonal randomized Hadamard (no full one of this order known)"
        conv = f" ({len(layer_norms)} LayerNorms made RMSNorms on the mean-free stream)" if layer_norms else ""
        log.append({"pass": "fold_rotation", "site": site, "action": "folded",
                    "detail": f"{kind}: {len(st.sources)} embedding(s), {len(st.writers)} writer linear(s), "
                              f"{len(st.norms)} norm(s), {len(read)} reader linear(s){conv}"})
    if recipe.online_hadamard:
        _online(gm, ctx, log)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _rotated_inputs(gm: GraphModule) -> set[Node]:
    """Activation tensors already in a rotated basis: outputs of norms on rotated streams."""
    out = set()
    for st in find_streams(gm):
        if any(s.meta.get(ROTATED) for s in st.sources):
            out.update(producer(nm.output) for nm in st.norms)
    return out


def _online(gm: GraphModule, ctx: PassContext, log: list) -> None:
    rotated = _rotated_inputs(gm)
    groups: dict[Node, list[Node]] = {}
    for op in quantizable_ops(gm):
        if op.kind != "linear" or op.weight is None:
            continue
        if ctx.recipe.formats_for(op.role, op.name)[1] is None:
            continue  # activation stays in float: no rotation needed
        act = op.activation
        src = producer(act)
        if src in rotated or (src.op == "call_function" and src.target is HADAMARD):
            continue
        groups.setdefault(act, []).append(op.node)
    factors: dict[int, Node] = {}
    for act, lins in groups.items():
        k = int(linear_weight(gm, lins[0]).shape[1])
        factor, _, exact = hadamard_parts(k)
        if k not in factors:
            factors[k] = new_constant(gm, f"hadamard.factor_{k}", factor.float())
        with gm.graph.inserting_after(act):
            h = gm.graph.call_function(HADAMARD, (act, factors[k]))
        h.meta["val"] = act.meta.get("val")
        h.meta[MODULE] = lins[0].meta.get(MODULE)
        m = hadamard_matrix(k)[0] / k ** 0.5
        for lin in lins:
            lin.args = (h, *lin.args[1:])
            set_linear_weight(gm, lin, linear_weight(gm, lin).double() @ m)
        log.append({"pass": "fold_rotation", "site": ", ".join(module_name(lin) for lin in lins), "action": "online",
                    "detail": f"online Hadamard (dim {k}{'' if exact else ', block-diagonal'}) on the input, "
                              "its transpose folded into the weight"})
