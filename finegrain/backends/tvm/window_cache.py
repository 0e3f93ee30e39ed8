"""KIVI's windowed KV cache held **packed** by a static TVM build (issue #17: "the attention reads the
packed cache"): codes and scales where ``lower_window.py`` alone keeps an fp32 cache of the format's
values.

A ``kv_window_write`` (``lower_window.rewrite``: ``kv_append`` with per-channel keys, a float window,
sinks, pre-RoPE and per-head rotated keys) whose keys and values both have an integer format of 2 / 4 /
8 bits with fp16 / fp32 scales is held, per layer and kind, as four buffers (:func:`pack_window_cache`):

* ``codes``  int32 ``[B, L, Hkv, W]``: each quantized token's codes, unsigned and interleaved as
  ``lower_cache``'s packed cache lays them out (element ``a`` of the head dim in word ``a % W`` at bit
  ``(a // W) * bits``);
* ``scales`` ``[B, L, Hkv, C]`` and ``zeros`` uint8 ``[B, L, Hkv, C]`` (asymmetric formats):
  values per token in groups of ``g`` along the head dim: the token's own ``C = d / g``; keys per channel
  over groups of ``G`` tokens: the group's ``d`` per-channel parameters **spread over its own G rows**, row
  ``r`` of the group holding channels ``[r * C, (r + 1) * C)`` with ``C = d / G`` (so each token row has a
  fixed width and the runtime's one-row-per-token model holds; needs ``G`` to divide ``d``);
* ``ring`` fp32 ``[B, R, Hkv, d]``, ``R = sinks + window + G`` (``G`` = 1 for values): the sinks at
  rows ``[0, sinks)`` and each later token still in float (the newest ``window`` plus those waiting for
  their group) at row ``sinks + (t - sinks) % (window + G)``. The runtime passes it whole and never
  writes it; it is a fixed ``R`` rows long whatever the context.

Per call (``P`` cached tokens, ``S`` new): ``kv_wpack_read`` decodes the past into a transient fp32
``[B, P, Hkv, d]`` (codes -> values in the space they were quantized in -> Hadamard / RoPE at each
token's position / Hadamard back for pre-RoPE keys; the sinks and float tokens from the ring), the
write's released tokens are quantized from it exactly as ``kv_append`` does, their code rows returned
for the runtime to write at ``P`` (``kv_wpack_rows``) and, for those already cached, written in place
together with the ring's new float tokens (``kv_wpack_commit``, which returns the past attention reads:
the decoded one with the released rows' quantized values). The cache then holds the bytes the format
stores, plus ``R`` fp32 rows per layer and kind.

A **decode step** (one new token, the attention kept for the fused kernel) does not decode the past
(:func:`mark_fused_decode`): its released tokens are all float tokens (or the step's own), so the write
takes them from the ring, the commit writes their code rows and the ring in place (nothing else), and
attention reads the buffers in place (:func:`decode_attention_func`: each quantized key unpacked in
registers and taken to the queries' space with one FWHT and its RoPE, shared by the query heads reading
it; values unpacked as the per-token packed cache's kernel does; without a float window the step's
token's own parameter row, written by the runtime after the call, from the released span). Prefill
still decodes the past once per layer through ``kv_wpack_read``.

**ZipCache's** saliency-ranked writes (``kv_append`` with a score) take the same four buffers
(:func:`zip_layout`, since 2026-12-06): tokens released a block at a time, every token's codes at the
high format's width (a 2-bit token's codes in the low bits of 4-bit fields: the code rows cost what the
high format's would, not the mixed average, because this runtime holds one fixed-width row per token),
per-channel key parameters of both subsets (salient, other) spread over each block's rows with one more
zero-point column holding each token's salient flag, values' parameters per token in whichever format
it took. ``kv_wpack_rows`` / ``kv_wpack_commit`` take the score and rank the released tokens as
``kv_append`` does. Decode's attention reads these buffers in place too (since 2026-12-07: each
per-channel key's pairs picked by its flag); the saliency of a step that releases a block reads the
decoded past, which a decode step then computes, and only then (``read_func(lazy=True)``).

**RotateKV's grouped-head keys** (pre-RoPE keys reordered across heads and rotated over groups of
``g`` heads, ``kv_append``'s ``perm`` / ``head_group``; since 2026-12-06) take the same buffers: each
released token's rotated row ``[H / g, g d]`` is held as ``H`` *virtual heads* of ``d`` channels
(:func:`to_virtual_heads`), so a format's groups along the rotated row that divide ``d`` are each
virtual head's own and the per-token layout holds them unchanged. ``kv_wpack_read`` decodes the
virtual heads, undoes the grouped rotation and the order, applies RoPE and the per-head Hadamard (on
TVM one task per token, :func:`grouped_read_func`); the rows take the released tokens to the grouped
space as ``kv_append`` does. Decode's attention reads them in place (since 2026-12-07,
:func:`grouped_decode_attention_func`: a key is rotated with its group's other heads, and reordered
channels cross groups, so one work item takes all heads of a chunk of tokens, each token's rows taken
back once for every head).

Left in an fp32 cache (``pack_window_cache`` says which and why): FP8 windowed writes, RotateKV's
grouped heads whose groups span more than a head dim (one scale per rotated row), groups that do not
divide the head dim, ZipCache's channel-normalized token-wise writes, layers whose keys or values are
not windowed."""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Graph

from finegrain.backends.tvm.kernels import memoized
from finegrain.backends.tvm.lower_cache import pack_words, unpack_words
from finegrain.compiler.ops import _hadamard, _rope, kv_quantized_span, kv_quantized_until
from finegrain.formats import QuantFormat


def window_layout(fmt: str, axis: str, d: int, window: int, sinks: int, zipped: tuple | None = None,
                  head_group: int | None = None) -> dict | str:
    """The packed layout of a windowed KV write (``lower_cache.kv_layout``'s, plus ``axis`` and ``unit``
    (the release rule: tokens released together), ``spread`` (the parameters are per channel, spread
    over each unit's rows), ``cols`` / ``zcols`` (scales / zero points per row), ``window``, ``sinks``,
    ``ring`` rows), or why it has none (a string). ``zipped``: ZipCache's ``(fmt_low, ratio, block,
    channel_norm)`` (:func:`zip_layout`). ``head_group``: RotateKV's grouped-head keys (``g``, 1 when
    only reordered), held as :func:`to_virtual_heads` of their rotated space (needs the format's groups
    to divide the head dim)."""
    from finegrain.backends.tvm.lower_cache import kv_layout

    if zipped is not None:
        if head_group is not None:
            return "ZipCache over RotateKV's grouped heads has no packed layout"
        return zip_layout(fmt, axis, d, window, sinks, zipped)
    f = QuantFormat.parse(fmt)
    if f.kind != "int" or f.symmetric:
        return f"{f.tag}: windowed writes are packed for asymmetric integer formats; this one stays in an fp32 cache"
    if head_group is not None:
        if axis == "tokens" or f.granularity != "group" or d % f.group_size:
            return (f"{f.tag}: RotateKV's grouped-head keys are packed with groups along the rotated row that divide "
                    f"the head dim {d} (each virtual head's own); these stay in an fp32 cache")
        lay = window_layout(fmt, axis, d, window, sinks)
        return lay if isinstance(lay, str) else {**lay, "head_group": int(head_group)}
    tokens = axis == "tokens"
    unit = f.group_size if tokens else 1
    if tokens and (not unit or d % unit):
        return f"{f.tag}: per-channel groups of {unit} tokens do not divide the head dim {d} (their scales are " \
               "spread over the group's rows)"
    lay = kv_layout(f, d)  # tokens axis: the group read as one along the head dim gives the same widths
    if isinstance(lay, str):
        return lay
    cols = d // unit if tokens else d // lay["group"]
    return {**lay, "axis": axis, "unit": unit, "spread": tokens, "cols": cols, "zcols": cols, "pairs": d,
            "window": int(window), "sinks": int(sinks), "ring": int(sinks) + int(window) + unit, "format": fmt}


