"""fp32 matrix-vector product ``y[1, n] = x[1, :] . W[n, :]`` on a weight stored ``[N, K]`` (a
float linear at decode, e.g. a tied ``lm_head``): memory-bound, so the schedule streams each row
once with ``lanes``-wide partial sums for ``rows`` rows at a time (independent FMA chains), the
rows split over the cores, and one horizontal sum per row at the end.
"""
from __future__ import annotations

from finegrain.backends.tvm.kernels import memoized


@memoized
def gemv_func(k: int, n: int, lanes: int = 8, rows: int = 2, n_tile: int = 256):
    """The scheduled PrimFunc ``f(x[1, k], w[n, k], y[1, n])``; needs ``K % lanes == 0``."""
    import tvm.s_tir as s_tir
    from tvm import te

    if k % lanes:
        raise ValueError(f"dense gemv: K={k} is not a multiple of {lanes}")
    x = te.placeholder((1, k), "float32", name="x")
    w = te.placeholder((n, k), "float32", name="w")
    ko = te.reduce_axis((0, k // lanes), "ko")
    part = te.compute((1, n, lanes), lambda i, j, l: te.sum(x[i, ko * lanes + l] * w[j, ko * lanes + l], axis=ko),
                      name="part")
    li = te.reduce_axis((0, lanes), "li")
    y = te.compute((1, n), lambda i, j: te.sum(part[i, j, li], axis=li), name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, w, y]))
    by, bp = sch.get_sblock("y"), sch.get_sblock("part")
    i, j, _ = sch.get_loops(by)
    jo, jb, jr = sch.split(j, [None, max(n_tile // rows, 1), rows])
    sch.parallel(jo)
    sch.compute_at(bp, jb)
    pj, pl, pk = sch.get_loops(bp)[-3:]
    sch.reorder(pk, pj, pl)
    sch.unroll(pj)
    sch.vectorize(pl)
    sch.set_scope(bp, 0, "local")
    sch.decompose_reduction(bp, pk)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
