"""Quantized FX graph -> Relax IRModule (issue #7).

1. :func:`prepare` rewrites every ``aten.linear(x, finegrain::dequantize_packed(...), bias)`` whose
   format has a kernel here into one of two ops on weights repacked for the kernel, and turns every
   stored tensor into a parameter (so Relax keeps the weights as inputs, shipped beside the
   library, not baked into it):

   * ``finegrain::a8_linear(x, act, ...)`` when the weight has at most 4 bits (INT2-4 per group /
     channel / tensor, any scale type, DGQ's integer group scales included) and ``x`` is
     fake-quantized to symmetric integers per token / tensor (``w4a8-*``, ``w4a4-*``): the
     activation is quantized to INT8 codes in the lowering and the matmul runs on integers
     (``kernels/a8.py``; needs AVX2; ``int8=False`` keeps the next form);
   * ``finegrain::packed_linear(x, w, scale, zs, bits, bias, kind)`` otherwise (INT2/3/4/8, FP4 E2M1
     per group, FP8 E4M3 decoded from its bit patterns; fp32 activations, ``kernels/lowbit.py``).

   Formats without a kernel are refused naming the layer: a weight is never dequantized whole and
   then multiplied.
2. :func:`import_relax` exports that graph twice with ``torch.export``: ``prefill`` with a
   symbolic sequence length (>= 2) and ``decode`` with one token, each decomposed to core ATen in
   the same trace (``compiler.capture.export_decomposed``), and imports each with
   ``tvm.relax.frontend.torch.from_exported_program``; converters turn each ``packed_linear`` /
   ``a8_linear`` into one ``call_tir`` to the scheduled kernel (GEMM for prefill, GEMV for decode)
   and, where every attention fits it, each ``scaled_dot_product_attention`` into one ``call_tir``
   to the fused attention kernel (``lower_attention.py``). Both functions share one parameter list.

Activations: each ``quantize -> dequantize`` pair (integer formats per token / tensor, dynamic or
static) becomes one ``finegrain::fake_quant`` op. Feeding an ``a8_linear``, it is computed as INT8
codes, their group sums and one fp32 scale per row (once per activation, shared by q / k / v);
elsewhere as Relax reductions for the scales and one elementwise TE function (round half to even,
clip). Both choose scales exactly as the reference. The online Hadamard becomes a matmul by the
dense orthonormal matrix. A KV write with a float window (``kv_append``: KIVI's per-channel keys,
sinks, pre-RoPE / rotated keys) becomes ``kv_window_write``, one TE function that fake-quantizes the
tokens the write releases (``lower_window.py``; an fp32 cache holding the format's values).
Activations in groups along K (scales per group of the row padded as the reference pads it; fp32 /
fp16, E8M0 or two-level E4M3 scales) and minifloat activations (rounded on the element's grid) are
fake-quantized the same way (``lower_activations.py``). MoE grouped GEMMs run as one
gather-GEMM over the experts' dequantized weights (emulated: no low-bit kernel for them yet).
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule

from finegrain.compiler.capture import export_decomposed, is_kv_specs
from finegrain.compiler.ir import CONV_OPS, get_tensor
from finegrain.formats import QuantFormat
from finegrain.formats.ops import DEQUANTIZE_PACKED, unpack_weight
from finegrain.backends.tvm.kernels import a8
from finegrain.backends.tvm.lower_activations import (A8_LINEAR, FAKE_QUANT, TvmError, act_format,  # noqa: F401
                                                      convert_a8_linear, convert_fake_quant, flat_rows)
from finegrain.backends.tvm.kernels.lowbit import (container_bits, linear_func, pack_weight, unpack_weight_ref,
                                                   vector_lanes)
from finegrain.io.signature import example_inputs


@torch.library.custom_op("finegrain::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zs: torch.Tensor, bits: int,
                  bias: Optional[torch.Tensor] = None, kind: str = "int") -> torch.Tensor:
    """``x @ W^T + bias`` with W in the TVM kernel's packed layout (reference implementation);
    ``kind``: ``int`` codes or a minifloat's bit patterns (``e2m1`` FP4; ``e4m3`` / ``e5m2`` FP8, ``e3m2`` /
    ``e2m3`` FP6 in 8-bit containers)."""
    return F.linear(x, unpack_weight_ref(w, scale, zs, bits, x.shape[-1], kind), bias)


@packed_linear.register_fake
def _(x, w, scale, zs, bits, bias=None, kind="int"):
    return x.new_empty((*x.shape[:-1], w.shape[1]))


PACKED_LINEAR = torch.ops.finegrain.packed_linear.default


@torch.library.custom_op("finegrain::packed_weight", mutates_args=())
def packed_weight(w: torch.Tensor, scale: torch.Tensor, zs: torch.Tensor, bits: int, k_packed: int,
                  k: int) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` from the low-bit kernels' packed layout (reference implementation):
    a convolution's weight, dequantized in the graph on every call (the fp32-compute path). The
    packed K may be padded to whole words (``k_packed``); the padding is cut."""
    return unpack_weight_ref(w, scale, zs, bits, k_packed)[:, :k].contiguous()


@packed_weight.register_fake
def _(w, scale, zs, bits, k_packed, k):
    return w.new_empty((w.shape[1], k), dtype=torch.float32)


PACKED_WEIGHT = torch.ops.finegrain.packed_weight.default


@torch.library.custom_op("finegrain::packed_embedding", mutates_args=())
def packed_embedding(ids: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zs: torch.Tensor, bits: int,
                     k_packed: int, k: int) -> torch.Tensor:
    """``embedding(W, ids)`` with W in the low-bit kernels' packed layout (reference implementation):
    only the rows looked up are dequantized (TVM: ``_convert_packed_embedding``)."""
    return F.embedding(ids, packed_weight(w, scale, zs, bits, k_packed, k))


@packed_embedding.register_fake
def _(ids, w, scale, zs, bits, k_packed, k):
    return w.new_empty((*ids.shape, k), dtype=torch.float32)


PACKED_EMBEDDING = torch.ops.finegrain.packed_embedding.default
_LAYOUT = {torch.ops.aten.reshape.default, torch.ops.aten.permute.default}
_RECURRENT = {torch.ops.aten.lstm.input, torch.ops.aten.gru.input}  # those TVM 0.27's frontend converts


