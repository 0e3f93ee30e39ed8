"""GPTQ's column sweep and Hessian factor: the integer sweep against the generic one, same run.

    python benchmarks/gptq_sweep.py [--shapes 576x576 1536x576 576x1536] [--rounds 3] [--out results/gptq_sweep]

``passes/weight_algorithms.gptq`` quantizes one column at a time; the sweep is bound by the number
of torch operations per column, not by arithmetic. Integer formats take ``_integer_block`` (scales
and zero points gathered once per lazy block, the block transposed); every other format the generic
sweep (``QuantFormat.quantize_column`` column by column). Here both run on the same weight, Hessian
and parameters (the generic one by hiding the integer family from ``gptq``, as the test does),
rows interleaved over ``--rounds``; their codes must be equal. Also the factor ``gptq_factor``: one
Cholesky of the reversed Hessian and a triangular solve, against the Cholesky of the explicit inverse
(the code before), and how far apart the two factors are.

Shapes are ``NxK`` (out x in; default: SmolLM2-135M's attention / MLP up / MLP down); the Hessian is
``X^T X / rows`` of 4096 random rows with per-channel spreads (a conditioned, non-diagonal Hessian).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _old_factor(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The factor as computed before: Cholesky, explicit inverse, Cholesky (act-order permuted)."""
    H = h.double()
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    H = H[perm][:, perm]
    H = H + damp * torch.diag(H).mean() * torch.eye(len(H), dtype=H.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["576x576", "1536x576", "576x1536"])
    ap.add_argument("--formats", nargs="+", default=["int4-g128-asym-fp16", "int3-g128-asym-fp16",
                                                     "int8-channel-sym-fp32"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="results/gptq_sweep")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    import finegrain.passes.weight_algorithms as wa
    from finegrain.formats import QuantFormat

    integer_family = wa.IntFamily
    rows = []
    for shape in a.shapes:
        n, k = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4096, k, generator=g) * (0.1 + 3 * torch.rand(k, generator=g))
        h = x.T @ x / x.shape[0]
        w = torch.randn(n, k, generator=g) * 0.05
        times: dict[str, list[float]] = {"factor before": [], "factor": []}
        for _ in range(a.rounds):
            t = time.perf_counter()
            old = _old_factor(h)
            times["factor before"].append(time.perf_counter() - t)
            t = time.perf_counter()
            f = wa.gptq_factor(h)
            times["factor"].append(time.perf_counter() - t)
        apart = ((f.U - old).abs().max() / old.abs().max()).item()
        for tag in a.formats:
            fmt = QuantFormat.parse(tag)
            params = wa.rtn(w, fmt)
            sweep: dict[str, list[float]] = {"generic": [], "integer": []}
            codes = {}
            for _ in range(a.rounds):
                for kind in ("generic", "integer"):
                    wa.IntFamily = integer_family if kind == "integer" else type("NotAFamily", (), {})
                    try:
                        t = time.perf_counter()
                        codes[kind] = wa.gptq(w, fmt, h, params, factor=f).codes
                        sweep[kind].append(time.perf_counter() - t)
                    finally:
                        wa.IntFamily = integer_family
            if not torch.equal(codes["generic"], codes["integer"]):
                print(f"{shape} {tag}: the two sweeps' codes differ", file=sys.stderr)
                return 1
            med = {kk: statistics.median(v) for kk, v in {**sweep, **times}.items()}
            rows.append({"shape": shape, "format": tag, "generic_ms": 1e3 * med["generic"],
                         "integer_ms": 1e3 * med["integer"], "sweep_speedup": med["generic"] / med["integer"],
                         "factor_before_ms": 1e3 * med["factor before"], "factor_ms": 1e3 * med["factor"],
                         "factor_speedup": med["factor before"] / med["factor"], "factor_max_rel_diff": apart,
                         "codes_equal": True})
    md = ["| N x K | format | generic sweep ms | integer sweep ms | speedup | factor before ms | factor ms | "
          "speedup | factors' max rel diff |", "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['shape']} | `{r['format']}` | {r['generic_ms']:.0f} | {r['integer_ms']:.0f} | "
           f"{r['sweep_speedup']:.2f}x | {r['factor_before_ms']:.0f} | {r['factor_ms']:.0f} | "
           f"{r['factor_speedup']:.2f}x | {r['factor_max_rel_diff']:.1e} |" for r in rows]
    print("\n".join(md))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gptq_sweep.json").write_text(json.dumps({"rounds": a.rounds, "threads": torch.get_num_threads(),
                                                     "rows": rows}, indent=1))
    (out / "gptq_sweep.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
