"""ONNX Runtime benchmarks: finegrain's ONNX exports vs fp32 ONNX and vs ORT's own quantizer.

    python benchmarks/onnx_runtime.py --out results/onnx_runtime [--skip-model] [--max-windows 8]

1. Kernel level: one 4096 x 4096 linear (random N(0, 0.02) weights), M = 1 and M = 16 rows:
   finegrain INT4 g128 exported as QDQ (DequantizeLinear + MatMul, which ORT fuses into
   MatMulNBits) and as MatMulNBits, at accuracy levels 0 and 4, vs the fp32 MatMul; plus ORT's
   ``MatMulNBitsQuantizer`` (RTN) on the fp32 model at the same levels.
2. Model level, bundled SmolLM2-135M: fp32 ONNX; finegrain W4A16 g128 (RTN and GPTQ) exported as
   MatMulNBits; ORT's ``MatMulNBitsQuantizer`` on the fp32 ONNX (RTN and HQQ; asymmetric, block
   128, lm_head left float like finegrain's recipes). Prefill latency (1 x 512 tokens),
   single-token forward latency (1 x 1; the export has no KV cache yet, so this is the weight-read
   bound part of decode, not full decode), WikiText-2 perplexity (seq 2048, first N windows), file
   size. Accuracy level 0 (exact fp32 compute) and 4 (int8 activations) for the quantized ones.

All sessions run in this one process, ``--threads`` intra-op threads (default 2 = this machine's
cores), median and min over ``--kernel-reps`` (kernels; sub-millisecond, so many) or ``--reps``
runs after warm-up. Ratios are against the fp32 row of the
same table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finegrain  # noqa: E402
from finegrain.backends.onnx import make_session  # noqa: E402
from finegrain.eval.report import write_tables  # noqa: E402

ALL_LINEARS = {"pattern": "."}  # a bare nn.Linear feeds the output (role lm_head): match by name


def timeit(fn, reps: int, warmup: int = 3) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3, min(ts) * 1e3


def ort_quantize(src: Path, dst: Path, algo: str, accuracy_level: int, exclude: list[str], block_size: int = 128) -> float:
    """ORT's MatMulNBitsQuantizer (4 bits, block ``block_size``, asymmetric) on an fp32 ONNX file; seconds."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    t = time.perf_counter()
    model = onnx.load(str(src))
    cfg = {"rtn": lambda: mnq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False,
                                                          accuracy_level=accuracy_level),
           "hqq": lambda: mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)}[algo]()
    q = mnq.MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level,
                                 nodes_to_exclude=exclude, algo_config=cfg)
    q.process()
    if algo == "hqq":  # HQQ's config takes no accuracy level: set it on the nodes it wrote
        for n in q.model.model.graph.node:
            if n.op_type == "MatMulNBits":
                for a in n.attribute:
                    if a.name == "accuracy_level":
                        a.i = accuracy_level
                if not any(a.name == "accuracy_level" for a in n.attribute):
                    n.attribute.append(onnx.helper.make_attribute("accuracy_level", accuracy_level))
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    return time.perf_counter() - t


