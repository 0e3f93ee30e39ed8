"""Optional MetaSchedule tuning (``--tune-trials N``) with a persistent JSON database.

What is tuned: the static-shape, not yet scheduled TIR functions that contain a reduction (the
decode function's fp32 matmuls / GEMVs, norms, softmax), the kind MetaSchedule can measure; the
low-bit kernels keep their hand schedules and symbolic-shape (prefill) functions get the hand
rules of ``schedules.py``. The database lives in ``work_dir`` (``<deploy>/tuning``); a later
build into the same directory starts from it, so records are reused, not re-measured.

Two toolchain facts (TOOLCHAIN.md) are handled here: importing ``tvm.s_tir.tensor_intrin`` takes
30-70 s here, and both MetaSchedule's ``TuneContext`` (in this process) and its LocalBuilder workers
import it, the workers timing out; no tensor intrinsics are used (the default ``llvm`` schedule rules
take none), so the module is stubbed in the workers (their initializer) and, for the duration of the
tuning only, in this process (a real import afterwards still gets the real module); the builder's
timeout is raised. The cost model is ``random`` (xgboost is not a dependency).
"""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from pathlib import Path

_INTRIN = "tvm.s_tir.tensor_intrin"


def _stub_tensor_intrin() -> None:
    sys.modules.setdefault(_INTRIN, types.ModuleType(_INTRIN))


@contextmanager
def _no_tensor_intrin():
    """``tvm.s_tir.tensor_intrin`` stubbed in this process while the block runs (unless it is
    already imported), removed again after, so a later import loads the real module."""
    stub = None if _INTRIN in sys.modules else types.ModuleType(_INTRIN)
    if stub is not None:
        sys.modules[_INTRIN] = stub
    try:
        yield
    finally:
        if stub is not None and sys.modules.get(_INTRIN) is stub:
            del sys.modules[_INTRIN]


def tunable(func) -> bool:
    """A static-shape, unscheduled PrimFunc with a reduction block."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    if not isinstance(func, tirx.PrimFunc) or (func.attrs and "tirx.is_scheduled" in func.attrs):
        return False
    try:
        infos = normalize_prim_func(s_tir.Schedule(func))
    except Exception:  # noqa: BLE001 - not analyzable: leave it to the hand rules
        return False
    if not infos:
        return False
    iters = [it for info in infos for it in info.iters]
    return all(isinstance(it.dom, (int, tirx.IntImm)) for it in iters) and any(it.kind == "R" for it in iters)


def tune_module(mod, target, trials: int, work_dir: Path, progress: bool = False):
    """Tune ``mod``'s tunable functions for ``trials`` trials in all, apply the database (old
    records included); returns ``(mod, report)``."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    import logging

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.INFO if progress else logging.WARNING)
    db_files = (str(work_dir / "database_workload.json"), str(work_dir / "database_tuning_record.json"))
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if tunable(f)}
    old = ms.database.JSONDatabase(*db_files)
    known = {name for name, f in funcs.items()
             if old.has_workload(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}))}  # as tune_tir keys them
    report = {"trials": trials, "tasks": len(funcs), "reused": len(known), "work_dir": work_dir.name}
    funcs = {name: f for name, f in funcs.items() if name not in known}
    if funcs:
        sub = tvm.IRModule(funcs)
        builder = ms.builder.LocalBuilder(timeout_sec=120, initializer=_stub_tensor_intrin)
        with _no_tensor_intrin():
            ms.tir_integration.tune_tir(sub, target, str(work_dir), max_trials_global=trials,
                                        num_trials_per_iter=min(16, trials), builder=builder, cost_model="random",
                                        database="json", num_tuning_cores=1, seed=0)
    before = {gv.name_hint for gv, f in mod.functions_items() if f.attrs and "tirx.is_scheduled" in f.attrs}
    with target:
        mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
    after = {gv.name_hint for gv, f in mod.functions_items() if f.attrs and "tirx.is_scheduled" in f.attrs}
    report["applied"] = len(after - before)
    report["records"] = len(ms.database.JSONDatabase(*db_files))
    return mod, report
