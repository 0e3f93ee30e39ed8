"""The IR is a ``torch.fx.GraphModule`` of ATen ops (from ``torch.export``). This module holds the
``node.meta`` keys that passes communicate through, and the graph queries they share.

Constants are ``get_attr`` nodes whose target is the tensor's fully qualified name (FQN) in the
source model (``model.layers.0.self_attn.q_proj.weight``); quantized weights add
``<fqn>_packed`` / ``<fqn>_scale`` / ``<fqn>_zero`` beside it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch.fx import GraphModule, Node

from finegrain.compiler.ops import GROUPED_LINEAR, WEIGHT

aten = torch.ops.aten

# ---- meta keys (the only channel between passes, besides the stats store) -------------------
FQN = "finegrain_fqn"  # get_attr node: FQN of the tensor it loads
WEIGHT_FORMAT = "finegrain_weight_format"  # quantizable op: QuantFormat chosen for its weight
ACT_FORMAT = "finegrain_act_format"  # quantizable op: QuantFormat chosen for its input activation
ACT_OUTLIERS = "finegrain_act_outliers"  # quantizable op: (QuantFormat, bool mask [K]) of its 8-bit input groups (FMPQ)
QWEIGHT = "finegrain_qweight"  # quantizable op: QTensor of its quantized weight (quantize_weights)
ROLE = "finegrain_role"  # quantizable op: "linear" | "lm_head" | "router" | "matmul" | "conv" | "embedding" | "recurrent"
OBSERVED = "finegrain_observed"  # node whose output the stats store has statistics for
MODULE = "finegrain_module"  # call_function node: path of the innermost source module that ran it
KV = "finegrain_kv"  # node meta on a KV-cache graph's present keys / values: {"layer": i, "kind": "key" | "value"}

OpKind = Literal["linear", "grouped", "matmul", "conv", "embedding", "recurrent"]

# op -> (kind, index of the weight argument, index of the activation argument)
QUANTIZABLE: dict[object, tuple[OpKind, int, int]] = {
    aten.linear.default: ("linear", 1, 0),
    GROUPED_LINEAR: ("grouped", 1, 0),  # MoE experts: weight [E, N, K] (canonicalize.py)
    aten.convolution.default: ("conv", 1, 0),  # core ATen (decompose=True)
    aten.conv1d.default: ("conv", 1, 0),  # training IR (the default capture)
    aten.conv2d.default: ("conv", 1, 0),
    aten.conv3d.default: ("conv", 1, 0),
    aten.embedding.default: ("embedding", 0, 1),
    WEIGHT: ("recurrent", 0, 0),  # an LSTM / GRU / RNN weight matrix (canonicalize.py); no activation of its own
    aten.matmul.default: ("matmul", 1, 0),
    aten.mm.default: ("matmul", 1, 0),
    aten.bmm.default: ("matmul", 1, 0),
}

CONV_OPS = frozenset(op for op, (kind, _, _) in QUANTIZABLE.items() if kind == "conv")
# recurrent layers whose weight matrices canonicalize.py marks with finegrain::weight (the op's name for messages)
RECURRENT_OPS = {aten.lstm.input: "LSTM", aten.gru.input: "GRU", aten.rnn_tanh.input: "RNN", aten.rnn_relu.input: "RNN"}

# ops that move or re-type a tensor without computing on it
PASS_THROUGH = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
    aten.alias.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout,
    aten.contiguous.default, aten.detach.default,
}


@dataclass(frozen=True)
class QuantOp:
    """A quantizable op in the graph."""

    node: Node
    kind: OpKind
    role: str
    weight: Node | None  # the get_attr node of its constant weight, if any
    weight_fqn: str | None
    activation: Node  # the activation input

    @property
    def experts(self) -> int | None:
        """Number of experts of a grouped (MoE) op, from its weight ``[E, N, K]``; None otherwise."""
        if self.kind != "grouped":
            return None
        val = self.weight.meta.get("val") if self.weight is not None else None
        return int(val.shape[0]) if val is not None else None

    @property
    def name(self) -> str:
        """Human name: the path of the module that ran the op (``model.layers.0.mlp.up_proj``),
        else its weight's module path, else the node name. Grouped (MoE) ops are named by their
        weight (``model.layers.0.mlp.experts.gate_up_proj``): one module runs several of them."""
        if self.kind in ("grouped", "recurrent") and self.weight_fqn:  # one module, several weights
            return self.weight_fqn
        if self.node.meta.get(MODULE):
            return self.node.meta[MODULE]
        return self.weight_fqn.rsplit(".", 1)[0] if self.weight_fqn else self.node.name


def expert_formats(op: QuantOp) -> tuple:
    """Per-expert weight formats of a grouped op (``meta[WEIGHT_FORMAT]`` is one format for all
    experts or a tuple with one per expert, set by bit allocation); a 1-tuple for other ops."""
    fmt = op.node.meta.get(WEIGHT_FORMAT)
    if op.kind != "grouped":
        return (fmt,)
    return tuple(fmt) if isinstance(fmt, (tuple, list)) else (fmt,) * op.experts


def get_tensor(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_tensor(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    *path, leaf = target.split(".")
    mod = gm
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if isinstance(value, torch.nn.Parameter):
        value = value.detach()
    mod.register_buffer(leaf, value)


def producer(node: Node) -> Node:
    """Walk from ``node`` back through pass-through ops (view/reshape/to/clone/alias) to the op
    that computed it; stops at any other op (so it never crosses into attention)."""
    while node.op == "call_function" and node.target in PASS_THROUGH:
        node = node.args[0]
    return node


_CONSTANT_COPIES = (torch.ops.aten.detach_.default, torch.ops.aten.detach.default,
                   torch.ops.aten.lift_fresh_copy.default, torch.ops.aten.clone.default, torch.ops.aten.alias.default)


def _constant(a: Node):
    """The tensor a ``get_attr`` holds when ``a`` is that node or copies of it (``lift_fresh_copy``,
    ``detach_``: how export lifts a constant), read from the graph's module; else None."""
    while a.op == "call_function" and a.target in _CONSTANT_COPIES:
        a = a.args[0]
    gm = a.graph.owning_module
    if a.op != "get_attr" or gm is None:
        return None
    try:
        return get_tensor(gm, a.target)
    except AttributeError:
        return None


