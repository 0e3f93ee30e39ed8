"""Packed INT4 group-wise weight x fp32 activation linear as a TIR kernel (TE + ``s_tir.Schedule``).

Layout (repacked from finegrain's QTensor by :func:`pack_int4`): ``w`` uint32 ``[K / 8, N]``, eight
4-bit codes of consecutive k per word (code of k = ``(w[k // 8, n] >> 4 (k % 8)) & 15``, unsigned:
symmetric codes are offset by 8); ``scale`` fp32 ``[G, N]``; ``zs`` fp32 ``[G, N]`` = zero point x
scale. The output is computed with the per-group integer partial sum

    y[m, n] = sum_g scale[g, n] * (sum_{k in g} x[m, k] q[k, n]) - xsum[m, g] * zs[g, n],

so the scale and zero point are applied once per group, not per element, and ``xsum`` (the
group sums of x) once per call for all N. Two schedules (shape classes):

* GEMV (M = 1): N tiled (``n_tile`` columns per parallel task, 8-lane fp32 vectors), the group's
  partial sums in a local buffer, each 32-bit word loaded once for its 8 codes, decoded in
  registers;
* GEMM (M > 1): each 8-row slice of a group's codes is decoded once into a local fp32 tile and
  reused by all M rows, with a register block of ``m_block`` rows x 16 columns.

Measured on this 2-core Zen 3 (``benchmarks/tvm_kernels.py``, 4096 x 4096, g128): GEMV 0.92 ms vs
ONNX Runtime MatMulNBits level 0 0.69 ms and torch fp32 1.27 ms; GEMM at M = 16 about 6.5 ms vs
ORT 3.5 ms: neither meets #7's target yet (no MetaSchedule tuning here).
"""
from __future__ import annotations

import numpy as np
import torch

from finegrain.formats import QTensor, QuantFormat

DEFAULT_TARGET = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}


