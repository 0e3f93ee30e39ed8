"""Perplexity of SmolLM2 with a quantized KV cache (issue #17, first part): float weights, keys
and values quantized on write (``recipe.kv_key`` / ``kv_value``, optionally ``kv_rotate``),
measured two ways on the same WikiText-2 windows:

* simulated: one full-sequence forward of each window (every token's K / V quantized on write);
* cache path: the window in chunks (prefill the first chunk, then each next chunk over the cache
  the previous ones wrote), so later tokens attend to the quantized past.

    python benchmarks/kv_quant.py [--windows 4] [--seq-len 1024] [--chunk 256] [--out results/kv_quant]

Prints ppl, the change against the float cache, and the bytes one token's cache takes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = [  # name, key format, value format, rotate
    ("float cache", None, None, False),
    ("KV8 per token (sym)", "int8-token-sym-fp32-dyn", "int8-token-sym-fp32-dyn", False),
    ("KV4 g32 asym", "int4-g32-asym-fp16-dyn", "int4-g32-asym-fp16-dyn", False),
    ("KV4 g32 asym + Hadamard", "int4-g32-asym-fp16-dyn", "int4-g32-asym-fp16-dyn", True),
    ("KV2 g32 asym", "int2-g32-asym-fp16-dyn", "int2-g32-asym-fp16-dyn", False),
    ("KV2 g32 asym + Hadamard", "int2-g32-asym-fp16-dyn", "int2-g32-asym-fp16-dyn", True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--out", default="results/kv_quant")
    args = ap.parse_args()

    import finegrain
    from finegrain.eval.perplexity import wikitext_ids
    from finegrain.models import load_model

    import machine

    print(machine.line())
    torch.manual_seed(0)
    lm = load_model("smollm2-135m")
    ids = wikitext_ids(lm.tokenizer)
    windows = [ids[w * args.seq_len:(w + 1) * args.seq_len].unsqueeze(0) for w in range(args.windows)]
    rows = []
    base = None
    for name, key, value, rotate in CONFIGS:
        recipe = {"name": name, "rules": [], "kv_key": key, "kv_value": value, "kv_rotate": rotate}
        t = time.perf_counter()
        cm = finegrain.compile(lm.model, (windows[0][:, :16],), recipe=recipe, progress=False, kv_cache=True)
        build = time.perf_counter() - t
        s = cm.session()
        nll_sim = nll_cache = 0.0
        n = 0
        with torch.inference_mode():
            for w in windows:
                tgt = w[0, 1:]
                logits = cm(w)
                nll_sim += float(torch.nn.functional.cross_entropy(logits[0, :-1], tgt, reduction="sum"))
                outs, state = [], None
                for c in range(0, w.shape[1], args.chunk):
                    part = w[:, c:c + args.chunk]
                    lg, state = s.prefill(part) if state is None else s.step(state, part)
                    outs.append(lg)
                lg = torch.cat(outs, 1)
                nll_cache += float(torch.nn.functional.cross_entropy(lg[0, :-1], tgt, reduction="sum"))
                n += tgt.numel()
        q = cm.kv.get("quantization") or {}
        r = {"config": name, "ppl_simulated": math.exp(nll_sim / n), "ppl_cache_path": math.exp(nll_cache / n),
             "bytes_per_token": q.get("bytes_per_token", cm.kv["layers"] * cm.kv["kv_heads"] * cm.kv["head_dim"] * 8),
             "compile_s": round(build, 1)}
        base = base or r
        r["delta_pct"] = 100 * (r["ppl_cache_path"] / base["ppl_cache_path"] - 1)
        rows.append(r)
        print(f"{name:28s} ppl simulated {r['ppl_simulated']:.3f}  cache path {r['ppl_cache_path']:.3f} "
              f"({r['delta_pct']:+.2f}%)  {r['bytes_per_token']:.0f} B/token", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_quant.json").write_text(json.dumps({"machine": machine.describe(), "windows": args.windows,
                                                   "seq_len": args.seq_len, "chunk": args.chunk, "rows": rows},
                                                  indent=1))


if __name__ == "__main__":
    main()
