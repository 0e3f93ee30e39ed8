"""The GPU backend end to end on the tiny Llama: each preset's graph with its linears on the Triton
kernels (interpreted on CPU tensors here) gives the reference's logits; the KV-cache graph's
prefill / decode steps too; what it cannot take natively it says (emulated), by the registry."""
import pytest
import torch

pytest.importorskip("triton")
import finegrain  # noqa: E402
from finegrain.backends import registry  # noqa: E402
from finegrain.errors import InputError  # noqa: E402
from finegrain.formats.ops import DEQUANTIZE, QUANTIZE  # noqa: E402
from tests.backends._interpret import overflow_checks_off  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _no_overflow_checks():
    """The interpreter's int32 overflow checks off here; the kernels have them on in test_gpu_kernels.py."""
    with overflow_checks_off():
        yield


@pytest.mark.parametrize("preset,kinds", [("w4a16-g128", {"wq"}), ("w3a16-g128", {"wq"}), ("w8a8", {"int8-dot"}),
                                          ("w4a8-dgq", {"int8-dot"}), ("w4a4-hadamard", {"int8-dot"}),
                                          # down_proj's K = 96 is not a multiple of the activation group 64: the
                                          # float-activation kernel after the reference's fake quantization
                                          ("w4a4-g64-rot-gptq", {"int8-dot", "wq"}),
                                          ("nvfp4", {"wq"}), ("fp8", {"fp8-dot"}), ("fp8-block", {"wq"}), ("nf4-g64", {"dequantized at load"})])
def test_presets_on_the_kernels_give_the_reference_logits(compiled, tiny_inputs, preset, kinds):
    cm = compiled(preset)
    test = tiny_inputs[2]
    ref = cm.session("torch").run(test)
    with cm.session("gpu") as s:
        out = s.run(test)
        assert {v["kind"] for v in s.kernels.values()} == kinds
        if preset == "w4a4-g64-rot-gptq":
            assert all((v["kind"] == "wq") == (v["shape"][1] % 64 != 0) for v in s.kernels.values())
        if preset == "w4a4-hadamard":
            from finegrain.backends.gpu.lower import hadamard_op

            assert any(n.target is hadamard_op for n in s.gm.graph.nodes)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_linears_reading_one_activation_share_its_quantization(compiled, tiny_inputs):
    """W8A8: q / k / v read one normalized activation and gate / up another: 4 quantizations per layer
    for 7 integer-dot linears, the two after an RMSNorm fused into it (the norm's nodes gone), down_proj's
    fused into SwiGLU's ``silu(gate) * up`` (silu and its product gone), and the reference's logits."""
    from finegrain.backends.gpu.lower import a8_op, a8_quant_op, rms_norm_quant_op, silu_mul_quant_op

    cm = compiled("w8a8")
    with cm.session("gpu") as s:
        targets = [n.target for n in s.gm.graph.nodes]
        out = s.run(tiny_inputs[2])
    assert targets.count(a8_op) == 14  # 2 layers
    assert targets.count(rms_norm_quant_op) == 4 and targets.count(silu_mul_quant_op) == 2
    assert targets.count(a8_quant_op) == 2  # o_proj's: not a norm or a product
    assert targets.count(torch.ops.aten.rsqrt.default) == 1  # the final norm (before the float LM head) only
    assert torch.ops.aten.silu.default not in targets
    ref = cm.session("torch").run(tiny_inputs[2])
    assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_fp8_block_wise_runs_on_the_fp8_dot_where_k_fits_the_groups():
    """``fp8-block`` (128 x 128 E4M3 weight blocks, 1 x 128 E4M3 activation groups) on a model whose every
    K is a multiple of 128: every linear on the FP8 tl.dot kernel (none emulated), the reference's logits."""
    from finegrain.models.tiny import tiny_llama

    model = tiny_llama(seed=2, hidden=256)
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 256, (1, 10), generator=gen)
    cm = finegrain.compile(model, (ids[:, :8],), recipe="fp8-block", calibration=[(ids,)], progress=False)
    ref = cm.session("torch").run(ids)
    with cm.session("gpu") as s:
        out = s.run(ids)
        assert {v["kind"] for v in s.kernels.values()} == {"fp8-dot"}
    assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


