"""Greedy generation of a quantized SmolLM2 through each backend vs the reference (issue #16, 5c).

    python benchmarks/generation_equality.py [--recipe w4a16-g128] [--tokens 32]

Compiles the bundled SmolLM2 with the KV cache, generates ``--tokens`` greedy tokens for three
prompts on the reference (torch) backend, on a TVM build for this CPU (static cache) and on ONNX
Runtime (MatMulNBits), and prints, per prompt and backend, how many tokens equal the reference's
and, where they first differ, the reference's top-2 logit margin there (backends compute in a
different order, so a token whose two best logits are within rounding may flip).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finegrain.jobs import compile_loaded  # noqa: E402
from finegrain.models import load_model  # noqa: E402

PROMPTS = ["The capital of France is", "In 1969, the first humans to walk on the Moon were", "def fibonacci(n):"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="w4a16-g128")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    lm = load_model("smollm2-135m")
    tok = lm.tokenizer
    cm = compile_loaded(lm, args.recipe, progress=False, kv_cache=True)
    ref = cm.session()
    others = {}
    for name, make in (("tvm", lambda: cm.session("tvm", max_seq_len=256)),
                       ("onnx", lambda: cm.session("onnx", style="matmulnbits"))):
        t = time.perf_counter()
        others[name] = make()
        print(f"{name} session built in {time.perf_counter() - t:.1f} s")
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        want = ref.generate(ids, args.tokens).tokens
        seq = torch.cat([ids, torch.tensor([want])], 1)
        top2 = cm(seq)[0, ids.shape[1] - 1:-1].topk(2, -1).values  # the reference's logits on its own path
        margin = (top2[:, 0] - top2[:, 1]).tolist()
        for name, s in others.items():
            got = s.generate(ids, args.tokens).tokens
            first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
            if first is None:
                print(f"{p!r} {name}: {len(want)}/{len(want)} tokens equal the reference's "
                      f"(smallest reference margin {min(margin):.3f})")
            else:
                print(f"{p!r} {name}: the first {first} tokens equal; at token {first} the reference's margin is "
                      f"{margin[first]:.4f} ({tok.decode([want[first]])!r} vs {tok.decode([got[first]])!r})")
    for s in others.values():
        s.close()


if __name__ == "__main__":
    main()
