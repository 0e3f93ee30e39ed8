"""The GPU backend on an NVIDIA GPU (issue #19, item 4): one short script (about 8 minutes).

    python benchmarks/gpu.py --out results/gpu            # on a machine with CUDA
    python benchmarks/gpu.py --smoke --out /tmp/gpu-smoke  # CPU, TRITON_INTERPRET=1, tiny shapes

It needs only what a CUDA PyTorch image has (torch, Triton, transformers; run from the repository
root, ``PYTHONPATH=.`` when finegrain is not installed) and prints, in this order, each part
written to ``--out`` as soon as it is measured (``gpu.json``, ``gpu.md``):

1. the GPU tests (``tests/backends/test_gpu_kernels.py``, ``test_gpu_backend.py``, the ``gpu``
   marker included) on the device, untuned (``FINEGRAIN_GPU_TUNE=0``), stopped after ``--test-minutes``;
2. HBM bandwidth, measured by a device-to-device copy (bytes read + written / time);
3. kernel table at M = 1, 16, 128 for (N, K) = 4096 x 4096, 14336 x 4096 and 8192 x 8192: ms,
   TFLOP/s, GB/s on the bytes the kernel must read (packed weight, scales, zero points,
   activations) and that as % of the measured HBM bandwidth, and the speed-up over
   ``torch.matmul`` in bf16 (cuBLAS) on the same shape in the same run. Rows: cuBLAS bf16,
   W4A16 g128 asym, W4A16 NVFP4, W4A16 MXFP4, W8A8 (INT8 per token x per channel), W4A8 DGQ,
   W8A8 FP8 E4M3 (per token x per channel), W8A8 FP8 block-wise (1 x 128 activation groups x 128 x 128
   weight blocks).
   Weights are random codes and scales in the kernel layout (speed does not depend on the values;
   the tests check the values). Each kernel's configuration is tuned on first use
   (``kernels.tuned``) before it is timed;
4. decode tokens/s, 64 single-token steps after a 32-token prompt: a SmolLM2-135M-architecture
   model and a ~1.5 B Qwen2-architecture model, both random-init (the bundled SmolLM2 weights do
   not fit the 64 MiB the device tool carries; decode speed does not depend on the values):
   ``transformers`` bf16 eager with its KV cache vs finegrain W4A16 g128 (RTN) on the GPU
   backend's KV-cache graph, fp32 activations as traced and in the bf16 compute mode
   (``cm.session("gpu", dtype="bfloat16")``), whose KV cache is appended in place into static buffers,
   the bf16 mode again concatenating the cache every step (``cache_tokens=0``), and the bf16 mode with
   each decode step one CUDA graph replay (``decode_graph=True``, buffers of prompt + steps + 8 rows:
   the fixed-shape step attends over the whole buffer; on CPU the fixed graph runs eagerly); the first
   model also with the ``kivi4`` KV cache in bf16 (KIVI's writes run on the device, no CUDA graph) and as
   ``mxfp4`` (W4A4: MXFP4 weights on the kernels, MXFP4 activations fake-quantized on the device) in bf16
   with CUDA graphs.

Timings: ``triton.testing.do_bench`` (median of its repetitions) on CUDA; wall clock in the smoke
run (meaningless there: the interpreter). Parts 3 and 4 run most telling first (the 4096 x 4096
kernels, the SmolLM2-architecture decode, the other shapes, the Qwen2 decode); ``--minutes`` stops
starting new parts past that budget, and a part that fails is reported (``errors``, exit 1) while
the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (14336, 4096), (8192, 8192)]
ROWS_M = [1, 16, 128]


def _timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50)

    def wall(fn):
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return wall


def random_packed(tag: str, n: int, k: int, device: str) -> dict:
    """A weight of format ``tag`` in the kernel layout with random codes and plausible scales."""
    from finegrain.backends.gpu import kernels
    from finegrain.formats import QuantFormat

    fmt = QuantFormat.parse(tag)
    lay = kernels.element_layout(fmt)
    gen = torch.Generator().manual_seed(0)
    words = -(-k // lay["pw"])
    groups, group = (1, k) if fmt.granularity in ("tensor", "channel") else (fmt.num_groups(k), fmt.group_size)
    p = {**lay, "group": group, "k": k, "n": n, "scale2": 1.0, "z": None, "s1": None,
         "qw": torch.randint(-2**31, 2**31 - 1, (words, n), generator=gen, dtype=torch.int64).to(torch.int32)}
    if fmt.scale in ("fp16", "bf16", "fp32"):
        p["s"] = (torch.rand(groups, n, generator=gen) * 0.01 + 1e-3).to({"fp16": torch.float16, "bf16": torch.bfloat16,
                                                                          "fp32": torch.float32}[fmt.scale])
    elif fmt.scale == "e8m0":
        p["s"] = torch.randint(118, 125, (groups, n), generator=gen, dtype=torch.uint8)
    elif fmt.scale == "e4m3":
        p["s"] = torch.randint(0x30, 0x50, (groups, n), generator=gen, dtype=torch.uint8)
        p["scale2"] = 1e-3
    else:  # DGQ
        p["s"] = torch.randint(1, 9, (groups, n), generator=gen, dtype=torch.uint8)
        p["s1"] = (torch.rand(n, generator=gen) * 1e-3 + 1e-4).to(torch.float16)
    if lay["has_zero"]:
        p["z"] = torch.randint(0, 2**fmt.bits, (groups, n), generator=gen, dtype=torch.uint8)
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in p.items()}


def packed_bytes(p: dict) -> int:
    return sum(p[key].numel() * p[key].element_size() for key in ("qw", "s", "z", "s1") if p[key] is not None)


KERNELS = [("W4A16 g128 asym", "int4-g128-asym-fp16", None), ("W4A16 NVFP4", "e2m1-g16-sym-e4m3", None),
           ("W4A16 MXFP4", "e2m1-g32-sym-e8m0", None), ("W8A8 INT8", "int8-channel-sym-fp16", "int8-token-sym-fp32-dyn"),
           ("W4A8 DGQ", "int4-g128-asym-int8", "int8-token-sym-fp32-dyn"),
           ("W8A8 FP8 E4M3", "e4m3-channel-sym-fp32", "e4m3-token-sym-fp32-dyn"),
           ("W8A8 FP8 block-wise", "e4m3-g128x128-sym-fp32", "e4m3-g128-sym-fp32-dyn")]


def kernel_table(device: str, dtype: torch.dtype, shapes, ms, hbm: float, emit) -> list[dict]:
    from finegrain.backends.gpu import kernels
    from finegrain.formats import QuantFormat

    bench = _timer(device)
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        packed = {tag: random_packed(tag, n, k, device) for _, tag, _ in KERNELS}
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            base = bench(lambda: torch.matmul(x, w.T))
            flop = 2 * m * n * k
            act_bytes = (m * k + m * n) * x.element_size()
            rec = {"N": n, "K": k, "M": m, "kernel": "cuBLAS bf16" if device == "cuda" else f"torch.matmul {dtype}",
                   "ms": base, "TFLOP/s": flop / base / 1e9, "GB/s": (w.numel() * w.element_size() + act_bytes) / base / 1e6,
                   "speedup": 1.0}
            if device == "cuda":
                rec["ms graph"] = _graph_ms(lambda: torch.matmul(x, w.T))
            rows.append(rec)
            emit(rec)
            for label, tag, act in KERNELS:
                p = packed[tag]
                if act is None:
                    fn = lambda: kernels.wq_linear(x, p)  # noqa: E731
                else:
                    a = QuantFormat.parse(act)
                    fn = lambda: kernels.a8_linear(x, a, p)  # noqa: E731
                fn()  # tunes (CUDA) and compiles before timing
                t = bench(fn)
                gbs = (packed_bytes(p) + act_bytes) / t / 1e6
                rec = {"N": n, "K": k, "M": m, "kernel": label, "ms": t, "TFLOP/s": flop / t / 1e9, "GB/s": gbs,
                       "%HBM": 100 * gbs / hbm if hbm else None, "speedup": base / t}
                if device == "cuda":
                    rec["ms graph"] = _graph_ms(fn)
                rows.append(rec)
                emit(rec)
    return rows


def _graph_ms(fn) -> float | None:
    """The GPU time alone: ``fn`` replayed from a CUDA graph (no Python or launch overhead between
    calls), beside ``do_bench``'s eager timing, which includes them when they outlast the kernel."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=20)
    except Exception as e:  # noqa: BLE001 -- a launcher that cannot be captured: say so in the row
        print("CUDA graph timing failed:", type(e).__name__, str(e)[:200], flush=True)
        return None


