"""Relax IRModule -> a TVM executable for CPU: legalize, fuse, schedule, compile.

The pipeline is TVM's CPU pipeline (``relax.backend.cpu_generic``) with one stage added between
fusion and lowering: :func:`schedules.schedule_module` (or MetaSchedule, when ``tune_trials`` > 0,
with the hand schedules as the fallback for what it did not tune). The low-bit kernels arrive
scheduled and marked opaque, so fusion leaves them alone.
"""
from __future__ import annotations

import time
from pathlib import Path

def host_target() -> dict:
    """A target for this machine: LLVM's name for the host CPU and the cores this process may use."""
    import os

    import tvm

    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "num-cores": len(os.sched_getaffinity(0))}


def build_executable(mod, target: dict, tune_trials: int = 0, work_dir: str | Path | None = None,
                     progress: bool = False):
    """``(executable, report)``; report: seconds per stage and which schedule each function got."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from finegrain.backends.tvm.schedules import schedule_module

    tgt = tvm.target.Target(target)
    report: dict = {"target": target}
    t = time.perf_counter()
    with tgt:
        mod = tvm.transform.Sequential(cpu.library_dispatch_passes(tgt) + cpu.legalize_passes(tgt))(mod)
    report["legalize_s"] = round(time.perf_counter() - t, 2)
    if tune_trials > 0:
        from finegrain.backends.tvm.tune import tune_module

        t = time.perf_counter()
        mod, report["tuning"] = tune_module(mod, tgt, tune_trials, Path(work_dir), progress=progress)
        report["tune_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    mod, used = schedule_module(mod, tgt)
    report["schedule_s"] = round(time.perf_counter() - t, 2)
    report["schedules"] = {k: sum(1 for v in used.values() if v == k) for k in sorted(set(used.values()))}
    report["unscheduled"] = sorted(k for k, v in used.items() if v == "none")
    report["rules"] = dict(sorted(used.items()))
    t = time.perf_counter()
    with tgt:
        mod = tvm.transform.Sequential(cpu.dataflow_lower_passes(tgt) + cpu.finalize_passes(tgt))(mod)
    ex = tvm.compile(mod, target=tgt, relax_pipeline=None)
    report["codegen_s"] = round(time.perf_counter() - t, 2)
    return ex, report
