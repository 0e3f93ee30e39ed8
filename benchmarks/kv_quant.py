"""Perplexity of SmolLM2 with a quantized KV cache (issue #17, first part): float weights, keys
and values quantized on write (``recipe.kv_key`` / ``kv_value``, optionally ``kv_rotate``),
measured two ways on the same WikiText-2 windows:

* simulated: one full-sequence forward of each window (every token's K / V quantized on write);
* cache path: the window in chunks (prefill the first chunk, then each next chunk over the cache
  the previous ones wrote), so later tokens attend to the quantized past.

    python benchmarks/kv_quant.py [--windows 4] [--seq-len 2048] [--configs 'KIVI;Hadamard'] [--chunk 256] [--backends tvm onnx] [--out results/kv_quant]

Prints ppl, the change against the float cache, and the bytes one token's cache takes (averaged
over a 2048-token cache where a float window / sinks keep some tokens in float); ``--backends tvm onnx``
also runs each config's cache path on those backends (or says why one refuses it) and, as the noise
floor of such a comparison, on the reference with every weight multiplied by ``1 + 1e-6 N(0, 1)``
(a quantized cache turns float differences of that size into different codes). Configs: plain
per-token (one scale and zero per token and head), with the Hadamard rotation (``kv_rotate``) and
an attention sink (``kv_sinks=1``), and RotateKV's order (keys quantized before RoPE,
``kv_pre_rope``, then rotated); KIVI (keys per channel over groups of 32 tokens, values per token
in groups of 32, the newest 128 tokens in float), also with pre-RoPE keys and a sink; ZipCache
(blocks of 128 tokens, the 50% / 25% most salient by normalized attention score at 4 bits, the rest
at 2; keys channel-separable token-wise, or per channel over each block's salient / other tokens);
RotateKV's grouped-head rotation of the pre-RoPE keys over the 3 KV heads (``kv_head_group``) and its
outlier-aware channel reordering (``kv_reorder``, from 4 x 512 Brown calibration tokens); FP8 E4M3
with a dynamic scale per token, or with one static scale per layer for keys and one for values
(vLLM's static FP8 cache, calibrated on 32 x 512 Brown tokens).
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

def _cfg(key=None, value=None, **extra):
    return {"kv_key": key, "kv_value": value, **extra}


TOK = "int{b}-g64-asym-fp16-dyn"  # plain per token: one (scale, zero) per token and head (head dim 64)
KIVI_K = "int{b}-g32-asym-fp16-dyn"  # KIVI keys: per channel over groups of 32 tokens
KIVI_V = "int{b}-g32-asym-fp16-dyn"  # KIVI values: per token, groups of 32 along the head dim
KIVI = {"kv_key_axis": "tokens", "kv_window": 128}
PRE = {"kv_pre_rope": True, "kv_sinks": 1}
# ZipCache keys: channel-separable token-wise (one scale per token after a per-channel normalizer); values per
# token in groups of 32
ZIP_K = "int{b}-token-asym-fp16-dyn"
ZIP_V = "int{b}-g32-asym-fp16-dyn"


def _zip(ratio: float, low: int = 2) -> dict:  # salient tokens (normalized attention score, 10% probe queries) in
    # kv_key / kv_value (4 bits in most rows), the rest at ``low`` bits
    return {"kv_zip_key": ZIP_K.format(b=low), "kv_zip_value": ZIP_V.format(b=low), "kv_zip_ratio": ratio,
            "kv_zip_block": 128, "kv_zip_probes": 0.1}


CONFIGS = {  # name -> recipe fields
    "float cache": _cfg(),
    **{f"KV{b} per token": _cfg(TOK.format(b=b), TOK.format(b=b)) for b in (8, 4, 2)},
    # FP8 E4M3 elements (the 8-bit float cache of vLLM / TensorRT-LLM), one fp32 scale per token and head
    "KV8 FP8 E4M3 per token": _cfg("e4m3-token-sym-fp32-dyn", "e4m3-token-sym-fp32-dyn"),
    # the same elements with one calibrated fp32 scale per layer for keys and one for values (preset kv8-fp8-static:
    # vLLM's static FP8 cache, exported as compressed-tensors' kv_cache_scheme; calibration: 32 x 512 Brown tokens)
    "KV8 FP8 E4M3 static per tensor": _cfg("e4m3-tensor-sym-fp32", "e4m3-tensor-sym-fp32"),
    # INT8, one calibrated scale per layer for keys and one for values (preset kv8-static: the cache ONNX Runtime's
    # GroupQueryAttention holds as INT8 codes)
    "KV8 INT8 static per tensor": _cfg("int8-tensor-sym-fp32", "int8-tensor-sym-fp32"),
    **{f"KV{b} per token + Hadamard + sink": _cfg(TOK.format(b=b), TOK.format(b=b), kv_rotate=True, kv_sinks=1)
       for b in (4, 2)},
    **{f"KV{b} RotateKV (pre-RoPE + Hadamard + sink)": _cfg(TOK.format(b=b), TOK.format(b=b), kv_rotate=True, **PRE)
       for b in (8, 4, 2)},
    # RotateKV's grouped-head rotation over all 3 KV heads (192 channels), with and without the outlier-aware
    # channel reordering (calibration: 4 x 512 Brown tokens)
    **{f"KV{b} RotateKV grouped-head (G=3) + sink": _cfg(TOK.format(b=b), TOK.format(b=b), kv_rotate=True,
                                                       kv_head_group=3, **PRE) for b in (4, 2)},
    **{f"KV{b} RotateKV grouped-head (G=3) + reorder + sink": _cfg(TOK.format(b=b), TOK.format(b=b), kv_rotate=True,
                                                                 kv_head_group=3, kv_reorder=True, **PRE)
       for b in (4, 2)},
    "KV2 RotateKV reorder (G=1) + sink": _cfg(TOK.format(b=2), TOK.format(b=2), kv_rotate=True, kv_reorder=True, **PRE),
    **{f"KIVI-{b} (keys per channel, R=128)": _cfg(KIVI_K.format(b=b), KIVI_V.format(b=b), **KIVI) for b in (8, 4, 2)},
    **{f"KIVI-{b} + pre-RoPE + sink": _cfg(KIVI_K.format(b=b), KIVI_V.format(b=b), **KIVI, **PRE) for b in (4, 2)},
    "KIVI-2 g16 + pre-RoPE + sink": _cfg("int2-g16-asym-fp16-dyn", "int2-g16-asym-fp16-dyn", **KIVI, **PRE),
    # KIVI in the Hadamard-rotated space (kv_rotate: the pre-RoPE keys and the values rotated per head, queries
    # and the attention output to match): per-channel key groups see no outlier channel after the rotation
    **{f"KIVI-{b} + pre-RoPE + sink, rotated": _cfg(KIVI_K.format(b=b), KIVI_V.format(b=b), kv_rotate=True, **KIVI,
                                                    **PRE) for b in (4, 2)},
    # one side at 3 bits: what a KVTuner budget between 3 and 4 bits trades (keys are the more sensitive)
    **{f"KIVI K{k}V{v} + pre-RoPE + sink, rotated": _cfg(KIVI_K.format(b=k), KIVI_V.format(b=v), kv_rotate=True, **KIVI,
                                                         **PRE) for k, v in ((4, 3), (3, 4))},
    "KIVI-2 g16 + pre-RoPE + sink, rotated": _cfg("int2-g16-asym-fp16-dyn", "int2-g16-asym-fp16-dyn", kv_rotate=True,
                                                  **KIVI, **PRE),
    # the same bytes for the keys, coded in each head's calibrated Karhunen-Loeve basis (kv_key_klt: widths 0-8 per
    # component, allocated on 4 x 512 Brown tokens); values as above, or per token in groups of 64 at 3 bits
    "KIVI-2 g16 + pre-RoPE + sink, rotated, KLT keys": _cfg("int2-g16-asym-fp16-dyn", "int2-g16-asym-fp16-dyn",
                                                            kv_rotate=True, kv_key_klt=True, **KIVI, **PRE),
    "KLT keys (int2-g16 bytes) + values int3-g64, rotated": _cfg("int2-g16-asym-fp16-dyn", "int3-g64-asym-fp16-dyn",
                                                                 kv_rotate=True, kv_key_klt=True, **KIVI, **PRE),
    # the keys in int2-g32's bytes (fewer); the values' bytes spent by ZipCache's saliency instead (half the tokens of
    # each release, by normalized attention score, at 4 bits, the rest at 2, groups of 64: int3-g64's bytes)
    "KLT keys (int2-g32 bytes) + values int3-g64, rotated": _cfg("int2-g32-asym-fp16-dyn", "int3-g64-asym-fp16-dyn",
                                                                 kv_rotate=True, kv_key_klt=True, **KIVI, **PRE),
    "KLT keys (int2-g16 bytes) + values ZipCache 4/2 g64, 50% salient, rotated": _cfg(
        "int2-g16-asym-fp16-dyn", "int4-g64-asym-fp16-dyn", kv_rotate=True, kv_key_klt=True, **KIVI, **PRE,
        kv_zip_value="int2-g64-asym-fp16-dyn", kv_zip_ratio=0.5, kv_zip_block=128, kv_zip_probes=0.1),
    # KLT keys at 3 / 4 bits' bytes (KIVI's groups of 32 tokens) beside KIVI values: the pairs a KVTuner budget
    # between 3 and 4 bits trades
    **{f"KLT K{k}V{v} + pre-RoPE + sink, rotated": _cfg(KIVI_K.format(b=k), KIVI_V.format(b=v), kv_rotate=True,
                                                       kv_key_klt=True, **KIVI, **PRE)
       for k, v in ((3, 3), (3, 4), (4, 3))},
    **{f"ZipCache 4/2, {int(100 * r)}% salient": _cfg(ZIP_K.format(b=4), ZIP_V.format(b=4), **_zip(r)) for r in (0.5, 0.25)},
    "ZipCache 4/2, 50% salient + pre-RoPE + sink": _cfg(ZIP_K.format(b=4), ZIP_V.format(b=4), **_zip(0.5), **PRE),
    **{f"ZipCache 4/2, {int(100 * r)}% salient, keys per channel + pre-RoPE + sink":
       _cfg(KIVI_K.format(b=4), ZIP_V.format(b=4), **{**_zip(r), "kv_zip_key": KIVI_K.format(b=2)},
            kv_key_axis="tokens", **PRE) for r in (0.5, 0.25)},
    # the same at 8 / 4 bits (the KV8 column of the table)
    "ZipCache 8/4, 50% salient, keys per channel + pre-RoPE + sink":
        _cfg(KIVI_K.format(b=8), ZIP_V.format(b=8), **{**_zip(0.5, low=4), "kv_zip_key": KIVI_K.format(b=4)},
             kv_key_axis="tokens", **PRE),
}


def both_ppl(cm, windows: list[torch.Tensor], chunk: int, others=()) -> tuple:
    """(simulated, through the cache) perplexity of ``cm`` (a KV-cache graph) on ``windows``: one
    full-sequence forward each, and the window in chunks (prefill, then each chunk over the cache);
    then for each session of ``others`` (another backend's, or another model's), ``(ppl through its
    cache, largest difference of its logits from the reference's cache path, relative to their max)``."""
    from finegrain.eval.perplexity import cache_path_logits

    through_cache = cache_path_logits(cm.session(), chunk)
    through_others = [cache_path_logits(o, chunk) for o in others]
    nll_sim = nll_cache = 0.0
    nll_o, diff = [0.0] * len(others), [0.0] * len(others)
    n = 0
    with torch.inference_mode():
        for w in windows:
            tgt = w[0, 1:]
            logits = cm(w)
            nll_sim += float(torch.nn.functional.cross_entropy(logits[0, :-1], tgt, reduction="sum"))
            lg = through_cache(w)
            nll_cache += float(torch.nn.functional.cross_entropy(lg[0, :-1], tgt, reduction="sum"))
            for i, fn in enumerate(through_others):
                lo = fn(w)
                nll_o[i] += float(torch.nn.functional.cross_entropy(lo[0, :-1], tgt, reduction="sum"))
                diff[i] = max(diff[i], float((lo - lg).abs().max() / lg.abs().max()))
            n += tgt.numel()
    return (math.exp(nll_sim / n), math.exp(nll_cache / n),
            *((math.exp(nll / n), dd) for nll, dd in zip(nll_o, diff)))


def backend_sessions(cm, backends, seq_len: int) -> tuple[dict, dict]:
    """``({backend: session}, {backend: why refused})`` for ``cm`` on ``backends`` (TVM: a static
    build for this machine holding ``seq_len`` tokens and a few more)."""
    from finegrain.backends import registry

    others, refused = {}, {}
    for backend in backends:
        refusals = registry.get(backend).check(cm)
        if refusals:
            refused[backend] = str(refusals[0])
            continue
        others[backend] = cm.session(backend, **({"max_seq_len": seq_len + 8} if backend == "tvm" else {}))
    return others, refused


def perturbed(model, eps: float = 1e-6, seed: int = 0):
    """A copy of ``model`` with every weight multiplied by ``1 + eps * N(0, 1)`` (``seed``): the
    float-rounding noise floor of a quantized cache (another engine's float arithmetic differs from
    torch's by about this much, and a quantizer's rounding turns such differences into different codes)."""
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1 + eps * torch.randn(p.shape, generator=g))
    return m