def gemv_sweep(device: str, n: int, k: int, emit) -> None:
    """W4A16 g128 GEMV at M = 1 on (N, K) over configurations wider than the tuned candidates
    (smaller BN, deeper split-K): eager and CUDA-graph ms per configuration, for the next tuning."""
    from finegrain.backends.gpu import kernels

    p = random_packed("int4-g128-asym-fp16", n, k, device)
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    bench = _timer(device)
    for bn in (16, 32, 64):
        for bk in (128, 256):
            for sk in (8, 16, 32):
                for w in (2, 4):
                    cfg = dict(BN=bn, BK=bk, SPLIT_K=sk, num_warps=w)
                    fn = lambda: kernels.wq_linear(x, p, config=cfg)  # noqa: E731
                    try:
                        fn()
                        emit({"N": n, "K": k, **cfg, "ms": bench(fn),
                              "ms graph": _graph_ms(fn) if device == "cuda" else None})
                    except Exception as e:  # noqa: BLE001 -- registers / shared memory: skip the config
                        emit({"N": n, "K": k, **cfg, "error": f"{type(e).__name__}: {str(e)[:120]}"})


def bandwidth(device: str, nbytes: int) -> float:
    """GB/s of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = _timer(device)(lambda: dst.copy_(src))
    return 2 * nbytes / t / 1e6


def _configs(smoke: bool):
    from transformers import LlamaConfig, Qwen2Config

    if smoke:
        return [("tiny llama (smoke)", LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=256,
                                                   max_position_embeddings=256))]
    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=True)
    qwen = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, rope_theta=1e6,
                       tie_word_embeddings=False)
    return [("SmolLM2-135M architecture", smol), ("Qwen2 ~1.5B architecture", qwen)]


def decode_rows(device: str, configs, steps: int, emit) -> list[dict]:
    import finegrain
    from finegrain.compiler.capture import cache_kwarg
    from transformers import AutoModelForCausalLM, DynamicCache

    rows = []
    prompt = 32
    for name, cfg in configs:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        params = sum(p.numel() for p in model.parameters())
        ids = torch.randint(0, cfg.vocab_size, (1, prompt))
        dt = torch.bfloat16 if device == "cuda" else torch.float32
        hf = model.to(device, dt)

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        key = cache_kwarg(hf)  # once, outside the timed loop
        with torch.inference_mode():
            cache = DynamicCache()
            out = hf(input_ids=ids.to(device), use_cache=True, **{key: cache})
            tok = out.logits[:, -1:].argmax(-1)
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                out = hf(input_ids=tok, use_cache=True, **{key: cache})
                tok = out.logits[:, -1:].argmax(-1)
            sync()
            hf_tps = steps / (time.perf_counter() - t)
        model = hf.to("cpu", torch.float32)
        t0 = time.perf_counter()
        cm = finegrain.compile(model, (ids[:, :16],), recipe="w4a16-g128", progress=False, kv_cache=True)
        compile_s = time.perf_counter() - t0
        kivi = mx = None
        if not rows:  # the first model also with the kivi4 KV cache (its writes run on the device) and as mxfp4
            from finegrain.compiler.recipe import with_kv

            kivi = finegrain.compile(model, (ids[:, :16],), recipe=with_kv("w4a16-g128", "kivi4"), progress=False,
                                     kv_cache=True)
            mx = finegrain.compile(model, (ids[:, :16],), recipe="mxfp4", progress=False, kv_cache=True)
        del model, hf
        rec = {"model": name, "params": params, "hf bf16 eager tok/s" if device == "cuda" else "hf fp32 tok/s": hf_tps,
               "compile s": compile_s}
        # as traced; the bf16 compute mode; the same with every step concatenating the cache (no static buffers)
        runs = [("fp32", cm, torch.float32, {}), ("bf16", cm, torch.bfloat16, {}),
                ("bf16 concat", cm, torch.bfloat16, {"cache_tokens": 0}),
                ("bf16 CUDA graph", cm, torch.bfloat16, {"decode_graph": True, "cache_tokens": prompt + steps + 8})]
        if kivi is not None:
            runs.append(("bf16 kivi4", kivi, torch.bfloat16, {}))
            # MXFP4 weights on the GEMV / GEMM kernels, MXFP4 activations fake-quantized by the reference op on the
            # device (lower.in_fp32; on CPU copies before 2026-12-06), each step one CUDA graph replay
            runs.append(("MXFP4 W4A4 bf16 CUDA graph", mx, torch.bfloat16,
                         {"decode_graph": True, "cache_tokens": prompt + steps + 8}))
        for label, cm_, dtype, extra in runs:
            with cm_.session("gpu", device=device, dtype=dtype, **extra) as s, \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                logits, state = s.prefill(ids)
                logits, state = s.step(state, logits[:, -1:].argmax(-1).cpu())  # untimed: a CUDA graph is captured here
                tok = logits[:, -1:].argmax(-1)
                sync()
                t = time.perf_counter()
                for _ in range(steps):
                    logits, state = s.step(state, tok.cpu())
                    tok = logits[:, -1:].argmax(-1)
                sync()
                rec[f"finegrain {label if label.startswith('MX') else 'W4A16 ' + label} tok/s"] = \
                    steps / (time.perf_counter() - t)
                if caught:
                    rec[f"{label} warnings"] = [str(w.message)[:300] for w in caught]
        rec["ratio"] = rec["finegrain W4A16 bf16 tok/s"] / hf_tps
        rec["ratio CUDA graph"] = rec["finegrain W4A16 bf16 CUDA graph tok/s"] / hf_tps
        rows.append(rec)
        emit(rec)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/gpu"))
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes: the script's own test")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=8.0, help="no part starts past this budget")
    ap.add_argument("--test-minutes", type=float, default=2.5, help="the GPU tests are stopped past this")
    ap.add_argument("--shapes", nargs="+", default=None, metavar="NxK", help="kernel-table shapes (default: all three)")
    ap.add_argument("--sweep", action="store_true", help="also time the W4A16 GEMV over wider configurations")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        print("no CUDA device here; --smoke runs this script on CPU tensors under TRITON_INTERPRET=1")
        return 2
    import triton

    start = time.time()
    deadline = start + args.minutes * 60
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)",
                    "torch": torch.__version__, "triton": triton.__version__, "kernels": [], "decode": [],
                    "errors": [], "skipped": [], "sweep": []}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        report["sms"] = props.multi_processor_count

    def save():
        (args.out / "gpu.json").write_text(json.dumps(report, indent=1))

    def emit_to(key):
        def emit(rec):
            report[key].append(rec)
            print(key, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
            save()
        return emit

    print(report, flush=True)
    if not args.skip_tests:
        tests = ["tests/backends/test_gpu_kernels.py", "tests/backends/test_gpu_backend.py"]
        # correctness only: the first candidate configuration, no tuning (each candidate is a compile)
        env = {**os.environ, "FINEGRAIN_GPU_TUNE": "0"}
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu or not gpu",
                                *tests], capture_output=True, text=True, env=env, timeout=args.test_minutes * 60)
            last = (r.stdout.strip().splitlines() or ["?"])[-1]
            report["tests"] = {"rc": r.returncode, "summary": last, "tail": r.stdout[-3000:] + r.stderr[-2000:]}
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            last = f"stopped after {args.test_minutes} min: {out.strip().splitlines()[:1]}"
            report["tests"] = {"rc": None, "summary": last, "tail": out[-3000:]}
        print("tests:", last, flush=True)
        save()
    hbm = bandwidth(device, (1 << 30) if device == "cuda" else (1 << 24))
    report["hbm GB/s"] = hbm
    print(f"device-to-device copy: {hbm:.0f} GB/s", flush=True)
    shapes = [(96, 128)] if args.smoke else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes]
    ms = [1, 16] if args.smoke else ROWS_M
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    configs = _configs(args.smoke)
    steps = 4 if args.smoke else args.steps
    # most telling first, so a short lease still gets the targets' numbers: the first shape's kernels,
    # the small model's decode, then the other shapes and the larger model
    parts = [(f"kernels {shapes[0]}", lambda: kernel_table(device, dtype, shapes[:1], ms, hbm, emit_to("kernels"))),
             (f"decode {configs[0][0]}", lambda: decode_rows(device, configs[:1], steps, emit_to("decode")))]
    parts += [(f"kernels {shape}", lambda shape=shape: kernel_table(device, dtype, [shape], ms, hbm, emit_to("kernels")))
              for shape in shapes[1:]]
    parts += [(f"decode {name}", lambda c=(name, cfg): decode_rows(device, [c], steps, emit_to("decode")))
              for name, cfg in configs[1:]]
    if args.sweep:
        sweep_shape = (128, 256) if args.smoke else (4096, 4096)
        parts.insert(1, (f"gemv sweep {sweep_shape}", lambda: gemv_sweep(device, *sweep_shape, emit_to("sweep"))))
    for name, part in parts:
        if time.time() > deadline:
            report["skipped"].append(name)
            print("skipped (time budget):", name, flush=True)
            continue
        try:
            part()
        except Exception as e:  # noqa: BLE001 -- one part's failure is reported, the others still run
            import traceback

            report["errors"].append({"part": name, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-3000:]})
            print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
        save()
    report["seconds"] = time.time() - start
    save()
    (args.out / "gpu.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if report["errors"] else 0


def markdown(report: dict) -> str:
    lines = [f"{report['device']}, torch {report['torch']}, Triton {report['triton']}; device-to-device copy "
             f"{report.get('hbm GB/s', 0):.0f} GB/s; tests: {report.get('tests', {}).get('summary', 'not run')}", "",
             "| N x K | M | kernel | ms | ms, CUDA graph | TFLOP/s | GB/s | % HBM | vs bf16 matmul |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["kernels"]:
        hb = f"{r['%HBM']:.0f}" if r.get("%HBM") is not None else ""
        gr = f"{r['ms graph']:.4f}" if r.get("ms graph") is not None else ""
        lines.append(f"| {r['N']} x {r['K']} | {r['M']} | {r['kernel']} | {r['ms']:.4f} | {gr} | {r['TFLOP/s']:.2f} | "
                     f"{r['GB/s']:.0f} | {hb} | {r['speedup']:.2f}x |")
    lines += ["", "| model | params | baseline tok/s | finegrain W4A16 fp32 / bf16 tok/s | bf16, cache concatenated "
              "per step | bf16, CUDA graph per step | bf16, kivi4 cache | MXFP4 W4A4 bf16, CUDA graph | "
              "ratio (bf16 / CUDA graph) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["decode"]:
        base = next(v for key, v in r.items() if key.startswith("hf"))
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f} M | {base:.1f} | {r['finegrain W4A16 fp32 tok/s']:.1f} / "
                     f"{r['finegrain W4A16 bf16 tok/s']:.1f} | {r['finegrain W4A16 bf16 concat tok/s']:.1f} | "
                     f"{r['finegrain W4A16 bf16 CUDA graph tok/s']:.1f} | "
                     f"{r.get('finegrain W4A16 bf16 kivi4 tok/s', float('nan')):.1f} | "
                     f"{r.get('finegrain MXFP4 W4A4 bf16 CUDA graph tok/s', float('nan')):.1f} | {r['ratio']:.2f}x / "
                     f"{r['ratio CUDA graph']:.2f}x |")
    lines += [f"\nnot run (time budget): {name}" for name in report.get("skipped", [])]
    lines += [f"\nFAILED {e['part']}: {e['error']}" for e in report.get("errors", [])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
