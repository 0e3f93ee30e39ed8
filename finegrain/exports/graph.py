"""What an export needs from a compiled graph: the quantized linears (codes, scales, the format of
their weight and of their input activation) and every other constant by its source name.

Passes keep the source model's parameter names (``capture.py``: constants are ``get_attr`` nodes
named by FQN; a quantized weight ``X.weight`` becomes ``X.weight_qpacked`` / ``_qscale`` /
``_qzero``), so a checkpoint with the original architecture can be written back by name. Anything
the architecture has no place for is reported, never dropped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from finegrain.compiler.ir import get_tensor
from finegrain.compiler.ops import GROUPED_LINEAR, HADAMARD, KV_APPEND
from finegrain.formats import QuantFormat
from finegrain.formats.base import QTensor
from finegrain.formats.ops import DEQUANTIZE, DEQUANTIZE_PACKED, QUANTIZE, unpack_weight

QPARAM_SUFFIXES = ("_qpacked", "_qscale", "_qzero", "_qscale2", "_qcodebook")
KV_SCALE = re.compile(r"kv_scale\.(\d+)\.(key|value)")  # quantize_kv's static cache scales (and ``_zero``)


@dataclass
class QuantLinear:
    """One quantized weight read by ``aten.linear``: ``name`` is the weight's source name
    (``model.layers.0.mlp.down_proj.weight``), ``module`` the linear's (without ``.weight``)."""

    name: str
    fmt: QuantFormat
    shape: list[int]
    q: QTensor
    stored_scale: torch.Tensor  # the scale as the artifact stores it (fp16, E4M3, E8M0 exponents ...)
    activation: QuantFormat | None = None  # the format of the linear's input, when quantized

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


@dataclass
class KVScale:
    """The static quantization of one layer's cache writes (``passes/quantize_kv.py``, e.g. preset
    ``kv8-fp8-static``): its format and calibrated per-tensor scale."""

    layer: int
    kind: str  # "key" / "value"
    fmt: QuantFormat
    scale: torch.Tensor  # [1] fp32


@dataclass
class GraphContents:
    linears: dict[str, QuantLinear]  # by weight name
    dense: dict[str, torch.Tensor]  # every other stored tensor, by source name
    problems: list[str]  # what no checkpoint can express (online Hadamard, grouped GEMM, loose Q/DQ)
    kv: dict[tuple[int, str], KVScale] = field(default_factory=dict)  # static KV-cache scales by (layer, kind)


def _attr(gm, node) -> torch.Tensor | None:
    return None if node is None else get_tensor(gm, node.target)


def _input_format(linear) -> QuantFormat | None:
    """The format of ``linear``'s input when it is ``dequantize(getitem(quantize(x)))``, else None."""
    x = linear.args[0]
    if getattr(x, "target", None) is DEQUANTIZE:
        src = getattr(x.args[0], "args", (None,))[0]  # the codes are item 0 of quantize's outputs
        if getattr(src, "target", None) is QUANTIZE:
            return QuantFormat.parse(src.args[1])
    return None


def read_graph(gm) -> GraphContents:
    linears: dict[str, QuantLinear] = {}
    qparams: set[str] = set()
    problems: list[str] = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is HADAMARD:
            problems.append(f"node {n.name}: an online Hadamard rotation (not folded into weights); "
                            "the checkpoint format has no transform for it")
        elif n.target is GROUPED_LINEAR:
            problems.append(f"node {n.name}: a grouped MoE GEMM (fused experts) is not a per-module linear")
        elif n.target is DEQUANTIZE_PACKED:
            packed, scale, zero = n.args[0], n.args[1], n.args[2]
            fmt, shape = QuantFormat.parse(n.args[3]), list(n.args[4])
            scale2 = n.args[6] if len(n.args) > 6 else n.kwargs.get("scale2")
            codebook = n.args[7] if len(n.args) > 7 else n.kwargs.get("codebook")
            name = str(packed.target).removesuffix("_qpacked")
            for a in (packed, scale, zero, scale2, codebook):
                if a is not None:
                    qparams.add(a.target)
            stored = _attr(gm, scale)
            q = unpack_weight(_attr(gm, packed), stored, _attr(gm, zero), fmt, shape, _attr(gm, scale2),
                              _attr(gm, codebook))
            users = list(n.users)
            lin = QuantLinear(name, fmt, shape, q, stored)
            if len(users) == 1 and users[0].target is torch.ops.aten.linear.default and users[0].args[1] is n:
                lin.activation = _input_format(users[0])
            linears[name] = lin
    kv: dict[tuple[int, str], KVScale] = {}
    for n in gm.graph.nodes:  # activation quantizers must sit on the inputs of quantized linears
        if n.op == "call_function" and n.target is KV_APPEND:
            problems.append(f"node {n.name}: a windowed KV-cache write ({n.args[2]}, axis {n.args[3]}, window "
                            f"{n.args[4]}, sinks {n.args[5]}: KIVI / RotateKV / ZipCache) has no checkpoint form; the "
                            "checkpoint formats take a static per-tensor cache scale (preset kv8-fp8-static) or none")
        if n.op == "call_function" and n.target is QUANTIZE:
            m = KV_SCALE.fullmatch(str(getattr(n.args[2], "target", ""))) if len(n.args) > 2 else None
            if m is not None:  # a static KV-cache write (quantize_kv): its scale, not an activation quantizer
                layer, kind = int(m.group(1)), m.group(2)
                kv[(layer, kind)] = KVScale(layer, kind, QuantFormat.parse(n.args[1]), _attr(gm, n.args[2]))
                qparams.update(a.target for a in n.args[2:4])
                continue
            readers = [w for u in n.users for v in u.users for w in v.users]
            if readers and all(w.target is torch.ops.aten.cat.default for w in readers):
                problems.append(f"node {n.name}: a dynamic KV-cache quantizer ({n.args[1]}, a scale per token) has "
                                "no checkpoint form; the checkpoint formats take a static per-tensor cache scale "
                                "(preset kv8-fp8-static)")
                continue
            if not readers or not all(w.target is torch.ops.aten.linear.default and
                                      getattr(w.args[1], "target", None) is DEQUANTIZE_PACKED for w in readers):
                problems.append(f"node {n.name}: activation quantizer {n.args[1]} not on the input of a quantized "
                                f"linear (read by {', '.join(sorted({str(w.target) for w in readers})) or 'nothing'})")
    dense = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in qparams:
            dense[n.target] = _attr(gm, n)
    return GraphContents(linears, dense, problems, kv)
