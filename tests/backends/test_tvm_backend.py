"""The TVM backend end to end on a tiny Llama: Relax lowering with one call_tir per quantized
linear, prefill and decode against the torch reference, the deployment directory (load,
standalone runtime script, integrity checks, atomic writes), refusals, the CLI, and the
MetaSchedule database reused by a second build."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finegrain
from finegrain.errors import ArtifactError, InputError
from tests.backends.linears import LINEARS, cycled, weight_name
from tests.backends.targets import BUILD

pytest.importorskip("tvm")

from finegrain.backends.tvm.deploy import TvmDeployment  # noqa: E402
from finegrain.backends.tvm.lower import TvmError, import_relax  # noqa: E402

pytestmark = pytest.mark.tvm


ROOT = Path(__file__).resolve().parents[2]
TARGET = BUILD  # AVX2 at LLVM opt-level 1 (tests/backends/targets.py)


@pytest.fixture(scope="module")
def deployed(compiled, tmp_path_factory):
    cm = compiled("w4a16-g128")
    out = tmp_path_factory.mktemp("tvm") / "deploy"
    manifest = cm.build(out, target=TARGET, max_seq_len=64)
    return cm, out, manifest


def test_each_quantized_linear_is_one_call_to_a_lowbit_kernel(compiled):
    cm = compiled("w4a16-g128")
    mod, params, kernels = import_relax(cm.gm, cm.input_specs, 64, TARGET)
    assert len(kernels) == len(cm.quantized) == 14
    for fn, kind in (("prefill", "gemm"), ("decode", "gemv")):
        text = mod[fn].script()
        calls = text.count(f"int4_{kind}_")
        assert calls == 14, (fn, calls)
        assert "finegrain" not in text and "dequantize" not in text  # no whole-weight dequantize anywhere
    names = [n for n, _ in params]
    assert all(not n.endswith("_qpacked") for n in names) and sum(n.endswith("_tvm_w") for n in names) == 14


@pytest.mark.parametrize("seq", [1, 2, 7, 33])
def test_deployment_matches_the_torch_reference(deployed, seq):
    cm, out, _ = deployed
    dep = finegrain.load(out, allow_native=True)
    assert isinstance(dep, TvmDeployment)
    ids = torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(seq))
    ref = cm(ids)
    got = dep(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert dep.function_for(seq) == ("decode" if seq == 1 else "prefill")


def test_deployment_files_and_manifest(deployed):
    cm, out, m = deployed
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.so", "params.bin"]
    assert m["finegrain_tvm_deploy"] == 2 and m["target"] == TARGET and m["inputs"] == cm.input_specs
    assert m["functions"] == {"decode": {"seq_len": [1, 1]}, "prefill": {"seq_len": [2, 64]}}
    assert set(m["files"]) == {"model.so", "params.bin"} and len(m["kernels"]) == 14
    assert m["build"]["unscheduled"] == ["cumsum", "cumsum1"] or all("cumsum" in f for f in m["build"]["unscheduled"])
    # the packed codes are what ships (plus fp32 scales), not fp32 weights
    fp_bytes = sum(4 * torch.Size(q["shape"]).numel() for q in cm.quantized.values())
    other = cm.model_bytes() - sum(q["bits"] for q in cm.quantized.values()) / 8
    size = (out / "params.bin").stat().st_size
    assert other + fp_bytes / 8 < size < other + fp_bytes / 4


def test_inspect_a_deployment_reads_its_manifest_only(deployed, capsys):
    from finegrain.cli import main

    _, out, _ = deployed
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tvm deployment of recipe w4a16-g128" in text and "model.layers.0.mlp.down_proj.weight" in text
    assert "--allow-native" in text


def test_standalone_runtime_script(deployed):
    """A build without the cache: the script re-runs the sequence per token (prefill then prefill)."""
    cm, out, _ = deployed
    ids = [5, 17, 3, 99, 42]
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "run_tvm_deploy.py"), str(out), "--ids",
                          *map(str, ids), "--max-new-tokens", "3"], capture_output=True, text=True, timeout=300,
                         check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["cache"] is False and got["prompt_tokens"] == 5
    assert got["new_tokens"] == cm.generate(torch.tensor([ids]), 3).tokens


def test_bad_inputs_and_damaged_files(deployed, tmp_path):
    cm, out, _ = deployed
    dep = TvmDeployment(out)
    with pytest.raises(InputError, match="outside what was built"):
        dep(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(InputError, match="int64"):
        dep(torch.zeros(1, 4))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "params.bin").read_bytes())
    data[-5] ^= 0xFF
    (bad / "params.bin").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="params.bin is corrupted"):
        finegrain.load(bad, allow_native=True)
    with pytest.raises(InputError, match="exists"):
        cm.build(out, target=TARGET)  # no overwrite: the existing deployment is untouched
    assert TvmDeployment(out)(torch.ones(1, 3, dtype=torch.long)).shape == (1, 3, 256)


def _weight(kernels: dict, pattern: str) -> dict:
    """The manifest's kernel record of the linear a :data:`LINEARS` pattern names."""
    return kernels[weight_name(pattern)]


