"""Passkey retrieval through a quantized KV cache (issue #17's long-context sanity check): SmolLM2,
float weights, a 5-digit key hidden at depths 10 / 50 / 90% of ~1,500 tokens of filler
(``finegrain/eval/passkey.py``), prefilled through the cache, answered greedily.

    python benchmarks/passkey.py [--tokens 1500] [--seeds 3] [--out results/passkey]
        [--configs "NAME;NAME"] [--backend tvm]

Prints, per KV-cache config, how many of the seeds x depths trials returned the key. ``--backend tvm``
runs each trial on a static TVM build (the packed cache where the format has one; each answer token is
a decode step over the ~1,500-token past) and says whether its answer equals the reference session's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_quant import CONFIGS  # noqa: E402

ROWS = ["float cache", "KV4 per token", "KV2 per token", "KV4 RotateKV (pre-RoPE + Hadamard + sink)",
        "KIVI-4 (keys per channel, R=128)", "KIVI-4 + pre-RoPE + sink", "KIVI-2 (keys per channel, R=128)",
        "KIVI-2 + pre-RoPE + sink", "KIVI-2 g16 + pre-RoPE + sink"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="results/passkey")
    ap.add_argument("--configs", default=None, help="';'-separated config names (benchmarks/kv_quant.py's CONFIGS); "
                    "default: the issue's rows")
    ap.add_argument("--backend", default="reference", choices=["reference", "tvm"])
    args = ap.parse_args()
    rows_wanted = args.configs.split(";") if args.configs else ROWS
    unknown = [n for n in rows_wanted if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {sorted(CONFIGS)}")

    import finegrain
    from finegrain.eval.passkey import passkey_trial
    from finegrain.eval.perplexity import calibration_batches
    from finegrain.models import load_model

    import machine

    print(machine.line())
    lm = load_model("smollm2-135m")
    rows = []
    for name in rows_wanted:
        # RotateKV's reordering: the channel order from 4 x 512 Brown calibration tokens (as kv_quant.py)
        calib = calibration_batches(lm.tokenizer, 4, 512) if (CONFIGS[name].get("kv_reorder")
                                                                 or CONFIGS[name].get("kv_key_klt")) else None
        cm = finegrain.compile(lm.model, (torch.arange(16)[None],), recipe={"name": name, "rules": [], **CONFIGS[name]},
                               progress=False, kv_cache=True, calibration=calib)
        cases = [(seed, depth) for seed in range(args.seeds) for depth in (0.1, 0.5, 0.9)]
        trials = [passkey_trial(cm.session(), lm.tokenizer, args.tokens, depth, seed) for seed, depth in cases]
        extra = ""
        if args.backend == "tvm":
            ref = trials
            with cm.session("tvm", max_seq_len=args.tokens + 64) as s:
                trials = [passkey_trial(s, lm.tokenizer, args.tokens, depth, seed) for seed, depth in cases]
            for t, r in zip(trials, ref):
                t["reference_answer"] = r["answer"]
            same = sum(t["answer"] == r["answer"] for t, r in zip(trials, ref))
            extra = f"  answers equal to the reference's: {same}/{len(trials)}"
            extra += "".join(f"; {r['answer']!r} (reference) -> {t['answer']!r}"
                             for t, r in zip(trials, ref) if t["answer"] != r["answer"])
        hits = sum(t["found"] for t in trials)
        rows.append({"config": name, "backend": args.backend, "found": hits, "trials": len(trials), "answers": trials})
        print(f"{name:44s} {hits}/{len(trials)}  e.g. {trials[1]['key']} -> {trials[1]['answer']!r}{extra}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "passkey.json").write_text(json.dumps({"machine": machine.describe(), "tokens": args.tokens, "rows": rows},
                                                 indent=1))


if __name__ == "__main__":
    main()