def zip_layout(fmt: str, axis: str, d: int, window: int, sinks: int, zipped: tuple) -> dict | str:
    """ZipCache's packed layout (a write with a saliency score; ``zipped`` its ``(fmt_low, ratio, block,
    channel_norm)``), or why it has none: tokens released ``block`` at a time (``axis`` "tokens", ``unit``
    the block; the ring holds ``sinks + window + block`` rows); **every token's codes at the high format's
    width** (a low-precision token's codes sit in its low bits: the code rows take the high format's
    bytes, ``1 + (hi - lo) / lo x (1 - ratio)`` times what a mixed-width layout would, which this
    runtime's one-row-per-token buffers cannot hold); parameters in the token's own format:
    per token in groups along the head dim (``axis`` "head_dim"), or per channel over each block's
    salient and other tokens (``"tokens"``: the block's ``2 d`` (scale, zero) pairs, the salient
    subset's first, spread over its rows, ``cols`` per row, and one more zero-point column holding each
    token's salient flag). Needs both formats asymmetric integers with the same scale type (and the
    same groups along the head dim); the channel normalizer of ZipCache's own token-wise keys is not
    held (those stay in an fp32 cache)."""
    from finegrain.backends.tvm.lower_cache import kv_layout

    low, ratio, block, channel_norm = zipped
    block = int(block)
    if channel_norm:
        return "ZipCache's channel-normalized token-wise writes stay in an fp32 cache"
    hi, lo = QuantFormat.parse(fmt), QuantFormat.parse(low)
    for f in (hi, lo):
        if f.kind != "int" or f.symmetric:
            return f"{f.tag}: ZipCache's writes are packed for asymmetric integer formats; this one stays in an fp32 cache"
    if lo.bits > hi.bits or lo.scale != hi.scale:
        return f"ZipCache's {low} is wider than {fmt} or has another scale type: the write stays in an fp32 cache"
    spread = axis == "tokens"
    if spread:
        if (2 * d) % block and block % (2 * d):
            return (f"ZipCache's blocks of {block} tokens do not spread the {2 * d} per-channel parameter pairs of a "
                    "block evenly over its rows")
        lay = kv_layout(hi, d)
        cols = max(2 * d // block, 1)
        zcols = cols + 1
    else:
        if (hi.group_size or d) != (lo.group_size or d) or d % (hi.group_size or d):
            return f"ZipCache's {fmt} and {low} do not share groups dividing the head dim {d}"
        lay = kv_layout(hi, d)
        cols = zcols = d // lay["group"]
    if isinstance(lay, str):
        return lay
    return {**lay, "axis": "tokens", "unit": block, "spread": spread, "cols": cols, "zcols": zcols,
            "pairs": 2 * d if spread else d, "window": int(window), "sinks": int(sinks),
            "ring": int(sinks) + int(window) + block, "format": fmt, "low": low, "ratio": float(ratio)}


def ring_row(t, lay: dict, select=None):
    """The ring row of token ``t`` (a sink, or a token still in float); ``select`` (``tirx.if_then_else``)
    for a symbolic ``t`` (the kernels and TE functions reading the ring)."""
    s = lay["sinks"]
    row = s + (t - s) % (lay["window"] + lay["unit"])
    if select is None:
        return t if t < s else row
    return select(t < s, t, row)


def to_virtual_heads(z: torch.Tensor, g: int) -> torch.Tensor:
    """RotateKV's grouped-head rows ``[B, H / g, n, g * d]`` as ``H`` *virtual heads* of ``d`` channels,
    ``g`` per group, ``[B, H, n, d]`` (virtual head ``hg * g + j`` holds channels ``[j d, (j + 1) d)`` of group ``hg``):
    a format's groups along the grouped row that divide ``d`` are then each virtual head's own, so the
    packed layout of per-head rows holds them unchanged."""
    b, hg, n, gd = z.shape
    return z.reshape(b, hg, n, g, gd // g).permute(0, 1, 3, 2, 4).reshape(b, hg * g, n, gd // g)


def from_virtual_heads(v: torch.Tensor, g: int) -> torch.Tensor:
    """The inverse of :func:`to_virtual_heads`."""
    b, h, n, d = v.shape
    return v.reshape(b, h // g, g, n, d).permute(0, 1, 3, 2, 4).reshape(b, h // g, n, g * d)


def grouped(perm, head_group: int) -> int | None:
    """``head_group`` where a write quantizes keys in RotateKV's grouped-head space (grouped, or only
    reordered: ``perm`` given), else None (``window_layout``'s argument)."""
    return int(head_group) if perm is not None or int(head_group) > 1 else None


def _space(x: torch.Tensor, start: int, inv_freq, rotated: bool, inverse: bool, perm=None,
           head_group: int | None = None) -> torch.Tensor:
    """Head-major ``x`` ``[B, H, n, d]`` at positions ``start ..`` to the space ``kv_append`` quantizes
    it in (``inverse``) or back: pre-RoPE keys (per-head Hadamard, RoPE undone / applied, Hadamard);
    RotateKV's grouped heads (``perm`` / ``head_group``: per-head Hadamard and RoPE undone, then the
    grouped-head rotation of ``compiler.ops._to_head_groups``, as :func:`to_virtual_heads`)."""
    from finegrain.compiler.ops import _from_head_groups, _to_head_groups

    if inv_freq is None:
        return x
    if head_group is not None:
        if inverse:
            x = _rope(_hadamard(x) if rotated else x, start, inv_freq, inverse=True)
            return to_virtual_heads(_to_head_groups(x, perm, head_group), head_group)
        x = _rope(_from_head_groups(from_virtual_heads(x, head_group), perm, x.shape[1]), start, inv_freq, inverse=False)
        return _hadamard(x) if rotated else x
    x = _rope(_hadamard(x) if rotated else x, start, inv_freq, inverse=inverse)
    return _hadamard(x) if rotated else x


def encode_span(seg: torch.Tensor, lay: dict, salient: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-major rows ``(codes, scales, zeros)`` ``[B, n, H, W | C]`` of the released tokens ``seg``
    (head-major ``[B, H, n, d]``, in the space they are quantized in; ``n`` whole units when the
    parameters are spread), quantized as ``kv_append`` quantizes them. ZipCache (``lay["low"]``):
    ``salient`` ``[B, H, n]`` says which tokens take the high format."""
    from finegrain.compiler.ops import zip_block_format, zip_subset_rows

    f = QuantFormat.parse(lay["format"])
    b, h, n, d = seg.shape
    bits, c, unit = lay["bits"], lay["cols"], lay["unit"]
    flag = None
    if lay.get("low") is not None:  # ZipCache: each token in its subset's format, at the high format's width
        fl = QuantFormat.parse(lay["low"])
        sal = salient.bool()
        if lay["spread"]:  # per channel over each block's salient / other tokens: [B, H, blocks, 2 d] pairs
            xt = seg.reshape(b, h, n // unit, unit, d).transpose(3, 4)
            codes = torch.zeros(b, h, n, d, dtype=torch.int64)
            pairs = []
            for fmt, member in ((f, sal), (fl, ~sal)):
                _, filled = zip_subset_rows(xt, member.reshape(b, h, n // unit, unit))
                q = zip_block_format(fmt).quantize(filled)
                codes = torch.where(member[..., None], q.codes.transpose(3, 4).reshape(b, h, n, d).long(), codes)
                pairs.append((q.scale[..., 0], q.zero[..., 0]))
            params = [torch.cat([pairs[0][k], pairs[1][k]], -1) for k in (0, 1)]
            flag = sal
        else:  # the token's own parameters, in groups along the head dim
            qh, ql = f.quantize(seg), fl.quantize(seg)
            codes = torch.where(sal[..., None], qh.codes.long(), ql.codes.long())
            params = [torch.where(sal[..., None], hi_p.reshape(b, h, n, c), lo_p.reshape(b, h, n, c))
                      for hi_p, lo_p in ((qh.scale, ql.scale), (qh.zero, ql.zero))]
    elif lay["spread"]:  # per channel over groups of G tokens: [B, H, n / G, d] parameters
        q = f.quantize(seg.transpose(2, 3).contiguous())
        codes = q.codes.transpose(2, 3)
        params = [t.reshape(b, h, d, n // unit).transpose(2, 3) for t in (q.scale, q.zero)]
    else:
        q = f.quantize(seg)
        codes = q.codes
        params = [q.scale.reshape(b, h, n, c), q.zero.reshape(b, h, n, c)]
    if lay["spread"]:  # each unit's parameter pairs over its first pairs / C rows, C per row
        rows = lay["pairs"] // c
        spread = []
        for t in params:
            out = torch.zeros(b, h, n // unit, unit, c, dtype=t.dtype)
            out[:, :, :, :rows] = t.reshape(b, h, n // unit, rows, c)
            spread.append(out.reshape(b, h, n, c))
        params = spread
    words = pack_words(codes.to(torch.int64) - lay["lo"], bits)
    sdt = torch.float16 if lay["scale"] == "float16" else torch.float32
    zeros = params[1].to(torch.uint8)
    if flag is not None:  # the salient flag in the last zero-point column
        zeros = torch.cat([zeros, flag.to(torch.uint8)[..., None]], -1)
    return (words.transpose(1, 2).contiguous(), params[0].to(sdt).transpose(1, 2).contiguous(),
            zeros.transpose(1, 2).contiguous())


def decode_rows(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, lay: dict, start: int,
                n: int) -> torch.Tensor:
    """The values (in the space they were quantized in) of cached tokens ``start .. start + n``, head-major
    ``[B, H, n, d]`` (``start`` the first token after the sinks: units are aligned to it)."""
    d, c = lay["d"], lay["cols"]
    u = unpack_words(codes[:, start:start + n], lay["bits"]).float() + lay["lo"]
    s = scales[:, start:start + n].float()
    z = zeros[:, start:start + n, :, :c].float() if zeros is not None and lay["asym"] else torch.zeros_like(s)
    b, _, h, _ = s.shape
    if lay["spread"]:  # each unit's parameter pairs from its first pairs / C rows
        g, rows = lay["unit"], lay["pairs"] // c
        s, z = (t.reshape(b, n // g, g, h, c)[:, :, :rows].permute(0, 1, 3, 2, 4).reshape(b, n // g, h, lay["pairs"])
                .repeat_interleave(g, 1) for t in (s, z))
        if lay.get("low") is not None:  # ZipCache: the salient tokens' channels first, then the others'
            sal = zeros[:, start:start + n, :, c:c + 1].bool()
            s, z = (torch.where(sal, t[..., :d], t[..., d:]) for t in (s, z))
    else:
        s, z = (t.repeat_interleave(d // c, -1) for t in (s, z))
    return ((u - z) * s).transpose(1, 2).contiguous()


def _read(codes, scales, zeros, ring, inv_freq, lay: dict, rotated: bool, perm=None) -> torch.Tensor:
    b, p, h, _ = codes.shape
    d, s = lay["d"], lay["sinks"]
    out = torch.zeros(b, p, h, d)
    qu = kv_quantized_until(p, lay["axis"], lay["unit"], lay["window"], s)
    for t in list(range(min(s, p))) + list(range(max(qu, s), p)):
        out[:, t] = ring[:, ring_row(t, lay)]
    if qu > s:
        body = _space(decode_rows(codes, scales, zeros, lay, s, qu - s), s, inv_freq, rotated, inverse=False,
                      perm=perm, head_group=lay.get("head_group"))
        out[:, s:qu] = body.transpose(1, 2)
    return out


def _layout_of(fmt, axis, window, sinks, d, fmt_low=None, ratio=1.0, block=1, perm=None, head_group=1) -> dict:
    lay = window_layout(fmt, axis, d, window, sinks, None if fmt_low is None else (fmt_low, ratio, block, False),
                        grouped(perm, head_group))
    if isinstance(lay, str):
        raise ValueError(lay)
    return lay


@torch.library.custom_op("finegrain::kv_wpack_read", mutates_args=())
def kv_wpack_read(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], ring: torch.Tensor,
                  inv_freq: Optional[torch.Tensor], fmt: str, axis: str, window: int, sinks: int,
                  rotated: bool, fmt_low: Optional[str] = None, ratio: float = 1.0, block: int = 1,
                  perm: Optional[torch.Tensor] = None, head_group: int = 1) -> torch.Tensor:
    """The cached keys / values ``[B, P, Hkv, d]`` (fp32, attention's space) a packed windowed cache holds
    (ZipCache's: ``fmt_low``, ``ratio``, ``block``; RotateKV's grouped heads: ``perm``, ``head_group``)."""
    lay = _layout_of(fmt, axis, window, sinks, ring.shape[-1], fmt_low, ratio, block, perm, head_group)
    return _read(codes, scales, zeros, ring, inv_freq, lay, rotated, perm)


@kv_wpack_read.register_fake
def _(codes, scales, zeros, ring, inv_freq, fmt, axis, window, sinks, rotated, fmt_low=None, ratio=1.0, block=1,
      perm=None, head_group=1):
    return codes.new_empty((*codes.shape[:-1], ring.shape[-1]), dtype=torch.float32)


def _span(read, new, inv_freq, lay, rotated, score=None, perm=None):
    """``(a, b, rows)``: the write's released tokens ``[a, b)`` and their ``encode_span`` rows (ZipCache:
    the salient ones picked from ``score`` as ``kv_append`` picks them)."""
    from finegrain.compiler.ops import zip_salient

    p, sn = read.shape[1], new.shape[2]
    a, b = kv_quantized_span(lay["axis"], lay["unit"], p, p + sn, lay["window"], lay["sinks"])
    if a >= b:
        return a, b, None
    full = torch.cat([read.transpose(1, 2), new.float()], 2)
    sal = zip_salient(score[:, :, a:b], lay["ratio"]) if lay.get("low") is not None else None
    x = _space(full[:, :, a:b].float(), a, inv_freq, rotated, inverse=True, perm=perm,
               head_group=lay.get("head_group"))
    return a, b, encode_span(x, lay, sal)


_ROW_DTYPES = {0: torch.int32, 2: torch.uint8}


def _row_width(lay: dict, part: int) -> int:
    return (lay["words"], lay["cols"], lay["zcols"])[part]


@torch.library.custom_op("finegrain::kv_wpack_rows", mutates_args=())
def kv_wpack_rows(read: torch.Tensor, new: torch.Tensor, inv_freq: Optional[torch.Tensor], fmt: str, axis: str,
                  window: int, sinks: int, rotated: bool, part: int, score: Optional[torch.Tensor] = None,
                  fmt_low: Optional[str] = None, ratio: float = 1.0, block: int = 1,
                  perm: Optional[torch.Tensor] = None, head_group: int = 1) -> torch.Tensor:
    """Part ``part`` (0 codes, 1 scales, 2 zero points) of the new tokens' rows ``[B, S, Hkv, W | C]``:
    those this write releases quantized, the others zero (they are in the ring)."""
    lay = _layout_of(fmt, axis, window, sinks, new.shape[-1], fmt_low, ratio, block, perm, head_group)
    p, sn = read.shape[1], new.shape[2]
    a, b, rows = _span(read, new, inv_freq, lay, rotated, score, perm)
    dt = _ROW_DTYPES.get(part, torch.float16 if lay["scale"] == "float16" else torch.float32)
    out = torch.zeros(new.shape[0], sn, new.shape[1], _row_width(lay, part), dtype=dt)
    for t in range(max(a, p), b):
        out[:, t - p] = rows[part][:, t - a]
    return out


@kv_wpack_rows.register_fake
def _(read, new, inv_freq, fmt, axis, window, sinks, rotated, part, score=None, fmt_low=None, ratio=1.0, block=1,
      perm=None, head_group=1):
    lay = _layout_of(fmt, axis, window, sinks, new.shape[-1], fmt_low, ratio, block, perm, head_group)
    dt = _ROW_DTYPES.get(part, torch.float16 if lay["scale"] == "float16" else torch.float32)
    return new.new_empty((new.shape[0], new.shape[2], new.shape[1], _row_width(lay, part)), dtype=dt)


@torch.library.custom_op("finegrain::kv_wpack_commit", mutates_args=())
def kv_wpack_commit(read: torch.Tensor, new: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                    zeros: Optional[torch.Tensor], ring: torch.Tensor, inv_freq: Optional[torch.Tensor], fmt: str,
                    axis: str, window: int, sinks: int, rotated: bool, score: Optional[torch.Tensor] = None,
                    fmt_low: Optional[str] = None, ratio: float = 1.0, block: int = 1,
                    perm: Optional[torch.Tensor] = None, head_group: int = 1) -> torch.Tensor:
    """The past attention reads after a write of ``new``: ``read`` with the rows this write releases
    quantized (reference implementation). Its TVM lowering also writes, in place, those rows' codes /
    scales / zero points into the ``codes`` / ``scales`` / ``zeros`` buffers and the new tokens still in
    float into ``ring`` (:func:`commit_ref` computes those writes), as ``kv_window_past``'s lowering writes
    an fp32 cache in place; the op is declared functional so that the graph exports."""
    from finegrain.backends.tvm.lower_window import kv_window_past

    zip_args = () if fmt_low is None else (score, fmt_low, ratio, block, False)
    return kv_window_past(read, new, inv_freq, fmt, axis, window, sinks, rotated, perm, head_group, *zip_args)


@kv_wpack_commit.register_fake
def _(read, new, codes, scales, zeros, ring, inv_freq, fmt, axis, window, sinks, rotated, score=None, fmt_low=None,
      ratio=1.0, block=1, perm=None, head_group=1):
    return torch.empty_like(read)


def commit_ref(read, new, codes, scales, zeros, ring, inv_freq, fmt, axis, window, sinks, rotated, score=None,
               fmt_low=None, ratio=1.0, block=1, perm=None, head_group=1) -> None:
    """The buffer writes of ``kv_wpack_commit``'s lowering, in place on the torch tensors (reference)."""
    lay = _layout_of(fmt, axis, window, sinks, new.shape[-1], fmt_low, ratio, block, perm, head_group)
    p, sn = read.shape[1], new.shape[2]
    a, b, rows = _span(read, new, inv_freq, lay, rotated, score, perm)
    for t in range(a, min(b, p)):
        for buf, r in zip((codes, scales, zeros), rows):
            if buf is not None:
                buf[:, t] = r[:, t - a]
    qu = kv_quantized_until(p + sn, lay["axis"], lay["unit"], lay["window"], lay["sinks"])
    for t in range(p, p + sn):
        if t < lay["sinks"] or t >= qu:
            ring[:, ring_row(t, lay)] = new[:, :, t - p].float()


KV_WPACK_READ = torch.ops.finegrain.kv_wpack_read.default
KV_WPACK_ROWS = torch.ops.finegrain.kv_wpack_rows.default
KV_WPACK_COMMIT = torch.ops.finegrain.kv_wpack_commit.default


def pack_window_cache(graph: Graph, buffers: list[dict]) -> list[str]:
    """Rewrite ``graph`` (after ``lower_window.rewrite``, before ``lower_cache.to_static_cache``) so that
    each layer whose keys and values are both ``kv_window_write``s with a packed layout
    (:func:`window_layout`) keeps them packed: the ``past_*`` input becomes ``codes`` / ``scales`` /
    (``zeros``) / ``ring`` inputs, the present output the new tokens' rows. ``buffers`` (``pack_cache``'s
    list, one fp32 entry per such present) is updated in place. Returns why the other windowed layers stay
    fp32, one line each."""
    from finegrain.backends.tvm.lower_window import KV_WINDOW_NEW, KV_WINDOW_WRITE, is_zip, window_write_args
    from finegrain.compiler.ir import KV, cache_past

    out = next(n for n in graph.nodes if n.op == "output")
    results = list(out.args[0])
    layers: dict = {}
    for r in results:
        if isinstance(r, torch.fx.Node) and KV in r.meta:
            layers.setdefault(r.meta[KV]["layer"], []).append(r)
    plan, skipped = {}, []
    for layer, ps in layers.items():
        if not any(p.target is KV_WINDOW_WRITE for p in ps):
            continue
        lays = []
        for p in ps:
            if p.target is not KV_WINDOW_WRITE:
                lays.append(f"its {p.meta[KV]['kind']} is not a windowed write")
                continue
            (past_t, new, inv_freq, fmt, axis, window, sinks, rotated, perm, head_group, score, fmt_low, ratio,
             block, channel_norm) = window_write_args(p.args)
            ph = cache_past(past_t)
            d = p.meta["val"].shape[-1] if p.meta.get("val") is not None else None
            if ph is None or ph.op != "placeholder" or not isinstance(d, int):
                lays.append("its write does not read its past input directly")
            else:
                zipped = (fmt_low, float(ratio), int(block), bool(channel_norm)) if is_zip(p.args) else None
                g = grouped(perm, head_group) if inv_freq is not None else None  # as kv_append: pre-RoPE keys only
                lays.append(window_layout(fmt, axis, int(d), int(window), int(sinks), zipped, g))
        if len(ps) == 2 and all(isinstance(x, dict) for x in lays):
            plan.update({p: lay for p, lay in zip(ps, lays)})
        else:
            skipped.append(f"layer {layer}: " + "; ".join(dict.fromkeys(x for x in lays if isinstance(x, str))))
    index = {b["name"]: i for i, b in enumerate(buffers)}
    for i, r in enumerate(list(results)):
        if r not in plan:
            continue
        lay = plan[r]
        kind, layer = r.meta[KV]["kind"], r.meta[KV]["layer"]
        (past_t, new, inv_freq, fmt, axis, window, sinks, rotated, perm, head_group, score, fmt_low, ratio, block,
         _) = window_write_args(r.args)
        ph = cache_past(past_t)
        parts = [("codes", "int32", lay["words"]), ("scales", lay["scale"], lay["cols"])]
        if lay["asym"]:
            parts.append(("zeros", "uint8", lay["zcols"]))
        parts.append(("ring", "float32", lay["d"]))
        ins, specs = {}, []
        anchor = ph
        for suffix, dtype, width in parts:
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(f"kvw_{kind}_{layer}_{suffix}")
            anchor.meta["kv_packed"] = True
            ins[suffix] = anchor
            spec = {"name": anchor.name, "dtype": dtype, "width": width, "packed": lay}
            specs.append({**spec, "rows": lay["ring"]} if suffix == "ring" else spec)
        opts = (inv_freq, fmt, axis, window, sinks, rotated)
        zipped = (fmt_low, ratio, block) if lay.get("low") is not None else ()  # ZipCache's, after the score
        # RotateKV's grouped heads: (perm, head_group) after ZipCache's (unused) arguments
        heads_grouped = (None, 1.0, 1, perm, head_group) if lay.get("head_group") is not None else ()
        order = {n: k for k, n in enumerate(graph.nodes)}
        where = max([anchor] + ([inv_freq] if isinstance(inv_freq, torch.fx.Node) else []), key=order.__getitem__)
        with graph.inserting_after(where):  # early: the past's length is read before the write (masks, positions)
            read = graph.call_function(KV_WPACK_READ, (ins["codes"], ins["scales"], ins.get("zeros"), ins["ring"],
                                                       *opts, *zipped, *heads_grouped))
        scored = (score, *zipped) if zipped else (None, *heads_grouped) if heads_grouped else ()
        with graph.inserting_before(r):
            new_att = graph.call_function(KV_WINDOW_NEW, (read, new, *opts, *((None, 1, *scored, False) if zipped
                                                                               else (perm, head_group) if heads_grouped
                                                                               else ())))
            rows = [graph.call_function(KV_WPACK_ROWS, (read, new, *opts, j, *scored)) for j in range(len(parts) - 1)]
            past_att = graph.call_function(KV_WPACK_COMMIT, (read, new, ins["codes"], ins["scales"], ins.get("zeros"),
                                                             ins["ring"], *opts, *scored))
            both = graph.call_function(torch.ops.aten.cat.default,
                                       ([graph.call_function(torch.ops.aten.transpose.int, (past_att, 1, 2)), new_att], 2))
        r.replace_all_uses_with(both, delete_user_cb=lambda u: u is not out)
        results[i] = tuple(rows)
        with graph.inserting_after(read):  # the past's other readers (its length: masks, positions) read the decoded one
            head_major = graph.call_function(torch.ops.aten.transpose.int, (read, 1, 2))
        ph.replace_all_uses_with(head_major, delete_user_cb=lambda u: u is not r)
        j = index[f"{kind}_{layer}"]
        buffers[j:j + 1] = specs
        index = {b["name"]: k for k, b in enumerate(buffers)}
        # the past placeholder has no reader left (the write was its only one, through a transpose)
    flat = []
    for r in results:
        flat.extend(r if isinstance(r, tuple) else (r,))
    out.args = (tuple(flat),)
    for r in plan:
        graph.erase_node(r)
    graph.eliminate_dead_code()
    for n in [n for n in graph.nodes if n.op == "placeholder" and not n.users and n.name.startswith("past")]:
        graph.erase_node(n)
    return skipped


def _fwht_macro(n: int, stages: int, normalize: bool):
    """A TVMScript macro ``fwht(v, base)`` over the local row ``v[base:base + n]``: the reference's
    butterflies (``formats.hadamard.fwht``: pairs ``(c, c + 2^st)`` for ``st < stages``, so within each
    block of ``2^stages``), then, if ``normalize``, the division by ``sqrt(n)``."""
    import math

    from tvm.script import tirx as T

    @T.macro
    def fwht(v, base):
        for st in T.unroll(stages):
            for q in T.serial(n // 2):
                i0 = base + ((q >> st) << (st + 1)) + (q & ((T.int64(1) << st) - 1))
                v0 = v[i0]
                v[i0] = v0 + v[i0 + (T.int64(1) << st)]
                v[i0 + (T.int64(1) << st)] = v0 - v[i0 + (T.int64(1) << st)]
        if normalize:
            for a in T.vectorized(n):
                v[base + a] = v[base + a] / T.float32(math.sqrt(n))

    return fwht


def _fwht8_macros(n: int):
    """TVMScript macros ``(fill, fwht)``: ``fill(h8)`` writes the 8 x 8 Hadamard into the local ``h8[64]``;
    ``fwht(v, base, tmp, h8)``: ``v[base:base + n] <- H v`` (unnormalized, ``n`` a power of two >= 8) over
    a local row: each 8-lane block by the product with ``h8``, then the longer strides as vector
    butterflies (``tmp``: 8 lanes of scratch); the same transform as :func:`_fwht_macro`'s butterflies."""
    import math

    from tvm.script import tirx as T

    lanes = 8
    strides = max(int(math.log2(n)) - 3, 0)

    @T.macro
    def fill(h8):
        for k in T.serial(lanes):
            for c in T.serial(lanes):
                h8[k * lanes + c] = T.float32(1) - T.float32(2) * T.Cast("float32", (
                    ((k & c) & 1) + (((k & c) >> 1) & 1) + (((k & c) >> 2) & 1)) & 1)

    @T.macro
    def fwht(v, base, tmp, h8):
        for r in T.serial(n // lanes):
            for c in T.vectorized(lanes):
                tmp[c] = T.float32(0)
            for k in T.unroll(lanes):
                for c in T.vectorized(lanes):
                    tmp[c] = tmp[c] + v[base + r * lanes + k] * h8[k * lanes + c]
            for c in T.vectorized(lanes):
                v[base + r * lanes + c] = tmp[c]
        for st in T.unroll(strides):
            for qv in T.serial(n // (2 * lanes)):
                i0 = ((qv >> st) << (st + 4)) + ((qv & ((T.int64(1) << st) - 1)) << 3) + base
                for c in T.vectorized(lanes):
                    tmp[c] = v[i0 + c]
                for c in T.vectorized(lanes):
                    v[i0 + c] = tmp[c] + v[i0 + (T.int64(8) << st) + c]
                for c in T.vectorized(lanes):
                    v[i0 + (T.int64(8) << st) + c] = tmp[c] - v[i0 + (T.int64(8) << st) + c]

    return fill, fwht


def _value_row_macro(value: dict):
    """A TVMScript macro ``value_row(x, vc, vs, vz, vr, bi, j, kh, words, vqu)``: the value of cached token
    ``j`` of K / V head ``kh`` into ``x[0:d]``: its ring row (a sink, or a token at or past ``vqu``, the
    first not quantized) or its codes unpacked (the in-place decode kernels' value read)."""
    from tvm.script import tirx as T

    from finegrain.backends.tvm.kernels.attention import _unpack_row

    unpack, d, sinks = _unpack_row(value), value["d"], value["sinks"]

    def slot(j):
        return ring_row(j, value, T.if_then_else)

    @T.macro
    def value_row(x, vc, vs, vz, vr, bi, j, kh, words, vqu):
        if T.Or(j < sinks, j >= vqu):
            for a in T.vectorized(d):
                x[a] = vr[bi, slot(j), kh, a]
        else:
            unpack(x, vc, vs, vz, bi, j, kh, words)

    return value_row


@memoized
def read_func(batch: int, heads: int, lay: dict, rope_half: int, rotated: bool, lazy: bool = False):
    """The PrimFunc ``f(codes, scales, zeros, ring, rope[P | 1, 2 * half], out[B, P, Hkv, d])`` of
    ``kv_wpack_read``: one parallel task per cached token, its heads in turn (one task per token and head
    measured 3x slower for values: the per-task setup dominated); a quantized token's codes are
    unpacked and scaled into a local row, which pre-RoPE keys (``rope_half`` > 0: ``rope`` holds each
    position's cos then sin, float64 angles rounded to float32, as the reference's) then take back to
    attention's space in registers: the reference's butterflies and division by sqrt(d) for rotated keys,
    RoPE at the token's position, the butterflies again; sinks and float tokens are copied from the ring.
    ``lazy``: a decode step's read that only ZipCache's saliency reads (:func:`mark_fused_decode`), which
    computes only when the step's one token releases a unit: ``out`` is written only then."""
    import math

    from tvm.script import tirx as T

    d, bits, w, cols, lo = lay["d"], lay["bits"], lay["words"], lay["cols"], float(lay["lo"])
    window, sinks, unit, ring_rows = lay["window"], lay["sinks"], lay["unit"], lay["ring"]
    span_w, sdt, hgroup = window + unit, lay["scale"], lay["group"]
    spread, zcols = lay["spread"], lay["zcols"]
    flagged = int(zcols > cols)  # ZipCache's per-channel keys: the salient flag picks the subset's parameters
    half, stages, rot, roped = max(rope_half, 1), int(math.log2(d)), int(rotated), int(rope_half > 0)
    mask = 2 ** bits - 1
    f32 = "float32"

    per_word = 32 // bits
    groups = d // hgroup  # values: parameters per token

    fwht = _fwht_macro(d, stages, True)
    not_lazy = int(not lazy)

    def until(t):  # tokens quantized (or sinks) in a cache of t tokens
        return kv_quantized_until(t, lay["axis"], unit, window, sinks, T.max)

    @T.prim_func(s_tir=True)
    def func(c_h: T.handle, s_h: T.handle, z_h: T.handle, r_h: T.handle, t_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        p = T.int64()
        n_tab = T.int64()
        c = T.match_buffer(c_h, (batch, p, heads, w), "int32")
        s = T.match_buffer(s_h, (batch, p, heads, cols), sdt)
        z = T.match_buffer(z_h, (batch, p, heads, zcols), "uint8")
        ring = T.match_buffer(r_h, (batch, ring_rows, heads, d), f32)
        tab = T.match_buffer(t_h, (n_tab, 2 * half), f32)
        o = T.match_buffer(o_h, (batch, p, heads, d), f32)
        qu = until(p)
        # lazy: tasks only if this step's one token releases a unit
        for task in T.parallel(T.if_then_else(T.Or(not_lazy == 1, until(p + 1) > qu), batch * p, T.int64(0))):
            x = T.decl_buffer((d,), f32, scope="local")
            y = T.decl_buffer((d,), f32, scope="local")
            sc = T.decl_buffer((d,), f32, scope="local")
            zc = T.decl_buffer((d,), f32, scope="local")
            bi = task // p
            t = task % p
            for h in T.serial(heads):
                if T.Or(t < sinks, t >= qu):
                    slot = T.if_then_else(t < sinks, t, sinks + (t - sinks) % span_w)
                    for a in T.vectorized(d):
                        o[bi, t, h, a] = ring[bi, slot, h, a]
                else:
                    if spread:  # the unit's per-channel parameters, spread over its rows: pair i at row i // cols
                        # (ZipCache: the salient subset's d pairs, then the others')
                        off = T.Cast("int64", z[bi, t, h, zcols - 1] == T.uint8(0)) * T.int64(d * flagged)
                        for a in T.serial(d):
                            sc[a] = T.Cast(f32, s[bi, sinks + (t - sinks) // unit * unit + (a + off) // cols, h,
                                                  (a + off) % cols])
                            zc[a] = T.Cast(f32, z[bi, sinks + (t - sinks) // unit * unit + (a + off) // cols, h,
                                                  (a + off) % cols])
                    else:  # the token's own, one per group of hgroup channels
                        for gi in T.serial(groups):
                            for cc in T.vectorized(hgroup):
                                sc[gi * hgroup + cc] = T.Cast(f32, s[bi, t, h, gi])
                                zc[gi * hgroup + cc] = T.Cast(f32, z[bi, t, h, gi])
                    for j in T.unroll(per_word):  # element j * W + k: bits j * bits .. of word k
                        for k in T.vectorized(w):
                            x[j * w + k] = (T.Cast(f32, T.bitwise_and(T.shift_right(c[bi, t, h, k], T.int32(bits) * T.Cast(
                                "int32", j)), T.int32(mask))) + T.float32(lo) - zc[j * w + k]) * sc[j * w + k]
                    if rot == 1:  # the per-head Hadamard undone (self-inverse)
                        fwht(x, T.int64(0))
                    for a in T.vectorized(d):
                        y[a] = x[a]
                    if roped == 1:  # RoPE at the token's position (the rotate_half pairs)
                        for j in T.serial(half):
                            y[j] = x[j] * tab[t, j] - x[j + half] * tab[t, half + j]
                            y[j + half] = x[j + half] * tab[t, j] + x[j] * tab[t, half + j]
                    if rot == 1:
                        fwht(y, T.int64(0))
                    for a in T.vectorized(d):
                        o[bi, t, h, a] = y[a]

    return func


@memoized
def grouped_read_func(batch: int, heads: int, lay: dict, rope_half: int, rotated: bool, m: int):
    """The PrimFunc ``f(codes, scales, zeros, ring, rope[P | 1, 2 * half], perm[H * d], factor[m, m],
    out[B, P, Hkv, d])`` of ``kv_wpack_read`` over RotateKV's grouped-head keys (``lay["head_group"]``
    = ``g``): one parallel task per cached token; a quantized token's ``H`` virtual heads are unpacked
    and scaled into one local row (the rotated rows of its ``H / g`` groups, back to back), each group
    taken back through the grouped Hadamard (``formats.hadamard.apply_hadamard`` with ``factor`` =
    ``F^T``: the butterflies within each block of ``g d / m`` channels, the ``m x m`` factor as a dense
    sum, the division by ``sqrt(g d)``), its channels returned to their heads (``row[perm[k]] =
    rotated[k]``), then each head to attention's space (RoPE at the token's position, the per-head
    Hadamard for rotated keys); sinks and float tokens are copied from the ring."""
    import math

    from tvm.script import tirx as T

    from finegrain.backends.tvm.kernels.attention import _cached as cached  # the packed rows' element decode

    d, w, cols = lay["d"], lay["words"], lay["cols"]
    window, sinks, unit, ring_rows = lay["window"], lay["sinks"], lay["unit"], lay["ring"]
    span_w, sdt = window + unit, lay["scale"]
    g = lay["head_group"]
    gd, hd = g * d, heads * d
    blk = gd // m  # the power-of-two blocks of the grouped Hadamard
    bstages, stages = int(math.log2(blk)), int(math.log2(d))
    half, rot = max(rope_half, 1), int(rotated)
    f32 = "float32"
    blocks = _fwht_macro(gd, bstages, False)  # the grouped Hadamard's power-of-two part, within blocks of blk
    fwht = _fwht_macro(d, stages, True)

    @T.prim_func(s_tir=True)
    def func(c_h: T.handle, s_h: T.handle, z_h: T.handle, r_h: T.handle, t_h: T.handle, p_h: T.handle,
             f_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        p = T.int64()
        n_tab = T.int64()
        c = T.match_buffer(c_h, (batch, p, heads, w), "int32")
        s = T.match_buffer(s_h, (batch, p, heads, cols), sdt)
        z = T.match_buffer(z_h, (batch, p, heads, cols), "uint8")
        ring = T.match_buffer(r_h, (batch, ring_rows, heads, d), f32)
        tab = T.match_buffer(t_h, (n_tab, 2 * half), f32)
        perm = T.match_buffer(p_h, (hd,), "int64")
        fac = T.match_buffer(f_h, (m, m), f32)
        o = T.match_buffer(o_h, (batch, p, heads, d), f32)
        qu = T.max(p - (window + sinks), T.int64(0)) + sinks
        for task in T.parallel(batch * p):
            x = T.decl_buffer((hd,), f32, scope="local")
            y = T.decl_buffer((hd,), f32, scope="local")
            v = T.decl_buffer((d,), f32, scope="local")
            bi = task // p
            t = task % p
            if T.Or(t < sinks, t >= qu):
                slot = T.if_then_else(t < sinks, t, sinks + (t - sinks) % span_w)
                for h in T.serial(heads):
                    for a in T.vectorized(d):
                        o[bi, t, h, a] = ring[bi, slot, h, a]
            else:
                for h in T.serial(heads):  # virtual head h: channels [h d, (h + 1) d) of the rotated rows
                    for a in T.serial(d):
                        x[h * d + a] = cached(c, s, z, lay, bi, t, h, a)
                for hg in T.serial(heads // g):  # the grouped Hadamard undone, group by group
                    blocks(x, hg * gd)
                    for i in T.serial(m):
                        for jb in T.serial(blk):
                            y[hg * gd + i * blk + jb] = T.float32(0)
                            for k in T.serial(m):
                                y[hg * gd + i * blk + jb] = y[hg * gd + i * blk + jb] + x[hg * gd + k * blk + jb] * fac[k, i]
                for kk in T.serial(hd):  # each channel back to its head
                    x[perm[kk]] = y[kk] / T.float32(math.sqrt(gd))
                for h in T.serial(heads):
                    for a in T.serial(d):
                        v[a] = x[h * d + a]
                    for j in T.serial(half):  # RoPE at the token's position (the rotate_half pairs)
                        v[j] = x[h * d + j] * tab[t, j] - x[h * d + j + half] * tab[t, half + j]
                        v[j + half] = x[h * d + j + half] * tab[t, j] + x[h * d + j] * tab[t, half + j]
                    if rot == 1:  # the per-head Hadamard
                        fwht(v, T.int64(0))
                    for a in T.vectorized(d):
                        o[bi, t, h, a] = v[a]

    return func


# ---- decode's attention over the packed window, read in place ----

FUSED = "kv_wpack_fused_decode"  # node meta: a kv_wpack_read whose decode attention reads the buffers instead


def mark_fused_decode(graph: Graph) -> int:
    """Mark each one-query attention (a decode step, kept for the fused kernel) whose keys and values are
    both a packed window's past (``cat(transpose(kv_wpack_commit(read, ..)), new)``, read by nothing
    else) so that its lowering reads the packed buffers in place (:func:`decode_attention_func`) and the
    write takes its released tokens from the ring: the ``kv_wpack_read`` of the whole past, and the copy
    of it ``kv_wpack_commit`` would update, are then left without readers but ZipCache's saliency (the
    read is then lazy: computed in a releasing step only). Values are read as stored (a value write with
    RoPE, or with per-channel values, is left unmarked); RotateKV's grouped-head keys (per token, pre-RoPE:
    the ones :func:`window_layout` packs) by :func:`grouped_decode_attention_func`. Runs after the empty
    concatenations are dropped (``lower._drop_empty_cat_inputs``: the
    saliency then reads the decoded past through views only). Returns how many attentions were marked."""
    from finegrain.backends.tvm.lower_attention import SDPA
    from finegrain.backends.tvm.lower_cache import cache_parts

    def only_reader(x, user):
        return len(x.users) == 1 and next(iter(x.users)) is user

    marked = 0
    for n in graph.nodes:
        if n.op != "call_function" or n.target is not SDPA:
            continue
        q = n.args[0].meta.get("val") if isinstance(n.args[0], torch.fx.Node) else None
        if q is None or q.dim() != 4 or not isinstance(q.shape[2], int) or q.shape[2] != 1:
            continue
        parts = [cache_parts(x) for x in n.args[1:3]]
        if any(p is None or p[0].target is not KV_WPACK_COMMIT for p in parts):
            continue
        chains = []
        for x, (commit, _new) in zip(n.args[1:3], parts):
            t = next(iter(commit.users)) if len(commit.users) == 1 else None
            chains.append(t is not None and only_reader(t, x) and only_reader(x, n))
        if not all(chains) or parts[1][0].args[6] is not None or parts[1][0].args[8] == "tokens":
            continue
        grouped_ = [len(c.args) > 16 and (c.args[16] is not None or int(c.args[17]) > 1) for c, _ in parts]
        kw = parts[0][0].args
        if grouped_[1] or (grouped_[0] and (kw[8] == "tokens" or kw[6] is None or kw[13] is not None)):
            continue  # RotateKV's grouped heads: pre-RoPE keys per token (the packed ones; their own kernel)
        # the decoded past is then read by nothing but ZipCache's saliency (which computes only in a step that
        # releases a block, and so does the read then: see lower_window's packed_read); the writes take only its length
        reads = [c.args[0] for c, _ in parts]
        if not all(_read_only_by_writes(r) for r in reads):
            continue
        for commit, _new in parts:
            commit.args[0].meta[FUSED] = True
        n.meta[FUSED] = tuple(c.args[0].name for c, _ in parts)
        marked += 1
    return marked


def _read_only_by_writes(read) -> bool:
    """Whether the decoded past ``read`` (a ``kv_wpack_read``) is read only by its window's writes
    (``kv_wpack_rows`` / ``kv_wpack_commit`` / ``kv_window_new``: a fused step's write takes only its
    length, the released tokens from the ring) and by ZipCache's saliency (through views), which reads
    it only in a step that releases a block."""
    from finegrain.compiler.ops import KV_SALIENCY

    views = {torch.ops.aten.transpose.int, torch.ops.aten.permute.default}
    writes = (KV_WPACK_ROWS, KV_WPACK_COMMIT, torch.ops.finegrain.kv_window_new.default)
    todo = list(read.users)
    while todo:
        u = todo.pop()
        if u.target in writes and u.args[0] is read:
            continue
        if u.target is KV_SALIENCY:
            continue
        if u.target in views or (u.target is torch.ops.aten.cat.default and len(u.args[0]) == 1):
            todo += list(u.users)
            continue
        return False
    return True


@memoized
def decode_attention_func(batch: int, heads: int, kv_heads: int, d: int, max_seq_len: int, scale: float,
                          key: dict, value: dict, rope_half: int, rotated: bool):
    """One query per head over a packed windowed cache, read in place (the decode step of a static
    build; ``kernels/attention.packed_decode_attention_func`` is the per-token cache's): the PrimFunc
    ``f(q[B, H, 1, d], kc, ks, kz, kr, kn[B, Hkv, 1, d], ksn, kzn, vc, vs, vz, vr, vn, bias[1, T32],
    rope[P | 1, 2 * half], o[B, H, 1, d])``, each of K and V as this module's four buffers (``kc`` codes,
    ``ks`` / ``kz`` scales and zero points, ``kr`` the ring) **after** the step's commit (the released
    rows written, the new token in the ring) and the new token's attention-space row (``kn``);
    ``ksn`` / ``kzn`` ``[B, n, Hkv, C]``: the key scales / zero points of the ``n`` tokens the step
    released (the commit's span), of which the last, the step's own token's row at ``P``, which the
    runtime writes only after the call, holds some of its unit's per-channel pairs when there is no
    float window. ZipCache's layouts (:func:`zip_layout`) are read too: a per-channel key's pairs by
    its salient flag (the unit's ``2 d`` pairs loaded once, the subset's ``d`` picked when the flag
    changes), values and token-wise keys by their own per-token parameters.

    Past token ``j`` is a sink or float token (a ring row, attention's space) or quantized: its codes
    unpacked and scaled into a local row ``x`` in the space it was quantized in (per-channel keys: the
    group's parameters loaded into locals once per group). Pre-RoPE keys are ``k = H R_j H x`` (``H``
    the per-head Hadamard / sqrt(d), rotated keys; else ``k = R_j x``): the score ``q . k`` is computed as
    ``(H q) . R_j (H x)`` with the queries rotated once per task, so each key costs one FWHT (the
    8-lane blocks by an 8 x 8 Hadamard product, the longer strides as vector butterflies) and its RoPE,
    shared by the ``H / Hkv`` query heads reading it. Softmax and the weighted sum of values are the
    other kernels' (``kernels/attention.py``), split over the past the same way (``_split_decode``:
    one parallel item per K / V head and chunk of keys, then a merge with the new key)."""
    import math

    from tvm import tirx
    from tvm.script import tirx as T

    from finegrain.backends.tvm.kernels.attention import (DECODE_SPLITS, LANES, _check_heads, _dot8, _split_decode,
                                                          _unpack_row, chunk_scores, decode_chunk, padded_keys)

    _check_heads(heads, kv_heads, d)
    for lay in (key, value):
        if lay["d"] != d:
            raise ValueError(f"packed window attention: layout for head dim {lay['d']}, kernel for {d}")
    if rotated and (d & (d - 1) or d < LANES):
        raise ValueError(f"packed window attention: rotated keys need a power-of-two head dim >= {LANES}, got {d}")
    row = padded_keys(max_seq_len)
    group = heads // kv_heads
    nv = d // LANES
    neg_inf = tirx.const(-math.inf, "float32")
    f32 = "float32"
    chunks = DECODE_SPLITS
    open_chunk, close_chunk, add_value, store_chunk, merge = _split_decode(batch, kv_heads, group, d, scale, row)
    roped, rot = int(rope_half > 0), int(rotated and rope_half > 0)
    half = max(rope_half, 1)
    half_vec = half % LANES == 0
    ktok = key["spread"]
    kw, kcols, kzcols, klo = key["words"], key["cols"], key["zcols"], float(key["lo"])
    kunit, kpairs = key["unit"], key["pairs"]
    krows = kpairs // kcols  # rows of a unit holding its parameter pairs
    kflag = int(kzcols > kcols)  # ZipCache's per-channel keys: a token's salient flag picks its subset's pairs
    unpack_key, value_row = _unpack_row(key), _value_row_macro(value)
    # per-channel keys: element a's code plus the group's offset gz[a] (lo - zero), times its scale gs[a]
    unpack_channels = _unpack_row(key, lambda u, a, grp, s, z, bi, j, kh: (u.astype(f32) + z[a]) * s[a])
    vtok = value["spread"]
    if vtok:
        raise ValueError("packed window attention: values quantized per channel over tokens are not read in place")

    def quantized_until(lay, p):  # after this step's write of one token
        return kv_quantized_until(p + 1, lay["axis"], lay["unit"], lay["window"], lay["sinks"], T.max)

    def slot(lay, j):
        return ring_row(j, lay, T.if_then_else)

    fill_h8, fwht = _fwht8_macros(d)  # v[base:base + d] <- H v (unnormalized)

    @T.prim_func(s_tir=True)
    def func(q_h: T.handle, kc_h: T.handle, ks_h: T.handle, kz_h: T.handle, kr_h: T.handle, kn_h: T.handle,
             ksn_h: T.handle, kzn_h: T.handle, vc_h: T.handle, vs_h: T.handle, vz_h: T.handle, vr_h: T.handle,
             vn_h: T.handle, bias_h: T.handle, t_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        p = T.int64()
        t32 = T.int64()
        n_tab = T.int64()
        ns = T.int64()
        q = T.match_buffer(q_h, (batch, heads, 1, d), f32)
        kc = T.match_buffer(kc_h, (batch, p, kv_heads, kw), "int32")
        ks = T.match_buffer(ks_h, (batch, p, kv_heads, kcols), key["scale"])
        kz = T.match_buffer(kz_h, (batch, p, kv_heads, kzcols), "uint8")
        kr = T.match_buffer(kr_h, (batch, key["ring"], kv_heads, d), f32)
        kn = T.match_buffer(kn_h, (batch, kv_heads, 1, d), f32)
        ksn = T.match_buffer(ksn_h, (batch, ns, kv_heads, kcols), key["scale"])
        kzn = T.match_buffer(kzn_h, (batch, ns, kv_heads, kzcols), "uint8")
        vc = T.match_buffer(vc_h, (batch, p, kv_heads, value["words"]), "int32")
        vs = T.match_buffer(vs_h, (batch, p, kv_heads, value["cols"]), value["scale"])
        vz = T.match_buffer(vz_h, (batch, p, kv_heads, value["cols"]), "uint8")
        vr = T.match_buffer(vr_h, (batch, value["ring"], kv_heads, d), f32)
        vn = T.match_buffer(vn_h, (batch, kv_heads, 1, d), f32)
        bias = T.match_buffer(bias_h, (1, t32), f32)
        tab = T.match_buffer(t_h, (n_tab, 2 * half), f32)
        o = T.match_buffer(o_h, (batch, heads, 1, d), f32)
        assert t32 <= row, "attention kernel: sequence longer than the max_seq_len it was built for"
        assert p + 1 <= t32, "attention kernel: keys padded to fewer than the key count"
        kqu = quantized_until(key, p)
        vqu = quantized_until(value, p)
        chunk = decode_chunk(p, row)
        nc = (p + chunk - T.int64(1)) // chunk
        pm = T.decl_buffer((batch * kv_heads * chunks * group,), f32)
        pl = T.decl_buffer((batch * kv_heads * chunks * group,), f32)
        po = T.decl_buffer((batch * kv_heads * chunks * group * d,), f32)
        for item in T.parallel(batch * kv_heads * nc):
            sc = T.decl_buffer((group * row,), f32, scope="local")
            out = T.decl_buffer((group * d,), f32, scope="local")
            part = T.decl_buffer((LANES,), f32, scope="local")
            red = T.decl_buffer((LANES,), f32, scope="local")
            tmp = T.decl_buffer((LANES,), f32, scope="local")
            h8 = T.decl_buffer((LANES * LANES,), f32, scope="local")
            qt = T.decl_buffer((group * d,), f32, scope="local")
            x = T.decl_buffer((d,), f32, scope="local")
            words = T.decl_buffer((LANES,), "int32", scope="local")
            y = T.decl_buffer((d,), f32, scope="local")
            gs = T.decl_buffer((kpairs,), f32, scope="local")
            gz = T.decl_buffer((kpairs,), f32, scope="local")
            ts = T.decl_buffer((d,), f32, scope="local")
            tz = T.decl_buffer((d,), f32, scope="local")
            cur = T.decl_buffer((2,), "int64", scope="local")
            tot = T.decl_buffer((2,), f32, scope="local")
            task = item // nc
            bi = task // kv_heads
            kh = task % kv_heads
            at = (task * chunks + item % nc) * group
            j0 = item % nc * chunk
            cur[0] = T.int64(-1)
            # the queries in the keys' rotated space: (H q) / d (both Hadamards' 1 / sqrt(d))
            for g in T.serial(group):
                for a in T.vectorized(d):
                    qt[g * d + a] = q[bi, kh * group + g, 0, a]
            if rot == 1:
                fill_h8(h8)
                for g in T.serial(group):
                    fwht(qt, g * d, tmp, h8)
                    for a in T.vectorized(d):
                        qt[g * d + a] = qt[g * d + a] * T.float32(1.0 / d)
            # 1. scores of this chunk's keys: a ring row as it is, or a quantized key taken to the queries'
            # space once (-inf: masked, or past the end)
            n = chunk_scores(p, j0, chunk)
            open_chunk(sc, n)
            for jj in T.serial(T.min(chunk, p - j0)):
                j = j0 + jj
                if bias[0, j] > neg_inf:
                    if T.Or(j < key["sinks"], j >= kqu):
                        for g in T.serial(group):
                            for lane in T.vectorized(LANES):
                                part[lane] = T.float32(0)
                            for dv in T.serial(nv):
                                for lane in T.vectorized(LANES):
                                    part[lane] = part[lane] + q[bi, kh * group + g, 0, dv * LANES + lane] * kr[
                                        bi, slot(key, j), kh, dv * LANES + lane]
                            sc[g * row + jj] = _dot8(part) * T.float32(scale) + bias[0, j]
                    else:
                        if ktok:  # the group's per-channel parameters, spread over its rows, loaded once per group
                            # (a row at P, the step's own token's, not written yet: from the released span's rows)
                            if cur[0] != (j - key["sinks"]) // kunit:
                                cur[0] = (j - key["sinks"]) // kunit
                                cur[1] = T.int64(-1)
                                for r in T.serial(krows):
                                    ra = key["sinks"] + cur[0] * kunit + r  # the row holding pairs r * kcols ..
                                    for cc in T.serial(kcols):
                                        gs[r * kcols + cc] = T.Cast(f32, T.if_then_else(
                                            ra < p, ks[bi, T.min(ra, p - 1), kh, cc],
                                            ksn[bi, T.max(ra - (p + 1 - ns), 0), kh, cc]))
                                        gz[r * kcols + cc] = T.float32(klo) - T.Cast(f32, T.if_then_else(
                                            ra < p, kz[bi, T.min(ra, p - 1), kh, cc],
                                            kzn[bi, T.max(ra - (p + 1 - ns), 0), kh, cc]))
                            if kflag == 1:  # ZipCache: the salient subset's d pairs first, then the others'
                                if cur[1] != T.Cast("int64", kz[bi, j, kh, kcols]):
                                    cur[1] = T.Cast("int64", kz[bi, j, kh, kcols])
                                    for a in T.vectorized(d):
                                        ts[a] = gs[(T.int64(1) - cur[1]) * d + a]
                                        tz[a] = gz[(T.int64(1) - cur[1]) * d + a]
                                unpack_channels(x, kc, ts, tz, bi, j, kh, words)
                            else:
                                unpack_channels(x, kc, gs, gz, bi, j, kh, words)
                        else:
                            unpack_key(x, kc, ks, kz, bi, j, kh, words)
                        if roped == 1:
                            if rot == 1:
                                fwht(x, T.int64(0), tmp, h8)
                            for a in T.vectorized(d):
                                y[a] = x[a]
                            if half_vec:
                                for jo in T.serial(half // LANES):
                                    for lane in T.vectorized(LANES):
                                        y[jo * LANES + lane] = x[jo * LANES + lane] * tab[j, jo * LANES + lane] - x[
                                            half + jo * LANES + lane] * tab[j, half + jo * LANES + lane]
                                        y[half + jo * LANES + lane] = x[half + jo * LANES + lane] * tab[
                                            j, jo * LANES + lane] + x[jo * LANES + lane] * tab[j, half + jo * LANES + lane]
                            else:
                                for jo in T.serial(half):
                                    y[jo] = x[jo] * tab[j, jo] - x[half + jo] * tab[j, half + jo]
                                    y[half + jo] = x[half + jo] * tab[j, jo] + x[jo] * tab[j, half + jo]
                        else:
                            for a in T.vectorized(d):
                                y[a] = x[a]
                        for g in T.serial(group):
                            for lane in T.vectorized(LANES):
                                part[lane] = T.float32(0)
                            for dv in T.serial(nv):
                                for lane in T.vectorized(LANES):
                                    part[lane] = part[lane] + qt[g * d + dv * LANES + lane] * y[dv * LANES + lane]
                            sc[g * row + jj] = _dot8(part) * T.float32(scale) + bias[0, j]
            # 2. max, exp, sum; 3. probabilities times V: each value read once (ring row or codes), added into
            # every query head
            close_chunk(sc, red, tot, pm, pl, out, at, n)
            for jj in T.serial(T.min(chunk, p - j0)):
                j = j0 + jj
                value_row(x, vc, vs, vz, vr, bi, j, kh, words, vqu)
                add_value(out, sc, x, bi, j, kh, jj)
            store_chunk(out, po, at)
        # 4. the chunks and the new key merged
        merge(q, kn, vn, bias, o, pm, pl, po, p, nc)

    return func


@memoized
def grouped_decode_attention_func(batch: int, heads: int, kv_heads: int, d: int, max_seq_len: int, scale: float,
                                  key: dict, value: dict, rope_half: int, rotated: bool, m: int):
    """:func:`decode_attention_func` over RotateKV's grouped-head keys (``key["head_group"]`` = ``g``),
    read in place: the PrimFunc ``f(q, kc, ks, kz, kr, kn, ksn, kzn, vc, vs, vz, vr, vn, bias, rope,
    perm[Hkv * d], factor[m, m], o)`` (``perm`` and ``factor`` as :func:`grouped_read_func`'s). A key
    head's channels come from its group's whole rotated row (and, reordered, from any group's), so one
    work item takes all ``Hkv`` heads of a chunk of cached keys (``_split_decode``'s ``per_task``):
    each quantized token's ``Hkv`` virtual heads are unpacked into one local row once, every group
    taken back through the grouped Hadamard (the butterflies within blocks of ``g d / m`` channels,
    8 lanes at a time; the ``m x m`` factor as a sum of vectors), the channels returned to their heads
    (``perm``), then each head's RoPE at the token's position, its scores for the query heads reading
    it; the per-head Hadamard of rotated keys and the grouped Hadamard's ``1 / sqrt(g d)`` are applied
    to the queries once per item instead. Values are per head (:func:`decode_attention_func`'s);
    ``ksn`` / ``kzn`` are unused (per-token keys: a token's row holds its own parameters). Chunks of at
    least 64 keys (a decode step then has one item per 64 cached keys, up to ``DECODE_SPLITS``)."""
    import math

    from tvm import tirx
    from tvm.script import tirx as T

    from finegrain.backends.tvm.kernels.attention import (DECODE_SPLITS, KEY_BLOCK, LANES, _check_heads, _dot8,
                                                          _split_decode, _unpack_row, chunk_scores, padded_keys)

    _check_heads(heads, kv_heads, d)
    g = key.get("head_group")
    if not g or key["spread"] or value["spread"]:
        raise ValueError("grouped packed window attention: keys in RotateKV's grouped heads, per token (and values "
                         "per token) only")
    for lay in (key, value):
        if lay["d"] != d:
            raise ValueError(f"packed window attention: layout for head dim {lay['d']}, kernel for {d}")
    gd, hd = g * d, kv_heads * d
    blk = gd // m  # the grouped Hadamard's power-of-two blocks
    if kv_heads % g or gd % m or blk & (blk - 1) or blk < LANES or (rotated and (d & (d - 1) or d < LANES)):
        raise ValueError(f"grouped packed window attention: {kv_heads} heads in groups of {g}, blocks of {blk} "
                         f"channels (powers of two >= {LANES} needed)")
    row = padded_keys(max_seq_len)
    group = heads // kv_heads
    nv = d // LANES
    neg_inf = tirx.const(-math.inf, "float32")
    f32 = "float32"
    chunks = DECODE_SPLITS
    open_chunk, close_chunk, add_value, store_chunk, merge = _split_decode(batch, 1, heads, d, scale, row,
                                                                           per_task=kv_heads)
    if rope_half < 1 or 2 * rope_half > d:
        raise ValueError(f"grouped packed window attention: pre-RoPE keys need RoPE pairs within the head dim {d}")
    rot = int(rotated)
    half = rope_half
    half_vec = half % LANES == 0
    qscale = 1.0 / math.sqrt(gd) / (math.sqrt(d) if rot else 1.0)  # the Hadamards' normalizations, on the queries
    unpack_key, value_row = _unpack_row(key), _value_row_macro(value)

    def quantized_until(lay, p):  # after this step's write of one token
        return kv_quantized_until(p + 1, lay["axis"], lay["unit"], lay["window"], lay["sinks"], T.max)

    def slot(lay, j):
        return ring_row(j, lay, T.if_then_else)

    (fill_h8, fwht_d), (_, fwht_blk) = _fwht8_macros(d), _fwht8_macros(blk)

    def chunk_of(p):  # keys per item: p / DECODE_SPLITS rounded up to 32, at least 64, at most row
        step = DECODE_SPLITS * KEY_BLOCK
        return tirx.min(tirx.const(row, "int64"), tirx.max(tirx.const(64, "int64"), (p + step - 1) // step * KEY_BLOCK))

    @T.prim_func(s_tir=True)
    def func(q_h: T.handle, kc_h: T.handle, ks_h: T.handle, kz_h: T.handle, kr_h: T.handle, kn_h: T.handle,
             ksn_h: T.handle, kzn_h: T.handle, vc_h: T.handle, vs_h: T.handle, vz_h: T.handle, vr_h: T.handle,
             vn_h: T.handle, bias_h: T.handle, t_h: T.handle, p_h: T.handle, f_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        p = T.int64()
        t32 = T.int64()
        n_tab = T.int64()
        ns = T.int64()
        q = T.match_buffer(q_h, (batch, heads, 1, d), f32)
        kc = T.match_buffer(kc_h, (batch, p, kv_heads, key["words"]), "int32")
        ks = T.match_buffer(ks_h, (batch, p, kv_heads, key["cols"]), key["scale"])
        kz = T.match_buffer(kz_h, (batch, p, kv_heads, key["zcols"]), "uint8")
        kr = T.match_buffer(kr_h, (batch, key["ring"], kv_heads, d), f32)
        kn = T.match_buffer(kn_h, (batch, kv_heads, 1, d), f32)
        ksn = T.match_buffer(ksn_h, (batch, ns, kv_heads, key["cols"]), key["scale"])  # noqa: F841 - unused
        kzn = T.match_buffer(kzn_h, (batch, ns, kv_heads, key["zcols"]), "uint8")  # noqa: F841 - unused
        vc = T.match_buffer(vc_h, (batch, p, kv_heads, value["words"]), "int32")
        vs = T.match_buffer(vs_h, (batch, p, kv_heads, value["cols"]), value["scale"])
        vz = T.match_buffer(vz_h, (batch, p, kv_heads, value["cols"]), "uint8")
        vr = T.match_buffer(vr_h, (batch, value["ring"], kv_heads, d), f32)
        vn = T.match_buffer(vn_h, (batch, kv_heads, 1, d), f32)
        bias = T.match_buffer(bias_h, (1, t32), f32)
        tab = T.match_buffer(t_h, (n_tab, 2 * half), f32)
        perm = T.match_buffer(p_h, (hd,), "int64")
        fac = T.match_buffer(f_h, (m, m), f32)
        o = T.match_buffer(o_h, (batch, heads, 1, d), f32)
        assert t32 <= row, "attention kernel: sequence longer than the max_seq_len it was built for"
        assert p + 1 <= t32, "attention kernel: keys padded to fewer than the key count"
        kqu = quantized_until(key, p)
        vqu = quantized_until(value, p)
        chunk = chunk_of(p)
        nc = (p + chunk - T.int64(1)) // chunk
        pm = T.decl_buffer((batch * chunks * heads,), f32)
        pl = T.decl_buffer((batch * chunks * heads,), f32)
        po = T.decl_buffer((batch * chunks * heads * d,), f32)
        for item in T.parallel(batch * nc):
            sc = T.decl_buffer((heads * row,), f32, scope="local")
            out = T.decl_buffer((heads * d,), f32, scope="local")
            part = T.decl_buffer((LANES,), f32, scope="local")
            red = T.decl_buffer((LANES,), f32, scope="local")
            tmp = T.decl_buffer((LANES,), f32, scope="local")
            h8 = T.decl_buffer((LANES * LANES,), f32, scope="local")
            qt = T.decl_buffer((heads * d,), f32, scope="local")
            x = T.decl_buffer((hd,), f32, scope="local")
            y = T.decl_buffer((hd,), f32, scope="local")
            ip = T.decl_buffer((hd,), "int64", scope="local")
            u = T.decl_buffer((d,), f32, scope="local")
            words = T.decl_buffer((LANES,), "int32", scope="local")
            tot = T.decl_buffer((2,), f32, scope="local")
            bi = item // nc
            at = (bi * chunks + item % nc) * heads
            j0 = item % nc * chunk
            fill_h8(h8)
            for kk in T.serial(hd):  # the channel order inverted: head channel a is rotated channel ip[a]
                ip[perm[kk]] = kk
            # the queries in the keys' space: H q / sqrt(d) for rotated keys, and the grouped Hadamard's 1 / sqrt(g d)
            for hq in T.serial(heads):
                for a in T.vectorized(d):
                    qt[hq * d + a] = q[bi, hq, 0, a]
                if rot == 1:
                    fwht_d(qt, hq * d, tmp, h8)
                for a in T.vectorized(d):
                    qt[hq * d + a] = qt[hq * d + a] * T.float32(qscale)
            n = chunk_scores(p, j0, chunk)
            open_chunk(sc, n)
            for jj in T.serial(T.min(chunk, p - j0)):
                j = j0 + jj
                if bias[0, j] > neg_inf:
                    if T.Or(j < key["sinks"], j >= kqu):  # a ring row: each head's key in attention's space
                        for hq in T.serial(heads):
                            for lane in T.vectorized(LANES):
                                part[lane] = T.float32(0)
                            for dv in T.serial(nv):
                                for lane in T.vectorized(LANES):
                                    part[lane] = part[lane] + q[bi, hq, 0, dv * LANES + lane] * kr[
                                        bi, slot(key, j), hq // group, dv * LANES + lane]
                            sc[hq * row + jj] = _dot8(part) * T.float32(scale) + bias[0, j]
                    else:
                        for vh in T.serial(kv_heads):  # the rotated rows (virtual heads), back to back
                            unpack_key(u, kc, ks, kz, bi, j, vh, words)
                            for a in T.vectorized(d):
                                x[vh * d + a] = u[a]
                        for hg in T.serial(kv_heads // g):  # each group's Hadamard undone (unnormalized)
                            for i in T.serial(m):
                                fwht_blk(x, hg * gd + i * blk, tmp, h8)
                            for i in T.serial(m):
                                for jb in T.vectorized(blk):
                                    y[hg * gd + i * blk + jb] = T.float32(0)
                                for k in T.serial(m):
                                    for jb in T.vectorized(blk):
                                        y[hg * gd + i * blk + jb] = y[hg * gd + i * blk + jb] + x[
                                            hg * gd + k * blk + jb] * fac[k, i]
                        for kh in T.serial(kv_heads):  # each head's channels gathered, RoPE at the token's position
                            if half_vec:
                                for jo in T.serial(half // LANES):
                                    for lane in T.vectorized(LANES):
                                        u[jo * LANES + lane] = y[ip[kh * d + jo * LANES + lane]] * tab[
                                            j, jo * LANES + lane] - y[ip[kh * d + half + jo * LANES + lane]] * tab[
                                            j, half + jo * LANES + lane]
                                        u[half + jo * LANES + lane] = y[ip[kh * d + half + jo * LANES + lane]] * tab[
                                            j, jo * LANES + lane] + y[ip[kh * d + jo * LANES + lane]] * tab[
                                            j, half + jo * LANES + lane]
                            else:
                                for jo in T.serial(half):
                                    u[jo] = y[ip[kh * d + jo]] * tab[j, jo] - y[ip[kh * d + half + jo]] * tab[
                                        j, half + jo]
                                    u[half + jo] = y[ip[kh * d + half + jo]] * tab[j, jo] + y[ip[kh * d + jo]] * tab[
                                        j, half + jo]
                            for a in T.serial(d - 2 * half):  # channels past the rotary ones (partial RoPE)
                                u[2 * half + a] = y[ip[kh * d + 2 * half + a]]
                            for g0 in T.serial(group):
                                for lane in T.vectorized(LANES):
                                    part[lane] = T.float32(0)
                                for dv in T.serial(nv):
                                    for lane in T.vectorized(LANES):
                                        part[lane] = part[lane] + qt[(kh * group + g0) * d + dv * LANES + lane] * u[
                                            dv * LANES + lane]
                                sc[(kh * group + g0) * row + jj] = _dot8(part) * T.float32(scale) + bias[0, j]
            close_chunk(sc, red, tot, pm, pl, out, at, n)
            for jj in T.serial(T.min(chunk, p - j0)):
                j = j0 + jj
                for kh in T.serial(kv_heads):
                    value_row(u, vc, vs, vz, vr, bi, j, kh, words, vqu)
                    add_value(out, sc, u, bi, j, kh, jj)
            store_chunk(out, po, at)
        merge(q, kn, vn, bias, o, pm, pl, po, p, nc)

    return func