# presets (and NVFP4 weights alone) -> the kernel (kind, container bits) their linears lower to
CODE_WIDTHS = {"w8a16": ("int", 8), "w3a16-g128": ("int", 4), "nvfp4-weights": ("e2m1", 4), "fp8": ("e4m3", 8),
               "mxfp6": ("e2m3", 8), "fp8-block": ("e4m3", 8)}


def test_other_code_widths_build(compiled):
    """One build with six presets' formats over the 14 linears (the list cycled): 8-bit, 3-bit in
    a 4-bit container, NVFP4, FP8 E4M3 weights and activations, MXFP6, block-wise FP8. Each linear
    gets its format's kernel and the deployment matches the reference."""
    from finegrain.compiler.recipe import PRESETS

    rules = [{**({"role": "linear", "weight": "e2m1-g16-sym-e4m3"} if name == "nvfp4-weights" else
                 PRESETS[name].to_dict()["rules"][0]), "pattern": p} for p, name in cycled(list(CODE_WIDTHS))]
    cm = compiled({"name": "mixed-code-widths", "rules": rules})
    dep = cm.session("tvm", target=TARGET, max_seq_len=32)
    for seq in (1, 9):
        ids = torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(3))
        ref = cm(ids)
        assert (dep.run(ids) - ref).abs().max() <= 1e-4 * ref.abs().max()
    for p, name in cycled(list(CODE_WIDTHS)):
        k = _weight(dep.manifest["kernels"], p)
        assert (k["kind"], k["bits"]) == CODE_WIDTHS[name], (p, name)


# which kernel each recipe's linears get: W(<=4)A8 / A4 with symmetric activations run integer dots
ACT_KERNELS = {"w8a8": "int", "w8a8-static": "int", "w4a8-g128": "int8-dot", "w4a8-dgq": "int8-dot",  # per linear:
               "w4a4-rot": "int8-dot", "w4a8-hadamard": "int8-dot",  # one build, "a8-mixed" below
               "w4a4-g64-rot-gptq": "int"}  # activation groups: fake-quantized, the fp32-compute kernel
A8_MIXED = ["w8a8", "w8a8-static", "w4a8-g128", "w4a8-dgq"]  # rules only (DGQ's clip search for all of them)


@pytest.mark.parametrize("recipe", ["a8-mixed", "w4a4-rot", "w4a8-hadamard", "w4a4-g64-rot-gptq"])
def test_activation_quantization_and_online_hadamard(compiled, recipe):
    """Activation quantization per token, static per tensor, with integer-dot kernels (W8A8, W4A8,
    DGQ: the four presets' rules over the 14 linears, cycled, in one build), with the online
    Hadamard of the rotated presets, and in groups with GPTQ: within fp32 rounding of the reference
    (a flipped code at a rounding tie aside), each linear on its kernel."""
    from finegrain.compiler.recipe import PRESETS

    names = cycled(A8_MIXED if recipe == "a8-mixed" else [recipe])
    if recipe == "a8-mixed":
        cm = compiled({"name": recipe, "weight_algorithm": "clip", "rules": [
            {**PRESETS[n].to_dict()["rules"][0], "pattern": p} for p, n in names]})
    else:
        cm = compiled(recipe)
    dep = cm.session("tvm", target=TARGET, max_seq_len=32)
    kernels = dep.manifest["kernels"]
    assert len(kernels) == len(LINEARS)
    for p, n in names:
        assert _weight(kernels, p)["kind"] == ACT_KERNELS[n], (p, n)
    for seq in (1, 9):
        ids = torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(seq))
        ref = cm(ids)
        err = (dep.run(ids) - ref).abs().amax(-1)[0] / ref.abs().max()
        if "g64" in recipe:  # a flipped 4-bit code is a step of a group's range: at most one position moves
            assert (err > 1e-4).sum() <= 1 and err.max() <= 1e-2, (recipe, seq, err)
            continue
        # 1e-3: fp32 summation order may flip a rounding tie of an activation code (one step)
        assert err.max() <= 1e-3, (recipe, seq)


