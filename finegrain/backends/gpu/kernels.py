"""Triton kernels of the GPU backend, and the layout they read.

Weight layout (:func:`pack_weight`, built once from an artifact's packed weight): the codes of a
linear's ``W[N, K]`` as unsigned ``BITS``-bit fields in int32 words along K, ``qw[ceil(K / PW), N]``
with ``PW = 32 // BITS`` codes per word (field ``j`` of word ``i`` is ``k = i * PW + j``; signed
integer codes are stored offset by ``2^(BITS-1)``, minifloat codes are their bit patterns). N is the
fastest dimension, so a program's loads of a K tile are contiguous along N (coalesced). Per group
``g = k // group`` (ragged last groups included): the scale as the artifact stores it, ``s[G, N]``
(fp16 / bf16 / fp32; E8M0 exponents, FP8 E4M3 block scales or DGQ's integer factors as uint8,
decoded in registers), and for asymmetric integers the zero point ``z[G, N]`` (uint8); ``s1[N]``:
DGQ's fp16 channel scales; ``scale2``: NVFP4 / NVINT4's fp32 tensor scale.

Kernels:

* ``_wq_gemm``: ``y = x @ dequant(W)^T`` for M > 1 (prefill): a K loop that loads a ``[BK, BN]``
  tile of words, unpacks and decodes it in registers (INT2-8 or any OCP minifloat element, the
  scale applied once per element of the tile) and feeds ``tl.dot`` with fp32 accumulation.
* ``_wq_gemv``: the same for M small (decode): no ``tl.dot``; a program owns BN outputs and a
  slice of K (split-K, partial sums added atomically in fp32), one pass over the packed weight.
* ``_a8_gemm``: INT8 activations (symmetric, per token; from ``_quant_rows``) times a weight whose
  codes fit INT8 after removing the zero point (INT2-4 any, INT8 symmetric): ``tl.dot`` on int8 with
  int32 accumulation. Float group scales are applied per K tile (``BK`` divides the group); DGQ's
  integer group scales are applied *before* the dot (``S2 * (q - z)`` is INT8, the seed's A8W4
  kernel), its channel scale and the token scale in the epilogue. ``F8``: FP8 E4M3 activations
  times E4M3 weights (W8A8 FP8, Hopper's FP8 ``tl.dot``), fp32 accumulation.
* ``_quant_rows``: per-row absmax quantization of activations to INT or FP8 E4M3 codes (the
  reference's scale and round-half-to-even, bit for bit; E4M3 encoded by integer arithmetic on
  the fp32 bits, the same patterns as torch's cast). ``_rms_norm_quant_rows`` / ``_silu_mul_quant_rows``:
  the same quantizer fused into the RMSNorm / SwiGLU product that computes its input (never written).
* ``_fwht``: ``x @ H_p`` for a Sylvester Hadamard of order p (a power of two >= 16) with the
  +-1 tiles generated in registers from index parities (nothing loaded), on ``tl.dot``.
* ``_fake_quant_rows``: ``dequantize(quantize(x))`` of activations no dot kernel takes (MX / NV
  blocks: E8M0 or two-level E4M3 scales, INT or minifloat elements), the reference's values bit for bit.

Every kernel runs under ``TRITON_INTERPRET=1`` on CPU tensors (the tests) and on CUDA. On a GPU
the launchers pick a configuration per shape class (M bucket, N, K, format) by timing a few
candidates once (:func:`tuned`; not ``triton.autotune``, whose timing reruns would double the
split-K GEMV's atomic sums), kept in a JSON file across processes.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from finegrain.formats import QuantFormat
from finegrain.formats.scales import FLOAT_SCALES

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SMODE = {"float": 0, "e8m0": 1, "e4m3": 2, "int8": 3}  # how a stored group scale decodes


# ---- device helpers -------------------------------------------------------------------------
@triton.jit
def _minifloat(u, EB: tl.constexpr, MB: tl.constexpr):
    """Value of OCP minifloat bit patterns ``u`` (int32) with EB exponent and MB mantissa bits
    (E2M1, E3M2, E2M3, E4M3, E5M2): subnormals included; Inf / NaN patterns never occur."""
    sign = (u >> (EB + MB)) & 1
    e = (u >> MB) & ((1 << EB) - 1)
    m = (u & ((1 << MB) - 1)).to(tl.float32)
    bias: tl.constexpr = (1 << (EB - 1)) - 1
    mag = tl.where(e == 0, m * tl.exp2(0.0 * m + (1 - bias - MB)),
                   (m + (1 << MB)) * tl.exp2((e - bias - MB).to(tl.float32)))
    return tl.where(sign == 1, -mag, mag)


@triton.jit
def _decode_scale(s, SM: tl.constexpr, scale2):
    if SM == 1:  # E8M0: 2^(e - 127)
        return tl.exp2(s.to(tl.float32) - 127.0)
    elif SM == 2:  # FP8 E4M3 block scale times the fp32 tensor scale
        return _minifloat(s.to(tl.int32), 4, 3) * scale2
    else:  # a float scale, or DGQ's integer factor (the channel scale comes separately)
        return s.to(tl.float32)


@triton.jit
def _codes(w_ptr, offs_k, offs_n, k0, K, N, BITS: tl.constexpr, PW: tl.constexpr, BK: tl.constexpr,
           BN: tl.constexpr, SPLIT: tl.constexpr):
    """Unsigned codes ``[BK, BN]`` (int32) of rows ``offs_k = k0 + arange(BK)`` and columns
    ``offs_n``. SPLIT (PW a power of two dividing BK and k0): load each word once
    (``[BK / PW, BN]``) and split it in registers; otherwise (INT3 / FP6: 10 / 5 fields per word)
    load the word of every k."""
    nmask = offs_n < N
    if SPLIT:
        offs_w = k0 // PW + tl.arange(0, BK // PW)
        words = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :],
                        mask=(offs_w[:, None] < tl.cdiv(K, PW)) & nmask[None, :], other=0)
        shifts = tl.arange(0, PW) * BITS
        u = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        return tl.reshape(u, (BK, BN))
    word = tl.load(w_ptr + (offs_k // PW)[:, None] * N + offs_n[None, :],
                   mask=(offs_k[:, None] < K) & nmask[None, :], other=0)
    return (word >> ((offs_k % PW) * BITS)[:, None]) & ((1 << BITS) - 1)


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, s1_ptr, offs_k, offs_n, k0, K, N, group, scale2,
                 BITS: tl.constexpr, PW: tl.constexpr, SPLIT: tl.constexpr, MINI: tl.constexpr,
                 EB: tl.constexpr, MB: tl.constexpr, SM: tl.constexpr, HAS_ZERO: tl.constexpr,
                 OFFSET: tl.constexpr, ROW: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """Dequantized fp32 weight tile ``[BK, BN]`` (rows k, columns n of W^T)."""
    nmask = offs_n < N
    u = _codes(w_ptr, offs_k, offs_n, k0, K, N, BITS, PW, BK, BN, SPLIT)
    if ROW:  # the tile lies in one group: one scale (and zero) row
        g = k0 // group
        s = _decode_scale(tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0), SM, scale2)[None, :]
        if HAS_ZERO:
            z = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.int32)[None, :]
    else:
        g = offs_k // group
        gmask = (offs_k[:, None] < K) & nmask[None, :]
        s = _decode_scale(tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=gmask, other=0), SM, scale2)
        if HAS_ZERO:
            z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=gmask, other=0).to(tl.int32)
    if SM == 3:  # DGQ: integer group factor times the fp16 channel scale
        s = s * tl.load(s1_ptr + offs_n, mask=nmask, other=0).to(tl.float32)[None, :]
    if MINI:
        return _minifloat(u, EB, MB) * s
    if HAS_ZERO:
        return (u - z).to(tl.float32) * s
    return (u - OFFSET).to(tl.float32) * s


# ---- weight x float activation -----------------------------------------------------------------
@triton.jit
def _wq_gemm(x_ptr, w_ptr, s_ptr, z_ptr, s1_ptr, b_ptr, o_ptr, M, N, K, group, scale2, stride_x, stride_o,
             BITS: tl.constexpr, PW: tl.constexpr, SPLIT: tl.constexpr, MINI: tl.constexpr, EB: tl.constexpr,
             MB: tl.constexpr, SM: tl.constexpr, HAS_ZERO: tl.constexpr, OFFSET: tl.constexpr, ROW: tl.constexpr,
             HAS_BIAS: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             UPCAST: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BK)):
        k0 = t * BK
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, s1_ptr, offs_k, offs_n, k0, K, N, group, scale2, BITS, PW, SPLIT, MINI,
                         EB, MB, SM, HAS_ZERO, OFFSET, ROW, BK, BN)
        w = tl.where((offs_k < K)[:, None], w, 0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong (Triton 3.9): the same bf16 operands, multiplied in fp32
            acc += tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype), input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
    tl.store(o_ptr + offs_m[:, None] * stride_o + offs_n[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _wq_gemv(x_ptr, w_ptr, s_ptr, z_ptr, s1_ptr, b_ptr, o_ptr, M, N, K, group, scale2, stride_x, stride_o,
             BITS: tl.constexpr, PW: tl.constexpr, SPLIT: tl.constexpr, MINI: tl.constexpr, EB: tl.constexpr,
             MB: tl.constexpr, SM: tl.constexpr, HAS_ZERO: tl.constexpr, OFFSET: tl.constexpr, ROW: tl.constexpr,
             HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One row of x per program along axis 0; ``o`` is fp32 (atomic split-K partial sums)."""
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    tiles = tl.cdiv(K, BK)
    per = tl.cdiv(tiles, SPLIT_K)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for t in range(pid_k * per, tl.minimum(pid_k * per + per, tiles)):
        k0 = t * BK
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + row * stride_x + offs_k, mask=offs_k < K, other=0).to(tl.float32)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, s1_ptr, offs_k, offs_n, k0, K, N, group, scale2, BITS, PW, SPLIT, MINI,
                         EB, MB, SM, HAS_ZERO, OFFSET, ROW, BK, BN)
        acc += tl.sum(x[:, None] * w, axis=0)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)
    tl.atomic_add(o_ptr + row * stride_o + offs_n, acc, mask=offs_n < N)


