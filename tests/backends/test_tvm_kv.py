"""The TVM backend over the KV cache (compile(kv_cache=True)): ``prefill`` and ``decode`` take the
past keys / values and return the presents, so decoding one token at a time over the cache gives
the full-sequence logits at every position for the families the loader takes (GQA, q/k/v biases,
QK-norm, sliding windows, fused projections); quantized builds (the low-bit GEMV and the integer-dot
W4A8 kernel) generate the reference backend's tokens; a deployment directory generates through the
standalone tvm.runtime script with no finegrain import; bad lengths get clear errors."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import finegrain
from finegrain.compiler.capture import kv_inputs
from finegrain.errors import ArtifactError, InputError

pytest.importorskip("tvm")

from finegrain.backends.tvm.deploy import TvmDeployment  # noqa: E402
from tests.test_kv_cache import FLOAT, _family, _incremental, _rel  # noqa: E402  (a TVM session is its own .session())
from tests.backends.targets import BUILD  # noqa: E402

pytestmark = pytest.mark.tvm

ROOT = Path(__file__).resolve().parents[2]
TARGET = BUILD  # AVX2 at LLVM opt-level 1 (tests/backends/targets.py)


@pytest.mark.parametrize("family,cache", [("llama", "static"), ("qwen2", "static"), ("phi3", "static"),
                                          ("gemma3", "static"), ("falcon", "static"), ("gemma2", "static"),
                                          ("llama", "concat"), ("gemma3", "concat")])
def test_decode_over_the_cache_equals_the_full_sequence(family, cache):
    """Falcon: its fused qkv takes the key and value at index -2 / -1, which TVM's frontend read out of
    bounds until 2026-12-07 (wrong logits, NaN through the static cache). Gemma-2: its eager attention
    adds layer 0's mask to every layer's scores, which Relax could not shape while each past's length
    had its own symbol (the build failed inside TVM until 2026-12-07)."""
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
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m = cm.build(out, target=TARGET, max_seq_len=48)
    assert not [w for w in seen if "LeafSpec" in str(w.message)]  # torch's own deprecation, silenced in the build
    fp32 = {"dtype": "float32", "width": cm.kv["head_dim"]}
    assert m["kv"] == {**cm.kv, "max_seq_len": 48, "cache": "static",
                       "buffers": [{"name": f"{k}_{i}", **fp32} for i in range(cm.kv["layers"]) for k in ("key", "value")]}
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
    """Both vector widths build the cache graph with low-bit GEMV / GEMM kernels and both attention
    kernels over a cache: layer 0's cache in fp32 (int3 keys do not fill 32-bit words at head dim 16:
    it holds the formats' values) and layer 1's packed (KV4: code words unpacked by the packed decode
    kernel), in one build; it runs where the host has the ISA (CI may run on either)."""
    from tests.backends.test_tvm_backend import ISA_TARGETS, _host_has

    example, calib, test = tiny_inputs
    recipe = {"name": "w4kv4", "rules": [{"role": "linear", "weight": "int4-g128-asym-fp16"}],
              "kv_key": "int4-g16-asym-fp16-dyn", "kv_value": "int4-g16-asym-fp16-dyn",
              "kv_layers": [[0, "int3-g16-asym-fp16-dyn", "int4-g16-asym-fp16-dyn"]]}
    cm = finegrain.compile(tiny_llama, example, recipe=recipe, calibration=calib, progress=False, kv_cache=True)
    m = cm.build(tmp_path / "dep", target=ISA_TARGETS[isa], max_seq_len=64)
    assert {k["kind"] for k in m["kernels"].values()} == {"int"} and len(m["kernels"]) == 14
    if not _host_has(isa):
        pytest.skip(f"built for {isa}; this host cannot run it")
    dep = TvmDeployment(tmp_path / "dep")
    assert dep.packed_cache and [b["dtype"] for b in dep.cache_buffers] == [
        "float32", "float32", "int32", "float16", "uint8", "int32", "float16", "uint8"]
    inc, _ = _incremental(dep, test, prefill=3)
    assert _rel(cm(test), inc) <= 1e-4


# ---- the packed KV cache (lower_cache.pack_cache, kernels/attention.packed_decode_attention_func) ----

def _kv_recipe(key, value, **extra):
    return {"name": "kv-packed", "rules": [{"role": "linear"}], "kv_key": key, "kv_value": value, **extra}


@pytest.mark.parametrize("key,value", [("int4-g16-asym-fp16-dyn", "int4-g8-asym-fp16-dyn"),
                                       ("int8-token-sym-fp32-dyn", "int2-g8-sym-fp16-dyn"),
                                       ("int2-g16-asym-fp16-dyn", "int4-g16-asym-fp16-dyn"),
                                       ("e4m3-token-sym-fp32-dyn", "e4m3-g16-sym-fp16-dyn")])
def test_packed_layout_holds_exactly_the_fake_quantized_values(key, value):
    from finegrain.backends.tvm.lower_cache import decode_ref, encode_ref, kv_layout
    from finegrain.formats import QuantFormat

    x = torch.randn(1, 37, 2, 64, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 5, 1, 7] = 40.0  # an outlier channel
    for fmt in (key, value):
        lay = kv_layout(fmt, 64)
        codes, scales, zeros = encode_ref(x, fmt)
        assert codes.dtype == torch.int32 and codes.shape[-1] == lay["words"] == 64 * lay["bits"] // 32
        assert scales.shape[-1] == 64 // lay["group"]
        assert torch.equal(decode_ref(codes, scales, zeros if lay["asym"] else None, fmt, 64),
                           QuantFormat.parse(fmt).fake_quantize(x))


def test_packed_layout_refuses_what_it_cannot_hold():
    from finegrain.backends.tvm.lower_cache import kv_layout

    assert "whole 32-bit words" in kv_layout("int3-g16-asym-fp16-dyn", 64)
    assert "whole 32-bit words" in kv_layout("int2-g4-asym-fp16-dyn", 12)
    assert "bf16 scales" in kv_layout("int4-g16-asym-bf16-dyn", 64)
    assert "do not divide" in kv_layout("int4-g48-asym-fp16-dyn", 64)
    assert "not a dynamic integer" in kv_layout("int4-g16-asym-fp16", 64)
    assert "not a dynamic integer or FP8 E4M3" in kv_layout("e5m2-token-sym-fp32-dyn", 64)


@pytest.mark.parametrize("key,value,d", [("int4-g32-asym-fp16-dyn", "int2-g64-asym-fp16-dyn", 64),
                                         ("e4m3-token-sym-fp32-dyn", "int4-g16-sym-fp16-dyn", 64),
                                         # rows of 1, 2 and 4 words (repeated to 8 lanes), groups of 4 and 8
                                         ("int2-g8-asym-fp16-dyn", "int8-token-sym-fp32-dyn", 16),
                                         ("int2-g4-asym-fp16-dyn", "int4-g8-asym-fp16-dyn", 32)])
def test_packed_decode_kernel_equals_attention_over_the_dequantized_cache(key, value, d):
    """Words a row (``W = d * bits / 32``) below 8 are read as one vector and repeated to 8 lanes
    (``attention._unpack_row``), 8 and more lane by lane. The past spans three of the kernel's split-K
    chunks (``attention.decode_chunk``), one of them partly masked."""
    import math

    import numpy as np
    import tvm

    from finegrain.backends.tvm.kernels.attention import DECODE_MIN_CHUNK, packed_decode_attention_func
    from finegrain.backends.tvm.lower_cache import decode_ref, encode_ref, kv_layout

    g = torch.Generator().manual_seed(3)
    b, h, hk, p = 1, 6, 2, 2 * DECODE_MIN_CHUNK + 37  # 3 query heads per K / V head
    kl, vl = kv_layout(key, d), kv_layout(value, d)
    lib = tvm.compile(tvm.IRModule({"main": packed_decode_attention_func(b, h, hk, d, 3 * DECODE_MIN_CHUNK, 1 / math.sqrt(d), kl, vl)}),
                      target=TARGET)
    q, k, v = (torch.randn(*s, generator=g) for s in ((b, h, 1, d), (b, p, hk, d), (b, p, hk, d)))
    kn, vn = torch.randn(b, hk, 1, d, generator=g), torch.randn(b, hk, 1, d, generator=g)
    (kc, ks, kz), (vc, vs, vz) = encode_ref(k, key), encode_ref(v, value)
    keys = torch.cat([decode_ref(kc, ks, kz, key, d).transpose(1, 2), kn], 2).repeat_interleave(h // hk, 1)
    values = torch.cat([decode_ref(vc, vs, vz, value, d).transpose(1, 2), vn], 2).repeat_interleave(h // hk, 1)
    mask = torch.ones(1, p + 1, dtype=torch.bool)
    mask[0, 9] = False  # one masked key, and the second chunk's first eleven
    mask[0, DECODE_MIN_CHUNK:DECODE_MIN_CHUNK + 11] = False
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    bias = np.full((1, 3 * DECODE_MIN_CHUNK), -np.inf, np.float32)
    bias[0, :p + 1] = np.where(mask[0].numpy(), 0.0, -np.inf)
    dev = tvm.cpu()

    def t(x):
        return tvm.runtime.tensor(np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x), dev)
    none = torch.zeros(1, 1, 1, 1, dtype=torch.uint8)
    out = tvm.runtime.empty((b, h, 1, d), "float32", dev)
    lib["main"](t(q), t(kc), t(ks), t(kz if kl["asym"] else none), t(kn), t(vc), t(vs), t(vz if vl["asym"] else none),
                t(vn), t(bias), out)
    assert np.abs(out.numpy() - want.numpy()).max() <= 1e-5


from finegrain.compiler.recipe import KV_PRESETS  # noqa: E402  (the kv8 preset is packed on TVM)


# per layer (the tiny Llama has two) the key and value formats; the first build holds two layers'
# formats (KVTuner's per-layer pairs: one deployment, packed INT4 groups, FP8 E4M3 keys and INT8 values), the
# second RotateKV's cache
PACKED_CACHES = {"per-layer": ([("int4-g16-asym-fp16-dyn", "int4-g8-asym-fp16-dyn"),
                                (KV_PRESETS["kv8-fp8"]["kv_key"], KV_PRESETS["kv8"]["kv_value"])], {}),
                 "rotated": ([("int2-g8-asym-fp16-dyn", "int8-token-sym-fp32-dyn")] * 2, {"kv_rotate": True})}


@pytest.mark.parametrize("case", list(PACKED_CACHES))
def test_packed_cache_build_decodes_the_reference_logits(case, tmp_path):
    """The static build keeps the quantized cache as codes / scales / zero points (smaller than the
    fp32 cache by the format's ratio), decode's attention reads them in place, and decoding over it
    gives the reference backend's logits and tokens; the standalone runtime script generates the same."""
    from finegrain.backends.tvm.lower import import_relax

    model = _family("llama")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    pairs, extra = PACKED_CACHES[case]
    recipe = {**_kv_recipe(*pairs[0], **extra), "kv_layers": [[i, k, v] for i, (k, v) in enumerate(pairs)]}
    cm = finegrain.compile(model, (ids,), recipe=recipe, progress=False, kv_cache=True)
    assert cm.kv["layers"] == len(pairs)
    ref, _ = _incremental(cm, x, prefill=5)
    bufs: list = []
    mod, _, _ = import_relax(cm.gm, cm.input_specs, 64, TARGET, kv_buffers=bufs)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert any(n.startswith("decode_attention_packed") for n in names) and "decode_kv_decode" not in names, names
    m = cm.build(tmp_path / "dep", target=TARGET, max_seq_len=64)
    assert m["kv"]["buffers"] == bufs and all("packed" in b for b in bufs)
    dep = TvmDeployment(tmp_path / "dep")
    assert dep.packed_cache
    d, heads, layers = cm.kv["head_dim"], cm.kv["kv_heads"], cm.kv["layers"]
    per_token = 0  # bytes per token and head, summed over the layers
    for fmt in (f for pair in pairs for f in pair):
        f = finegrain.formats.QuantFormat.parse(fmt)
        groups = d // (f.group_size or d)
        per_token += d * f.bits // 8 + groups * (2 if f.scale == "fp16" else 4) + (0 if f.symmetric else groups)
    assert dep.cache_bytes(1) == heads * per_token < layers * heads * 2 * d * 4
    inc, state = _incremental(dep, x, prefill=5)
    assert _rel(ref, inc) <= 1e-4, _rel(ref, inc)
    assert [tuple(p.shape)[-1] for p in state["past"]] == [b["width"] for b in bufs]
    prompt = x[:, :6]
    want = cm.generate(prompt, 12).tokens
    assert dep.generate(prompt, 12).tokens == want
    with pytest.raises(InputError, match="keeps the KV cache packed"):
        dep.run_all(*kv_inputs(cm.kv, x[:, :4]))
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "assert not [m for m in sys.modules if m.startswith('finegrain')], 'imported finegrain'")
    res = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / "run_tvm_deploy.py"), str(tmp_path / "dep"),
                          "--ids", *map(str, prompt[0].tolist()), "--max-new-tokens", "12"], capture_output=True,
                         text=True, timeout=300, check=True)
    assert json.loads(res.stdout.strip().splitlines()[-1])["new_tokens"] == want
    mf = tmp_path / "dep" / "manifest.json"
    bad = json.loads(mf.read_text())
    bad["kv"]["buffers"][0]["dtype"] = "object"
    mf.write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match=r"kv 'buffers'\[0\]: needs a dtype"):
        TvmDeployment(tmp_path / "dep")