def cache_past(x):
    """``x`` (the first part of a KV present's concatenation) past transformers' cache concatenating
    the past onto an empty tensor (``cat([empty, past])`` is the past); ``x`` itself otherwise."""
    def empty(a) -> bool:  # a traced 0 on the token axis, or the 1-D empty tensor ``torch.cat`` skips
        val = a.meta.get("val") if isinstance(a, Node) else None
        if val is None and isinstance(a, Node):  # a loaded graph (no traced values): the lifted constant itself
            val = _constant(a)
        if not isinstance(val, torch.Tensor):
            return False
        dims = [val.shape[0]] if val.dim() == 1 else [val.shape[2]] if val.dim() == 4 else []
        return any(isinstance(d, int) and d == 0 for d in dims)

    while isinstance(x, Node) and x.op == "call_function" and x.target is torch.ops.aten.cat.default:
        parts = [a for a in x.args[0] if not empty(a)]
        if len(parts) != 1:
            break
        x = parts[0]
    return x


def _feeds_output(node: Node) -> bool:
    """True when ``node`` reaches the graph output through pass-through ops only."""
    frontier = [node]
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user.op == "output":
                return True
            if user.op == "call_function" and (user.target in PASS_THROUGH or user.target is operator.getitem):
                frontier.append(user)
    return False


_ROUTING = {aten.softmax.int, aten._softmax.default, aten.sigmoid.default, aten.log_softmax.int}


def _routes(node: Node) -> bool:
    """True when ``node``'s output reaches an ``aten.topk`` through pass-through ops and
    softmax / sigmoid only: the linear is a mixture-of-experts router."""
    frontier, seen = [node], set()
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            if user.target is aten.topk.default:
                return True
            if user.target in PASS_THROUGH or user.target in _ROUTING:
                frontier.append(user)
    return False


def expert_key(node_name: str, expert: int) -> str:
    """Stats-store key of the rows of a grouped op's input ``node_name`` routed to ``expert``."""
    return f"{node_name}[expert {expert}]"


def conv_matrix(w: torch.Tensor, fmt) -> torch.Tensor:
    """The 2-D ``[rows, K]`` matrix a conv weight ``[O, I/groups, *kernel]`` is quantized as. Group
    formats: groups run along the input channels, one row per output channel and kernel tap
    (``[O * taps, I]``, ONNX's blocked DequantizeLinear on axis 1); per channel / tensor: one row
    per output channel (``[O, I * taps]``)."""
    if fmt.granularity == "group":
        return w.movedim(1, -1).reshape(-1, w.shape[1])
    return w.reshape(w.shape[0], -1)


def conv_weight(m: torch.Tensor, shape: Sequence[int], fmt) -> torch.Tensor:
    """Inverse of :func:`conv_matrix`: the ``[O, I/groups, *kernel]`` weight from its matrix."""
    if fmt.granularity == "group":
        return m.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return m.reshape(*shape)


def quantizable_ops(gm: GraphModule) -> list[QuantOp]:
    """All quantizable ops in graph order with their weight (if constant) and role: ``lm_head``
    for a linear feeding the output, ``router`` for a linear whose output picks experts (topk),
    ``linear`` for MoE experts (kind ``grouped``) and other linears; a role already in
    ``meta[ROLE]`` (allocate_bits, or the whole graph's before a block was cut out) is kept."""
    ops = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in QUANTIZABLE:
            continue
        kind, w_idx, a_idx = QUANTIZABLE[node.target]
        w = node.args[w_idx]
        weight = w if isinstance(w, Node) and w.op == "get_attr" else None
        if node.meta.get(ROLE):  # set on the whole graph before it was cut into blocks (driver/stream.py)
            role = node.meta[ROLE]
        elif kind == "linear":
            role = "lm_head" if _feeds_output(node) else "router" if _routes(node) else "linear"
        else:
            role = "linear" if kind == "grouped" else kind
        ops.append(QuantOp(node, kind, role, weight, weight.meta.get(FQN, weight.target) if weight else None,
                           node.args[a_idx]))
    return ops


def drop_unused_constants(gm: GraphModule) -> None:
    """Erase ``get_attr`` nodes nobody reads and delete the tensors no ``get_attr`` names."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        if name not in used:
            *path, leaf = name.split(".")
            delattr(gm.get_submodule(".".join(path)) if path else gm, leaf)
