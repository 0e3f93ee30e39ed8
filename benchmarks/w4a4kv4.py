"""W4A4KV4 on SmolLM2 (issue #17 item 4, COMET-style): 4-bit weights (rotation + sequential GPTQ),
4-bit activations (per token groups along K, clip ratio searched per site) and a 4-bit KV cache,
against float and W4A4 with a float cache, through the cache path and the simulated protocol.

    python benchmarks/w4a4kv4.py [--windows 4] [--chunk 256] [--rows ...] [--fmpq 0.0625 ...] [--backends tvm onnx]
                                 [--noise-seeds 0 1]
                                 [--out results/w4a4kv4]

Rows: ``fp32`` (float weights and cache), ``w4a4`` (preset ``w4a4-g64-rot-gptq``, float cache),
``w4a4kv4`` (preset ``w4a4kv4``: the same with FMPQ's eighth of each activation site's groups of 64 at
8 bits, ``act_outlier_fraction: 0.125``, plus KIVI-4 keys per channel before RoPE, values per token
in groups of 32, the newest 128 tokens and one sink in float), ``w4a4kv4-a4`` (every activation group
at 4 bits), ``w4a4kv4-fmpq25`` (a quarter of the groups at 8 bits); ``--fmpq F ...`` adds rows
with other fractions. Each compiled with ``kv_cache=True``
on the default Brown calibration (32 x 512 tokens); perplexity on the first ``--windows``
WikiText-2 test windows of 2048 (``benchmarks/kv_quant.both_ppl``), cache bytes per token at a
2048-token context, compile seconds. ``--backends tvm onnx`` also runs each row's cache path on those
backends' sessions (TVM: a static build for this machine; activation groups and the KIVI writes are
fake-quantized there as the reference computes them) beside the reference's, or says why one refuses it;
with them, ``--noise-seeds`` runs the noise floor those backends' numbers are read against: the same
compiled model with every float tensor of its graph (norm weights, weight scales, embedding, head; not
the codes) multiplied by ``1 + 1e-6 N(0, 1)``, as another engine's float rounding perturbs it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_quant import backend_sessions, both_ppl, cache_bytes_per_token  # noqa: E402

ROWS = [("fp32", {"name": "fp32", "rules": []}), ("w4a4", "w4a4-g64-rot-gptq"), ("w4a4kv4", "w4a4kv4"),
        # every activation group at 4 bits (the preset without FMPQ)
        ("w4a4kv4-a4", {"base": "w4a4kv4", "name": "w4a4kv4-a4", "act_outlier_fraction": 0.0}),
        # FMPQ: a quarter of each activation site's groups of 64 at 8 bits (the preset: an eighth)
        ("w4a4kv4-fmpq25", {"base": "w4a4kv4", "name": "w4a4kv4-fmpq25", "act_outlier_fraction": 0.25}),
        # the KIVI-4 cache in the Hadamard-rotated space (kv_rotate; the kivi4 KV preset's setting)
        ("w4a4kv4-rot", {"base": "w4a4kv4", "name": "w4a4kv4-rot", "kv_rotate": True})]


def float_perturbed(cm, eps: float = 1e-6, seed: int = 0):
    """A copy of compiled model ``cm`` with every floating-point parameter / buffer of its graph
    multiplied by ``1 + eps * N(0, 1)`` (``seed``); integer codes untouched."""
    import copy

    c = copy.deepcopy(cm)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*c.gm.parameters(), *c.gm.buffers()]:
            if t.is_floating_point():
                t.mul_(1 + eps * torch.randn(t.shape, generator=g))
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--rows", nargs="+", default=[name for name, _ in ROWS])
    ap.add_argument("--backends", nargs="*", default=[], choices=("tvm", "onnx", "gpu"),
                    help="also run each row's cache path on these backends' sessions")
    ap.add_argument("--noise-seeds", nargs="*", type=int, default=[0],
                    help="with --backends: one float-perturbed copy of the compiled model per seed (the noise floor)")
    ap.add_argument("--fmpq", nargs="*", type=float, default=[],
                    help="also rows w4a4kv4 with this act_outlier_fraction (e.g. 0.0625 0.125)")
    ap.add_argument("--out", default="results/w4a4kv4")
    args = ap.parse_args()

    import machine
    from finegrain.compiler.recipe import get_recipe
    from finegrain.eval.perplexity import wikitext_ids
    from finegrain.jobs import compile_loaded
    from finegrain.models import load_model

    print(machine.line(), flush=True)
    lm = load_model("smollm2-135m")
    ids = wikitext_ids(lm.tokenizer)
    windows = [ids[w * args.seq_len:(w + 1) * args.seq_len].unsqueeze(0) for w in range(args.windows)]
    rows, base = [], None
    extra = [(f"w4a4kv4-fmpq{f:g}", {"base": "w4a4kv4", "name": f"w4a4kv4-fmpq{f:g}", "act_outlier_fraction": f})
             for f in args.fmpq]
    for name, recipe in ROWS + extra:
        if name not in args.rows and (name, recipe) not in extra:
            continue
        if isinstance(recipe, dict) and "base" in recipe:  # a preset with some fields changed
            recipe = {**get_recipe(recipe["base"]).to_dict(), **{k: v for k, v in recipe.items() if k != "base"}}
        t = time.perf_counter()
        cm = compile_loaded(lm, recipe, progress=False, kv_cache=True)
        build = time.perf_counter() - t
        others, refused = backend_sessions(cm, args.backends, args.seq_len)
        for seed in args.noise_seeds if args.backends else ():
            others[f"graph floats x(1+1e-6 N), seed {seed}"] = float_perturbed(cm, seed=seed).session()
        sim, cache, *through = both_ppl(cm, windows, args.chunk, list(others.values()))
        r = {"row": name, "recipe": recipe if isinstance(recipe, str) else recipe["name"], "ppl_simulated": sim,
             "ppl_cache_path": cache, "bits_per_weight": cm.quantized_bits_per_weight() or 32.0,
             "kv_bytes_per_token": cache_bytes_per_token(cm),
             "compile_s": round(build, 1),
             "others": {k: {"ppl_cache_path": p, "logits_rel_diff": dd} for k, (p, dd) in zip(others, through)},
             "refused": refused}
        base = base or r
        r["delta_pct"] = 100 * (cache / base["ppl_cache_path"] - 1)
        rows.append(r)
        print(f"{name:8s} ppl simulated {sim:.3f}  cache path {cache:.3f} ({r['delta_pct']:+.2f}%)  "
              f"{r['kv_bytes_per_token']:.0f} B/token  {r['bits_per_weight']:.3f} bits/weight  {build:.0f} s" + "".join(
                  f"  | {k} {o['ppl_cache_path']:.3f} (logits rel diff {o['logits_rel_diff']:.1e})"
                  for k, o in r["others"].items()) + "".join(f"  | {k}: {why}" for k, why in refused.items()),
              flush=True)
        del cm, others
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "w4a4kv4.json").write_text(json.dumps({"machine": machine.describe(), "windows": args.windows,
                                                  "seq_len": args.seq_len, "chunk": args.chunk, "rows": rows},
                                                 indent=1))


if __name__ == "__main__":
    main()
