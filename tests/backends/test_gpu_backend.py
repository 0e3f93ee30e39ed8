"""The GPU backend end to end on the tiny Llama: each preset's graph with its linears on the Triton
kernels (interpreted on CPU tensors here) gives the reference's logits; the KV-cache graph's
prefill / decode steps too; what it cannot take natively it says (emulated), by the registry."""
import pytest
import torch

pytest.importorskip("triton")
import finegrain  # noqa: E402
from finegrain.backends import registry  # noqa: E402
from finegrain.errors import InputError  # noqa: E402


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


def test_kv_cache_prefill_and_decode_steps(tiny_llama, tiny_inputs):
    example, calib, test = tiny_inputs
    cm = finegrain.compile(tiny_llama, example, recipe="w4a16-g128", calibration=calib, progress=False, kv_cache=True)
    ref, gpu = cm.session("torch"), cm.session("gpu")
    la, sa = ref.prefill(test[:, :10])
    lb, sb = gpu.prefill(test[:, :10])
    assert (la - lb.cpu()).abs().max() < 1e-4
    for i in range(10, 13):
        la, sa = ref.step(sa, test[:, i:i + 1])
        lb, sb = gpu.step(sb, test[:, i:i + 1])
        assert (la - lb.cpu()).abs().max() < 1e-4
    assert ref.generate(test[:, :8], 6).tokens == gpu.generate(test[:, :8], 6).tokens


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
    with pytest.raises(InputError, match="takes the option 'device' only"):
        gpu.session(compiled("w4a16-g128"), target="x")


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
    assert report["decode"][0]["finegrain W4A16 gpu tok/s"] > 0
    assert "| W4A8 DGQ |" in (tmp_path / "gpu.md").read_text()


def test_host_fallback_runs_the_reference_ops(compiled, tiny_inputs):
    """On CUDA the finegrain ops without a kernel (here: MXFP4 activations' fake quantization) run on
    CPU copies through ``lower.on_host``; the rewrite itself is checked on CPU tensors."""
    from finegrain.backends.gpu import lower

    cm = compiled("mxfp4")
    gm, _ = lower.prepare(cm.gm, torch.device("cpu"))
    lower._to_host_fallbacks(gm.graph)
    gm.recompile()
    hosted = [n for n in gm.graph.nodes if n.target is lower.on_host]
    assert hosted and all(str(n.args[0]).startswith("finegrain.") for n in hosted)
    test = tiny_inputs[2]
    ref = cm.session("torch").run(test)
    with torch.inference_mode():
        out = gm(test)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
