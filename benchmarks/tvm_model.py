"""Whole-model TVM benchmark (issue #7, table 2): bundled SmolLM2-135M, W4A16 g128 (RTN) by default.

    python benchmarks/tvm_model.py --out results/tvm_model [--prefill 128 512] [--max-windows 4]
    python benchmarks/tvm_model.py --recipe w4a8-dgq --fp32-compute --out results/tvm_model_dgq

Rows, all in this one process with ``--threads`` threads:
* torch fp32 eager (the float model, ``inference_mode``), the baseline of the ratios;
* the finegrain torch reference (dequantize-then-matmul; what every backend is checked against);
* the finegrain TVM deployment (``cm.build``; target = this CPU); with ``--fp32-compute`` also a
  second deployment built with ``int8=False``, so a W4A8 recipe's linears run the fp32-compute
  kernel on fake-quantized activations instead of integer dot products (same numbers, other kernel);
* the finegrain ONNX export (MatMulNBits, accuracy level 0 = exact fp32 compute, and level 4 =
  int8 activations) in ONNX Runtime.

"Decode" is a 1-token forward: no backend has a KV cache yet, so it is the weight-read part of
a decode step (all weights, one token), not full decode. Prefill is ``1 x P`` tokens. ms median /
min over ``--reps`` runs after warm-up. Perplexity: WikiText-2 test, seq 2048, first
``--max-windows`` windows, for the torch reference and the TVM deployment (they must agree).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/tvm_model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--max-windows", type=int, default=4)
    ap.add_argument("--recipe", default="w4a16-g128")
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--fp32-compute", action="store_true",
                    help="also build the deployment with int8=False (W4A8 linears on the fp32-compute kernel)")
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    torch.set_num_threads(a.threads)

    import finegrain
    import finegrain.backends.tvm  # noqa: F401  (thread count before TVM's pool starts)
    from finegrain.backends.onnx import make_session
    from finegrain.backends.tvm.build import host_target
    from finegrain.eval.perplexity import perplexity
    from finegrain.eval.report import write_tables
    from finegrain.jobs import compile_loaded
    from finegrain.models import load_model
    from onnx_runtime import timeit
    from tvm_kernels import _cpu_name

    out = Path(a.out)
    work = out.parent / (out.name + "_files")
    work.mkdir(parents=True, exist_ok=True)
    lm = load_model("smollm2-135m")
    t = time.perf_counter()
    cm = compile_loaded(lm, a.recipe, progress=False)
    compile_s = time.perf_counter() - t
    target = {**host_target(), "num-cores": a.threads}
    max_seq = max(2048, *a.prefill)
    t = time.perf_counter()
    manifest = cm.build(work / "deploy", target=target, max_seq_len=max_seq, overwrite=True)
    build_s = time.perf_counter() - t
    dep = finegrain.load(work / "deploy", allow_native=True)  # built by this script
    deploy_bytes = sum((work / "deploy" / f).stat().st_size for f in manifest["files"])

    gen = torch.Generator().manual_seed(0)
    shapes = {"decode": 1, **{f"prefill {p}": p for p in a.prefill}}
    inputs = {k: torch.randint(0, 49152, (1, n), generator=gen) for k, n in shapes.items()}
    model = lm.model.eval()

    def fp32(ids):
        with torch.inference_mode():
            out = model(ids)
        return out.logits if hasattr(out, "logits") else out

    runners = {"torch fp32 eager": fp32, "finegrain torch reference (W4 dequantize + matmul)": cm,
               "finegrain TVM deployment": dep}
    if a.fp32_compute:
        cm.build(work / "deploy_fp32", target=target, max_seq_len=max_seq, overwrite=True, int8=False)
        runners["finegrain TVM deployment, fp32 compute (int8=False)"] = finegrain.load(work / "deploy_fp32", allow_native=True)
    if not a.skip_onnx:
        for lvl in (0, 4):
            path = work / f"w4_matmulnbits_acc{lvl}.onnx"
            cm.export_onnx(path, style="matmulnbits", accuracy_level=lvl, overwrite=True)
            s = make_session(path, lvl, a.threads)
            name = s.get_inputs()[0].name
            runners[f"finegrain ONNX MatMulNBits, ORT level {lvl}"] = (
                lambda ids, s=s, name=name: torch.from_numpy(s.run(None, {name: ids.numpy()})[0]))
    ref = {k: cm(v) for k, v in inputs.items()}
    rows, errs = {}, {}
    for rname, run in runners.items():
        rows[rname] = {}
        for k, ids in inputs.items():
            reps = a.reps if rname != "finegrain torch reference (W4 dequantize + matmul)" else max(3, a.reps // 3)
            rows[rname][k] = timeit(lambda: run(ids), reps if k == "decode" else max(3, reps // 2), warmup=2)
            got = run(ids)
            errs.setdefault(rname, {})[k] = float((got - ref[k]).abs().max() / ref[k].abs().max())
        print(rname, rows[rname], errs[rname], flush=True)
    ppl = {}
    for rname in ("finegrain torch reference (W4 dequantize + matmul)", "finegrain TVM deployment"):
        ppl[rname] = perplexity(runners[rname], lm.tokenizer, 2048, a.max_windows, progress=False).to_dict()["ppl"]
    ppl["torch fp32 eager"] = perplexity(fp32, lm.tokenizer, 2048, a.max_windows, progress=False).to_dict()["ppl"]

    base = rows["torch fp32 eager"]
    head = "| backend | " + " | ".join(f"{k} ms | vs fp32" for k in shapes) + " | max rel. diff vs reference |"
    kinds = sorted({k["kind"] for k in manifest["kernels"].values()})
    lines = [f"## SmolLM2-135M {a.recipe} through TVM (measured {time.strftime('%Y-%m-%d')}, {a.threads} threads, "
             f"CPU: {_cpu_name()}, TVM target {target}; ms median / min)", "",
             "decode = a 1-token forward without KV cache (weight-read part of decode); prefill P = 1 x P tokens. "
             f"TVM kernels of the quantized linears: {', '.join(kinds)}.", "",
             head, "|---|" + "---|---|" * len(shapes) + "---|"]
    for rname, r in rows.items():
        cells = []
        for k in shapes:
            cells += [f"{r[k][0]:.2f} / {r[k][1]:.2f}", f"{base[k][0] / r[k][0]:.2f}x"]
        lines.append(f"| {rname} | " + " | ".join(cells) + f" | {max(errs[rname].values()):.1e} |")
    b = manifest["build"]
    lines += ["", f"WikiText-2 ppl (seq 2048, first {a.max_windows} windows): "
              + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()), "",
              f"finegrain compile {compile_s:.1f} s; TVM build {build_s:.1f} s (import {b['import_s']} s, legalize "
              f"{b['legalize_s']} s, schedule {b['schedule_s']} s, codegen {b['codegen_s']} s); deployment "
              f"{deploy_bytes / 1e6:.1f} MB (model.so {(work / 'deploy' / 'model.so').stat().st_size / 1e6:.1f} MB, "
              f"params.bin {(work / 'deploy' / 'params.bin').stat().st_size / 1e6:.1f} MB); functions by schedule: "
              + ", ".join(f"{k} {v}" for k, v in b["schedules"].items()), ""]
    write_tables(a.out, lines, {"rows": rows, "rel_err": errs, "ppl": ppl, "build": b, "build_s": build_s,
                                "compile_s": compile_s, "deploy_bytes": deploy_bytes, "target": target})


if __name__ == "__main__":
    main()
