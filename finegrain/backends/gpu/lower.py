"""Quantized FX graph -> a graph whose quantized ops call the Triton kernels (``kernels.py``).

:func:`prepare` copies the graph and rewrites

* ``linear(dequantize(quantize(x)), dequantize_packed(W), b)`` with a symmetric INT activation per
  token / tensor and a weight whose codes fit INT8 (INT2-4, INT8 symmetric, DGQ), or an FP8 E4M3
  activation per token with E4M3 weights, into :func:`a8_op` (``_a8_gemm``) on the codes of one
  :func:`a8_quant_op` (``_quant_rows``) per activation and format, shared by the linears reading it,
  fused into the RMSNorm before it (:func:`rms_norm_quant_op`) or SwiGLU's ``silu(g) * u``
  (:func:`silu_mul_quant_op`, the down projection's input) where that feeds nothing else;
* every other ``linear(x, dequantize_packed(W), b)`` whose element is INT2-8 or an OCP minifloat
  into :func:`wq_op` (split-K GEMV for a few rows, ``tl.dot`` GEMM otherwise), W repacked once into
  the kernel layout;
* ``finegrain::hadamard`` into :func:`hadamard_op` (``_fwht``);
* an activation fake quantization left over (no code-dot kernel took it: MX / NV blocks) into
  :func:`fake_quant_op` (``_fake_quant_rows``) where ``kernels.fake_quant_ok``;
* a packed weight read otherwise (an embedding, a conv, a codebook / BitMoD element) into its
  dequantized dense tensor, computed once here (``emulated``: dense memory, float compute);
* on CUDA, the remaining finegrain ops run on the device as the reference computes them
  (``emulated``: no kernel): activation fake quantization that did not fuse (MX / NV blocks,
  asymmetric, static) and the MoE grouped GEMM through :func:`in_fp32` (fp32 inputs), the
  KV-cache writes of KIVI / ZipCache / RotateKV (``kv_append``, ``kv_saliency``) as they are; an
  op not known to be device-clean through :func:`on_host` (the reference op on CPU copies);
* every device argument, keyword or positional (the traced causal mask's ``arange``, RoPE's
  ``inv_freq.to(device)``), to the target device;
* with ``dtype=torch.bfloat16`` (or float16), the compute dtype (:func:`to_compute_dtype`): what the
  graph computes from the token data in that dtype, the position / mask side in fp32 as traced.

The result is a plain ``GraphModule`` (nothing is exported again), its tensors on the device.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule
from torch.fx.node import map_aggregate

from finegrain.compiler.ir import cache_past, get_tensor
from finegrain.compiler.ops import GROUPED_LINEAR, KV_APPEND, KV_SALIENCY
from finegrain.formats import QuantFormat, scales
from finegrain.formats.ops import _fmt as _format  # the tag -> QuantFormat cache the reference ops use
from finegrain.formats.ops import DEQUANTIZE, DEQUANTIZE_PACKED, QUANTIZE, unpack_weight
from finegrain.backends.gpu import kernels

# finegrain reference ops that run on the model's device as they are (KIVI / ZipCache / RotateKV cache writes)
ON_DEVICE = (KV_APPEND, KV_SALIENCY)
# ... and on the device with fp32 inputs (:func:`in_fp32`): the fake quantization the kernels do not take
# (MX / NV block activations, asymmetric or static ones, per-token KV formats) and the MoE grouped GEMM
IN_FP32 = (QUANTIZE, DEQUANTIZE, GROUPED_LINEAR)
_META = ("bits", "pw", "split", "mini", "eb", "mb", "smode", "has_zero", "offset", "group", "k", "n", "scale2")


def _packed(meta: tuple, qw, s, z, s1) -> dict:
    return {**dict(zip(_META, meta)), "qw": qw, "s": s, "z": z, "s1": s1}


def wq_op(x, qw, s, z, s1, bias, meta: tuple):
    return kernels.wq_linear(x, _packed(meta, qw, s, z, s1), bias)


def a8_quant_op(x, act: str):
    """(codes, scales, x's leading dims, x's dtype): the activation quantized once for every linear reading it."""
    q, s = kernels.a8_quantize(x, _format(act))
    return q, s, tuple(x.shape[:-1]), x.dtype


def rms_norm_quant_op(h, weight, eps: float, act: str, offset: float = 0.0):
    """:func:`a8_quant_op` of the RMSNorm of ``h`` scaled by ``weight + offset`` (Llama: offset 0;
    Gemma: 1, added in fp32 as Gemma does), the quantizer fused into the norm."""
    w = weight.float() + offset if offset else weight
    q, s = kernels.rms_norm_quantize(h, w, eps, _format(act))
    return q, s, tuple(h.shape[:-1]), h.dtype


def silu_mul_quant_op(g, u, act: str):
    """:func:`a8_quant_op` of ``silu(g) * u`` (SwiGLU's product), the quantizer fused into it."""
    q, s = kernels.silu_mul_quantize(g, u, _format(act))
    return q, s, tuple(g.shape[:-1]), g.dtype


def a8_op(xq, act: str, qw, s, z, s1, bias, meta: tuple):
    q, xs, lead, dtype = xq
    return kernels.a8_gemm(q, xs, _format(act), _packed(meta, qw, s, z, s1), bias, lead, dtype)


def fake_quant_op(x, act: str, out_dtype: torch.dtype):
    """``dequantize(quantize(x, act))`` in one kernel (``kernels.fake_quantize``), in ``out_dtype``."""
    return kernels.fake_quantize(x, _format(act)).to(out_dtype)


def hadamard_op(x, factor):
    return kernels.fwht(x, factor)


def on_host(op, *args, **kwargs):
    """``op`` on CPU copies of its tensor arguments, float ones in fp32 (the reference ops are
    written for fp32; the compute-dtype pass casts their results back); tensor results moved back
    to the device of the first tensor argument."""
    dev = next((a.device for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)

    def cpu(a):
        if not isinstance(a, torch.Tensor):
            return a
        return a.cpu().float() if a.dtype in (torch.bfloat16, torch.float16) else a.cpu()
    out = op(*[cpu(a) for a in args], **{k: cpu(v) for k, v in kwargs.items()})
    back = lambda a: a.to(dev) if isinstance(a, torch.Tensor) and dev is not None else a  # noqa: E731
    return tuple(back(o) for o in out) if isinstance(out, (tuple, list)) else back(out)


def in_fp32(op, *args, **kwargs):
    """``op`` on its arguments where they are, half-precision float ones cast to fp32 first (the
    reference ops are written for fp32: the same numbers as :func:`on_host`, without the copies)."""
    up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) else a  # noqa: E731
    return op(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})


