"""Normalize the exported graph before any analysis.

Removes ``aten._assert_tensor_metadata`` / ``_assert_scalar`` checks that ``torch.export`` leaves
behind (they return nothing and would pin dtypes that later passes legitimately change) and
inference-mode dropouts (``aten.dropout(x, p, train=False)`` is the identity, and would hide
dataflow such as a residual add from the graph analyses), rewrites mixture-of-experts grouped
matmuls over a transposed constant ``[E, N, K]`` (``transformers::grouped_mm_fallback``,
``aten._grouped_mm``) into ``finegrain::grouped_linear`` on the constant itself (so expert
weights are quantizable ops with a linear's layout; a constant stored ``[E, K, N]`` and multiplied as
is, GPT-OSS's, is stored transposed under its name), rewrites ``addmm(bias, x, W)`` over a
constant (GPT-2's Conv1D) into a linear on ``W^T`` and ``x @ W.T`` over a constant ``W`` (Falcon's
``FalconLinear``) into ``linear(x, W)``, turns ``type_as`` casts into ``to`` (or
nothing when the dtypes agree) and drops casts of a constant to the dtype it has (Helium's
``w.to(float32)`` norm gain), folds inference-mode BatchNorm into the convolution before it
(``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per output
channel; ``ctx.report["folds"]`` records each BatchNorm as folded or refused, with the reason),
rewrites a LayerNorm written out as arithmetic (Cohere's ``(x - mean) * rsqrt(var + eps)``, then
``w * ...``) into ``aten.layer_norm`` (exact up to float rounding),
marks each LSTM / GRU / RNN weight matrix with ``finegrain::weight`` (a quantizable op of kind
``recurrent``), then removes dead code.
Requires: a captured graph. Ensures: no assertion nodes; same function (BatchNorm folds exact up
to float rounding).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import CONV_OPS, RECURRENT_OPS, get_tensor, set_tensor
from finegrain.compiler.ops import GROUPED_LINEAR

_GROUPED_MM = ("transformers.grouped_mm_fallback.default", "aten._grouped_mm.default")
_TRANSPOSE = {torch.ops.aten.transpose.int, torch.ops.aten.permute.default}
_ASSERTIONS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default}


def _expert_weight(node):
    """The ``[E, N, K]`` constant that ``node`` transposes to ``[E, K, N]``, else None."""
    if not (node.op == "call_function" and node.target in _TRANSPOSE and node.args[0].op == "get_attr"):
        return None
    if node.target is torch.ops.aten.transpose.int:
        ok = sorted(d % 3 for d in node.args[1:]) == [1, 2]
    else:
        ok = [d % 3 for d in node.args[1]] == [0, 2, 1]
    return node.args[0] if ok else None


def _grouped_mm(gm: GraphModule, node) -> None:
    x, w = node.args[0], node.args[1]
    offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    const = _expert_weight(w)
    if offs is None or len(node.args) > 3 or set(node.kwargs) - {"offs"}:
        return  # another layout (bias, scales): left as the model wrote it
    if const is None:  # GPT-OSS stores its experts [E, K, N]: keep them [E, N, K] under the same name
        v = w.meta.get("val") if getattr(w, "op", None) == "get_attr" else None
        if not (isinstance(v, torch.Tensor) and v.dim() == 3 and len(w.users) == 1):
            return
        t = get_tensor(gm, w.target)
        set_tensor(gm, w.target, t.transpose(1, 2).contiguous())
        w.meta["val"] = torch.empty(t.shape[0], t.shape[2], t.shape[1], dtype=t.dtype, device="meta")
        const = w
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(GROUPED_LINEAR, (x, const, offs))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _type_as(gm: GraphModule, node) -> None:
    """``type_as(a, b)`` (a cast back to the input's dtype, as norms computing in fp32 end) reads
    ``b`` only for its dtype: it becomes ``to(a, dtype)``, a pass-through cast, or nothing when
    the dtypes already agree, so ``b`` (often a residual stream) gains no reader."""
    a, b = node.args[0], node.args[1]
    va, vb = a.meta.get("val"), b.meta.get("val")
    if vb is None:
        return
    if va is not None and va.dtype == vb.dtype:
        node.replace_all_uses_with(a)
    else:
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.aten.to.dtype, (a, vb.dtype))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _noop_constant_cast(node) -> bool:
    """``to(c, dtype)`` of a constant already in that dtype: the identity (``aten.to`` returns its
    input), which would hide the constant from the analyses (a norm's gain is a constant vector)."""
    if not (node.op == "call_function" and node.target is torch.ops.aten.to.dtype and len(node.args) == 2
            and not node.kwargs):
        return False
    src = node.args[0]
    return getattr(src, "op", None) == "get_attr" and getattr(src.meta.get("val"), "dtype", None) == node.args[1]


def _addmm(gm: GraphModule, node) -> None:
    """``addmm(bias, x, W)`` with a constant ``W [K, N]`` read by nothing else (GPT-2's Conv1D) is
    a linear with the transposed weight: store ``W^T`` under the same name and make it
    ``linear(x, W^T, bias)``, so it is found, quantized and folded like every linear."""
    bias, x, w = node.args[:3]
    if (len(node.args) > 3 or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1
            or not (w.op == "get_attr" and len(w.users) == 1)
            or not (bias is None or (bias.op == "get_attr" and len(bias.users) == 1))):
        return
    t = get_tensor(gm, w.target)
    if t.dim() != 2:
        return
    set_tensor(gm, w.target, t.T.contiguous())
    w.meta["val"] = torch.empty(t.shape[1], t.shape[0], dtype=t.dtype, device="meta")
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(torch.ops.aten.linear.default, (x, w, bias))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _transposed_constant(t):
    """The 2-D constant ``W`` that ``t`` transposes (``W.T``, ``t(W)``, ``transpose(W, 0, 1)``,
    ``permute(W, [1, 0])``), else None."""
    if not (getattr(t, "op", None) == "call_function" and getattr(t.args[0], "op", None) == "get_attr"):
        return None
    v = t.args[0].meta.get("val")
    if not isinstance(v, torch.Tensor) or v.dim() != 2:
        return None
    aten = torch.ops.aten
    if t.target in (aten.numpy_T.default, aten.t.default):
        return t.args[0]
    if t.target is aten.transpose.int and sorted(d % 2 for d in t.args[1:3]) == [0, 1]:
        return t.args[0]
    if t.target is aten.permute.default and [d % 2 for d in t.args[1]] == [1, 0]:
        return t.args[0]
    return None


def _matmul(gm: GraphModule, node) -> None:
    """``x @ W.T`` over a constant ``W [N, K]`` (Falcon's ``FalconLinear``, models that skip
    ``nn.Linear``'s forward) is ``linear(x, W)``: found, quantized and folded like every linear."""
    x, t = node.args[:2]
    w = _transposed_constant(t)
    xv = x.meta.get("val") if hasattr(x, "meta") else None
    if w is None or node.kwargs or not isinstance(xv, torch.Tensor) or xv.dim() < 2:
        return
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(torch.ops.aten.linear.default, (x, w))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


_BATCH_NORMS = {torch.ops.aten.batch_norm.default: 7, torch.ops.aten._native_batch_norm_legit_no_training.default: 6}


def _batch_norm(gm: GraphModule, node, log: list) -> None:
    """Fold an inference-mode BatchNorm into the convolution that alone feeds it."""
    import operator

    from finegrain.compiler.ir import MODULE

    x, gamma, beta, mean, var = node.args[:5]
    eps = node.args[_BATCH_NORMS[node.target]]
    site = node.meta.get(MODULE) or node.name
    out = node
    if node.target is torch.ops.aten._native_batch_norm_legit_no_training.default:  # (y, mean, rstd): y only
        users = list(node.users)
        if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
            return
        out = users[0]
    elif node.args[5]:  # training=True: batch statistics, not a fixed affine
        log.append({"pass": "fold_batchnorm", "site": site, "action": "refused", "detail": "training-mode BatchNorm"})
        return

    def why_not() -> str | None:
        if not (isinstance(x, torch.fx.Node) and x.op == "call_function" and x.target in CONV_OPS):
            return f"its input is {getattr(x, 'target', x)} ({getattr(x, 'name', '')}), not a convolution"
        if len(x.users) != 1:
            return f"the convolution {x.name} has other readers"
        if x.target is torch.ops.aten.convolution.default and x.args[6]:
            return f"the convolution {x.name} is transposed"
        w, b = x.args[1], x.args[2] if len(x.args) > 2 else None
        consts = [w, b, gamma, beta, mean, var]
        if not all(c is None or (isinstance(c, torch.fx.Node) and c.op == "get_attr") for c in consts) \
                or mean is None or var is None:
            return "its parameters or the convolution's weight are not constants"
        if len(w.users) != 1 or (b is not None and len(b.users) != 1):
            return "the convolution's weight or bias is shared with another op"
        return None

    reason = why_not()
    if reason is not None:
        log.append({"pass": "fold_batchnorm", "site": site, "action": "refused", "detail": reason})
        return
    conv = x
    w_node, b_node = conv.args[1], conv.args[2] if len(conv.args) > 2 else None
    w = get_tensor(gm, w_node.target)
    t = lambda n, default: get_tensor(gm, n.target).double() if n is not None else default  # noqa: E731
    o = w.shape[0]
    s = t(gamma, torch.ones(o, dtype=torch.float64)) / torch.sqrt(t(var, None) + float(eps))
    bias = (t(b_node, torch.zeros(o, dtype=torch.float64)) - t(mean, None)) * s + t(beta, torch.zeros(o, dtype=torch.float64))
    set_tensor(gm, w_node.target, (w.double() * s.reshape(-1, *[1] * (w.dim() - 1))).to(w.dtype))
    if b_node is None:
        name = f"{w_node.target.rsplit('.', 1)[0]}.folded_bias" if "." in w_node.target else f"{w_node.target}_folded_bias"
        set_tensor(gm, name, bias.to(w.dtype))
        with gm.graph.inserting_before(conv):
            b_node = gm.graph.get_attr(name)
        b_node.meta["val"] = torch.empty(o, dtype=w.dtype, device="meta")
        args = list(conv.args) + [None] * (3 - len(conv.args))
        args[2] = b_node
        conv.args = tuple(args)
    else:
        set_tensor(gm, b_node.target, bias.to(w.dtype))
    out.replace_all_uses_with(conv)
    into = conv.meta.get(MODULE) or conv.name
    log.append({"pass": "fold_batchnorm", "site": site, "action": "folded", "into": into,
                "detail": f"BatchNorm affine and running statistics into {into}'s weight and bias"})


def _keepdim_mean(n) -> bool:
    aten = torch.ops.aten
    return (getattr(n, "op", None) == "call_function" and n.target is aten.mean.dim and list(n.args[1]) == [-1]
            and bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)))


