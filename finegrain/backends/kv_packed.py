"""Packed storage of a quantized KV cache for the reference backend (issue #17: "packed storage in
the cache").

``passes/quantize_kv.py`` writes each present as ``cat(past, dequantize(quantize(new)))``: the
values are the format's, but a backend that keeps the presents as they come out stores them in
fp32. :func:`lower` rewrites a session's copy of the graph (the compiled graph, the contract
between backends, is not touched) so that each such present becomes

    packed = kv_packed_append(past, codes, scale, zero, fmt)   # the new tokens' codes bit-packed
    keys   = kv_packed_read(packed)                            # what attention reads (fp32)

``past`` and the graph output are :class:`PackedKV` records: codes bit-packed along the head dim
(``formats/packing.py``, the artifacts' layout), the scales in the format's stored dtype (fp16,
E8M0 ...; ``formats/scales.py``) and asymmetric zero points packed at the format's metadata bits.
So the cache the session carries between steps holds exactly the bytes ``report["kv_cache"]``
counts (:attr:`PackedKV.nbytes`), and what attention reads is bit-identical to the float-stored
cache: ``dequantize(quantize(x))`` is unchanged by storing its codes.

Packed: integer / FP8 formats per token or in groups along the head dim (plain, RotateKV's rotated
cache, per-layer KVTuner formats) and static ones with one calibrated scale per layer (vLLM's FP8
cache: the codes alone) as :class:`PackedKV`; ``kv_append`` writes (KIVI's per-channel
keys, float windows, sinks, pre-RoPE keys, RotateKV's grouped-head reordered keys) as
:class:`WindowedKV` (sinks and the newest tokens fp32, the rest packed, pre-RoPE keys stored before
RoPE, grouped-head keys as the codes of their rotated space); ZipCache's mixed-precision writes as
:class:`ZipKV` (a salient bit per token, the salient and the other tokens' codes in their two
formats, the channel normalizers; its saliency op reads the packed key past's fp32 read); keys coded in
their calibrated Karhunen-Loeve basis (``kv_key_klt``) as :class:`KltKV` (one record per component width:
codes packed at that width over the components of all heads, fp16 scales and zero points per group of
tokens; dropped components store nothing). Left in
fp32, and said so by :func:`lower`'s ``skipped`` list: formats with a second-level scale or a
codebook. The cost is the reference's: every step dequantizes the whole packed past
(the memory is the packed bytes plus one layer's fp32 K / V while attention runs).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import torch
from torch.fx import Graph, GraphModule, Node

from finegrain.compiler.ir import get_tensor
from finegrain.compiler.recipe import kv_static
from finegrain.formats import QuantFormat, scales
from finegrain.formats.base import QTensor
from finegrain.compiler.ops import (KV_APPEND, KV_SALIENCY, zip_block_format, zip_channel_norm, zip_salient,
                                    zip_subset_rows)
from finegrain.formats.ops import DEQUANTIZE, QUANTIZE, _fmt
from finegrain.formats.packing import pack, packed_row_bytes, unpack


def _empty_parts(f: QuantFormat, lead: tuple, params: int, head_dim: int) -> tuple:
    """Empty (codes, scales, zero points) rows of ``f`` with ``params`` scales per row."""
    sdt = scales.stored_scale(f, QTensor(torch.zeros(0), torch.ones(1), torch.zeros(1))).dtype
    zbytes = 0 if f.symmetric else packed_row_bytes(params, f.family.metadata_bits(f))
    return (torch.zeros(*lead, 0, packed_row_bytes(head_dim, f.bits), dtype=torch.uint8),
            torch.zeros(*lead, 0, params, dtype=sdt), torch.zeros(*lead, 0, zbytes, dtype=torch.uint8))


@dataclass(frozen=True)
class PackedKV:
    """One layer's keys (or values) in ``fmt``: ``codes`` uint8 ``[B, H, T, ceil(D * bits / 8)]``,
    ``scale`` ``[B, H, T, groups]`` in the stored scale dtype, ``zero`` uint8
    ``[B, H, T, ceil(groups * bits / 8)]`` (empty last dim for symmetric formats); a static format
    (one calibrated scale per layer) keeps its ``scale`` ``[1]`` once (empty before the first write)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    fmt: str
    head_dim: int

    @classmethod
    def empty(cls, fmt: str, batch: int, heads: int, head_dim: int) -> "PackedKV":
        f = _fmt(fmt)
        if not f.dynamic:
            codes = _empty_parts(f, (batch, heads), 0, head_dim)[0]
            return cls(codes, torch.zeros(0), torch.zeros(0, dtype=torch.uint8), fmt, head_dim)
        groups = f.num_groups(head_dim)
        return cls(*_empty_parts(f, (batch, heads), groups, head_dim), fmt, head_dim)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the fp32 cache this stands for."""
        b, h, t, _ = self.codes.shape
        return b, h, t, self.head_dim

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def dequantize(self) -> torch.Tensor:
        f = _fmt(self.fmt)
        if not self.codes.shape[2]:
            return torch.zeros(self.shape)
        q = _unpack_parts(f, self.codes, self.scale, self.zero, self.head_dim, self.scale.shape[-1])
        return f.dequantize(q, torch.float32)


def _pack_parts(f: QuantFormat, q: QTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bit-packed codes, stored scales, bit-packed zero points) of ``q``, packed along the last dim."""
    zero = (pack(q.zero.to(torch.uint8), f.family.metadata_bits(f), False) if not f.symmetric
            else q.zero.new_zeros((*q.zero.shape[:-1], 0), dtype=torch.uint8))
    return pack(q.codes, f.bits, f.signed), scales.stored_scale(f, q), zero


