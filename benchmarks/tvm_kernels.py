"""TVM INT4 g128 linear kernels vs ONNX Runtime MatMulNBits vs torch fp32 (issue #7, kernel table);
the same low-bit kernel on INT8, FP8 E4M3, MXFP8 and MXFP4 weights (``EXTRA_KERNELS``).

    python benchmarks/tvm_kernels.py --out results/tvm_kernels

One 4096 x 4096 linear, M = 1 and M = 16 rows, all in this process, ``--threads`` threads (TVM's
target says num-cores and ``TVM_NUM_THREADS`` is set; torch and ORT get the same count), median /
min over ``--reps`` runs. TVM rows: the fp32-compute INT4 kernel (``kernels/lowbit.py``; fp32
activations, what W4A16 runs); the integer-dot kernel (``kernels/a8.py``) alone on INT8 codes; and
the integer-dot linear as a deployment runs it (a Relax function: per-token INT8 quantization of
the fp32 input, then the kernel; built by the deployment pipeline), with fp16 group scales
(``w4a8-g128``'s weights) and with DGQ's integer group scales (``w4a8-dgq``'s, INT32 epilogue).
ORT MatMulNBits level 4 also quantizes activations to INT8, so it is the like-for-like peer of
the last two. TVM's target is this machine's CPU (``llvm`` host detection; AVX-512
where present). The DRAM roofline is the packed weight bytes (codes + scales + zero points)
divided by the read bandwidth measured here (a large tensor summed by torch); repeated runs of
one 8.7 MB weight are served partly from the last-level cache, so kernels can beat it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finegrain  # noqa: E402
from finegrain.backends.onnx import make_session  # noqa: E402
from finegrain.backends.tvm.build import build_executable, host_target  # noqa: E402
from finegrain.backends.tvm.kernels import a8  # noqa: E402
from finegrain.backends.tvm.lower_activations import A8Emitter  # noqa: E402
from finegrain.backends.tvm.kernels.lowbit import compile_linear, pack_weight, vector_lanes  # noqa: E402
from finegrain.eval.report import write_tables  # noqa: E402
from finegrain.formats import QuantFormat  # noqa: E402
import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_runtime import timeit  # noqa: E402


# the low-bit kernel on other element types (the same fp32-compute schedule, other code decoders)
EXTRA_KERNELS = [("INT8 per channel", "int8-channel-sym-fp16"), ("FP8 E4M3 per channel", "e4m3-channel-sym-fp32"),
                 ("MXFP8 (E4M3 g32, E8M0)", "e4m3-g32-sym-e8m0"), ("MXFP4 (E2M1 g32, E8M0)", "e2m1-g32-sym-e8m0")]


def read_bandwidth() -> float:
    """Bytes per second of a streaming read (sum over a 512 MB fp32 tensor), best of 5."""
    big = torch.ones(128 * 1024 * 1024)
    best = min(timeit(lambda: big.sum(), 5, warmup=1))
    return big.numel() * 4 / (best / 1e3)


def main() -> None:
    import tvm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/tvm_kernels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=300)
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    torch.set_num_threads(a.threads)
    k = n = 4096
    fmt = QuantFormat.parse("int4-g128-asym-fp16")
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.02)
    q = fmt.quantize(lin.weight.detach())
    packed = pack_weight(fmt, q)
    wbytes = fmt.stored_bytes((n, k))
    bw = read_bandwidth()
    target = {**host_target(), "num-cores": a.threads}
    work = Path(a.out).parent / (Path(a.out).name + "_files")
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[int, tuple[float, float]]] = {}
    build_s, errs = {}, {}
    dev = tvm.cpu()
    dgq = QuantFormat.parse("int4-g128-asym-int8")
    a8_fp16, a8_dgq = a8.pack_weight(fmt, q), a8.pack_weight(dgq, dgq.quantize(lin.weight.detach()))
    act = QuantFormat.parse("int8-token-sym-fp32-dyn")
    for m in (1, 16):
        x = torch.randn(1, m, k)
        t = time.perf_counter()
        f = compile_linear(m, k, n, packed["group_size"], 4, target)
        build_s[m] = time.perf_counter() - t
        args = [tvm.runtime.tensor(v, dev) for v in (x[0].numpy(), packed["w"], packed["scale"], packed["zs"],
                                                     np.zeros((m, n), np.float32))]
        f(*args)
        errs[f"fp32 kernel m{m}"] = _rel(args[-1].numpy(), x[0] @ fmt.dequantize(q).T)
        rows.setdefault("finegrain TVM int4 kernel (fp32 compute)", {})[m] = timeit(lambda: f(*args), a.reps)
        for label, tag in EXTRA_KERNELS:  # other element types on the same fp32-compute kernel
            ef = QuantFormat.parse(tag)
            eq = ef.quantize(lin.weight.detach())
            ep = pack_weight(ef, eq)
            fe = compile_linear(m, k, n, ep["group_size"], ep["bits"], target, kind=ep["kind"])
            eargs = [tvm.runtime.tensor(v, dev) for v in (x[0].numpy(), ep["w"], ep["scale"], ep["zs"],
                                                          np.zeros((m, n), np.float32))]
            fe(*eargs)
            errs[f"{tag} m{m}"] = _rel(eargs[-1].numpy(), x[0] @ ef.dequantize(eq).T)
            rows.setdefault(f"finegrain TVM {label} kernel (fp32 compute, {ef.stored_bytes((n, k)) / 1e6:.2f} MB)",
                            {})[m] = timeit(lambda: fe(*eargs), a.reps)
        xd = act.dequantize(act.quantize(x[0]))
        fa, a8_args = _a8_kernel(m, k, n, a8_fp16, x[0], target, dev)
        errs[f"a8 kernel m{m}"] = _rel(a8_args[-1].numpy().reshape(m, n), xd @ fmt.dequantize(q).T)
        rows.setdefault("finegrain TVM int4 x int8 kernel (codes in)", {})[m] = timeit(lambda: fa(*a8_args), a.reps)
        for name, p, wf in (("fp16 group scales", a8_fp16, fmt), ("DGQ int8 group scales", a8_dgq, dgq)):
            run, got = _a8_deployed(m, k, n, p, act, x[0], target, dev)
            errs[f"a8 {name} m{m}"] = _rel(got, xd @ wf.dequantize(wf.quantize(lin.weight.detach())).T)
            rows.setdefault(f"finegrain TVM int4 x int8 linear, {name} (quantize + kernel)", {})[m] = timeit(
                run, a.reps)
        w = lin.weight.detach()
        rows.setdefault("torch fp32 linear", {})[m] = timeit(lambda: torch.nn.functional.linear(x, w), a.reps)
        cm = finegrain.compile(lin, (x,), recipe={"name": "int4", "rules": [{"pattern": ".", "weight": fmt.tag}]},
                               progress=False, dynamic=False)
        for lvl in (0, 4):
            path = work / f"nbits_m{m}_acc{lvl}.onnx"
            cm.export_onnx(path, style="matmulnbits", accuracy_level=lvl, overwrite=True)
            s = make_session(path, lvl, a.threads)
            feed = {s.get_inputs()[0].name: x.numpy()}
            rows.setdefault(f"ORT MatMulNBits level {lvl}", {})[m] = timeit(lambda: s.run(None, feed), a.reps)
    roof = wbytes / bw * 1e3
    lines = [f"## TVM INT4 g128 kernel, 4096 x 4096 (measured {time.strftime('%Y-%m-%d')}, {a.threads} threads, "
             f"ms median / min over {a.reps} runs)", "",
             f"DRAM roofline: {wbytes / 1e6:.2f} MB of packed weights / {bw / 1e9:.1f} GB/s read bandwidth = "
             f"{roof:.3f} ms. CPU: {machine.line()}; TVM target {target} ({vector_lanes(target)} fp32 lanes). "
             f"TVM build {build_s[1]:.2f} s (M=1), {build_s[16]:.2f} s (M=16); "
             f"max relative error vs the torch reference (dequantized weight x the fp32 or fake-quantized input) "
             f"{max(errs.values()):.1e}.", "",
             "| variant | M=1 ms | vs ORT level 0 | M=16 ms | vs ORT level 0 |", "|---|---|---|---|---|"]
    base = rows["ORT MatMulNBits level 0"]
    for name, r in rows.items():
        cells = []
        for m in (1, 16):
            cells += [f"{r[m][0]:.3f} / {r[m][1]:.3f}", f"{base[m][0] / r[m][0]:.2f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    write_tables(a.out, lines, {"rows": {k2: {str(m): v for m, v in r.items()} for k2, r in rows.items()},
                                "roofline_ms": roof, "bandwidth": bw, "build_s": build_s, "rel_err": errs})


def _rel(got, ref: torch.Tensor) -> float:
    return float(np.abs(np.asarray(got) - ref.numpy()).max() / ref.abs().max())


def _a8_kernel(m: int, k: int, n: int, p: dict, x: torch.Tensor, target: dict, dev):
    """The integer-dot kernel alone, fed codes quantized outside the timing."""
    import tvm

    rb = 1 if m == 1 else a8.ROW_BLOCK
    f = a8.compile_linear(1 if m == 1 else None, k, n, p["group_size"], p["epilogue"], target)
    s = x.abs().amax(-1, keepdim=True) / 127
    xq, xs = a8.quantize_rows(x, s, p["group_size"], -128, 127)
    mq = m // rb
    ins = (xq.numpy().reshape(mq, rb, k), xs.numpy().reshape(mq, rb, -1), s.numpy().reshape(mq, rb), p["w"], p["ga"],
           p["gb"], p["cs"], np.zeros((mq, rb, n), np.float32))
    args = [tvm.runtime.tensor(v, dev) for v in ins]
    f(*args)
    return f, args


def _a8_deployed(m: int, k: int, n: int, p: dict, act: QuantFormat, x: torch.Tensor, target: dict, dev):
    """One integer-dot linear as the deployment runs it: a Relax function (fp32 x -> INT8 codes,
    group sums, row scales -> kernel) built by the deployment pipeline, called through the VM."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType([m, k], "float32"))
    ws = [relax.Var(nm, relax.TensorType(list(p[nm].shape), str(p[nm].dtype))) for nm in ("w", "ga", "gb", "cs")]
    with bb.function("main", [xv, *ws]):
        with bb.dataflow():
            y = bb.emit_output(A8Emitter().linear(bb, xv, act, None, None, *ws))
        bb.emit_func_output(y)
    ex, _ = build_executable(bb.get(), target)
    vm = relax.VirtualMachine(ex, dev)
    args = [tvm.runtime.tensor(v, dev) for v in (x.numpy(), p["w"], p["ga"], p["gb"], p["cs"])]
    return (lambda: vm["main"](*args)), vm["main"](*args).numpy()


if __name__ == "__main__":
    main()
