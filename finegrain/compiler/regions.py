"""Graph analysis for the folding passes: normalization layers, the linears that read a tensor,
and residual streams. Everything is found from dataflow, never from module names.

* :func:`find_norms`: RMSNorm (the ``x * rsqrt(mean(x^2) + eps)`` pattern transformers emits, or
  ``aten.rms_norm``) and LayerNorm (``aten.layer_norm`` / ``aten.native_layer_norm``), with their
  affine weight / bias constants.
* :func:`readers`: the ops that consume a tensor, looking through pass-through ops (view, to, ...),
  split into linears that take it as their activation and everything else; with ``experts=True``
  also through a mixture-of-experts token dispatch (a row gather) into grouped expert linears.
* :func:`find_streams`: residual streams. Tensors joined by residual ``add``, pass-through ops and
  row ops (a row gather, a per-row scale such as a routing weight, a sum over rows: each commutes
  with any map along the last dim) form connected components (networkx); a component that
  contains an embedding lookup is a stream. For a rotation to fold exactly, every tensor in it must
  be produced by an embedding or another gather of a constant's rows (a per-expert bias; both
  "sources"), a linear or grouped expert linear ("writer"), an add of stream tensors or a row op,
  and read only by stream ops or RMSNorms. Streams that break a condition
  carry the reason (op and node) and are left alone.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from finegrain.compiler.ir import FQN, MODULE, PASS_THROUGH, get_tensor, set_tensor
from finegrain.compiler.ops import GROUPED_LINEAR

aten = torch.ops.aten


@dataclass
class Norm:
    kind: str  # "rms" | "layer"
    name: str  # module path (or node name)
    input: Node  # the tensor being normalized
    output: Node  # the tensor the rest of the graph reads (after the affine, if any)
    weight: Node | None  # get_attr of the affine weight
    bias: Node | None  # get_attr of the affine bias (LayerNorm)
    internal: set[Node] = field(default_factory=set)  # nodes implementing it, output included
    affine: Node | None = None  # rms pattern: the `mul(gain, normalized)` node
    normalized: Node | None = None  # rms pattern: the output before the affine
    gain: Node | None = None  # rms pattern: the affine's other operand (the weight, or `weight + offset`)
    weight_offset: float = 0.0  # the gain is `weight + weight_offset` (Gemma: 1 + w)
    weight_reader: tuple[Node, int] | None = None  # (node, arg index) reading the weight constant

    @property
    def affine_input(self) -> Node:
        """rms pattern: the operand of the affine ``mul`` that is not the gain."""
        a = self.affine.args
        return a[1] if a[0] is self.gain else a[0]

    def gain_value(self, gm: GraphModule) -> torch.Tensor | None:
        """The per-channel gain the affine multiplies by (``weight + weight_offset``)."""
        if self.weight is None:
            return None
        w = get_tensor(gm, self.weight.target)
        return w + self.weight_offset if self.weight_offset else w


def _val(n) -> torch.Tensor | None:
    return n.meta.get("val") if isinstance(n, Node) else None


def last_dim(n: Node) -> int | None:
    v = _val(n)
    if isinstance(v, torch.Tensor) and v.dim() >= 1:
        d = v.shape[-1]
        return int(d) if isinstance(d, int) else None
    return None


def _is_call(n, *targets) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in targets


def _single_pass_through_chain(n: Node) -> tuple[Node, list[Node]]:
    """Follow ``n`` forward while its only user is a pass-through op; return the last node."""
    chain = []
    while len(n.users) == 1:
        (u,) = n.users
        if _is_call(u, *PASS_THROUGH) and u.args[0] is n:
            chain.append(u)
            n = u
        else:
            break
    return n, chain


def _const_vector(n, dim: int | None) -> bool:
    v = _val(n)
    return (isinstance(n, Node) and n.op == "get_attr" and isinstance(v, torch.Tensor) and v.dim() == 1
            and dim is not None and v.shape[0] == dim)


def module_name(n: Node) -> str:
    """The path of the module that ran ``n`` (``model.layers.0.mlp.up_proj``), else its node name."""
    return n.meta.get(MODULE) or n.name


def _rms_pattern(rsqrt: Node) -> Norm | None:
    add = rsqrt.args[0]
    if not (_is_call(add, aten.add.Tensor, aten.add.Scalar) and isinstance(add.args[1], (int, float))):
        return None
    mean = add.args[0]
    if not (_is_call(mean, aten.mean.dim) and list(mean.args[1]) in ([-1],) and
            (len(mean.args) > 2 and mean.args[2] or mean.kwargs.get("keepdim"))):
        return None
    sq = mean.args[0]
    if _is_call(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2:
        x = sq.args[0]
    elif _is_call(sq, aten.mul.Tensor) and sq.args[0] is sq.args[1]:
        x = sq.args[0]
    else:
        return None
    muls = [u for u in rsqrt.users if _is_call(u, aten.mul.Tensor) and set(u.args) == {x, rsqrt}]
    if len(muls) != 1 or len(rsqrt.users) != 1 or len(add.users) != 1 or len(mean.users) != 1 or len(sq.users) != 1:
        return None
    normalized = muls[0]
    internal = {sq, mean, add, rsqrt, normalized}
    end, chain = _single_pass_through_chain(normalized)
    internal.update(chain)
    dim = last_dim(x)
    weight = affine = gain = reader = None
    offset = 0.0
    if len(end.users) == 1:
        (u,) = end.users
        if _is_call(u, aten.mul.Tensor) and len(u.args) == 2:
            other = u.args[0] if u.args[1] is end else u.args[1] if u.args[0] is end else None
            if _const_vector(other, dim):
                weight, affine, gain, reader = other, u, other, (u, u.args.index(other))
                internal.add(u)
            else:
                found = _offset_gain(other, dim)
                if found is not None:
                    weight, offset, reader, chain = found
                    affine, gain = u, other
                    internal.update({u, *chain})
    out = affine if affine is not None else end
    return Norm("rms", module_name(normalized), x, out, weight, None, internal, affine, normalized, gain, offset,
                reader)


def _offset_gain(n, dim: int | None) -> tuple[Node, float, tuple[Node, int], list[Node]] | None:
    """``weight + c`` (through casts), as Gemma's RMSNorm scales by ``1 + w``: (the weight's
    get_attr, c, the node reading the weight and its arg index, the nodes of the expression)."""
    if not (_is_call(n, aten.add.Tensor, aten.add.Scalar) and len(n.args) == 2 and len(n.users) == 1):
        return None
    a, c = n.args
    if isinstance(a, (int, float)):
        a, c = c, a
    if not isinstance(c, (int, float)) or isinstance(c, bool) or n.kwargs.get("alpha", 1) != 1:
        return None
    chain, reader = [n], (n, n.args.index(a))
    while _is_call(a, *PASS_THROUGH) and len(a.users) == 1:
        chain.append(a)
        reader = (a, 0)
        a = a.args[0]
    if not _const_vector(a, dim) or len(a.users) != 1:
        return None
    return a, float(c), reader, chain


def find_norms(gm: GraphModule) -> list[Norm]:
    norms = []
    for n in gm.graph.nodes:
        if _is_call(n, aten.rsqrt.default):
            norm = _rms_pattern(n)
            if norm is not None:
                norms.append(norm)
        elif _is_call(n, aten.rms_norm.default):
            w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
            norms.append(Norm("rms", module_name(n), n.args[0], n, w if isinstance(w, Node) else None, None, {n}))
        elif _is_call(n, aten.layer_norm.default):
            norm = _layer_norm(n, n, {n}, n.args[2] if len(n.args) > 2 else None,
                               n.args[3] if len(n.args) > 3 else None)
            if norm is not None:
                norms.append(norm)
        elif _is_call(n, aten.native_layer_norm.default):
            outs = [u for u in n.users if u.target is operator.getitem and u.args[1] == 0]
            if len(outs) == 1:
                norm = _layer_norm(n, outs[0], {n, *n.users}, n.args[2], n.args[3])
                if norm is not None:
                    norms.append(norm)
    return norms


def _layer_norm(ln: Node, out: Node, internal: set, w, b) -> Norm | None:
    """A LayerNorm node's :class:`Norm`: its weight / bias constants, or a weight computed as ``w + c``
    (Nemotron's LayerNorm1P scales by ``1 + w``: ``weight_offset``). A weight or bias computed any
    other way is not a norm the folds understand: None (the node then reads the residual stream as
    an unknown op, and a rotation of that stream is refused, naming it)."""
    dim = last_dim(ln.args[0])
    offset, reader = 0.0, None
    if isinstance(w, Node) and not _const_vector(w, dim):
        found = _offset_gain(w, dim)
        if found is None:
            return None
        w, offset, reader, chain = found
        internal = internal | set(chain)  # the chain starts at the `w + c` node
    if isinstance(b, Node) and not _const_vector(b, dim):
        return None
    return Norm("layer", module_name(ln), ln.args[0], out, w if isinstance(w, Node) else None,
                b if isinstance(b, Node) else None, internal, weight_offset=offset, weight_reader=reader)


@dataclass
class Readers:
    linears: list[Node]  # aten.linear nodes with a constant weight reading the tensor as activation
    others: list[Node]  # anything else (op nodes, or the graph output)


def row_gather(u: Node, n: Node) -> bool:
    """``u = n[idx]``: rows of ``n`` (2-D or more) picked along its first dim, the last dim untouched
    (a mixture-of-experts layer dispatching tokens to experts). It commutes with any map applied
    along the last dim: a per-channel scale, a rotation."""
    v = _val(n)
    return (_is_call(u, aten.index.Tensor) and u.args[0] is n and len(u.args[1]) == 1
            and isinstance(v, torch.Tensor) and v.dim() >= 2)


def readers(node: Node, experts: bool = False) -> Readers:
    """Consumers of ``node``'s value, looking through pass-through ops. ``experts``: also through row
    gathers (:func:`row_gather`), with ``finegrain::grouped_linear`` over a constant ``[E, N, K]``
    counted as a linear (callers that take this handle 3-D weights and no bias)."""
    lin, other, seen = [], [], set()
    frontier = [node]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if (_is_call(u, *PASS_THROUGH) and u.args[0] is n) or (experts and row_gather(u, n)):
                frontier.append(u)
            elif ((_is_call(u, aten.linear.default) or (experts and _is_call(u, GROUPED_LINEAR)))
                  and u.args[0] is n and isinstance(u.args[1], Node) and u.args[1].op == "get_attr"
                  and u.args[1] is not n):
                lin.append(u)
            else:
                other.append(u)
    return Readers(lin, other)


def tied_embedding(lin: Node) -> Node | None:
    """The ``aten.embedding`` reading the same weight constant as linear ``lin`` (a tied LM head)."""
    w = lin.args[1]
    for u in w.users:
        if u is not lin and _is_call(u, aten.embedding.default) and u.args[0] is w:
            return u
    return None


def tied_norm(norm: Norm) -> bool:
    """An RMSNorm with weight (no bias) whose only readers are linears tied to an embedding and
    whose weights nobody else reads: folding its weight would untie them."""
    if norm.affine is None or norm.bias is not None:
        return False
    r = readers(norm.output)
    if r.others or not r.linears:
        return False
    for lin in r.linears:
        emb = tied_embedding(lin)
        if emb is None or set(lin.args[1].users) - set(r.linears) - {emb}:
            return False
    return True


def describe(n: Node) -> str:
    """``aten.mul.Tensor at node mul_3 (model.layers.0.mlp)``: an op for error messages."""
    if n.op == "output":
        return "the graph output"
    target = getattr(n.target, "__name__", str(n.target))
    mod = n.meta.get(MODULE)
    return f"{target} at node {n.name}" + (f" ({mod})" if mod else "")


# ---- constants owned by one op ----------------------------------------------------------------
def _fresh_target(gm: GraphModule, base: str) -> str:
    existing = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    target, i = base, 1
    while target in existing:
        target, i = f"{base}_{i}", i + 1
    return target


def own_constant(gm: GraphModule, user: Node, arg_index: int, suffix: str) -> Node:
    """The get_attr at ``user.args[arg_index]``, copied to a new constant first if other nodes also
    read it (a tied embedding / LM head), so that changing it changes only ``user``."""
    c = user.args[arg_index]
    if len(c.users) == 1:
        return c
    base = f"{module_name(user)}.{suffix}"
    target = _fresh_target(gm, base)
    set_tensor(gm, target, get_tensor(gm, c.target).clone())
    with gm.graph.inserting_before(user):
        new = gm.graph.get_attr(target)
    new.meta.update({k: v for k, v in c.meta.items() if k != FQN})
    new.meta[FQN] = target
    args = list(user.args)
    args[arg_index] = new
    user.args = tuple(args)
    return new


def new_constant(gm: GraphModule, base: str, value: torch.Tensor, before: Node | None = None) -> Node:
    """A new get_attr constant named ``base`` (suffixed if taken), placed before ``before`` or,
    by default, at the top of the graph."""
    target = _fresh_target(gm, base)
    set_tensor(gm, target, value)
    if before is None:
        before = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta[FQN] = target
    node.meta["val"] = value
    return node


def linear_weight(gm: GraphModule, lin: Node) -> torch.Tensor:
    return get_tensor(gm, lin.args[1].target)


def linear_bias(gm: GraphModule, lin: Node) -> torch.Tensor | None:
    if lin.target is GROUPED_LINEAR:  # (x, w [E, N, K], offsets): experts carry no bias
        return None
    b = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    return get_tensor(gm, b.target) if isinstance(b, Node) else None


def set_linear_weight(gm: GraphModule, lin: Node, w: torch.Tensor) -> None:
    node = own_constant(gm, lin, 1, "weight")
    old = get_tensor(gm, node.target)
    set_tensor(gm, node.target, w.to(old.dtype))


def set_linear_bias(gm: GraphModule, lin: Node, b: torch.Tensor) -> None:
    """Set (or create) the bias of an ``aten.linear`` node."""
    if "bias" in lin.kwargs:
        lin.args = (*lin.args[:2], lin.kwargs["bias"])
        lin.kwargs = {k: v for k, v in lin.kwargs.items() if k != "bias"}
    dtype = linear_weight(gm, lin).dtype
    if len(lin.args) > 2 and isinstance(lin.args[2], Node):
        node = own_constant(gm, lin, 2, "bias")
        set_tensor(gm, node.target, b.to(dtype))
        return
    node = new_constant(gm, f"{module_name(lin)}.bias", b.to(dtype), before=lin)
    lin.args = (lin.args[0], lin.args[1], node)


def fold_into_readers(gm: GraphModule, lins: list[Node], scale: torch.Tensor | None,
                      shift: torch.Tensor | None) -> None:
    """Linears that read y = x * scale + shift are changed to read x with the same outputs:
    W' = W diag(scale), b' = b + W shift (in float64). Norm folding (x the normalized input) and
    smoothing (x the smoothed activation) both are this. Grouped expert weights ``[E, N, K]`` scale
    the same way; they have no bias, so ``shift`` must be None for them."""
    if shift is not None and any(lin.target is GROUPED_LINEAR for lin in lins):
        raise ValueError("a shift cannot be folded into grouped expert linears (no bias)")
    for lin in lins:
        w = linear_weight(gm, lin).double()
        if shift is not None:
            b = linear_bias(gm, lin)
            set_linear_bias(gm, lin, (b.double() if b is not None else 0.0) + w @ shift.double())
        if scale is not None:
            set_linear_weight(gm, lin, w * scale.double()[None, :])


# ---- residual streams -------------------------------------------------------------------------
@dataclass
class Stream:
    dim: int
    nodes: set[Node]
    sources: list[Node]  # aten.embedding nodes writing the stream
    writers: list[Node]  # aten.linear nodes writing the stream
    norms: list[Norm]  # norms reading the stream
    refusal: str | None = None  # why a rotation cannot be folded exactly


def _scalar_constant(a) -> bool:
    """A Python number, or a one-element constant (a get_attr, through casts)."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return True
    while _is_call(a, *PASS_THROUGH):
        a = a.args[0]
    v = _val(a)
    return isinstance(a, Node) and a.op == "get_attr" and isinstance(v, torch.Tensor) and v.numel() == 1


def _scaled_by_constant(n) -> Node | None:
    """For ``mul(x, c)`` with ``c`` a scalar constant: ``x``; else None."""
    if not (_is_call(n, aten.mul.Tensor) and len(n.args) == 2):
        return None
    a, b = n.args
    if isinstance(a, Node) and _scalar_constant(b) and not _scalar_constant(a):
        return a
    if isinstance(b, Node) and _scalar_constant(a) and not _scalar_constant(b):
        return b
    return None


def _row_scaled(n) -> Node | None:
    """The operand ``x`` of ``n = x * s`` where ``s`` has last dim 1 (one factor per row: a MoE
    routing weight, Qwen2-MoE's sigmoid-gated shared expert), else None."""
    if not (_is_call(n, aten.mul.Tensor) and len(n.args) == 2 and all(isinstance(a, Node) for a in n.args)):
        return None
    a, b = n.args
    if last_dim(b) == 1 and last_dim(a) == last_dim(n) != 1:
        return a
    if last_dim(a) == 1 and last_dim(b) == last_dim(n) != 1:
        return b
    return None


def _row_sum(n) -> Node | None:
    """The operand of a sum over dims other than the last (MoE: the top-k experts' outputs per token)."""
    v = _val(n.args[0]) if _is_call(n, aten.sum.dim_IntList) and len(n.args) > 1 else None
    if not (isinstance(v, torch.Tensor) and v.dim() >= 2 and n.args[1]):
        return None
    return n.args[0] if all(d % v.dim() != v.dim() - 1 for d in n.args[1]) else None


def _row_op(n) -> Node | None:
    """The stream operand of an op acting on rows only, which commutes with any map along the last
    dim (so with a rotation): a row gather, a per-row scale, a sum over rows; else None."""
    if _is_call(n, aten.index.Tensor) and isinstance(n.args[0], Node) and row_gather(n, n.args[0]):
        return n.args[0]
    return _row_scaled(n) or _row_sum(n)


def _is_add(n) -> bool:
    """``a + b``, or ``a.add_(b)`` updating a value nothing else reads (GPT-OSS adds its experts' biases
    in place to the grouped GEMM's fresh output): the same sum."""
    if _is_call(n, aten.add.Tensor):
        return True
    return (_is_call(n, aten.add_.Tensor) and len(n.args) == 2 and not n.kwargs and isinstance(n.args[0], Node)
            and set(n.args[0].users) == {n})


def _constant_rows(n) -> bool:
    """``C[idx]`` of a 2-D constant: rows of stream vectors looked up per token, as an embedding is
    (a per-expert bias gathered for each routed row)."""
    if not (_is_call(n, aten.index.Tensor) and isinstance(n.args[0], Node) and n.args[0].op == "get_attr"):
        return False
    v = _val(n.args[0])
    return isinstance(v, torch.Tensor) and v.dim() == 2 and row_gather(n, n.args[0])


def find_streams(gm: GraphModule, norms: list[Norm] | None = None) -> list[Stream]:
    norms = find_norms(gm) if norms is None else norms
    norm_of: dict[Node, Norm] = {}
    for nm in norms:
        for n in nm.internal:
            norm_of[n] = nm
    g = nx.Graph()
    for n in gm.graph.nodes:
        scaled = _scaled_by_constant(n)
        row = _row_op(n) if n not in norm_of else None  # a norm's x * rsqrt(...) is the norm's
        if not (_is_call(n, *PASS_THROUGH) or _is_add(n) or scaled is not None or row is not None):
            continue
        d = last_dim(n)
        if d is None or d == 1:
            continue
        operands = (n.args[:2] if _is_add(n) else [scaled] if scaled is not None
                    else [row] if row is not None else n.args[:1])
        for a in operands:
            if isinstance(a, Node) and a.op != "get_attr" and last_dim(a) == d:
                g.add_edge(a, n)
    streams = []
    for comp in nx.connected_components(g):
        if not any(_is_call(n, aten.embedding.default) for n in comp):
            continue
        sources = [n for n in comp if _is_call(n, aten.embedding.default) or _constant_rows(n)]
        st = Stream(last_dim(sources[0]), set(comp), sorted(sources, key=_order(gm)), [], [])
        for n in sorted(comp, key=_order(gm)):
            if n in sources:  # rotated like an embedding: C' = C Q
                continue
            if _is_call(n, aten.linear.default, GROUPED_LINEAR):  # grouped: the experts' down projections
                if isinstance(n.args[1], Node) and n.args[1].op == "get_attr":
                    st.writers.append(n)
                    continue
                st.refusal = f"stream written by {describe(n)} without a constant weight"
                break
            if _is_add(n):
                if not all(isinstance(a, Node) and a in comp for a in n.args[:2]):
                    st.refusal = f"{describe(n)} adds a non-stream operand to the stream"
                    break
                continue
            if _is_call(n, *PASS_THROUGH) and n.args[0] in comp:
                continue
            if _scaled_by_constant(n) in comp:  # x * c commutes with a rotation (Gemma's embedding scale)
                continue
            if n not in norm_of and _row_op(n) in comp:  # so do row gathers, per-row scales and row sums
                continue
            st.refusal = f"stream tensor produced by {describe(n)}"
            break
        if st.refusal is None:
            seen_norms = []
            for n in st.nodes:
                for u in n.users:
                    if u in comp:
                        continue
                    nm = norm_of.get(u)
                    if nm is None or nm.input not in comp:
                        st.refusal = f"stream tensor {n.name} is read by {describe(u)}, not only by norms and adds"
                        break
                    if nm not in seen_norms:
                        seen_norms.append(nm)
                if st.refusal:
                    break
            st.norms = sorted(seen_norms, key=lambda nm: _order(gm)(nm.output))
        streams.append(st)
    return streams


def _order(gm: GraphModule):
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: pos[n]
