"""CPU schedules for the TIR functions Relax legalizes a model into (everything but the low-bit
kernels, which come scheduled from ``kernels/``). Untuned TVM on CPU runs every loop serially and
scalar; these rules parallelize and vectorize. Per function, the first rule that applies wins:

1. ``dlight`` CPU GEMV (inner-reduction matrix-vector: decode's fp32 ``lm_head``, ``q k^T``);
2. :func:`matmul` — any batched matmul normalized to ``C[s, i, j] += A[s, i, k] B[s, j, k]``
   (dlight's index analysis); B is repacked per ``n_tile`` column panel into ``[k, j]`` order so
   the micro-kernel (4 rows x 16 columns in registers, 8-lane FMA) reads it contiguously, and
   each panel is reused by every row; the epilogue (bias, residual add) is inlined;
3. small static functions (decode's norms and softmax over one row): :func:`elementwise`, which
   keeps them on one thread: a thread-pool launch costs more than the work;
4. ``dlight`` CPU Reduction (norms, softmax over many rows: one parallel row loop, vectorized
   inner loops);
5. :func:`elementwise` — inline what can be inlined, then fuse, parallelize (when large) and
   vectorize each remaining block.

A rule that raises is skipped (dlight's rules assert on shapes they do not expect). Convolutions
skip rules 1-2 (as implicit GEMMs over a symbolic width they computed wrong values at some sizes).
"""
from __future__ import annotations

PARALLEL_MIN = 1 << 14  # elements below which a loop nest is not worth a thread-pool launch


def _extent(sch, loop) -> int | None:
    from tvm import tirx

    e = sch.get(loop).extent
    return int(e) if isinstance(e, tirx.IntImm) else None


def matmul(func, target, n_tile: int = 64):
    """The rule described in the module docstring, or None where the function is not a matmul."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.gpu.matmul import get_index_map, get_reduction_blocks
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    blocks = [b.block_rv for b in infos]
    red = get_reduction_blocks(sch, blocks)
    if red is None:
        return None
    main = red[0]
    if get_index_map(sch.get(main)) is None:
        return None
    others = [b for b in blocks if sch.get(b).name_hint != sch.get(main).name_hint]
    ra = sch.reindex(main, ("read", 0))
    rb = sch.reindex(main, ("read", 1))
    rc = sch.reindex(main, ("write", 0))
    mm_map, a_map, b_map, c_map = get_index_map(sch.get(main))
    sch.transform_layout(ra, ("write", 0), a_map)
    sch.transform_layout(rb, ("write", 0), b_map)
    sch.transform_layout(rc, ("read", 0), c_map)
    sch.transform_block_layout(main, mm_map)
    sch.transform_layout(rb, ("write", 0), lambda s, j, k: (s, k, j))  # panel: j contiguous
    _, ei, ej, _ = (sch.get(lp).extent for lp in sch.get_loops(main))
    one_row = isinstance(ei, tirx.IntImm) and int(ei) == 1
    padded = not (isinstance(ei, tirx.IntImm) and isinstance(ej, tirx.IntImm))
    if padded:
        # symbolic rows / columns (prefill's attention): pad the iteration space to whole tiles, so the
        # vector loops carry no predicate (a predicated vector loop is scalarized)
        sch.pad_einsum(main, [1, 1 if one_row else 4, n_tile, 1])
        b_buf = sch.get(main).reads[1].source
        names = {sch.get(ra).name_hint, sch.get(rb).name_hint}
        for prod in sch.get_producers(main):
            if sch.get(prod).name_hint in names:
                continue  # this operand needed no padding
            if sch.get(prod).writes[0].source.same_as(b_buf):
                sch.compute_inline(rb)  # the reindex into the padded panel: one packing stage
                rb = prod
            else:
                sch.compute_inline(ra)
                ra = prod
        for cons in sch.get_consumers(main):
            sch.compute_inline(cons)  # the un-padding copy, into the write-out
    sch.compute_inline(ra)
    for b in others:  # producers (a fused transpose) into the reads, epilogues into the write
        for inline in (sch.compute_inline, sch.reverse_compute_inline):
            try:
                inline(b)
                break
            except Exception:  # noqa: BLE001 - not inlinable: it keeps its own loops
                continue
    s, i, j, k = sch.get_loops(main)
    jo, jm, jv, ji = sch.split(j, [None, n_tile // 16, 2, 8])
    io, ii = sch.split(i, [None, 1 if one_row else 4])
    sch.reorder(s, jo, io, jm, k, ii, jv, ji)
    outer = sch.fuse(s, jo)
    sch.parallel(outer)
    sch.reverse_compute_at(rc, jm)  # the tile is written out (with the epilogue) from registers
    sch.set_scope(main, 0, "local")
    rl = sch.get_loops(rc)[-1]
    if not padded and _extent(sch, rl) and _extent(sch, rl) % 8 == 0:
        sch.vectorize(sch.split(rl, [None, 8])[1])
    if one_row:
        sch.compute_inline(rb)  # no reuse across rows: read B where it is
    else:
        sch.compute_at(rb, outer)
        pk, pj = sch.get_loops(rb)[-2:]
        _, pjv = sch.split(pj, [None, 8])
        sch.vectorize(pjv)
    for loop in (ii, jv):
        sch.unroll(loop)
    sch.vectorize(ji)
    sch.decompose_reduction(main, k)
    return sch


def elementwise(func, target):
    """Inline, then per remaining block: split the innermost spatial loop by the vector width and
    vectorize it when its extent is static and divisible (no predicate in the vector loop),
    fuse the loops outside it and parallelize them when the block is large or its size is
    symbolic."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline

    from finegrain.backends.tvm.kernels.lowbit import vector_lanes

    lanes = vector_lanes(target) if target is not None else 8
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    infos = try_inline(sch, infos)
    for info in infos:
        kinds = info.dom_kind()
        loops = sch.get_loops(info.block_rv)
        if not loops or len(kinds) != len(loops):
            continue
        lead = 0
        while lead < len(kinds) and kinds[lead] == "S":
            lead += 1
        if lead == 0:
            continue
        total = 1
        for lp in loops[:lead]:
            e = _extent(sch, lp)
            total = None if e is None or total is None else total * e
        spatial = list(loops[:lead])
        if lead == len(kinds):  # all spatial: vectorize the innermost loop where it divides evenly
            e = _extent(sch, spatial[-1])
            if e is not None and e % lanes == 0:
                outer, vec = sch.split(spatial[-1], [None, lanes])
                sch.vectorize(vec)
                spatial[-1] = outer
            elif e is not None and 2 <= e <= lanes:
                sch.vectorize(spatial.pop())
        if not spatial:
            continue
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        if total is None or total >= PARALLEL_MIN:
            sch.parallel(fused)
    return sch


