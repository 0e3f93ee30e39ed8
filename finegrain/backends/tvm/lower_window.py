"""KV-cache writes with a float window on TVM (issue #17): KIVI's per-channel keys, the newest
``window`` tokens and ``sinks`` first tokens in float, pre-RoPE keys, RotateKV's per-head
rotation and its grouped-head rotation with reordered channels (``finegrain::kv_append``,
``compiler/ops.py``), computed in the graph as the reference
computes them. A concat build (and a static one, for what ``window_cache.py`` does not pack: FP8 and
symmetric formats, RotateKV's grouped heads whose groups span the rotated row) holds them in an fp32 cache (**emulated**: the cache holds the
format's values, not its codes); a static build packs the rest (``window_cache.py``: codes, per-channel
scales spread over each group's rows, the float tokens in a fixed ring; RotateKV's grouped-head keys
as virtual heads of their rotated space, read back by ``window_cache.grouped_read_func`` and, in
decode, in place by ``window_cache.grouped_decode_attention_func``), as the
reference backend does (``backends/kv_packed.py``).

:func:`rewrite` turns each ``kv_append`` into ``finegrain::kv_window_write(past, new, inv_freq,
fmt, axis, window, sinks, rotated, perm, head_group, score, fmt_low, ratio, block, channel_norm)``: the same write, its arguments the lowering takes. Its converter (:func:`relax_converters`) is one TE function: the tokens that this
write makes quantizable (``kv_quantized_span`` of the past and total lengths, symbolic in the
Relax function) are taken out of ``cat(past, new)``, moved to the space they are quantized in
(Hadamard undone, RoPE undone at their positions, Hadamard again; the Hadamard by the reference's
butterflies, ``formats.hadamard.fwht``; RotateKV's grouped heads: the channels of all heads
gathered in the calibrated order, then the Hadamard over each group of heads' channels, its
non-power-of-two factor a dense sum), fake-quantized with scales
chosen exactly as ``QuantFormat.quantize`` chooses them (min / max per channel over each group of
tokens, or per group along the head dim; the scale rounded to its stored dtype; round half to
even), moved back, and written over those tokens. A decode step quantizes nothing until a group
leaves the window, then that group.

A static build (``lower_cache.py``) splits the write in two (:func:`to_static`):
``kv_window_past`` writes the released tokens that are already cached **in place** into the
deployment's token-major buffer (``call_tir_inplace``: a loop over those rows only, usually none),
and ``kv_window_new`` returns the new tokens, the released ones among them quantized. Attention then
reads ``cat(past buffer, new)`` as over any static cache (decode's kernel reads the buffer in place)
and the runtime writes the new tokens at the cache position as it does for every layer: decode
touches the cache once per step plus the group it releases every ``G`` steps.

ZipCache's writes (``kv_append`` with a ``score``, issue #17) take the same route with five more
arguments: tokens are released in blocks, ranked within the write by the score (a token's rank counts
the tokens scored higher, earlier ones first among equals) and fake-quantized in the high or the low
format (token-wise after the per-channel normalizer, or per channel over each block's two subsets);
the score is ``finegrain::kv_saliency``'s, lowered as one TE function over the probe queries that
``compiler.ops.probe_counts`` picks from the run-time chunk length. A concat build holds them in an
fp32 cache; a static build packs them (``window_cache.zip_layout``), but for ZipCache's
channel-normalized token-wise keys (an fp32 cache, said so); over RotateKV's grouped heads they are
refused by name (``base.windowed_kv_refusal``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Graph

from finegrain.backends.base import kv_append_options, windowed_kv_refusal
from finegrain.backends.tvm.kernels import memoized
from finegrain.compiler.ops import KV_APPEND, kv_append, kv_quantized_until
from finegrain.formats import QuantFormat


@torch.library.custom_op("finegrain::kv_window_write", mutates_args=())
def kv_window_write(past: torch.Tensor, new: torch.Tensor, inv_freq: Optional[torch.Tensor], fmt: str, axis: str,
                    window: int, sinks: int, rotated: bool, perm: Optional[torch.Tensor] = None,
                    head_group: int = 1, score: Optional[torch.Tensor] = None, fmt_low: Optional[str] = None,
                    ratio: float = 1.0, block: int = 1, channel_norm: bool = False) -> torch.Tensor:
    """``kv_append(past, new, fmt, axis, window, sinks, inv_freq, rotated, score, fmt_low, ratio, block,
    channel_norm, perm, head_group)`` (reference implementation)."""
    return kv_append(past, new, fmt, axis, window, sinks, inv_freq, rotated, score, fmt_low, ratio, block,
                     channel_norm, perm=perm, head_group=head_group)


@kv_window_write.register_fake
def _(past, new, inv_freq, fmt, axis, window, sinks, rotated, perm=None, head_group=1, score=None, fmt_low=None,
      ratio=1.0, block=1, channel_norm=False):
    return torch.cat([past, new], 2)


def window_group(fmt: str, axis: str) -> int:
    """The unit ``kv_append`` releases tokens in: the format's group along the tokens for per-channel
    keys, else one token."""
    return (QuantFormat.parse(fmt).group_size or 1) if axis == "tokens" else 1


@torch.library.custom_op("finegrain::kv_window_past", mutates_args=())
def kv_window_past(past: torch.Tensor, new: torch.Tensor, inv_freq: Optional[torch.Tensor], fmt: str, axis: str,
                   window: int, sinks: int, rotated: bool, perm: Optional[torch.Tensor] = None,
                   head_group: int = 1, score: Optional[torch.Tensor] = None,
                   fmt_low: Optional[str] = None, ratio: float = 1.0, block: int = 1,
                   channel_norm: bool = False) -> torch.Tensor:
    """The token-major past ``[B, P, Hkv, d]`` after a ``kv_window_write`` of ``new``: its released
    tokens quantized (reference implementation; the TVM lowering writes them in place)."""
    out = kv_window_write(past.transpose(1, 2), new, inv_freq, fmt, axis, window, sinks, rotated, perm, head_group,
                          score, fmt_low, ratio, block, channel_norm)
    return out[:, :, :past.shape[1]].transpose(1, 2).contiguous()


@kv_window_past.register_fake
def _(past, new, inv_freq, fmt, axis, window, sinks, rotated, perm=None, head_group=1, score=None, fmt_low=None,
      ratio=1.0, block=1, channel_norm=False):
    return torch.empty_like(past)


@torch.library.custom_op("finegrain::kv_window_new", mutates_args=())
def kv_window_new(past: torch.Tensor, new: torch.Tensor, inv_freq: Optional[torch.Tensor], fmt: str, axis: str,
                  window: int, sinks: int, rotated: bool, perm: Optional[torch.Tensor] = None,
                  head_group: int = 1, score: Optional[torch.Tensor] = None,
                  fmt_low: Optional[str] = None, ratio: float = 1.0, block: int = 1,
                  channel_norm: bool = False) -> torch.Tensor:
    """The new tokens ``[B, Hkv, S, d]`` after a ``kv_window_write`` over the token-major ``past``:
    those the write released quantized (reference implementation)."""
    out = kv_window_write(past.transpose(1, 2), new, inv_freq, fmt, axis, window, sinks, rotated, perm, head_group,
                          score, fmt_low, ratio, block, channel_norm)
    return out[:, :, past.shape[1]:].contiguous()


@kv_window_new.register_fake
def _(past, new, inv_freq, fmt, axis, window, sinks, rotated, perm=None, head_group=1, score=None, fmt_low=None,
      ratio=1.0, block=1, channel_norm=False):
    return torch.empty_like(new)


KV_WINDOW_WRITE = torch.ops.finegrain.kv_window_write.default
KV_WINDOW_PAST = torch.ops.finegrain.kv_window_past.default
KV_WINDOW_NEW = torch.ops.finegrain.kv_window_new.default


WRITE_DEFAULTS = (None, 1, None, None, 1.0, 1, False)  # perm, head_group, then ZipCache's five


def window_write_args(args) -> list:
    """A ``kv_window_write``'s fifteen arguments ``(past, new, inv_freq, fmt, axis, window, sinks, rotated,
    perm, head_group, score, fmt_low, ratio, block, channel_norm)``: those the exported node dropped
    at their defaults."""
    args = list(args)
    return args + list(WRITE_DEFAULTS[len(args) - 8:])


def is_zip(args) -> bool:
    """The ``kv_window_write`` (or ``kv_window_past`` / ``_new``) of these arguments is ZipCache's
    saliency-ranked mixed-precision write."""
    return window_write_args(args)[10] is not None


def release_unit(fmt: str, axis: str, zipped: Optional[tuple] = None) -> tuple[str, int]:
    """``(axis, unit)`` by which a write releases tokens (``kv_quantized_until``'s): :func:`window_group`
    on the format's axis, or ZipCache's blocks (``zipped``: its ``(fmt_low, ratio, block, channel_norm)``)."""
    return ("tokens", int(zipped[2])) if zipped is not None else (axis, window_group(fmt, axis))


def rewrite(graph: Graph) -> None:
    """Each ``kv_append`` of ``graph`` becomes a ``kv_window_write``; one with no lowering raises
    ``TvmError`` naming it."""
    from finegrain.backends.tvm.lower_activations import TvmError

    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not KV_APPEND:
            continue
        why = windowed_kv_refusal(n, "TVM", zip_ok=True)
        if why:
            raise TvmError(f"node {n.name} (KV cache write): {why}")
        past, new, fmt, axis, window, sinks = n.args[:6]
        kw = kv_append_options(n)
        inv_freq, rotated = kw.get("inv_freq"), bool(kw.get("rotated", False))
        perm, head_group = kw.get("perm"), int(kw.get("head_group", 1))
        zipped = tuple(kw.get(k, v) for k, v in zip(("score", "fmt_low", "ratio", "block", "channel_norm"),
                                                    WRITE_DEFAULTS[2:]))
        d = int(n.meta["val"].shape[-1])
        for tag in (fmt, zipped[1]) if zipped[0] is not None else (fmt,):
            if axis != "tokens" and d % (QuantFormat.parse(tag).group_size or d):
                raise TvmError(f"node {n.name} (KV cache write): groups of {tag} do not divide the head dim {d}")
        if rotated and d & (d - 1):
            raise TvmError(f"node {n.name} (KV cache write): rotated keys of head dim {d} (a power of two is rotated)")
        with graph.inserting_before(n):
            m = graph.call_function(KV_WINDOW_WRITE, (past, new, inv_freq, fmt, axis, window, sinks, rotated, perm,
                                                      head_group, *zipped))
        m.meta.update(n.meta)
        n.replace_all_uses_with(m)
        graph.erase_node(n)


# The TE functions' stages stay materialized, each computed once: the generic schedule's inlining put
# the RoPE angles' trigonometry and the scale choice inside the Hadamard matmul's reduction (measured
# 3.5 ms for one released group of 32 SmolLM2 keys, against 0.84 ms materialized).
SPAN_ATTRS = {"tirx.is_scheduled": True}


def relax_converters(prefix: str, shared: dict | None = None) -> dict:
    """The Relax frontend's converters for ``kv_window_write`` (concat builds) and
    ``kv_window_past`` / ``kv_window_new`` (static builds: the past token-major), and for the packed
    window's ``kv_wpack_*`` ops. ``shared`` receives, per packed read whose decode attention reads the
    buffers (``window_cache.mark_fused_decode``), the buffers after the commit's in-place writes,
    the RoPE table and the layout, under the read node's name (for ``lower_attention``); it may give
    ``constants`` (placeholder name -> the model tensor it stands for) and ``max_seq_len``, which make
    the RoPE table a constant."""
    from tvm import relax, te, tirx

    shared = {} if shared is None else shared
    memo: dict = {}  # (block builder, past, new) -> the released tokens: one computation for both halves
    funcs: dict = {}

    def released(past_, new_, extra, fmt, axis, window, sinks, rotated, head_group, zipped, token_major: bool,
                 rows=None, ring=None):
        """TE: ``(a, n, y, xin)``: the first released token, how many, their written values
        ``[B, Hkv, n, d]`` and the reader of ``cat(past, new)``. ``extra``: the TE tensors of
        :func:`parts`' ``extra`` (``inv_freq``; RotateKV's grouped heads: ``perm`` or None and the
        Hadamard factors; ZipCache's score last). ``zipped``: ZipCache's ``(fmt_low, ratio, block,
        channel_norm)`` or None. ``rows`` (a ``window_cache.window_layout``): their packed rows instead.
        ``ring``: ``(ring tensor, past length)`` of a packed window whose decode step reads the
        released tokens from its float ring (they are all there: ``past_`` is then not read)."""
        if zipped is not None:
            score, extra = extra[-1], extra[:-1]
        freq = extra[0] if extra else None
        grouped = len(extra) > 1
        f = QuantFormat.parse(fmt)
        b_, d = new_.shape[0], int(new_.shape[3])
        heads, p_len = (past_.shape[2], past_.shape[1]) if token_major else (past_.shape[1], past_.shape[2])
        if ring is not None:
            ring_, p_len = ring
        span_axis, g = release_unit(fmt, axis, zipped)
        a = kv_quantized_until(p_len, span_axis, g, int(window), int(sinks), tirx.max)
        n = kv_quantized_until(p_len + new_.shape[2], span_axis, g, int(window), int(sinks), tirx.max) - a

        def past_at(b, h, tp, c):
            if ring is not None:
                from finegrain.backends.tvm.window_cache import ring_row

                slot = ring_row(tp, {"sinks": int(sinks), "window": int(window), "unit": g}, tirx.if_then_else)
                return ring_[b, slot, h, c]
            return past_[b, tp, h, c] if token_major else past_[b, h, tp, c]

        def xin(b, h, t, c):
            tp = tirx.min(t, tirx.max(p_len - 1, 0))
            return tirx.if_then_else(t < p_len, past_at(b, h, tp, c), new_[b, h, tirx.max(t - p_len, 0), c])

        tables = _rope_tables(freq, a, n) if freq is not None else None

        def rope_space(x, inverse: bool):  # pre-RoPE keys: Hadamard (self-inverse), RoPE^-1 or RoPE, Hadamard
            if freq is None:
                return x
            x = _fwht(x) if rotated else x
            x = _rope(x, tables, inverse)
            return _fwht(x) if rotated else x

        seg = te.compute((b_, heads, n, d), lambda b, h, i, c: xin(b, h, a + i, c), name="kv_span")
        if grouped:  # RotateKV: the arriving rotation undone, RoPE undone, then the grouped-head space
            perm, fwd, inv = extra[1:] if len(extra) == 4 else (None, *extra[1:])
            x = _rope(_fwht(seg) if rotated else seg, tables, True)
            z = _to_head_groups(x, perm, head_group, fwd)
            if rows is not None:  # packed: the rotated rows as virtual heads (window_cache.to_virtual_heads)
                return _span_rows(_virtual_heads(z, head_group), rows, n)
            x = _from_head_groups(_fake_quant(z, f, axis, n), perm, heads, inv)
            x = _rope(x, tables, False)
            return a, n, (_fwht(x) if rotated else x), xin
        if rows is not None:  # the packed cache's rows of the released tokens (ZipCache: ranked by the score)
            sal = (_zip_salient(lambda b, h, i: score[b, h, a + i], b_, heads, n, float(zipped[1]))
                   if zipped is not None else None)
            return _span_rows(rope_space(seg, True), rows, n, sal)
        if zipped is not None:
            low, ratio, block, channel_norm = zipped
            x = _zip_fake_quant(rope_space(seg, True), lambda b, h, i: score[b, h, a + i], f, QuantFormat.parse(low),
                                float(ratio), int(block), bool(channel_norm), axis == "tokens", n)
            return a, n, rope_space(x, False), xin
        return a, n, rope_space(_fake_quant(rope_space(seg, True), f, axis, n), False), xin

    def parts(importer, node):
        """``((past, new), extra, (fmt, axis, window, sinks, rotated, head_group, zipped))``: ``extra`` the
        Relax tensors the write reads besides past and new: ``inv_freq`` (pre-RoPE keys), then for
        RotateKV's grouped heads the channel order (if reordered) and the Hadamard's small factor
        ``F`` of ``formats.hadamard.hadamard_parts`` and its transpose (constants), then ZipCache's
        score; ``zipped`` ZipCache's ``(fmt_low, ratio, block, channel_norm)`` or None."""
        import numpy as np

        from finegrain.compiler.ops import _group_factor

        args = window_write_args(importer.retrieve_args(node))
        extra = [args[2]] if args[2] is not None else []
        head_group = int(args[9])
        if args[2] is not None and (args[8] is not None or head_group > 1):  # as kv_append: pre-RoPE keys only
            d = int(args[1].ty.shape[-1])
            extra += [args[8]] if args[8] is not None else []
            extra += [relax.const(np.ascontiguousarray(_group_factor(head_group * d, inv).numpy()), "float32")
                      for inv in (False, True)]
        zipped = None
        if args[10] is not None:
            extra.append(args[10])
            zipped = (args[11], float(args[12]), int(args[13]), bool(args[14]))
        return args[:2], extra, (*args[3:8], head_group, zipped)

    def write(node, importer):
        (past, new), extra, spec = parts(importer, node)

        def fn(past_, new_, *extra_):
            a, n, y, xin = released(past_, new_, extra_, *spec, token_major=False)
            b_, heads, p_len, d = past_.shape
            return te.compute((b_, heads, p_len + new_.shape[2], d), lambda b, h, t, c: tirx.if_then_else(
                tirx.all(t >= a, t < a + n), y[b, h, tirx.max(tirx.min(t - a, n - 1), 0), c], xin(b, h, t, c)),
                name="kv_window_write")

        return importer.block_builder.emit_te(fn, past, new, *extra, primfunc_name_hint=f"{prefix}kv_window_write",
                                              primfunc_attrs=SPAN_ATTRS)

    def span(node, importer):
        """The released tokens' values (opaque: computed before the past is written in place)."""
        bb = importer.block_builder
        (past, new), extra, spec = parts(importer, node)
        return past, new, span_values(bb, node, past, new, extra, spec, fused_ring(importer, node)), spec

    def fused_ring(importer, node):
        """``(ring, codes)`` of the packed window whose decoded past ``node`` reads (its first argument,
        a ``kv_wpack_read``) when decode's attention reads the packed buffers instead
        (``window_cache.mark_fused_decode``): the released tokens are then read from the ring."""
        from finegrain.backends.tvm.window_cache import FUSED

        r = node.args[0]
        if isinstance(r, torch.fx.Node) and r.meta.get(FUSED):
            return importer.env[r.args[3]], importer.env[r.args[0]]
        return None

    def source(past, new, ring, make):
        """The inputs and TE function of a span computation: over ``past`` / ``new``, or over a fused
        decode step's ring (``ring`` = :func:`fused_ring`)."""
        if ring is None:
            return [past, new], lambda past_, new_, *extra_: make(past_, new_, extra_, {})
        return [*ring, new], lambda ring_, codes_, new_, *extra_: make(ring_, new_, extra_,
                                                                      {"ring": (ring_, codes_.shape[1])})

    def span_values(bb, node, past, new, extra, spec, ring=None):
        key = (id(bb), str(node.args[0]), str(node.args[1]))
        if key not in memo:
            ins, fn = source(past, new, ring, lambda past_, new_, extra_, kw: released(
                past_, new_, extra_, *spec, token_major=True, **kw)[2])
            memo[key] = bb.emit_te(fn, *ins, *extra, primfunc_name_hint=f"{prefix}kv_window_span",
                                   primfunc_attrs={"op_pattern": 8, **SPAN_ATTRS})
        return memo[key]

    def write_past(node, importer):
        bb = importer.block_builder
        past, _new, y, (fmt, axis, window, sinks, _, _, zipped) = span(node, importer)
        b_, _, heads, d = (int(x) if isinstance(x, tirx.IntImm) else x for x in past.ty.shape)
        axis, unit = release_unit(fmt, axis, zipped)
        key = f"{prefix}kv_window_rows_b{b_}_h{heads}_d{d}_w{window}_s{sinks}_g{unit}_{axis}"
        if key not in funcs:
            func = _rows_in_place(b_, heads, d, int(window), int(sinks), unit, axis)
            funcs[key] = bb.add_func(func.with_attrs({"op_pattern": 8, "global_symbol": key}), key)
        return bb.emit(relax.call_tir_inplace(funcs[key], [past, y], 0, relax.TensorType(past.ty.shape, "float32")))

    def write_new(node, importer):
        bb = importer.block_builder
        ring = fused_ring(importer, node)
        if ring is not None and int(window_write_args(node.args)[5]) >= 1:
            # one new token behind a float window is never released by its own write: it stays as it came
            return importer.env[node.args[1]]
        past, new, y, (fmt, axis, window, sinks, _, _, zipped) = span(node, importer)
        past = ring[1] if ring is not None else past  # only its length is read
        axis, g = release_unit(fmt, axis, zipped)

        def fn(past_, new_, y_):
            p_len = past_.shape[1]
            a = kv_quantized_until(p_len, axis, g, int(window), int(sinks), tirx.max)
            n = y_.shape[2]
            return te.compute(new_.shape, lambda b, h, i, c: tirx.if_then_else(
                tirx.all(p_len + i >= a, p_len + i < a + n), y_[b, h, tirx.max(tirx.min(p_len + i - a, n - 1), 0), c],
                new_[b, h, i, c]), name="kv_window_new")

        return bb.emit_te(fn, past, new, y, primfunc_name_hint=f"{prefix}kv_window_new")

    # ---- the packed windowed cache (window_cache.py) ----

    def packed_args(importer, node, first: int, d_arg: int, zip_at: int, score: bool = True):
        """``(extra, spec, lay, args)`` of a ``kv_wpack_*`` node whose options start at argument
        ``first``; argument ``d_arg`` ends in the head dim; ZipCache's arguments (``score`` if the op
        takes it, then ``fmt_low``, ``ratio``, ``block``), then RotateKV's ``perm``, ``head_group``,
        from ``zip_at`` (``extra`` as :func:`parts`': ends in the score, or in the grouped heads' order
        and Hadamard factors)."""
        import numpy as np

        from finegrain.backends.tvm.window_cache import grouped, window_layout
        from finegrain.compiler.ops import _group_factor

        args = list(importer.retrieve_args(node))
        inv_freq, fmt, axis, window, sinks, rotated = args[first:first + 6]
        tail = list(args[zip_at:]) if len(args) > zip_at else []
        sc = tail.pop(0) if score and tail else None
        zipped = (tail[0], float(tail[1]), int(tail[2]), False) if tail and tail[0] is not None else None
        perm, head_group = (tail[3], int(tail[4])) if len(tail) > 4 else (None, 1)
        g = grouped(perm, head_group) if inv_freq is not None else None
        d = int(args[d_arg].ty.shape[-1])
        lay = window_layout(fmt, axis, d, window, sinks, zipped, g)
        extra = ([inv_freq] if inv_freq is not None else []) + ([sc] if zipped is not None and sc is not None else [])
        if g is not None:  # as parts(): the channel order (if reordered), the Hadamard's small factor and its transpose
            extra += ([perm] if perm is not None else []) + [
                relax.const(np.ascontiguousarray(_group_factor(g * d, inv).numpy()), "float32") for inv in (False, True)]
        return extra, (fmt, axis, window, sinks, rotated, head_group, zipped), lay, args

    def span_rows(bb, node, read, new, extra, spec, lay, ring=None):
        key = (id(bb), str(node.args[0]), str(node.args[1]), "rows")
        if key not in memo:
            ins, fn = source(read, new, ring, lambda past_, new_, extra_, kw: list(released(
                past_, new_, extra_, *spec, token_major=True, rows=lay, **kw)))
            memo[key] = bb.emit_te(fn, *ins, *extra, primfunc_name_hint=f"{prefix}kv_wpack_span",
                                   primfunc_attrs={"op_pattern": 8, **SPAN_ATTRS})
        return memo[key]

    def packed_read(node, importer):
        import numpy as np

        from finegrain.backends.tvm.window_cache import FUSED, read_func

        bb = importer.block_builder
        extra, spec, lay, args = packed_args(importer, node, 4, 3, 10, score=False)
        codes, scales, zeros, ring = args[:4]
        b_, _, heads, _ = (int(x) if isinstance(x, tirx.IntImm) else x for x in codes.ty.shape)
        half = int(extra[0].ty.shape[0]) if extra else 0
        key = (f"{prefix}kv_wpack_read_b{b_}_h{heads}_d{lay['d']}_w{lay['window']}_s{lay['sinks']}_g{lay['unit']}_"
               f"{lay['axis']}_{lay['bits']}_{lay['scale']}_r{half}_{int(bool(spec[4]))}_c{lay['cols']}_{lay['zcols']}_"
               f"{int(lay['spread'])}")
        g = lay.get("head_group")
        table = (rope_table(bb, extra[0], codes.ty.shape[1], node.args[4]) if extra
                 else relax.const(np.zeros((1, 2), "float32")))
        out = relax.TensorType([codes.ty.shape[i] for i in range(3)] + [lay["d"]], "float32")
        if g is not None:  # RotateKV's grouped heads: each token's rotated rows decoded and taken back in one task
            from finegrain.backends.tvm.window_cache import grouped_read_func

            perm = extra[1] if len(extra) == 4 else relax.const(np.arange(heads * lay["d"], dtype="int64"), "int64")
            inv = extra[-1]  # the grouped Hadamard's small factor, transposed
            m = int(inv.ty.shape[0])
            key += f"_grouped{g}_m{m}"
            if key not in funcs:
                func = grouped_read_func(b_, heads, lay, half, bool(spec[4]), m)
                funcs[key] = bb.add_func(func.with_attrs({"global_symbol": key}), key)
            return bb.emit(relax.call_tir(funcs[key], [codes, scales, zeros, ring, table, perm, inv], out))
        lazy = bool(node.meta.get(FUSED))  # read only by ZipCache's saliency: computed in a releasing step only
        key += "_lazy" if lazy else ""
        if key not in funcs:
            func = read_func(b_, heads, lay, half, bool(spec[4]), lazy)
            funcs[key] = bb.add_func(func.with_attrs({"global_symbol": key}), key)
        return bb.emit(relax.call_tir(funcs[key], [codes, scales, zeros, ring, table], out))

    def rope_table(bb, freq, p_len, freq_node):
        """cos then sin of every cached position's RoPE angles ``[P, 2 * half]`` (float64 angles rounded
        to float32, as ``compiler.ops._rope``), computed once per call for all layers reading ``freq``;
        a constant of ``shared["max_seq_len"]`` rows where ``freq`` is a model tensor whose value
        ``shared["constants"]`` holds (measured 1.4 ms per call at past 2048 when computed)."""
        import numpy as np

        value = shared.get("constants", {}).get(getattr(freq_node, "name", None))
        if value is not None and shared.get("max_seq_len"):
            key = (id(bb), "rope", freq_node.name)
            if key not in memo:
                ang = np.arange(shared["max_seq_len"], dtype=np.float64)[:, None] * value.detach().double().numpy()[None]
                memo[key] = bb.emit(relax.const(np.concatenate([np.cos(ang), np.sin(ang)], 1).astype("float32")))
            return memo[key]
        key = (id(bb), "rope", str(freq), str(p_len))
        if key not in memo:
            def fn(f_):
                cos, sin = _rope_tables(f_, 0, p_len)
                half = int(f_.shape[0])
                return te.compute((p_len, 2 * half), lambda i, j: tirx.if_then_else(
                    j < half, cos[i, tirx.min(j, half - 1)], sin[i, tirx.max(j - half, 0)]), name="kv_rope_table")
            memo[key] = bb.emit_te(fn, freq, primfunc_name_hint=f"{prefix}kv_rope_table")
        return memo[key]

    def packed_rows(node, importer):
        bb = importer.block_builder
        extra, spec, lay, args = packed_args(importer, node, 2, 1, 9)
        read, new, part = args[0], args[1], int(args[8])
        ring = fused_ring(importer, node)
        if ring is not None and lay["window"] >= 1:  # the step's one token is not released: its rows are zeros
            import numpy as np

            b_, heads, sn = (int(new.ty.shape[i]) for i in range(3))
            width = (lay["words"], lay["cols"], lay["zcols"])[part]
            return relax.const(np.zeros((b_, sn, heads, width), ("int32", lay["scale"], "uint8")[part]))
        rows = span_rows(bb, node, read, new, extra, spec, lay, ring)
        read = ring[1] if ring is not None else read  # only its length is read
        dtype = ("int32", lay["scale"], "uint8")[part]

        def fn(read_, new_, rows_):
            p_len, sn = read_.shape[1], new_.shape[2]
            a = kv_quantized_until(p_len, lay["axis"], lay["unit"], lay["window"], lay["sinks"], tirx.max)
            n = rows_.shape[1]

            def body(b, i, h, k):
                t = p_len + i
                return tirx.if_then_else(tirx.all(t >= a, t < a + n), rows_[b, tirx.max(tirx.min(t - a, n - 1), 0), h, k],
                                         tirx.const(0, dtype))
            return te.compute((new_.shape[0], sn, new_.shape[1], rows_.shape[3]), body, name="kv_wpack_rows")

        return bb.emit_te(fn, read, new, bb.emit(relax.TupleGetItem(rows, part)),
                          primfunc_name_hint=f"{prefix}kv_wpack_rows")

    def packed_commit(node, importer):
        bb = importer.block_builder
        extra, spec, lay, args = packed_args(importer, node, 6, 1, 12)
        read, new, codes, scales, zeros, ring = args[:6]
        fused = fused_ring(importer, node)
        rows = span_rows(bb, node, read, new, extra, spec, lay, fused)
        b_, _, heads, d = (int(x) if isinstance(x, tirx.IntImm) else x for x in read.ty.shape)
        key = (f"{prefix}kv_wpack_commit_b{b_}_h{heads}_d{d}_w{lay['window']}_s{lay['sinks']}_g{lay['unit']}_"
               f"{lay['axis']}_{lay['bits']}_{lay['scale']}_c{lay['cols']}_{lay['zcols']}{'_ring' if fused else ''}")
        if key not in funcs:
            func = _commit_in_place(b_, heads, d, lay, with_read=fused is None)
            funcs[key] = bb.add_func(func.with_attrs({"op_pattern": 8, "global_symbol": key}), key)
        span = [bb.emit(relax.TupleGetItem(rows, j)) for j in range(3)]
        if fused is not None:  # decode's attention reads the buffers: nothing writes (or needs) the decoded past
            import numpy as np

            ins = [codes, scales, zeros, ring, *span, new]
            sinfo = [relax.TensorType(x.ty.shape, x.ty.dtype) for x in ins[:4]]
            out = bb.emit(relax.call_tir_inplace(funcs[key], ins, [0, 1, 2, 3], sinfo))
            freq = extra[0] if node.args[6] is not None else None  # (ZipCache's values: extra is the score alone)
            table = (rope_table(bb, freq, codes.ty.shape[1], node.args[6]) if freq is not None
                     else relax.const(np.zeros((1, 2), "float32")))
            shared[node.args[0].name] = {"buffers": [bb.emit(relax.TupleGetItem(out, j)) for j in range(4)],
                                         "span": span[1:], "table": table, "layout": lay, "rotated": bool(spec[4]),
                                         "rope_half": int(freq.ty.shape[0]) if freq is not None else 0}
            if lay.get("head_group") is not None:  # RotateKV's grouped heads: the channel order, the factor F^T
                perm = (extra[1] if len(extra) == 4 else
                        relax.const(np.arange(int(heads) * int(d), dtype="int64"), "int64"))
                shared[node.args[0].name]["grouped"] = [perm, extra[-1]]
            return read  # what the (dead) concatenation for the unfused kernels reads
        y = span_values(bb, node, read, new, extra, spec)
        ins = [codes, scales, zeros, ring, read, *span, y, new]
        sinfo = [relax.TensorType(x.ty.shape, x.ty.dtype) for x in ins[:5]]
        out = bb.emit(relax.call_tir_inplace(funcs[key], ins, [0, 1, 2, 3, 4], sinfo))
        return bb.emit(relax.TupleGetItem(out, 4))

    def saliency(node, importer):
        q, past, new, probes, scale = importer.retrieve_args(node)
        release = None  # (window, sinks, block) of the ZipCache writes reading the score: computed only when they release
        for u in getattr(node, "users", ()):
            if getattr(u, "target", None) in (KV_WINDOW_WRITE, KV_WINDOW_PAST, KV_WINDOW_NEW):
                args = window_write_args(u.args)
                release = (int(args[5]), int(args[6]), int(args[13]))
        from finegrain.backends.tvm.lower_cache import _placeholder_through_transpose

        from finegrain.backends.tvm.window_cache import KV_WPACK_READ

        src = (_placeholder_through_transpose(node.args[1], (KV_WPACK_READ,)) if isinstance(node, torch.fx.Node)
               else None)
        # a static build's token-major buffer, or a packed window's decoded past: read in place
        token_major = isinstance(src, torch.fx.Node) and (src.op == "placeholder" or src.target is KV_WPACK_READ) \
            and src in importer.env
        if token_major:
            past = importer.env[src]
        return importer.block_builder.emit_te(lambda q_, past_, new_: _saliency(q_, past_, new_, float(probes),
                                                                                 float(scale), release, token_major),
                                              q, past, new, primfunc_name_hint=f"{prefix}kv_saliency")

    return {"kv_saliency.default": saliency, "kv_window_write.default": write, "kv_window_past.default": write_past,
            "kv_window_new.default": write_new, "kv_wpack_read.default": packed_read,
            "kv_wpack_rows.default": packed_rows, "kv_wpack_commit.default": packed_commit}


@memoized
def _commit_in_place(batch: int, heads: int, d: int, lay: dict, with_read: bool = True):
    """The PrimFunc ``f(codes, scales, zeros, ring, read, span codes, span scales, span zeros, y, new)``
    of ``kv_wpack_commit``, in place on its first five: the released tokens already cached (rows
    ``a .. min(a + n, P)``) get their code rows in ``codes`` / ``scales`` / ``zeros`` and their
    quantized values ``y`` in ``read`` (what attention reads); the new tokens that are sinks or still
    in float go to their ``ring`` rows. Without ``with_read`` (a decode step whose attention reads the
    packed buffers), ``f(codes, scales, zeros, ring, span codes, span scales, span zeros, new)``, in
    place on its first four."""
    from tvm.script import tirx as T

    from finegrain.backends.tvm.window_cache import ring_row

    window, sinks, unit, ring_rows = lay["window"], lay["sinks"], lay["unit"], lay["ring"]
    w, cols, zcols, sdt = lay["words"], lay["cols"], lay["zcols"], lay["scale"]

    def quantized_until(t):
        return kv_quantized_until(t, lay["axis"], unit, window, sinks, T.max)

    @T.macro
    def commit(c, s, z, ring, wc, ws, wz, nw, p, n, sn):
        a = quantized_until(p)
        qu = quantized_until(p + sn)
        for bi, i, h in T.grid(batch, n, heads):
            if a + i < p:
                for k in range(w):
                    c[bi, a + i, h, k] = wc[bi, i, h, k]
                for k in range(cols):
                    s[bi, a + i, h, k] = ws[bi, i, h, k]
                for k in range(zcols):
                    z[bi, a + i, h, k] = wz[bi, i, h, k]
        for bi, i, h, k in T.grid(batch, sn, heads, d):
            if T.Or(p + i < sinks, p + i >= qu):  # a sink, or a token still in float
                ring[bi, ring_row(p + i, lay, T.if_then_else), h, k] = nw[bi, h, i, k]

    if with_read:  # parse only the function asked for (TVMScript: ~0.4 s each)
        @T.prim_func(s_tir=True)
        def func(c_h: T.handle, s_h: T.handle, z_h: T.handle, r_h: T.handle, x_h: T.handle, wc_h: T.handle,
                 ws_h: T.handle, wz_h: T.handle, y_h: T.handle, nw_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            p = T.int64()
            n = T.int64()
            sn = T.int64()
            c = T.match_buffer(c_h, (batch, p, heads, w), "int32")
            s = T.match_buffer(s_h, (batch, p, heads, cols), sdt)
            z = T.match_buffer(z_h, (batch, p, heads, zcols), "uint8")
            ring = T.match_buffer(r_h, (batch, ring_rows, heads, d), "float32")
            x = T.match_buffer(x_h, (batch, p, heads, d), "float32")
            wc = T.match_buffer(wc_h, (batch, n, heads, w), "int32")
            ws = T.match_buffer(ws_h, (batch, n, heads, cols), sdt)
            wz = T.match_buffer(wz_h, (batch, n, heads, zcols), "uint8")
            y = T.match_buffer(y_h, (batch, heads, n, d), "float32")
            nw = T.match_buffer(nw_h, (batch, heads, sn, d), "float32")
            commit(c, s, z, ring, wc, ws, wz, nw, p, n, sn)
            a = quantized_until(p)
            for bi, i, h in T.grid(batch, n, heads):
                if a + i < p:
                    for k in range(d):
                        x[bi, a + i, h, k] = y[bi, h, i, k]

        return func

    @T.prim_func(s_tir=True)
    def ring_func(c_h: T.handle, s_h: T.handle, z_h: T.handle, r_h: T.handle, wc_h: T.handle, ws_h: T.handle,
                  wz_h: T.handle, nw_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        p = T.int64()
        n = T.int64()
        sn = T.int64()
        c = T.match_buffer(c_h, (batch, p, heads, w), "int32")
        s = T.match_buffer(s_h, (batch, p, heads, cols), sdt)
        z = T.match_buffer(z_h, (batch, p, heads, zcols), "uint8")
        ring = T.match_buffer(r_h, (batch, ring_rows, heads, d), "float32")
        wc = T.match_buffer(wc_h, (batch, n, heads, w), "int32")
        ws = T.match_buffer(ws_h, (batch, n, heads, cols), sdt)
        wz = T.match_buffer(wz_h, (batch, n, heads, zcols), "uint8")
        nw = T.match_buffer(nw_h, (batch, heads, sn, d), "float32")
        commit(c, s, z, ring, wc, ws, wz, nw, p, n, sn)

    return ring_func


@memoized
def _rows_in_place(batch: int, heads: int, d: int, window: int, sinks: int, unit: int, axis: str):
    """The PrimFunc ``f(past[B, P, Hkv, d], y[B, Hkv, n, d])`` writing the released tokens ``y`` that
    are already cached into the token-major ``past`` buffer, in place (rows ``a .. min(a + n, P)``,
    ``a`` from ``P`` by ``kv_quantized_span``'s rule): a loop over those rows only."""
    from tvm.script import tirx as T

    tokens = axis == "tokens"

    @T.prim_func(s_tir=True)
    def func(x_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        p = T.int64()
        n = T.int64()
        x = T.match_buffer(x_h, (batch, p, heads, d), "float32")
        y = T.match_buffer(y_h, (batch, heads, n, d), "float32")
        m = T.max(p - (window + sinks), T.int64(0))
        a = (m // unit * unit if tokens else m) + sinks
        for bi, i, h, c in T.grid(batch, n, heads, d):
            if a + i < p:
                x[bi, a + i, h, c] = y[bi, h, i, c]

    return func


def _virtual_heads(z, g: int):
    """``window_cache.to_virtual_heads`` in TE: ``[B, H / g, n, g * d]`` -> ``[B, H, n, d]``."""
    from tvm import te

    b_, hg, n, gd = z.shape
    d = int(gd) // g
    return te.compute((b_, int(hg) * g, n, d), lambda b, h, i, c: z[b, h // g, i, (h % g) * d + c],
                      name="kv_virtual_heads")


def _to_head_groups(x, perm, g: int, factor):
    """``compiler.ops._to_head_groups`` of ``x`` ``[B, H, n, d]``: the channels of all heads
    (head-major) taken in the order ``perm`` (a TE tensor, or None), then the Hadamard over each
    group of ``g`` heads' channels (:func:`_hadamard`): ``[B, H / g, n, g * d]``."""
    from tvm import te

    b_, heads, n, d = x.shape
    d = int(d)
    gd = g * d

    def body(b, hg, i, c):
        k = hg * gd + c
        k = perm[k].astype("int32") if perm is not None else k
        return x[b, k // d, i, k % d]

    return _hadamard(te.compute((b_, heads // g, n, gd), body, name="kv_head_groups"), factor)


def _from_head_groups(z, perm, heads, factor_t):
    """The inverse of :func:`_to_head_groups`: ``[B, H / g, n, g * d]`` -> ``[B, H, n, d]``; the
    channel order's inverse found by a reduction over ``perm`` (``H * d`` compares per channel)."""
    from tvm import te, tirx

    z = _hadamard(z, factor_t)
    b_, _, n, gd = z.shape
    gd = int(gd)
    d = gd * int(z.shape[1]) // int(heads)
    if perm is not None:
        r = te.reduce_axis((0, int(perm.shape[0])), "r")
        where = te.compute(perm.shape, lambda k: te.sum(tirx.if_then_else(perm[r].astype("int32") == k, r, 0), axis=r),
                           name="kv_head_groups_inverse")

    def body(b, h, i, c):
        j = h * d + c
        j = where[j].astype("int32") if perm is not None else j
        return z[b, j // gd, i, j % gd]

    return te.compute((b_, heads, n, d), body, name="kv_from_head_groups")


def _hadamard(x, factor):
    """``formats.hadamard.apply_hadamard(x, F)`` over the last dim ``n = m * p`` of ``x``: the
    reference's butterflies within each block of ``p``, then the small ``m x m`` factor ``F`` (a TE
    tensor) as a dense sum, then the division by ``sqrt(n)``."""
    import math

    from tvm import te, tirx

    n = int(x.shape[-1])
    m = int(factor.shape[0])
    p = n // m
    x = _butterflies(x, p)
    if m > 1:
        k = te.reduce_axis((0, m), "k")
        x = te.compute(x.shape, lambda b, h, i, c: te.sum(x[b, h, i, k * p + c % p] * factor[k, c // p], axis=k),
                       name="kv_hadamard_factor")
    return te.compute(x.shape, lambda *i: x(*i) / tirx.const(math.sqrt(n), "float32"), name="kv_hadamard_scale")


def _butterflies(x, p: int):
    """``formats.hadamard.fwht`` (unnormalized) within each aligned block of ``p`` (a power of two)
    channels of the last dim of ``x`` ``[B, H, n, D]``."""
    from tvm import te, tirx

    d = int(x.shape[3])

    def stage(x, h):  # one butterfly: c with bit h clear gets x[c] + x[c + h], its partner x[c] - x[c + h]
        def body(b, hd, i, c):
            return tirx.if_then_else(tirx.bitwise_and(c, h) == 0, x[b, hd, i, c] + x[b, hd, i, tirx.min(c + h, d - 1)],
                                     x[b, hd, i, tirx.max(c - h, 0)] - x[b, hd, i, c])
        return te.compute(x.shape, body, name=f"kv_fwht_{h}")

    h = 1
    while h < p:
        x = stage(x, h)
        h *= 2
    return x


def _fwht(x):
    """``compiler.ops._hadamard`` over the head dim of ``x`` ``[B, H, n, d]`` (d a power of two): the
    reference's butterflies (``formats.hadamard.fwht``: pairs ``(c, c + h)`` for h = 1, 2, 4 ..), then
    the division by ``sqrt(d)``; the same sums in the same order, so the same float32 values."""
    import math

    from tvm import te, tirx

    d = int(x.shape[3])
    x = _butterflies(x, d)
    return te.compute(x.shape, lambda *i: x(*i) / tirx.const(math.sqrt(d), "float32"), name="kv_fwht_scale")


def _rope_tables(freq, start, n):
    """``compiler.ops._rope``'s cos / sin ``[n, half]`` at positions ``start + i``: angles in float64,
    rounded to float32 (one table for every head and both directions)."""
    from tvm import te, tirx

    def ang(i, j):
        return (start + i).astype("float64") * freq[j].astype("float64")

    half = int(freq.shape[0])
    return (te.compute((n, half), lambda i, j: tirx.cos(ang(i, j)).astype("float32"), name="kv_rope_cos"),
            te.compute((n, half), lambda i, j: tirx.sin(ang(i, j)).astype("float32"), name="kv_rope_sin"))


def _rope(x, tables, inverse: bool):
    """``compiler.ops._rope`` (or its inverse) of ``x`` ``[B, H, n, d]`` by the ``rotate_half`` pairs
    ``(c, c + half)``, the channels past ``2 * half`` unchanged."""
    from tvm import te, tirx

    cos_t, sin_t = tables
    half = int(cos_t.shape[1])

    def body(b, h, i, c):
        j = tirx.if_then_else(c < half, c, tirx.min(tirx.max(c - half, 0), half - 1))
        cos, sin = cos_t[i, j], sin_t[i, j]
        if inverse:
            sin = -sin
        x1, x2 = x[b, h, i, j], x[b, h, i, j + half]
        return tirx.if_then_else(c < half, x1 * cos - x2 * sin,
                                 tirx.if_then_else(c < 2 * half, x2 * cos + x1 * sin, x[b, h, i, c]))

    return te.compute(x.shape, body, name="kv_inverse_rope" if inverse else "kv_rope")


def _quant_params(x, f: QuantFormat, axis: str, n, group: int | None = None, member=None):
    """``(g, scale, zero)``: the TE scale and zero point ``QuantFormat.quantize`` chooses for ``x``
    ``[B, H, n, d]`` per channel over groups of ``G`` tokens (``axis == "tokens"``: ``[B, H, n / G, d]``;
    ``group``: ``G`` instead of ``f``'s group size) or per token over groups along the head dim
    (``[B, H, n, d / g]``). ``member(b, h, i)`` (tokens axis): each group's statistics over its
    member tokens only (ZipCache's subsets of a block)."""
    from tvm import te, tirx

    b_, heads, _, d = x.shape
    d = int(d)
    tokens = axis == "tokens"
    g = (group or f.group_size) if tokens else (f.group_size or d)
    shape = (b_, heads, n // g, d) if tokens else (b_, heads, n, d // g)

    def at(b, h, i, c, r, empty=None):  # member r of the group (i, c) indexes; ``empty`` where it is not a member
        if not tokens:
            return x[b, h, i, c * g + r]
        v = x[b, h, i * g + r, c]
        return v if member is None else tirx.Select(member(b, h, i * g + r), v, tirx.const(empty, "float32"))

    r1, r2 = te.reduce_axis((0, g), "r1"), te.reduce_axis((0, g), "r2")
    clip = tirx.const(float(f.clip), "float32")
    if f.symmetric:
        amax = te.compute(shape, lambda *i: te.max(tirx.abs(at(*i, r1, 0.0)), axis=r1), name="kv_amax")
        raw = te.compute(shape, lambda *i: amax(*i) * clip / tirx.const(float(f.family.max_value(f)), "float32"),
                         name="kv_raw_scale")
    else:
        mn = te.compute(shape, lambda *i: te.min(at(*i, r1, float("inf")), axis=r1), name="kv_min")
        mx = te.compute(shape, lambda *i: te.max(at(*i, r2, float("-inf")), axis=r2), name="kv_max")
        lo = te.compute(shape, lambda *i: tirx.min(mn(*i), 0.0) * clip, name="kv_lo")
        raw = te.compute(shape, lambda *i: (tirx.max(mx(*i), 0.0) * clip - lo(*i))
                         / tirx.const(float(2 ** f.bits - 1), "float32"), name="kv_raw_scale")
    stored = {"fp16": "float16", "bf16": "bfloat16"}.get(f.scale)

    def scale_of(*i):
        s = raw(*i).astype(stored).astype("float32") if stored else raw(*i)
        return tirx.Select(s > 0.0, s, tirx.const(1.0, "float32"))

    scale = te.compute(shape, scale_of, name="kv_scale")
    if f.symmetric:
        zero = te.compute(shape, lambda *i: tirx.const(0.0, "float32"), name="kv_zero")
    else:
        top = float(2 ** f.bits - 1)
        zero = te.compute(shape, lambda *i: tirx.max(tirx.min(tirx.nearbyint(-lo(*i) / scale(*i)), top), 0.0),
                          name="kv_zero")
    return g, scale, zero


def _fake_quant(x, f: QuantFormat, axis: str, n, group: int | None = None, member=None):
    """``f.fake_quantize`` of ``x`` ``[B, H, n, d]``: per channel over groups of ``G`` tokens
    (``axis == "tokens"``, ``n`` a multiple of ``G``; ``group``, ``member``: :func:`_quant_params`') or
    per token over groups along the head dim; scales chosen as ``QuantFormat.quantize`` chooses them;
    integer codes or FP8 E4M3 elements."""
    from tvm import te

    from finegrain.backends.tvm.lower_activations import _minifloat_round

    lo_code, hi_code = f.family.code_range(f)
    tokens = axis == "tokens"
    g, scale, zero = _quant_params(x, f, axis, n, group, member)

    def deq(b, h, i, c):
        idx = (b, h, i // g, c) if tokens else (b, h, i, c // g)
        s, z = scale(*idx), zero(*idx)
        if f.kind == "e4m3":  # FP8 elements: the E4M3 grid, saturated, as torch's cast rounds
            return _minifloat_round(x[b, h, i, c] / s, f) * s
        return (_int_code(x[b, h, i, c], s, z, lo_code, hi_code) - z) * s

    return te.compute(x.shape, deq, name="kv_fake_quant")


def _zip_fake_quant(x, score, f: QuantFormat, low: QuantFormat, ratio: float, block: int, channel_norm: bool,
                    per_channel: bool, n):
    """``compiler.ops._zip_fake_quantize`` of the released tokens ``x`` ``[B, H, n, d]`` (``n`` a multiple of
    ``block``) with scores ``score(b, h, i)``: per (batch, head) the ``round(ratio * n)`` tokens of highest
    score in ``f``, the rest in ``low``; a token's rank counts the tokens of higher score (of an equal score,
    the earlier ones), ``round`` half to even as Python's. Token-wise (``channel_norm``: each channel
    divided by the fp16 square root of its absolute maximum over the block, multiplied back), or
    ``per_channel``: each channel over its block's salient tokens in ``f`` and over the others in ``low``."""
    from tvm import te, tirx

    b_, heads, _, d = x.shape
    salient = _zip_salient(score, b_, heads, n, ratio)
    if per_channel:
        hi = _fake_quant(x, f, "tokens", n, block, salient)
        lo = _fake_quant(x, low, "tokens", n, block, lambda b, h, i: tirx.Not(salient(b, h, i)))
        return te.compute(x.shape, lambda b, h, i, c: tirx.Select(salient(b, h, i), hi[b, h, i, c], lo[b, h, i, c]),
                          name="kv_zip_mixed")
    if channel_norm:
        r = te.reduce_axis((0, block), "r")
        amax = te.compute((b_, heads, n // block, d), lambda b, h, k_, c: te.max(
            tirx.abs(x[b, h, k_ * block + r, c]), axis=r), name="kv_zip_amax")
        norm = te.compute(amax.shape, lambda *i: tirx.sqrt(tirx.max(amax(*i), tirx.const(1e-6, "float32"))).astype(
            "float16").astype("float32"), name="kv_zip_norm")
        x = te.compute(x.shape, lambda b, h, i, c: x[b, h, i, c] / norm[b, h, i // block, c], name="kv_zip_normed")
    hi, lo = _fake_quant(x, f, "head_dim", n), _fake_quant(x, low, "head_dim", n)

    def body(b, h, i, c):
        v = tirx.Select(salient(b, h, i), hi[b, h, i, c], lo[b, h, i, c])
        return v * norm[b, h, i // block, c] if channel_norm else v

    return te.compute(x.shape, body, name="kv_zip_mixed")


def _zip_salient(score, batch, heads, n, ratio: float):
    """``salient(b, h, i)``: whether released token ``i`` of ``n`` (scores ``score(b, h, i)``) is among the
    ``round(ratio * n)`` of highest score of its (batch, head) (``compiler.ops.zip_salient``): its rank
    counts the tokens of higher score (of an equal score, the earlier ones), ``round`` half to even."""
    from tvm import te, tirx

    j = te.reduce_axis((0, n), "j")
    rank = te.compute((batch, heads, n), lambda b, h, i: te.sum(tirx.Select(tirx.Or(
        score(b, h, j) > score(b, h, i), tirx.all(score(b, h, j) == score(b, h, i), j < i)), 1, 0), axis=j),
        name="kv_zip_rank")
    k = tirx.nearbyint(tirx.Cast("float64", n) * tirx.const(ratio, "float64")).astype("int64")
    return lambda b, h, i: rank[b, h, i] < k


def _saliency(q, past, new, probes: float, scale: float, release: tuple | None = None, token_major: bool = False):
    """TE: ``compiler.ops.kv_saliency_ref`` of ``q`` ``[B, H, S, d]``, ``past`` ``[B, Hkv, P, d]`` and ``new``
    ``[B, Hkv, S, d]``: each probe query's causal softmax (``ops.probe_counts``' probes, ``S`` known at run
    time), summed over the probes and the query heads of a K / V head, divided by how many of them see
    the token: ``[B, Hkv, P + S]``. ``release``: ``(window, sinks, block)`` of the writes that read it;
    a call whose writes release no token (most decode steps) then computes nothing (no probe: zeros).
    ``token_major``: ``past`` is a static build's ``[B, P, Hkv, d]`` buffer, read in place."""
    from tvm import te, tirx

    from finegrain.compiler.ops import probe_counts

    b_, h, s, d = q.shape
    hkv, p = (past.shape[2], past.shape[1]) if token_major else (past.shape[1], past.shape[2])
    rep_ = int(h) // int(hkv)
    t_len = p + s
    n, recent, stride = probe_counts(s, probes, lambda p_, s_: tirx.ceil(tirx.Cast("float64", s_) * p_).astype("int64"),
                                     tirx.max, tirx.min)
    spread = n - recent
    if release is not None:
        window, sinks, block = release
        needed = kv_quantized_until(t_len, "tokens", block, window, sinks, tirx.max) > kv_quantized_until(
            p, "tokens", block, window, sinks, tirx.max)
        n = tirx.Select(needed, n, tirx.const(0, "int64"))

    def idx(j):  # the probe's query index
        return tirx.if_then_else(j < spread, j * stride, s - recent + (j - spread))

    def key(b, g, t, c):
        tp = tirx.min(t, tirx.max(p - 1, 0))
        return tirx.if_then_else(t < p, past[b, tp, g, c] if token_major else past[b, g, tp, c],
                                 new[b, g, tirx.max(t - p, 0), c])

    c = te.reduce_axis((0, d), "c")
    dot = te.compute((b_, h, n, t_len), lambda b, hh, j, t: te.sum(q[b, hh, idx(j), c] * key(b, hh // rep_, t, c),
                                                                   axis=c), name="kv_sal_dot")
    logits = te.compute(dot.shape, lambda *i: dot(*i) * tirx.const(scale, "float32"), name="kv_sal_logits")

    def sees(j, t):
        return t <= p + idx(j)

    t1, t2 = te.reduce_axis((0, t_len), "t1"), te.reduce_axis((0, t_len), "t2")
    mx = te.compute((b_, h, n), lambda b, hh, j: te.max(tirx.Select(sees(j, t1), logits[b, hh, j, t1],
                                                                      tirx.const(float("-inf"), "float32")), axis=t1),
                    name="kv_sal_max")
    ex = te.compute(logits.shape, lambda b, hh, j, t: tirx.Select(sees(j, t), tirx.exp(logits[b, hh, j, t] - mx[b, hh, j]),
                                                                  tirx.const(0.0, "float32")), name="kv_sal_exp")
    den = te.compute((b_, h, n), lambda b, hh, j: te.sum(ex[b, hh, j, t2], axis=t2), name="kv_sal_den")
    jr = te.reduce_axis((0, n), "jr")
    seen = te.compute((t_len,), lambda t: te.sum(tirx.Select(sees(jr, t), 1, 0), axis=jr), name="kv_sal_seen")
    r, jj = te.reduce_axis((0, rep_), "r"), te.reduce_axis((0, n), "jj")
    total = te.compute((b_, hkv, t_len), lambda b, g, t: te.sum(
        ex[b, g * rep_ + r, jj, t] / den[b, g * rep_ + r, jj], axis=[r, jj]), name="kv_sal_sum")

    def score(b, g, t):
        v = total[b, g, t] / (tirx.max(seen[t], 1) * rep_).astype("float32")
        # no probe: the reductions never ran (a TIR reduction initializes at its first iteration): zeros
        return v if release is None else tirx.Select(n > 0, v, tirx.const(0.0, "float32"))

    return te.compute(total.shape, score, name="kv_saliency")


def _int_code(v, scale, zero, lo_code: int, hi_code: int):
    """TE: the integer code (as float) ``QuantFormat.quantize`` gives ``v``: round half to even, plus the zero
    point, clamped to the code range."""
    from tvm import tirx

    return tirx.max(tirx.min(tirx.nearbyint(v / scale) + zero, float(hi_code)), float(lo_code))


def _span_rows(x, lay: dict, n, salient=None):
    """The packed rows (``window_cache.encode_span``) of the released tokens ``x`` ``[B, H, n, d]`` (in
    the space they are quantized in): token-major code words ``[B, n, H, W]``, scales ``[B, n, H, C]`` and
    zero points ``[B, n, H, C | C + 1]`` (parameters spread: each unit's parameter pairs over its rows).
    ZipCache (``lay["low"]``): ``salient(b, h, i)`` picks each token's format, codes at the high
    format's width, per-channel pairs of both subsets spread, the flag in the last zero-point column."""
    from tvm import te, tirx

    from finegrain.backends.tvm.lower_cache import packed_word

    f = QuantFormat.parse(lay["format"])
    b_, heads, _, d = x.shape
    d = int(d)
    spread, unit, bits, w, cols, pairs = lay["spread"], lay["unit"], lay["bits"], lay["words"], lay["cols"], lay["pairs"]
    axis = "tokens" if spread else "head_dim"
    fl = QuantFormat.parse(lay["low"]) if lay.get("low") is not None else None
    g, scale, zero = _quant_params(x, f, axis, n, unit if spread else None, salient)
    if fl is not None:
        _, scale_l, zero_l = _quant_params(x, fl, axis, n, unit if spread else None,
                                           lambda b, h, i: tirx.Not(salient(b, h, i)))

    def u(b, i, h, c):
        idx = (b, h, i // g, c) if spread else (b, h, i, c // g)
        code = _int_code(x[b, h, i, c], scale(*idx), zero(*idx), *f.family.code_range(f))
        if fl is not None:
            code = tirx.Select(salient(b, h, i), code, _int_code(x[b, h, i, c], scale_l(*idx), zero_l(*idx),
                                                                 *fl.family.code_range(fl)))
        return (code - float(lay["lo"])).astype("int32")

    def param(hi, lo, dtype, flag: bool = False):
        def body(b, i, h, c):
            if not spread:
                v = hi(b, h, i, c) if lo is None else tirx.Select(salient(b, h, i), hi(b, h, i, c), lo(b, h, i, c))
                return v.astype(dtype)
            pi = (i % g) * cols + c  # the pair this row and column hold: the high subset's d, then the low's
            v = hi(b, h, i // g, tirx.min(pi, d - 1))
            if lo is not None:
                v = tirx.Select(pi < d, v, lo(b, h, i // g, tirx.max(tirx.min(pi - d, d - 1), 0)))
            v = tirx.Select(pi < pairs, v, tirx.const(0.0, "float32")).astype(dtype)
            if flag:
                v = tirx.Select(c == cols, salient(b, h, i).astype(dtype), v)
            return v
        return body

    zc = lay["zcols"]
    return (te.compute((b_, n, heads, w), lambda b, i, h, k: packed_word(u, w, bits, b, i, h, k),
                       name="kv_span_codes"),
            te.compute((b_, n, heads, cols), param(scale, scale_l if fl is not None else None, lay["scale"]),
                       name="kv_span_scales"),
            te.compute((b_, n, heads, zc), param(zero, zero_l if fl is not None else None, "uint8", zc > cols),
                       name="kv_span_zeros"))