def _centered(n, x=None):
    """``(x, mean)`` when ``n`` is ``x - mean(x, -1, keepdim=True)`` (``x`` fixed when given), else None."""
    aten = torch.ops.aten
    if not (getattr(n, "op", None) == "call_function" and n.target is aten.sub.Tensor and len(n.args) == 2
            and not n.kwargs and _keepdim_mean(n.args[1]) and n.args[1].args[0] is n.args[0]):
        return None
    return (n.args[0], n.args[1]) if x is None or n.args[0] is x else None


def _hand_layer_norm(gm: GraphModule, rsqrt) -> None:
    """A LayerNorm written out (Cohere's: ``(x - mean) * rsqrt(mean((x - mean)^2) + eps)``, the
    centering computed once or twice, then ``w * normalized``) becomes ``aten.layer_norm(x, [d], w,
    None, eps)``, so the norm folds, smoothing and rotations see a LayerNorm. Anything else reading
    the intermediate values leaves the graph as it was."""
    aten = torch.ops.aten
    add = rsqrt.args[0]
    if not (add.op == "call_function" and add.target in (aten.add.Tensor, aten.add.Scalar) and len(add.args) == 2
            and isinstance(add.args[1], float) and not add.kwargs and len(add.users) == 1):
        return
    var = add.args[0]
    if not (_keepdim_mean(var) and len(var.users) == 1):
        return
    sq = var.args[0]
    if sq.op == "call_function" and sq.target is aten.pow.Tensor_Scalar and sq.args[1] == 2:
        centered = sq.args[0]
    elif sq.op == "call_function" and sq.target is aten.mul.Tensor and sq.args[0] is sq.args[1]:
        centered = sq.args[0]
    else:
        return
    found = _centered(centered)
    if found is None or len(sq.users) != 1 or len(rsqrt.users) != 1:
        return
    x, mean = found
    (normalized,) = rsqrt.users
    if not (normalized.target is aten.mul.Tensor and len(normalized.args) == 2 and not normalized.kwargs):
        return
    other = normalized.args[0] if normalized.args[1] is rsqrt else normalized.args[1]
    if _centered(other, x) is None or other.args[1] is not mean:
        return
    subs = {centered, other}
    if not (all(u in subs for u in mean.users) and all(set(s.users) <= {sq, normalized} for s in subs)):
        return
    xv = x.meta.get("val")
    d = xv.shape[-1] if isinstance(xv, torch.Tensor) and xv.dim() >= 1 else None
    if not isinstance(d, int):
        return
    out, weight = normalized, None
    if len(normalized.users) == 1:
        (u,) = normalized.users
        w = (u.args[0] if u.args[1] is normalized else u.args[1]) if u.target is aten.mul.Tensor else None
        wv = w.meta.get("val") if getattr(w, "op", None) == "get_attr" else None
        if (len(u.args) == 2 and not u.kwargs and isinstance(wv, torch.Tensor) and wv.dim() == 1
                and wv.shape[0] == d and wv.dtype == xv.dtype):
            out, weight = u, w
    with gm.graph.inserting_before(out):
        new = gm.graph.call_function(aten.layer_norm.default, (x, [d], weight, None, float(add.args[1])))
    new.meta.update(out.meta)
    out.replace_all_uses_with(new)