def test_a_layer_with_one_unpackable_format_keeps_an_fp32_cache():
    """int3 codes do not fill 32-bit words at head dim 16: that layer's K and V stay fp32 (holding
    the format's values), the other layer is packed; the logits still match the reference."""
    model = _family("llama")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    recipe = _kv_recipe("int4-g16-asym-fp16-dyn", "int4-g16-asym-fp16-dyn",
                        kv_layers=[[0, "int3-g16-asym-fp16-dyn", "int4-g16-asym-fp16-dyn"]])
    cm = finegrain.compile(model, (ids,), recipe=recipe, progress=False, kv_cache=True)
    ref, _ = _incremental(cm, x, prefill=4)
    with cm.session("tvm", target=TARGET, max_seq_len=32) as s:
        assert [b["dtype"] for b in s.cache_buffers] == ["float32", "float32", "int32", "float16", "uint8",
                                                         "int32", "float16", "uint8"]
        inc, _ = _incremental(s, x, prefill=4)
    assert _rel(ref, inc) <= 1e-4


@pytest.mark.parametrize("kv", [None, "kv8-fp8-static", "kv8-static"])
def test_a_saved_kv_artifact_builds_as_the_compiled_one(kv, tmp_path):
    """A KV-cache artifact loaded from disk (graph.json keeps no node metadata) builds a static TVM
    deployment as the in-memory one does: the presents' roles come from the cache graph's contract
    and their shapes from fake tensors, so the cache is packed where the format packs (the static
    FP8 / INT8 caches here) and decoding gives the reference's logits. Before 2026-12-05 this build failed.
    A static format's cache holds its codes alone (the layer's scale is a constant of the build): the
    bytes the manifest counts, and the standalone runtime (no finegrain) generates the reference's tokens."""
    from finegrain.compiler.recipe import with_kv

    model = _family("llama")
    gen = torch.Generator().manual_seed(4)
    calib = [(torch.randint(0, 256, (1, 32), generator=gen),) for _ in range(2)]
    recipe = with_kv(FLOAT, kv) if kv else FLOAT
    cm = finegrain.compile(model, (torch.randint(0, 256, (1, 8), generator=gen),), recipe=recipe, calibration=calib,
                           progress=False, kv_cache=True)
    cm.save(tmp_path / "art")
    back = finegrain.load(tmp_path / "art")
    x = torch.randint(0, 256, (1, 20), generator=gen)
    ref, _ = _incremental(cm, x, prefill=5)
    with back.session("tvm", target=TARGET, max_seq_len=32) as s:
        assert [b["dtype"] for b in s.cache_buffers] == (["int32"] * 4 if kv else ["float32"] * 4)
        inc, _ = _incremental(s, x, prefill=5)
        if kv:
            assert s.cache_bytes(20) == 20 * back.kv["quantization"]["bytes_per_token"]
        if kv == "kv8-static":
            from tests.backends.test_tvm_kv_window import _standalone_tokens

            assert _standalone_tokens(s.path, x[:, :5]) == back.generate(x[:, :5], 10).tokens
    assert _rel(ref, inc) <= 1e-4
