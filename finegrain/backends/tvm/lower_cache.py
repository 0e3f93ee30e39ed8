"""The static KV cache of a TVM deployment (``cache="static"``, the default for KV-cache builds).

A KV-cache graph (``compile(kv_cache=True)``) concatenates each layer's past with the new keys /
values and returns the result, so running it as exported costs, per decode step and layer, a
new ``[B, Hkv, past + 1, d]`` tensor for K and one for V (allocated, the whole past copied in,
the previous one freed). Measured on SmolLM2 (``benchmarks/decode.py``, rows ``cache concat`` /
``cache static``) this made decode times swing with the allocator (first-visit page faults) and
cost a copy of the whole cache per step. A static build instead:

* the deployment holds, per layer, a preallocated ``[B, max_seq_len, Hkv, d]`` buffer for K and
  one for V, **token-major** so that the first ``P`` tokens are a contiguous prefix: each call
  takes zero-copy views ``[B, P, Hkv, d]`` of them as its past (:func:`to_static_cache` makes the
  graph's past inputs token-major, transposed inside the graph to the layout the model computes
  in);
* the graph returns only the new keys / values (``[B, S, Hkv, d]``, token-major) instead of the
  presents; the runtime writes them into the buffers at the cache position (``S`` rows per layer).
  A windowed quantized write (``lower_window.py``: KIVI) returns the cache from the first token it
  quantized on (the group it released, then the new tokens); the runtime writes every returned part
  so that it ends at the new length;
* where the fused attention kernel reads the cache (:func:`cache_parts` finds the concatenation
  of the past view and the new part), decode reads the cached keys / values in place and the new
  one beside them (``kernels/attention.cache_decode_attention_func``); prefill gathers them into
  the kernel's layout once. The concatenation and the transposes then have no reader and are
  removed, so decode touches each cached key and value once and allocates nothing per token.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule

from finegrain.compiler.ir import KV as KV_META  # the present keys / values' node meta
from finegrain.compiler.ir import cache_past
from finegrain.backends.tvm.lower_window import KV_WINDOW_PAST
_TRANSPOSES = (torch.ops.aten.permute.default, torch.ops.aten.transpose.int)


def to_static_cache(gm: GraphModule) -> GraphModule:
    """Rewrite, in place, a prepared KV-cache graph (``lower.prepare`` output) for the static
    cache: each ``past_*`` placeholder becomes token-major ``[B, P, Hkv, d]`` (one transpose after
    it gives the ``[B, Hkv, P, d]`` its readers had), and each present output ``cat(past, new)``
    becomes ``new`` transposed to ``[B, S, Hkv, d]`` (a ``kv_window_write`` is split,
    :func:`_split_window_write`). Returns ``gm``."""
    from finegrain.backends.tvm.lower_activations import TvmError
    from finegrain.backends.tvm.lower_window import KV_WINDOW_WRITE

    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    pasts = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("past")]
    for ph in pasts:
        with graph.inserting_after(ph):
            t = graph.call_function(torch.ops.aten.transpose.int, (ph, 1, 2))
        ph.replace_all_uses_with(t, delete_user_cb=lambda u: u is not t)
    results = list(out.args[0])
    for i, n in enumerate(results):
        if not isinstance(n, torch.fx.Node) or KV_META not in n.meta:
            continue
        if n.target is KV_WINDOW_WRITE:  # released cached tokens written in place, the new ones returned
            results[i] = _split_window_write(graph, n)
            continue
        if n.target is not torch.ops.aten.cat.default or len(n.args[0]) != 2:
            raise TvmError(f"node {n.name}: the present of layer {n.meta[KV_META].get('layer')} is not cat(past, new); "
                           "build with cache='concat'")
        with graph.inserting_before(out):
            results[i] = graph.call_function(torch.ops.aten.transpose.int, (n.args[0][1], 1, 2))
    out.args = (tuple(results),)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def _split_window_write(graph, n):
    """A ``kv_window_write`` over ``transpose(past placeholder)`` becomes ``cat(transpose(
    kv_window_past(past, ..)), kv_window_new(past, ..))`` (``lower_window.py``: the released cached
    tokens written into the buffer in place); returns the new tokens token-major, the present output."""
    from finegrain.backends.tvm.lower_activations import TvmError
    from finegrain.backends.tvm.lower_window import KV_WINDOW_NEW, KV_WINDOW_PAST

    ph = _placeholder_through_transpose(cache_past(n.args[0]))
    if ph is None or ph.op != "placeholder":
        raise TvmError(f"node {n.name}: the windowed KV write of layer {n.meta[KV_META].get('layer')} does not read "
                       "its past input directly; build with cache='concat'")
    with graph.inserting_before(n):
        past = graph.call_function(KV_WINDOW_PAST, (ph, *n.args[1:]))
        new = graph.call_function(KV_WINDOW_NEW, (ph, *n.args[1:]))
        both = graph.call_function(torch.ops.aten.cat.default,
                                   ([graph.call_function(torch.ops.aten.transpose.int, (past, 1, 2)), new], 2))
    n.replace_all_uses_with(both)
    graph.erase_node(n)
    out = next(u for u in graph.nodes if u.op == "output")
    with graph.inserting_before(out):
        return graph.call_function(torch.ops.aten.transpose.int, (new, 1, 2))


def _placeholder_through_transpose(x, also: tuple = ()):
    """The placeholder ``x`` transposes (dims 1, 2) after any one-input concatenations, else None
    (``also``: more ops whose output may stand for the placeholder)."""
    while isinstance(x, torch.fx.Node) and x.target is torch.ops.aten.cat.default and len(x.args[0]) == 1:
        x = x.args[0][0]
    if not isinstance(x, torch.fx.Node) or x.target not in _TRANSPOSES:
        return None
    if x.target is torch.ops.aten.transpose.int:
        if sorted(d % 4 for d in x.args[1:3]) != [1, 2]:
            return None
    elif [d % 4 for d in x.args[1]] != [0, 2, 1, 3]:
        return None
    from finegrain.backends.tvm.window_cache import KV_WPACK_COMMIT

    src = x.args[0]
    if isinstance(src, torch.fx.Node) and src.op == "call_function" and src.target in (KV_DECODE, KV_WINDOW_PAST,
                                                                                       KV_WPACK_COMMIT, *also):
        # a packed cache, read through kv_decode; a windowed write's past, written in place (fp32 or packed)
        return src
    return src if isinstance(src, torch.fx.Node) and src.op == "placeholder" else None


def cache_parts(x):
    """``(past, new part)`` when ``x`` (an attention's K or V node in the exported program) is
    ``cat(transpose(past view), new)`` along the sequence, else None; ``past`` is the placeholder,
    or the ``kv_decode`` of a packed cache's placeholders."""
    if not isinstance(x, torch.fx.Node) or x.target is not torch.ops.aten.cat.default or len(x.args[0]) != 2:
        return None
    dim = x.args[1] if len(x.args) > 1 else 0
    if dim not in (2, -2):
        return None
    past, new = x.args[0]
    ph = _placeholder_through_transpose(past)
    return (ph, new) if ph is not None else None


# ---- the packed KV cache (issue #17): codes and scales where a static build keeps the cache ----
#
# A present quantized on write by ``passes/quantize_kv.py`` without a window
# (``cat(past, dequantize(quantize(new, fmt)))``, an integer format per token or in groups along
# the head dim with fp16 / fp32 scales) is held by a static build as what the format stores:
#
# * ``codes``  int32 ``[B, L, Hkv, W]``, ``W = d * bits / 32`` words per token and head, the codes
#   offset to unsigned (``u = code - lo``; FP8 E4M3: the 8-bit patterns) and **interleaved**: element ``a`` of
#   the head dim is bits
#   ``[(a // W) * bits, (a // W + 1) * bits)`` of word ``a % W``, so 8 consecutive elements sit at the
#   same shift of 8 consecutive words and the decode kernel unpacks them as one vector;
# * ``scales`` ``[B, L, Hkv, d / G]`` in the format's scale dtype (fp16 / fp32); none for a static
#   format (one calibrated scale per layer, ``kv8-fp8-static``): its decode and the decode kernel read
#   that scale, a constant of the graph, so the cache holds the codes alone, the bytes the format counts
#   (before 2026-12-06 it was written in every token's slot, 4 bytes per token and head more);
# * ``zeros``  uint8 ``[B, L, Hkv, d / G]`` (asymmetric formats only).
#
# The value a reader gets is ``(u + lo - zero) * scale`` (E4M3: the pattern's value times the scale), exactly
# what the fake quantization the attention of the writing step read. :func:`pack_cache` rewrites the graph: the past input becomes
# those two or three inputs read through ``finegrain::kv_decode``, the present output the new
# tokens' ``kv_codes`` / ``kv_scales`` / ``kv_zeros``; ``lower_attention`` gives decode a kernel
# that reads the codes in place (``kernels/attention.packed_decode_attention_func``).

PACKABLE_BITS = (2, 4, 8)
SCALE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def kv_layout(fmt, d: int) -> str | dict:
    """The packed layout of KV format ``fmt`` over head dim ``d`` (``bits``, ``group``, ``words``,
    ``asym``, ``scale`` dtype, ``lo`` code), or why it has none (a string)."""
    from finegrain.compiler.recipe import kv_static
    from finegrain.formats import QuantFormat

    f = QuantFormat.parse(fmt) if isinstance(fmt, str) else fmt
    static = kv_static(f)  # one calibrated scale per layer
    if f.kind not in ("int", "e4m3") or not (f.dynamic or static) or f.block_rows:
        return f"{f.tag} is not a dynamic integer or FP8 E4M3 format (or a static symmetric one per tensor)"
    if f.granularity not in ("token", "group") and not static:
        return f"{f.tag}: the packed cache holds formats per token or in groups along the head dim"
    group = f.group_size if f.granularity == "group" else d
    if d % group:
        return f"{f.tag}: groups of {group} do not divide the head dim {d}"
    if f.bits not in PACKABLE_BITS or (d * f.bits) % 32:
        return f"{f.tag}: {f.bits}-bit codes of a head dim {d} do not fill whole 32-bit words (2 / 4 / 8 bits do)"
    if f.scale not in SCALE_DTYPES:
        return f"{f.tag}: {f.scale} scales (fp16 / fp32 are stored)"
    lo, _ = f.family.code_range(f)
    return {"bits": f.bits, "group": group, "words": d * f.bits // 32, "asym": not f.symmetric,
            "scale": "float16" if f.scale == "fp16" else "float32", "lo": lo, "d": d, "fp8": f.kind == "e4m3",
            **({"static": True} if static else {})}


def _token_format(fmt: str):
    from finegrain.formats import QuantFormat

    return QuantFormat.parse(fmt).per_row()


def pack_words(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``u[..., d]`` as the packed cache's int32 words ``[..., d * bits / 32]`` (element ``a``
    in word ``a % W`` at bit ``(a // W) * bits``)."""
    w = u.shape[-1] * bits // 32
    u = u.to(torch.int64).reshape(*u.shape[:-1], 32 // bits, w)
    acc = torch.zeros(*u.shape[:-2], w, dtype=torch.int64)
    for i in range(32 // bits):
        acc |= u[..., i, :] << (i * bits)
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The unsigned codes ``[..., d]`` (int64) of :func:`pack_words`' words."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)[:, None]
    u = ((words.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-2) >> shifts) & (2**bits - 1)  # [..., d / W, W]
    return u.reshape(*words.shape[:-1], -1)


def encode_ref(x: torch.Tensor, fmt: str, scale: Optional[torch.Tensor] = None) -> tuple:
    """``(codes, scales, zeros)`` of ``x[..., d]`` as the packed cache holds them (reference); a
    static format takes its calibrated ``scale`` ``[1]`` (the cache holds only the codes: the scales
    returned are that scale per group, for the reference's own use)."""
    d = x.shape[-1]
    lay = kv_layout(fmt, d)
    if isinstance(lay, str):
        from finegrain.backends.tvm.lower_activations import TvmError

        raise TvmError(lay)
    g, bits = lay["group"], lay["bits"]
    xr = x.float().reshape(*x.shape[:-1], d // g, g)
    if lay.get("static"):
        s = scale.float().reshape(1).expand(*xr.shape[:-1], 1)
        q = _token_format(fmt).quantize(xr, s, torch.zeros_like(s, dtype=torch.int32))
    else:
        q = _token_format(fmt).quantize(xr)
    words = pack_words((q.codes.to(torch.int64) - lay["lo"]).reshape(*x.shape[:-1], d), bits)
    scales = q.scale.reshape(*x.shape[:-1], d // g).to(SCALE_DTYPES["fp16" if lay["scale"] == "float16" else "fp32"])
    zeros = q.zero.reshape(*x.shape[:-1], d // g).to(torch.uint8)
    return words, scales, zeros


def decode_ref(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, fmt: str, d: int) -> torch.Tensor:
    """The values a packed cache holds, fp32 ``[..., d]`` (reference)."""
    lay = kv_layout(fmt, d)
    bits, g = lay["bits"], lay["group"]
    u = unpack_words(codes, bits).reshape(*codes.shape[:-1], d // g, g)
    if lay.get("fp8"):  # E4M3 bit patterns
        u = u.to(torch.uint8).view(torch.float8_e4m3fn).float()
    else:
        u = u.float() + lay["lo"]
    if zeros is not None and lay["asym"]:
        u = u - zeros.float().unsqueeze(-1)
    return (u * scales.float().unsqueeze(-1)).reshape(*codes.shape[:-1], d)


@torch.library.custom_op("finegrain::kv_codes", mutates_args=())
def kv_codes(x: torch.Tensor, fmt: str, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The packed cache's code words of the new keys / values ``x[B, S, Hkv, d]`` (``scale``: a
    static format's calibrated one)."""
    return encode_ref(x, fmt, scale)[0]


@kv_codes.register_fake
def _(x, fmt, scale=None):
    return x.new_empty((*x.shape[:-1], kv_layout(fmt, x.shape[-1])["words"]), dtype=torch.int32)


@torch.library.custom_op("finegrain::kv_scales", mutates_args=())
def kv_scales(x: torch.Tensor, fmt: str, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    return encode_ref(x, fmt, scale)[1]


@kv_scales.register_fake
def _(x, fmt, scale=None):
    lay = kv_layout(fmt, x.shape[-1])
    return x.new_empty((*x.shape[:-1], x.shape[-1] // lay["group"]),
                       dtype=torch.float16 if lay["scale"] == "float16" else torch.float32)


@torch.library.custom_op("finegrain::kv_zeros", mutates_args=())
def kv_zeros(x: torch.Tensor, fmt: str, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    return encode_ref(x, fmt, scale)[2]


@kv_zeros.register_fake
def _(x, fmt, scale=None):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // kv_layout(fmt, x.shape[-1])["group"]), dtype=torch.uint8)


@torch.library.custom_op("finegrain::kv_decode", mutates_args=())
def kv_decode(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], fmt: str,
              d: int) -> torch.Tensor:
    """The cached keys / values ``[B, P, Hkv, d]`` (fp32) the packed inputs hold."""
    return decode_ref(codes, scales, zeros, fmt, d)


@kv_decode.register_fake
def _(codes, scales, zeros, fmt, d):
    return codes.new_empty((*codes.shape[:-1], d), dtype=torch.float32)


KV_CODES, KV_SCALES = torch.ops.finegrain.kv_codes.default, torch.ops.finegrain.kv_scales.default
KV_ZEROS, KV_DECODE = torch.ops.finegrain.kv_zeros.default, torch.ops.finegrain.kv_decode.default


def _written(present):
    """``(past, quantize node, dequantize node, format)`` when ``present`` is
    ``cat(past, dequantize(quantize(x)))`` with a dynamic quantize or a static one per tensor
    (its calibrated scale the quantize node's third argument), else None."""
    import operator

    from finegrain.formats.ops import DEQUANTIZE, QUANTIZE

    if present.target is not torch.ops.aten.cat.default or len(present.args[0]) != 2:
        return None
    past, deq = present.args[0]
    past = cache_past(past)
    if getattr(deq, "target", None) is not DEQUANTIZE:
        return None
    gets = deq.args[:3]
    if not all(getattr(g, "target", None) is operator.getitem for g in gets) or len({g.args[0] for g in gets}) != 1:
        return None
    q = gets[0].args[0]
    if q.target is not QUANTIZE or q.kwargs.get("scale") is not None:
        return None
    if len(q.args) > 2 and (len(q.args) != 4 or _token_format(q.args[1]).dynamic):  # static: scale, zero
        return None
    if any(set(g.users) != {deq} for g in q.users) or len(deq.users) != 1:
        return None
    return past, q, deq, q.args[1]


def kv_fake_quant(graph) -> None:
    """Each KV write ``dequantize(quantize(x, fmt))`` in groups along the head dim becomes the
    same quantization per token over ``x`` viewed as ``[..., d / G, G]`` (one ``fake_quant``, which
    the lowering computes per token)."""
    from finegrain.compiler.ir import KV
    from finegrain.backends.tvm.lower_activations import FAKE_QUANT
    from finegrain.formats import QuantFormat

    for n in list(graph.nodes):
        w = KV in n.meta and _written(n)
        if not w:
            continue
        _, q, deq, fmt = w
        f = QuantFormat.parse(fmt)
        if f.granularity != "group":
            continue
        x = q.args[0]
        shape = list(n.meta["val"].shape) if n.meta.get("val") is not None else None
        d = shape[-1] if shape else None
        if not isinstance(d, int) or d % f.group_size:
            continue
        with graph.inserting_before(deq):
            xr = graph.call_function(torch.ops.aten.unflatten.int, (x, -1, [d // f.group_size, f.group_size]))
            fq = graph.call_function(FAKE_QUANT, (xr, _token_format(fmt).tag, None, None))
            y = graph.call_function(torch.ops.aten.flatten.using_ints, (fq, -2, -1))
        deq.replace_all_uses_with(y)
        graph.erase_node(deq)
        for g in list(q.users):
            graph.erase_node(g)
        graph.erase_node(q)


def pack_cache(graph, pack: bool = True) -> list[dict]:
    """Rewrite ``graph`` (a KV-cache graph before :func:`to_static_cache`) so that every layer
    whose keys and values are both written in a packable format (:func:`kv_layout`) keeps its cache
    packed: each such ``past_*`` input becomes ``codes`` / ``scales`` / (``zeros``) inputs, token-major,
    read through ``kv_decode``, and its present output the new tokens' ``kv_codes`` / ``kv_scales`` /
    (``kv_zeros``), token-major. Returns the cache buffers in input (= output) order after
    ``input_ids, position_ids``: ``{"name", "dtype", "width", "packed": layout or absent}``; the
    other presents are left to :func:`to_static_cache` (fp32, ``width`` = head dim). ``pack=False``
    (``kv_storage="float"``): every present is left fp32."""
    from finegrain.compiler.ir import KV

    out = next(n for n in graph.nodes if n.op == "output")
    results = list(out.args[0])
    presents = {r.meta[KV]["layer"]: [] for r in results if isinstance(r, torch.fx.Node) and KV in r.meta}
    for r in results:
        if isinstance(r, torch.fx.Node) and KV in r.meta:
            presents[r.meta[KV]["layer"]].append(r)
    packed = {}
    for layer, ps in presents.items():
        lays = []
        for p in ps:
            w = _written(p)
            d = p.meta["val"].shape[-1] if p.meta.get("val") is not None else None
            ok = w and w[0].op == "placeholder" and isinstance(d, int)
            lay = kv_layout(w[3], int(d)) if ok else None
            lays.append(lay if isinstance(lay, dict) else None)
        if pack and len(ps) == 2 and all(lays):
            for p, lay in zip(ps, lays):
                packed[p] = lay
    buffers = []
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for i, r in enumerate(list(results)):
        if not isinstance(r, torch.fx.Node) or KV not in r.meta:
            continue
        meta = r.meta["val"]
        d = int(meta.shape[-1])
        if r not in packed:
            buffers.append({"name": f"{r.meta[KV]['kind']}_{r.meta[KV]['layer']}",
                            "dtype": str(meta.dtype).removeprefix("torch."), "width": d})
            continue
        past, q, _deq, fmt = _written(r)
        lay = packed[r]
        static = lay.get("static")  # one calibrated scale for the layer's keys / values: a constant, not a buffer
        parts = [("codes", "int32", lay["words"])] + ([] if static else [("scales", lay["scale"], d // lay["group"])])
        if lay["asym"]:
            parts.append(("zeros", "uint8", d // lay["group"]))
        ins = []
        anchor = past
        for suffix, dtype, width in parts:
            with graph.inserting_after(anchor):
                ph = graph.placeholder(f"kvq_{r.meta[KV]['kind']}_{r.meta[KV]['layer']}_{suffix}")
            ph.meta["kv_packed"] = True
            ins.append(ph)
            anchor = ph
            buffers.append({"name": ph.name, "dtype": dtype, "width": width, "packed": {**lay, "format": fmt}})
        if static:
            ins.append(_scale_before(graph, q.args[2], anchor, r))
            anchor = ins[-1] if ins[-1].op == "get_attr" else anchor
        with graph.inserting_after(anchor):
            dec = graph.call_function(KV_DECODE, (ins[0], ins[-1] if static else ins[1],
                                                  ins[2] if lay["asym"] else None, fmt, d))
        with graph.inserting_after(dec):
            t = graph.call_function(torch.ops.aten.transpose.int, (dec, 1, 2))
        past.replace_all_uses_with(t)
        graph.erase_node(past)
        placeholders.pop(past.name, None)
        with graph.inserting_before(out):
            xt = graph.call_function(torch.ops.aten.transpose.int, (q.args[0], 1, 2))
            ops = (KV_CODES,) if static else (KV_CODES, KV_SCALES, KV_ZEROS)[:len(parts)]
            new = [graph.call_function(op, (xt, fmt, *((q.args[2],) if static else ()))) for op in ops]
        results[i] = tuple(new)
    flat = []
    for r in results:
        flat.extend(r if isinstance(r, tuple) else (r,))
    out.args = (tuple(flat),)
    return buffers


def _scale_before(graph, scale, anchor, present):
    """A static format's calibrated scale as a node the cache's decode (inserted after ``anchor``, among
    the inputs) may read: the placeholder itself, or the same attribute fetched again there."""
    from finegrain.backends.tvm.lower_activations import TvmError

    if isinstance(scale, torch.fx.Node) and scale.op == "placeholder":
        return scale
    if isinstance(scale, torch.fx.Node) and scale.op == "get_attr":
        with graph.inserting_after(anchor):
            return graph.get_attr(scale.target)
    raise TvmError(f"node {present.name}: the static KV scale of layer {present.meta[KV_META].get('layer')} is "
                   f"computed ({getattr(scale, 'op', type(scale).__name__)}), not a constant; "
                   "build with cache='concat'")


def packed_word(u, w: int, bits: int, b, t, h, c):
    """TE: word ``c`` of a packed row whose unsigned codes ``u(b, t, h, a)`` are interleaved (element ``a``
    in word ``a % w`` at bit ``(a // w) * bits``)."""
    acc = u(b, t, h, c)
    for i in range(1, 32 // bits):
        acc = acc | (u(b, t, h, i * w + c) << (i * bits))
    return acc


def relax_converters(prefix: str) -> dict:
    """The Relax frontend's converters for ``kv_codes`` / ``kv_scales`` / ``kv_zeros`` (the new
    tokens' scales chosen exactly as the fake quantization the attention reads chooses them) and
    ``kv_decode`` (the cached values, where something other than the decode kernel reads them:
    prefill's gather)."""
    from tvm import relax, te, tirx

    from finegrain.backends.tvm.lower_activations import _act_scale, e4m3_bits

    memo: dict = {}  # (block builder, new tokens' var) -> their scales: one computation for codes, scales, zeros

    def encoded(node, importer):
        bb = importer.block_builder
        args = importer.retrieve_args(node)
        x, fmt = args[:2]
        key = (id(bb), id(x), fmt)
        if key in memo and memo[key][0] is x:
            return memo[key][1]
        shape = list(x.ty.shape)
        d = int(shape[-1])
        lay = {**kv_layout(fmt, d), "format": fmt}
        g = lay["group"]
        tok = _token_format(fmt)
        lo, hi = tok.family.code_range(tok)
        xr = bb.emit(relax.op.reshape(x, [*shape[:-1], d // g, g]))
        if lay.get("static"):  # the calibrated scale over the new tokens' groups (only their codes are stored)
            s = bb.emit(relax.op.broadcast_to(relax.op.reshape(relax.op.astype(args[2], "float32"), [1] * 5),
                                              [*shape[:-1], d // g, 1]))
            z = bb.emit(relax.op.zeros([*shape[:-1], d // g, 1], "float32"))
        else:
            s, z = _act_scale(bb, xr, tok, None, None, prefix)
        memo[key] = (x, (bb, shape, d, lay, lo, hi, xr, s, z))
        return memo[key][1]

    def codes(node, importer):
        bb, shape, d, lay, lo, hi, xr, s, z = encoded(node, importer)
        g, w, bits = lay["group"], lay["words"], lay["bits"]

        def fn(x_, s_, z_):
            def u(b, t, h, a):
                v = x_[b, t, h, a // g, a % g] / s_[b, t, h, a // g, 0]
                if lay["fp8"]:
                    return e4m3_bits(v, _token_format(lay["format"]))
                q = te.max(te.min(tirx.nearbyint(v) + z_[b, t, h, a // g, 0], float(hi)), float(lo))
                return (q - float(lo)).astype("int32")

            return te.compute((*shape[:-1], w), lambda b, t, h, c: packed_word(u, w, bits, b, t, h, c),
                              name="kv_codes")
        return bb.emit_te(fn, xr, s, z, primfunc_name_hint=f"{prefix}kv_codes")

    def scales(node, importer):
        bb, shape, d, lay, *_, s, z = encoded(node, importer)
        return bb.emit(relax.op.astype(relax.op.reshape(s, [*shape[:-1], d // lay["group"]]), lay["scale"]))

    def zeros(node, importer):
        bb, shape, d, lay, *_, s, z = encoded(node, importer)
        return bb.emit(relax.op.astype(relax.op.reshape(z, [*shape[:-1], d // lay["group"]]), "uint8"))

    def decode(node, importer):
        from finegrain.backends.tvm.kernels.attention import _cached

        bb = importer.block_builder
        args = importer.retrieve_args(node)
        c, s, z, fmt, d = args[:5]
        lay = kv_layout(fmt, int(d))
        shape = [c.ty.shape[i] for i in range(3)] + [int(d)]
        if lay.get("static"):  # the layer's calibrated scale (a constant), [1] fp32
            s = bb.emit(relax.op.reshape(relax.op.astype(s, "float32"), [1]))

        def fn(c_, s_, *z_):
            return te.compute(shape, lambda b, t, h, a: _cached(c_, s_, z_[0] if z_ else None, lay, b, t, h, a),
                              name="kv_decode")
        ins = [c, s] + ([z] if lay["asym"] else [])
        return bb.emit_te(fn, *ins, primfunc_name_hint=f"{prefix}kv_decode")

    return {"kv_codes.default": codes, "kv_scales.default": scales, "kv_zeros.default": zeros,
            "kv_decode.default": decode}
