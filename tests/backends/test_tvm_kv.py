"""The TVM backend over the KV cache (compile(kv_cache=True)): ``prefill`` and ``decode`` take the
past keys / values and return the presents, so decoding one token at a time over the cache gives
the full-sequence logits at every position for the families the loader takes (GQA, q/k/v biases,
QK-norm, sliding windows, fused projections); quantized builds (the low-bit GEMV and the integer-dot
W4A8 kernel) generate the reference backend's tokens; a deployment directory generates through the
standalone tvm.runtime script with no finegrain import; bad lengths get clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finegrain
from finegrain.compiler.capture import kv_inputs
from finegrain.errors import ArtifactError, InputError

pytest.importorskip("tvm")

from finegrain.backends.tvm.deploy import TvmDeployment  # noqa: E402
from tests.test_kv_cache import FLOAT, _family, _incremental, _rel  # noqa: E402  (a TVM session is its own .session())

pytestmark = pytest.mark.tvm

ROOT = Path(__file__).resolve().parents[2]
TARGET = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}  # AVX2: builds and runs on every machine we get


@pytest.mark.parametrize("family,cache", [("llama", "static"), ("qwen2", "static"), ("phi3", "static"),
                                          ("gemma3", "static"), ("llama", "concat"), ("gemma3", "concat")])
def test_decode_over_the_cache_equals_the_full_sequence(family, cache):
    model = _family(family)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    cm = finegrain.compile(model, (ids,), recipe=FLOAT, progress=False, kv_cache=True)
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).logits
    with cm.session("tvm", target=TARGET, max_seq_len=64, cache=cache) as s:
        assert s.kv["cache"] == cache
        inc, state = _incremental(s, x, prefill=5)
        assert _rel(ref, inc) <= 1e-4, (family, _rel(ref, inc))
        out = s.run_all(*kv_inputs(cm.kv, x))  # the whole sequence over an empty past
        assert _rel(ref, out[0]) <= 1e-4
        # the artifact's contract holds for either cache: presents = [1, kv_heads, 24, head_dim]
        assert all(tuple(p.shape) == (1, cm.kv["kv_heads"], 24, cm.kv["head_dim"]) for p in out[1:])
        # a past given as tensors (chunked prefill: 10 tokens over the first 14's presents)
        half = s.run_all(*kv_inputs(cm.kv, x[:, :14]))
        rest = s.run_all(*kv_inputs(cm.kv, x[:, 14:], list(half[1:]), 14))
        assert _rel(ref[:, 14:], rest[0]) <= 1e-4
        assert max((a - b).abs().max().item() for a, b in zip(rest[1:], out[1:])) <= 1e-4
        one, _ = _incremental(s, x[:, :6], prefill=1)  # decode over an empty past (a one-token prompt)
        assert _rel(ref[:, :6], one) <= 1e-4
    assert len(state["past"]) == 2 * cm.kv["layers"] and state["pos"] == 24
    want = (1, 64, cm.kv["kv_heads"], cm.kv["head_dim"]) if cache == "static" else (
        1, cm.kv["kv_heads"], 24, cm.kv["head_dim"])  # the preallocated buffers / the presents
    assert tuple(state["past"][0].shape) == want


@pytest.mark.parametrize("recipe", ["w4a16-g128", "w4a8-g128"])
def test_quantized_cache_build_generates_the_reference_tokens(tiny_llama, tiny_inputs, recipe):
    example, calib, test = tiny_inputs
    cm = finegrain.compile(tiny_llama, example, recipe=recipe, calibration=calib, progress=False, kv_cache=True)
    with cm.session("tvm", target=TARGET, max_seq_len=64) as s:
        kernels = set(k["kind"] for k in s.manifest["kernels"].values())
        assert kernels == ({"int8-dot"} if recipe == "w4a8-g128" else {"int"}), kernels
        inc, _ = _incremental(s, test, prefill=3)
        ref = cm(test)
        assert _rel(ref, inc) <= 1e-4, _rel(ref, inc)
        prompt = test[:, :6]
        assert s.generate(prompt, 12).tokens == cm.generate(prompt, 12).tokens


def test_a_cache_deployment_generates_with_tvm_runtime_alone(tiny_llama, tmp_path):
    cm = finegrain.compile(tiny_llama, (torch.randint(0, 256, (1, 8)),), recipe="w4a16-g128", progress=False,
                           kv_cache=True)
    out = tmp_path / "deploy"
    m = cm.build(out, target=TARGET, max_seq_len=48)
    assert m["kv"] == {**cm.kv, "max_seq_len": 48, "cache": "static"}
    assert m["functions"] == {"decode": {"seq_len": [1, 1]}, "prefill": {"seq_len": [2, 48]}}
    prompt = [5, 17, 3, 99, 42]
    want = cm.generate(torch.tensor([prompt]), 10).tokens
    dep = finegrain.load(out, allow_native=True)
    assert isinstance(dep, TvmDeployment) and dep.kv == m["kv"]
    assert dep.generate(torch.tensor([prompt]), 10).tokens == want
    # the standalone script: prefill once, then decode per token over the presents it is handed back
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "assert not [m for m in sys.modules if m.startswith('finegrain')], 'imported finegrain'")
    res = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / "run_tvm_deploy.py"), str(out), "--ids",
                          *map(str, prompt), "--max-new-tokens", "10"], capture_output=True, text=True, timeout=300,
                         check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["cache"] == "static" and got["new_tokens"] == want and got["decode_tokens_per_s"] > 0
    # past max_seq_len: a clear error before TVM runs; a tampered layout is refused at load
    with pytest.raises(InputError, match="exceeds the 48 tokens"):
        dep.generate(torch.tensor([prompt * 8]), 10)
    _, state = dep.prefill(torch.tensor([prompt * 9]))
    with pytest.raises(InputError, match="past the 48 tokens"):
        dep.step(state, torch.tensor([[1, 2, 3, 4]]))
    mf = out / "manifest.json"
    bad = json.loads(mf.read_text())
    bad["kv"]["layers"] = 7
    mf.write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match="KV-cache artifact's inputs"):
        TvmDeployment(out)
    bad["kv"]["layers"], bad["kv"]["cache"] = m["kv"]["layers"], "paged"
    mf.write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match="kv 'cache' must be one of"):
        TvmDeployment(out)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_cache_build_decodes_for_each_isa(tiny_llama, tiny_inputs, isa, tmp_path):
    """Both vector widths build the cache graph (attention over a cache, low-bit GEMV); it runs where
    the host has the ISA (CI may run on either)."""
    from tests.backends.test_tvm_backend import ISA_TARGETS, _host_has

    example, calib, test = tiny_inputs
    cm = finegrain.compile(tiny_llama, example, recipe="w4a16-g128", calibration=calib, progress=False, kv_cache=True)
    cm.build(tmp_path / "dep", target=ISA_TARGETS[isa], max_seq_len=64)
    if not _host_has(isa):
        pytest.skip(f"built for {isa}; this host cannot run it")
    inc, _ = _incremental(TvmDeployment(tmp_path / "dep"), test, prefill=3)
    assert _rel(cm(test), inc) <= 1e-4