@pytest.fixture(scope="module")
def kv_w4(tiny_llama, tiny_inputs):
    """The tiny Llama's W4A16 g128 KV-cache graph, compiled once for this module's cache tests."""
    example, calib, _ = tiny_inputs
    return finegrain.compile(tiny_llama, example, recipe="w4a16-g128", calibration=calib, progress=False, kv_cache=True)


def test_kv_cache_prefill_and_decode_steps(kv_w4, tiny_inputs):
    test, cm = tiny_inputs[2], kv_w4
    ref, gpu = cm.session("torch"), cm.session("gpu")
    la, sa = ref.prefill(test[:, :10])
    lb, sb = gpu.prefill(test[:, :10])
    assert (la - lb.cpu()).abs().max() < 1e-4
    for i in range(10, 13):
        la, sa = ref.step(sa, test[:, i:i + 1])
        lb, sb = gpu.step(sb, test[:, i:i + 1])
        assert (la - lb.cpu()).abs().max() < 1e-4
    assert ref.generate(test[:, :8], 6).tokens == gpu.generate(test[:, :8], 6).tokens


@pytest.mark.parametrize("preset", ["w4a16-g128", "w4a8-dgq", "nvfp4"])
def test_bf16_compute_mode_is_within_bf16_of_the_reference(compiled, tiny_inputs, preset):
    """``dtype="bfloat16"``: weights and activations in bf16, the kernels on bf16 inputs, RoPE's
    frequencies and positions in fp32; the logits within bf16 rounding of the fp32 reference (the
    tiny model's: measured 0.5-4.3% of the largest logit) and the same argmax at every position."""
    cm = compiled(preset)
    test = tiny_inputs[2]
    ref = cm.session("torch").run(test)
    with cm.session("gpu", dtype="bfloat16") as s:
        out = s.run(test)
        floats = {k: v.dtype for k, v in s.gm.named_buffers() if v.is_floating_point()}
        from finegrain.backends.gpu.lower import island_cast

        assert any(n.target is island_cast for n in s.gm.graph.nodes)  # cos / sin read by the bf16 side
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.08 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).all()
    assert {d for k, d in floats.items() if "_gpu_" not in k} == {torch.bfloat16, torch.float32}
    assert [d for k, d in floats.items() if d == torch.float32] == [torch.float32]  # inv_freq only


def test_bf16_kv_cache_steps(kv_w4, tiny_inputs):
    test, cm = tiny_inputs[2], kv_w4
    ref = cm.session("torch").run(test)
    with cm.session("gpu", dtype=torch.bfloat16) as s:
        logits, state = s.prefill(test[:, :10])
        assert logits.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in state["past"])
        for i in range(10, 14):
            logits, state = s.step(state, test[:, i:i + 1])
            assert (logits[0, -1].float() - ref[0, i]).abs().max() < 0.08 * ref[0, i].abs().max()
            assert logits[0, -1].argmax() == ref[0, i].argmax()
    with pytest.raises(InputError, match="dtype must be float32, bfloat16 or float16"):
        cm.session("gpu", dtype="int8")


def test_capabilities_name_native_and_emulated():
    from finegrain.formats import QuantFormat

    gpu = registry.get("gpu")
    parse = QuantFormat.parse
    assert gpu.capability(parse("int4-g128-asym-fp16"), "weight")[0] == "native"
    assert gpu.capability(parse("e2m1-g16-sym-e4m3"), "weight")[0] == "native"
    assert gpu.capability(parse("nf4-g64-sym-fp16"), "weight")[0] == "emulated"
    act = parse("int8-token-sym-fp32-dyn")
    assert gpu.capability(act, "activation", parse("int4-g128-asym-int8"))[0] == "native"
    assert gpu.capability(act, "activation", parse("e2m1-g32-sym-e8m0"))[0] == "emulated"
    f8 = parse("e4m3-token-sym-fp32-dyn")
    assert gpu.capability(f8, "activation", parse("e4m3-channel-sym-fp32"))[0] == "native"
    assert gpu.capability(f8, "activation", parse("int8-channel-sym-fp16"))[0] == "emulated"
    assert gpu.op_capability("hadamard")[0] == "native"
    assert gpu.op_capability("kv_append")[0] == "emulated"