def act_ok(fmt: QuantFormat) -> bool:
    """Activation formats the code-dot path quantizes itself: symmetric INT2-8 or FP8 E4M3 per
    token, per tensor or in groups of 32 and up along K (FP8's 1 x 128 of the block-wise scheme),
    dynamic, float scale."""
    gran = fmt.granularity in ("token", "tensor") or (fmt.granularity == "group" and fmt.group_size % 32 == 0)
    return fmt.kind in ("int", "e4m3") and fmt.symmetric and fmt.dynamic and gran and fmt.scale in ("fp32", "fp16", "bf16")


def pair_ok(weight: QuantFormat, act: QuantFormat) -> bool:
    """Whether a linear with this weight and activation format runs on ``_a8_gemm`` (the format
    conditions of ``kernels.a8_ok``; its shape condition, a K tile of 32-128 inside a group, holds
    for groups of 32 and up): INT activations with INT2-4 / INT8-sym weights (float or DGQ scales),
    FP8 E4M3 activations with E4M3 weights (float or E8M0 scales; per channel, in groups or in 2-D
    blocks: FP8 W8A8 block-wise, 128 x 128 weight blocks x 1 x 128 activation groups)."""
    if not act_ok(act) or (weight.granularity == "group" and weight.group_size % 32):
        return False  # 2-D weight blocks pass: the packed scales hold one row per output channel
    if act.kind == "e4m3":
        return weight.kind == "e4m3" and weight.scale in ("fp32", "fp16", "bf16", "e8m0")
    if act.granularity == "group" and weight.scale == "int8":  # DGQ scales its integer sums once, per token
        return False
    if weight.kind != "int" or weight.scale not in ("fp32", "fp16", "bf16", "int8"):
        return False
    return weight.bits <= 4 or (weight.symmetric and weight.bits == 8)


