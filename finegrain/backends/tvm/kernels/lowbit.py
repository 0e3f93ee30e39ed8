"""Packed low-bit (INT2 / INT4 / INT8, INT3 in a 4-bit container) group-wise weight x fp32
activation linear as TIR kernels (TE + ``s_tir.Schedule``).

Layout (repacked from finegrain's QTensor by :func:`pack_weight`): ``w`` int32 ``[K / P, N]`` with
``P = 32 / bits`` codes of consecutive k per word (code of k = ``(w[k // P, n] >> bits (k % P)) &
(2^bits - 1)``: the mask makes the arithmetic shift of a signed word exact; codes are unsigned,
symmetric ones offset by ``2^(bits-1)``, INT3's asymmetric ones by 4, so every format's middle code
lands at ``2^(bits-1)``). A code is decoded without an int -> float conversion:
its bits are moved under the exponent of 1.0, giving the float ``1 + q / 2^b`` (shift, and, or;
AVX-512 merges the last two). Minifloat codes (FP4 E2M1 in 4-bit fields, FP6 / FP8 in 8-bit ones)
are read as fp16 bit patterns and converted (:func:`minifloat_half`: the value times a power of
two that :func:`pack_weight` takes out of the scale). The kernel sums it *centered*, ``c = 1 + q / 2^b - 1.5 = (q -
2^(b-1)) / 2^b`` (exact, in ``[-0.5, 0.5)``), with per-group partial sums

    part[m, g, n] = sum_{k in g} x[m, k] c[k, n]
    y[m, n] = sum_g S[g, n] part[m, g, n] - xsum[m, g] Z[g, n],

with ``S = 2^b scale`` and ``Z = (zero - 2^(b-1)) scale`` stored by :func:`pack_weight` (``scale``
and ``zs``; exact: ``sum x (q - zero) scale`` rearranged; ``Z = 0`` for symmetric formats), so the
scale and zero point are applied once per group, not per element, and ``xsum`` (the group sums of x) once per call for
all N. Centering matters: uncentered, ``S part`` and ``xsum Z`` are two terms of about ``(2^b +
zero) scale xsum`` that cancel, and their fp32 rounding showed (2.3e-3 of the largest logit on a
random-init Gemma-2's tied LM head in ``int8-channel-sym``; 1.3e-6 centered). Per-channel weights
are one group of K, per-tensor ones a ``[1, N]`` broadcast. Two schedules (shape classes):

* GEMV (M = 1, decode): N tiled (``n_tile`` columns per parallel task, 8-lane fp32 vectors), the
  group's partial sums in a local buffer, each 32-bit word loaded once for its P codes, decoded
  in registers. 2- and 4-bit codes are summed uncentered (``x (1 + q / 2^b)``: one FMA per code)
  and the centering ``1.5 x`` of each span of 8 codes (P of INT2; one value per row and span, ``xw``,
  computed once per call for all N) subtracted once per span, so the partial sums drift by at most a
  span's worth (one subtraction per code cost 20-35% here on AVX-512); 8-bit codes are centered one
  by one (``S = 2^8 scale`` would amplify a span's rounding);
* GEMM (M > 1 or symbolic M, prefill): per strip of 2 vectors of columns, a group's codes are
  decoded (centered) once into a local fp32 tile and reused by all M rows, in register blocks of 4 rows x
  2 vectors accumulated over the whole group.

``linear_func`` returns the scheduled PrimFunc (what the Relax lowering calls through
``call_tir``); ``compile_linear`` builds one for direct calls (tests, ``benchmarks/tvm_kernels.py``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from finegrain.backends.tvm.kernels import memoized
from finegrain.formats import QTensor, QuantFormat
from finegrain.formats.minifloat import MINIFLOATS

DEFAULT_TARGET = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}
ROW_BLOCK = 4  # rows per register block of the prefill kernel (its x / y are [mq, ROW_BLOCK, ...])
CONTAINERS = {2: 2, 3: 4, 4: 4, 8: 8}  # format bits -> kernel code width


# minifloat weights the kernel decodes from their bit patterns: kind -> (container bits, pattern of 1.0);
# FP4 in 4-bit containers, FP6 / FP8 in 8-bit ones
MINIFLOAT_WEIGHTS = {k: (4 if fam.bits == 4 else 8, int(np.array(1.0, fam.np_dtype).view(np.uint8)))
                     for k, fam in MINIFLOATS.items()}


def half_gain(kind: str) -> float:
    """What the kernel's decode multiplies a minifloat's value by: its bits read as fp16 (exponent field
    under fp16's, bias 15) give the value times ``2^(bias - 15) = 2^-(14 + emin)`` (E4M3 2^-8, E2M1
    2^-14, E5M2 1), exactly, subnormals included; the packed scale is divided by it."""
    return 2.0 ** -(14 + MINIFLOATS[kind].emin)


def minifloat_half(v, kind: str):
    """TIR: the fp32 value of the minifloat bit pattern ``v`` (int32, the pattern in its low bits) times
    :func:`half_gain`: the sign moved to bit 15 and the exponent and mantissa under fp16's (its
    exponent field's low bits), read as fp16 and converted to fp32 (one ``vcvtph2ps`` per vector with
    F16C; a library call on a target without it, LLVM's generic x86-64). Exact, subnormal patterns
    included (they are fp16 subnormals, which the conversion reads exactly, also under a
    flush-to-zero / denormals-are-zero mode), and no select: 1.3-1.8x faster than rebiasing the
    exponent in fp32 bits with selects for the subnormals and the sign (8- and 6-bit formats at M = 1)."""
    import tvm

    fam = MINIFLOATS[kind]
    nb = fam.bits
    half = ((v & ((1 << (nb - 1)) - 1)) << (10 - fam.mantissa)) | ((v >> (nb - 1)) << 15)
    return tvm.tirx.reinterpret("float16", half.astype("uint16")).astype("float32")


def container_bits(fmt: QuantFormat) -> int | None:
    """The kernel code width for ``fmt``'s weights, or None when no kernel here takes it: integers
    per group / channel / tensor, FP4 E2M1 (MXFP4, NVFP4) and FP8 E4M3 / E5M2, FP6 E3M2 / E2M3 in
    8-bit containers (FP8, MXFP8, MXFP6), per group / channel / tensor. 2-D blocks (``fp8-block``)
    run as groups along K with each block's scale repeated over its rows (the per-row view
    ``unpack_weight`` gives: exact, the kernel's scales not smaller)."""
    if fmt.kind in MINIFLOAT_WEIGHTS and fmt.granularity in ("group", "channel", "tensor"):
        return MINIFLOAT_WEIGHTS[fmt.kind][0]
    if fmt.kind != "int" or fmt.granularity not in ("group", "channel", "tensor"):
        return None
    return CONTAINERS.get(fmt.bits)


