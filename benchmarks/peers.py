"""finegrain's 4-bit weight-only presets next to the tools people use today (issue #18, item 5).

    pip install -e ".[peers]"       # NNCF and torchao: not in the default setup
    python benchmarks/peers.py --out results/peers [--group-sizes 64 128] [--windows 8] [--only nncf ort]

One process, one model (the bundled SmolLM2-135M-Instruct, fp32 weights), one protocol for every
row: perplexity on the first ``--windows`` WikiText-2 test windows of ``--seq-len`` tokens and on
as many held-out windows (from window ``--held-out-from``); calibration from the bundled Brown
text (``finegrain.data.brown()``): the same ``--calib-samples`` x ``--calib-seq-len`` token
windows (``eval.perplexity.calibration_batches``, seed 0) for every tool that takes data.

Rows, per group size G:
* finegrain presets ``w4a16-g{G}`` (RTN), ``-clip`` (MSE clip search, where a preset exists),
  ``-gptq`` and ``-rot-gptq`` (QuaRot rotation + GPTQ), on the same calibration windows as the
  peers (not each preset's own default): linears only, embedding / head float;
* NNCF ``compress_weights``: INT4_ASYM, group G, ratio 1, AWQ + scale estimation on the
  calibration windows, its default backup mode (it keeps the embedding / tied head in INT8_ASYM);
* ONNX Runtime ``MatMulNBitsQuantizer``, RTN and HQQ, block G, asymmetric, on finegrain's fp32
  ONNX export, the LM head left float, run by ONNX Runtime at accuracy level 0 (fp32 compute);
* torchao ``IntxWeightOnlyConfig(int4, PerGroup(G), asymmetric)`` on every linear but the head.

Bits per weight, over the linears (not the embedding / head): finegrain's exact count (codes,
scales, zero points); NNCF's counted from the groups it stored (4-bit codes, fp16 scale, 4-bit zero
point per group); ORT's and torchao's the nominal count of their format: 4 bits + a 16-bit scale + a
4-bit (ORT) or 8-bit (torchao) zero point per group. Quantize seconds exclude the fp32 ONNX export
ORT's quantizer starts from (printed once).

The grouping caveat: SmolLM2's hidden size 576 (the K of q/k/v/gate/up) is not a multiple of 128.
finegrain's last group along K is ragged (4 x 128 + 64); ORT's MatMulNBits pads K to whole
blocks (the same arithmetic); NNCF refuses a group size that does not divide K unless told how to
fall back (this script reruns it with ``GroupSizeFallbackMode.ADJUST``, which picks a smaller group
for those layers, and says so in the row); torchao refuses it. The g64 rows are the clean
comparison. A tool that fails is reported with its error, not dropped.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine  # noqa: E402
from finegrain.eval.report import write_tables  # noqa: E402
from finegrain.jobs import compile_loaded, evaluate_lm  # noqa: E402
from finegrain.models import load_model  # noqa: E402


def nominal_bpw(group: int, zero_bits: int) -> float:
    return 4 + (16 + zero_bits) / group


def _linears(model) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]


def fresh_model(lm):
    """An independent fp32 copy of the bundled model (the peers quantize in place)."""
    import copy

    return copy.deepcopy(lm.model).eval()


def run_nncf(lm, group: int, calib: list) -> tuple[object, dict]:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    data = nncf.Dataset([{"input_ids": b[0]} for b in calib])
    note = "AWQ + scale estimation, embedding / head INT8_ASYM (NNCF's backup mode)"

    def go(adv):
        return nncf.compress_weights(fresh_model(lm), mode=nncf.CompressWeightsMode.INT4_ASYM, ratio=1.0,
                                     group_size=group, dataset=data, subset_size=len(calib), awq=True,
                                     scale_estimation=True, advanced_parameters=adv)

    try:
        model = go(None)
    except Exception as e:  # noqa: BLE001 - a group size not dividing K: NNCF's documented fallback
        if "group" not in str(e).lower():
            raise
        model = go(AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST))
        note += f"; group {group} refused ({str(e).splitlines()[0][:90]}), rerun with GroupSizeFallbackMode.ADJUST"
    return (lambda ids: model(input_ids=ids).logits), {"note": note, "bits_per_weight": nncf_bpw(model)}


def nncf_bpw(model) -> float:
    """Bits per weight of NNCF's compressed linears (not the embedding): 4-bit codes, one fp16 scale
    and one 4-bit zero point per group, the groups counted from its scale buffers (with the ADJUST
    fallback, layers whose K the group size does not divide have smaller groups)."""
    mods = dict(model.named_modules())
    bits = weights = 0
    for name, buf in model.named_buffers():
        if not name.endswith("._scale") or ":weight__" not in name:
            continue
        path = name.split("post_hooks.")[-1].split(":weight__")[0].replace(":", ".")
        mod = mods.get(path)
        if isinstance(mod, torch.nn.Linear):
            w = mod.in_features * mod.out_features
            bits += 4 * w + 20 * buf.numel()
            weights += w
    return bits / weights


def run_torchao(lm, group: int) -> tuple[object, dict]:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    model = fresh_model(lm)
    head = {id(m) for n, m in model.named_modules() if n.endswith("lm_head")}
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group),
                                          mapping_type=MappingType.ASYMMETRIC),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and id(m) not in head)
    return (lambda ids: model(input_ids=ids).logits), {"note": "int4 asym per group, head float",
                                                        "bits_per_weight": nominal_bpw(group, 8)}


def run_ort(lm, group: int, algo: str, work: Path, fp_onnx: Path) -> tuple[object, dict]:
    from onnx_runtime import _output_matmul, ort_quantize

    from finegrain.backends.onnx import make_session

    dst = work / f"ort_{algo}_g{group}.onnx"
    ort_quantize(fp_onnx, dst, algo, 0, _output_matmul(fp_onnx), block_size=group)
    s = make_session(dst, 0, None)
    name = s.get_inputs()[0].name
    return (lambda ids: torch.from_numpy(s.run(None, {name: ids.numpy()})[0])), {
        "note": f"MatMulNBits {algo.upper()} block {group}, head float, accuracy level 0",
        "bits_per_weight": nominal_bpw(group, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--held-out-from", type=int, default=100, help="first held-out window (0 = none)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--only", nargs="+", default=None, help="row families to run: finegrain nncf ort torchao")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/peers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model("smollm2-135m")
    from finegrain.eval.perplexity import calibration_batches

    calib = calibration_batches(lm.tokenizer, args.calib_samples, args.calib_seq_len)
    want = set(args.only or ["finegrain", "nncf", "ort", "torchao"])

    def measure(fn) -> dict:
        with torch.inference_mode():
            r = {"ppl": evaluate_lm(fn, lm.tokenizer, args.seq_len, args.windows, progress=False)["ppl"]}
            if args.held_out_from:
                r["held_out_ppl"] = evaluate_lm(fn, lm.tokenizer, args.seq_len, args.windows, progress=False,
                                                first_window=args.held_out_from)["ppl"]
        return r

    rows = [{"tool": "fp32", "method": "transformers fp32", "group": None, "bits_per_weight": 32.0, "seconds": 0.0,
             **measure(lambda ids: lm.model(input_ids=ids).logits)}]
    print(rows[-1], flush=True)
    fp_onnx = None
    t_all = time.time()
    for g in args.group_sizes:
        jobs = []
        if "finegrain" in want:
            from finegrain.compiler.recipe import PRESETS

            presets = [p for p in (f"w4a16-g{g}", f"w4a16-g{g}-clip", f"w4a16-g{g}-gptq", f"w4a16-g{g}-rot-gptq")
                       if p in PRESETS]
            for p in presets:
                def fg(p=p):
                    cm = compile_loaded(lm, p, samples=args.calib_samples, seq_len=args.calib_seq_len, progress=False)
                    return cm, {"note": "linears only, embedding / head float",
                                "bits_per_weight": cm.quantized_bits_per_weight()}
                jobs.append(("finegrain", p, fg))
        if "nncf" in want:
            jobs.append(("NNCF", f"INT4_ASYM g{g} AWQ+SE", lambda g=g: run_nncf(lm, g, calib)))
        if "ort" in want:
            if fp_onnx is None:  # ORT quantizes an fp32 ONNX file: finegrain's export (not timed per row)
                t = time.perf_counter()
                fp_onnx = out / "fp32.onnx"
                compile_loaded(lm, {"name": "fp32", "rules": []}, samples=0, progress=False).export_onnx(
                    fp_onnx, overwrite=True)
                print(f"fp32 ONNX export for ONNX Runtime's quantizer: {time.perf_counter() - t:.1f} s", flush=True)
            for algo in ("rtn", "hqq"):
                jobs.append(("ONNX Runtime", f"MatMulNBits {algo.upper()} g{g}",
                             lambda g=g, algo=algo: run_ort(lm, g, algo, out, fp_onnx)))
        if "torchao" in want:
            jobs.append(("torchao", f"IntxWeightOnly int4 g{g}", lambda g=g: run_torchao(lm, g)))
        for tool, method, job in jobs:
            t = time.perf_counter()
            try:
                fn, info = job()
                secs = time.perf_counter() - t
                rows.append({"tool": tool, "method": method, "group": g, "seconds": secs, **info, **measure(fn)})
            except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
                traceback.print_exc()
                rows.append({"tool": tool, "method": method, "group": g, "seconds": time.perf_counter() - t,
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"})
            print({k: v for k, v in rows[-1].items()}, flush=True)
            report(args, rows, time.time() - t_all)
            fn = job = None
            gc.collect()


def report(args, rows: list[dict], seconds: float) -> None:
    fp = rows[0]
    held = bool(args.held_out_from)
    lines = [f"# 4-bit weight-only: finegrain and peers, SmolLM2-135M-Instruct, WikiText-2 test windows "
             f"0-{args.windows - 1} of {args.seq_len}" + (f", held out {args.held_out_from}-"
                                                          f"{args.held_out_from + args.windows - 1}" if held else ""),
             "", f"{machine.line()}; {args.threads} threads; {seconds:.0f} s. Calibration: Brown, {args.calib_samples} x "
             f"{args.calib_seq_len} tokens for every tool that takes data. Bits/weight: finegrain exact, peers nominal "
             "(see benchmarks/peers.py).", "",
             "| tool | method | ppl | Δ vs FP | held-out ppl | held-out Δ | bits/weight | quantize s | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['method']} | failed | - | - | - | - | {r['seconds']:.1f} | {r['error']} |")
            continue
        ho = (f"{r['held_out_ppl']:.3f} | {100 * (r['held_out_ppl'] / fp['held_out_ppl'] - 1):+.2f}%" if held else "- | -")
        lines.append(f"| {r['tool']} | {r['method']} | {r['ppl']:.3f} | {100 * (r['ppl'] / fp['ppl'] - 1):+.2f}% | {ho} | "
                     f"{r['bits_per_weight']:.3f} | {r['seconds']:.1f} | {r.get('note', '')} |")
    write_tables(args.out, lines, {"rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
