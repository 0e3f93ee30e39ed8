"""Activation outliers of every linear input, before and after the folds, on the bundled SmolLM2.

    python benchmarks/outliers.py --out results/outliers

Runs the fold passes of three recipes (none; rotation = QuaRot; smoothing = SmoothQuant) and the
calibration pass on Brown calibration text, then reports per linear input: max|x| and the
kurtosis E[x^4] / E[x^2]^2 (about zero; from the stats store's sample of |x|, 3 for a Gaussian).
Writes ``<out>.md``, ``<out>.json`` and ``<out>.png`` (needs matplotlib, the ``plot`` extra).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finegrain.compiler.capture import capture  # noqa: E402
from finegrain.compiler.ir import quantizable_ops  # noqa: E402
from finegrain.driver.pipeline import PassContext, run_passes  # noqa: E402
from finegrain.compiler.recipe import get_recipe  # noqa: E402
from finegrain.eval.perplexity import calibration_batches  # noqa: E402
from finegrain.eval.report import pyplot, write_tables  # noqa: E402
from finegrain.models import load_model  # noqa: E402
from finegrain.passes.calibrate import calibrate  # noqa: E402
from finegrain.passes.canonicalize import canonicalize  # noqa: E402
from finegrain.passes.fold_norms import fold_norms  # noqa: E402
from finegrain.passes.fold_rotation import fold_rotation  # noqa: E402
from finegrain.passes.fold_smoothing import fold_smoothing  # noqa: E402

VARIANTS = {  # label -> (recipe, passes after canonicalize)
    "none": ("w4a4-g128", [calibrate]),
    "rotation": ("w4a4-rot", [fold_norms, fold_rotation, calibrate]),
    "smoothquant": ("w8a8-smooth", [calibrate, fold_smoothing, calibrate]),
}


def _stats(gm, ctx) -> dict[str, dict]:
    out = {}
    for op in quantizable_ops(gm):
        key = op.activation.name
        if op.kind != "linear" or key not in ctx.stats or op.role == "lm_head":
            continue
        st = ctx.stats[key]
        s = st.sample.double()
        out.setdefault(key, {"layers": [], "max": float(st.absmax.max()),
                             "kurtosis": float(s.pow(4).mean() / s.pow(2).mean().pow(2))})["layers"].append(op.name)
    return {" + ".join(v["layers"]): {"max": v["max"], "kurtosis": v["kurtosis"]} for v in out.values()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/outliers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m")
    calib = calibration_batches(lm.tokenizer, args.calib_samples, args.calib_seq_len, 0)
    example = calib[0]
    results, seconds = {}, {}
    for label, (recipe, passes) in VARIANTS.items():
        t0 = time.perf_counter()
        gm = canonicalize(capture(lm.model, example), None)
        ctx = PassContext(recipe=get_recipe(recipe), calibration=calib, show_progress=False)
        gm = run_passes(gm, ctx, [(p.__name__, p) for p in passes])
        results[label] = _stats(gm, ctx)
        seconds[label] = round(time.perf_counter() - t0, 1)
        print(label, seconds[label], "s", flush=True)
    write_report(args, results, seconds)


def write_report(args, results: dict, seconds: dict) -> None:
    labels = list(results)
    sites = list(results["none"])
    short = [s.split(" + ")[0].replace("model.layers.", "L").replace(".self_attn", "").replace(".mlp", "")
             for s in sites]
    lines = [f"# Linear-input outliers on SmolLM2-135M ({args.calib_samples} x {args.calib_seq_len} Brown tokens)", "",
             "max|x| and kurtosis E[x^4]/E[x^2]^2 (3 = Gaussian) of each linear's input, per fold variant "
             "(rotation: QuaRot residual rotation + online Hadamard at o_proj/down_proj; smoothquant: alpha "
             "searched per site for W8A8).", "",
             "| input of | " + " | ".join(f"max ({v}) | kurt ({v})" for v in labels) + " |",
             "|---|" + "---|---|" * len(labels)]
    for site, name in zip(sites, short):
        cells = []
        for v in labels:
            r = results[v].get(site)
            cells += [f"{r['max']:.1f}", f"{r['kurtosis']:.1f}"] if r else ["-", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for v in labels:
        ms = [r["max"] for r in results[v].values()]
        ks = [r["kurtosis"] for r in results[v].values()]
        lines.append(f"\n{v}: median max|x| {sorted(ms)[len(ms) // 2]:.2f}, worst {max(ms):.1f}; median kurtosis "
                     f"{sorted(ks)[len(ks) // 2]:.1f}, worst {max(ks):.1f} ({seconds[v]} s)")
    out = Path(args.out)
    write_tables(out, lines, {"results": results, "seconds": seconds, "args": vars(args)})
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    for v in labels:
        axes[0].semilogy([results[v].get(s, {}).get("max", float("nan")) for s in sites], ".-", label=v)
        axes[1].semilogy([results[v].get(s, {}).get("kurtosis", float("nan")) for s in sites], ".-", label=v)
    axes[0].set_ylabel("max |x|")
    axes[1].set_ylabel("kurtosis")
    axes[1].set_xticks(range(len(sites)), short, rotation=90, fontsize=5)
    axes[0].legend()
    axes[0].set_title("SmolLM2-135M linear inputs: outliers before/after folds")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=130)


if __name__ == "__main__":
    main()
