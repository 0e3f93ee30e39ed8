"""The GPU backend's Triton kernels against the reference (``QuantFormat.dequantize`` + a float
matmul): under ``TRITON_INTERPRET=1`` on CPU tensors here (``tests/conftest.py`` sets it when no
CUDA device is present), on the device where one is. Small shapes with N not a multiple of the
block, K with a ragged last group (576 = 4 x 128 + 64), M = 1 (GEMV), M = 3 (GEMV, several rows)
and M = 20 (tl.dot GEMM)."""
import pytest
import torch

pytest.importorskip("triton")
from finegrain.backends.gpu import kernels  # noqa: E402
from finegrain.formats import QuantFormat, scales  # noqa: E402
from finegrain.formats.hadamard import apply_hadamard, hadamard_parts  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WEIGHTS = ["int4-g128-asym-fp16", "int4-g32-sym-fp16", "int3-g128-asym-fp16", "int2-g64-asym-fp16",
           "int8-channel-sym-fp16", "int8-tensor-sym-fp32", "int4-g128-asym-int8",  # DGQ weight-only
           "e2m1-g32-sym-e8m0", "e2m1-g16-sym-e4m3", "int4-g16-sym-e4m3", "e4m3-channel-sym-fp32",
           "e2m3-g32-sym-e8m0", "e4m3-g128x128-sym-fp32", "int8-g64x32-sym-fp16"]  # 2-D blocks


# Every kernel launch of this file's tests under the interpreter: (kernel, argument types, constexprs), compiled
# ahead of time for Hopper by the last test (the interpreter runs a kernel's Python, not Triton's compiler)
LAUNCHES: dict[str, dict] = {}
_POINTERS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.uint8: "u8",
             torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv"}


