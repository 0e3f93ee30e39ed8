"""Decode and prefill speed on the bundled SmolLM2, ratios against torch fp32 with the Hugging
Face KV cache measured in the same process (issue #16, item 6).

    python benchmarks/decode.py --out results/decode [--threads 1 2] [--past 128 1024 2048] [--rows tvm onnx]

Rows (each with and without its own KV cache where it has one):
* ``torch fp32 + HF cache``: ``transformers`` generate-style forwards over a ``DynamicCache`` (the baseline);
* ``finegrain fp32, KV graph``: a float artifact compiled with ``kv_cache=True``, reference backend;
* ``finegrain W4A16 g128, KV graph``: the RTN preset, reference backend (it dequantizes every weight
  at every step: the reference is ground truth, not a fast path), and the same with
  ``weight_storage="float"`` (each weight dequantized once when the session opens: ``generate``'s default);
* ``onnxruntime`` (the KV-cache graph exported with MatMulNBits, accuracy level 0, finegrain's ONNX
  session) and ``onnxruntime-genai`` on the same ``model.onnx`` (its generator, teacher-forced with the
  same tokens);
* ``onnxruntime`` again with accuracy level 4 (MatMulNBits quantizes activations to int8);
* ``finegrain TVM`` deployments of the KV-cache graph (W4A16 g128 on the fp32-compute low-bit
  kernel, W4A8-DGQ on the integer-dot kernel), built for this CPU; threads set per row through
  TVM's pool. W4A16 twice: ``cache static`` (preallocated buffers written in place, the default)
  and ``cache concat`` (the graph concatenates past and new each call): the measurement behind
  the default (``backends/tvm/lower_cache.py``); and W4A16 g128 with the LM head and embedding in
  int8 per channel (``w4a16-g128-rot-gptq-head8``'s formats, round to nearest): the fp32 tied head
  is 113 MB read per token, the larger part of a W4A16 decode step; and W4A16 g128 with the KV cache
  quantized on write to 8 / 4 / 2 bits per token and head (``int{b}-g64-asym-fp16-dyn``), held packed by
  the static build and read in place by decode's attention kernel (with the cache's MiB at the longest past),
  and with the ``kivi4`` / ``kivi2`` KV presets (packed by the static build: codes and spread per-channel scales,
  sinks and the float window in a fixed ring, read in place by decode's attention: ``backends/tvm/window_cache.py``)
  and the ``kv8-fp8`` one (FP8 E4M3 patterns packed, decoded in the attention kernel), and the ``zip42`` one
  (ZipCache's saliency and mixed-precision writes in the graph, packed with every token's codes at 4 bits,
  read in place by decode's attention, the past decoded only in a step that releases a block, for the
  saliency: ``window_cache.zip_layout``), and the ``rotatekv4`` one (RotateKV's
  reordered keys rotated over all KV heads, packed as virtual heads of that space, read in place by
  decode's grouped attention kernel, each past key taken back through the grouped rotation once per step;
  and with ``kv_storage="float"``, an fp32 cache of its values); and FP8 E4M3 per-channel / MXFP4 weights
  (the ``fp8`` / ``mxfp4`` presets' weight formats, fp32 activations) on the same low-bit kernel;
* ``llama.cpp Q4_1 (bundled GGUF)`` and ``llama.cpp finegrain W4A16 g128 -> GGUF Q4_1`` when
  ``llama-cpp-python`` is installed (the ``llama`` extra), the CPU anchor.

Measured: decode tokens/s at each past length (16 single-token steps after a prefill of that
length), prefill tokens/s at 128 and 512 tokens, time to first token for a 128-token prompt, and
the process's peak RSS at the end; with ``--rounds R`` every row is measured R times, rows
interleaved, and the medians reported (this 2-core machine's speed drifts between minutes). Absolute numbers are this machine's; the ratios are the result.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

STEPS = 16


def _hf(model):
    from transformers import DynamicCache

    def prefill(ids):
        cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=ids, cache=cache, use_cache=True)
        return cache

    def step(cache, ids):
        with torch.inference_mode():
            model(input_ids=ids, cache=cache, use_cache=True)
        return cache

    return prefill, step


def _fg(cm, **options):
    s = cm.session(**options)

    def prefill(ids):
        return s.prefill(ids)[1]

    def step(state, ids):
        return s.step(state, ids)[1]

    return prefill, step


def _onnx(cm, path, threads: int, level: int = 0, reuse: bool = False):
    from finegrain.backends.onnx import OnnxSession

    if level or reuse:  # MatMulNBits' accuracy level is an attribute of the exported model: its own file, exported
        # once and reused for the next thread count (``reuse``: its recorded fingerprint and options match)
        s = OnnxSession(cm, style="matmulnbits", accuracy_level=level, threads=threads, reuse=path)
    else:
        s = OnnxSession(cm, style="matmulnbits", accuracy_level=0, threads=threads, path=path)

    def prefill(ids):
        return s.prefill(ids)[1]

    def step(state, ids):
        return s.step(state, ids)[1]

    return prefill, step


def _genai(folder, threads: int):
    import onnxruntime_genai as og

    cfg_path = Path(folder) / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=1))
    model = og.Model(str(folder))

    def prefill(ids):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=4096, do_sample=False)
        g = og.Generator(model, params)
        g.append_tokens(ids[0].numpy().astype(np.int32))
        return g

    def step(g, ids):
        g.append_tokens(ids[0].numpy().astype(np.int32))  # teacher-forced: the same tokens as the other rows
        return g

    return prefill, step


def _llama(path: str, threads: int, ctx: int):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                logits_all=False)

    def prefill(ids):
        llm.reset()
        llm.eval(ids[0].tolist())
        return llm

    def step(state, ids):
        state.eval(ids[0].tolist())
        return state

    return prefill, step


def _tvm(dep, threads: int):
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, threads)  # 1: big cores first

    def prefill(ids):
        return dep.prefill(ids)[1]

    def step(state, ids):
        return dep.step(state, ids)[1]

    return prefill, step


def _measure(prefill, step, ids: torch.Tensor, pasts: list[int], prompts: list[int]) -> dict:
    out = {}
    for n in prompts:
        prefill(ids[:, :8])  # warm up
        t = time.perf_counter()
        prefill(ids[:, :n])
        out[f"prefill_{n}"] = n / (time.perf_counter() - t)
    out["ttft_128_s"] = 128 / out["prefill_128"] if "prefill_128" in out else None
    for p in pasts:
        state = prefill(ids[:, :p])
        times = []
        for i in range(STEPS):
            t = time.perf_counter()
            state = step(state, ids[:, p + i:p + i + 1])
            times.append(time.perf_counter() - t)
        out[f"decode_{p}"] = STEPS / sum(times)  # the mean rate: slow steps count
        out[f"step_ms_{p}"] = {"median": 1e3 * float(np.median(times)), "min": 1e3 * min(times),
                               "max": 1e3 * max(times)}
    return out


def _median(runs: list[dict]) -> dict:
    """Per metric, the median over rounds (per-step times: median of the medians, max of the maxima)."""
    out = {}
    for k, v in runs[0].items():
        if k.startswith("step_ms_"):
            out[k] = {"median": float(np.median([r[k]["median"] for r in runs])), "min": min(r[k]["min"] for r in runs),
                      "max": max(r[k]["max"] for r in runs)}
        else:
            out[k] = None if v is None else float(np.median([r[k] for r in runs]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--past", type=int, nargs="+", default=[128, 1024, 2048])
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every row this many times, rows interleaved; report medians")
    ap.add_argument("--out", default="results/decode")
    ap.add_argument("--rows", nargs="+", default=None,
                    help="only rows whose name contains one of these words (the torch baseline always runs)")
    args = ap.parse_args()

    import finegrain
    from finegrain.jobs import compile_loaded

    import machine

    print(machine.line())
    from finegrain.models import load_model
    from finegrain.eval.perplexity import wikitext_ids

    lm = load_model("smollm2-135m")
    need = max(args.past) + STEPS + 1
    ids = wikitext_ids(lm.tokenizer)[:need].unsqueeze(0)
    float_recipe = {"name": "fp32", "rules": [{"role": "linear"}]}
    t = time.perf_counter()
    fp_kv = finegrain.compile(lm.model, (ids[:, :16],), recipe=float_recipe, progress=False, kv_cache=True)
    w4_kv = compile_loaded(lm, "w4a16-g128", samples=0, progress=False, kv_cache=True)
    build_s = time.perf_counter() - t
    rows = [("torch fp32 + HF cache", lambda th: _hf(lm.model)),
            ("finegrain fp32, KV graph (torch ref)", lambda th: _fg(fp_kv)),
            ("finegrain W4A16 g128, KV graph (torch ref)", lambda th: _fg(w4_kv)),
            ("finegrain W4A16 g128, KV graph (torch ref, weights dequantized once)",
             lambda th: _fg(w4_kv, weight_storage="float"))]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if args.rows and not any(w in "onnxruntime-genai" for w in args.rows):
            raise ImportError("not among --rows")
        from finegrain.backends.onnx import export_genai

        for stale in out_dir.glob("w4a16-g128-l4.onnx*"):  # an earlier run's export of another artifact
            stale.unlink()
        t = time.perf_counter()
        genai_dir = out_dir / "w4a16-g128-genai"
        export_genai(w4_kv, genai_dir, style="matmulnbits", overwrite=True)
        onnx_export_s = time.perf_counter() - t
        rows += [("onnxruntime W4A16 g128 MatMulNBits L0, KV graph", lambda th: _onnx(w4_kv, genai_dir / "model.onnx", th)),
                 ("onnxruntime W4A16 g128 MatMulNBits L4, KV graph", lambda th: _onnx(w4_kv, out_dir / "w4a16-g128-l4.onnx", th, level=4)),
                 ("onnxruntime-genai W4A16 g128 (same model.onnx)", lambda th: _genai(genai_dir, th))]
        # kv8-static: ORT's GroupQueryAttention holds the INT8 cache itself (backends/onnx_gqa.py); the rows above
        # attend over an fp32 cache in the exported ONNX arithmetic, so the ratio includes the attention kernel
        if not args.rows or any(w in "onnxruntime kv8-static GQA" for w in args.rows):
            from finegrain.compiler.recipe import with_kv

            for stale in out_dir.glob("w4a16-g128-kv8-static.onnx*"):
                stale.unlink()
            kv8s = compile_loaded(lm, with_kv("w4a16-g128", "kv8-static"), samples=4, seq_len=256, progress=False,
                                  kv_cache=True)
            rows.append(("onnxruntime W4A16 g128 MatMulNBits L0 + kv8-static (GQA INT8 cache)",
                         lambda th: _onnx(kv8s, out_dir / "w4a16-g128-kv8-static.onnx", th, reuse=True)))
    except ImportError as e:
        onnx_export_s = None
        print(f"no ONNX Runtime rows: {e}")
    tvm_build_s = {}
    cache_bytes: dict = {}  # TVM static rows: the bytes the cache holds at the longest past
    try:
        import tvm  # noqa: F401

        import dataclasses

        from finegrain.compiler.recipe import get_recipe

        # the head8 preset's formats (int8 per-channel LM head and embedding) without its rotation / GPTQ:
        # speed does not depend on how the codes were chosen
        head8 = dataclasses.replace(get_recipe("w4a16-g128-rot-gptq-head8"), name="w4a16-g128-head8 (RTN)",
                                    rotate=False, weight_algorithm="rtn", sequential=False)
        # KV quantized on write per token and head (one fp16 scale and zero point per 64 values): the static
        # build holds it packed and decode's attention reads the codes (backends/tvm/lower_cache.py)
        kv_rows = [(f"W4A16 g128 + KV{b} packed", dataclasses.replace(
            get_recipe("w4a16-g128"), name=f"w4a16-g128-kv{b}", kv_key=f"int{b}-g64-asym-fp16-dyn",
            kv_value=f"int{b}-g64-asym-fp16-dyn"), "static") for b in (8, 4, 2)]
        # the kivi4 / kivi2 presets (KIVI, pre-RoPE rotated keys, a 128-token float window, a sink): codes and
        # scales in the static buffers, the float tokens in a ring, read in place by decode's attention
        # (backends/tvm/window_cache.py)
        from finegrain.compiler.recipe import with_kv

        kv_rows += [(f"W4A16 g128 + {p} packed", with_kv("w4a16-g128", p), "static") for p in ("kivi4", "kivi2")]
        # the kv8-fp8 preset: FP8 E4M3 bit patterns packed 4 to a word, one fp32 scale per token and head
        kv_rows.append(("W4A16 g128 + kv8-fp8 packed", with_kv("w4a16-g128", "kv8-fp8"), "static"))
        # kv8-fp8-static: the same codes, one calibrated scale per layer (a constant of the build: no scale per token)
        kv_rows.append(("W4A16 g128 + kv8-fp8-static packed", with_kv("w4a16-g128", "kv8-fp8-static"), "static"))
        # the zip42 preset (ZipCache 4/2 on KIVI's keys): its writes and saliency computed in the graph, held packed
        # (every token's codes at 4 bits; backends/tvm/window_cache.zip_layout), read in place by decode's attention
        kv_rows.append(("W4A16 g128 + zip42 packed", with_kv("w4a16-g128", "zip42"), "static"))
        # the rotatekv4 preset (RotateKV: keys reordered by calibration, one Hadamard over all KV heads' channels):
        # its rotated rows packed as virtual heads (window_cache.to_virtual_heads), the past decoded once per step
        kv_rows.append(("W4A16 g128 + rotatekv4 packed", with_kv("w4a16-g128", "rotatekv4"), "static"))
        # ... and held in an fp32 cache of its values instead (kv_storage="float": 7x the memory, no decode of the past)
        kv_rows.append(("W4A16 g128 + rotatekv4 in fp32", with_kv("w4a16-g128", "rotatekv4"), "static", "float"))
        # minifloat weights on the same low-bit kernel (fp16-read patterns, lowbit.minifloat_half), activations in
        # fp32: the fp8 / mxfp4 presets' weight formats without their activation quantization
        for label, preset in (("W8A16 FP8 E4M3 per channel", "fp8"), ("W4A16 MXFP4", "mxfp4")):
            r = get_recipe(preset)
            kv_rows.append((label, dataclasses.replace(r, name=f"{preset}-weights", rules=tuple(
                dataclasses.replace(rule, activation=None) for rule in r.rules)), "static"))
        for name, recipe, cache, *storage in (("W4A16 g128", "w4a16-g128", "static"), ("W4A16 g128", "w4a16-g128", "concat"),
                                    ("W4A16 g128 + int8 head/emb", head8, "static"),
                                    ("W4A8-DGQ", "w4a8-dgq", "static"), *kv_rows):
            storage = storage[0] if storage else "packed"
            row = f"finegrain TVM {name}, cache {cache}"
            if args.rows and not any(w in row for w in args.rows):
                continue
            t = time.perf_counter()
            cm = w4_kv if recipe == "w4a16-g128" else compile_loaded(lm, recipe, samples=4, seq_len=256,
                                                                     progress=False, kv_cache=True)
            dep = cm.session("tvm", max_seq_len=need + 8, cache=cache, kv_storage=storage)
            tvm_build_s[f"{name} {cache}"] = round(time.perf_counter() - t, 1)
            if dep.static_cache:
                cache_bytes[row] = dep.cache_bytes(max(args.past))
            rows.append((row, lambda th, dep=dep: _tvm(dep, th)))
    except ImportError:
        print("apache-tvm is not installed: no TVM rows")
    try:
        if args.rows and not any(w in "llama.cpp" for w in args.rows):
            raise ImportError("not among --rows")
        import llama_cpp  # noqa: F401

        from finegrain.models.bundled import SMOLLM2_DIST, SMOLLM2_FILE, _locate

        bundled = _locate(SMOLLM2_DIST, SMOLLM2_FILE)
        ours = out_dir / "finegrain-w4a16-g128.gguf"
        w4_kv.export_gguf(ours, overwrite=True, tokenizer_gguf=bundled, dtype="float16")
        ctx = need + 8
        rows += [("llama.cpp Q4_1 (bundled GGUF)", lambda th: _llama(str(bundled), th, ctx)),
                 ("llama.cpp finegrain W4A16 g128 -> GGUF Q4_1", lambda th: _llama(str(ours), th, ctx))]
    except ImportError as e:
        print(f"no llama.cpp rows ({e}; the rows need pip install -e '.[llama]')")
    if args.rows:
        rows = rows[:1] + [r for r in rows[1:] if any(w in r[0] for w in args.rows)]
    results = []
    for th in args.threads:
        torch.set_num_threads(th)
        made = [(name, make(th)) for name, make in rows]
        runs: dict[str, list[dict]] = {name: [] for name, _ in rows}
        for _ in range(args.rounds):  # rows interleaved, so a slow spell of the machine hits them all
            for name, (prefill, step) in made:
                runs[name].append(_measure(prefill, step, ids, args.past, args.prompts))
        base = None
        for name, _ in rows:
            r = _median(runs[name])
            base = base or r
            r = {"model": name, "threads": th, "rounds": args.rounds, "cache_bytes": cache_bytes.get(name), **r,
                 **{f"{k}_x": r[k] / base[k] for k in r if k.startswith(("decode_", "prefill_"))}}
            results.append(r)
            print(f"[{th} thr] {name:46s} " + "  ".join(
                f"{k} {r[k]:7.1f} ({r[k + '_x']:.2f}x)" for k in r if k.startswith(("decode_", "prefill_")) and
                not k.endswith("_x")), flush=True)
            print(f"{'':54s}step ms median / max: " + "  ".join(
                f"{k[8:]}: {v['median']:.1f} / {v['max']:.1f}" for k, v in r.items() if k.startswith("step_ms_"))
                + (f"; cache at {max(args.past)} tokens {r['cache_bytes'] / 2**20:.2f} MiB" if r["cache_bytes"] else ""))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps({"machine": machine.describe(), "results": results, "peak_rss_bytes": peak, "build_seconds": build_s,
                                                 "onnx_export_seconds": onnx_export_s, "tvm_build_seconds": tvm_build_s,
                                                 "steps": STEPS}, indent=1))
    print(f"peak RSS {peak / 2**30:.2f} GiB; artifacts built in {build_s:.1f} s; {out / 'decode.json'}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
