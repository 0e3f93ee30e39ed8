"""TVM's decode attention kernels over a packed KV cache vs the fp32 cache's kernel (issue #17, "the
cache read is the memory-bound part of decode at long context").

    python benchmarks/tvm_attention.py [--past 128 2048] [--formats int8-g64-asym-fp16-dyn ...] [--out DIR]

One decode step's attention of one layer at SmolLM2's shapes (9 query heads, 3 K / V heads, head dim
64) over a past of ``--past`` tokens: ``kernels/attention.cache_decode_attention_func`` over fp32 K / V,
and ``packed_decode_attention_func`` over the same keys and values held packed (``lower_cache.encode_ref``:
codes in int32 words, fp16 scales and uint8 zero points per token and group) in each of ``--formats``.
Each kernel is built for this CPU (``host_target``), timed by TVM's ``time_evaluator`` (median of
``--repeat`` repeats of ``--number`` runs); the ratio is to the fp32 kernel in the same run. Its
output is checked against the fp32 kernel's over the dequantized cache before it is timed.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finegrain.backends.tvm.build import host_target  # noqa: E402
from finegrain.backends.tvm.kernels.attention import (cache_decode_attention_func,  # noqa: E402
                                                      packed_decode_attention_func)
from finegrain.backends.tvm.lower_cache import decode_ref, encode_ref, kv_layout  # noqa: E402
from finegrain.eval.report import write_tables  # noqa: E402
import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

FORMATS = ["int8-g64-asym-fp16-dyn", "int4-g64-asym-fp16-dyn", "int2-g64-asym-fp16-dyn", "int2-g16-asym-fp16-dyn"]


def main() -> None:
    import tvm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--past", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    ap.add_argument("--number", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--out", default="results/tvm_attention")
    args = ap.parse_args()

    print(machine.line())
    target = host_target()
    b, h, hk, d = 1, 9, 3, 64
    longest = max(args.past) + 32
    scale = 1 / math.sqrt(d)
    dev = tvm.cpu()

    def tensor(x):
        return tvm.runtime.tensor(np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x), dev)

    def timed(fn, inputs) -> float:
        return float(np.median(fn.time_evaluator("main", dev, number=args.number, repeat=args.repeat)(*inputs).results))

    fp32 = tvm.compile(tvm.IRModule({"main": cache_decode_attention_func(b, h, hk, d, longest, scale)}),
                       target=target).jit()
    packed = {f: tvm.compile(tvm.IRModule({"main": packed_decode_attention_func(
        b, h, hk, d, longest, scale, kv_layout(f, d), kv_layout(f, d))}), target=target).jit() for f in args.formats}
    rows = []
    gen = torch.Generator().manual_seed(0)
    for p in args.past:
        q = torch.randn(b, h, 1, d, generator=gen)
        k, v = torch.randn(b, p, hk, d, generator=gen), torch.randn(b, p, hk, d, generator=gen)
        kn, vn = torch.randn(b, hk, 1, d, generator=gen), torch.randn(b, hk, 1, d, generator=gen)
        t32 = -(-(p + 1) // 32) * 32
        bias = np.full((1, t32), -np.inf, np.float32)
        bias[0, :p + 1] = 0
        out = tvm.runtime.empty((b, h, 1, d), "float32", dev)
        base = timed(fp32, [tensor(q), tensor(k), tensor(kn), tensor(v), tensor(vn), tensor(bias), out])
        rows.append({"past": p, "cache": "fp32", "us": round(base * 1e6, 1), "vs fp32": 1.0,
                     "bytes / token": 2 * hk * d * 4})
        print(f"past {p:5d}  fp32 cache              {base * 1e6:8.1f} us", flush=True)
        for f, fn in packed.items():
            (kc, ks, kz), (vc, vs, vz) = encode_ref(k, f), encode_ref(v, f)
            held = [kc, ks, kz, vc, vs, vz]  # what the cache stores per token
            if not kv_layout(f, d)["asym"]:  # symmetric: no zero points (the kernel takes a placeholder)
                kz = vz = torch.zeros(1, 1, 1, 1, dtype=torch.uint8)
                held = [kc, ks, vc, vs]
            # the fp32 kernel over the dequantized cache gives the output the packed one must
            want = tvm.runtime.empty((b, h, 1, d), "float32", dev)
            fp32["main"](tensor(q), tensor(decode_ref(kc, ks, kz, f, d)), tensor(kn),
                         tensor(decode_ref(vc, vs, vz, f, d)), tensor(vn), tensor(bias), want)
            inputs = [tensor(q), tensor(kc), tensor(ks), tensor(kz), tensor(kn), tensor(vc), tensor(vs), tensor(vz),
                      tensor(vn), tensor(bias), out]
            fn["main"](*inputs)
            err = float(np.abs(out.numpy() - want.numpy()).max())
            if err > 1e-4:
                raise SystemExit(f"{f}: packed kernel differs from the fp32 kernel over its values by {err:.2e}")
            t = timed(fn, inputs)
            per_token = sum(x.numel() * x.element_size() for x in held) // p
            rows.append({"past": p, "cache": f, "us": round(t * 1e6, 1), "vs fp32": round(base / t, 2),
                         "bytes / token": per_token})
            print(f"past {p:5d}  {f:24s} {t * 1e6:8.1f} us  {base / t:5.2f}x fp32  ({per_token} B/token/layer)",
                  flush=True)
    lines = ["| past | KV cache | us | vs fp32 | bytes / token / layer |", "|---|---|---|---|---|"]
    lines += [f"| {r['past']} | {r['cache']} | {r['us']} | {r['vs fp32']:.2f}x | {r['bytes / token']} |" for r in rows]
    write_tables(Path(args.out) / "tvm_attention", lines, {"machine": machine.describe(), "target": target,
                                                            "rows": rows})


if __name__ == "__main__":
    main()