def _launch_record(fn, args, kwargs) -> dict:
    import inspect

    sig = inspect.signature(fn)
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    types, consts = {}, {}
    for name, p in sig.parameters.items():
        v = bound.arguments.get(name, p.default)
        if "constexpr" in str(p.annotation):
            consts[name] = v
        elif isinstance(v, torch.Tensor):
            types[name] = "*" + _POINTERS[v.dtype]
        elif v is None:
            types[name] = "none"
        elif isinstance(v, bool):
            types[name] = "i1"
        elif isinstance(v, int):
            types[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        else:
            types[name] = "fp32"
    return {"module": fn.__module__, "name": fn.__name__, "types": types, "consts": consts}


@pytest.fixture(autouse=True)
def _record_launches(monkeypatch):
    if kernels.INTERPRET:
        from triton.runtime import interpreter

        # the kernels are checked here with the interpreter's int32 overflow checks on (the model-level files
        # turn them off for speed, tests/backends/_interpret.py, and must have restored them)
        assert interpreter.interpreter_builder.options.sanitize_overflow
        real = interpreter.InterpretedFunction.run

        def run(self, *args, grid, warmup, **kwargs):
            rec = _launch_record(self.fn, args, kwargs)
            LAUNCHES.setdefault(repr(sorted(rec.items(), key=str)), rec)
            return real(self, *args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    yield


def _packed(tag: str, n: int, k: int, seed: int = 0):
    fmt = QuantFormat.parse(tag)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q = fmt.quantize(w)
    p = kernels.pack_weight(fmt, q.codes, scales.stored_scale(fmt, q), q.zero,
                            None if q.scale2 is None else scales.stored_scale2(fmt, q))
    on = {key: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for key, v in p.items()}
    return fmt, fmt.dequantize(q), on


def _close(y, ref, rel=2e-5):
    err = (y.cpu().float() - ref).abs().max().item()
    assert err <= rel * max(1.0, ref.abs().max().item()), f"max error {err:.3e}"


@pytest.mark.parametrize("tag", WEIGHTS)
@pytest.mark.parametrize("n,k", [(40, 200), (33, 576)])
def test_weight_kernels_equal_the_reference(tag, n, k):
    fmt, w, p = _packed(tag, n, k)
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(n, generator=gen)
    for m in (1, 3, 20):
        x = torch.randn(m, k, generator=gen)
        y = kernels.wq_linear(x.to(DEVICE), p, b.to(DEVICE))
        assert y.shape == (m, n) and y.dtype == x.dtype
        _close(y, torch.nn.functional.linear(x, w, b))


def test_split_k_gemv_and_leading_dims():
    """Split-K partial sums (atomic adds) over 3 programs, several rows, a [B, T, K] input."""
    _, w, p = _packed("int4-g64-asym-fp16", 70, 448)
    x = torch.randn(2, 2, 448, generator=torch.Generator().manual_seed(2))
    y = kernels.wq_linear(x.to(DEVICE), p, config=dict(BN=32, BK=64, SPLIT_K=3))
    assert y.shape == (2, 2, 70)
    _close(y, x @ w.T)
    x = torch.randn(20, 448, generator=torch.Generator().manual_seed(3))
    y = kernels.wq_linear(x.to(DEVICE), p, config=dict(BM=16, BN=16, BK=32))  # GEMM, a K tile inside a group
    _close(y, x @ w.T)


@pytest.mark.parametrize("tag,act", [("int4-g128-asym-fp16", "int8-token-sym-fp32-dyn"),
                                     ("int4-g128-asym-int8", "int8-token-sym-fp32-dyn"),  # DGQ W4A8
                                     ("int8-channel-sym-fp16", "int8-token-sym-fp32-dyn"),  # W8A8
                                     ("int4-g128-asym-fp16", "int4-token-sym-fp32-dyn"),  # W4A4
                                     ("int8-channel-sym-fp16", "int8-tensor-sym-fp32-dyn"),
                                     ("int4-g64-sym-fp16", "int8-token-sym-fp16-dyn-clip0.9"),
                                     ("e4m3-channel-sym-fp32", "e4m3-token-sym-fp32-dyn"),  # W8A8 FP8
                                     ("e4m3-g32-sym-e8m0", "e4m3-token-sym-fp32-dyn"),
                                     ("int4-g128-asym-fp16", "int4-g64-sym-fp32-dyn-clip0.9"),  # activation groups
                                     ("int8-channel-sym-fp16", "int8-g32-sym-fp16-dyn")])
def test_integer_dot_kernel_equals_the_reference(tag, act):
    a = QuantFormat.parse(act)
    gen = torch.Generator().manual_seed(3)
    for n, k in [(40, 256), (33, 576)]:
        fmt, w, p = _packed(tag, n, k)
        ag = a.group_size if a.granularity == "group" else 0
        assert kernels.a8_ok(p, f8=a.kind == "e4m3", act_group=ag)
        b = torch.randn(n, generator=gen)
        for m in ((1, 5, 40) if not ag else (1, 7)):  # activation groups: many more quantizer rows, fewer tokens
            x = torch.randn(m, k, generator=gen) * 3
            x[0, 3] = 40.0  # an outlier channel
            qx = a.quantize(x)
            if a.granularity != "tensor":  # the activation quantizer is bit-exact
                codes, s = kernels.quant_rows(x.to(DEVICE).reshape(-1, ag or k), a)
                assert torch.equal(codes.cpu().reshape(m, k), qx.codes)
                assert torch.equal(s.cpu(), qx.scale.reshape(-1))
            y = kernels.a8_linear(x.to(DEVICE), a, p, b.to(DEVICE))
            _close(y, torch.nn.functional.linear(a.dequantize(qx), w, b), rel=1e-6)


def _assert_within_one_step(got: torch.Tensor, want: torch.Tensor, a: QuantFormat) -> None:
    """A fused quantizer's codes: the reference's but where its input's rounding moved a value across a
    rounding boundary (at most one step, INT or E4M3, at most 1 in 500 codes)."""
    if a.kind == "e4m3":
        got, want = got.view(torch.float8_e4m3fn).float(), want.view(torch.float8_e4m3fn).float()
        steps = (got - want).abs() / want.abs().clamp_min(2.0**-9) <= 0.126  # one E4M3 step
    else:
        steps = (got.int() - want.int()).abs() <= 1
    assert steps.all() and (got != want).float().mean() <= 0.002


@pytest.mark.parametrize("act", ["int8-token-sym-fp32-dyn", "int4-token-sym-fp16-dyn-clip0.9",
                                 "e4m3-token-sym-fp32-dyn"])
def test_rms_norm_fused_quantizer_equals_norm_then_quantize(act):
    """The quantizer fused into the RMSNorm: the same scales (to fp32 rounding) and codes as the
    reference quantizer on torch's norm, but where the norm's own rounding moves a value across a
    rounding boundary (at most one step, at most 1 in 500 codes)."""
    a = QuantFormat.parse(act)
    gen = torch.Generator().manual_seed(7)
    for m, k in [(1, 576), (7, 200)]:
        h = torch.randn(m, k, generator=gen) * 2
        h[0, 9] = 50.0
        w = torch.rand(k, generator=gen) + 0.5
        y = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
        ref = a.quantize(y)
        q, s = kernels.rms_norm_quantize(h.to(DEVICE), w.to(DEVICE), 1e-5, a)
        assert torch.allclose(s.cpu(), ref.scale.reshape(-1), rtol=1e-5, atol=0)
        _assert_within_one_step(q.cpu(), ref.codes, a)
    with pytest.raises(ValueError, match="per-token format"):
        kernels.rms_norm_quantize(h.to(DEVICE), w.to(DEVICE), 1e-5, QuantFormat.parse("int8-g32-sym-fp32-dyn"))


@pytest.mark.parametrize("act", ["int8-token-sym-fp32-dyn", "int4-token-sym-fp16-dyn-clip0.9",
                                 "e4m3-token-sym-fp32-dyn"])
def test_silu_mul_fused_quantizer_equals_swiglu_then_quantize(act):
    """The quantizer fused into SwiGLU's ``silu(g) * u``: the reference quantizer's scales (to fp32
    rounding) and codes but where exp's last-bit differences move a value across a rounding boundary
    (at most one step, at most 1 in 500 codes); operands that are row-strided views (a fused gate / up
    projection's halves) read in place."""
    a = QuantFormat.parse(act)
    gen = torch.Generator().manual_seed(8)
    for m, k in [(1, 576), (7, 200)]:
        gu = torch.randn(m, 2 * k, generator=gen) * 3
        gu[0, 5] = 40.0
        g, u = gu.chunk(2, dim=-1)  # views, row stride 2k
        ref = a.quantize(torch.nn.functional.silu(g) * u)
        q, s = kernels.silu_mul_quantize(*gu.to(DEVICE).chunk(2, dim=-1), a)
        assert torch.allclose(s.cpu(), ref.scale.reshape(-1), rtol=1e-5, atol=0)
        _assert_within_one_step(q.cpu(), ref.codes, a)
    with pytest.raises(ValueError, match="per-token format"):
        kernels.silu_mul_quantize(g.to(DEVICE), u.to(DEVICE), QuantFormat.parse("int8-g32-sym-fp32-dyn"))


def test_fp8_block_wise_dot_equals_the_reference():
    """FP8 W8A8 block-wise (128 x 128 weight blocks with fp32 scales, 1 x 128 activation groups): E4M3 x
    E4M3 on tl.dot, the weight block scale per output row and K tile, the activation group scale per
    row and K tile; N not a multiple of the 128-row block (200: the last block has 72 rows)."""
    a = QuantFormat.parse("e4m3-g128-sym-fp32-dyn")
    gen = torch.Generator().manual_seed(5)
    for n, k in [(200, 256), (64, 384)]:
        fmt, w, p = _packed("e4m3-g128x128-sym-fp32", n, k)
        assert kernels.a8_ok(p, f8=True, act_group=128)
        for m in (1, 17):
            x = torch.randn(m, k, generator=gen) * 3
            x[0, 5] = 60.0
            qx = a.quantize(x)
            codes, s = kernels.quant_rows(x.to(DEVICE).reshape(-1, 128), a)
            assert torch.equal(codes.cpu().reshape(m, k).view(torch.float8_e4m3fn), qx.codes.view(torch.float8_e4m3fn))
            y = kernels.a8_linear(x.to(DEVICE), a, p)
            _close(y, a.dequantize(qx) @ w.T, rel=1e-6)


def test_e4m3_encoder_is_torchs_cast_bit_for_bit():
    """Every E4M3 value, every midpoint between neighbours (ties to even), subnormals, zeros of both
    signs and values past 448 (saturating): the kernel's integer encoder gives torch's bit patterns."""
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[torch.isfinite(vals)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    x = torch.cat([vals, mids, torch.tensor([-0.0, 500.0, -1e4, 2.0**-12, 3 * 2.0**-10]),
                   torch.randn(2000, generator=torch.Generator().manual_seed(5)) * 30])
    x = x[: x.numel() // 64 * 64].reshape(-1, 64)
    fmt = QuantFormat.parse("e4m3-token-sym-fp32-dyn")
    codes, s = kernels.quant_rows(x.to(DEVICE), fmt)
    q = fmt.quantize(x)
    assert torch.equal(codes.cpu(), q.codes) and torch.equal(s.cpu(), q.scale.reshape(-1))


def test_integer_dot_refuses_what_does_not_fit_int8():
    for tag in ("int8-channel-asym-fp16", "e2m1-g32-sym-e8m0", "int4-g16-sym-e4m3"):
        assert not kernels.a8_ok(_packed(tag, 8, 64)[2]), tag


@pytest.mark.parametrize("n", [16, 64, 576, 1536, 12])
def test_fwht_kernel_equals_the_reference(n):
    factor = hadamard_parts(n)[0].float()
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    y = kernels.fwht(x.to(DEVICE), factor)
    _close(y, apply_hadamard(x, factor))


def test_codebook_formats_have_no_kernel():
    fmt = QuantFormat.parse("nf4-g64-sym-fp16")
    q = fmt.quantize(torch.randn(4, 64))
    with pytest.raises(ValueError, match="nf4-g64-sym-fp16 has no GPU kernel"):
        kernels.pack_weight(fmt, q.codes, q.scale, q.zero, None)


@pytest.mark.parametrize("tag", ["int4-g128-asym-fp16", "e2m1-g16-sym-e4m3"])
def test_bf16_activations_give_bf16_within_its_rounding(tag):
    """bf16 activations (the session's bf16 compute mode): a bf16 result within bf16 rounding of the
    fp32 reference, for the GEMV (M = 1, 3) and the tl.dot GEMM (M = 20)."""
    _, w, p = _packed(tag, 40, 576)
    gen = torch.Generator().manual_seed(4)
    for m in (1, 3, 20):
        x = torch.randn(m, 576, generator=gen)
        y = kernels.wq_linear(x.to(DEVICE, torch.bfloat16), p)
        assert y.dtype == torch.bfloat16 and y.shape == (m, 40)
        ref = x @ w.T
        assert (y.cpu().float() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_activations_on_the_device():
    """bf16 inputs on tensor cores: within bf16 rounding of the fp32 reference."""
    fmt, w, p = _packed("int4-g128-asym-fp16", 4096, 4096)
    for m in (1, 16, 128):
        x = torch.randn(m, 4096)
        y = kernels.wq_linear(x.to("cuda", torch.bfloat16), p).float().cpu()
        ref = x @ w.T
        assert (y - ref).norm() / ref.norm() < 1e-2


def test_tuning_picks_the_fastest_runnable_config_and_keeps_it(monkeypatch, tmp_path):
    """``kernels.tuned`` off the interpreter (a fake device and timer): a config that fails to launch
    is skipped, the fastest by CUDA-graph time wins, it is written to the cache file, asked again it
    is not re-timed, and a fresh process (cleared memory) reads it back from the file."""
    import json

    import triton.testing

    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setenv("FINEGRAIN_GPU_CACHE", str(tmp_path))
    monkeypatch.delenv("FINEGRAIN_GPU_TUNE", raising=False)
    monkeypatch.setattr(kernels, "_TUNED", None)
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    cands = (dict(BN=32), dict(BN=64), dict(BN=128), dict(BN=256))
    ms = {32: 3.0, 64: 1.0, 128: 2.0}
    timed = []

    def launch(cfg):
        if cfg["BN"] == 256:
            raise RuntimeError("out of shared memory")
        return cfg["BN"]

    def bench(fn, rep=20):
        timed.append(fn())
        return ms[timed[-1]]

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", bench)
    assert kernels.tuned("wq-gemv", (1, 64, 64), cands, launch) == dict(BN=64)
    assert sorted(timed) == [32, 64, 128]
    assert kernels.tuned("wq-gemv", (1, 64, 64), cands, launch) == dict(BN=64) and len(timed) == 3
    saved = json.loads(next(tmp_path.glob("gpu-tune-*.json")).read_text())
    assert saved == {"Fake GPU|wq-gemv|1x64x64": dict(BN=64)}
    monkeypatch.setattr(kernels, "_TUNED", None)
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    assert kernels.tuned("wq-gemv", (1, 64, 64), cands, launch) == dict(BN=64) and len(timed) == 3
    monkeypatch.setenv("FINEGRAIN_GPU_TUNE", "0")
    assert kernels.tuned("wq-gemv", (1, 32, 32), cands, launch) == dict(BN=32) and len(timed) == 3


FAKE_ACTS = ["e2m1-g32-sym-e8m0-dyn", "e2m3-g32-sym-e8m0-dyn", "e3m2-g32-sym-e8m0-dyn", "e4m3-g32-sym-e8m0-dyn",
             "int8-g32-sym-e8m0-dyn", "e2m1-g16-sym-e4m3-dyn", "int4-g16-sym-e4m3-dyn", "int4-g16-sym-fp16-dyn",
             "e5m2-g32-sym-e8m0-dyn", "int8-token-sym-bf16-dyn-clip0.9"]


@pytest.mark.parametrize("tag", FAKE_ACTS)
def test_fake_quant_kernel_equals_the_reference_bit_for_bit(tag):
    """``_fake_quant_rows`` (the MX / NV block activations no code-dot kernel takes) gives the reference's
    ``fake_quantize`` values exactly: E8M0 / two-level E4M3 / float scales, INT and every OCP minifloat
    element, rows of many scales (powers of two from 2^-8 to 2^7), all-zero blocks and rows, M = 1 / 3 / 20,
    rows of 576 (per-token scales over several tiles), and the K a format's groups do not divide is refused."""
    fmt = QuantFormat.parse(tag)
    gen = torch.Generator().manual_seed(7)
    for m, k in ((1, 64), (3, 96), (20, 128), (2, 576)):  # a 576-wide row: per-token scales span several tiles
        x = torch.randn(m, k, generator=gen) * torch.exp2(torch.randint(-8, 8, (m, 1), generator=gen).float())
        x[0, :32] = 0.0
        if m > 2:
            x[1] = 0.0
        got = kernels.fake_quantize(x.to(DEVICE), fmt).cpu()
        assert torch.equal(got, fmt.fake_quantize(x)), (tag, m, k)
    if fmt.granularity == "group":
        assert not kernels.fake_quant_ok(fmt, 3 * fmt.group_size + fmt.group_size // 2)
        with pytest.raises(ValueError, match="has no kernel"):
            kernels.fake_quantize(torch.zeros(2, fmt.group_size + 8), fmt)
    assert not kernels.fake_quant_ok(QuantFormat.parse("int8-token-asym-fp16-dyn"))  # asymmetric: the reference op


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every test above compiles its kernels")
def test_every_launched_kernel_compiles_for_hopper(tmp_path):
    """Every distinct launch this file's tests made under the interpreter (kernel, argument types,
    constexprs: each weight format's path, the integer / FP8 dots, the fused quantizers, the FWHT),
    compiled ahead of time for sm_90 by Triton's own compiler down to a cubin (no GPU needed). The
    interpreter runs a kernel's Python: it takes code the compiler rejects (a run-time bound in
    ``tl.arange``, a type the dot does not take), which would otherwise first fail on the device.
    Run alone, it first runs the file's kernel tests to record their launches."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if len(LAUNCHES) < 40:  # run alone (-k): record the launches here
        for tag in WEIGHTS:
            test_weight_kernels_equal_the_reference(tag, 40, 200)
        test_split_k_gemv_and_leading_dims()
        for act in ("int8-token-sym-fp32-dyn", "int4-token-sym-fp16-dyn-clip0.9"):
            test_rms_norm_fused_quantizer_equals_norm_then_quantize(act)
            test_silu_mul_fused_quantizer_equals_swiglu_then_quantize(act)
        test_integer_dot_kernel_equals_the_reference("int4-g128-asym-fp16", "int8-token-sym-fp32-dyn")
        test_fp8_block_wise_dot_equals_the_reference()
        test_e4m3_encoder_is_torchs_cast_bit_for_bit()
        test_fwht_kernel_equals_the_reference(576)
        test_bf16_activations_give_bf16_within_its_rounding("int4-g128-asym-fp16")
        for tag in FAKE_ACTS:
            test_fake_quant_kernel_equals_the_reference_bit_for_bit(tag)
    names = {r["name"] for r in LAUNCHES.values()}
    assert names >= {"_wq_gemv", "_wq_gemm", "_a8_gemm", "_quant_rows", "_rms_norm_quant_rows",
                     "_silu_mul_quant_rows", "_fwht", "_fake_quant_rows"}, names
    # and one launch the compiler must reject (a 24-wide tile: block shapes are powers of two), so the check can fail
    fwht = next(r for r in LAUNCHES.values() if r["name"] == "_fwht")
    bad = {**fwht, "consts": {**fwht["consts"], "BK": 24}}
    path = tmp_path / "launches.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*LAUNCHES.values(), bad]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compiled here, not read from an earlier run's cache
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("_aot_compile.py")), str(path), "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    out = res.stdout.strip().splitlines()
    assert res.returncode == 0 and out, res.stderr[-2000:]
    assert out[0].startswith(f"compiled {len(LAUNCHES)} failed 1"), "\n".join(out[:20])
    assert out[1].startswith("FAILED _fwht") and "'BK': 24" in out[1] and "power of 2" in out[1], out[1]