def cache_bytes_per_token(cm) -> float:
    """Bytes one token's K / V cache takes at a 2048-token context (fp32 when not quantized)."""
    q = cm.kv.get("quantization") or {}
    return q.get("bytes_per_token_at_context", q.get("bytes_per_token",
                                                     cm.kv["layers"] * cm.kv["kv_heads"] * cm.kv["head_dim"] * 8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--configs", default="", help="substrings of config names to run, separated by ';' "
                    "(default: all; the float cache always runs first)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--out", default="results/kv_quant")
    ap.add_argument("--backends", nargs="*", default=[], choices=("tvm", "onnx", "gpu"),
                    help="also run each config's cache path on these backends' sessions (TVM: a static build for this "
                    "CPU): ppl and the logits' largest difference from the reference's cache path; and, as the "
                    "float-rounding noise floor, the same for the reference with weights x (1 + 1e-6 N(0, 1))")
    ap.add_argument("--noise-seeds", type=int, nargs="+", default=[0],
                    help="with --backends: one perturbed reference per seed (the noise floor's spread)")
    args = ap.parse_args()

    import finegrain
    from finegrain.eval.perplexity import calibration_batches, wikitext_ids
    from finegrain.models import load_model

    import machine

    print(machine.line())
    torch.manual_seed(0)
    lm = load_model("smollm2-135m")
    ids = wikitext_ids(lm.tokenizer)
    windows = [ids[w * args.seq_len:(w + 1) * args.seq_len].unsqueeze(0) for w in range(args.windows)]
    rows = []
    base = None
    wanted = [c for c in args.configs.split(";") if c]
    noisy = None  # the perturbed models of --backends' noise floor, made once
    for name, fields in CONFIGS.items():
        if wanted and name != "float cache" and not any(w in name for w in wanted):
            continue
        recipe = {"name": name, "rules": [], **fields}
        t = time.perf_counter()
        static = bool({"e4m3-tensor-sym-fp32", "int8-tensor-sym-fp32"} & {fields.get("kv_key"), fields.get("kv_value")})
        # static scales: the CLI's default calibration (32 x 512 tokens; 4 x 512 gave +1.31%, its maxima below
        # what WikiText writes in a few layers)
        calib = (calibration_batches(lm.tokenizer, 32, 512) if static else
                 calibration_batches(lm.tokenizer, 4, 512) if fields.get("kv_reorder") or fields.get("kv_key_klt")
                 else None)
        cm = finegrain.compile(lm.model, (windows[0][:, :16],), recipe=recipe, progress=False, kv_cache=True,
                               calibration=calib)
        build = time.perf_counter() - t
        others, refused = backend_sessions(cm, args.backends, args.seq_len)
        if args.backends:
            noisy = noisy or [perturbed(lm.model, seed=seed) for seed in args.noise_seeds]
            for seed, m in zip(args.noise_seeds, noisy):
                others[f"weights x(1+1e-6 N), seed {seed}"] = finegrain.compile(
                    m, (windows[0][:, :16],), recipe=recipe, progress=False, kv_cache=True, calibration=calib).session()
        ppl = both_ppl(cm, windows, args.chunk, list(others.values()))
        ppl_sim, ppl_cache = ppl[:2]
        r = {"config": name, "ppl_simulated": ppl_sim, "ppl_cache_path": ppl_cache,
             "bytes_per_token": cache_bytes_per_token(cm), "compile_s": round(build, 1),
             "others": {k: {"ppl_cache_path": p, "logits_rel_diff": dd} for k, (p, dd) in zip(others, ppl[2:])},
             "refused": refused}
        base = base or r
        r["delta_pct"] = 100 * (r["ppl_cache_path"] / base["ppl_cache_path"] - 1)
        rows.append(r)
        print(f"{name:36s} ppl simulated {r['ppl_simulated']:.3f}  cache path {r['ppl_cache_path']:.3f} "
              f"({r['delta_pct']:+.2f}%)  {r['bytes_per_token']:.0f} B/token" + "".join(
                  f"  | {k} {o['ppl_cache_path']:.3f} (logits rel diff {o['logits_rel_diff']:.1e})"
                  for k, o in r["others"].items()) + "".join(f"  | {k}: {why}" for k, why in refused.items()),
              flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_quant.json").write_text(json.dumps({"machine": machine.describe(), "windows": args.windows,
                                                   "seq_len": args.seq_len, "chunk": args.chunk, "rows": rows},
                                                  indent=1))


if __name__ == "__main__":
    main()