def _output_matmul(path: Path) -> list[str]:
    """Names of MatMul nodes producing the graph output (the LM head), to leave them float."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    outs = {o.name for o in g.output}
    return [n.name for n in g.node if n.op_type == "MatMul" and set(n.output) & outs]


def kernel_bench(out: Path, threads: int, reps: int) -> tuple[list[str], dict]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 4096, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.02)
    payload = {}
    lines = ["### Kernel: 4096 x 4096 linear, INT4 g128 weights (ONNX Runtime CPU, "
             f"{threads} threads, ms median / min over {reps} runs)", "",
             "| variant | M=1 ms | ratio vs fp32 | M=16 ms | ratio vs fp32 |", "|---|---|---|---|---|"]
    res: dict[str, dict[int, tuple[float, float]]] = {}
    for m in (1, 16):
        x = torch.randn(1, m, 4096)
        d = out / f"kernel_m{m}"
        d.mkdir(parents=True, exist_ok=True)
        fp = finegrain.compile(lin, (x,), recipe={"name": "fp32", "rules": []}, progress=False, dynamic=False)
        q = finegrain.compile(lin, (x,), recipe={"name": "int4", "rules": [{**ALL_LINEARS, "weight": "int4-g128-asym-fp16"}]},
                              progress=False, dynamic=False)
        fp.export_onnx(d / "fp32.onnx", overwrite=True)
        files = {"fp32 MatMul": (d / "fp32.onnx", 0)}
        for lvl in (0, 4):
            q.export_onnx(d / f"qdq_acc{lvl}.onnx", style="qdq", accuracy_level=lvl, overwrite=True)
            q.export_onnx(d / f"nbits_acc{lvl}.onnx", style="matmulnbits", accuracy_level=lvl, overwrite=True)
            ort_quantize(d / "fp32.onnx", d / f"ort_rtn_acc{lvl}.onnx", "rtn", lvl, [])
            files[f"finegrain QDQ (ORT-fused), acc {lvl}"] = (d / f"qdq_acc{lvl}.onnx", lvl)
            files[f"finegrain MatMulNBits, acc {lvl}"] = (d / f"nbits_acc{lvl}.onnx", lvl)
            files[f"ORT MatMulNBitsQuantizer RTN, acc {lvl}"] = (d / f"ort_rtn_acc{lvl}.onnx", lvl)
        feed = x.numpy()
        for name, (path, lvl) in files.items():
            s = make_session(path, lvl, threads)
            iname = s.get_inputs()[0].name
            res.setdefault(name, {})[m] = timeit(lambda: s.run(None, {iname: feed}), reps)
    for name, r in res.items():
        cells = []
        for m in (1, 16):
            med, mn = r[m]
            cells += [f"{med:.3f} / {mn:.3f}", f"{res['fp32 MatMul'][m][0] / med:.2f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    payload["kernel"] = {k: {str(m): {"median_ms": v[0], "min_ms": v[1]} for m, v in r.items()} for k, r in res.items()}
    lines.append("")
    return lines, payload


def model_bench(out: Path, threads: int, reps: int, windows: int, seq_len: int) -> tuple[list[str], dict]:
    from finegrain.eval.perplexity import perplexity
    from finegrain.jobs import compile_loaded
    from finegrain.models import load_model

    lm = load_model("smollm2-135m")
    d = out / "smollm2"
    d.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    fp = compile_loaded(lm, {"name": "fp32", "rules": []}, samples=0, progress=False)
    fp.export_onnx(d / "fp32.onnx", overwrite=True)
    export_s = {"fp32": time.perf_counter() - t}
    variants: dict[str, tuple[Path, int]] = {"fp32 ONNX": (d / "fp32.onnx", 0)}
    exclude = _output_matmul(d / "fp32.onnx")
    for recipe in ("w4a16-g128", "w4a16-g128-gptq"):
        t = time.perf_counter()
        cm = compile_loaded(lm, recipe, progress=False)
        compile_s = time.perf_counter() - t
        for lvl in (0, 4):
            t = time.perf_counter()
            cm.export_onnx(d / f"{recipe}_acc{lvl}.onnx", style="matmulnbits", accuracy_level=lvl, overwrite=True)
            export_s[f"{recipe} acc{lvl}"] = time.perf_counter() - t
            variants[f"finegrain {recipe} (MatMulNBits), acc {lvl}"] = (d / f"{recipe}_acc{lvl}.onnx", lvl)
        export_s[f"{recipe} compile"] = compile_s
    for algo in ("rtn", "hqq"):
        for lvl in (0, 4):
            try:
                export_s[f"ort {algo} acc{lvl}"] = ort_quantize(d / "fp32.onnx", d / f"ort_{algo}_acc{lvl}.onnx", algo,
                                                               lvl, exclude)
                variants[f"ORT MatMulNBitsQuantizer {algo.upper()}, acc {lvl}"] = (d / f"ort_{algo}_acc{lvl}.onnx", lvl)
            except Exception as e:  # a quantizer that does not run here is reported, not hidden
                print(f"ORT {algo} quantizer failed: {type(e).__name__}: {e}")
                export_s[f"ort {algo} acc{lvl}"] = f"failed: {type(e).__name__}: {e}"
    rows = {}
    gen = torch.Generator().manual_seed(0)
    prefill = torch.randint(0, 49152, (1, 512), generator=gen).numpy()
    one = prefill[:, :1]
    for name, (path, lvl) in variants.items():
        s = make_session(path, lvl, threads)
        iname = s.get_inputs()[0].name
        run = lambda ids: torch.from_numpy(s.run(None, {iname: ids.numpy() if hasattr(ids, "numpy") else ids})[0])  # noqa: E731
        p = timeit(lambda: s.run(None, {iname: prefill}), reps, warmup=1)
        t1 = timeit(lambda: s.run(None, {iname: one}), reps * 4)
        ppl = perplexity(run, lm.tokenizer, seq_len, windows, progress=False).to_dict()
        size = path.stat().st_size + sum(f.stat().st_size for f in path.parent.glob(path.name + ".data"))
        rows[name] = {"prefill_ms": p, "token_ms": t1, "ppl": ppl["ppl"], "tokens": ppl.get("tokens"), "bytes": size}
        print(name, rows[name], flush=True)
    base = rows["fp32 ONNX"]
    lines = [f"### SmolLM2-135M through ONNX Runtime ({threads} threads; prefill 1 x 512 tokens, single-token "
             f"forward 1 x 1 without KV cache; ms median / min; WikiText-2 test ppl, seq {seq_len}, first "
             f"{windows} windows)", "",
             "| model | MB | prefill ms | prefill speed-up | 1-token ms | 1-token speed-up | ppl |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {r['prefill_ms'][0]:.1f} / {r['prefill_ms'][1]:.1f} | "
                     f"{base['prefill_ms'][0] / r['prefill_ms'][0]:.2f}x | {r['token_ms'][0]:.2f} / {r['token_ms'][1]:.2f} | "
                     f"{base['token_ms'][0] / r['token_ms'][0]:.2f}x | {r['ppl']:.3f} |")
    lines += ["", "Seconds to produce each file (finegrain: compile with calibration, then export; ORT: quantize "
              "the fp32 ONNX): " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in export_s.items()), ""]
    return lines, {"model": rows, "seconds": export_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/onnx_runtime")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20, help="timed runs per model-level variant x 4 (prefill: / 4)")
    ap.add_argument("--kernel-reps", type=int, default=300, help="timed runs per kernel variant (sub-ms: many)")
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    np.random.seed(0)
    out = Path(a.out)
    work = out.parent / (out.name + "_files")
    lines, payload = [f"## ONNX Runtime (measured {time.strftime('%Y-%m-%d')})", ""], {}
    if not a.skip_kernel:
        ln, p = kernel_bench(work, a.threads, a.kernel_reps)
        lines += ln
        payload.update(p)
    if not a.skip_model:
        ln, p = model_bench(work, a.threads, max(a.reps // 4, 3), a.max_windows, a.seq_len)
        lines += ln
        payload.update(p)
    write_tables(out, lines, payload)


if __name__ == "__main__":
    main()