def rms_norm_parts(x):
    """(h, weight node, eps, offset) when the node ``x`` is an RMSNorm of ``h`` as torch.export writes
    it: Llama's ``weight * to(h * rsqrt(mean(h^2, [-1], keepdim) + eps))`` (offset 0) or Gemma's
    ``(h * rsqrt(...)) * (to(weight) + offset)``, the ``to`` casts optional; else None."""
    aten = torch.ops.aten
    casts = (aten.to.dtype, aten._to_copy.default)

    def is_(n, target):
        return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is target

    def strip(n):
        while isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in casts:
            n = n.args[0]
        return n

    def scale(n):  # (weight get_attr, offset) of a norm's scale operand, or None
        n = strip(n)
        if getattr(n, "op", None) == "get_attr":
            return n, 0.0
        if is_(n, aten.add.Tensor) and isinstance(n.args[1], (int, float)) and not isinstance(n.args[1], bool) \
                and getattr(strip(n.args[0]), "op", None) == "get_attr":
            return strip(n.args[0]), float(n.args[1])
        return None

    x = strip(x)
    if not is_(x, aten.mul.Tensor) or len(x.args) != 2:
        return None
    sc, y = (scale(x.args[0]), x.args[1]) if scale(x.args[0]) else (scale(x.args[1]), x.args[0])
    if sc is None or not isinstance(y, torch.fx.Node):
        return None
    y = strip(y)
    if not is_(y, aten.mul.Tensor) or len(y.args) != 2:
        return None
    h, r = y.args if is_(y.args[1], aten.rsqrt.default) else y.args[::-1]
    if not is_(r, aten.rsqrt.default) or not is_(r.args[0], aten.add.Tensor):
        return None
    mean, eps = r.args[0].args[:2]
    if not is_(mean, aten.mean.dim) or not isinstance(eps, float) or list(mean.args[1]) != [-1] \
            or not _arg(mean, 2, "keepdim"):
        return None
    sq = mean.args[0]
    if not is_(sq, aten.pow.Tensor_Scalar) or sq.args[0] is not h or sq.args[1] != 2:
        return None
    return h, sc[0], eps, sc[1]


def swiglu_parts(x):
    """(g, u) when the node ``x`` is ``silu(g) * u`` (either operand order) and the silu is read by
    nothing else, else None."""
    if not (isinstance(x, torch.fx.Node) and x.op == "call_function" and x.target is torch.ops.aten.mul.Tensor
            and len(x.args) == 2 and all(isinstance(a, torch.fx.Node) for a in x.args)):
        return None
    for a, b in (x.args, x.args[::-1]):
        if a.op == "call_function" and a.target is torch.ops.aten.silu.default and set(a.users) == {x}:
            return a.args[0], b
    return None


def _fuse_norm_quantizers(graph: Graph, quantized: dict) -> int:
    """Each per-token :func:`a8_quant_op` whose activation is read by nothing else and is an RMSNorm
    (or SwiGLU's ``silu(g) * u``) becomes one :func:`rms_norm_quant_op` (:func:`silu_mul_quant_op`);
    the norm's (product's) nodes then die. Returns the number fused."""
    fused = 0
    for (x, tag), qn in quantized.items():
        if _format(tag).granularity != "token" or set(x.users) != {qn}:
            continue
        parts, swiglu = rms_norm_parts(x), swiglu_parts(x)
        if parts is None and swiglu is None:
            continue
        with graph.inserting_before(qn):
            if parts is not None:
                h, w, eps, offset = parts
                new = graph.call_function(rms_norm_quant_op, (h, w, eps, tag, offset))
            else:
                new = graph.call_function(silu_mul_quant_op, (*swiglu, tag))
        qn.replace_all_uses_with(new)
        graph.erase_node(qn)
        fused += 1
    return fused


def _arg(n, i: int, name: str):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name)


def _source_activation(x):
    """(x, act tag) when ``x`` is ``dequantize(getitem(quantize(src, fmt)))`` with a dynamic format
    the code-dot path computes itself, else None."""
    if getattr(x, "target", None) is not DEQUANTIZE:
        return None
    codes = x.args[0]
    if getattr(codes, "target", None) is not operator.getitem or getattr(codes.args[0], "target", None) is not QUANTIZE:
        return None
    q = codes.args[0]
    tag = q.args[1]
    if _arg(q, 2, "scale") is not None or not act_ok(QuantFormat.parse(tag)):
        return None
    return q.args[0], tag


def _kernel_linears(n) -> list:
    """The linears that read the ``dequantize_packed`` node ``n`` whole as their weight, when a kernel
    decodes its format (else [])."""
    shape = n.args[4]
    if len(shape) != 2 or kernels.element_layout(_format(n.args[3])) is None:
        return []
    return [u for u in n.users if u.target is torch.ops.aten.linear.default and u.args[1] is n]