def _unpack_parts(f: QuantFormat, codes, scale, zero, head_dim: int, params: int) -> QTensor:
    s = scales.load_scale(f, scale, None)
    z = (torch.zeros(s.shape, dtype=torch.int32) if f.symmetric
         else unpack(zero, f.family.metadata_bits(f), False, params).to(torch.int32))
    return QTensor(unpack(codes, f.bits, f.signed, head_dim), s, z)


class _SinksAndTail:
    """What the two windowed records share: fp32 ``sinks`` first and ``tail`` last around the packed
    tokens, and pre-RoPE keys (``inv_freq``, ``rotated``) stored before RoPE."""

    @property
    def head_dim(self) -> int:
        return self.tail.shape[-1]

    def _transform(self, x: torch.Tensor, start: int, inverse: bool) -> torch.Tensor:
        if self.inv_freq is None:
            return x
        from finegrain.compiler.ops import _hadamard, _rope

        x = _rope(_hadamard(x) if self.rotated else x, start, self.inv_freq, inverse=inverse)
        return _hadamard(x) if self.rotated else x

    def _grow(self, new: torch.Tensor, n_sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sinks, tail) with ``new`` appended: the first ``n_sinks`` tokens of the cache to the sinks."""
        take = max(0, min(n_sinks - self.sinks.shape[2], new.shape[2]))
        sinks = torch.cat([self.sinks, new[:, :, :take].to(self.sinks.dtype)], 2) if take else self.sinks
        return sinks, torch.cat([self.tail, new[:, :, take:].to(self.tail.dtype)], 2)

    def with_rope(self, inv_freq: torch.Tensor | None, rotated: bool):
        """This record reading its graph's RoPE constants (they are not part of the session's state)."""
        if self.inv_freq is inv_freq and self.rotated == rotated:
            return self
        return replace(self, inv_freq=inv_freq, rotated=bool(rotated))


@dataclass(frozen=True)
class WindowedKV(_SinksAndTail):
    """A ``finegrain::kv_append`` cache (KIVI / RotateKV settings) stored packed: the first
    ``sinks`` tokens fp32, then the quantized tokens (``codes`` bit-packed along the head dim;
    ``axis="head_dim"``: ``scale`` / ``zero`` per token and head-dim group; ``axis="tokens"``: per
    group of G tokens and channel, ``[B, H, n / G, D]``), then the newest tokens fp32 (``tail``: the
    float window, plus up to G - 1 tokens waiting for their group to fill). Pre-RoPE keys
    (``inv_freq``) are stored before RoPE and rotated back on read, as ``kv_append`` does; RotateKV's
    grouped-head keys (``perm`` / ``head_group``) as the codes of their grouped rotated space,
    ``[B, H / g, n, g * D]`` (since 2026-12-06; they were kept fp32 before)."""

    sinks: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    tail: torch.Tensor
    fmt: str
    axis: str
    window: int
    n_sinks: int
    inv_freq: torch.Tensor | None = None
    rotated: bool = False
    perm: torch.Tensor | None = None  # RotateKV's grouped heads: the channel order, heads per group
    head_group: int = 1

    @classmethod
    def empty(cls, spec: dict, batch: int, heads: int, head_dim: int) -> "WindowedKV":
        f = _fmt(spec["fmt"])
        z = torch.zeros(batch, heads, 0, head_dim)
        g = int(spec.get("head_group", 1))
        if spec.get("grouped"):  # RotateKV: codes of each group of g heads over its g * D rotated channels
            parts = _empty_parts(f, (batch, heads // g), f.num_groups(g * head_dim), g * head_dim)
        else:  # axis "tokens": one (scale, zero) per channel and group of G tokens, rows of D
            params = head_dim if spec["axis"] == "tokens" else f.num_groups(head_dim)
            parts = _empty_parts(f, (batch, heads), params, head_dim)
        return cls(z, *parts, z, spec["fmt"], spec["axis"], spec["window"], spec["sinks"], head_group=g)

    @property
    def grouped(self) -> bool:
        """RotateKV's grouped-head keys (``kv_append``'s ``perm`` / ``head_group``, pre-RoPE only)."""
        return self.inv_freq is not None and (self.perm is not None or self.head_group > 1)

    def _transform(self, x: torch.Tensor, start: int, inverse: bool) -> torch.Tensor:
        """Pre-RoPE keys to the space they are quantized in (``inverse``) or back, as ``kv_append`` moves
        them: per head (Hadamard, RoPE, Hadamard), or RotateKV's grouped heads (Hadamard, RoPE, then the
        grouped-head rotation, ``[B, H / g, n, g * D]``)."""
        if not self.grouped:
            return super()._transform(x, start, inverse)
        from finegrain.compiler.ops import _from_head_groups, _hadamard, _rope, _to_head_groups

        if inverse:
            x = _rope(_hadamard(x) if self.rotated else x, start, self.inv_freq, inverse=True)
            return _to_head_groups(x, self.perm, self.head_group)
        x = _rope(_from_head_groups(x, self.perm, self.sinks.shape[1]), start, self.inv_freq, inverse=False)
        return _hadamard(x) if self.rotated else x

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, s, d = self.sinks.shape
        return b, h, s + self.codes.shape[2] + self.tail.shape[2], d

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sinks, self.codes, self.scale, self.zero, self.tail))

    def dequantize(self) -> torch.Tensor:
        f = _fmt(self.fmt)
        d = self.head_dim
        if not self.codes.shape[2]:  # nothing has left the window yet
            return torch.cat([self.sinks, self.tail], 2)
        if self.grouped:  # codes over each group of heads' rotated channels
            gd = self.head_group * d
            body = f.dequantize(_unpack_parts(f, self.codes, self.scale, self.zero, gd, f.num_groups(gd)), torch.float32)
        elif self.axis == "tokens":
            q = _unpack_parts(f, self.codes, self.scale, self.zero, d, d)
            body = f.dequantize(QTensor(*(t.transpose(2, 3).contiguous() for t in q[:3])), torch.float32)
            body = body.transpose(2, 3)
        else:
            params = f.num_groups(d)
            body = f.dequantize(_unpack_parts(f, self.codes, self.scale, self.zero, d, params), torch.float32)
        body = self._transform(body, self.n_sinks, inverse=False)
        return torch.cat([self.sinks, body.to(self.tail.dtype), self.tail], 2)

    def append(self, new: torch.Tensor) -> "WindowedKV":
        """The cache after ``kv_append`` writes ``new``: the tokens leaving the window quantized once."""
        from finegrain.compiler.ops import kv_quantized_span

        f = _fmt(self.fmt)
        t0 = self.shape[2]
        sinks, tail = self._grow(new, self.n_sinks)
        a, b = kv_quantized_span(self.axis, f.group_size or 1, t0, t0 + new.shape[2], self.window, self.n_sinks)
        codes, scale, zero = self.codes, self.scale, self.zero
        if a < b:  # the tail starts at token a (the first not yet quantized after the sinks)
            seg = self._transform(tail[:, :, :b - a].float(), a, inverse=True)
            tail = tail[:, :, b - a:]
            if self.axis == "tokens":  # per channel over groups of G tokens, stored token-major
                q = f.quantize(seg.transpose(2, 3).contiguous())
                parts = _pack_parts(f, QTensor(*(t.transpose(2, 3).contiguous() for t in q[:3])))
            else:
                parts = _pack_parts(f, f.quantize(seg))
            codes, scale, zero = (torch.cat([old, p], 2) for old, p in zip((codes, scale, zero), parts))
        return replace(self, sinks=sinks, codes=codes, scale=scale, zero=zero, tail=tail.contiguous())


@dataclass(frozen=True)
class KltKV(_SinksAndTail):
    """A ``kv_append`` cache of keys coded in their calibrated Karhunen-Loeve basis (``kv_key_klt``)
    stored packed: the sinks fp32, then the released tokens' components, one record per width ``w``
    in ``classes`` (``(w, m)``: the ``m`` components of all heads, head-major, at ``w`` bits): codes
    bit-packed along those components ``[B, n, ceil(m * w / 8)]``, per group of G tokens an fp16 scale
    ``[B, n / G, m]`` and a zero point packed at ``w`` bits; components of width 0 store nothing (their
    mean); then the newest tokens fp32 (``tail``). Decoded as ``kv_append`` computes them: the same
    components, the basis back, RoPE."""

    sinks: torch.Tensor
    parts: tuple
    coded: int
    tail: torch.Tensor
    fmt: str
    window: int
    n_sinks: int
    classes: tuple
    inv_freq: torch.Tensor | None = None
    rotated: bool = False
    basis: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    widths: torch.Tensor | None = None

    @classmethod
    def empty(cls, spec: dict, batch: int, heads: int, head_dim: int) -> "KltKV":
        f = _fmt(spec["fmt"])
        z = torch.zeros(batch, heads, 0, head_dim)
        parts = []
        for w, m in spec["classes"]:
            fw = replace(f, bits=int(w))
            codes, scale, zero = _empty_parts(fw, (batch,), m, m)
            parts.append((codes, scale, zero))
        return cls(z, tuple(parts), 0, z, spec["fmt"], spec["window"], spec["sinks"], tuple(spec["classes"]))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, s, d = self.sinks.shape
        return b, h, s + self.coded + self.tail.shape[2], d

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sinks, self.tail, *(x for p in self.parts for x in p)))

    def _columns(self, w: int) -> torch.Tensor:
        return (self.widths.flatten() == w).nonzero().flatten()

    def dequantize(self) -> torch.Tensor:
        from finegrain.compiler.ops import _hadamard, _rope, klt_back

        if not self.coded:
            return torch.cat([self.sinks, self.tail], 2)
        f = _fmt(self.fmt)
        b_, h, _, d = self.sinks.shape
        y = torch.zeros(b_, self.coded, h * d)
        for (w, m), (codes, scale, zero) in zip(self.classes, self.parts):
            fw = replace(f, bits=int(w))
            q = _unpack_parts(fw, codes, scale, zero, m, m)  # token-major: [B, n, m], [B, n / G, m]
            y[..., self._columns(w)] = fw.dequantize(QTensor(*(t.transpose(1, 2).contiguous() for t in q[:3])),
                                                     torch.float32).transpose(1, 2)
        x = klt_back(y.reshape(b_, self.coded, h, d).permute(0, 2, 3, 1), self.basis, self.mean)
        x = _rope(x, self.n_sinks, self.inv_freq, inverse=False)
        x = _hadamard(x) if self.rotated else x
        return torch.cat([self.sinks, x.to(self.tail.dtype), self.tail], 2)

    def append(self, new: torch.Tensor) -> "KltKV":
        """The cache after ``kv_append`` writes ``new``: the groups leaving the window coded once."""
        from finegrain.compiler.ops import _hadamard, _rope, klt_forward, kv_quantized_span

        f = _fmt(self.fmt)
        t0 = self.shape[2]
        sinks, tail = self._grow(new, self.n_sinks)
        a, b = kv_quantized_span("tokens", f.group_size, t0, t0 + new.shape[2], self.window, self.n_sinks)
        parts = self.parts
        if a < b:
            seg = tail[:, :, :b - a].float()
            tail = tail[:, :, b - a:]
            seg = _rope(_hadamard(seg) if self.rotated else seg, a, self.inv_freq, inverse=True)
            y = klt_forward(seg, self.basis, self.mean)  # [B, H, d, n]
            flat = y.reshape(y.shape[0], -1, y.shape[-1])  # [B, H * d, n]
            new_parts = []
            for (w, _), old in zip(self.classes, parts):
                fw = replace(f, bits=int(w))
                q = fw.quantize(flat[:, self._columns(w)].contiguous())  # per component over groups of G tokens
                packed = _pack_parts(fw, QTensor(*(t.transpose(1, 2).contiguous() for t in q[:3])))
                new_parts.append(tuple(torch.cat([o, p], 1) for o, p in zip(old, packed)))
            parts = tuple(new_parts)
        return replace(self, sinks=sinks, parts=parts, coded=self.coded + max(b - a, 0), tail=tail.contiguous())


def kv_klt_append(past: KltKV, new: torch.Tensor, inv_freq: torch.Tensor, rotated: bool, basis: torch.Tensor,
                  mean: torch.Tensor, widths: torch.Tensor) -> KltKV:
    """``finegrain::kv_append(past, new, ..., basis=, mean=, widths=)`` on a packed past."""
    if not isinstance(past, KltKV):
        raise TypeError(f"kv_klt_append: the past is {type(past).__name__}, expected a KltKV")
    if past.basis is not basis or past.inv_freq is not inv_freq:
        past = replace(past, inv_freq=inv_freq, rotated=bool(rotated), basis=basis, mean=mean, widths=widths)
    return past.append(new)


def kv_windowed_append(past: WindowedKV, new: torch.Tensor, inv_freq: torch.Tensor | None = None,
                       rotated: bool = False, perm: torch.Tensor | None = None, head_group: int = 1) -> WindowedKV:
    """``finegrain::kv_append(past, new, ...)`` on a packed past (``inv_freq`` / ``rotated``: pre-RoPE keys;
    ``perm`` / ``head_group``: RotateKV's grouped heads)."""
    if not isinstance(past, WindowedKV):
        raise TypeError(f"kv_windowed_append: the past is {type(past).__name__}, expected a WindowedKV")
    past = past.with_rope(inv_freq, rotated)
    if past.perm is not perm or past.head_group != int(head_group):
        past = replace(past, perm=perm, head_group=int(head_group))
    return past.append(new)


@dataclass(frozen=True)
class ZipKV(_SinksAndTail):
    """A ZipCache write's cache (``kv_append`` with a saliency score) stored packed: the sinks fp32,
    then the released blocks (``flags`` ``[B, H, blocks, block / 8]``: one bit per token, salient or
    not; the salient tokens' codes in ``hi``, the others' in ``lo``, each ``(codes, scales, zero
    points)`` in token order),
    then the tokens waiting for their block fp32 (``tail``). Token-wise (``per_channel`` False):
    parameters per token, ``norm`` the fp16 channel normalizer per block (keys) or empty;
    ``per_channel``: parameters per block and channel for each subset ``[B, H, blocks, D]``."""

    sinks: torch.Tensor
    flags: torch.Tensor
    hi: tuple
    lo: tuple
    norm: torch.Tensor
    tail: torch.Tensor
    spec: dict
    inv_freq: torch.Tensor | None = None
    rotated: bool = False

    @property
    def fmt(self) -> str:
        return self.spec["fmt"]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, s, d = self.sinks.shape
        return b, h, s + self.flags.shape[2] * self.spec["block"] + self.tail.shape[2], d

    @property
    def nbytes(self) -> int:
        parts = [self.sinks, self.flags, self.norm, self.tail, *self.hi, *self.lo]
        return sum(t.numel() * t.element_size() for t in parts)

    def _salient(self) -> torch.Tensor:
        b, h, nb, _ = self.flags.shape
        return unpack(self.flags, 1, False, self.spec["block"]).bool().reshape(b, h, nb * self.spec["block"])

    @classmethod
    def empty(cls, spec: dict, batch: int, heads: int, head_dim: int) -> "ZipKV":
        z = torch.zeros(batch, heads, 0, head_dim)
        parts = []
        for tag in (spec["fmt"], spec["fmt_low"]):
            f = _fmt(tag)
            params = head_dim if spec["axis"] == "tokens" else f.num_groups(head_dim)  # per channel / per token
            parts.append(_empty_parts(f, (batch, heads), params, head_dim))
        return cls(z, torch.zeros(batch, heads, 0, packed_row_bytes(spec["block"], 1), dtype=torch.uint8), parts[0], parts[1],
                   torch.zeros(batch, heads, 0, head_dim, dtype=torch.float16), z, spec)

    def _subset(self, x: torch.Tensor, member: torch.Tensor, f: QuantFormat, block: int) -> tuple:
        """``x`` ``[B, H, n, D]`` (blocks of ``block``) quantized as ``kv_append`` does for the tokens in
        ``member``: their (codes, scales, zero points) packed, in token order."""
        b, h, n, d = x.shape
        if self.spec["axis"] == "tokens":  # per channel over the block's members (non-members repeat one)
            xt = x.reshape(b, h, n // block, block, d).transpose(3, 4)
            _, filled = zip_subset_rows(xt, member.reshape(b, h, n // block, block))
            f1 = zip_block_format(f)
            q = f1.quantize(filled)
            codes = q.codes.transpose(3, 4).reshape(b, h, n, d)[member].reshape(b, h, -1, d)
            zero = (pack(q.zero[..., 0].to(torch.uint8), f.family.metadata_bits(f), False) if not f.symmetric
                    else torch.zeros(b, h, n // block, 0, dtype=torch.uint8))
            return (pack(codes, f.bits, f.signed), scales.stored_scale(f1, q)[..., 0], zero)
        if not member.any():  # ratio 0 or 1: one subset is empty
            return _empty_parts(f, (b, h), f.num_groups(d), d)
        return _pack_parts(f, f.quantize(x[member].reshape(b, h, -1, d)))

    def _read(self, part: tuple, f: QuantFormat, member: torch.Tensor, block: int) -> torch.Tensor:
        b, h, n = member.shape
        d = self.head_dim
        codes, scale, zero = part
        out = torch.zeros(b, h, n, d)
        if self.spec["axis"] == "tokens":
            f1 = zip_block_format(f)
            full = torch.zeros(b, h, n, d, dtype=torch.int8 if f.signed else torch.uint8)
            full[member] = unpack(codes, f.bits, f.signed, d).reshape(-1, d)
            s = scales.load_scale(f1, scale, None)
            z = (torch.zeros(s.shape, dtype=torch.int32) if f.symmetric
                 else unpack(zero, f.family.metadata_bits(f), False, d).to(torch.int32))
            full_t = full.reshape(b, h, n // block, block, d).transpose(3, 4)
            vals = f1.dequantize(QTensor(full_t.contiguous(), s[..., None], z[..., None]), torch.float32)
            return vals.transpose(3, 4).reshape(b, h, n, d)
        params = f.num_groups(d)
        if codes.shape[2]:
            out[member] = f.dequantize(_unpack_parts(f, codes, scale, zero, d, params), torch.float32).reshape(-1, d)
        return out

    def dequantize(self) -> torch.Tensor:
        if not self.flags.shape[2]:
            return torch.cat([self.sinks, self.tail], 2)
        block = self.spec["block"]
        sal = self._salient()
        n = sal.shape[2]
        hi, lo = _fmt(self.spec["fmt"]), _fmt(self.spec["fmt_low"])
        body = torch.where(sal.unsqueeze(-1), self._read(self.hi, hi, sal, block), self._read(self.lo, lo, ~sal, block))
        if self.norm.shape[2]:
            b, h, _, d = body.shape
            body = (body.reshape(b, h, n // block, block, d) * self.norm.float().unsqueeze(3)).reshape(b, h, n, d)
        body = self._transform(body, self.spec["sinks"], inverse=False)
        return torch.cat([self.sinks, body.to(self.tail.dtype), self.tail], 2)

    def append(self, new: torch.Tensor, score: torch.Tensor) -> "ZipKV":
        from finegrain.compiler.ops import kv_quantized_span

        sp = self.spec
        t0 = self.shape[2]
        sinks, tail = self._grow(new, sp["sinks"])
        a, b = kv_quantized_span("tokens", sp["block"], t0, t0 + new.shape[2], sp["window"], sp["sinks"])
        if a >= b:
            return replace(self, sinks=sinks, tail=tail.contiguous())
        seg = self._transform(tail[:, :, :b - a].float(), a, inverse=True)
        tail = tail[:, :, b - a:]
        bb, h, n, d = seg.shape
        block = sp["block"]
        norm = self.norm
        if sp["channel_norm"]:
            c = zip_channel_norm(seg.reshape(bb, h, n // block, block, d))
            seg = (seg.reshape(bb, h, n // block, block, d) / c.float().unsqueeze(3)).reshape(bb, h, n, d)
            norm = torch.cat([norm, c], 2)
        sal = zip_salient(score[:, :, a:b], sp["ratio"])
        parts = {}
        for name, tag, member in (("hi", sp["fmt"], sal), ("lo", sp["fmt_low"], ~sal)):
            new_part = self._subset(seg, member, _fmt(tag), block)
            parts[name] = tuple(torch.cat([old, p], 2) for old, p in zip(getattr(self, name), new_part))
        flags = pack(sal.reshape(bb, h, n // block, block).to(torch.uint8), 1, False)  # one bit per token
        return replace(self, sinks=sinks, flags=torch.cat([self.flags, flags], 2), hi=parts["hi"], lo=parts["lo"],
                       norm=norm, tail=tail.contiguous())


def kv_zip_append(past: ZipKV, new: torch.Tensor, score: torch.Tensor, inv_freq: torch.Tensor | None = None,
                  rotated: bool = False) -> ZipKV:
    """ZipCache's ``finegrain::kv_append(past, new, ..., score, ...)`` on a packed past."""
    if not isinstance(past, ZipKV):
        raise TypeError(f"kv_zip_append: the past is {type(past).__name__}, expected a ZipKV")
    return past.with_rope(inv_freq, rotated).append(new, score)


def packable(fmt: QuantFormat) -> str | None:
    """Why ``fmt`` cannot be stored packed here, or None."""
    if kv_static(fmt):  # one calibrated scale per layer: the codes alone
        return None
    if fmt.granularity not in ("token", "group"):
        return f"{fmt.tag}: {fmt.granularity} scales (packed KV storage takes per-token or head-dim groups)"
    if fmt.scale not in scales.FLOAT_SCALES and fmt.scale != "e8m0":
        return f"{fmt.tag}: {fmt.scale} scales need a second-level scale"
    if fmt.kind in ("bitmod", "nf", "lm"):
        return f"{fmt.tag}: {fmt.kind} formats (static weight datatypes / codebooks)"
    return None


def kv_packed_append(past: PackedKV, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     fmt: str) -> PackedKV:
    """``past`` with the new tokens (``finegrain::quantize``'s codes / scale / zero) appended."""
    if not isinstance(past, PackedKV) or past.fmt != fmt:
        raise TypeError(f"kv_packed_append: the past is {type(past).__name__}"
                        f"{' in ' + past.fmt if isinstance(past, PackedKV) else ''}, expected a PackedKV in {fmt}")
    f = _fmt(fmt)
    codes, scale, zero = _pack_parts(f, QTensor(codes, scale, zero))
    codes = torch.cat([past.codes, codes], dim=2)
    if not f.dynamic:  # a static format's one scale (a graph constant) is kept once, not per token
        return PackedKV(codes, scale, zero, fmt, past.head_dim)
    return PackedKV(codes, *(torch.cat([old, p], dim=2) for old, p in zip((past.scale, past.zero), (scale, zero))),
                    fmt, past.head_dim)


def kv_packed_size(packed: PackedKV, dim: int) -> int:
    """``aten.sym_size.int`` of the fp32 cache ``packed`` stands for (the graph reads the past length)."""
    return packed.shape[dim]


def kv_packed_read(packed: "PackedKV | WindowedKV | ZipKV | KltKV") -> torch.Tensor:
    """The fp32 cache attention reads."""
    return packed.dequantize()


def _is_empty(n, gm: GraphModule) -> bool:
    """``n`` is a tensor with no elements (from its traced value, or the constant it copies: a loaded
    graph carries no traced values)."""
    while isinstance(n, Node):
        if n.meta.get("val") is not None:
            return n.meta["val"].numel() == 0
        if n.op == "get_attr":
            t = getattr(gm, n.target, None)
            return isinstance(t, torch.Tensor) and t.numel() == 0
        if n.op != "call_function" or not n.args:
            return False
        n = n.args[0]  # detach_ / lift_fresh_copy / clone of the constant
    return False


def _unwrap_past(past, gm: GraphModule):
    """The past placeholder under transformers' ``cat([empty 1-D tensor, past])`` (its cache starts from one;
    ZipCache's saliency may read it too)."""
    if isinstance(past, Node) and past.target is torch.ops.aten.cat.default \
            and sum(u.target is not KV_SALIENCY for u in past.users) == 1:
        *empty, last = past.args[0]
        if all(_is_empty(e, gm) for e in empty):
            return last
    return past


def _quantized_present(n: Node, gm: GraphModule):
    """``(past placeholder, quantize node, fmt)`` when ``n`` is ``cat([past, dequantize(quantize(x))], 2)``."""
    if n.target is not torch.ops.aten.cat.default or len(n.args[0]) != 2:
        return None
    past, dq = n.args[0]
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    past = _unwrap_past(past, gm)
    if not isinstance(past, Node) or past.op != "placeholder" or dim not in (2, -2) or not isinstance(dq, Node) \
            or dq.target is not DEQUANTIZE:
        return None
    parts = dq.args[:3]
    if not all(isinstance(p, Node) and p.target is operator.getitem and p.args[1] == i for i, p in enumerate(parts)):
        return None
    q = parts[0].args[0]
    if q.target is not QUANTIZE or any(p.args[0] is not q for p in parts) or q.kwargs:
        return None
    if len(q.args) > 2 and (len(q.args) != 4 or _fmt(q.args[1]).dynamic):  # a static format's calibrated scale / zero
        return None
    return past, q, dq.args[3]


def lower(gm: GraphModule) -> tuple[GraphModule, dict[int, dict], list[str]]:
    """A copy of a KV-cache graph storing its quantized presents packed: ``(graph, {present index:
    spec}, skipped)``; present index ``i`` is output ``1 + i`` and input ``2 + i`` (the past); a spec
    is ``{"kind": "token" | "windowed", "fmt", "axis", "window", "sinks"}`` (:func:`empty_state`).
    Parameters are shared with ``gm``, not copied. ``skipped``: why a quantized present stays fp32."""
    g = Graph()
    env = g.graph_copy(gm.graph, {})
    g.output(env)
    out = g.output_node()
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    slots, skipped = {}, []
    for i, p in enumerate(list(out.args[0][1:])):
        if not isinstance(p, Node):
            continue
        zip_score = p.args[8] if p.target is KV_APPEND and len(p.args) > 8 else None
        klt, why_not = False, None
        saliency = []  # ZipCache's kv_saliency reading this (key) past: it gets the packed past's fp32 read
        if p.target is KV_APPEND:
            from finegrain.backends.base import kv_append_options

            past, new, tag, axis, window, sinks = p.args[:6]
            saliency = [u for u in (past.users if isinstance(past, Node) else ()) if u.target is KV_SALIENCY]
            opts = kv_append_options(p)
            inv_freq, rotated = opts.get("inv_freq"), bool(opts.get("rotated", False))
            perm, head_group = opts.get("perm"), int(opts.get("head_group", 1))
            past = _unwrap_past(past, gm)
            spec = {"kind": "windowed", "fmt": tag, "axis": axis, "window": window, "sinks": sinks}
            if inv_freq is not None and (perm is not None or head_group > 1):  # RotateKV's grouped heads
                spec.update(grouped=True, head_group=head_group)
            if zip_score is not None:
                low, ratio, block, channel_norm = (list(p.args[9:13]) + [None, 1.0, 1, False][len(p.args[9:13]):])
                spec.update(kind="zip", fmt_low=low, ratio=ratio, block=block, channel_norm=channel_norm)
            klt = opts.get("basis") is not None
            if klt:  # kv_key_klt: one record per width, the widths a constant of the graph
                widths = opts.get("widths")
                if getattr(widths, "op", None) != "get_attr" or inv_freq is None:
                    why_not = "kv_key_klt: the widths must be a constant of the graph and the keys pre-RoPE"
                else:
                    w = get_tensor(gm, widths.target).flatten().tolist()
                    spec = {"kind": "klt", "fmt": tag, "window": window, "sinks": sinks,
                            "classes": [(b, w.count(b)) for b in sorted(set(w) - {0})]}
            q = None
        else:
            found = _quantized_present(p, gm)
            if found is None:
                continue
            past, q, tag = found
            spec = {"kind": "token", "fmt": tag}
        why = why_not or packable(_fmt(tag))
        sizes = [u for u in past.users if u.target is torch.ops.aten.sym_size.int] if past is not None else []
        if why or past is not placeholders[2 + i] or len(past.users) != 1 + len(sizes) + (
                past in {u.args[1] for u in saliency}):
            skipped.append(f"present {i} ({p.name}): {why or 'the past is read elsewhere'}; stays fp32")
            continue
        for u in sizes:
            u.target = kv_packed_size
        for u in saliency:
            with g.inserting_before(u):
                u.replace_input_with(u.args[1], g.call_function(kv_packed_read, (past,)))
        with g.inserting_before(p):
            if zip_score is not None:
                packed = g.call_function(kv_zip_append, (past, new, zip_score, inv_freq, rotated))
            elif klt:
                packed = g.call_function(kv_klt_append, (past, new, inv_freq, rotated, opts["basis"], opts["mean"],
                                                         opts["widths"]))
            elif q is None:
                packed = g.call_function(kv_windowed_append, (past, new, inv_freq, rotated, perm, head_group))
            else:
                parts = tuple(g.call_function(operator.getitem, (q, k)) for k in range(3))
                packed = g.call_function(kv_packed_append, (past, *parts, tag))
            read = g.call_function(kv_packed_read, (packed,))
        read.meta.update(p.meta)
        p.replace_all_uses_with(read)
        g.erase_node(p)
        slots[i] = spec
    outs = list(out.args[0])
    for i in slots:
        outs[1 + i] = outs[1 + i].args[0]  # the read node's packed record
    out.args = (tuple(outs),)
    g.eliminate_dead_code()
    g.lint()
    return GraphModule(gm, g), slots, skipped


def empty_state(spec: dict, batch: int, heads: int, head_dim: int):
    """The packed past of a present ``spec`` (from :func:`lower`) before any token."""
    if spec["kind"] == "zip":
        return ZipKV.empty(spec, batch, heads, head_dim)
    if spec["kind"] == "windowed":
        return WindowedKV.empty(spec, batch, heads, head_dim)
    if spec["kind"] == "klt":
        return KltKV.empty(spec, batch, heads, head_dim)
    return PackedKV.empty(spec["fmt"], batch, heads, head_dim)
