"""Memory and decode speed of the packed KV cache (issue #17: "packed storage in the cache") on the
bundled SmolLM2, float weights, reference backend, against the same compile with the cache kept
in fp32 (``session(kv_storage="float")``) in the same process.

    PYTHONPATH=. python benchmarks/kv_storage.py [--past 2048] [--steps 16] [--configs "KV4 per token" ...] [--out results/kv_storage]

For each KV recipe (``benchmarks/kv_quant.py``'s configs): a WikiText-2 window of ``--past`` tokens
prefilled through the cache in chunks of 256, then ``--steps`` single-token decode steps. Measured:
the bytes the session's cache holds after the prefill (summed over the tensors it carries:
codes, scales, zero points, float windows and sinks) against the fp32 cache's, the decode tokens/s
of both storages and their ratio, and whether the logits are bit-identical (they must be: storage
changes nothing attention reads). The reference dequantizes the whole packed past at every step,
so packed decode is expected to be slower there; the memory is the point, a fused kernel the speed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_quant import CONFIGS  # noqa: E402

DEFAULT = ("KV8 per token", "KV4 per token", "KV2 per token + Hadamard + sink", "KIVI-4 + pre-RoPE + sink",
           "KIVI-2 g16 + pre-RoPE + sink", "ZipCache 4/2, 50% salient, keys per channel + pre-RoPE + sink")


def _cache_bytes(state) -> int:
    return sum(p.nbytes if not isinstance(p, torch.Tensor) else p.numel() * p.element_size() for p in state["past"])


def _run(session, window: torch.Tensor, past: int, steps: int, chunk: int = 256):
    with torch.inference_mode():
        state, outs = None, []
        for c in range(0, past, chunk):
            part = window[:, c:min(c + chunk, past)]
            lg, state = session.prefill(part) if state is None else session.step(state, part)
        held = _cache_bytes(state)
        t = time.perf_counter()
        for i in range(steps):
            lg, state = session.step(state, window[:, past + i:past + i + 1])
            outs.append(lg)
        dt = time.perf_counter() - t
    return held, steps / dt, torch.cat(outs, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--past", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT), help="config names (kv_quant.py's)")
    ap.add_argument("--out", default="results/kv_storage")
    args = ap.parse_args()

    import finegrain
    from finegrain.eval.perplexity import calibration_batches, wikitext_ids
    from finegrain.models import load_model

    import machine

    print(machine.line())
    torch.manual_seed(0)
    lm = load_model("smollm2-135m")
    window = wikitext_ids(lm.tokenizer)[:args.past + args.steps].unsqueeze(0)
    rows = []
    for name in args.configs:
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; one of {sorted(CONFIGS)}")
        recipe = {"name": name, "rules": [], **CONFIGS[name]}
        calib = (calibration_batches(lm.tokenizer, 4, 512) if recipe.get("kv_reorder") or recipe.get("kv_key_klt")
                 else None)  # as kv_quant.py
        cm = finegrain.compile(lm.model, (window[:, :16],), recipe=recipe, progress=False, kv_cache=True,
                               calibration=calib)
        packed = cm.session()
        held_f, tps_f, lg_f = _run(cm.session(kv_storage="float"), window, args.past, args.steps)
        held_p, tps_p, lg_p = _run(packed, window, args.past, args.steps)
        r = {"config": name, "packed_presents": len(packed.kv_packed), "fp32_presents": 2 * cm.kv["layers"] - len(packed.kv_packed),
             "cache_bytes_fp32": held_f, "cache_bytes_packed": held_p, "memory_ratio": held_p / held_f,
             "decode_tps_fp32": tps_f, "decode_tps_packed": tps_p, "speed_ratio": tps_p / tps_f,
             "bit_identical": bool(torch.equal(lg_f, lg_p)), "report_bytes_per_token": cm.kv["quantization"].get(
                 "bytes_per_token_at_context", cm.kv["quantization"]["bytes_per_token"])}
        rows.append(r)
        print(f"{name:34s} cache {held_p / 2**20:7.2f} MiB vs fp32 {held_f / 2**20:7.2f} MiB ({r['memory_ratio']:.3f}x, "
              f"{held_p / args.past:.0f} B/token; report {r['report_bytes_per_token']:.0f})  decode {tps_p:.2f} vs "
              f"{tps_f:.2f} tok/s ({r['speed_ratio']:.2f}x)  identical {r['bit_identical']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_storage.json").write_text(json.dumps({"machine": machine.describe(), "past": args.past,
                                                     "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