def _float_reader(u, n) -> bool:
    """``u`` reads the weight ``n`` as a whole float tensor: a convolution (through reshape / permute
    only), an LSTM / GRU, an embedding lookup, a MoE's stack of experts. Such readers get the weight
    dequantized in the graph."""
    from finegrain.compiler.ops import GROUPED_LINEAR

    return ((u.target in CONV_OPS and u.args[1] is n) or (u.target in _LAYOUT and _only_float_readers(u))
            or (u.target in _RECURRENT and n in u.args[2])
            or (u.target is torch.ops.aten.embedding.default and u.args[0] is n)
            or (u.target is torch.ops.aten.stack.default and bool(u.users)  # a MoE's experts, stacked
                and all(v.target is GROUPED_LINEAR and v.args[1] is u for v in u.users)))


def _only_float_readers(n) -> bool:
    """Every reader of ``n`` is a float reader (:func:`_float_reader`)."""
    users = list(n.users)
    return bool(users) and all(_float_reader(u, n) for u in users)
N_ALIGN = 32  # output columns of a low-bit kernel: a multiple of every schedule's block (2 x 16 lanes)
def _rewrite_activations(gm: GraphModule, graph: Graph, param) -> None:
    """``quantize -> getitem -> dequantize`` becomes one ``fake_quant``; ``hadamard(x, F)`` becomes
    ``x @ H`` with the dense orthonormal matrix (computed by the reference transform on the
    identity; one parameter per size)."""
    from finegrain.formats.hadamard import apply_hadamard
    from finegrain.compiler.ops import HADAMARD
    from finegrain.formats.ops import DEQUANTIZE, QUANTIZE

    import operator

    mats: dict = {}
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is QUANTIZE:
            act_format(n.args[1], f"node {n.name} (input {n.args[0]})")
            getters = list(n.users)
            deqs = {u for g in getters for u in g.users}
            if (any(g.target is not operator.getitem for g in getters) or len(deqs) != 1
                    or next(iter(deqs)).target is not DEQUANTIZE):
                raise TvmError(f"node {n.name}: quantized activation codes are used by something other than one "
                               "dequantize; the TVM lowering fuses exactly that pair")
            deq = deqs.pop()
            scale = n.args[2] if len(n.args) > 2 else n.kwargs.get("scale")
            zero = n.args[3] if len(n.args) > 3 else n.kwargs.get("zero")
            with graph.inserting_before(deq):
                new = graph.call_function(FAKE_QUANT, (n.args[0], n.args[1], scale, zero))
            deq.replace_all_uses_with(new)
            graph.erase_node(deq)
            for g in getters:
                graph.erase_node(g)
            graph.erase_node(n)
        elif n.target is HADAMARD:
            x, fac = n.args
            meta = x.meta.get("val", x.meta.get("tensor_meta"))
            size = meta.shape[-1] if meta is not None else None
            if size is None:
                raise TvmError(f"node {n.name}: the online Hadamard's input size is unknown (no shape metadata)")
            factor = get_tensor(gm, fac.target)
            key = (int(size), fac.target)
            if key not in mats:
                h = apply_hadamard(torch.eye(int(size), dtype=torch.float64), factor.double()).float()
                mats[key] = param(f"hadamard_{int(size)}_{len(mats)}", h)
            with graph.inserting_before(n):
                h_node = graph.get_attr(mats[key])
                new = graph.call_function(torch.ops.aten.matmul.default, (x, h_node))
            n.replace_all_uses_with(new)
            graph.erase_node(n)