# ---- INT8 activations ----------------------------------------------------------------------------
@triton.jit
def _e4m3_bits(v):
    """OCP FP8 E4M3 bit patterns (int32) of fp32 ``v`` already inside [-448, 448], rounded to
    nearest even, by integer arithmetic on the fp32 encoding (the same bits as torch's cast)."""
    vb = v.to(tl.int32, bitcast=True)
    sign = (vb >> 31) & 1
    a = tl.abs(v)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 255) - 127, -6)  # subnormals: step 2^-9
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3): 8 steps per binade
    r = ((tl.div_rn(a, step) + 12582912.0) - 12582912.0).to(tl.int32)  # 0..16, half to even
    e = tl.where(r >= 16, e + 1, e)
    r = tl.where(r >= 16, 8, r)
    normal = r >= 8
    return (sign << 7) | (tl.where(normal, e + 7, 0) << 3) | tl.where(normal, r - 8, r)


@triton.jit
def _round_bf16(x):
    """fp32 ``x`` rounded to the nearest bfloat16, ties to even (as torch's cast), kept in fp32: by
    integer arithmetic on its bits, since the interpreter's ``.to(tl.bfloat16)`` truncates."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _row_scale(amax, clip, QMAX: tl.constexpr, SCALE_F16: tl.constexpr, SCALE_BF16: tl.constexpr):
    """Rows' scales from their blocks' absolute maxima ``amax[ROWS, BK]``: absmax * clip / QMAX rounded
    to the stored scale dtype; 1 for an all-zero row. ``[ROWS]``."""
    s = tl.div_rn(tl.max(amax, axis=1) * clip, QMAX * 1.0)
    if SCALE_F16:
        s = s.to(tl.float16).to(tl.float32)
    if SCALE_BF16:
        s = _round_bf16(s)
    return tl.where(s > 0, s, 1.0)


@triton.jit
def _store_codes(q_ptr, offs, mask, x, s, QMAX: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, F8: tl.constexpr):
    """INT: q = clamp(round_half_even(x / s), LO, HI) as int8; F8: the E4M3 bit patterns of
    clamp(x / s, -448, 448) as uint8 (``x[ROWS, BK]``, ``s[ROWS, 1]``). Divisions are ``tl.div_rn``
    (IEEE, as torch divides): on a GPU Triton's ``/`` is the approximate ``div.full.f32``, which moves
    codes at rounding midpoints."""
    if F8:
        v = tl.minimum(tl.maximum(tl.div_rn(x, s), -QMAX), QMAX)
        tl.store(q_ptr + offs, _e4m3_bits(v).to(tl.uint8), mask=mask)
    else:
        v = tl.minimum(tl.maximum(tl.div_rn(x, s), -256.0), 256.0)
        v = (v + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds half to even
        q = tl.minimum(tl.maximum(v, LO * 1.0), HI * 1.0)
        tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)


@triton.jit
def _rows_absmax(x_ptr, rows, rmask, K, stride_x, ROWS: tl.constexpr, BK: tl.constexpr):
    """The first pass of the row quantizers: ``|x|``'s running maximum over ``BK``-wide tiles of the
    rows ``rows`` (``[ROWS, BK]``; ``tl.max(.., axis=1)`` gives each row's absmax)."""
    amax = tl.zeros((ROWS, BK), dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BK)):
        offs = t * BK + tl.arange(0, BK)
        mask = rmask[:, None] & (offs < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=mask, other=0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    return amax


@triton.jit
def _quant_rows(x_ptr, q_ptr, s_ptr, M, K, stride_x, clip, QMAX: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
                SCALE_F16: tl.constexpr, SCALE_BF16: tl.constexpr, F8: tl.constexpr, ROWS: tl.constexpr,
                BK: tl.constexpr):
    """ROWS rows of x per program -> codes (``_store_codes``) and their scales (``_row_scale``)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    s = _row_scale(_rows_absmax(x_ptr, rows, rmask, K, stride_x, ROWS, BK), clip, QMAX, SCALE_F16, SCALE_BF16)
    tl.store(s_ptr + rows, s, mask=rmask)
    for t in range(0, tl.cdiv(K, BK)):
        offs = t * BK + tl.arange(0, BK)
        mask = rmask[:, None] & (offs < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=mask, other=0).to(tl.float32)
        _store_codes(q_ptr, rows[:, None] * K + offs[None, :], mask, x, s[:, None], QMAX, LO, HI, F8)


@triton.jit
def _rms_norm_quant_rows(h_ptr, w_ptr, q_ptr, s_ptr, M, K, stride_h, eps, clip, QMAX: tl.constexpr, LO: tl.constexpr,
                         HI: tl.constexpr, SCALE_F16: tl.constexpr, SCALE_BF16: tl.constexpr, F8: tl.constexpr,
                         ROWS: tl.constexpr, BK: tl.constexpr):
    """The activation quantizer fused into the RMSNorm before it: ROWS rows per program of
    y = w * (h * rsqrt(mean(h^2) + eps)) -> codes and scale as ``_quant_rows``, y never written
    (three passes over h in registers: the sum of squares, the absolute maximum of y, the codes)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    ss = tl.zeros((ROWS, BK), dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BK)):
        offs = t * BK + tl.arange(0, BK)
        mask = rmask[:, None] & (offs < K)[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_h + offs[None, :], mask=mask, other=0).to(tl.float32)
        ss += h * h
    rs = (1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps))[:, None]
    amax = tl.zeros((ROWS, BK), dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BK)):
        offs = t * BK + tl.arange(0, BK)
        mask = rmask[:, None] & (offs < K)[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_h + offs[None, :], mask=mask, other=0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=offs < K, other=0).to(tl.float32)[None, :]
        amax = tl.maximum(amax, tl.abs(w * (h * rs)))
    s = _row_scale(amax, clip, QMAX, SCALE_F16, SCALE_BF16)
    tl.store(s_ptr + rows, s, mask=rmask)
    for t in range(0, tl.cdiv(K, BK)):
        offs = t * BK + tl.arange(0, BK)
        mask = rmask[:, None] & (offs < K)[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_h + offs[None, :], mask=mask, other=0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=offs < K, other=0).to(tl.float32)[None, :]
        _store_codes(q_ptr, rows[:, None] * K + offs[None, :], mask, w * (h * rs), s[:, None], QMAX, LO, HI, F8)


