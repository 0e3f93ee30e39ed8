"""TVM build time on the bundled SmolLM2: one export trace per function against two.

    python benchmarks/tvm_build.py [--recipe w4a16-g128] [--rounds 2] [--max-seq-len 512] [--out results/tvm_build]

A TVM build imports the graph twice (prefill, decode) through ``torch.export``; TVM's frontend
needs it decomposed to core ATen. ``torch.export.export`` then ``run_decompositions`` traces each
function twice; ``compiler.capture.export_decomposed`` traces it once at ATen dispatch with the
table (the default on the pinned torch). Both builds run in this process on the same compiled
KV-cache model (``cm.build(backend="tvm")`` path: ``backends.tvm.deploy.build_deployment``), rows
interleaved over ``--rounds`` (this machine's speed drifts), and the report gives each build's
seconds (import = export + Relax conversion; legalize, schedule, codegen) and the ratio of the
medians. Both deployments are then run on the same prompt: their logits must be equal.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="w4a16-g128")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--out", default="results/tvm_build")
    a = ap.parse_args()

    import finegrain.backends.tvm.lower as lower
    from finegrain.backends.tvm.deploy import build_deployment
    from finegrain.compiler.capture import export_decomposed
    from finegrain.jobs import compile_loaded
    from finegrain.models import load_model

    model = load_model("smollm2-135m")
    cm = compile_loaded(model, a.recipe, samples=2, seq_len=128, progress=False, kv_cache=True)
    rows = {"two traces (export + run_decompositions)": False, "one trace (export_decomposed)": True}
    times: dict = {name: [] for name in rows}
    reports: dict = {}
    deployments: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, one in rows.items():
                lower.export_decomposed = functools.partial(export_decomposed, one_trace=one)
                out = Path(tmp) / f"{int(one)}-{r}"
                t = time.perf_counter()
                rep = build_deployment(cm, out, max_seq_len=a.max_seq_len)
                times[name].append(time.perf_counter() - t)
                reports[name] = {k: v for k, v in rep.get("build", {}).items() if k.endswith("_s")}
                deployments[name] = out
                print(f"round {r} {name}: {times[name][-1]:.1f} s {reports[name]}", flush=True)
        lower.export_decomposed = export_decomposed
        from finegrain.backends.tvm.deploy import TvmDeployment

        ids = torch.arange(1, 33)[None]
        logits = [TvmDeployment(p).run(ids) for p in deployments.values()]
        same = all(torch.equal(x, logits[0]) for x in logits[1:])
    med = {name: statistics.median(v) for name, v in times.items()}
    base, fast = med.values()
    result = {"recipe": a.recipe, "max_seq_len": a.max_seq_len, "rounds": a.rounds, "seconds": times,
              "median_s": med, "last_report": reports, "ratio_two_over_one": base / fast,
              "logits_equal": same, "torch": torch.__version__}
    print("| build | median s | import s (last) |\n|---|---|---|")
    for name in rows:
        print(f"| {name} | {med[name]:.1f} | {reports[name].get('import_s')} |")
    print(f"one trace: {base / fast:.2f}x faster build; deployments' logits equal: {same}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tvm_build.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
