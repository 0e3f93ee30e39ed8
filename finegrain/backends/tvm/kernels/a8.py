"""Low-bit (INT2-4) group-wise weight x INT8 activation linear with integer dot products (AVX2).

The activation arrives quantized (codes ``xq`` int8 ``[rows, K]``, one fp32 scale per row, and
the group sums ``xs[rows, G]`` of the codes, computed once per call for all N). Per group the
kernel forms the integer partial sum of codes times codes with ``vpmaddubsw`` (unsigned weight
codes x signed activation codes, adjacent pairs summed into int16) and ``vpmaddwd`` by ones
(pairs into int32):

    part[m, g, n] = sum_{k in g} xq[m, k] q[k, n]                          (exact in int32)

No pair sum saturates: a weight code is at most 15 and ``|xq| <= 128``, so a pair is at most
3840 and four k-blocks (8 pmaddubsw lanes' worth, 30720) are summed in int16 before widening.
Two epilogues, applied once per group and column:

* ``int`` (dual-grained DGQ, Zhang et al. 2023): the INT4 -> INT8 weight is
  ``S2[g, n] (q - z[g, n])`` with integer group scales ``S2``; the INT32 accumulator is
  ``acc[m, n] = sum_g S2 part - (S2 z) xs[m, g]`` -- exactly ``sum_k xq (S2 (q - z))``, the INT8 x
  INT8 GEMM with INT32 accumulation, with the group scale applied per group instead of per
  element -- and ``y = acc s1[n] s_x[m]`` with the fp16 channel scale ``s1`` (one float multiply
  per output);
* ``float`` (fp16 / fp32 / E4M3 / E8M0 group scales, e.g. ``w4a8-g128``): ``acc = sum_g S part -
  (S z) xs`` in fp32, ``y = acc s_x[m]``.

Layout (:func:`pack_weight`): ``w`` uint8 ``[K / 8, N, 4]``; byte ``j`` of column ``n`` in k-block
``b`` holds the code of ``k = 8 b + j`` in its low nibble and of ``k = 8 b + 4 + j`` in its high
nibble, so one 32-byte load gives two ``vpmaddubsw`` operands (mask; shift) for 8 columns x 4 k,
each paired with 4 activation codes broadcast to every column. Symmetric codes are offset by
``2^(bits-1)`` (and the offset is a zero point), so codes are always unsigned 0..15.

One generator, :func:`linear_func`, covers both shape classes: GEMV (decode; one row, 4
vectors of 8 columns per block) and GEMM (prefill; rows in whole blocks ``[mq, 4, K]`` with ``mq``
symbolic, 4 rows x 2 vectors per register block, each weight load decoded once for all 4 rows).
The vector intrinsics are AVX2's (also present with AVX-512); a target without AVX2 is refused.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from finegrain.formats import QTensor, QuantFormat
from finegrain.backends.tvm.kernels import memoized
from finegrain.backends.tvm.kernels.lowbit import kernel_groups, per_kernel_group

ROW_BLOCK = 4  # rows per register block of the prefill kernel
I16_CHUNK = 4  # k-blocks summed in int16 before widening: 4 x 2 pair sums x 3840 < 2^15


def weight_ok(fmt: QuantFormat) -> bool:
    """Weights this kernel takes: integer codes of at most 4 bits per group / channel / tensor,
    without codebooks, with any scale type (DGQ's integer group scales included)."""
    return fmt.kind == "int" and fmt.bits <= 4 and fmt.granularity in ("group", "channel", "tensor")


def act_ok(fmt: QuantFormat) -> bool:
    """Activations this kernel takes: symmetric integers of at most 8 bits per token or per tensor
    with float scales (dynamic or static): their codes are int8 with no zero point."""
    return (fmt.kind == "int" and fmt.bits <= 8 and fmt.symmetric and fmt.granularity in ("token", "tensor")
            and fmt.scale in ("fp32", "fp16", "bf16"))


def pack_weight(fmt: QuantFormat, q: QTensor) -> dict:
    """finegrain weight (codes ``[N, K]``) -> ``w`` (see the module docstring), the per-group
    epilogue tables ``ga`` / ``gb`` ``[K / kgs, N]`` and channel scales ``cs`` ``[N]`` (ones for the
    float epilogue), with ``epilogue``, ``group_size`` (the kernel's: ``gcd(group, K)`` for a ragged
    last group) and ``bits``."""
    if not weight_ok(fmt) or q.codebook is not None:
        raise ValueError(f"a8 pack_weight: format {fmt.tag} is not INT2-4 per group / channel / tensor")
    n, k = q.codes.shape
    gs, kgs = kernel_groups(fmt, k)
    if k % 8 or kgs % 8 or n % 8:
        raise ValueError(f"a8 pack_weight: N={n}, K={k} with groups of {gs}: the kernel needs N, K and its groups "
                         f"of {kgs} to be multiples of 8")

    def per_group(t: torch.Tensor) -> torch.Tensor:  # [N, G] (or one value) -> [K / kgs, N]
        return per_kernel_group(t, n, k, gs, kgs).T.contiguous()

    offset = 1 << (fmt.bits - 1) if fmt.symmetric else 0
    codes = q.codes.to(torch.int64) + offset  # [N, K], 0 .. 2^bits - 1
    by_k = codes.T.reshape(k // 8, 2, 4, n)  # [block, half, j, n]
    w = (by_k[:, 0] | (by_k[:, 1] << 4)).permute(0, 2, 1).contiguous().to(torch.uint8)  # [K/8, N, 4]
    zero = per_group(q.zero.to(torch.int64)) + offset
    if fmt.scale == "int8":  # DGQ: integer group scales S2 = scale / s1, exact by construction
        s1 = q.scale2.float().reshape(n)
        s2 = torch.round(q.scale.float().reshape(n, -1) / s1[:, None])
        if not torch.equal(s2 * s1[:, None], q.scale.float().reshape(n, -1)):
            raise ValueError(f"a8 pack_weight: {fmt.tag} group scales are not integer multiples of the channel scale")
        s2 = per_group(s2.to(torch.int64))
        ga, gb, cs, epilogue = s2.to(torch.int32), (s2 * zero).to(torch.int32), s1, "int"
    else:
        sc = per_group(q.scale.float())
        ga, gb, cs, epilogue = sc, sc * zero.float(), torch.ones(n), "float"
    return {"w": w.numpy(), "ga": ga.numpy(), "gb": gb.numpy(), "cs": cs.float().numpy(), "epilogue": epilogue,
            "group_size": kgs, "bits": fmt.bits}


def unpack_weight_ref(w: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """The packed layout back to the fp32 weight ``[N, K]`` (the op's reference path)."""
    kb, n, _ = w.shape
    w = w.to(torch.int64)
    codes = torch.stack([w & 15, w >> 4], dim=1)  # [K/8, 2, N, 4]
    codes = codes.permute(0, 1, 3, 2).reshape(kb * 8, n)  # [K, N]
    gs = kb * 8 // ga.shape[0]
    a, b = ga.double().repeat_interleave(gs, 0), gb.double().repeat_interleave(gs, 0)
    return ((codes.double() * a - b) * cs.double()[None, :]).float().T.contiguous()


def quantize_rows(x: torch.Tensor, scale: torch.Tensor, group_size: int, lo: int, hi: int):
    """(codes int8, group sums int32): what the lowering computes before the kernel."""
    xq = torch.clamp(torch.round(x / scale), lo, hi)
    return xq.to(torch.int8), xq.reshape(*x.shape[:-1], -1, group_size).sum(-1).to(torch.int32)


def _fit_tile(n: int, block: int, tasks: int) -> int | None:
    """A multiple of ``block`` dividing ``n``, as large as possible while giving at least
    ``tasks`` parallel tasks (fewer when ``n`` has too few blocks)."""
    if n % block:
        return None
    blocks = n // block
    best = 1
    for t in range(1, blocks + 1):
        if blocks % t == 0 and blocks // t >= min(tasks, blocks):
            best = t
    return best * block


@memoized
def linear_func(m: int | None, k: int, n: int, group_size: int, epilogue: str = "int", tasks: int = 8):
    """The PrimFunc ``f(xq[mq, R, k], xs[mq, R, G], xsc[mq, R], w, ga, gb, cs, y[mq, R, n])``.
    ``m=1``: GEMV (``mq = R = 1``); ``m=None``: GEMM with rows in blocks of ``ROW_BLOCK``, ``mq``
    symbolic (the caller pads the rows)."""
    from tvm.script import tirx as T

    gemv = m == 1
    r_blk, vecs = (1, 4) if gemv else (ROW_BLOCK, 2)
    while vecs > 1 and n % (8 * vecs):
        vecs //= 2
    block = 8 * vecs
    n_tile = _fit_tile(n, block, tasks)
    if m not in (1, None) or k % group_size or group_size % 8 or n_tile is None or epilogue not in ("int", "float"):
        raise ValueError(f"a8 linear: need m in (1, None), K % group == 0, group % 8 == 0, N % {block} == 0 "
                         f"(K={k}, group={group_size}, N={n}, epilogue={epilogue})")
    g_count, kb_per_g = k // group_size, group_size // 8
    chunk = math.gcd(kb_per_g, I16_CHUNK)
    acc_t = "int32" if epilogue == "int" else "float32"
    n_blocks = n_tile // block
    rv = r_blk * vecs

    def col(jo, jb, v):
        return jo * n_tile + jb * block + v * 8

    @T.prim_func(s_tir=True)
    def func(x_h: T.handle, xs_h: T.handle, xsc_h: T.handle, w: T.Buffer((k // 8, n, 4), "uint8"),
             ga: T.Buffer((g_count, n), acc_t), gb: T.Buffer((g_count, n), acc_t), cs: T.Buffer((n,), "float32"),
             y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        mq = T.int64()
        xq = T.match_buffer(x_h, (mq, r_blk, k), "int8")
        xs = T.match_buffer(xs_h, (mq, r_blk, g_count), "int32")
        xsc = T.match_buffer(xsc_h, (mq, r_blk), "float32")
        y = T.match_buffer(y_h, (mq, r_blk, n), "float32")
        for jo in T.parallel(n // n_tile):
            for io in T.serial(mq):
                for jb in T.serial(n_blocks):
                    acc = T.decl_buffer((rv * 8,), acc_t, scope="local")
                    part = T.decl_buffer((rv * 8,), "int32", scope="local")
                    p16 = T.decl_buffer((rv * 16,), "int16", scope="local")
                    for a in T.unroll(rv):
                        acc[T.ramp(a * 8, 1, 8)] = T.broadcast(T.cast(0, acc_t), 8)
                    for g in T.serial(g_count):
                        for a in T.unroll(rv):
                            part[T.ramp(a * 8, 1, 8)] = T.broadcast(0, 8)
                        for kc in T.serial(kb_per_g // chunk):
                            for a in T.unroll(rv):
                                p16[T.ramp(a * 16, 1, 16)] = T.broadcast(T.int16(0), 16)
                            for kk in T.unroll(chunk):
                                for v in T.unroll(vecs):
                                    wv = w.vload([g * kb_per_g + kc * chunk + kk, col(jo, jb, v), 0], "uint8x32")
                                    lo = T.bitwise_and(wv, T.broadcast(T.uint8(15), 32))
                                    hi = T.shift_right(wv, T.broadcast(T.uint8(4), 32))
                                    for r in T.unroll(r_blk):
                                        base = (g * kb_per_g + kc * chunk + kk) * 8
                                        xa = T.reinterpret("int8x32", T.broadcast(
                                            T.reinterpret("int32", xq.vload([io, r, base], "int8x4")), 8))
                                        xb = T.reinterpret("int8x32", T.broadcast(
                                            T.reinterpret("int32", xq.vload([io, r, base + 4], "int8x4")), 8))
                                        p16[T.ramp((r * vecs + v) * 16, 1, 16)] = (
                                            p16[T.ramp((r * vecs + v) * 16, 1, 16)]
                                            + T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", lo, xa)
                                            + T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", hi, xb))
                            for a in T.unroll(rv):
                                part[T.ramp(a * 8, 1, 8)] = part[T.ramp(a * 8, 1, 8)] + T.call_llvm_pure_intrin(
                                    "int32x8", "llvm.x86.avx2.pmadd.wd", p16[T.ramp(a * 16, 1, 16)],
                                    T.broadcast(T.int16(1), 16))
                        for r in T.unroll(r_blk):
                            for v in T.unroll(vecs):
                                if epilogue == "int":
                                    acc[T.ramp((r * vecs + v) * 8, 1, 8)] = (
                                        acc[T.ramp((r * vecs + v) * 8, 1, 8)]
                                        + part[T.ramp((r * vecs + v) * 8, 1, 8)] * ga[g, T.ramp(col(jo, jb, v), 1, 8)]
                                        - gb[g, T.ramp(col(jo, jb, v), 1, 8)] * T.broadcast(xs[io, r, g], 8))
                                else:
                                    acc[T.ramp((r * vecs + v) * 8, 1, 8)] = (
                                        acc[T.ramp((r * vecs + v) * 8, 1, 8)]
                                        + T.cast(part[T.ramp((r * vecs + v) * 8, 1, 8)], "float32x8")
                                        * ga[g, T.ramp(col(jo, jb, v), 1, 8)]
                                        - gb[g, T.ramp(col(jo, jb, v), 1, 8)]
                                        * T.broadcast(T.cast(xs[io, r, g], "float32"), 8))
                    for r in T.unroll(r_blk):
                        for v in T.unroll(vecs):
                            y[io, r, T.ramp(col(jo, jb, v), 1, 8)] = (
                                T.cast(acc[T.ramp((r * vecs + v) * 8, 1, 8)], "float32x8")
                                * cs[T.ramp(col(jo, jb, v), 1, 8)] * T.broadcast(xsc[io, r], 8))

    return func


def has_avx2(target: dict | None) -> bool:
    import tvm

    from finegrain.backends.tvm.kernels.lowbit import DEFAULT_TARGET

    return bool(tvm.target.codegen.target_has_features("avx2", tvm.target.Target(target or DEFAULT_TARGET)))


def compile_linear(m: int | None, k: int, n: int, group_size: int, epilogue: str = "int",
                   target: dict | None = None, tasks: int = 8):
    """``linear_func`` built for ``target`` (default: AVX2, 2 cores)."""
    import tvm

    from finegrain.backends.tvm.kernels.lowbit import DEFAULT_TARGET

    if not has_avx2(target):
        raise ValueError(f"a8 linear: target {target} has no AVX2 (vpmaddubsw / vpmaddwd)")
    func = linear_func(m, k, n, group_size, epilogue, tasks)
    return tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(target or DEFAULT_TARGET))


def numpy_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x[m, ...]`` zero-padded to ``rows`` along dim 0."""
    out = np.zeros((rows, *x.shape[1:]), x.dtype)
    out[: x.shape[0]] = x
    return out