def kernel_weights(gm: GraphModule):
    """(node, layer, format, 2-D shape) of every packed weight a linear reads whole and a kernel
    decodes: what :func:`prepare` repacks (and ``deploy.build_deployment`` stores repacked)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is DEQUANTIZE_PACKED and _kernel_linears(n):
            yield n, str(n.args[0].target).removesuffix("_qpacked"), _format(n.args[3]), list(n.args[4])


def _unpacked(gm: GraphModule, n):
    """(format, QTensor) of the packed weight the ``dequantize_packed`` node ``n`` reads."""
    packed_node, scale_node, zero_node, tag, shape = n.args[:5]
    fmt = QuantFormat.parse(tag)
    scale2, codebook = _arg(n, 6, "scale2"), _arg(n, 7, "codebook")
    return fmt, unpack_weight(get_tensor(gm, packed_node.target), get_tensor(gm, scale_node.target),
                              get_tensor(gm, zero_node.target) if zero_node is not None else None, fmt, list(shape),
                              get_tensor(gm, scale2.target) if scale2 is not None else None,
                              get_tensor(gm, codebook.target) if codebook is not None else None)


def repack(gm: GraphModule, n) -> dict:
    """The kernel layout (``kernels.pack_weight``) of the packed weight ``dequantize_packed`` node ``n`` reads."""
    fmt, q = _unpacked(gm, n)
    return kernels.pack_weight(fmt, q.codes, scales.stored_scale(fmt, q), q.zero,
                               None if q.scale2 is None else scales.stored_scale2(fmt, q))


def prepare(gm: GraphModule, device: torch.device, dtype: torch.dtype = torch.float32,
            float_inputs: list[bool] | None = None, prepacked: dict | None = None) -> tuple[GraphModule, dict]:
    """The rewritten graph (module docstring) on ``device`` computing in ``dtype`` and, per quantized
    layer, its kernel. ``float_inputs``: which placeholders (in order) are float (the KV pasts; by
    default from the traced values, which a loaded artifact's graph does not carry). ``prepacked``:
    layer -> kernel layout already built (a GPU deployment's, checked by ``deploy``), used as is."""
    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    root = torch.nn.Module()
    kernels_used: dict[str, dict] = {}
    count = [0]

    quantized: dict = {}  # (activation node, format) -> its a8_quant_op node
    packed_keys: set[str] = set()  # the kernels' packed codes / scales, RoPE's inv_freq: kept in their stored dtypes

    def attr(name: str, t: torch.Tensor | None, packed: bool = False):
        if t is None:
            return None
        key = f"{name.replace('.', '_')}_{count[0]}"
        count[0] += 1
        root.register_buffer(key, t.detach().contiguous())
        if packed:
            packed_keys.add(key)
        return graph.get_attr(key)

    from finegrain.compiler.ops import HADAMARD

    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is HADAMARD:
            with graph.inserting_before(n):
                new = graph.call_function(hadamard_op, (n.args[0], attr("hadamard", get_tensor(gm, n.args[1].target))))
            new.meta.update(n.meta)  # the traced value (its shape is read later, e.g. by _fuse_fake_quantizers)
            n.replace_all_uses_with(new)
            graph.erase_node(n)
            continue
        if n.target is not DEQUANTIZE_PACKED:
            continue
        packed_node, _, _, tag, shape = n.args[:5]
        layer = str(packed_node.target).removesuffix("_qpacked")
        fmt = QuantFormat.parse(tag)
        linears = _kernel_linears(n)
        if linears:
            p = prepacked[layer] if prepacked and layer in prepacked else repack(gm, n)
            meta = tuple(p[k] for k in _META)
            with graph.inserting_before(n):
                tensors = [attr(f"{layer}_gpu_{part}", p[part], packed=True) for part in ("qw", "s", "z", "s1")]
            for u in linears:
                bias = _arg(u, 2, "bias")
                src = _source_activation(u.args[0])
                if src is not None:
                    afmt = QuantFormat.parse(src[1])
                    ag = afmt.group_size if afmt.granularity == "group" else 0
                    if not (pair_ok(fmt, afmt) and kernels.a8_ok(p, f8=afmt.kind == "e4m3", act_group=ag)):
                        src = None
                with graph.inserting_before(u):
                    if src is not None:
                        if src not in quantized:  # one quantization per activation and format (q / k / v share it)
                            with graph.inserting_after(src[0]):
                                quantized[src] = graph.call_function(a8_quant_op, src)
                        new = graph.call_function(a8_op, (quantized[src], src[1], *tensors, bias, meta))
                    else:
                        new = graph.call_function(wq_op, (u.args[0], *tensors, bias, meta))
                u.replace_all_uses_with(new)
                graph.erase_node(u)
                kind = ("fp8-dot" if src[1].startswith("e4m3") else "int8-dot") if src is not None else "wq"
                kernels_used[layer if layer not in kernels_used else f"{layer} ({kind})"] = {
                    "format": fmt.tag, "kind": kind, "activation": src[1] if src else None, "shape": list(shape)}
        if n.users:  # read whole (an embedding, a conv) or no kernel: dense, dequantized once
            _, q = _unpacked(gm, n)
            with graph.inserting_before(n):
                dense = attr(f"{layer}_dense", fmt.dequantize(q, _arg(n, 5, "out_dtype") or torch.float32))
            n.replace_all_uses_with(dense)
            kernels_used.setdefault(layer, {"format": fmt.tag, "kind": "dequantized at load", "shape": list(shape)})
        graph.erase_node(n)
    graph.eliminate_dead_code()
    if _fuse_norm_quantizers(graph, quantized):
        graph.eliminate_dead_code()
    if _fuse_fake_quantizers(graph):
        graph.eliminate_dead_code()
    if torch.device(device).type != "cpu":
        _reference_fallbacks(graph)
    on_device = lambda a: torch.device(device) if isinstance(a, torch.device) else a  # noqa: E731
    for n in graph.nodes:
        if n.op == "get_attr" and not hasattr(root, n.target):
            t = get_tensor(gm, n.target)
            key = f"const_{count[0]}"
            count[0] += 1
            root.register_buffer(key, t.detach().clone() if isinstance(t, torch.Tensor) else t)
            if "inv_freq" in n.target:  # RoPE's frequencies: the position side (fp32 in any compute dtype)
                packed_keys.add(key)
            n.target = key
        # devices the trace baked in, keyword (``arange(..., device=)``) or positional (RoPE's
        # ``inv_freq.to(device, float32)``, exported as ``aten.to.device``)
        n.args = map_aggregate(n.args, on_device)
        n.kwargs = map_aggregate(n.kwargs, on_device)
    if dtype != torch.float32:
        to_compute_dtype(graph, root, dtype, packed_keys, float_inputs)
    out = GraphModule(root, graph)
    out.kv_writes = _static_kv_writes(out.graph)  # on the module's graph: a loaded graph's empty past is read from it
    out.graph.lint()
    out.recompile()
    return out.to(device), kernels_used


# ---- the static KV cache: presents appended in place ------------------------------------------------------------
#
# A KV-cache graph returns each present as ``cat(past, new)`` on the token axis: run as traced, every
# step allocates a new [B, Hkv, past + S, d] per layer for K and V and copies the whole past into it.
# :func:`_static_kv_writes` turns each such concatenation of a past input into :func:`kv_write_op`: when
# the past is the filled prefix of a cache buffer the session allocated (:func:`static_buffers`:
# [B, Hkv, L, d], registered with its fill), the new tokens are written into the buffer after it and the
# present is a view of the buffer (nothing allocated, the past not copied); otherwise (a past the caller
# made, a second step from an older state, a full buffer) it is the concatenation, as traced. Attention
# reads the view as it read the concatenation (strided along the token axis), so the logits are the same.

_FILL: dict[int, int] = {}  # data pointer of a session-owned cache buffer -> the tokens written into it


def static_buffers(batch: int, heads: int, tokens: int, head_dim: int, count: int, dtype: torch.dtype,
                   device) -> list[torch.Tensor]:
    """``count`` empty pasts ``[batch, heads, 0, head_dim]``, each the prefix of a registered buffer of
    ``tokens`` rows that :func:`kv_write_op` appends into (unregistered when the buffer is freed)."""
    import weakref

    views = []
    for _ in range(count):
        # zeros, not empty: a fixed-shape decode step reads the rows past the fill (masked), and a masked
        # NaN would still poison the weighted sum of values (0 * NaN)
        buf = torch.zeros(batch, heads, tokens, head_dim, dtype=dtype, device=device)
        ptr = buf.untyped_storage().data_ptr()
        _FILL[ptr] = 0
        weakref.finalize(buf, _FILL.pop, ptr, None)  # views keep ``buf`` (their base) alive
        views.append(buf[:, :, :0])
    return views


def kv_write_op(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``cat(past, new)`` on dim 2, written into ``past``'s buffer when ``past`` is exactly the filled
    prefix of a registered one with room for ``new`` (a view is returned), else concatenated."""
    p, s = past.shape[2], new.shape[2]
    buf = _whole_buffer(past, p, s)
    if buf is None or new.dtype != past.dtype or new.device != past.device:
        return torch.cat([past, new], 2)
    buf[:, :, p:p + s].copy_(new)
    _FILL[past.untyped_storage().data_ptr()] = p + s
    return buf[:, :, :p + s]


def _whole_buffer(p: torch.Tensor, fill: int, room: int) -> torch.Tensor | None:
    """The whole registered buffer ``[B, Hkv, rows, d]`` of which ``p`` is exactly the filled prefix of
    ``fill`` tokens, when it has room for ``room`` more; else None."""
    b, h, n, d = p.shape
    rows = p.stride(1) // d if d else 0
    if not (n == fill and _FILL.get(p.untyped_storage().data_ptr()) == fill and p.storage_offset() == 0
            and p.stride() == (h * rows * d, rows * d, d, 1) and fill + room <= rows):
        return None
    return p.as_strided((b, h, rows, d), p.stride())


def whole_buffers(past, fill: int, room: int = 1) -> list[torch.Tensor] | None:
    """The whole registered buffers ``[B, Hkv, rows, d]`` of which ``past`` are exactly the filled
    prefixes of ``fill`` tokens with room for ``room`` more, else None (a past the caller made, an older
    state's, a full buffer)."""
    out = [_whole_buffer(p, fill, room) for p in past]
    return None if any(b is None for b in out) else out


def mark_filled(buffers, fill: int) -> list[torch.Tensor]:
    """Record ``fill`` tokens in each registered buffer (after a :func:`fixed_decode_graph` step wrote
    into them); returns their filled prefixes, the presents a step returns."""
    for buf in buffers:
        _FILL[buf.untyped_storage().data_ptr()] = fill
    return [buf[:, :, :fill] for buf in buffers]


def _static_kv_writes(graph: Graph) -> list[int]:
    """Rewrite each graph output that is ``cat([past input, new], 2)`` into :func:`kv_write_op`;
    returns their positions among the outputs."""
    out = next(n for n in graph.nodes if n.op == "output")
    results = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    writes = []
    for i, n in enumerate(results):
        if not (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is torch.ops.aten.cat.default
                and len(n.args[0]) == 2 and (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) in (2, -2)):
            continue
        past, new = n.args[0]
        past = cache_past(past)  # not transformers' copy of it onto an empty tensor: the input itself
        if not (isinstance(past, torch.fx.Node) and past.op == "placeholder"):
            continue
        with graph.inserting_before(n):
            w = graph.call_function(kv_write_op, (past, new))
        w.meta.update(n.meta)
        n.replace_all_uses_with(w)
        graph.erase_node(n)
        writes.append(i)
    graph.eliminate_dead_code()
    return writes


# ---- decode as one fixed-shape graph (what a CUDA graph captures) ----------------------------------------------
#
# A CUDA graph replays kernels with the shapes and addresses it captured, so the step it captures cannot
# grow its inputs: :func:`fixed_decode_graph` rewrites the prepared graph into a one-token step over the
# **whole** static buffers (``[B, Hkv, rows, d]``, the addresses the session allocated) and a device
# tensor ``cache_fill`` (the tokens already in them). Each static write appends at ``cache_fill``
# (:func:`static_append`, an ``index_copy_``); the past length the graph read from its inputs' shapes
# is, where it sizes a tensor (the key positions ``arange(P + 1)``, the mask's and the grouped heads'
# ``expand`` / ``reshape``), ``rows - 1`` (so ``P + 1`` is the buffer's rows), and, where it offsets
# the query positions (``arange(S) + P``: the causal and sliding-window masks compare key positions
# with them), the ``cache_fill`` tensor: the rows past the fill are masked out as future tokens.
# Any other read of the past length is refused with the node named.

_SHAPE_ARITH = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod)
_OFFSET_OPS = (torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor)


def static_append(buf: torch.Tensor, new: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``new`` (``[B, Hkv, S, d]``) written into the whole buffer ``buf`` at rows ``fill ..``; returns ``buf``."""
    rows = fill + torch.arange(new.shape[2], device=fill.device)
    return buf.index_copy_(2, rows, new.to(buf.dtype))


_SIZE_OPS = (torch.ops.aten.arange.default, torch.ops.aten.expand.default, torch.ops.aten.view.default,
             torch.ops.aten.reshape.default, torch.ops.aten.new_zeros.default, torch.ops.aten.full.default,
             torch.ops.aten.zeros.default, torch.ops.aten.ones.default, torch.ops.aten.empty.memory_format)


def _sizes_only(users) -> bool:
    """Every one of ``users`` reads an int (directly or through int arithmetic) to size a tensor only."""
    for u in users:
        if u.target in _SHAPE_ARITH:
            if not _sizes_only(u.users):
                return False
        elif u.target not in _SIZE_OPS:
            return False
    return True


def fixed_decode_graph(gm: GraphModule, rows: int) -> GraphModule:
    """The one-token decode step of the prepared KV-cache graph ``gm`` (:func:`prepare`, every present
    a static write) over whole buffers of ``rows`` tokens, inputs ``(input_ids, position_ids, *buffers,
    cache_fill)`` (section comment above). Raises ``InputError`` naming the node where the graph reads
    the past otherwise."""
    from finegrain.errors import InputError

    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    writes = [n for n in graph.nodes if n.op == "call_function" and n.target is kv_write_op]
    pasts = {w.args[0] for w in writes}
    for ph in placeholders[2:]:
        if ph not in pasts:
            raise InputError(f"decode graph: the cache input {ph.name} is not appended into a static buffer "
                             "(its layer's write runs as a reference op); decode without decode_graph")
    with graph.inserting_after(placeholders[-1]):
        fill = graph.placeholder("cache_fill")
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is kv_write_op:
            n.target, n.args = static_append, (n.args[0], n.args[1], fill)
            continue
        if n.target is torch.ops.aten.sym_size.int and n.args[0] in pasts:
            if n.args[1] not in (2, -2):
                continue
            for u in list(n.users):
                if u.target in _OFFSET_OPS and u.args[1] is n and isinstance(u.args[0], torch.fx.Node):
                    u.args = (u.args[0], fill, *u.args[2:])  # a query position offset: the fill
                elif not _sizes_only([u]):
                    raise InputError(f"decode graph: node {u.name} ({u.target}) reads the past length of "
                                     f"{n.args[0].name} in a way a fixed-shape step cannot replace")
            for u in list(n.users):
                u.args = map_aggregate(u.args, lambda a: rows - 1 if a is n else a)
                u.kwargs = map_aggregate(u.kwargs, lambda a: rows - 1 if a is n else a)
            graph.erase_node(n)
    for ph in pasts:
        for u in ph.users:
            if u.target is not static_append:
                raise InputError(f"decode graph: node {u.name} reads the cache input {ph.name} besides its write")
    graph.eliminate_dead_code()
    graph.lint()
    return GraphModule(gm, graph)


def _fuse_fake_quantizers(graph: Graph) -> int:
    """Each activation fake quantization left in the graph, ``dequantize(*quantize(x, fmt))`` with a
    dynamic format no code-dot kernel took (MX / NV blocks, groups the kernels' K tiles do not fit), that
    ``kernels.fake_quant_ok`` covers becomes one :func:`fake_quant_op` (``_fake_quant_rows``: the
    reference's scales and rounding bit for bit) instead of the reference op's dozen torch ops. Returns
    how many."""
    done = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not DEQUANTIZE:
            continue
        parts = n.args[:3]
        q = parts[0].args[0] if all(isinstance(p, torch.fx.Node) and p.target is operator.getitem for p in parts) else None
        if q is None or q.target is not QUANTIZE or any(p.args != (q, i) or len(p.users) != 1 for i, p in enumerate(parts)):
            continue
        x, tag = q.args[:2]
        static = any(a is not None for a in list(q.args[2:]) + [q.kwargs.get("scale"), q.kwargs.get("zero")])
        # K from the traced values: x's, or (x a node this lowering made) the dequantized result's, x's shape
        val = next((v for v in (getattr(x, "meta", {}).get("val"), n.meta.get("val")) if v is not None), None)
        k = val.shape[-1] if isinstance(val, torch.Tensor) else None
        if static or tag != n.args[3] or not isinstance(k, int) or not kernels.fake_quant_ok(_format(tag), k):
            continue
        with graph.inserting_before(n):
            fused = graph.call_function(fake_quant_op, (x, tag, _arg(n, 4, "out_dtype") or torch.float32))
        fused.meta.update(n.meta)
        n.replace_all_uses_with(fused)
        graph.erase_node(n)
        done += 1
    return done


def _reference_fallbacks(graph: Graph) -> None:
    """The remaining ``finegrain::`` ops run on the device: the KV-cache writes (:data:`ON_DEVICE`,
    which take the whole past: copying it to the host and back every step costs more than the step)
    as they are, the fake quantizers and the grouped GEMM (:data:`IN_FP32`) through :func:`in_fp32`;
    all are written for any device and tested with torch's default device set elsewhere
    (``tests/formats/test_ops.py``, ``tests/passes/test_quantize_kv.py``). Any other runs on CPU
    copies (:func:`on_host`). Until 2026-12-06 the fake quantizers ran on the host too (numpy casts
    for FP4 / FP6): every linear of an MX / NV preset copied its activation to the host and back, and
    no such decode step could be captured in a CUDA graph."""
    for n in graph.nodes:
        if n.op != "call_function" or not str(getattr(n, "target", "")).startswith("finegrain.") \
                or n.target in ON_DEVICE:
            continue
        n.args, n.target = (n.target, *n.args), in_fp32 if n.target in IN_FP32 else on_host


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_float(n) -> bool:
    val = n.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype in _FLOATS


def island_cast(x, dtype: torch.dtype):
    """``x`` (a value of the position / mask side) in ``dtype`` when it is a float tensor, clamped to
    its finite range (a mask's ``finfo(float32).min`` stays a large negative number, not -inf)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == dtype:
        return x
    fi = torch.finfo(dtype)
    return x.clamp(fi.min, fi.max).to(dtype)


def as_dtype(x, dtype: torch.dtype):
    """A finegrain op's float result in the compute dtype (the reference ops compute in fp32)."""
    if isinstance(x, (tuple, list)):
        return type(x)(as_dtype(v, dtype) for v in x)
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _island_value(a, data: set) -> bool:
    """``a`` is a position / mask side value that may be float (without traced values: any tensor op)."""
    if not isinstance(a, torch.fx.Node) or a in data or a.op != "call_function":
        return False
    if "val" in a.meta:
        return _is_float(a)
    return isinstance(a.target, torch._ops.OpOverload) and a.target is not torch.ops.aten.sym_size.int


def to_compute_dtype(graph: Graph, root: torch.nn.Module, dtype: torch.dtype, keep: set[str],
                     float_inputs: list[bool] | None = None) -> None:
    """Make ``graph`` compute in ``dtype`` (bf16 / fp16) what it computes from the token data.

    The data side is everything downstream of a float input (the KV pasts), a float weight or
    buffer, or an embedding lookup; its weights are stored in ``dtype`` (the kernels' packed codes
    and scales and RoPE's ``inv_freq``, ``keep``, stay as stored), its ``dtype=float32`` arguments
    (the traced ``.to()`` of norms and RoPE) become ``dtype``, a finegrain reference op's result is
    cast back to ``dtype``. The rest is the position / mask side (RoPE's ``inv_freq`` and what the
    positions make of it, the causal mask): computed in fp32 as traced, as transformers does in a
    bf16 model, and cast (clamped, :func:`island_cast`, a no-op on integers) where the data side
    reads it. Norm statistics are computed in ``dtype`` (transformers upcasts them to fp32; torch's
    reductions accumulate in fp32 either way)."""
    data: set = set()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for i, n in enumerate(placeholders):
        if (float_inputs[i] if float_inputs is not None else _is_float(n)):
            data.add(n)
    for n in graph.nodes:
        if n.op == "placeholder":
            continue
        elif n.op == "get_attr":
            t = getattr(root, n.target, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and n.target not in keep:
                data.add(n)
        elif n.op == "call_function":
            if n.target is torch.ops.aten.embedding.default or any(a in data for a in n.all_input_nodes):
                data.add(n)
    for n in graph.nodes:  # weights and buffers read by the data side: stored in the compute dtype
        if n.op == "get_attr" and n in data:
            t = getattr(root, n.target)
            if t.dtype in _FLOATS:
                root.register_buffer(n.target, t.to(dtype))
    casts: dict = {}
    for n in list(graph.nodes):
        if n.op != "call_function" or n not in data:
            continue

        def swap(a):
            if _island_value(a, data):
                if a not in casts:
                    with graph.inserting_after(a):
                        casts[a] = graph.call_function(island_cast, (a, dtype))
                return casts[a]
            if isinstance(a, torch.dtype) and a in _FLOATS:
                return dtype
            return a

        n.args = torch.fx.node.map_aggregate(n.args, swap)
        n.kwargs = torch.fx.node.map_aggregate(n.kwargs, swap)
        if n.target in (on_host, in_fp32) or str(n.target).startswith("finegrain."):
            with graph.inserting_after(n):
                cast = graph.call_function(as_dtype, (n, dtype))
            n.replace_all_uses_with(cast, delete_user_cb=lambda u: u is not cast)