def _dequantized_in_graph(gm, graph: Graph, n, layer: str, fmt: QuantFormat, shape: list, param,
                          readers: list) -> dict:
    """A quantized weight matrix read whole by ``readers`` (convs, LSTM / GRU, an embedding lookup),
    kept packed in the kernels' layout and dequantized in the graph (``packed_weight``); those ops run
    in fp32 (TVM's own schedules). ``n`` keeps its other readers (a tied linear)."""
    packed_node, scale_node, zero_node = n.args[:3]
    if container_bits(fmt) is None or fmt.kind != "int":
        raise TvmError(f"{layer}: weight format {fmt.tag} has no TVM lowering for a conv / LSTM / embedding weight "
                       "(INT2/3/4/8 per group / channel / tensor do)")
    q = unpack_weight(get_tensor(gm, packed_node.target), get_tensor(gm, scale_node.target),
                      get_tensor(gm, zero_node.target) if zero_node is not None else None, fmt, shape)
    k = shape[1]
    per = 32 // container_bits(fmt)
    kp = -(-k // per) * per
    if fmt.granularity == "group" and kp != k and k > fmt.group_size:
        kp = -(-k // fmt.group_size) * fmt.group_size  # whole groups, so kernel groups stay aligned
        kp = -(-kp // per) * per
    if kp != k:  # pad K to whole 32-bit words with the zero point's code (dequantizes to 0; cut in the graph)
        zero = q.zero.reshape(-1)
        last = zero.reshape(q.codes.shape[0], -1)[:, -1:] if zero.numel() > 1 else zero.reshape(1, 1)
        q = q._replace(codes=torch.cat([q.codes, last.to(q.codes.dtype).expand(q.codes.shape[0], kp - k)], 1))
    try:
        p = pack_weight(fmt, q)
    except ValueError as e:
        raise TvmError(f"{layer}: {e}") from None
    with graph.inserting_before(n):
        attrs = [graph.get_attr(param(f"{layer}_tvm_dq_{part}", torch.from_numpy(p[part]))) for part in ("w", "scale", "zs")]
    info = {"format": fmt.tag, "bits": p["bits"], "group_size": p["group_size"], "shape": shape}
    if all(u.target is torch.ops.aten.embedding.default for u in readers):  # only the rows looked up
        for u in readers:
            with graph.inserting_before(u):
                new = graph.call_function(PACKED_EMBEDDING, (u.args[1], *attrs, p["bits"], kp, k))
            u.replace_all_uses_with(new)
            graph.erase_node(u)
        return {**info, "kind": "embedding (rows dequantized per lookup)"}
    with graph.inserting_before(n):
        new = graph.call_function(PACKED_WEIGHT, (*attrs, p["bits"], kp, k))
    for u in readers:
        u.replace_input_with(n, new)
    what = "conv" if any(u.target in CONV_OPS or u.target in _LAYOUT for u in readers) else "recurrent"
    return {**info, "kind": f"{what} (weight dequantized per call, fp32 {what})"}


def _packed_value(w_, s_, z_, i, j, bits: int, kgs):
    """TE expression: the fp32 weight at row ``i``, column ``j`` of the low-bit kernels' packed
    layout (code of k = ``j`` in word ``j // per`` of column ``i``; ``kgs`` columns per scale group)."""
    from tvm import tirx

    per = 32 // bits
    word = w_[j // per, i]
    code = tirx.bitwise_and(tirx.shift_right(word, tirx.Cast("int32", (j % per) * bits)), (1 << bits) - 1)
    s = s_[j // kgs, i]
    return tirx.Cast("float32", code) * (s / float(1 << bits)) - (z_[j // kgs, i] + s * 0.5)  # s = 2^b scale


def _convert_packed_weight(prefix: str):
    def convert(node, importer):
        from tvm import te

        bb = importer.block_builder
        w, scale, zs, bits, kp, k = importer.retrieve_args(node)
        kgs = kp // int(scale.ty.shape[0])
        return bb.emit_te(lambda w_, s_, z_: te.compute(
            (w.ty.shape[1], k), lambda i, j: _packed_value(w_, s_, z_, i, j, bits, kgs), name="packed_weight"),
            w, scale, zs, primfunc_name_hint=f"{prefix}packed_weight")

    return convert


def _convert_packed_embedding(prefix: str):
    def convert(node, importer):
        from tvm import te, tirx

        bb = importer.block_builder
        ids, w, scale, zs, bits, kp, k = importer.retrieve_args(node)
        kgs = kp // int(scale.ty.shape[0])

        def lookup(i_, w_, s_, z_):  # only the rows ids name: row ids[idx[:-1]] at column idx[-1]
            return te.compute((*ids.ty.shape, k), lambda *idx: _packed_value(
                w_, s_, z_, tirx.Cast("int64", i_(*idx[:-1])), idx[-1], bits, kgs), name="packed_embedding")

        return bb.emit_te(lookup, ids, w, scale, zs, primfunc_name_hint=f"{prefix}packed_embedding")

    return convert


def _convert_amax(node, importer):
    """``aten.amax`` (a max over dims; TVM 0.27's frontend has no converter for it)."""
    from tvm import relax

    args = importer.retrieve_args(node)
    x = args[0]
    dims = args[1] if len(args) > 1 else node.kwargs.get("dim", [])
    keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
    axis = list(dims) if dims else None
    return importer.block_builder.emit(relax.op.max(x, axis=axis, keepdims=bool(keep)))


def _layer(packed_node) -> str:
    return str(packed_node.target).removesuffix("_qpacked")


def _int8_input(users) -> str | None:
    """The activation format when every linear reading this weight takes a fake-quantized input
    the integer-dot kernel can take as INT8 codes (``kernels/a8.py``), else None."""
    tags = set()
    for u in users:
        src = u.args[0]
        if getattr(src, "target", None) is not FAKE_QUANT or not a8.act_ok(QuantFormat.parse(src.args[1])):
            return None
        tags.add(src.args[1])
    return tags.pop() if len(tags) == 1 else None


def _emit_a8(graph: Graph, deq, users, layer: str, p: dict, param) -> None:
    """Each ``linear(fake_quant(x), dequantize_packed(W))`` -> ``a8_linear(x, ...)``: the activation
    is quantized to codes inside the lowering and the matmul runs on integers."""
    with graph.inserting_before(deq):
        attrs = [graph.get_attr(param(f"{layer}_tvm_{part}", torch.from_numpy(p[part])))
                 for part in ("w", "ga", "gb", "cs")]
    for u in users:
        x, act, scale, zero = u.args[0].args
        with graph.inserting_before(u):
            bias = u.args[2] if len(u.args) > 2 else u.kwargs.get("bias")
            new = graph.call_function(A8_LINEAR, (x, act, scale, zero, *attrs, bias))
        u.replace_all_uses_with(new)
        graph.erase_node(u)
    graph.erase_node(deq)


def prepare(gm: GraphModule, input_specs: list[dict] | None = None,
            int8: bool = True, pack_kv: bool = False, kv_storage: str = "packed") -> tuple[GraphModule, dict]:
    """The graph rewritten for the TVM lowering (see the module docstring) and, per quantized
    layer, the kernel it gets. ``int8``: linears whose weights have at most 4 bits and whose
    input is quantized to symmetric integers get the integer-dot kernel (``kernels/a8.py``; needs
    AVX2) instead of the fp32 one. ``gm`` itself is not modified (its nodes may get shape metadata).
    A KV-cache graph's writes in groups along the head dim become per-token fake quantization
    (``lower_cache.kv_fake_quant``); ``pack_kv`` (static cache) first packs the layers whose cache
    can be held as codes (``lower_cache.pack_cache``; the buffers are the result's ``kv_buffers``),
    unless ``kv_storage`` is ``"float"`` (every layer then an fp32 buffer of the formats' values)."""
    from finegrain.compiler.ops import HADAMARD

    if input_specs and any(n.target is HADAMARD and not ({"val", "tensor_meta"} & set(n.args[0].meta))
                           for n in gm.graph.nodes):
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.inference_mode():
            ShapeProp(gm).propagate(*example_inputs(input_specs))
    if input_specs and is_kv_specs(input_specs) and any(
            isinstance(r, torch.fx.Node) and r.meta.get("val") is None for r in gm.graph.output_node().args[0][1:]):
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp  # a loaded graph: the presents' shapes / dtypes

        FakeTensorProp(gm, mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs(input_specs))
    graph = Graph()
    env: dict = {}
    graph.output(graph.graph_copy(gm.graph, env))
    root = torch.nn.Module()
    names: dict[str, str] = {}

    def param(name: str, t: torch.Tensor) -> str:
        key = name.replace(".", "_")
        root.register_parameter(key, torch.nn.Parameter(t.detach().contiguous(), requires_grad=False))
        names[name] = key
        return key

    kernels = {}
    buffers, unpacked = None, []
    if input_specs and is_kv_specs(input_specs):
        from finegrain.backends.tvm.lower_cache import kv_fake_quant, pack_cache

        buffers = pack_cache(graph, pack=kv_storage == "packed") if pack_kv else None
        kv_fake_quant(graph)
        from finegrain.backends.tvm import lower_window

        lower_window.rewrite(graph)
        if buffers is not None and kv_storage == "packed":
            from finegrain.backends.tvm.window_cache import pack_window_cache

            unpacked = pack_window_cache(graph, buffers)
    _rewrite_activations(gm, graph, param)
    from finegrain.compiler.ops import WEIGHT

    for n in list(graph.nodes):  # the recurrent-weight marker is the identity
        if n.op == "call_function" and n.target is WEIGHT:
            n.replace_all_uses_with(n.args[0])
            graph.erase_node(n)
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is not DEQUANTIZE_PACKED:
            continue
        packed_node, scale_node, zero_node, tag, shape = n.args[:5]
        layer = _layer(packed_node)
        fmt = QuantFormat.parse(tag)
        users = list(n.users)
        readers = [u for u in users if _float_reader(u, n)]
        if len(shape) == 2 and readers:  # read whole (a conv's matrix, LSTM gates, an embedding): fp32 compute
            rec = _dequantized_in_graph(gm, graph, n, layer, fmt, list(shape), param, readers)
            kernels[layer if layer not in kernels else f"{layer} ({rec['kind'].split()[0]})"] = rec
            users = list(n.users)
            if not users:
                graph.erase_node(n)
                continue
        if len(shape) != 2 or not users or any(u.target is not torch.ops.aten.linear.default or u.args[1] is not n
                                               for u in users):
            raise TvmError(f"{layer}: the dequantized weight (node {n.name}) feeds {[u.name for u in users]}, not only "
                           "linears; only linear weights have TVM kernels")
        scale2 = n.args[6] if len(n.args) > 6 else n.kwargs.get("scale2")
        codebook = n.args[7] if len(n.args) > 7 else n.kwargs.get("codebook")
        if container_bits(fmt) is None or codebook is not None:
            raise TvmError(f"{layer}: weight format {fmt.tag} has no TVM kernel (INT2/3/4/8 per group / channel / "
                           "tensor, FP4 E2M1 per group and FP8 E4M3 in 1-D groups do)")
        q = unpack_weight(get_tensor(gm, packed_node.target), get_tensor(gm, scale_node.target),
                          get_tensor(gm, zero_node.target) if zero_node is not None else None, fmt, list(shape),
                          get_tensor(gm, scale2.target) if scale2 is not None else None)
        act = _int8_input(users) if int8 and a8.weight_ok(fmt) else None
        if act is not None:
            try:
                p = a8.pack_weight(fmt, q)
            except ValueError:  # shapes the integer-dot kernel does not take: the fp32-compute one does
                p = None
            if p is not None:
                _emit_a8(graph, n, users, layer, p, param)
                key = layer if layer not in kernels else f"{layer} (linear)"  # a tied weight's other readers
                kernels[key] = {"format": fmt.tag, "kind": "int8-dot", "epilogue": p["epilogue"], "activation": act,
                                  "bits": p["bits"], "group_size": p["group_size"], "shape": list(shape)}
                continue
        try:
            p = pack_weight(fmt, q)
        except ValueError as e:
            raise TvmError(f"{layer}: {e}") from None
        n_out = p["w"].shape[1]
        pad = -n_out % N_ALIGN  # zero columns (scale 0): any N runs on any vector width; the output is cut
        with graph.inserting_before(n):
            attrs = [graph.get_attr(param(f"{layer}_tvm_{part}", torch.from_numpy(
                np.pad(p[part], ((0, 0), (0, pad))) if pad else p[part]))) for part in ("w", "scale", "zs")]
        for u in users:
            with graph.inserting_before(u):
                bias = u.args[2] if len(u.args) > 2 else u.kwargs.get("bias")
                new = graph.call_function(PACKED_LINEAR, (u.args[0], *attrs, p["bits"], None if pad else bias,
                                                          p["kind"]))
                if pad:  # the Relax frontend takes non-negative slice dims only
                    val = u.meta.get("val", u.args[0].meta.get("val") if isinstance(u.args[0], torch.fx.Node) else None)
                    if val is None:
                        raise TvmError(f"{layer}: N={n_out} needs padding to {n_out + pad} columns, but the linear "
                                       f"(node {u.name}) has no shape metadata to cut its output")
                    new = graph.call_function(torch.ops.aten.slice.Tensor, (new, val.dim() - 1, 0, n_out))
                    if bias is not None:
                        new = graph.call_function(torch.ops.aten.add.Tensor, (new, bias))
            u.replace_all_uses_with(new)
            graph.erase_node(u)
        graph.erase_node(n)
        key = layer if layer not in kernels else f"{layer} (linear)"  # a tied weight's other readers
        kernels[key] = {"format": fmt.tag, "kind": p["kind"], "bits": p["bits"], "group_size": p["group_size"],
                          "shape": list(shape)}
    graph.eliminate_dead_code()
    for n in graph.nodes:
        if n.op == "get_attr" and n.target not in names.values():
            t = get_tensor(gm, n.target)
            key = names.get(n.target) or param(n.target, t)
            n.target = key
    out = GraphModule(root, graph)
    out.graph.lint()
    out.kv_buffers = buffers
    out.kv_unpacked = unpacked  # windowed layers left in an fp32 cache, and why
    return out, kernels


def _fix_bool_cumsum(ep) -> None:
    """The Relax frontend converts cumsum of a bool tensor as a bool cumsum (LLVM then crashes):
    make the int64 result explicit."""
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.cumsum.default:
            val = n.args[0].meta.get("val") if hasattr(n.args[0], "meta") else None
            if val is not None and val.dtype == torch.bool and n.kwargs.get("dtype") is None:
                n.kwargs = {**n.kwargs, "dtype": torch.int64}
    ep.graph_module.recompile()


def _wrap_negative_select(ep) -> None:
    """The Relax frontend converts ``select(x, dim, i)`` to ``take(x, i, dim)``, which reads out of
    bounds for a negative ``i`` (Falcon's fused qkv takes its key and value as ``[-2]`` and ``[-1]``:
    wrong logits, NaN through a cache). Count a negative index from the end of a static dim; over a
    dim of run-time size take ``squeeze(slice(x, dim, i, i + 1), dim)`` instead (Relax's slice counts
    negative bounds from the end)."""
    changed = False
    for n in list(ep.graph.nodes):
        if n.op != "call_function" or n.target is not torch.ops.aten.select.int or not isinstance(n.args[2], int) \
                or n.args[2] >= 0:
            continue
        x, dim, i = n.args
        val = x.meta.get("val") if hasattr(x, "meta") else None
        size = val.shape[dim] if val is not None else None
        if isinstance(size, int):
            n.args = (x, dim, i + size)
        else:
            end = i + 1 if i != -1 else None
            with ep.graph.inserting_before(n):
                sl = ep.graph.call_function(torch.ops.aten.slice.Tensor, (x, dim, i, end))
                sq = ep.graph.call_function(torch.ops.aten.squeeze.dim, (sl, dim))
            if val is not None:
                with val.fake_mode:
                    sl.meta["val"] = torch.ops.aten.slice.Tensor(val, dim, i, end)
            sq.meta["val"] = n.meta.get("val")
            n.replace_all_uses_with(sq)
            ep.graph.erase_node(n)
        changed = True
    if changed:
        ep.graph_module.recompile()


def _share_past_length(ep) -> None:
    """Every past (``past_<i>`` inputs) holds the same number of tokens, and the export is given one
    ``Dim`` for all of them, but the exported program still names each past's length with its own
    symbol; a model that adds one layer's mask to another layer's scores (Gemma-2's eager attention)
    then has a broadcast Relax cannot shape. Give every past whose shape differs from the first's
    only in single symbols the first's fake value and tensor metadata, so they share one length."""
    import re

    pasts = [n for n in ep.graph.nodes if n.op == "placeholder" and re.fullmatch(r"past_\d+", n.name)
             and isinstance(n.meta.get("val"), torch.Tensor)]
    if len(pasts) < 2:
        return
    first = pasts[0].meta["val"]
    for n in pasts[1:]:
        v = n.meta["val"]
        if v.dtype != first.dtype or v.dim() != first.dim():
            continue
        same = all((isinstance(a, int) and isinstance(b, int) and a == b) or
                   (isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr.is_symbol
                    and b.node.expr.is_symbol) for a, b in zip(v.shape, first.shape))
        if same:  # the Relax frontend reads tensor_meta, then val
            n.meta["val"] = first
            if "tensor_meta" in pasts[0].meta:
                n.meta["tensor_meta"] = pasts[0].meta["tensor_meta"]


def _drop_runtime_asserts(ep) -> None:
    """Export with deferred runtime asserts (KV-cache graphs: torch cannot prove a guard like
    ``min(16 (p + 1), 32 (p + 1)) == 16 (p + 1)`` over the past length ``p`` and would otherwise refuse
    the range) leaves ``_assert_scalar`` nodes over symbolic arithmetic the Relax frontend does not
    convert; the shapes they check are enforced by the deployment's own bounds, so drop them."""
    asserts = [n for n in ep.graph.nodes if n.op == "call_function"
               and n.target in (torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default)]
    for n in asserts:
        ep.graph.erase_node(n)
    if asserts:
        ep.graph.eliminate_dead_code()
        ep.graph_module.recompile()


def _drop_empty_cat_inputs(ep) -> None:
    """``transformers``' cache starts each layer as ``torch.tensor([])`` and concatenates the past
    onto it; torch accepts a 1-D empty tensor in any ``cat``, Relax wants equal ranks: drop it."""
    changed = False
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.cat.default:
            parts = n.args[0]
            keep = [a for a in parts if not (isinstance(a, torch.fx.Node) and (v := a.meta.get("val")) is not None
                                             and v.dim() == 1 and v.shape[0] == 0)]
            if keep and len(keep) != len(parts):
                n.args = (keep, *n.args[1:])
                changed = True
    if changed:
        ep.graph.eliminate_dead_code()
        ep.graph_module.recompile()


def _convert_packed_linear(cache: dict, prefix: str, lanes: int):
    from tvm import relax, te, tirx

    from finegrain.backends.tvm.kernels.lowbit import ROW_BLOCK

    def convert(node, importer):
        bb = importer.block_builder
        args = importer.retrieve_args(node)
        x, w, sc, zs, bits = args[:5]
        bias = args[5] if len(args) > 5 else None
        kind = args[6] if len(args) > 6 else "int"
        shape = list(x.ty.shape)
        k, n = int(shape[-1]), int(w.ty.shape[1])
        gs = k // int(sc.ty.shape[0])
        rows = flat_rows(shape)
        one = isinstance(rows, tirx.IntImm) and int(rows) == 1
        code = f"int{bits}" if kind == "int" else kind
        key = f"{prefix}{code}_{'gemv' if one else 'gemm'}_k{k}_n{n}_g{gs}"
        if key not in cache:
            func = linear_func(1 if one else None, k, n, gs, int(bits), lanes=lanes, kind=kind).with_attrs(
                {"op_pattern": 8, "global_symbol": key})  # opaque: elementwise ops are not fused into it
            cache[key] = bb.add_func(func, key)
        x2 = bb.emit(relax.op.reshape(x, [rows, k]))
        if one:
            y = bb.emit(relax.call_tir(cache[key], [x2, w, sc, zs], relax.TensorType([rows, n], "float32")))
        else:  # the prefill kernel takes whole blocks of ROW_BLOCK rows: pad, run, cut
            mq = tirx.floordiv(rows + ROW_BLOCK - 1, ROW_BLOCK)
            xp = bb.emit_te(lambda t: te.compute((mq * ROW_BLOCK, k), lambda i, c: te.if_then_else(
                i < rows, t[i, c], tirx.const(0.0, "float32")), name="pad_rows"), x2, primfunc_name_hint=f"{prefix}pad_rows")
            x3 = bb.emit(relax.op.reshape(xp, [mq, ROW_BLOCK, k]))
            y3 = bb.emit(relax.call_tir(cache[key], [x3, w, sc, zs], relax.TensorType([mq, ROW_BLOCK, n], "float32")))
            y2 = bb.emit(relax.op.reshape(y3, [mq * ROW_BLOCK, n]))
            y = bb.emit_te(lambda t: te.compute((rows, n), lambda i, c: t[i, c], name="cut_rows"), y2,
                           primfunc_name_hint=f"{prefix}cut_rows")
        y = bb.emit(relax.op.reshape(y, [*shape[:-1], n]))
        return bb.emit(relax.op.add(y, bias)) if bias is not None else y

    return convert


def _convert_reshape(node, importer):
    """``aten.view`` / ``reshape`` as the frontend converts it, but its identity check compares the
    shapes structurally: the frontend's ``list == list`` turns a symbolic dim against another into
    ``bool(Expr)`` and raises (GPTBigCode's multi-query attention reshapes over ``past + seq``)."""
    import tvm

    args = importer.retrieve_args(node)
    x = args[0]
    dims = list(args[1] if isinstance(args[1], (torch.Size, tuple, list)) else args[1:])
    current = importer.shape_of(x)

    def same(a, b) -> bool:
        a, b = (v.value if isinstance(v, tvm.tirx.IntImm) else v for v in (a, b))
        if isinstance(a, int) or isinstance(b, int):
            return a == b if isinstance(a, int) and isinstance(b, int) else False
        return tvm.ir.is_prim_expr(a) and tvm.ir.is_prim_expr(b) and bool(tvm.ir.prim.expr_deep_equal(a, b))

    if current is not None and len(current) == len(dims) and all(same(c, d) for c, d in zip(list(current), dims)):
        return x
    return importer._emit_torch_reshape(x, dims)


def _convert_grouped_linear(prefix: str):
    """``grouped_linear(x [T, K], W [E, N, K], offsets [E])`` (a MoE block's experts; rows sorted by
    expert, ``offsets`` their cumulative counts) as one TE gather-GEMM: each row's expert is the
    number of offsets at or below it, and ``y[t, n] = sum_k x[t, k] W[e(t), n, k]``. The weights come
    dequantized (a stack of the experts' packed weights): emulated, not a low-bit kernel."""
    def convert(node, importer):
        from tvm import te, tirx

        bb = importer.block_builder
        x, w, offsets = importer.retrieve_args(node)[:3]

        def grouped(x_, w_, o_):
            t_len, k_len = x_.shape
            e_len, n_len = w_.shape[0], w_.shape[1]
            e = te.reduce_axis((0, e_len), name="e")
            expert = te.compute((t_len,), lambda t: te.sum(tirx.Select(
                o_[e] <= tirx.Cast(o_.dtype, t), tirx.const(1, "int64"), tirx.const(0, "int64")), axis=e),
                name="row_expert")
            k = te.reduce_axis((0, k_len), name="k")
            return te.compute((t_len, n_len), lambda t, n: te.sum(
                x_[t, k] * w_[tirx.min(expert[t], e_len - 1), n, k].astype(x_.dtype), axis=k), name="grouped_linear")

        return bb.emit_te(grouped, x, w, offsets, primfunc_name_hint=f"{prefix}grouped_linear")

    return convert


def _convert_histc(prefix: str):
    """``aten.histc(x, bins, min, max)`` (a MoE block counting the rows routed to each expert): for
    each bin, how many of ``x``'s values fall in it (``max`` itself in the last bin), as torch."""
    return lambda node, importer: _histc(node, importer, prefix)


def _histc(node, importer, prefix: str):
    from tvm import te, tirx

    bb = importer.block_builder
    args = importer.retrieve_args(node)
    x, bins = args[0], int(args[1]) if len(args) > 1 else 100
    lo, hi = (float(args[2]) if len(args) > 2 else 0.0), (float(args[3]) if len(args) > 3 else 0.0)
    if hi <= lo:
        raise TvmError(f"node {node.name}: histc with min {lo} >= max {hi} (ranges from the data) is not supported")

    def histc(x_):
        flat = [te.reduce_axis((0, d), name=f"i{j}") for j, d in enumerate(x_.shape)]
        dt = x_.dtype

        def count(b):
            v = x_(*flat)
            idx = tirx.min(tirx.Cast("int64", tirx.floor((v - tirx.const(lo, dt)) * tirx.const(bins / (hi - lo), dt))),
                           tirx.const(bins - 1, "int64"))
            inside = tirx.all(v >= tirx.const(lo, dt), v <= tirx.const(hi, dt), idx == b)
            return te.sum(tirx.Select(inside, tirx.const(1, dt), tirx.const(0, dt)), axis=flat)

        return te.compute((bins,), count, name="histc")

    return bb.emit_te(histc, x, primfunc_name_hint=f"{prefix}histc")


def _convert_div_mode(node, importer):
    """``aten.div(x, c, rounding_mode=...)`` with a Python number ``c`` (a MoE block's token index
    ``i // top_k``): the frontend makes ``c`` an int32 constant whatever ``x``'s dtype (int64
    there), which Relax refuses; here ``c`` takes ``x``'s dtype."""
    from tvm import relax

    bb = importer.block_builder
    args = importer.retrieve_args(node)
    x, y = args[:2]
    mode = args[2] if len(node.args) > 2 else node.kwargs.get("rounding_mode")
    if isinstance(y, (int, float)):
        y = relax.const(y, x.ty.dtype)
    if mode == "floor":
        return bb.emit(relax.op.floor_divide(x, y))
    out = bb.emit(relax.op.divide(x, y))
    return bb.emit(relax.op.trunc(out)) if mode == "trunc" else out


def _convert_empty(node, importer):
    """``aten.empty(shape)`` over a symbolic shape (a MoE block's ``empty_like`` of its token order):
    zeros of that shape (the frontend's converter takes static shapes only)."""
    from tvm import relax

    bb = importer.block_builder
    args = importer.retrieve_args(node)
    dtype = str(node.kwargs.get("dtype") or torch.float32).removeprefix("torch.")
    return bb.emit(relax.op.zeros(relax.ShapeExpr(list(args[0])), dtype))


def _convert_diff(node, importer):
    """``aten.diff(x, 1, dim, prepend)`` (transformers' packed-sequence check on position ids).
    The decomposed form slices a concatenation, whose symbolic length (``min(1, s) + s - 1``)
    Relax cannot prove equal to ``s``, so the result loses its shape and cumsum refuses it; here
    the slices are cast to the known length."""
    from tvm import relax

    bb = importer.block_builder
    args = importer.retrieve_args(node)
    x, n = args[0], args[1] if len(args) > 1 else 1
    dim = args[2] if len(args) > 2 else -1
    prepend = args[3] if len(args) > 3 else None
    append = args[4] if len(args) > 4 else None
    if n != 1 or append is not None:
        raise TvmError(f"node {node.name}: diff with n={n}, append={append is not None} is not supported")
    shape = list(x.ty.shape)
    dim = dim % len(shape)
    parts = [prepend, x] if prepend is not None else [x]
    cat = bb.emit(relax.op.concat(parts, axis=dim)) if len(parts) > 1 else x
    length = shape[dim] + (prepend.ty.shape[dim] if prepend is not None else 0) - 1
    out_shape = [*shape[:dim], length, *shape[dim + 1:]]
    ty = relax.TensorType(out_shape, x.ty.dtype)
    hi = bb.match_cast(bb.emit(relax.op.strided_slice(cat, [dim], [1], [length + 1])), ty)
    lo = bb.match_cast(bb.emit(relax.op.strided_slice(cat, [dim], [0], [length])), ty)
    return bb.emit(relax.op.subtract(hi, lo))


def _convert_linear(prefix: str, lanes: int):
    """A float ``aten.linear`` as one ``dense`` (``x[M, K] . W[N, K]^T``) on the weight as stored:
    Relax's own linear legalizes to a transpose of the weight at every call (the 113 MB tied
    embedding of SmolLM2 per token) followed by a matmul."""

    cache: dict = {}

    def convert(node, importer):
        return _dense(node, importer, prefix, lanes, cache)

    return convert


def _dense(node, importer, prefix: str, lanes: int, cache: dict):
    from tvm import relax, tirx, topi

    from finegrain.backends.tvm.kernels.dense import gemv_func

    bb = importer.block_builder
    args = importer.retrieve_args(node)
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    shape = list(x.ty.shape)
    rows = flat_rows(shape)
    n = w.ty.shape[0]
    k = shape[-1]
    x2 = bb.emit(relax.op.reshape(x, [rows, k]))
    if isinstance(rows, tirx.IntImm) and int(rows) == 1 and int(k) % lanes == 0 and x.ty.dtype == "float32":
        key = f"{prefix}dense_gemv_k{int(k)}_n{int(n)}"
        if key not in cache:
            func = gemv_func(int(k), int(n), lanes).with_attrs({"op_pattern": 8, "global_symbol": key})
            cache[key] = bb.add_func(func, key)
        y = bb.emit(relax.call_tir(cache[key], [x2, w], relax.TensorType([1, n], "float32")))
    else:
        y = bb.emit_te(topi.nn.dense, x2, w, primfunc_name_hint=f"{prefix}dense")
    y = bb.emit(relax.op.reshape(y, [*shape[:-1], n]))
    return bb.emit(relax.op.add(y, bias)) if bias is not None else y


def _import(gm: GraphModule, example: tuple, dynamic_shapes, prefix: str, lanes: int, max_seq_len: int):
    from tvm.relax.frontend.torch import from_exported_program

    from finegrain.backends.tvm import lower_attention, lower_cache, lower_window
    from finegrain.backends.tvm.window_cache import mark_fused_decode

    shared: dict = {}  # the packed windows' buffers after their commit, for decode's attention (lower_window)
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.diff.default, None)
    table.pop(torch.ops.aten.linear.default, None)
    kept_sdpa = table.copy()  # the export keeps SDPA whole, decomposed after only where an attention does not fit
    kept_sdpa.pop(lower_attention.SDPA, None)
    convert = {"packed_linear.default": _convert_packed_linear({}, prefix, lanes), "diff.default": _convert_diff,
               "fake_quant.default": convert_fake_quant(prefix), "a8_linear.default": convert_a8_linear(prefix),
               "linear.default": _convert_linear(prefix, lanes), "packed_weight.default": _convert_packed_weight(prefix),
               "packed_embedding.default": _convert_packed_embedding(prefix),
               "amax.default": _convert_amax, "view.default": _convert_reshape, "reshape.default": _convert_reshape,
               "grouped_linear.default": _convert_grouped_linear(prefix), "histc.default": _convert_histc(prefix),
               "div.Tensor_mode": _convert_div_mode, "empty.memory_format": _convert_empty,
               "empty.default": _convert_empty, "empty_permuted.default": _convert_empty,
               **lower_cache.relax_converters(prefix),
               **lower_window.relax_converters(prefix, shared)}
    with warnings.catch_warnings():  # torch's deepcopy of the program's tree specs warns of its own deprecation
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        ep = export_decomposed(gm, example, kept_sdpa, dynamic_shapes=dynamic_shapes,
                               prefer_deferred_runtime_asserts_over_guards=True)
        ep, kept = lower_attention.keep_undecomposed(ep, table)  # every attention fits the fused kernel
    if kept:
        convert["scaled_dot_product_attention.default"] = lower_attention.converter(prefix, max_seq_len, shared)
        lower_attention.share_kv_heads(ep)
    shared["max_seq_len"] = max_seq_len
    shared["constants"] = {spec.arg.name: (ep.state_dict if spec.target in ep.state_dict else ep.constants)[spec.target]
                           for spec in ep.graph_signature.input_specs
                           if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR")
                           and (spec.target in ep.state_dict or spec.target in ep.constants)}
    _fix_bool_cumsum(ep)
    _wrap_negative_select(ep)
    _share_past_length(ep)
    _drop_empty_cat_inputs(ep)
    if kept:  # decode over a packed window: its attention reads the buffers in place (after the empty-cat drop:
        # ZipCache's saliency then reads the decoded past through views only)
        mark_fused_decode(ep.graph)
    _drop_runtime_asserts(ep)
    mod = from_exported_program(ep, keep_params_as_input=True, run_ep_decomposition=False,
                                unwrap_unit_return_tuple=True, custom_convert_map=convert)
    return mod, [spec.target for spec in ep.graph_signature.input_specs if spec.kind.name == "PARAMETER"]


def is_tensor_specs(input_specs: list[dict]) -> bool:
    """A model with float inputs (images, features): built as one ``main`` function whose dims vary
    as the specs declare (``compile(inputs=...)``), not as prefill / decode over token ids."""
    return any(s["dtype"].startswith(("float", "bfloat")) for s in input_specs) and not is_kv_specs(input_specs)


def import_relax(gm: GraphModule, input_specs: list[dict], max_seq_len: int = 2048, target: dict | None = None,
                 int8: bool = True, cache: str = "static", kv_buffers: list | None = None,
                 kv_unpacked: list | None = None, kv_storage: str = "packed"):
    """``(IRModule with "prefill" and "decode", parameters (name, tensor) in call order, kernels per
    layer)``. ``max_seq_len`` bounds prefill's sequence length (over a KV cache: past + new
    tokens): TVM plans memory statically for it; ``target`` sets the kernels' vector width;
    ``int8``: integer-dot kernels for W(<=4)A8 linears where the target has AVX2 (see :func:`prepare`).
    A model with float inputs (:func:`is_tensor_specs`) gets one function ``main`` instead, its dims
    varying as the specs declare.

    A KV-cache graph (inputs ``input_ids, position_ids, past_key_0, past_value_0, ...``; outputs
    logits then the presents) keeps its signature: ``prefill`` takes 2.. new tokens over a past of
    any length (0 included), ``decode`` one token over any past; both return ``(logits,
    present_key_0, present_value_0, ...)``, the presents being the past with the new keys / values
    appended (the next call's past). With ``cache="static"`` (``lower_cache.py``) the pasts are
    token-major views ``[B, P, Hkv, d]`` of the deployment's preallocated buffers and the functions
    return ``(logits, new_key_0, new_value_0, ...)``, the new keys / values token-major
    ``[B, S, Hkv, d]``, for the runtime to write into the buffers. A layer whose keys and values are
    quantized on write in a packable format keeps them packed instead (``lower_cache.pack_cache``:
    codes, scales, zero points in place of each past and each new part); ``kv_buffers``, when
    given, receives one ``{"name", "dtype", "width"[, "packed", "rows"]}`` per cache buffer, in input order
    (KIVI's windowed writes: ``window_cache.py``, whose ring buffers have a fixed number of ``rows``);
    ``kv_unpacked``, when given, one line per windowed layer left in an fp32 cache, saying why (also
    warned). ``kv_storage="float"``: no layer packed (every static buffer an fp32 cache of the formats'
    values)."""
    import tvm

    lanes = vector_lanes(target)
    kv = is_kv_specs(input_specs)
    if not kv and is_tensor_specs(input_specs):  # images / features: one function over the declared dims
        from finegrain.io.signature import export_dynamic_shapes

        pgm, kernels = prepare(gm, input_specs, int8=int8 and a8.has_avx2(target))
        ex = example_inputs(input_specs)
        main, names = _import(pgm, ex, export_dynamic_shapes(input_specs), "", lanes, max_seq_len)
        funcs = {}
        for gv, f in main.functions_items():
            funcs[gv] = f
        params = dict(pgm.named_parameters())
        return tvm.IRModule(funcs), [(name, params[name]) for name in names], kernels
    if not kv and (len(input_specs) != 1 or input_specs[0]["dynamic_dims"] != [1]):
        raise TvmError("the TVM build takes one token-id input whose dim 1 (sequence) is dynamic, or a KV-cache "
                       f"graph (input_ids, position_ids, past_key_0, ...), got {[s['name'] for s in input_specs]}")
    if cache not in ("static", "concat"):
        raise TvmError(f"cache {cache!r}: 'static' (preallocated, written in place) or 'concat'")
    static = kv and cache == "static"
    pgm, kernels = prepare(gm, input_specs, int8=int8 and a8.has_avx2(target), pack_kv=static, kv_storage=kv_storage)
    seq = torch.export.Dim("seq", min=2, max=max_seq_len)
    past = [s["name"].startswith("past_") for s in input_specs]
    axis = 1 if static else 2  # the past's sequence axis
    if static:
        from finegrain.backends.tvm.lower_cache import to_static_cache

        to_static_cache(pgm)
    if kv:
        dim = torch.export.Dim("past", min=0, max=max_seq_len)
        ds_prefill = tuple({axis: dim} if p else {1: seq} for p in past)
        ds_decode = tuple({axis: dim} if p else None for p in past)
    else:
        ds_prefill, ds_decode = ({1: seq},), None
    ex_prefill = example_inputs(input_specs)
    if static:
        specs = pgm.kv_buffers
        if kv_buffers is not None:
            kv_buffers.extend(specs)
        if pgm.kv_unpacked:
            import warnings

            from finegrain.errors import listed

            warnings.warn("TVM static cache: windowed KV writes left in an fp32 cache of the format's values:\n  "
                          + listed(pgm.kv_unpacked), stacklevel=2)
            if kv_unpacked is not None:
                kv_unpacked.extend(pgm.kv_unpacked)
        p_len, heads = ex_prefill[2].shape[2], ex_prefill[2].shape[1]
        caches = tuple(torch.ones((1, b.get("rows", p_len), heads, b["width"]), dtype=getattr(torch, b["dtype"]))
                       for b in specs)
        ex_prefill = (*ex_prefill[:2], *caches)
        past = [False, False, *(True for _ in specs)]
        ring = [False, False, *("rows" in b for b in specs)]  # a packed window's ring: fixed rows
        ds_prefill = tuple(None if r else {axis: dim} if p else {1: seq} for p, r in zip(past, ring))
        ds_decode = tuple(None if r else {axis: dim} if p else None for p, r in zip(past, ring))
    ex_decode = tuple(x if p else x[:, :1] for x, p in zip(ex_prefill, past))  # one new token
    prefill, names = _import(pgm, ex_prefill, ds_prefill, "", lanes, max_seq_len)
    decode, names_d = _import(pgm, ex_decode, ds_decode, "decode_", lanes, max_seq_len if kv else 1)
    if names != names_d:
        raise TvmError("prefill and decode exports list different parameters")
    funcs = {}
    for name, part in (("prefill", prefill), ("decode", decode)):
        for gv, f in part.functions_items():
            if gv.name_hint == "main":
                gv, f = tvm.ir.GlobalVar(name), f.with_attr("global_symbol", name)
            funcs[gv] = f
    mod = tvm.IRModule(funcs)
    if static:  # the concatenations the attention kernel reads around have no reader left
        mod = tvm.relax.transform.DeadCodeElimination()(mod)
    params = dict(pgm.named_parameters())
    return mod, [(name, params[name]) for name in names], kernels