def test_cpu_device_only_under_the_interpreter(compiled, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gpu = registry.get("gpu")
    if not torch.cuda.is_available():
        assert "no CUDA device" in gpu.available()
    with pytest.raises((InputError, Exception), match="TRITON_INTERPRET|no CUDA device"):
        gpu.session(compiled("w4a16-g128"), device="cpu")
    with pytest.raises(InputError, match="takes the options 'device', 'dtype', 'cache_tokens' and 'decode_graph' only"):
        gpu.session(compiled("w4a16-g128"), target="x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run (interpreter); on a GPU the script runs itself")
def test_the_device_script_runs_end_to_end(tmp_path):
    """benchmarks/gpu.py --smoke: every part of the device script (bandwidth, kernel table, decode
    rows, its report) on CPU tensors under the interpreter, so the script a GPU session runs has run."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--skip-tests", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert {r["kernel"] for r in report["kernels"]} >= {label for label, _, _ in mod.KERNELS}
    dec = report["decode"][0]
    assert min(dec[f"finegrain W4A16 {m} tok/s"] for m in ("fp32", "bf16", "bf16 concat", "bf16 CUDA graph",
                                                          "bf16 kivi4")) > 0
    assert dec["finegrain MXFP4 W4A4 bf16 CUDA graph tok/s"] > 0
    assert "| W4A8 DGQ |" in (tmp_path / "gpu.md").read_text()


ASYM_ACT = {"name": "w4-a8-asym", "rules": [{"role": "linear", "weight": "int4-g32-asym-fp16",
                                              "activation": "int8-token-asym-fp16-dyn"}]}


@pytest.mark.parametrize("route", ["device", "host"])
def test_reference_fallbacks_run_the_reference_ops(compiled, tiny_inputs, monkeypatch, route):
    """On CUDA the finegrain ops without a kernel (here: asymmetric INT8 activations' fake quantization)
    run the reference op on the device with fp32 inputs (``lower.in_fp32``; ``route`` "device"), and an
    op not known to be device-clean on CPU copies (``lower.on_host``; "host": the fake quantizers taken
    off ``IN_FP32``, as they were until 2026-12-06); the rewrite itself is checked on CPU tensors, in
    fp32 and in the bf16 compute mode (the ops get fp32 inputs, their results are cast back to bf16)."""
    from finegrain.backends.gpu import lower

    if route == "host":
        monkeypatch.setattr(lower, "IN_FP32", ())
    wrapper = lower.in_fp32 if route == "device" else lower.on_host
    cm = compiled(ASYM_ACT)
    test = tiny_inputs[2]
    ref = cm.session("torch").run(test)
    # fp32: max error within 1e-3 of the largest logit (a few one-code flips of the 8-bit activation quantizer,
    # from float rounding that differs by ISA: 2e-4 on AVX2 Zen 3) and mean within 1e-4 of the mean (2.2e-5
    # there; leaving the activations unquantized: 4e-3)
    for dtype, tol, mean_tol in ((torch.float32, 1e-3, 1e-4), (torch.bfloat16, 0.08, 1.0)):
        gm, _ = lower.prepare(cm.gm, torch.device("cpu"), dtype)
        lower._reference_fallbacks(gm.graph)
        gm.recompile()
        wrapped = [n for n in gm.graph.nodes if n.target in (lower.in_fp32, lower.on_host)]
        assert wrapped and all(n.target is wrapper and str(n.args[0]).startswith("finegrain.") for n in wrapped)
        with torch.inference_mode():
            out = gm(test)
        out = out[0] if isinstance(out, (tuple, list)) else out
        err = (out.float() - ref).abs()
        assert out.dtype == dtype and err.max().item() < tol * ref.abs().max().item()
        assert err.mean().item() < mean_tol * ref.abs().mean().item()


def test_cli_generates_on_the_gpu_backend_in_both_dtypes(hf_dir, tmp_path, capsys):
    """``finegrain generate --backend gpu [--gpu-dtype bfloat16] [--cuda-graph]`` on a KV-cache artifact:
    fp32 gives the reference's text, also with the fixed-shape decode step; bf16 runs its own graph
    (weights, activations and cache in bf16)."""
    from finegrain.cli import main

    art = tmp_path / "kv"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w4a16-g64", "--out", str(art), "--kv-cache",
                 "--calibration-samples", "0"]) == 0
    capsys.readouterr()
    texts = {}
    for backend, dtype, extra in (("torch", "float32", []), ("gpu", "float32", []), ("gpu", "bfloat16", []),
                                  ("gpu", "float32", ["--cuda-graph"])):
        assert main(["generate", str(art), "--prompt", "Hello there", "--max-new-tokens", "4", "--backend", backend,
                     "--gpu-dtype", dtype, *extra]) == 0
        out = capsys.readouterr().out
        assert "KV cache: one token per step" in out, out
        texts[backend, dtype, *extra] = " ".join(out.split()).split(f"[{backend}]")[0]
    assert texts["gpu", "float32"] == texts["torch", "float32"] == texts["gpu", "float32", "--cuda-graph"]
    loaded = finegrain.load(art)  # a loaded graph carries no traced dtypes: the compute-dtype pass works without them
    ids = torch.arange(100, 112)[None]
    ref = loaded.session("torch").run(ids)
    with loaded.session("gpu", dtype="bfloat16") as s:
        out = s.run(ids)
        assert len(s.gm.kv_writes) == 2 * loaded.kv["layers"]  # the static cache: the empty past found without traced values
    assert (out - ref).abs().max() < 0.08 * ref.abs().max()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3"])
def test_families_fuse_the_norm_quantizer_and_run_in_bf16(family):
    """W8A8 KV-cache graphs of six random-init families (Qwen3's q / k norms, Phi-3's fused projections,
    Gemma-3's scaled embeddings, 1 + w norms and sliding windows), one compile each:

    * fp32: the quantizer is fused into each RMSNorm feeding the integer-dot linears (2 per layer;
      Gemma-3's norm scales by 1 + w, added in fp32) and into SwiGLU's ``silu(gate) * up`` (down_proj's
      input; Phi-3's halves of a fused gate_up; not Gemma-3's GELU), o_proj's input quantized on its own;
      the reference's logits, also from decode steps of the fixed-shape graph (``decode_graph``: the
      causal and sliding-window masks computed from the fill tensor);
    * bf16 (the compute mode's data / position split): full-sequence logits and decode steps within
      bf16 rounding of the fp32 reference (measured 0.9-1.5% of the largest logit), the argmax nearly
      everywhere (random-init logits have near-ties)."""
    from finegrain.backends.gpu.lower import a8_quant_op, rms_norm_quant_op, silu_mul_quant_op
    from tests.test_kv_cache import _family

    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    cm = finegrain.compile(_family(family), (x[:, :8],), recipe="w8a8", progress=False, kv_cache=True)
    ref = cm.session("torch").run(x)
    with cm.session("gpu") as s:
        out = s.run(x)
        targets = [n.target for n in s.gm.graph.nodes]
    swiglu = 0 if family == "gemma3" else 2  # down_proj's input: silu(gate) * up, Gemma's GELU not fused
    assert targets.count(rms_norm_quant_op) == 4 and targets.count(silu_mul_quant_op) == swiglu
    assert targets.count(a8_quant_op) == 4 - swiglu
    assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    with cm.session("gpu", decode_graph=True) as s:  # the fixed-shape step: this family's masks from the fill
        logits, state = s.prefill(x[:, :10])
        for i in range(10, 13):
            logits, state = s.step(state, x[:, i:i + 1])
            assert (logits[0, -1] - ref[0, i]).abs().max() < 1e-4 * ref[0, i].abs().max()
    with cm.session("gpu", dtype="bfloat16") as s:
        out = s.run(x)
        logits, state = s.prefill(x[:, :10])
        for i in range(10, 13):
            logits, state = s.step(state, x[:, i:i + 1])
            assert (logits[0, -1].float() - ref[0, i]).abs().max() < 0.05 * ref[0, i].abs().max()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_static_kv_cache_appends_in_place_and_falls_back_to_concatenation(kv_w4, tiny_inputs):
    """Decode steps write the new keys / values into the session's preallocated buffers (the presents
    are views of them: the past is not copied) and give the reference's logits; a second step from an
    older state, a caller's own past, or more tokens than the buffers hold concatenate as traced,
    with the same logits, and never write over a state still in use."""
    from finegrain.backends.gpu.lower import kv_write_op

    test, cm = tiny_inputs[2], kv_w4
    ref = cm.session("torch")
    with cm.session("gpu", cache_tokens=14) as s:
        assert sum(n.target is kv_write_op for n in s.gm.graph.nodes) == 2 * cm.kv["layers"]
        _, sa = ref.prefill(test[:, :10])
        _, sb = s.prefill(test[:, :10])
        ptrs = [p.untyped_storage().data_ptr() for p in sb["past"]]
        branch = sb
        for i in range(10, 16):  # rows 14.. do not fit: concatenated
            la, sa = ref.step(sa, test[:, i:i + 1])
            lb, sb = s.step(sb, test[:, i:i + 1])
            assert (la - lb.cpu()).abs().max() < 1e-4
            same = [p.untyped_storage().data_ptr() for p in sb["past"]] == ptrs
            assert same == (i < 14), i
        # a step from the prefill's state again (its buffer was filled past it since): concatenated, right logits
        la, _ = ref.step(ref.prefill(test[:, :10])[1], test[:, 12:13])
        lb, sc = s.step(branch, test[:, 12:13])
        assert (la - lb.cpu()).abs().max() < 1e-4
        assert sc["past"][0].untyped_storage().data_ptr() != ptrs[0]
    with cm.session("gpu", cache_tokens=0) as s:
        assert ref.generate(test[:, :8], 6).tokens == s.generate(test[:, :8], 6).tokens
    with cm.session("gpu", dtype="bfloat16") as s:  # the buffers in the compute dtype
        _, st = s.prefill(test[:, :10])
        ptr = st["past"][0].untyped_storage().data_ptr()
        _, st = s.step(st, test[:, 10:11])
        assert st["past"][0].dtype == torch.bfloat16 and st["past"][0].untyped_storage().data_ptr() == ptr
    with pytest.raises(InputError, match="cache_tokens must be a non-negative integer"):
        cm.session("gpu", cache_tokens=-1)


def test_decode_graph_steps_over_the_whole_buffers(kv_w4, tiny_llama, tiny_inputs):
    """``decode_graph=True``: one-token steps over the session's own buffers run the fixed-shape graph
    (no past length read from a shape: every write an ``index_copy_`` at the fill tensor) over the
    whole buffers, the rows past the fill masked (filled with 1e4 here: the logits would move if they
    were read), with the reference's logits; a full buffer, a prefill or a step from an older state run
    the ordinary graph. Without static buffers, or with KIVI's windowed writes (a reference op, not a
    static write), it is refused by name."""
    from finegrain.backends.gpu.lower import static_append

    test, cm = tiny_inputs[2], kv_w4
    ref = cm.session("torch")
    with cm.session("gpu", decode_graph=True, cache_tokens=14) as s:
        targets = [n.target for n in s.fixed.graph.nodes]
        assert targets.count(static_append) == 2 * cm.kv["layers"]
        assert not any(n.target is torch.ops.aten.sym_size.int and n.args[0].name.startswith("past")
                       for n in s.fixed.graph.nodes)
        calls = []
        fixed = s.fixed
        s.fixed = lambda *a: calls.append(int(a[-1])) or fixed(*a)
        _, sa = ref.prefill(test[:, :10])
        _, sb = s.prefill(test[:, :10])
        for p in sb["past"]:
            p.as_strided((*p.shape[:2], 14, p.shape[3]), p.stride())[:, :, 10:] = 1e4
        branch = sb
        for i in range(10, 16):  # the buffers hold 14 rows: steps at 14 and 15 concatenate
            la, sa = ref.step(sa, test[:, i:i + 1])
            lb, sb = s.step(sb, test[:, i:i + 1])
            assert (la - lb.cpu()).abs().max() < 1e-4 * la.abs().max(), i
        assert calls == [10, 11, 12, 13]
        la, _ = ref.step(ref.prefill(test[:, :10])[1], test[:, 12:13])
        lb, _ = s.step(branch, test[:, 12:13])  # its buffer was filled past it since: the ordinary graph
        assert (la - lb.cpu()).abs().max() < 1e-4 * la.abs().max() and len(calls) == 4
    with cm.session("gpu", dtype="bfloat16") as s, cm.session("gpu", decode_graph=True, dtype="bfloat16") as f:
        _, sa = s.prefill(test[:, :10])
        _, sb = f.prefill(test[:, :10])
        for i in range(10, 13):  # bf16 buffers; the same bf16 arithmetic over a longer, masked key axis
            la, sa = s.step(sa, test[:, i:i + 1])
            lb, sb = f.step(sb, test[:, i:i + 1])
            assert (la.float() - lb.float()).abs().max() < 1e-2 * la.float().abs().max(), i
    with pytest.raises(InputError, match="decode_graph needs a KV-cache graph"):
        cm.session("gpu", decode_graph=True, cache_tokens=0)
    kivi = {"name": "dg-kivi", "rules": [], "kv_key": "int2-g8-asym-fp16-dyn", "kv_value": "int2-g16-asym-fp16-dyn",
            "kv_key_axis": "tokens", "kv_window": 4, "kv_sinks": 1}
    windowed = finegrain.compile(tiny_llama, tiny_inputs[0], recipe=kivi, progress=False, kv_cache=True)
    with pytest.raises(InputError, match="cache input past_0 is not appended into a static buffer"):
        windowed.session("gpu", decode_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_graph_is_captured_and_replayed_on_the_device(kv_w4, tiny_inputs):
    """On CUDA the fixed-shape step is captured once per prefill's buffers and replayed: no capture
    warning, one graph held, the eager session's logits at every step (fp32 and bf16)."""
    import warnings

    test, cm = tiny_inputs[2], kv_w4
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 2e-2)):
        with cm.session("gpu", device="cuda", dtype=dtype) as e, \
                cm.session("gpu", device="cuda", dtype=dtype, decode_graph=True) as g, warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            _, sa = e.prefill(test[:, :10])
            _, sb = g.prefill(test[:, :10])
            for i in range(10, 16):
                la, sa = e.step(sa, test[:, i:i + 1])
                lb, sb = g.step(sb, test[:, i:i + 1])
                assert (la.float() - lb.float()).abs().max() < tol * la.float().abs().max(), (dtype, i)
            assert len(g._graphs) == 1
            first = next(iter(g._graphs))
            g.generate(test[:, :8], 6)  # a new prefill's buffers: captured again, the old graph dropped
            assert len(g._graphs) == 1 and next(iter(g._graphs)) != first