def small_static(func, target=None):
    """``elementwise`` for functions whose every block has static extents and fewer than
    ``PARALLEL_MIN`` spatial points; None otherwise."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    infos = normalize_prim_func(s_tir.Schedule(func))
    if not infos:
        return None
    for info in infos:
        size = 1
        for it in info.iters:
            if not isinstance(it.dom, (int, tirx.IntImm)):
                return None
            size *= int(it.dom) if it.kind == "S" else 1
        if size >= PARALLEL_MIN:
            return None
    return elementwise(func, target)


def schedule_module(mod, target):
    """Schedule every unscheduled PrimFunc of ``mod`` (see the module docstring); returns the
    module and which rule each function got."""
    import tvm
    from tvm.s_tir import dlight as dl

    rules = [("gemv", dl.cpu.GEMV().apply), ("matmul", matmul), ("small", small_static),
             ("reduction", dl.cpu.Reduction().apply), ("elementwise", elementwise)]
    used: dict[str, str] = {}
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and "tirx.is_scheduled" in func.attrs):
            continue
        for name, rule in rules:
            if name in ("gemv", "matmul") and "conv" in gv.name_hint:
                # dlight's index analysis maps a convolution onto an implicit GEMM; with a symbolic spatial
                # size the panel layout reads past the input (wrong results at some widths): convs take
                # the rules below
                continue
            try:
                with target:
                    sch = rule(func, target, False) if name in ("gemv", "reduction") else rule(func, target)
            except Exception:  # noqa: BLE001 - a rule that does not fit this function
                sch = None
            if isinstance(sch, list):
                sch = sch[0] if sch else None
            if sch is not None:
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                used[gv.name_hint] = name
                break
        else:
            used[gv.name_hint] = "none"
    for gv, f in updates.items():
        mod[gv] = f
    return mod, used