@triton.jit
def _swiglu_tile(g_ptr, u_ptr, rows, offs, mask, stride_g, stride_u):
    """``silu(g) * u = g / (1 + exp(-g)) * u`` (torch's formula) of one ``[ROWS, BK]`` tile, in fp32."""
    g = tl.load(g_ptr + rows[:, None] * stride_g + offs[None, :], mask=mask, other=0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * stride_u + offs[None, :], mask=mask, other=0).to(tl.float32)
    return tl.div_rn(g, 1.0 + tl.exp(-g)) * u


@triton.jit
def _silu_mul_quant_rows(g_ptr, u_ptr, q_ptr, s_ptr, M, K, stride_g, stride_u, clip, QMAX: tl.constexpr,
                         LO: tl.constexpr, HI: tl.constexpr, SCALE_F16: tl.constexpr, SCALE_BF16: tl.constexpr,
                         F8: tl.constexpr, ROWS: tl.constexpr, BK: tl.constexpr):
    """The activation quantizer fused into SwiGLU's product: ROWS rows per program of
    y = silu(g) * u (``_swiglu_tile``) -> codes and scale as ``_quant_rows``, y never written (two passes
    over g and u in registers: the absolute maximum, the codes)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    amax = tl.zeros((ROWS, BK), dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BK)):
        offs = t * BK + tl.arange(0, BK)
        mask = rmask[:, None] & (offs < K)[None, :]
        amax = tl.maximum(amax, tl.abs(_swiglu_tile(g_ptr, u_ptr, rows, offs, mask, stride_g, stride_u)))
    s = _row_scale(amax, clip, QMAX, SCALE_F16, SCALE_BF16)
    tl.store(s_ptr + rows, s, mask=rmask)
    for t in range(0, tl.cdiv(K, BK)):
        offs = t * BK + tl.arange(0, BK)
        mask = rmask[:, None] & (offs < K)[None, :]
        _store_codes(q_ptr, rows[:, None] * K + offs[None, :], mask,
                     _swiglu_tile(g_ptr, u_ptr, rows, offs, mask, stride_g, stride_u), s[:, None], QMAX, LO, HI, F8)


@triton.jit
def _pow2(e):
    """2^e (fp32) for integer ``e`` in [-127, 127], built from its bits (exact: ``tl.exp2`` may be
    approximate on a GPU); 2^-127 is the one subnormal."""
    return tl.where(e >= -126, ((e + 127) << 23).to(tl.float32, bitcast=True),
                    tl.full(e.shape, 0x00400000, tl.int32).to(tl.float32, bitcast=True))


@triton.jit
def _fake_quant_rows(x_ptr, o_ptr, t_ptr, M, G, clip, QMAX: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
                     SM: tl.constexpr, EMAX: tl.constexpr, EB: tl.constexpr, MB: tl.constexpr, EMIN: tl.constexpr,
                     SCALE_F16: tl.constexpr, SCALE_BF16: tl.constexpr, ROWS: tl.constexpr, BK: tl.constexpr):
    """Fake quantization of rows of ``G`` (one block / group / token each) as the reference quantizes
    and dequantizes them, bit for bit, in two passes over ``BK``-wide tiles: the row's scale from its
    absolute maximum (``SM`` 0: absmax * clip / QMAX rounded to the stored float dtype; 1: E8M0,
    ``2^(floor(log2(absmax * clip)) - EMAX)``; 2: NVFP4 / NVINT4's E4M3 block scale of ``absmax * clip /
    QMAX / t`` times the tensor scale ``t``), then each element rounded half to even: INT codes clamped
    to ``[LO, HI]`` (``EB`` 0), or the nearest value of the minifloat with ``EB`` / ``MB`` exponent /
    mantissa bits (smallest normal exponent ``EMIN``, saturated at ``QMAX``); times the scale.
    Divisions are ``tl.div_rn`` (IEEE, as torch divides)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    acc = _rows_absmax(x_ptr, rows, rmask, G, G, ROWS, BK)
    amax = tl.max(acc, axis=1) * clip
    if SM == 1:
        e = ((amax.to(tl.int32, bitcast=True) >> 23) & 255) - 127  # floor(log2 amax); subnormals clamp below
        s = tl.where(amax > 0, _pow2(tl.minimum(tl.maximum(e - EMAX, -127), 127)), 1.0)
    elif SM == 2:
        t = tl.load(t_ptr)
        sc = tl.minimum(tl.maximum(tl.div_rn(tl.div_rn(amax, QMAX * 1.0), t), 0.001953125), 448.0)
        s = _minifloat(_e4m3_bits(sc), 4, 3) * t
    else:
        s = _row_scale(acc, clip, QMAX, SCALE_F16, SCALE_BF16)
    for t0 in range(0, tl.cdiv(G, BK)):
        cols = t0 * BK + tl.arange(0, BK)
        mask = rmask[:, None] & (cols < G)[None, :]
        offs = rows[:, None] * G + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.float32)
        v = tl.div_rn(x, s[:, None])
        if EB == 0:
            v = tl.minimum(tl.maximum(v, -256.0), 256.0)
            q = tl.minimum(tl.maximum((v + 12582912.0) - 12582912.0, LO * 1.0), HI * 1.0)
        else:
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
            a = tl.abs(v)
            ea = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 255) - 127, EMIN)  # not `e`: loop-carried
            step = _pow2(ea - MB)
            r = ((tl.div_rn(a, step) + 12582912.0) - 12582912.0) * step
            q = tl.where(v < 0, -r, r)
        tl.store(o_ptr + offs, q * s[:, None], mask=mask)


