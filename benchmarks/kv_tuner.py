"""KVTuner-style layer-wise KV precision on SmolLM2 (issue #17; ``finegrain/driver/kv_tune.py``):
float weights, KIVI settings (keys per channel over 32-token groups, values per token in groups of
32, the newest 128 tokens in float, pre-RoPE keys, one sink). Per layer and (K bits, V bits) pair
in {2, 3, 4, 8}^2 (``--bits``: another set, e.g. ``2,4,8``), the attention-output error
(``--objective attention``), the next-token loss increase (``--objective loss``) or the attention error
times the layer's loss / error slope (``--objective gain``) with only that
layer quantized (Brown calibration, ``--calib`` windows of 512 tokens); each layer's pairs pruned to
its Pareto front; the knapsack picks one pair per layer at each average-bits budget; perplexity
through the cache on the first ``--windows`` WikiText-2 windows of 2048 (as ``kv_quant.py``), next to uniform KIVI-4 / KIVI-2.

Every candidate is in the Hadamard-rotated space (``kv_rotate``: pre-RoPE keys and values rotated per
head, the queries and the attention output to match) as ``pareto --kv`` searches; ``--unrotated``
without it.

    python benchmarks/kv_tuner.py [--budgets 2.5,3,3.25,4] [--windows 4] [--calib 4] [--objective attention|loss|gain]
                                  [--bits 2,3,4,8] [--unrotated] [--out results/kv_tuner]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_quant import both_ppl  # noqa: E402

FMT = "int{}-g32-asym-fp16-dyn"
from finegrain.jobs import KV_TUNE_BITS, KV_TUNE_FIELDS as FIELDS  # noqa: E402  (`pareto --kv`'s settings)


def pairs(bits: tuple[int, ...]) -> list[tuple[str, str]]:
    return [(FMT.format(k), FMT.format(v)) for k in bits for v in bits]


def _bits(tag: str) -> int:
    from finegrain.formats import QuantFormat

    return QuantFormat.parse(tag).bits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="2.5,3,3.25,4")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--calib", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--objective", choices=["attention", "loss", "gain"], default="attention")
    ap.add_argument("--unrotated", action="store_true", help="candidates without kv_rotate (the Hadamard rotation)")
    ap.add_argument("--bits", default=",".join(map(str, KV_TUNE_BITS)),
                    help="the K / V bit widths searched (pairs of every two)")
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform KIVI rows (float and tuned only)")
    ap.add_argument("--out", default="results/kv_tuner")
    args = ap.parse_args()
    PAIRS = pairs(tuple(int(b) for b in args.bits.split(",")))
    fields = {k: v for k, v in FIELDS.items() if k != "kv_rotate"} if args.unrotated else FIELDS
    tag = ", rotated" if fields.get("kv_rotate") else ""

    import finegrain
    from finegrain.driver.kv_tune import kv_allocate, kv_sensitivity
    from finegrain.eval.perplexity import calibration_batches, wikitext_ids
    from finegrain.models import load_model

    import machine

    print(machine.line())
    lm = load_model("smollm2-135m")
    ids = wikitext_ids(lm.tokenizer)
    windows = [ids[w * 2048:(w + 1) * 2048].unsqueeze(0) for w in range(args.windows)]
    calib = [b[0] for b in calibration_batches(lm.tokenizer, args.calib, 512)]
    t = time.perf_counter()
    sens = kv_sensitivity(lm.model, calib, fields, PAIRS, progress=True, objective=args.objective)
    search_s = time.perf_counter() - t
    err = {p: [row[j] for row in sens.errors] for j, p in enumerate(PAIRS)}
    k2, v2 = err[(FMT.format(2), FMT.format(8))], err[(FMT.format(8), FMT.format(2))]
    print(f"sensitivity search {search_s:.0f} s; {args.objective} error, mean over layers: K2V8 {sum(k2) / len(k2):.4f}"
          f"  K8V2 {sum(v2) / len(v2):.4f}  (keys {'more' if sum(k2) > sum(v2) else 'less'} sensitive than values; "
          f"K2 worse than V2 in {sum(a > b for a, b in zip(k2, v2))} of {len(k2)} layers)", flush=True)

    def row(name, kv):
        cm = finegrain.compile(lm.model, (windows[0][:, :16],), recipe={"name": name, "rules": [], **kv},
                               progress=False, kv_cache=True)
        sim, cache = both_ppl(cm, windows, args.chunk)
        q = cm.kv.get("quantization") or {}
        return {"config": name, "ppl_simulated": sim, "ppl_cache_path": cache,
                "bytes_per_token": q.get("bytes_per_token_at_context", cm.kv["layers"] * cm.kv["kv_heads"]
                                         * cm.kv["head_dim"] * 8)}

    rows = [row("float cache", {})]
    base = rows[0]["ppl_cache_path"]
    for b in () if args.no_uniform else (4, 3, 2) if "3" in args.bits.split(",") else (4, 2):
        rows.append(row(f"uniform KIVI-{b} + pre-RoPE + sink{tag}", {**fields, "kv_key": FMT.format(b), "kv_value": FMT.format(b)}))
    tuned = []
    for budget in [float(x) for x in args.budgets.split(",")]:
        layers, info = kv_allocate(sens, budget)
        r = row(f"KVTuner avg {budget:g} bits{tag}", {**fields, "kv_layers": layers})
        r.update(average_bits=info["average_bits"], predicted_error=info["predicted_error"],
                 pairs=[f"K{_bits(k)}V{_bits(v)}" for _, k, v in layers])
        tuned.append({"budget": budget, "kv_layers": layers, **info})
        rows.append(r)
    for r in rows:
        r["delta_pct"] = 100 * (r["ppl_cache_path"] / base - 1)
        extra = f"  avg {r['average_bits']:.2f} bits  {' '.join(r['pairs'])}" if "pairs" in r else ""
        print(f"{r['config']:34s} ppl simulated {r['ppl_simulated']:.3f}  cache path {r['ppl_cache_path']:.3f} "
              f"({r['delta_pct']:+.2f}%)  {r['bytes_per_token']:.0f} B/token{extra}", flush=True)
    print(f"pairs kept per layer (Pareto pruning of {len(PAIRS)}):", tuned[0]["pairs_kept"] if tuned else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_tuner.json").write_text(json.dumps({
        "machine": machine.describe(), "windows": args.windows, "objective": args.objective,
        "rotate": bool(fields.get("kv_rotate")), "calibration": f"{args.calib} x 512 Brown",
        "search_s": round(search_s, 1), "pairs": PAIRS, "errors": sens.errors, "rows": rows, "tuned": tuned}, indent=1))


if __name__ == "__main__":
    main()