@pytest.mark.parametrize("preset", ["mxfp4", "nvfp4", "mxfp6", "mxint8", "nvint4-rot"])
def test_block_activations_take_the_fake_quant_kernel(compiled, tiny_inputs, preset):
    """MX / NV block activations (no code-dot kernel takes them) are fake-quantized by one Triton kernel
    (``_fake_quant_rows``, ``lower.fake_quant_op``), not the reference op: every activation
    quantization of the linears is rewritten, none is left for the reference, and the logits equal the
    reference backend's (the kernel's values are the reference's bit for bit: ``test_gpu_kernels.py``)."""
    from finegrain.backends.gpu import lower

    cm = compiled(preset)
    gm, _ = lower.prepare(cm.gm, torch.device("cpu"))
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(lower.fake_quant_op) >= 2 * cm.kv.get("layers", 2) if cm.kv else targets.count(
        lower.fake_quant_op) >= 4, preset
    assert QUANTIZE not in targets and DEQUANTIZE not in targets, preset  # nothing left for the reference op
    test = tiny_inputs[2]
    ref = cm.session("torch").run(test)
    with torch.inference_mode():
        out = gm(test)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_reference_ops_stay_on_the_device(tiny_llama, tiny_inputs):
    """Off the CPU the KIVI / ZipCache writes (``kv_append``, ``kv_saliency``: they read the whole past)
    run on the device as they are and the activation fake quantization no kernel takes (here asymmetric
    INT8 activations of float linears) on the device with fp32 inputs (``in_fp32``); nothing runs on
    host copies (the graph prepared for the ``meta`` device, as a CUDA one would be)."""
    from finegrain.backends.gpu.lower import IN_FP32, ON_DEVICE, in_fp32, on_host, prepare
    from finegrain.compiler.ops import KV_APPEND, KV_SALIENCY

    zip_kivi = {"name": "gpu-zip", "rules": [{"role": "linear", "activation": "int8-token-asym-fp16-dyn"}],
                "kv_key": "int4-g8-asym-fp16-dyn", "kv_value": "int4-token-asym-fp16-dyn", "kv_key_axis": "tokens",
                "kv_zip_key": "int2-g8-asym-fp16-dyn", "kv_zip_value": "int2-token-asym-fp16-dyn", "kv_zip_ratio": 0.5,
                "kv_zip_block": 8, "kv_sinks": 1}
    cm = finegrain.compile(tiny_llama, tiny_inputs[0], recipe=zip_kivi, progress=False, kv_cache=True)
    gm, _ = prepare(cm.gm, torch.device("meta"))
    targets = [n.target for n in gm.graph.nodes]
    wrapped = [n.args[0] for n in gm.graph.nodes if n.target is in_fp32]
    assert targets.count(KV_APPEND) == 2 * cm.kv["layers"] and targets.count(KV_SALIENCY) == cm.kv["layers"]
    assert wrapped and set(wrapped) <= set(IN_FP32) and not set(wrapped) & set(ON_DEVICE)
    assert on_host not in targets


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kivi_writes_run_on_the_device(tiny_llama, tiny_inputs):
    """KIVI's windowed, pre-RoPE, rotated writes on CUDA tensors: the reference's logits through prefill
    and decode steps (to quantization-boundary flips: 5% of the largest logit)."""
    kivi = {"name": "gpu-kivi", "rules": [], "kv_key": "int4-g8-asym-fp16-dyn", "kv_value": "int4-g16-asym-fp16-dyn",
            "kv_key_axis": "tokens", "kv_window": 4, "kv_sinks": 1, "kv_pre_rope": True, "kv_rotate": True}
    cm = finegrain.compile(tiny_llama, tiny_inputs[0], recipe=kivi, progress=False, kv_cache=True)
    test, ref = tiny_inputs[2], cm.session("torch")
    with cm.session("gpu", device="cuda") as s:
        la, sa = ref.prefill(test[:, :10])
        lb, sb = s.prefill(test[:, :10])
        for i in range(10, 20):
            la, sa = ref.step(sa, test[:, i:i + 1])
            lb, sb = s.step(sb, test[:, i:i + 1])
            assert (la - lb.cpu()).abs().max() < 0.05 * la.abs().max(), i


def test_every_traced_device_argument_moves_to_the_target_device(tiny_llama):
    """The trace bakes the CPU in: ``arange(..., device=cpu)`` (keyword) and RoPE's
    ``inv_freq.to(cpu, float32)`` (``aten.to.device``, positional). Both must name the session's
    device (an H200 run of torch 2.11 failed in RoPE's matmul on the positional one)."""
    from torch.fx.node import map_aggregate

    from finegrain.backends.gpu.lower import prepare

    cm = finegrain.compile(tiny_llama, (torch.randint(0, 100, (1, 8)),), recipe="w4a16-g128", progress=False,
                           kv_cache=True)
    before = [n for n in cm.gm.graph.nodes if any(isinstance(a, torch.device) for a in n.args)]
    assert before, "the trace has no positional device argument: this test no longer covers it"
    gm, _ = prepare(cm.gm, torch.device("meta"))
    devices = []
    for n in gm.graph.nodes:
        map_aggregate((n.args, n.kwargs), lambda a: devices.append(a) if isinstance(a, torch.device) else a)
    assert len(devices) >= 2 and set(devices) == {torch.device("meta")}