def _row_blocks(m: int, k: int, device: torch.device) -> tuple[int, int]:
    """``(ROWS, BK)`` of the row quantizers. On a GPU a row of K >= 256 goes in blocks of 256, one row
    per program (a hidden-size row: enough programs to fill the GPU at any M), and a shorter row
    (activation groups of 32 to 128, tiny models) whole, rows batched so that a program holds up to
    4096 elements. Under the interpreter (CPU tensors) each program costs a fixed Python overhead
    whatever its size, so rows are batched up to 8192 elements at any K (the same code path)."""
    bk = 256 if k >= 256 else max(16, triton.next_power_of_2(k))
    if device.type == "cuda" and k >= 256:
        return 1, bk
    cap = 4096 if device.type == "cuda" else 8192
    return max(1, min(triton.next_power_of_2(m), cap // bk)), bk


@triton.jit
def _a8_gemm(q_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, s1_ptr, b_ptr, o_ptr, M, N, K, group,
             BITS: tl.constexpr, PW: tl.constexpr, SPLIT: tl.constexpr, HAS_ZERO: tl.constexpr,
             OFFSET: tl.constexpr, DGQ: tl.constexpr, F8: tl.constexpr, SM: tl.constexpr, HAS_BIAS: tl.constexpr,
             ACT_GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """INT8 (or, F8, FP8 E4M3) activation codes times weight codes on tl.dot; see the module
    docstring. F8: both operands are E4M3 bit patterns, the products summed in fp32. ACT_GROUP
    (> 0): activation scales per row and group of ACT_GROUP along K (``xs[M, K / ACT_GROUP]``,
    BK divides ACT_GROUP), applied per K tile; else one scale per row, in the epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_i = tl.zeros((BM, BN), dtype=tl.int32)
    for t in range(0, tl.cdiv(K, BK)):
        k0 = t * BK
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < K
        x = tl.load(q_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & kmask[None, :],
                    other=0)
        u = _codes(w_ptr, offs_k, offs_n, k0, K, N, BITS, PW, BK, BN, SPLIT)
        g = k0 // group  # BK divides the group: one scale row per tile
        srow = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0)
        if F8:
            xf = x.to(tl.float8e4nv, bitcast=True)
            wf = tl.where(kmask[:, None], u, 0).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
            part = tl.dot(xf, wf, out_dtype=tl.float32) * _decode_scale(srow, SM, 1.0)[None, :]
            if ACT_GROUP > 0:
                part = part * tl.load(xs_ptr + offs_m * tl.cdiv(K, ACT_GROUP) + k0 // ACT_GROUP,
                                      mask=offs_m < M, other=0)[:, None]
            acc += part
        else:
            if HAS_ZERO:
                z = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.int32)[None, :]
            else:
                z = OFFSET
            d = tl.where(kmask[:, None], u - z, 0)
            if DGQ:  # S2 (q - z) is INT8: the group scale goes in before the integer dot
                acc_i += tl.dot(x, (d * srow.to(tl.int32)[None, :]).to(tl.int8), out_dtype=tl.int32)
            else:
                part = tl.dot(x, d.to(tl.int8), out_dtype=tl.int32).to(tl.float32) * _decode_scale(srow, SM, 1.0)[None, :]
                if ACT_GROUP > 0:
                    part = part * tl.load(xs_ptr + offs_m * tl.cdiv(K, ACT_GROUP) + k0 // ACT_GROUP,
                                          mask=offs_m < M, other=0)[:, None]
                acc += part
    if DGQ:
        acc = acc_i.to(tl.float32) * tl.load(s1_ptr + offs_n, mask=nmask, other=0).to(tl.float32)[None, :]
    if ACT_GROUP == 0:
        acc = acc * tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=nmask, other=0).to(tl.float32)[None, :]
    tl.store(o_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & nmask[None, :])


# ---- online Hadamard -----------------------------------------------------------------------------
@triton.jit
def _fwht(x_ptr, o_ptr, R, P, scale, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(0, tl.cdiv(P, BK)):
        offs_k = t * BK + tl.arange(0, BK)
        x = tl.load(x_ptr + offs_m[:, None] * P + offs_k[None, :], mask=(offs_m[:, None] < R) & (offs_k[None, :] < P),
                    other=0).to(tl.float32)
        v = offs_k[:, None] & offs_n[None, :]  # H[i, j] = (-1)^popcount(i & j)
        v = v ^ (v >> 16)
        v = v ^ (v >> 8)
        v = v ^ (v >> 4)
        v = v ^ (v >> 2)
        v = v ^ (v >> 1)
        h = 1.0 - 2.0 * (v & 1).to(tl.float32)
        acc += tl.dot(x, h, input_precision=PREC)
    tl.store(o_ptr + offs_m[:, None] * P + offs_n[None, :], (acc * scale).to(o_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < R) & (offs_n[None, :] < P))


# ---- host side -----------------------------------------------------------------------------------
def element_layout(fmt: QuantFormat) -> dict | None:
    """How the kernels read ``fmt``'s weight codes, or None when no kernel decodes it (BitMoD,
    NF4 and Lloyd-Max codebooks)."""
    if fmt.kind == "int":
        mini, eb, mb = False, 0, 0
    elif fmt.kind.startswith("e") and len(fmt.kind) == 4:
        mini, eb, mb = True, int(fmt.kind[1]), int(fmt.kind[3])
    else:
        return None
    bits = fmt.bits
    pw = 32 // bits
    return {"bits": bits, "pw": pw, "split": pw & (pw - 1) == 0, "mini": mini, "eb": eb, "mb": mb,
            "smode": SMODE["float"] if fmt.scale in ("fp16", "bf16", "fp32") else SMODE[fmt.scale],
            "has_zero": fmt.kind == "int" and not fmt.symmetric,
            "offset": 2 ** (bits - 1) if fmt.kind == "int" and fmt.symmetric else 0}


def layout_spec(fmt: QuantFormat, n: int, k: int) -> tuple[dict, dict]:
    """What :func:`pack_weight` makes of a ``fmt`` weight ``[n, k]``: its kernel fields (all but
    ``scale2``) and ``{part: (dtype, shape)}`` of its tensors (``qw``, ``s``, and ``z`` / ``s1`` when
    the format has them); GPU deployments check what they load against it."""
    lay = element_layout(fmt)
    groups, group = (1, k) if fmt.granularity in ("tensor", "channel") else (fmt.num_groups(k), fmt.group_size)
    sdt = FLOAT_SCALES.get(fmt.scale, torch.uint8)
    parts = {"qw": (torch.int32, [math.ceil(k / lay["pw"]), n]), "s": (sdt, [groups, n])}
    if lay["has_zero"]:
        parts["z"] = (torch.uint8, [groups, n])
    if fmt.scale == "int8":
        parts["s1"] = (torch.float16, [n])
    return {**lay, "group": group, "k": k, "n": n}, parts


def pack_weight(fmt: QuantFormat, codes: torch.Tensor, stored_scale: torch.Tensor, zero: torch.Tensor | None,
                scale2: torch.Tensor | None) -> dict:
    """The kernel layout of one weight (see the module docstring) from its codes ``[N, K]`` (as
    ``QTensor.codes``: signed int8 or unsigned uint8), the scales as the artifact stores them
    (``formats/scales.stored_scale``, ``[N, G]``, ``[ceil(N / R), G]`` for 2-D blocks, or ``(1,)``), integer zero points ``[N, G]`` and
    the second-level scale."""
    lay = element_layout(fmt)
    if lay is None:
        raise ValueError(f"weight format {fmt.tag} has no GPU kernel (INT2-8 and OCP minifloat elements do)")
    n, k = codes.shape
    bits, pw = lay["bits"], lay["pw"]
    u = codes.to(torch.int64) + (2 ** (bits - 1) if fmt.signed and fmt.kind == "int" else 0)
    words = math.ceil(k / pw)
    u = torch.nn.functional.pad(u, (0, words * pw - k)).reshape(n, words, pw)
    qw = (u << (torch.arange(pw, dtype=torch.int64) * bits)).sum(-1)
    qw = torch.where(qw >= 2**31, qw - 2**32, qw).to(torch.int32).T.contiguous()  # [words, N]
    fields, parts = layout_spec(fmt, n, k)
    groups, group = parts["s"][1][0], fields["group"]
    if fmt.granularity == "tensor":
        s = stored_scale.reshape(-1, 1).expand(n, 1)
    else:  # 2-D blocks store one row per block: the kernel reads a scale per row
        s = fmt.expand_rows(stored_scale.reshape(-1, groups), n)
    out = {"qw": qw, "s": s.T.contiguous(), "z": None, "s1": None, "scale2": 1.0, "group": group, "k": k, "n": n, **lay}
    if lay["has_zero"]:
        z = zero.reshape(-1, 1).expand(n, 1) if fmt.granularity == "tensor" else zero.reshape(n, groups)
        out["z"] = z.T.to(torch.uint8).contiguous()
    if fmt.scale == "e4m3":
        out["s"] = out["s"].view(torch.uint8)
        out["scale2"] = float(scale2.reshape(-1)[0])
    if fmt.scale == "int8":
        out["s1"] = scale2.reshape(n).to(torch.float16).contiguous()
    return out


def _dummy(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(1, dtype=torch.uint8, device=t.device)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_k(group: int, k: int, pw: int, choices=(128, 64, 32, 16)) -> tuple[int, bool]:
    """A K tile (a multiple of the word's field count when words are split) and whether it lies
    in one group (one scale row per tile)."""
    for bk in choices:
        if group % bk == 0 and bk % pw == 0:
            return bk, True
    bk = next(b for b in choices if b % pw == 0) if any(b % pw == 0 for b in choices) else 32
    return bk, False


GEMV_MAX_M = 4  # rows up to which the split-K GEMV beats a padded tl.dot tile


def m_bucket(m: int) -> int:
    """The shape class of M that tuned configurations are kept for: 1, 4, 16, 64, 256, 1024+."""
    return next(b for b in (1, 4, 16, 64, 256) if m <= b) if m <= 256 else 1024


@functools.lru_cache(maxsize=None)
def _candidates(kind: str, m: int, group: int, k: int, pw: int) -> tuple[dict, ...]:
    """Configurations :func:`tuned` times (cached: the launchers ask on every call). GEMV: split-K
    up to 16 (an H200 sweep at 4096 x 4096, M = 1, had its fastest at BN 64, BK 128, split 16)."""
    bks = [bk for bk in (256, 128, 64, 32) if (group % bk == 0 or bk == 32) and bk % pw == 0 and bk <= max(32, k)]
    if kind == "gemv":
        return tuple(dict(BN=bn, BK=bk, SPLIT_K=sk, num_warps=w) for bn in (32, 64, 128) for bk in bks[:2]
                     for sk in (1, 2, 4, 8, 16) for w in (2, 4) if bn * bk <= 16384)
    return tuple(dict(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=st)
                 for bm, bn in ((16, 64), (32, 64), (64, 64), (64, 128), (128, 128)) if bm <= max(16, 4 * m)
                 for bk in bks[1:3] or bks for w in (4, 8) for st in (2, 3) if bn * bk <= 16384)


_TUNED: dict[str, dict] | None = None
_CHOSEN: dict[tuple, dict] = {}


def _cache_path():
    from pathlib import Path

    from finegrain.io.files import cache_dir

    base = Path(os.environ.get("FINEGRAIN_GPU_CACHE") or cache_dir())
    return base / f"gpu-tune-triton{triton.__version__}.json"


def tuned(kind: str, key: tuple, candidates: "Sequence[dict]", launch) -> dict:
    """The fastest of ``candidates`` for ``launch(config)`` on this GPU and shape class, timed once
    replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``: the kernels' GPU time, which
    eager timing hides under launch overhead at decode sizes; ``do_bench`` where capture fails), kept
    in memory for the process and in a JSON file (``$FINEGRAIN_GPU_CACHE``, default ``io.files.cache_dir()``:
    ``$FINEGRAIN_CACHE`` or ``~/.cache/finegrain``) keyed by device name, kernel and shape; the interpreter takes the first,
    and so does ``FINEGRAIN_GPU_TUNE=0`` (correctness runs that need no timing: each candidate is a
    Triton compile)."""
    global _TUNED
    import json

    if INTERPRET or not torch.cuda.is_available() or len(candidates) == 1 or os.environ.get("FINEGRAIN_GPU_TUNE") == "0":
        return candidates[0]
    hit = _CHOSEN.get((kind, key))
    if hit is not None:  # this process has asked before: no device name, no string key, no file
        return hit
    if _TUNED is None:
        try:
            _TUNED = json.loads(_cache_path().read_text())
        except (OSError, ValueError):
            _TUNED = {}
    name = f"{torch.cuda.get_device_name()}|{kind}|{'x'.join(map(str, key))}"
    if name not in _TUNED:
        timings = []
        for cfg in candidates:
            try:
                launch(cfg)  # compiles; a configuration this GPU cannot run raises here
            except Exception:  # too many registers, shared memory
                continue
            try:  # the kernel's GPU time: eager timing at decode sizes is mostly launch overhead (noise)
                timings.append((triton.testing.do_bench_cudagraph(lambda: launch(cfg), rep=10), cfg))
            except Exception:  # a launcher that cannot be captured
                timings.append((triton.testing.do_bench(lambda: launch(cfg), warmup=3, rep=15), cfg))
        _TUNED[name] = min(timings, key=lambda t: t[0])[1]
        path = _cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(_TUNED, indent=1))
        tmp.replace(path)
    _CHOSEN[(kind, key)] = _TUNED[name]
    return _TUNED[name]


def wq_linear(x: torch.Tensor, p: dict, bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """``x @ dequant(W)^T + bias`` for x ``[..., K]`` and a weight packed by :func:`pack_weight`;
    ``config`` (BM / BN / BK / SPLIT_K / num_warps / num_stages) overrides the tuned one."""
    k, n = p["k"], p["n"]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    pw = p["pw"] if p["split"] else 1
    z = p["z"] if p["z"] is not None else _dummy(x)
    s1 = p["s1"] if p["s1"] is not None else _dummy(x)
    b = bias if bias is not None else _dummy(x)
    gemv = m <= GEMV_MAX_M

    def launch(cfg: dict) -> torch.Tensor:
        bk = cfg["BK"]
        common = dict(BITS=p["bits"], PW=p["pw"], SPLIT=p["split"] and bk % p["pw"] == 0, MINI=p["mini"], EB=p["eb"],
                      MB=p["mb"], SM=p["smode"], HAS_ZERO=p["has_zero"], OFFSET=p["offset"],
                      ROW=p["group"] % bk == 0, HAS_BIAS=bias is not None)
        if gemv:
            out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
            grid = (m, triton.cdiv(n, cfg["BN"]), cfg["SPLIT_K"])
            _wq_gemv[grid](x2, p["qw"], p["s"], z, s1, b, out, m, n, k, p["group"], p["scale2"], x2.stride(0),
                           out.stride(0), SPLIT_K=cfg["SPLIT_K"], BN=cfg["BN"], BK=bk, **common, **_launch(cfg))
            return out
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(m, cfg["BM"]), triton.cdiv(n, cfg["BN"]))
        _wq_gemm[grid](x2, p["qw"], p["s"], z, s1, b, out, m, n, k, p["group"], p["scale2"], x2.stride(0),
                       out.stride(0), PREC=_prec(x.dtype), BM=cfg["BM"], BN=cfg["BN"], BK=bk,
                       UPCAST=INTERPRET and x.dtype == torch.bfloat16, **common, **_launch(cfg))
        return out

    if config is None:
        if INTERPRET:
            bk, _ = _block_k(p["group"], k, pw)
            config = dict(BN=64, BK=bk, SPLIT_K=1) if gemv else dict(BM=32, BN=32, BK=bk)
        else:
            kind = "gemv" if gemv else "gemm"
            config = tuned(f"wq-{kind}", (m_bucket(m), n, k, p["bits"], p["group"], p["smode"], p["mini"], str(x.dtype)),
                           _candidates(kind, m, p["group"], k, pw), launch)
    out = launch(config)
    return (out.to(x.dtype) if gemv else out).reshape(*lead, n)


def _launch(cfg: dict) -> dict:
    return {key: cfg[key] for key in ("num_warps", "num_stages") if key in cfg and not INTERPRET}


def a8_ok(p: dict, f8: bool = False, act_group: int = 0) -> bool:
    """Whether a packed weight goes into the integer-dot kernel (its codes fit INT8 after removing
    the zero point) or, ``f8``, the FP8 one (E4M3 codes), with a K tile that lies in one group
    (of the weight, and of the activation when it is quantized in groups of ``act_group``)."""
    if act_group and (p["k"] % act_group or p["smode"] == SMODE["int8"]):
        return False
    if f8:
        if not (p["mini"] and (p["eb"], p["mb"]) == (4, 3)) or p["smode"] not in (SMODE["float"], SMODE["e8m0"]):
            return False
    elif p["mini"] or p["smode"] not in (SMODE["float"], SMODE["int8"]):
        return False
    elif p["bits"] > 4 and (p["has_zero"] or p["bits"] != 8):
        return False
    group = math.gcd(p["group"], act_group) if act_group else p["group"]
    bk, row = _block_k(group, p["k"], p["pw"] if p["split"] else 1, (128, 64, 32))
    return row


def quant_rows(x: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[M, K]`` and per-row fp32 scales ``[M]`` of x ``[M, K]`` in a symmetric per-token
    (or, for one row, per-tensor) format: INT (int8 codes) or FP8 E4M3 (uint8 bit patterns)."""
    m, k = x.shape
    f8 = fmt.kind == "e4m3"
    q = torch.empty(m, k, dtype=torch.uint8 if f8 else torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    lo, hi = fmt.family.code_range(fmt)
    rows, bk = _row_blocks(m, k, x.device)
    _quant_rows[(triton.cdiv(m, rows),)](x, q, s, m, k, x.stride(0), float(fmt.clip),
                                         QMAX=float(fmt.family.max_value(fmt)), LO=lo, HI=hi,
                                         SCALE_F16=fmt.scale == "fp16", SCALE_BF16=fmt.scale == "bf16", F8=f8,
                                         ROWS=rows, BK=bk)
    return q, s


def rms_norm_quantize(h: torch.Tensor, weight: torch.Tensor, eps: float,
                      act: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`a8_quantize` of ``weight * (h * rsqrt(mean(h^2, -1) + eps))`` (Llama's RMSNorm) in one
    kernel (``_rms_norm_quant_rows``): per-token formats only; the norm computed in fp32."""
    k = h.shape[-1]
    if act.granularity != "token" or weight.shape != (k,):
        raise ValueError(f"rms_norm_quantize: a per-token format and a weight of {k} (got {act.tag}, "
                         f"{list(weight.shape)})")
    h2 = h.reshape(-1, k).contiguous()
    m = h2.shape[0]
    f8 = act.kind == "e4m3"
    q = torch.empty(m, k, dtype=torch.uint8 if f8 else torch.int8, device=h.device)
    s = torch.empty(m, dtype=torch.float32, device=h.device)
    lo, hi = act.family.code_range(act)
    rows, bk = _row_blocks(m, k, h.device)
    _rms_norm_quant_rows[(triton.cdiv(m, rows),)](h2, weight.contiguous(), q, s, m, k, h2.stride(0), float(eps),
                                                  float(act.clip), QMAX=float(act.family.max_value(act)), LO=lo, HI=hi,
                                                  SCALE_F16=act.scale == "fp16", SCALE_BF16=act.scale == "bf16", F8=f8,
                                                  ROWS=rows, BK=bk)
    return q, s


def silu_mul_quantize(g: torch.Tensor, u: torch.Tensor, act: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`a8_quantize` of ``silu(g) * u`` (SwiGLU's product, the down projection's input) in one
    kernel (``_silu_mul_quant_rows``): per-token formats only; computed in fp32. ``g`` / ``u`` may be
    views with a row stride (Phi-3's ``chunk`` of the fused gate / up projection)."""
    k = g.shape[-1]
    if act.granularity != "token" or u.shape != g.shape:
        raise ValueError(f"silu_mul_quantize: a per-token format and two operands of one shape (got {act.tag}, "
                         f"{list(g.shape)} and {list(u.shape)})")
    g2, u2 = (t.reshape(-1, k) for t in (g, u))
    g2, u2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (g2, u2))
    m = g2.shape[0]
    f8 = act.kind == "e4m3"
    q = torch.empty(m, k, dtype=torch.uint8 if f8 else torch.int8, device=g.device)
    s = torch.empty(m, dtype=torch.float32, device=g.device)
    lo, hi = act.family.code_range(act)
    rows, bk = _row_blocks(m, k, g.device)
    _silu_mul_quant_rows[(triton.cdiv(m, rows),)](g2, u2, q, s, m, k, g2.stride(0), u2.stride(0), float(act.clip),
                                                  QMAX=float(act.family.max_value(act)), LO=lo, HI=hi,
                                                  SCALE_F16=act.scale == "fp16", SCALE_BF16=act.scale == "bf16", F8=f8,
                                                  ROWS=rows, BK=bk)
    return q, s


def fake_quant_ok(fmt: QuantFormat, k: int | None = None) -> bool:
    """Whether :func:`fake_quantize` computes ``fmt``'s fake quantization (K, when given, a multiple of
    its group): a dynamic symmetric INT or minifloat format per token or in groups, its scale a float,
    E8M0 (MX) or E4M3 with a tensor scale (NVFP4 / NVINT4)."""
    if not fmt.dynamic or not fmt.symmetric or fmt.block_rows or fmt.kind not in ("int", "e4m3", "e5m2", "e3m2",
                                                                                  "e2m3", "e2m1"):
        return False
    if fmt.granularity not in ("token", "group") or fmt.scale not in ("fp32", "fp16", "bf16", "e8m0", "e4m3"):
        return False
    return k is None or fmt.granularity == "token" or k % fmt.group_size == 0


def fake_quantize(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``fmt.fake_quantize(x)`` (fp32) in one kernel (``_fake_quant_rows``): each group of each row one
    program row. NVFP4 / NVINT4's tensor scale (the largest block scale / 448) is one torch reduction
    first (the same value as the largest of the blocks' scales: division by positive constants keeps
    the order)."""
    from finegrain.formats.scales import E4M3_MAX

    k = x.shape[-1]
    if not fake_quant_ok(fmt, k):
        raise ValueError(f"fake_quantize: {fmt.tag} over K = {k} has no kernel (fake_quant_ok)")
    g = fmt.group_size if fmt.granularity == "group" else k
    x2 = x.reshape(-1, g).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, g, dtype=torch.float32, device=x.device)
    qmax = float(fmt.family.max_value(fmt))
    sm = {"e8m0": 1, "e4m3": 2}.get(fmt.scale, 0)
    t = _dummy(x2)
    if sm == 2:
        t = (x2.abs().amax().float() * float(fmt.clip) / qmax / E4M3_MAX).reshape(1)
        t = torch.where(t > 0, t, torch.ones_like(t))
    mini = fmt.kind != "int"
    eb, mb = (int(fmt.kind[1]), int(fmt.kind[3])) if mini else (0, 0)
    lo, hi = fmt.family.code_range(fmt)
    rows, bk = _row_blocks(m, g, x.device)
    _fake_quant_rows[(triton.cdiv(m, rows),)](
        x2, out, t, m, g, float(fmt.clip), QMAX=qmax, LO=lo, HI=hi, SM=sm, EMAX=math.floor(math.log2(qmax)),
        EB=eb, MB=mb, EMIN=fmt.family.emin if mini else 0, SCALE_F16=fmt.scale == "fp16",
        SCALE_BF16=fmt.scale == "bf16", ROWS=rows, BK=bk)
    return out.reshape(x.shape)


def a8_quantize(x: torch.Tensor, act: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation codes ``[M, K]`` and scales (per row, or per row and group of K) of ``x``
    ``[..., K]`` as :func:`a8_gemm` reads them: one pass of ``_quant_rows``, shared by every linear
    that reads the same activation in the same format (q / k / v, gate / up)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    ag = act.group_size if act.granularity == "group" else 0
    if act.granularity == "tensor":
        q, s = quant_rows(x2.reshape(1, -1), act)
        return q.reshape(m, k), s.expand(m).contiguous()
    if ag:  # groups along K: each group of each row is one quantizer row
        if k % ag:
            raise ValueError(f"a8_linear: K = {k} is not a multiple of the activation group {ag}")
        q, s = quant_rows(x2.reshape(-1, ag), act)
        return q.reshape(m, k), s
    return quant_rows(x2, act)


def a8_gemm(q: torch.Tensor, s: torch.Tensor, act: QuantFormat, p: dict, bias: torch.Tensor | None, lead: tuple,
            dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """Activation codes and scales (:func:`a8_quantize`) times the packed weight on ``_a8_gemm``:
    INT: the weight's zero-point-free codes (or DGQ's ``S2 (q - z)``) as INT8, int32 accumulation;
    FP8: E4M3 x E4M3 with fp32 accumulation (Hopper's FP8 tensor cores); scales in the epilogue.
    The result ``[*lead, N]`` in ``dtype``."""
    k, n = p["k"], p["n"]
    m = q.shape[0]
    ag = act.group_size if act.granularity == "group" else 0
    bk, row = _block_k(math.gcd(p["group"], ag) if ag else p["group"], k, p["pw"] if p["split"] else 1, (128, 64, 32))
    if not row:
        raise ValueError(f"a8_linear: group {p['group']} (activation group {ag}) has no K tile of 32-128 inside it")
    z = p["z"] if p["z"] is not None else _dummy(q)
    s1 = p["s1"] if p["s1"] is not None else _dummy(q)
    b = bias if bias is not None else _dummy(q)

    def launch(cfg: dict) -> torch.Tensor:
        out = torch.empty(m, n, dtype=dtype, device=q.device)
        grid = (triton.cdiv(m, cfg["BM"]), triton.cdiv(n, cfg["BN"]))
        _a8_gemm[grid](q, s, p["qw"], p["s"], z, s1, b, out, m, n, k, p["group"], BITS=p["bits"], PW=p["pw"],
                       SPLIT=p["split"] and cfg["BK"] % p["pw"] == 0, HAS_ZERO=p["has_zero"], OFFSET=p["offset"],
                       DGQ=p["smode"] == SMODE["int8"], F8=act.kind == "e4m3", SM=p["smode"],
                       HAS_BIAS=bias is not None, ACT_GROUP=ag, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
                       **_launch(cfg))
        return out

    if config is None:
        if INTERPRET:
            config = dict(BM=32, BN=32, BK=bk)
        else:
            cands = [c for c in _candidates("gemm", m, p["group"], k, p["pw"] if p["split"] else 1)
                     if p["group"] % c["BK"] == 0 and c["BK"] >= 32 and (not ag or ag % c["BK"] == 0)]
            config = tuned("a8-gemm", (m_bucket(m), n, k, p["bits"], p["group"], ag, p["smode"], str(dtype)),
                           cands or [dict(BM=64, BN=64, BK=bk)], launch)
    return launch(config).reshape(*lead, n)


def a8_linear(x: torch.Tensor, act: QuantFormat, p: dict, bias: torch.Tensor | None = None,
              config: dict | None = None) -> torch.Tensor:
    """``fake_quant(x) @ dequant(W)^T + bias`` computed on codes: x quantized per token / tensor /
    group (``act``: symmetric INT or FP8 E4M3) by :func:`a8_quantize`, then :func:`a8_gemm`."""
    q, s = a8_quantize(x, act)
    return a8_gemm(q, s, act, p, bias, x.shape[:-1], x.dtype, config)


def fwht(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x @ (F (x) H_p) / sqrt(n)`` over the last dim (``formats/hadamard.apply_hadamard``'s
    definition): the Sylvester part on ``_fwht`` (p >= 16), the small dense F in torch."""
    from finegrain.formats.hadamard import apply_hadamard

    n = x.shape[-1]
    m = factor.shape[0]
    p = n // m
    if p < 16 or n % m:
        return apply_hadamard(x, factor.to(x.device)).to(x.dtype)
    rows = x.reshape(-1, p).contiguous()
    r = rows.shape[0]
    out = torch.empty_like(rows)
    bm, bn, bk = (16, 16, 16) if p == 16 else (32, 32, 32) if INTERPRET else (64, 64, 64)
    _fwht[(triton.cdiv(r, bm), triton.cdiv(p, bn))](rows, out, r, p, 1.0 / math.sqrt(n), BM=bm, BN=bn, BK=bk,
                                                    PREC=_prec(x.dtype))
    y = out.reshape(*x.shape[:-1], m, p)
    if m > 1:
        y = torch.einsum("...kj,ki->...ij", y, factor.to(device=y.device, dtype=y.dtype))
    return y.reshape(x.shape)