def _recurrent(gm: GraphModule, node) -> None:
    """Each 2-D weight of an LSTM / GRU / RNN (``weight_ih`` / ``weight_hh`` per layer and direction,
    gates stacked along N) is read through ``finegrain::weight``, so it is a quantizable op (kind
    ``recurrent``) like a linear's weight; biases stay float."""
    from finegrain.compiler.ops import WEIGHT

    params = list(node.args[2])
    for i, p in enumerate(params):
        if getattr(p, "op", None) == "get_attr" and get_tensor(gm, p.target).dim() == 2:
            with gm.graph.inserting_before(node):
                params[i] = gm.graph.call_function(WEIGHT, (p,))
            params[i].meta["val"] = p.meta.get("val")
    node.args = (node.args[0], node.args[1], params, *node.args[3:])


def canonicalize(gm: GraphModule, ctx: PassContext | None) -> GraphModule:
    log = ctx.report.setdefault("folds", []) if ctx is not None else []
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _BATCH_NORMS:
            _batch_norm(gm, node, log)
        elif node.op == "call_function" and node.target in RECURRENT_OPS:
            _recurrent(gm, node)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and str(node.target) in _GROUPED_MM:
            _grouped_mm(gm, node)
        elif node.op == "call_function" and node.target in _ASSERTIONS and not node.users:
            gm.graph.erase_node(node)
        elif (node.op == "call_function" and node.target is torch.ops.aten.dropout.default
              and len(node.args) > 2 and node.args[2] is False):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.ops.aten.type_as.default:
            _type_as(gm, node)
        elif _noop_constant_cast(node):  # `self.weight.to(torch.float32) * x` (Helium's, Cohere's norms) in fp32
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.ops.aten.addmm.default:
            _addmm(gm, node)
        elif node.op == "call_function" and node.target in (torch.ops.aten.matmul.default, torch.ops.aten.mm.default):
            _matmul(gm, node)
    for node in list(gm.graph.nodes):  # after the casts above are gone (Cohere's `w.to(float32) * x`)
        if node.op == "call_function" and node.target is torch.ops.aten.rsqrt.default:
            _hand_layer_norm(gm, node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
