"""Weight-only 4 / 3-bit accuracy on SmolLM2 (issue #18's protocol), with a held-out check.

    python benchmarks/w4_accuracy.py --out results/w4_accuracy

FP and each recipe in one process: perplexity on the first ``--windows`` WikiText-2 test windows
of ``--seq-len`` (the windows the comparison is quoted on) and on ``--windows`` held-out windows
from ``--held-out-from`` on (never looked at while choosing recipes), true bits per quantized
weight, compile seconds (capture + calibration + passes, ``--calib-samples`` x ``--calib-seq-len``
Brown tokens unless a recipe sets its own). Recipes are preset names, or ``name:preset:k=v,k=v``
for a preset with fields overridden (values as JSON), e.g. ``gptq-nonseq:w4a16-g128-gptq:sequential=false``.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine  # noqa: E402
from finegrain.compiler.recipe import get_recipe  # noqa: E402
from finegrain.eval.report import write_tables  # noqa: E402
from finegrain.jobs import compile_loaded, evaluate_lm  # noqa: E402
from finegrain.models import load_model  # noqa: E402

DEFAULT = ["w4a16-g128", "w4a16-g128-clip", "gptq-nonseq:w4a16-g128-gptq:sequential=false", "w4a16-g128-gptq",
           "w4a16-g128-awq", "w4a16-g128-awq-gptq", "w4a16-g64", "w4a16-g64-gptq", "w3a16-g128-gptq",
           "w3a16-g128-awq-gptq"]


def parse(spec: str):
    """``preset`` or ``name:preset:k=v,k=v`` -> (row name, Recipe)."""
    if ":" not in spec:
        return spec, get_recipe(spec)
    name, preset, *rest = spec.split(":")
    over = {}
    for item in ",".join(rest).split(","):
        if item:
            k, v = item.split("=", 1)
            over[k] = json.loads(v)
    return name, dataclasses.replace(get_recipe(preset), name=name, **over)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=DEFAULT)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--held-out-from", type=int, default=100, help="first held-out window (0 = no held-out rows)")
    ap.add_argument("--calib-samples", type=int, default=None, help="default: each recipe's calibration_samples")
    ap.add_argument("--calib-seq-len", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/w4_accuracy")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m")

    def measure(obj) -> dict:
        res = {"ppl": evaluate_lm(obj, lm.tokenizer, args.seq_len, args.windows, progress=False)["ppl"]}
        if args.held_out_from:
            res["held_out_ppl"] = evaluate_lm(obj, lm.tokenizer, args.seq_len, args.windows, progress=False,
                                              first_window=args.held_out_from)["ppl"]
        return res

    rows = [{"recipe": "fp32", "bits_per_weight": 32.0, "compile_s": 0.0, **measure(lm)}]
    print(rows[-1], flush=True)
    t_start = time.time()
    for spec in args.recipes:
        name, recipe = parse(spec)
        cm = compile_loaded(lm, recipe, samples=args.calib_samples, seq_len=args.calib_seq_len, progress=False)
        rows.append({"recipe": name, "bits_per_weight": cm.quantized_bits_per_weight(),
                     "compile_s": cm.timings["total"], "timings": cm.timings, "config": recipe.to_dict(), **measure(cm)})
        print({k: v for k, v in rows[-1].items() if k not in ("config", "timings")}, flush=True)
        report(args, rows, time.time() - t_start)
        del cm
        gc.collect()


def report(args, rows: list[dict], seconds: float) -> None:
    fp = rows[0]
    held = bool(args.held_out_from)
    lines = [f"# Weight-only accuracy, SmolLM2-135M-Instruct, WikiText-2 test windows 0-{args.windows - 1} of "
             f"{args.seq_len}" + (f", held out {args.held_out_from}-{args.held_out_from + args.windows - 1}" if held else ""),
             "", f"{machine.line()}; {args.threads} threads; {seconds:.0f} s. Calibration: Brown, recipe defaults "
             "unless overridden (`--calib-samples`).", "",
             "| recipe | ppl | Δ vs FP | held-out ppl | held-out Δ | bits/weight | compile s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ho = (f"{r['held_out_ppl']:.3f} | {100 * (r['held_out_ppl'] / fp['held_out_ppl'] - 1):+.2f}%" if held else "- | -")
        lines.append(f"| {r['recipe']} | {r['ppl']:.3f} | {100 * (r['ppl'] / fp['ppl'] - 1):+.2f}% | {ho} | "
                     f"{r['bits_per_weight']:.3f} | {r['compile_s']:.1f} |")
    write_tables(args.out, lines, {"rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