W8 = {"role": "linear", "weight": "int8-channel-sym-fp32"}
GROUP_AND_MINIFLOAT_ACTS = [
    "int4-g40-asym-fp16-dyn",  # groups along the row, a ragged last one (g40 over the tiny model's 64 / 96 features)
    "int8-g32-sym-e8m0-dyn", "int4-g40-sym-e4m3-dyn", "e2m1-g40-sym-e4m3-dyn",  # MXINT8, NVINT4 scales, NVFP4
    "int4-g64-sym-fp32-dyn-clip0.85",  # 5th: on a gate_proj and the last down_proj (96 features: two groups)
    "e2m3-g32-sym-e8m0-dyn", "e3m2-g32-sym-e8m0-dyn",  # MXFP6 elements
    "e4m3-token-sym-fp32-dyn", "e5m2-token-sym-fp32-dyn"]  # FP8 per token


def _mixed(acts: list, name: str) -> dict:
    """W8 weights everywhere, ``acts`` cycled over the linears (``None``: that linear's activations in float)."""
    return {"name": name, "rules": [W8] + [{**W8, "pattern": p, **({"activation": a} if a else {})}
                                           for p, a in cycled(acts)]}


def test_group_and_minifloat_activations(compiled):
    """Activations in groups (scales per group of the row; a ragged last group padded by repeating
    the row's last element, as the reference) and minifloat activations (each value over its scale
    rounded on the element's grid: saturating, half to even, subnormals, as the reference's ml_dtypes /
    torch casts) within 1e-4 of the reference. One build holds every format (each on one or two of
    the 14 linears, q / k / v each quantizing the shared input in its own format); for each format,
    the reference with that format's linears per token (for groups) or not quantized (per token)
    differs by far more than the build's error, so the check sees what each format computes."""
    acts = GROUP_AND_MINIFLOAT_ACTS
    cm = compiled(_mixed(acts, "w8-mixed-acts"))
    dep = cm.session("tvm", target=TARGET, max_seq_len=32)
    err = 0.0
    for seq in (1, 9):
        ids = torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(seq))
        ref = cm(ids)
        e = float((dep.run(ids) - ref).abs().max())
        assert e <= 1e-4 * ref.abs().max(), seq
        err = max(err, e)
    for i, act in enumerate(acts):  # on the 9 tokens: each format's own linears
        tok = re.sub(r"-g\d+-", "-token-", act)
        other = _mixed(acts[:i] + [tok if tok != act else None] + acts[i + 1:], f"w8-mixed-acts-{i}")
        assert (compiled(other)(ids) - ref).abs().max() > 100 * err, act


def test_w4a8_dgq_lowers_to_integer_dot_kernels(compiled):
    cm = compiled("w4a8-dgq")
    mod, params, kernels = import_relax(cm.gm, cm.input_specs, 64, TARGET)
    assert len(kernels) == 14 and {(k["kind"], k["epilogue"]) for k in kernels.values()} == {("int8-dot", "int")}
    assert {k["activation"] for k in kernels.values()} == {"int8-token-sym-fp32-dyn"}
    for fn, kind in (("prefill", "gemm"), ("decode", "gemv")):
        text = mod[fn].script()
        assert text.count(f"a8int_{kind}_") == 14, fn
        assert "fake_quant" not in text and "int4_" not in text  # no fp32-compute kernel, no fake quantization
        # one quantization per distinct activation (q/k/v and gate/up share theirs): 4 per layer, 2 layers
        assert text.count("act_codes") == 8, fn
    names = [n for n, _ in params]
    assert sum(n.endswith("_tvm_ga") for n in names) == 14
    # the integer group scales and their products with the zero points ship as int32
    assert all(t.dtype == torch.int32 for n, t in params if n.endswith(("_tvm_ga", "_tvm_gb")))
    # int8=False keeps them on the fp32-compute kernel (the comparison the benchmark makes)
    _, _, fp = import_relax(cm.gm, cm.input_specs, 64, TARGET, int8=False)
    assert {k["kind"] for k in fp.values()} == {"int"}
    # a target without AVX2 falls back to it too
    _, _, old = import_relax(cm.gm, cm.input_specs, 64, {"kind": "llvm", "mcpu": "x86-64"})
    assert {k["kind"] for k in old.values()} == {"int"}


