"""Models larger than RAM (issue #18 item 2): compile block by block (``finegrain quantize --stream``)
and measure peak RSS and minutes with ``/usr/bin/time -v``; then load the artifact and run it.

    python benchmarks/large_model.py --sizes qwen2-1.5b qwen2-7b [--work /tmp/fg-large] [--out results/large_model]
    python benchmarks/large_model.py --sizes tiny            # seconds: the same path on a 2-layer model

For each size this (1) writes a random-init checkpoint from a Qwen2-architecture config (untied LM
head, q/k/v biases) as bf16 safetensors shards, one tensor generated at a time (the size is what
matters, not the values; the bundled SmolLM2 tokenizer is saved beside it so calibration text
tokenizes: its ids are below the vocabulary size), (2) runs ``finegrain quantize --stream`` on it under
``/usr/bin/time -v`` (its progress bar in ``<work>/<size>-compile.log`` as it runs) (the recipe and calibration per size below), (3) loads the artifact in a fresh
process, also under ``/usr/bin/time -v``, and runs one forward on 16 tokens (finite logits of the
right shape). A table of checkpoint GB, artifact GB, compile minutes, compile peak RSS, load + forward
peak RSS goes to stdout and ``<out>/large_model.json``. RSS is the kernel's maximum resident set
size of the process (file pages mapped in count; the page cache of files read and closed does not).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (config, recipe, calibration samples, calibration tokens each, issue #18 target in GiB)
SIZES = {
    "tiny": (dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152), "w4a16-g128-gptq", 4, 64, None),
    "qwen2-1.5b": (dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, vocab_size=151936), "w4a16-g128-gptq", 8, 256, 8),
    "qwen2-7b": (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, vocab_size=152064), "w4a16-g128", 4, 256, 20),
}
SHARD_BYTES = 2 << 30


def write_checkpoint(name: str, out: Path, seed: int = 0) -> tuple[int, int]:
    """A random-init Qwen2 checkpoint at ``out`` (bf16 shards); returns (parameters, bytes on disk)."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    from finegrain.models.bundled import _smollm2_tokenizer

    cfg = Qwen2Config(**SIZES[name][0], tie_word_embeddings=False, max_position_embeddings=4096,
                      architectures=["Qwen2ForCausalLM"], torch_dtype="bfloat16")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, files, weight_map, total = 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            files.append(fname)
            weight_map.update({k: fname for k in shard})
            shard, shard_bytes = {}, 0

    for n, shape in shapes:
        if n.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16)
            for i in range(0, shape[0], 4096):  # fp32 randn in slices: no full-size fp32 temporary
                t[i:i + 4096] = (torch.randn((min(4096, shape[0] - i), *shape[1:]), generator=gen) * 0.02).bfloat16()
        if shard_bytes + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[n] = t
        shard_bytes += t.numel() * 2
        total += t.numel()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(str(out))
    _smollm2_tokenizer().save_pretrained(str(out))
    return total, sum(f.stat().st_size for f in out.glob("*.safetensors"))


def timed(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v, its stderr (progress bars, then time's report) going to
    ``log`` as it runs: wall seconds, peak RSS GiB, output tail."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    rss = int(m.group(1)) / (1 << 20) if m else float("nan")
    if p.returncode != 0:
        print(p.stdout[-3000:], text[-3000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit status {p.returncode} (log: {log})")
    return {"seconds": round(wall, 1), "peak_rss_gib": round(rss, 2), "stdout": p.stdout[-2000:]}


LOAD_AND_RUN = """
import sys, torch, finegrain
cm = finegrain.load(sys.argv[1])
ids = torch.arange(16).unsqueeze(0) + 100
logits = cm(ids)
assert logits.shape[:2] == (1, 16) and torch.isfinite(logits).all(), (logits.shape, logits.abs().max())
print("forward ok", tuple(logits.shape), float(logits.float().std()))
"""


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["qwen2-1.5b", "qwen2-7b"], choices=sorted(SIZES))
    ap.add_argument("--work", default="/tmp/fg-large", help="where checkpoints and artifacts are written")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and artifacts")
    ap.add_argument("--out", default="results/large_model")
    ap.add_argument("--write", nargs=2, metavar=("SIZE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write:
        print(json.dumps(write_checkpoint(args.write[0], Path(args.write[1]))))
        return []
    work = Path(args.work)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    for name in args.sizes:
        _, recipe, samples, seq, target = SIZES[name]
        ckpt, art = work / name, work / f"{name}-{recipe}"
        t0 = time.perf_counter()
        # in a child process: the generator's freed memory must not sit in this process beside the compile
        w = subprocess.run([sys.executable, __file__, "--write", name, str(ckpt)], capture_output=True, text=True, env=env)
        if w.returncode != 0:
            raise SystemExit(f"writing the {name} checkpoint failed: {w.stderr[-2000:]}")
        params, ckpt_bytes = json.loads(w.stdout.strip().splitlines()[-1])
        t_write = time.perf_counter() - t0
        print(f"{name}: {params / 1e9:.2f} B parameters, {ckpt_bytes / 1e9:.1f} GB bf16 written in {t_write:.0f} s",
              flush=True)
        comp = timed([sys.executable, "-m", "finegrain.cli", "quantize", "--model", str(ckpt), "--stream", "--recipe",
                      recipe, "--out", str(art), "--overwrite", "--calibration-samples", str(samples),
                      "--calibration-seq-len", str(seq)], work / f"{name}-compile.log", env)
        load = timed([sys.executable, "-c", LOAD_AND_RUN, str(art)], work / f"{name}-load.log", env)
        art_bytes = sum(f.stat().st_size for f in art.rglob("*") if f.is_file())
        row = {"model": name, "parameters_b": round(params / 1e9, 3), "checkpoint_gb": round(ckpt_bytes / 1e9, 2),
               "recipe": recipe, "calibration": f"{samples} x {seq} tokens", "artifact_gb": round(art_bytes / 1e9, 2),
               "compile_minutes": round(comp["seconds"] / 60, 2), "compile_peak_rss_gib": comp["peak_rss_gib"],
               "target_gib": target, "load_forward_peak_rss_gib": load["peak_rss_gib"],
               "load_forward_seconds": load["seconds"], "forward": load["stdout"].strip().splitlines()[-1],
               "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(art, ignore_errors=True)
    print(f"\n{'model':<12}{'params':>8}{'ckpt GB':>9}{'recipe':>18}{'calib':>16}{'minutes':>9}{'peak GiB':>10}"
          f"{'target':>8}{'artifact GB':>13}{'load+fwd GiB':>14}")
    for r in rows:
        print(f"{r['model']:<12}{r['parameters_b']:>8.2f}{r['checkpoint_gb']:>9.1f}{r['recipe']:>18}"
              f"{r['calibration']:>16}{r['compile_minutes']:>9.1f}{r['compile_peak_rss_gib']:>10.2f}"
              f"{str(r['target_gib'] or '-'):>8}{r['artifact_gb']:>13.2f}{r['load_forward_peak_rss_gib']:>14.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "large_model.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