def kernel_groups(fmt: QuantFormat, k: int) -> tuple[int, int]:
    """``(format group, kernel group)`` over ``K``: per channel / tensor one group of K; a ragged
    last group gives kernel groups of ``gcd(group, K)``, which divide both."""
    gs = fmt.group_size if fmt.granularity == "group" else k
    return gs, gs if k % gs == 0 else math.gcd(gs, k)


def per_kernel_group(t: torch.Tensor, n: int, k: int, gs: int, kgs: int) -> torch.Tensor:
    """A per-group tensor ``[N, ceil(K / gs)]`` (or one value) -> ``[N, K / kgs]``, dtype kept."""
    t = t.reshape(n, -1) if t.numel() > 1 else t.reshape(1, 1).expand(n, 1)
    return t.repeat_interleave(gs if t.shape[1] > 1 else k, dim=1)[:, :k:kgs]


def pack_weight(fmt: QuantFormat, q: QTensor) -> dict[str, np.ndarray]:
    """finegrain integer weight (codes ``[N, K]``, scales ``[N, G]``) -> the kernel's ``w``,
    ``scale``, ``zs`` (and ``bits``, ``group_size``)."""
    bits = container_bits(fmt)
    if bits is None or q.codebook is not None:
        raise ValueError(f"pack_weight: format {fmt.tag} is not INT2/3/4/8 per group / channel / tensor, FP4 "
                         "E2M1, FP8 or FP6 in 1-D groups")
    n, k = q.codes.shape
    per = 32 // bits
    gs, kgs = kernel_groups(fmt, k)
    if kgs % per:
        raise ValueError(f"pack_weight: K={k} with groups of {gs}: kernel groups of {kgs} are not a multiple of "
                         f"{per} ({bits}-bit codes per 32-bit word)")

    def per_group(t: torch.Tensor) -> torch.Tensor:
        return per_kernel_group(t.float(), n, k, gs, kgs)

    scale = per_group(q.scale)
    if fmt.kind in MINIFLOAT_WEIGHTS:  # codes are the bit patterns; the effective scale is what 1.0 dequantizes to,
        # over the power of two the kernel's fp16 decode multiplies values by
        one = QTensor(torch.full_like(q.codes, MINIFLOAT_WEIGHTS[fmt.kind][1]), q.scale, q.zero, q.scale2, None)
        eff = fmt.dequantize(one, torch.float32)[:, ::kgs]  # [N, K / kgs]
        codes = q.codes.to(torch.int64).T.contiguous().numpy().astype(np.uint32)
        w = np.zeros((k // per, n), np.uint32)
        for i in range(per):
            w |= codes[i::per] << np.uint32(bits * i)
        return {"w": w.view(np.int32), "scale": (eff / half_gain(fmt.kind)).T.contiguous().numpy(),
                "zs": np.zeros((k // kgs, n), np.float32), "bits": bits, "group_size": kgs, "kind": fmt.kind}
    # unsigned fields centered in the container: symmetric codes + 2^(bits-1), asymmetric ones moved up so their middle
    # 2^(fmt.bits-1) lands there too (only INT3 in a 4-bit container moves: codes + 4)
    offset = (1 << (bits - 1)) - (0 if fmt.symmetric else 1 << (fmt.bits - 1))
    fields = q.codes.to(torch.int64) + offset  # [N, K]
    codes = fields.T.contiguous().numpy().astype(np.uint32)  # [K, N]
    if codes.size and (codes.max() >= (1 << bits)):
        raise ValueError(f"pack_weight: format {fmt.tag} has codes outside {bits} bits")
    w = np.zeros((k // per, n), np.uint32)
    for i in range(per):
        w |= codes[i::per] << np.uint32(bits * i)
    w = w.view(np.int32)  # torch and the graph carry int32 words
    zero = per_group(q.zero) + offset  # the kernel's codes are centered at 2^(bits-1): Z = 0 for symmetric formats
    # a group of zeros (a padding token's row: scale 1, every code at the zero point) gets S = Z = 0, so its output
    # is exactly 0 whatever the kernel's rounding of the activations
    dead = (fields.reshape(n, k // kgs, kgs) == zero[..., None]).all(-1)
    scale = scale.masked_fill(dead, 0.0)
    return {"w": w, "scale": (scale * (1 << bits)).T.contiguous().numpy(),
            "zs": ((zero - (1 << (bits - 1))) * scale).T.contiguous().numpy(),
            "bits": bits, "group_size": kgs, "kind": "int"}


def unpack_weight_ref(w: torch.Tensor, scale: torch.Tensor, zs: torch.Tensor, bits: int, k: int,
                      kind: str = "int") -> torch.Tensor:
    """The packed layout back to an fp32 weight ``[N, K]`` (the op's reference / fake-free path)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = (w.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [K/P, P, N]
    codes = codes.reshape(k, -1)
    gs = k // scale.shape[0]
    if kind in MINIFLOAT_WEIGHTS:
        return (MINIFLOATS[kind].table[codes] * half_gain(kind) * scale.repeat_interleave(gs, 0)).T.contiguous()
    codes = codes.float()
    s = scale.repeat_interleave(gs, 0) / (1 << bits)  # pack_weight stores 2^b scale, (zero - 2^(b-1)) scale
    return (codes * s - (zs.repeat_interleave(gs, 0) + s * (1 << (bits - 1)))).T.contiguous()


def vector_lanes(target: dict | None) -> int:
    """fp32 lanes of the target's vectors: 16 with AVX-512, else 8 (AVX2)."""
    import tvm

    tgt = tvm.target.Target(target or DEFAULT_TARGET)
    return 16 if tvm.target.codegen.target_has_features("avx512f", tgt) else 8


@memoized
def linear_func(m: int | None, k: int, n: int, group_size: int, bits: int = 4, n_tile: int | None = None,
                lanes: int = 8, vectors: int = 4, kind: str = "int"):
    """The scheduled PrimFunc ``f(x[m, k], w, scale, zs, y[m, n])``; ``m=1`` picks the GEMV schedule.
    ``m=None`` is the prefill kernel: rows come in blocks, ``x[mq, ROW_BLOCK, k]`` and ``y[mq,
    ROW_BLOCK, n]`` with ``mq`` symbolic (the caller pads the rows to whole blocks), so the
    register-blocked loops carry no bounds check (a symbolic row count split by 4 costs ~3x in
    predicates). ``lanes``: fp32 vector width (:func:`vector_lanes`); ``vectors``: independent
    accumulator vectors per GEMV block."""
    import tvm
    import tvm.s_tir as s_tir
    from tvm import te

    per = 32 // bits
    gemv = m == 1
    while vectors > 1 and n % (lanes * vectors):
        vectors //= 2
    block = lanes * vectors if gemv else 2 * lanes
    n_tile = _fit_tile(n, n_tile or (1024 if gemv else 128), block)
    if bits not in (2, 4, 8) or k % group_size or group_size % per or n_tile is None or (
            kind in MINIFLOAT_WEIGHTS and bits != MINIFLOAT_WEIGHTS[kind][0]):
        raise ValueError(f"lowbit linear: need bits in (2, 4, 8), K % group == 0, group % {per} == 0 and N % "
                         f"{block} == 0 (K={k}, group={group_size}, N={n}, bits={bits})")
    g_count = k // group_size
    span = max(per, 8) if group_size % max(per, 8) == 0 else per  # GEMV: codes per centering (whole words)
    rows = (m,) if m is not None else (tvm.tirx.Var("mq", "int64"), ROW_BLOCK)
    x = te.placeholder((*rows, k), "float32", name="x")
    w = te.placeholder((k // per, n), "int32", name="w")
    sc = te.placeholder((g_count, n), "float32", name="scale")
    zs = te.placeholder((g_count, n), "float32", name="zs")
    r = te.reduce_axis((0, group_size), "r")
    xs = te.compute((*rows, g_count), lambda *a: te.sum(x[(*a[:-1], a[-1] * group_size + r)], axis=r), name="xsum")
    kk = te.reduce_axis((0, group_size), "k")
    pos = 23 - bits  # a code's bits land at the top of the fp32 mantissa, under the exponent of 1.0
    mask = tvm.tirx.const(((1 << bits) - 1) << pos, "int32")
    one = tvm.tirx.const(0x3F800000, "int32")

    def code(k_, j):  # 1 + q / 2^bits, built from bits: shift, and, or (no int -> float conversion)
        word = w[k_ // per, j]
        sh = ((k_ % per) * bits).astype("int32")
        if kind in MINIFLOAT_WEIGHTS:  # the value times half_gain(kind); pack_weight divides the scale by that
            return minifloat_half((word >> sh) & ((1 << MINIFLOATS[kind].bits) - 1), kind)
        moved = tvm.tirx.Select(sh <= pos, word << te.max(pos - sh, 0), word >> te.max(sh - pos, 0))
        return tvm.tirx.reinterpret("float32", (moved & mask) | one)

    center = tvm.tirx.const(1.5, "float32")
    if not gemv:  # codes decoded (centered) by their own stage, so a decoded tile serves every row
        qf = te.compute((k, n), lambda k_, j: code(k_, j) - center if kind == "int" else code(k_, j), name="qf")
    elif kind == "int" and bits != 8:  # 1.5 x summed over each span of codes, subtracted at the span's first code
        wr = te.reduce_axis((0, span), "wr")
        xw = te.compute((*rows, k // span), lambda *a: te.sum(x[(*a[:-1], a[-1] * span + wr)] * center, axis=wr),
                        name="xw")

    def term(a):  # x[row, k] times the code of (k, n) for part[*a] = part[row..., g, n], k = g * group + kk
        k_ = a[-2] * group_size + kk
        xv = x[(*a[:-2], k_)]
        if not gemv:
            return xv * qf[k_, a[-1]]
        if kind != "int":
            return xv * code(k_, a[-1])
        if bits == 8:  # centered per code: 2^8 S would amplify a span's rounding (above)
            return xv * (code(k_, a[-1]) - center)
        return xv * code(k_, a[-1]) - tvm.tirx.Select(kk % span == 0, xw[(*a[:-2], k_ // span)],
                                                       tvm.tirx.const(0.0, "float32"))

    part = te.compute((*rows, g_count, n), lambda *a: te.sum(term(a), axis=kk), name="part")
    gg = te.reduce_axis((0, g_count), "gg")
    y = te.compute((*rows, n), lambda *a: te.sum(
        part[(*a[:-1], gg, a[-1])] * sc[gg, a[-1]] - xs[(*a[:-1], gg)] * zs[gg, a[-1]], axis=gg), name="y")
    func = te.create_prim_func([x, w, sc, zs, y])
    sch = (_gemv_schedule(s_tir, func, n_tile, span, lanes, vectors) if gemv
           else _gemm_schedule(s_tir, func, m, n_tile, per, lanes))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _fit_tile(n: int, want: int, block: int) -> int | None:
    """The largest multiple of ``block`` dividing ``n`` that is at most ``want`` (None if none)."""
    for t in range(max(min(want, n) // block, 1) * block, 0, -block):
        if n % t == 0:
            return t
    return None


def compile_linear(m: int | None, k: int, n: int, group_size: int, bits: int = 4, target: dict | None = None,
                   n_tile: int | None = None, vectors: int = 4, kind: str = "int"):
    """``linear_func`` built for ``target`` (default: AVX2, 2 cores); ``m=None``: x is
    ``[mq, ROW_BLOCK, k]`` (see :func:`linear_func`)."""
    import tvm

    func = linear_func(m, k, n, group_size, bits, n_tile, vector_lanes(target), vectors, kind)
    return tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(target or DEFAULT_TARGET))


def _gemv_schedule(s_tir, func, n_tile: int, span: int, lanes: int, vectors: int):
    """Per parallel task ``n_tile`` columns; per group, ``vectors`` x ``lanes`` columns of partial sums live
    in registers while the group's codes stream past (independent FMA chains, one word load
    per P codes; ``span`` codes, whole words, unrolled: the centering's period)."""
    sch = s_tir.Schedule(func)
    by, bp = sch.get_sblock("y"), sch.get_sblock("part")
    i, j, g = sch.get_loops(by)
    jo, jb, jc, jv = sch.split(j, [None, n_tile // (lanes * vectors), vectors, lanes])
    sch.reorder(jo, i, g, jb, jc, jv)
    sch.parallel(jo)
    sch.unroll(jc)
    sch.vectorize(jv)
    sch.compute_at(bp, jb)
    *_, pj, pk = sch.get_loops(bp)
    pjc, pjv = sch.split(pj, [None, lanes])
    pko, pki = sch.split(pk, [None, span])
    sch.reorder(pko, pki, pjc, pjv)
    sch.unroll(pki)
    sch.unroll(pjc)
    sch.vectorize(pjv)
    sch.set_scope(bp, 0, "local")
    sch.decompose_reduction(bp, pko)
    return sch


def _gemm_schedule(s_tir, func, m: int | None, n_tile: int, per: int, lanes: int, m_block: int = 4):
    """M > 1: per strip of 2 vectors of columns and per group, decode the group's codes once into
    a local [group, 2 x lanes] tile (L1-resident) and reuse it for every block of ``m_block`` rows,
    whose 2 x ``m_block`` accumulator vectors stay in registers over the whole group."""
    sch = s_tir.Schedule(func)
    by, bp, bq = sch.get_sblock("y"), sch.get_sblock("part"), sch.get_sblock("qf")
    loops = sch.get_loops(by)
    strip = 2 * lanes
    if len(loops) == 4:  # rows already in blocks: [mq, ROW_BLOCK]
        io, ii, j, g = loops
    else:
        i, j, g = loops
        io, ii = sch.split(i, [None, m_block])
    jo, jb, jv = sch.split(j, [None, n_tile // strip, strip])
    sch.reorder(jo, jb, g, io, ii, jv)
    sch.parallel(jo)
    jvo, jvi = sch.split(jv, [None, lanes])
    sch.vectorize(jvi)
    sch.compute_at(bp, io)
    pm, pn, pk = sch.get_loops(bp)[-3:]
    pnv, pni = sch.split(pn, [None, lanes])
    sch.reorder(pk, pm, pnv, pni)
    sch.unroll(pm)
    sch.unroll(pnv)
    sch.vectorize(pni)
    sch.compute_at(bq, g)
    qk, qn = sch.get_loops(bq)[-2:]
    qko, qki = sch.split(qk, [None, per])
    qno, qni = sch.split(qn, [None, lanes])
    sch.reorder(qko, qno, qki, qni)  # one word load per P codes
    sch.unroll(qki)
    sch.vectorize(qni)
    sch.set_scope(bp, 0, "local")
    sch.set_scope(bq, 0, "local")
    sch.decompose_reduction(bp, pk)
    return sch