def pack_int4(fmt: QuantFormat, q: QTensor) -> dict[str, np.ndarray]:
    """finegrain INT4 group-wise weight (codes ``[N, K]``) -> the kernel's ``w``, ``scale``, ``zs``."""
    if fmt.kind != "int" or fmt.bits != 4 or fmt.granularity != "group":
        raise ValueError(f"pack_int4: format {fmt.tag} is not INT4 group-wise")
    n, k = q.codes.shape
    gs = fmt.group_size
    if k % gs or gs % 8:
        raise ValueError(f"pack_int4: K={k} must be a multiple of the group size {gs}, itself a multiple of 8")
    offset = 8 if fmt.symmetric else 0
    codes = (q.codes.to(torch.int64) + offset).T.contiguous().numpy().astype(np.uint32)  # [K, N]
    w = np.zeros((k // 8, n), np.uint32)
    for i in range(8):
        w |= codes[i::8] << np.uint32(4 * i)
    scale = q.scale.float().reshape(n, k // gs)
    zero = q.zero.float().reshape(n, k // gs) + offset
    return {"w": w, "scale": scale.T.contiguous().numpy(), "zs": (zero * scale).T.contiguous().numpy()}


def int4_linear(m: int, k: int, n: int, group_size: int, target: dict | None = None, n_tile: int = 512):
    """Compile ``y[m, n]`` (signature ``f(x, w, scale, zs, y)``) for static shapes; returns the
    TVM executable."""
    import tvm
    import tvm.s_tir as s_tir
    from tvm import te

    if m > 1:
        n_tile = min(n_tile, 256)
    if k % group_size or group_size % 8 or n % n_tile or n_tile % 16:
        raise ValueError(f"int4_linear: need K % group == 0, group % 8 == 0, N % n_tile == 0 (K={k}, "
                         f"group={group_size}, N={n}, n_tile={n_tile})")
    g_count = k // group_size
    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((k // 8, n), "uint32", name="w")
    sc = te.placeholder((g_count, n), "float32", name="scale")
    zs = te.placeholder((g_count, n), "float32", name="zs")
    r = te.reduce_axis((0, group_size), "r")
    xs = te.compute((m, g_count), lambda i, g: te.sum(x[i, g * group_size + r], axis=r), name="xsum")
    kk = te.reduce_axis((0, group_size), "k")
    mask = tvm.tirx.const(15, "uint32")
    if m > 1:  # codes decoded by their own stage, so a decoded tile serves every row
        qf = te.compute((k, n), lambda kk_, j: ((w[kk_ // 8, j] >> ((kk_ % 8) * 4).astype("uint32")) & mask)
                        .astype("float32"), name="qf")
        part = te.compute((m, g_count, n), lambda i, g, j: te.sum(
            x[i, g * group_size + kk] * qf[g * group_size + kk, j], axis=kk), name="part")
    else:
        part = te.compute((m, g_count, n), lambda i, g, j: te.sum(
            x[i, g * group_size + kk]
            * ((w[(g * group_size + kk) // 8, j] >> ((kk % 8) * 4).astype("uint32")) & mask).astype("float32"),
            axis=kk), name="part")
    gg = te.reduce_axis((0, g_count), "gg")
    y = te.compute((m, n), lambda i, j: te.sum(part[i, gg, j] * sc[gg, j] - xs[i, gg] * zs[gg, j], axis=gg), name="y")
    if m > 1:
        return tvm.compile(_gemm_schedule(te, s_tir, [x, w, sc, zs, y], m, n_tile), target=tvm.target.Target(
            target or DEFAULT_TARGET))
    sch = s_tir.Schedule(te.create_prim_func([x, w, sc, zs, y]))
    by, bp = sch.get_sblock("y"), sch.get_sblock("part")
    i, j, g = sch.get_loops(by)
    jo, ji = sch.split(j, [None, n_tile])
    jio, jii = sch.split(ji, [None, 8])
    sch.reorder(jo, i, g, jio, jii)
    sch.parallel(jo)
    sch.vectorize(jii)
    sch.compute_at(bp, g)
    *_, pj, pk = sch.get_loops(bp)
    pjo, pji = sch.split(pj, [None, 8])
    pko, pki = sch.split(pk, [None, 8])
    sch.reorder(pko, pjo, pki, pji)  # one word load per 8 codes
    sch.unroll(pki)
    sch.unroll(pjo)
    sch.vectorize(pji)
    sch.set_scope(bp, 0, "local")
    sch.decompose_reduction(bp, pko)
    return tvm.compile(sch.mod, target=tvm.target.Target(target or DEFAULT_TARGET))


def _gemm_schedule(te, s_tir, tensors, m: int, n_tile: int):
    """M > 1: decode an [8, n_tile] tile of codes once per group slice, reuse it for all rows."""
    sch = s_tir.Schedule(te.create_prim_func(tensors))
    by, bp, bq = sch.get_sblock("y"), sch.get_sblock("part"), sch.get_sblock("qf")
    i, j, g = sch.get_loops(by)
    jo, ji = sch.split(j, [None, n_tile])
    sch.reorder(jo, g, i, ji)
    _, jii = sch.split(ji, [None, 8])
    sch.parallel(jo)
    sch.vectorize(jii)
    sch.compute_at(bp, g)
    pm, pn, pk = sch.get_loops(bp)[-3:]
    m_block = 4 if m % 4 == 0 else 2 if m % 2 == 0 else 1
    pko, pki = sch.split(pk, [None, 8])
    pmo, pmi = sch.split(pm, [None, m_block])
    pno, pnv, pni = sch.split(pn, [None, 2, 8])
    sch.reorder(pko, pmo, pno, pki, pmi, pnv, pni)
    for loop in (pki, pmi, pnv):
        sch.unroll(loop)
    sch.vectorize(pni)
    sch.compute_at(bq, pko)
    qk, qn = sch.get_loops(bq)[-2:]
    qno, qni = sch.split(qn, [None, 8])
    sch.reorder(qno, qk, qni)
    sch.unroll(qk)
    sch.vectorize(qni)
    sch.set_scope(bp, 0, "local")
    sch.set_scope(bq, 0, "local")
    sch.decompose_reduction(bp, pko)
    return sch.mod
