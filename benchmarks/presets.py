"""FP and every preset side by side, in one process, on the bundled SmolLM2 (and MiniLM).

    python benchmarks/presets.py --seq-len 2048 --max-windows 0 --out results/presets

Writes ``<out>.md`` and ``<out>.json``: perplexity on WikiText-2 test, true bits per quantized
weight (scales and zero points included), model bytes (every stored tensor), compile seconds
(capture + calibration on ``--calib-samples`` x ``--calib-seq-len`` Brown tokens + passes), and
for MiniLM the sentence-embedding cosine similarity FP vs quantized.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finegrain.eval.report import write_tables  # noqa: E402
from finegrain.eval.size import fp_bytes  # noqa: E402
from finegrain.jobs import compile_loaded, evaluate_encoder, evaluate_lm  # noqa: E402
from finegrain.models import load_model  # noqa: E402

DEFAULT_PRESETS = ["w8a8", "w8a8-static", "w4a16-g128", "w4a16-g64", "w3a16-g128", "w4a8-g128"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=0, help="0 = every window of WikiText-2 test")
    ap.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--minilm-presets", nargs="*", default=["w8a8", "w8a16", "w4a16-g128"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/presets")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, t_start = [], time.time()

    lm = load_model("smollm2-135m")
    res = evaluate_lm(lm, lm.tokenizer, args.seq_len, args.max_windows or None)
    rows.append({"model": "smollm2-135m", "recipe": "fp32", "bits_per_weight": 32.0, "model_bytes": fp_bytes(lm.model),
                 "compile_s": 0.0, **res})
    print(rows[-1], flush=True)
    for name in args.presets:
        cm = compile_loaded(lm, name, samples=args.calib_samples, seq_len=args.calib_seq_len, progress=False)
        res = evaluate_lm(cm, lm.tokenizer, args.seq_len, args.max_windows or None)
        rows.append({"model": "smollm2-135m", "recipe": name, "bits_per_weight": cm.quantized_bits_per_weight(),
                     "model_bytes": cm.model_bytes(), "compile_s": cm.timings["total"], "timings": cm.timings, **res})
        print(rows[-1], flush=True)
        write_report(args, rows, [], time.time() - t_start)  # partial results survive an interrupted run
        del cm
        gc.collect()

    enc_rows = []
    if args.minilm_presets:
        enc = load_model("minilm-l6")
        for name in args.minilm_presets:
            cm = compile_loaded(enc, name, samples=64, seq_len=128, progress=False)
            enc_rows.append({"model": "minilm-l6", "recipe": name, "bits_per_weight": cm.quantized_bits_per_weight(),
                             "model_bytes": cm.model_bytes(), "fp_bytes": fp_bytes(enc.model),
                             "compile_s": cm.timings["total"], **evaluate_encoder(enc, cm)})
            print(enc_rows[-1], flush=True)

    write_report(args, rows, enc_rows, time.time() - t_start)


def write_report(args, rows: list[dict], enc_rows: list[dict], seconds: float) -> None:
    fp = rows[0]["ppl"]
    lines = [f"# finegrain presets on SmolLM2-135M-Instruct (WikiText-2 test, seq {args.seq_len}, "
             f"{rows[0]['windows']}/{rows[0]['windows_available']} windows, {rows[0]['tokens']} tokens)", "",
             f"Calibration: {args.calib_samples} x {args.calib_seq_len} Brown tokens. lm_head/embedding kept fp32. "
             f"torch threads: {args.threads}. Total run: {seconds:.0f} s.", "",
             "| recipe | ppl | Δppl vs FP | bits/weight (quantized linears) | model MB | compile s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['ppl']:.3f} | {100 * (r['ppl'] / fp - 1):+.2f}% | {r['bits_per_weight']:.3f} | "
                     f"{r['model_bytes'] / 1e6:.1f} | {r['compile_s']:.1f} |")
    if enc_rows:
        lines += ["", "## MiniLM-L6 sentence embeddings, FP vs quantized (256 WikiText-2 sentences)", "",
                  "| recipe | cosine mean | cosine min | bits/weight | model MB (fp32 MB) |", "|---|---|---|---|---|"]
        for r in enc_rows:
            lines.append(f"| {r['recipe']} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | {r['bits_per_weight']:.3f} | "
                         f"{r['model_bytes'] / 1e6:.1f} ({r['fp_bytes'] / 1e6:.1f}) |")
    write_tables(args.out, lines, {"lm": rows, "encoder": enc_rows, "args": vars(args)})


if __name__ == "__main__":
    main()