def test_refusals_name_the_node_and_leave_nothing(compiled, tmp_path):
    cm = compiled({"name": "nf4-weights", "rules": [{"role": "linear", "weight": "nf4-g32-sym-fp16"}]})
    with pytest.raises(TvmError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight: weight format nf4-g32"):
        cm.build(tmp_path / "b", target=TARGET)
    assert not list(tmp_path.iterdir())
    with pytest.raises(InputError, match="only CPU"):
        cm.build(tmp_path / "c", target={"kind": "cuda"})


def test_cli_build_and_tuning_database_is_reused(compiled, tmp_path):
    from finegrain.cli import main

    cm = compiled("w4a16-g128")
    cm.save(tmp_path / "art")
    out = tmp_path / "dep"
    args = ["build", str(tmp_path / "art"), "--out", str(out), "--target", json.dumps(TARGET), "--max-seq-len", "32",
            "--tune-trials", "2"]
    assert main(args) == 0
    first = json.loads((out / "manifest.json").read_text())["build"]["tuning"]
    assert first["tasks"] > 0 and first["reused"] == 0 and first["records"] > 0
    assert (out / "tuning" / "database_tuning_record.json").is_file()
    assert main(args + ["--overwrite", "--kv-storage", "float"]) == 0  # (no KV cache here: the option is moot)
    second = json.loads((out / "manifest.json").read_text())["build"]["tuning"]
    assert second["reused"] == second["tasks"] == first["tasks"] and second["records"] == first["records"]
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = cm(ids)
    assert (finegrain.load(out, allow_native=True)(ids) - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert main(["build", str(out), "--out", str(tmp_path / "x")]) == 2  # a deployment is not an artifact


ISA_TARGETS = {"avx2": {"kind": "llvm", "mcpu": "znver3", "num-cores": 2},
               "avx512": {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}}


def _host_has(isa: str) -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"avx2": " avx2", "avx512": " avx512f"}[isa] in flags


@pytest.mark.parametrize("isa", sorted(ISA_TARGETS))
def test_any_output_width_builds_for_each_isa(tmp_path, isa):
    """An intermediate size of 688 (not a multiple of 32 output columns, the AVX-512 GEMM block)
    lowers, builds and matches on both vector widths: the kernels' columns are padded and the
    output cut. The deployment runs where the host has the ISA (CI may run on either)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finegrain.backends.tvm.kernels.lowbit import vector_lanes

    target = ISA_TARGETS[isa]
    assert vector_lanes(target) == (16 if isa == "avx512" else 8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=688, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    gen = torch.Generator().manual_seed(2)
    ex = (torch.randint(0, 256, (1, 16), generator=gen),)
    cm = finegrain.compile(model, ex, recipe="w4a16-g128", progress=False)
    out = tmp_path / "dep"
    m = cm.build(out, target=target, max_seq_len=32)
    assert m["target"] == target and m["kernels"]["model.layers.0.mlp.gate_proj.weight"]["shape"] == [688, 64]
    if not _host_has(isa):
        pytest.skip(f"built for {isa}; this host cannot run it")
    dep = TvmDeployment(out)
    for seq in (1, 9):
        ids = torch.randint(0, 256, (1, seq), generator=gen)
        ref = cm(ids)
        assert (dep(ids) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_negative_select_is_counted_from_the_end_on_static_and_run_time_dims():
    """TVM's frontend turns ``select(x, dim, i)`` into ``take``, which reads out of bounds for a negative
    ``i`` (garbage of ~1e38 here without the rewrite, Falcon's wrong logits): ``_wrap_negative_select``
    counts it from the end of a static dim and takes a slice over a dim of run-time size."""
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from finegrain.backends.tvm.lower import _wrap_negative_select

    class M(torch.nn.Module):
        def forward(self, x):
            return x[:, -1] * 2 + x[:, -2] + x[:, :, -1].sum(1, keepdim=True)

    seq = torch.export.Dim("s", min=2, max=64)
    ep = torch.export.export(M(), (torch.randn(2, 5, 3),), dynamic_shapes=({1: seq},)).run_decompositions()
    _wrap_negative_select(ep)
    ops = [(n.target, n.args[1:]) for n in ep.graph.nodes if n.op == "call_function"]
    assert (torch.ops.aten.select.int, (2, 2)) in ops  # the static dim: -1 + 3
    assert not any(t is torch.ops.aten.select.int and a[1] < 0 for t, a in ops)
    vm = relax.VirtualMachine(relax.build(from_exported_program(ep), target=tvm.target.Target(BUILD)), tvm.cpu())
    for t in (5, 9):
        x = torch.randn(2, t, 3)
        out = vm["main"](tvm.runtime.tensor(x.numpy()))
        out = out if hasattr(out, "numpy") else out[0]
        np.testing.assert_allclose(out.numpy(), M()(x).numpy(), rtol=1e-6, atol=1e-6)
