"""Generate text from a finegrain TVM deployment with only the TVM runtime, numpy and the
``tokenizers`` package: no finegrain, no torch.

    python examples/run_tvm_deploy.py deploy/ --prompt "The capital of France is" --max-new-tokens 16
    python examples/run_tvm_deploy.py deploy/ --ids 504 3458 314 1029     # token ids in, ids out

A KV-cache build (``finegrain build ART`` of an artifact compiled with ``--kv-cache``) runs
``prefill`` once on the prompt and ``decode`` once per new token. A static cache (manifest
``kv.cache == "static"``, the default) is one preallocated ``[1, max_seq_len, kv_heads, head_dim]``
buffer per layer for K and for V (a KV cache quantized on write: its codes, scales and zero points,
manifest ``kv.buffers``): each call gets views of the tokens cached so far as its
``past_*`` and returns the new tokens' keys / values, written into the buffers at the cache
position. A ``"concat"`` build returns the ``present_*`` tensors, fed back as the next ``past_*``. A build without the cache has no past: each new
token re-runs the whole sequence (correct, quadratic). Greedy decoding; prints the text (or ids)
and tokens/s.
"""
import argparse
import json
import os
import time

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))  # TVM's default is half the cores
import tvm.runtime  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("deploy")
ap.add_argument("--prompt")
ap.add_argument("--ids", type=int, nargs="+")
ap.add_argument("--max-new-tokens", type=int, default=16)
args = ap.parse_args()

manifest = json.load(open(os.path.join(args.deploy, "manifest.json")))
vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(os.path.join(args.deploy, "model.so")), tvm.runtime.cpu())
stored = tvm.runtime.load_param_dict_from_file(os.path.join(args.deploy, "params.bin"))
params = [stored[n] for n in manifest["params"]]
tok = None
if args.prompt is not None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(args.deploy, "tokenizer", "tokenizer.json"))
    ids = tok.encode(args.prompt).ids
else:
    ids = args.ids or [1]
kv = manifest.get("kv")


def call(fn_ids, *extra):
    fn = "decode" if len(fn_ids) == 1 else "prefill"  # manifest["functions"]: the lengths each takes
    out = vm[fn](tvm.runtime.tensor(np.array([fn_ids], dtype="int64")), *extra, *params)
    return (out,) if isinstance(out, tvm.runtime.Tensor) else [out[i] for i in range(len(out))]


static = kv is not None and kv.get("cache") == "static"
if static:  # per layer K then V: fp32 [.., head_dim], or a packed cache's codes / scales / zero points
    specs = kv.get("buffers") or [{"dtype": "float32", "width": kv["head_dim"]}] * (2 * kv["layers"])
    # a packed window's ring ("rows"): a fixed number of rows, passed whole; the call writes it
    buffers = [tvm.runtime.empty((1, b.get("rows", kv["max_seq_len"]), kv["kv_heads"], b["width"]), b["dtype"])
               for b in specs]
    rings = ["rows" in b for b in specs]


def view(buf, start, n):  # tokens start .. start + n of a static cache buffer, sharing its memory
    width, dtype = int(buf.shape[3]), str(buf.dtype)
    return buf._create_view((1, n, kv["kv_heads"], width), dtype, start * kv["kv_heads"] * width * np.dtype(dtype).itemsize)


new, times = [], []
seq, past = list(ids), None
for step in range(args.max_new_tokens):
    t0 = time.perf_counter()
    if kv is None:  # no cache: the whole sequence every step
        out = call(seq)
    else:
        todo = seq if step == 0 else seq[-1:]
        start = len(seq) - len(todo)
        pos = tvm.runtime.tensor(np.arange(start, len(seq), dtype="int64")[None])
        if static:
            out = call(todo, pos, *(b if r else view(b, 0, start) for b, r in zip(buffers, rings)))
            for b, kv_new in zip([b for b, r in zip(buffers, rings) if not r], out[1:]):
                kv_new.copyto(view(b, start, len(todo)))
        else:
            if past is None:  # an empty past: [batch, kv_heads, 0, head_dim] per layer, keys and values
                past = [tvm.runtime.tensor(np.zeros((1, kv["kv_heads"], 0, kv["head_dim"]), "float32"))] * (
                    2 * kv["layers"])
            out = call(todo, pos, *past)
            past = out[1:]
    token = int(out[0].numpy()[0, -1].argmax())
    times.append(time.perf_counter() - t0)
    new.append(token)
    seq.append(token)

result = {"prompt_tokens": len(ids), "new_tokens": new, "cache": kv is not None and kv.get("cache", "concat"),
          "prefill_s": round(times[0], 4),
          "decode_tokens_per_s": round((len(times) - 1) / sum(times[1:]), 1) if len(times) > 1 else None}
if tok is not None:
    result["text"] = tok.decode(new)
print(json.dumps(result))
