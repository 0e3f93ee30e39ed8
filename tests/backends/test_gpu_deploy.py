"""GPU deployments (``cm.build_gpu`` / ``finegrain build --backend gpu``): the artifact plus its kernel
weights in the Triton layout; loading one runs the same kernels on the same bytes as a session on the
artifact, and everything it reads is checked (hashes, the artifact it belongs to, every kernel field and
tensor against the layer's format)."""
import json

import pytest
import torch

pytest.importorskip("triton")
import finegrain  # noqa: E402
from finegrain.errors import ArtifactError  # noqa: E402
from tests.backends._interpret import overflow_checks_off  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _no_overflow_checks():
    """The interpreter's int32 overflow checks off here; the kernels have them on in test_gpu_kernels.py."""
    with overflow_checks_off():
        yield


@pytest.fixture(scope="module")
def kv_model(tiny_llama, tiny_inputs):
    example, calib, _ = tiny_inputs
    return finegrain.compile(tiny_llama, example, recipe="w4a8-dgq", calibration=calib, progress=False,
                             kv_cache=True)


def _rewrite(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("preset", ["w4a16-g128", "nvfp4"])
def test_a_deployment_runs_the_sessions_kernels_on_the_same_bytes(compiled, tiny_inputs, tmp_path, preset):
    cm = compiled(preset)
    m = cm.build_gpu(tmp_path / "dep")
    assert set(m["files"]) == {"kernels.safetensors"} and len(m["layers"]) == 14  # 2 layers x 7 linears
    names = {p.name for p in (tmp_path / "dep").rglob("*") if p.is_file()}
    assert not any(n.endswith((".pt", ".pkl", ".bin", ".so")) for n in names)  # data only
    dep = finegrain.load(tmp_path / "dep")
    assert dep.backend == "gpu" and dep.session() is dep
    test = tiny_inputs[2]
    with cm.session("gpu") as s:
        assert torch.equal(dep.run(test), s.run(test))
        assert dep.kernels == s.kernels
    assert torch.equal(dep.session("torch").run(test), cm.session("torch").run(test))


def test_kv_deployment_generates_and_keeps_its_dtype(kv_model, tiny_inputs, tmp_path):
    test = tiny_inputs[2]
    kv_model.build_gpu(tmp_path / "dep", dtype="bfloat16")
    dep = finegrain.load(tmp_path / "dep")
    assert dep.dtype == torch.bfloat16 and {v["kind"] for v in dep.kernels.values()} == {"int8-dot"}
    with kv_model.session("gpu", dtype="bfloat16") as s:
        assert dep.generate(test[:, :8], 5).tokens == s.generate(test[:, :8], 5).tokens
        la, _ = dep.prefill(test[:, :10])
        lb, _ = s.prefill(test[:, :10])
        assert torch.equal(la, lb)


def test_tampered_deployments_are_refused_by_name(kv_model, compiled, tmp_path):
    from safetensors.torch import load_file, save_file

    from finegrain.io.files import file_records

    good = tmp_path / "good"
    kv_model.build_gpu(good)
    layer = "model.layers.0.self_attn.q_proj.weight"

    def fresh(name):
        import shutil

        shutil.copytree(good, tmp_path / name)
        return tmp_path / name

    p = fresh("field")  # a kernel field that would make the kernel read past its buffer
    _rewrite(p, lambda m: m["layers"][layer].update(k=m["layers"][layer]["k"] * 4))
    with pytest.raises(ArtifactError, match=f"{layer}: field k is 256"):
        finegrain.load(p)
    p = fresh("shape")  # a tensor of the wrong shape, its hash updated
    t = load_file(str(p / "kernels.safetensors"))
    t[f"{layer}.qw"] = t[f"{layer}.qw"][:-1].contiguous()
    save_file(t, str(p / "kernels.safetensors"))
    _rewrite(p, lambda m: m.update(files=file_records(p, ["kernels.safetensors"])))
    with pytest.raises(ArtifactError, match=f"{layer}: tensor qw must be int32"):
        finegrain.load(p)
    p = fresh("bytes")  # flipped bytes: the hash
    raw = bytearray((p / "kernels.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (p / "kernels.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="corrupted"):
        finegrain.load(p)
    p = fresh("other")  # the kernels of another artifact
    import shutil

    shutil.rmtree(p / "artifact")
    compiled("w4a16-g128").save(p / "artifact")
    with pytest.raises(ArtifactError, match="built from another artifact"):
        finegrain.load(p)
    p = fresh("layers")
    _rewrite(p, lambda m: m["layers"].pop(layer))
    with pytest.raises(ArtifactError, match="kernel layers differ"):
        finegrain.load(p)
    assert finegrain.load(good).backend == "gpu"


def test_cli_builds_inspects_and_generates_from_a_deployment(hf_dir, tmp_path, capsys):
    from finegrain.cli import main

    art = tmp_path / "kv"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w4a16-g64", "--out", str(art), "--kv-cache",
                 "--calibration-samples", "0"]) == 0
    assert main(["build", str(art), "--backend", "gpu", "--out", str(tmp_path / "dep"), "--gpu-dtype",
                 "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "GPU deployment" in out and "int4-g64-asym-fp16 -> Triton kernel layout" in out
    assert main(["inspect", str(tmp_path / "dep")]) == 0
    assert "compute dtype bfloat16" in " ".join(capsys.readouterr().out.split())
    assert main(["generate", str(tmp_path / "dep"), "--prompt", "Hello there", "--max-new-tokens", "4"]) == 0
    plain = capsys.readouterr().out
    assert "KV cache: one token per step" in plain
    assert main(["generate", str(tmp_path / "dep"), "--prompt", "Hello there", "--max-new-tokens", "4",
                 "--cuda-graph"]) == 0  # the deployment's own session, its decode steps the fixed-shape graph
    graph = capsys.readouterr().out
    assert " ".join(graph.split()).split("[gpu]")[0] == " ".join(plain.split()).split("[gpu]")[0]
    assert main(["generate", str(art), "--prompt", "Hi", "--cuda-graph"]) == 2  # torch: not a gpu option
    assert "--cuda-graph is a --backend gpu option" in capsys.readouterr().err
    assert main(["build", str(art), "--backend", "gpu", "--out", str(tmp_path / "dep")]) == 2  # exists: refused
    assert "exists" in capsys.readouterr().err


def test_a_qwen3_deployment_in_bf16(tmp_path):
    """Another family (Qwen3: q / k norms, its own RoPE) through build, load and the bf16 mode: the
    deployment's logits are the session's, byte for byte."""
    from tests.test_kv_cache import _family

    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    cm = finegrain.compile(_family("qwen3"), (x[:, :8],), recipe="w4a8-dgq", calibration=[(x,)], progress=False,
                           kv_cache=True)
    cm.build_gpu(tmp_path / "q3", dtype="bfloat16")
    dep = finegrain.load(tmp_path / "q3")
    with cm.session("gpu", dtype="bfloat16") as s:
        assert torch.equal(dep.run(x), s.run(x))
