"""Compile cost on the bundled SmolLM2: import time, compile seconds per pass, peak memory.

    python benchmarks/compile_cost.py --recipe w4a16-g128 --out results/compile_cost
    python benchmarks/compile_cost.py --model gemma3-270m --recipe w4a16-g128-gptq   # issue #22 item 5

``--model gemma3-270m``: a random-init model with Gemma-3-270M's architecture (262,144-token
vocabulary, 18 layers, hidden 640, GQA 4/1 heads of 256, sliding windows) built from its config in
the child; no tokenizer, so calibration is random token ids of the same count (the cost of the
compile does not depend on which tokens they are).

Each measurement runs in a fresh child process (so imports and peak RSS are its own):
* ``import finegrain`` wall time, and whether it pulled in onnxruntime / tvm / triton;
* loading the model (GGUF dequantization), then ``compile`` with calibration on
  ``--samples`` x ``--seq-len`` Brown tokens, per pass;
* the child's peak RSS (ru_maxrss) as a ratio to the fp32 model's bytes.
Targets from issue #2: compile <= 60 s, peak RSS <= 3x the fp32 model, import <= 5 s.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD_IMPORT = r"""
import json, sys, time
t = time.perf_counter(); import finegrain; dt = time.perf_counter() - t
print(json.dumps({"import_s": dt, "heavy_modules": [m for m in ("onnxruntime", "tvm", "triton") if m in sys.modules]}))
"""

CHILD_COMPILE = r"""
import json, resource, sys, time, torch
torch.set_num_threads(THREADS)
from finegrain.eval.size import fp_bytes
from finegrain.jobs import compile_loaded
from finegrain.models import load_model
t = time.perf_counter()
if __MODEL__ == "gemma3-270m":
    import finegrain, transformers
    from finegrain.models import LoadedModel
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                                        max_position_embeddings=32768)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    lm = LoadedModel(model, None, "causal-lm", {"model": "gemma3-270m (random init)"})
    load_s = time.perf_counter() - t
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randint(0, 262144, (1, SEQ), generator=gen),) for _ in range(SAMPLES)]
    cm = finegrain.compile(model, calib[0] if calib else (torch.randint(0, 262144, (1, 16)),), RECIPE, calib or None,
                           progress=False)
else:
    lm = load_model(__MODEL__); load_s = time.perf_counter() - t
    cm = compile_loaded(lm, RECIPE, samples=SAMPLES, seq_len=SEQ, progress=False)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"load_s": load_s, "timings": cm.timings, "peak_rss": rss, "fp32_bytes": fp_bytes(lm.model),
                  "artifact_tensor_bytes": cm.model_bytes()}))
"""


def _child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a model finegrain loads, or gemma3-270m (random init)")
    ap.add_argument("--recipe", default="w4a16-g128")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="import-time repeats (median reported)")
    ap.add_argument("--out", default="results/compile_cost")
    a = ap.parse_args()
    imports = sorted(_child(CHILD_IMPORT)["import_s"] for _ in range(a.repeats))
    heavy = _child(CHILD_IMPORT)["heavy_modules"]
    code = (CHILD_COMPILE.replace("THREADS", str(a.threads)).replace("RECIPE", repr(a.recipe)).replace("__MODEL__", repr(a.model))
            .replace("SAMPLES", str(a.samples)).replace("SEQ", str(a.seq_len)))
    c = _child(code)
    t = c["timings"]
    lines = [f"# Compile cost: {a.model}, {a.recipe}, calibration {a.samples} x {a.seq_len} tokens, {a.threads} threads", "",
             "| measure | value | target |", "|---|---|---|",
             f"| import finegrain (median of {a.repeats}, min) | {imports[len(imports) // 2]:.2f} s ({imports[0]:.2f} s) | <= 5 s |",
             f"| heavy backends imported by `import finegrain` | {heavy or 'none'} | none |",
             f"| model load | {c['load_s']:.1f} s | - |",
             f"| compile total (capture + calibration + passes) | {t['total']:.1f} s | <= 60 s |"]
    lines += [f"| &nbsp;&nbsp;{k} | {v:.2f} s | |" for k, v in t.items() if k != "total"]
    lines += [f"| peak RSS / fp32 model bytes | {c['peak_rss'] / c['fp32_bytes']:.2f}x ({c['peak_rss'] / 1e9:.2f} GB / "
              f"{c['fp32_bytes'] / 1e9:.2f} GB) | <= 3x |",
              f"| quantized model bytes / fp32 | {c['artifact_tensor_bytes'] / c['fp32_bytes']:.3f} | - |"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"imports_s": imports, "heavy": heavy, **c, "args": vars(a)}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
