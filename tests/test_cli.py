"""The command line on a local Hugging Face directory (a tiny Llama with SmolLM2's real tokenizer)."""
import json
import re

import pytest

from finegrain.cli import main
from tests.backends.targets import BUILD


def test_quantize_eval_inspect(hf_dir, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w4a16-g64", "--out", str(out),
                 "--calibration-samples", "2", "--calibration-seq-len", "64"]) == 0
    assert (out / "manifest.json").is_file() and (out / "tokenizer").is_dir()
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w4a16-g64", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    res = tmp_path / "r.json"
    assert main(["eval", "--model", str(out), "--seq-len", "64", "--max-windows", "2", "--compare-fp",
                 "--json", str(res)]) == 0
    rows = json.loads(res.read_text())["results"]
    from finegrain.formats import QuantFormat

    fmt = QuantFormat(bits=4, granularity="group", group_size=64, symmetric=False)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)] * 2  # down_proj: ragged K=96
    expected = sum(fmt.storage_bits(s) for s in shapes) / sum(a * b for a, b in shapes)
    assert len(rows) == 2 and rows[0]["windows"] == 2 and rows[1]["bits_per_weight"] == pytest.approx(expected)
    assert rows[0]["ppl"] != rows[1]["ppl"]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "int4-g64-asym-fp16" in text and "checksums OK" in text


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["quantize", "--model", str(tmp_path), "--recipe", "w8a8", "--out", str(tmp_path / "o")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["quantize", "--model", str(tmp_path), "--recipe", "w8a8", "--out", str(tmp_path / "o")]) == 2
    assert "no weights" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert not (tmp_path / "o").exists()


def test_presets_listed(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "w4a16-g128" in out and "w8a8-static" in out
    assert "kivi4" in out and "key_axis=tokens" in out


def test_quantize_with_a_kv_cache_preset(hf_dir, tmp_path, capsys):
    """--kv-quant adds a KV preset's fields to the recipe (and the cache to the graph); a preset whose
    groups do not fit the model's head dim is refused by name, with nothing left behind."""
    out = tmp_path / "kv8"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w4a16-g64", "--kv-quant", "kv8", "--out", str(out),
                 "--calibration-samples", "2", "--calibration-seq-len", "32"]) == 0
    kv = json.loads((out / "manifest.json").read_text())["kv"]
    assert kv["quantization"]["key"] == kv["quantization"]["value"] == "int8-token-asym-fp16-dyn"
    said = " ".join(capsys.readouterr().out.split())  # the terminal wraps long lines
    q = kv["quantization"]
    assert (f"KV cache: keys int8-token-asym-fp16-dyn, values int8-token-asym-fp16-dyn, "
            f"{q['bytes_per_token_at_context']:.0f} bytes per token at a 2048-token context "
            f"(fp32: {q['fp32_bytes_per_token']})") in said, said
    assert "quantize_kv: 4 quantized" in said  # one record for all 4 presents, counted as 4
    assert main(["generate", str(out), "--prompt", "Paris is", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    bad = tmp_path / "kivi4"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w4a16-g64", "--kv-quant", "kivi4", "--out", str(bad),
                 "--calibration-samples", "2", "--calibration-seq-len", "32"]) == 2
    assert "groups of 32 do not divide the head dim 16" in capsys.readouterr().err and not bad.exists()


def test_the_kv_line_names_zipcaches_two_formats():
    from finegrain.cli import _kv_formats

    assert _kv_formats({"key": "int8-token-asym-fp16-dyn", "value": None, "layers": []}) == (
        "keys int8-token-asym-fp16-dyn, values float")
    assert _kv_formats({"key": "int4-g32-asym-fp16-dyn", "value": "int4-g32-asym-fp16-dyn", "layers": [],
                        "zip": {"key": "int2-g32-asym-fp16-dyn", "value": "int2-g32-asym-fp16-dyn", "ratio": 0.5}}) == (
        "keys int4-g32-asym-fp16-dyn / int2-g32-asym-fp16-dyn, values int4-g32-asym-fp16-dyn / int2-g32-asym-fp16-dyn "
        "(ZipCache: the 50% most salient tokens in the first format)")
    # a manifest's field that is not a number (a hand-edited or hostile artifact) is said, not formatted
    assert "the 'x' most salient" in _kv_formats({"key": "a", "value": "b", "zip": {"key": "c", "ratio": "x"}})


def test_with_kv_refuses_a_recipe_that_sets_kv_fields():
    from finegrain.compiler.recipe import with_kv
    from finegrain.errors import RecipeError

    assert with_kv("w4a16-g128", "kivi2").kv_key == "int2-g16-asym-fp16-dyn"
    with pytest.raises(RecipeError, match="already sets kv_window"):
        with_kv({"name": "r", "rules": [], "kv_window": 64}, "kivi4")
    with pytest.raises(RecipeError, match="unknown KV cache preset 'kv3'"):
        with_kv("w4a16-g128", "kv3")


def test_inspect_reports_folds(hf_dir, tmp_path, capsys):
    out = tmp_path / "rot"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w4a8-rot", "--out", str(out),
                 "--calibration-samples", "2", "--calibration-seq-len", "32"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fold_norms" in text and "fold_rotation" in text and "randomized Hadamard" in text
    assert "online Hadamard" in text  # o_proj / down_proj inputs


def test_quantize_with_a_budget_and_pareto(hf_dir, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w4a16-g64", "--out", str(out), "--budget", "3.4bpw",
                 "--candidates", "int2-g64-asym-fp16", "int3-g64-asym-fp16", "int4-g64-asym-fp16", "int8-channel-sym-fp16",
                 "--calibration-samples", "2", "--calibration-seq-len", "64"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["allocation"]["chosen"]["bits_per_weight"] <= 3.4 and m["recipe"]["budget_bits"] == 3.4
    assert "bit allocation" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    assert "bit allocation: fisher sensitivity" in capsys.readouterr().out  # auto: a causal LM
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w4a16-g64", "--out", str(tmp_path / "c"),
                 "--budget", "80MB"]) == 2
    assert "--budget-bytes" in capsys.readouterr().err
    pa = tmp_path / "p"
    assert main(["pareto", "--model", str(hf_dir), "--out", str(pa), "--points", "2", "--validate", "3",
                 "--seq-len", "64", "--max-windows", "2", "--calibration-samples", "4", "--calibration-seq-len", "64"]) == 0
    res = json.loads((pa / "pareto.json").read_text())
    assert len(res["points"]) == 2 and res["points"][0]["bits_per_weight"] < res["points"][1]["bits_per_weight"]
    assert all((pa / f"{p['bits_per_weight']:.3f}bpw" / "manifest.json").is_file() for p in res["points"])
    assert (pa / "pareto.md").is_file() and len(res["allocation"]["validation"]["pairs"]) == 3


def test_export_hf_and_gguf_with_their_clients(hf_dir, tmp_path, capsys):
    """export --hf / --gguf on an artifact, with --check in the real client; the HF export carries the
    tokenizer, a refusal exits 2 naming the layer and leaves nothing."""
    art = tmp_path / "art"
    recipe = tmp_path / "q4_0.json"
    recipe.write_text(json.dumps({"name": "q4_0", "rules": [{"role": "linear", "weight": "int4-g32-sym-fp16"}]}))
    assert main(["quantize", "--model", str(hf_dir), "--recipe", str(recipe), "--out", str(art),
                 "--calibration-samples", "0"]) == 0
    capsys.readouterr()
    pytest.importorskip("compressed_tensors")
    assert main(["export", str(art), "--hf", str(tmp_path / "hf"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "pack-quantized int4-g32-sym-fp16" in out and "transformers + compressed-tensors vs the torch reference" in out
    assert "max |diff| 0 " in out
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert main(["export", str(art), "--gguf", str(tmp_path / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert "Q4_0" in out and "byte-level BPE" in out
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert main(["export", str(art), "--gguf", str(tmp_path / "m.gguf"), "--overwrite", "--check"]) == 2
        assert "llama-cpp-python, which is not installed" in capsys.readouterr().err
    else:
        assert main(["export", str(art), "--gguf", str(tmp_path / "m.gguf"), "--overwrite", "--check"]) == 0
        assert "llama.cpp vs the torch reference" in capsys.readouterr().out
    w3 = tmp_path / "w3"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w3a16-g128", "--out", str(w3),
                 "--calibration-samples", "0"]) == 0
    capsys.readouterr()
    assert main(["export", str(w3), "--gguf", str(tmp_path / "w3.gguf")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"\n  model\.layers\.0\.self_attn\.q_proj, [^\n]* and \d+ more: weight format int3-g128-asym-fp16", err)
    assert not (tmp_path / "w3.gguf").exists()


@pytest.mark.onnx
def test_kv_cache_quantize_generate_and_genai_export(hf_dir, tmp_path, capsys):
    art = tmp_path / "kv"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w4a16-g64", "--out", str(art), "--kv-cache",
                 "--calibration-samples", "0"]) == 0
    capsys.readouterr()
    for backend in ("torch", "onnx"):
        assert main(["generate", str(art), "--prompt", "Hello there", "--max-new-tokens", "4",
                     "--backend", backend]) == 0
        out = capsys.readouterr().out
        assert "KV cache: one token per step" in out, out
    kv4 = tmp_path / "kv4.json"  # a quantized cache: packed by default on the reference, the same tokens in fp32
    kv4.write_text(json.dumps({"name": "kv4", "rules": [], "kv_key": "int4-g16-asym-fp16-dyn",
                               "kv_value": "int4-g16-asym-fp16-dyn"}))
    assert main(["quantize", "--model", str(hf_dir), "--recipe", str(kv4), "--out", str(tmp_path / "q"), "--kv-cache",
                 "--calibration-samples", "0"]) == 0
    capsys.readouterr()
    texts = {}
    for storage in ("packed", "float"):
        assert main(["generate", str(tmp_path / "q"), "--prompt", "Hello there", "--max-new-tokens", "6",
                     "--kv-storage", storage]) == 0
        texts[storage] = " ".join(capsys.readouterr().out.split())  # the terminal wraps long lines
    assert "4 of 4 presents stored bit-packed" in texts["packed"] and "bit-packed" not in texts["float"]
    assert texts["packed"].split("[torch]")[0] == texts["float"].split("[torch]")[0]  # the same generated text
    assert main(["export", str(tmp_path / "q"), "--onnx", str(tmp_path / "q.onnx")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert ("KV cache: keys int4-g16-asym-fp16-dyn, values int4-g16-asym-fp16-dyn quantized on write by ONNX ops "
            "into an fp32 cache holding the format's values") in said, said
    pytest.importorskip("onnxruntime_genai")
    assert main(["export", str(art), "--genai", str(tmp_path / "genai"), "--style", "matmulnbits", "--check"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime-genai generated 16 tokens greedily" in out and "the first 16 equal" in out
    assert (tmp_path / "genai" / "genai_config.json").is_file() and (tmp_path / "genai" / "tokenizer.json").is_file()


def test_eval_through_the_kv_cache(hf_dir, tmp_path, capsys):
    """``eval --through-cache N``: each window prefilled in chunks of N through the artifact's cache.
    Over a float cache it is the full forward's perplexity; over a KIVI cache (per-channel key groups,
    a float window) it differs, as the cache path's quantization does; refusals name the problem."""
    def ppl(art, *extra, backend="torch"):
        out = tmp_path / f"{art.name}{len(extra)}{backend}.json"
        assert main(["eval", "--model", str(art), "--seq-len", "64", "--max-windows", "2", "--backend", backend,
                     "--json", str(out), *extra]) == 0
        return json.loads(out.read_text())["results"][0]

    arts = {}
    for name, recipe in (("f", {"name": "f", "rules": [{"role": "linear", "weight": "int8-channel-sym-fp16"}]}),
                         ("kivi", {"name": "kivi", "rules": [], "kv_key": "int2-g8-asym-fp16-dyn",
                                   "kv_value": "int2-g8-asym-fp16-dyn", "kv_key_axis": "tokens", "kv_window": 4})):
        (tmp_path / f"{name}.json").write_text(json.dumps(recipe))
        arts[name] = tmp_path / name
        assert main(["quantize", "--model", str(hf_dir), "--recipe", str(tmp_path / f"{name}.json"), "--out",
                     str(arts[name]), "--kv-cache", "--calibration-samples", "0"]) == 0
    capsys.readouterr()
    full, chunked = ppl(arts["f"]), ppl(arts["f"], "--through-cache", "16")
    assert chunked["model"].endswith("through the KV cache in chunks of 16)") and full["model"].endswith("(f, torch)")
    same = abs(chunked["ppl"] / full["ppl"] - 1)
    assert same < 1e-5 and chunked["tokens"] == full["tokens"], same
    full, chunked = ppl(arts["kivi"]), ppl(arts["kivi"], "--through-cache", "16")
    moved = abs(chunked["ppl"] / full["ppl"] - 1)  # the tokens each chunk reads were quantized as written
    assert moved > max(1e-4, 30 * same), (moved, same)  # (a random-init model: its ppl moves little)
    assert ppl(arts["kivi"], "--through-cache", "16", backend="onnx")["ppl"] == pytest.approx(chunked["ppl"], rel=1e-3)
    plain = tmp_path / "plain"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w8a16", "--out", str(plain),
                 "--calibration-samples", "0"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(plain), "--through-cache", "16"]) == 2
    assert "has no KV cache in its graph (quantize it with --kv-cache)" in capsys.readouterr().err
    assert main(["eval", "--model", str(hf_dir), "--through-cache", "16"]) == 2
    assert "is a float model" in capsys.readouterr().err


@pytest.mark.onnx
def test_eval_onnx_reuses_its_export(hf_dir, tmp_path, capsys):
    art, f = tmp_path / "art", tmp_path / "m.onnx"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w4a16-g64", "--out", str(art),
                 "--calibration-samples", "0"]) == 0
    ev = ["eval", "--model", str(art), "--seq-len", "64", "--max-windows", "1", "--backend", "onnx",
          "--style", "matmulnbits", "--onnx-file", str(f), "--json"]
    assert main(ev + [str(tmp_path / "a.json")]) == 0
    assert f"exported {f}" in capsys.readouterr().out and f.is_file()
    mtime = f.stat().st_mtime_ns
    assert main(ev + [str(tmp_path / "b.json")]) == 0
    assert f"reusing {f}" in capsys.readouterr().out and f.stat().st_mtime_ns == mtime
    a, b = (json.loads((tmp_path / n).read_text())["results"][0]["ppl"] for n in ("a.json", "b.json"))
    assert a == b
    assert main(ev[:-5] + ["--style", "qdq", "--onnx-file", str(f)]) == 2  # exported as MatMulNBits
    assert "style 'matmulnbits' (wanted 'qdq')" in capsys.readouterr().err
    assert main(["eval", "--model", str(art), "--onnx-file", str(f)]) == 2  # torch backend
    assert "--onnx-file: for an artifact evaluated with --backend onnx" in capsys.readouterr().err


ZNVER3 = BUILD  # AVX2 at LLVM opt-level 1: runs on every CPU these tests meet


@pytest.mark.onnx
@pytest.mark.tvm
def test_an_image_onnx_model_end_to_end(tmp_path, capsys):
    """A float ONNX CNN (exported here by torch.onnx, BatchNorm folded by it) through the CLI: images
    of any width declared with --input, calibration / evaluation tensors from safetensors files,
    the ONNX export checked in onnxruntime, a TVM deployment built and evaluated."""
    import torch
    from safetensors.torch import save_file

    from tests.passes.test_conv import _random_net

    net = _random_net()
    onnx_path = tmp_path / "cnn.onnx"
    torch.onnx.export(net, (torch.randn(1, 1, 12, 20),), str(onnx_path), dynamo=True, input_names=["image"],
                      dynamic_shapes=({3: torch.export.Dim("width", min=4, max=512)},))
    gen = torch.Generator().manual_seed(0)
    save_file({"image": torch.randn(8, 1, 12, 24, generator=gen)}, str(tmp_path / "calib.safetensors"))
    save_file({"image.0": torch.randn(1, 1, 12, 16, generator=gen), "image.1": torch.randn(1, 1, 12, 40, generator=gen)},
              str(tmp_path / "eval.safetensors"))
    art = tmp_path / "art"
    assert main(["quantize", "--model", str(onnx_path), "--recipe", "w8a8-conv", "--out", str(art), "--input",
                 "image:3=width", "--calib-tensors", str(tmp_path / "calib.safetensors")]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    spec = manifest["inputs"][0]
    assert spec["name"] == "image" and spec["dynamic_dims"] == [3] and spec["dims"][0]["label"] == "width"
    assert len(manifest["quantized"]) == 4 and manifest["source"]["calibration_tensors"]["sha256"]
    capsys.readouterr()
    res = tmp_path / "r.json"
    for backend in ("torch", "onnx"):
        assert main(["eval", "--model", str(art), "--eval-tensors", str(tmp_path / "eval.safetensors"),
                     "--backend", backend, "--json", str(res)]) == 0
        r = json.loads(res.read_text())["tensors"]
        assert r["batches"] == 2 and 0 < r["rel_error"] < 0.05 and r["cosine_mean"] > 0.999
    assert main(["export", str(art), "--onnx", str(tmp_path / "q.onnx"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "DequantizeLinear(int8, axis 0) -> Conv" in out and "onnxruntime vs the torch reference on random inputs" in out
    # TVM: one `main` over the declared width; the deployment evaluates itself against the float source
    assert main(["build", str(art), "--out", str(tmp_path / "tvm"), "--target", json.dumps(ZNVER3)]) == 0
    assert "conv (weight dequantized per call, fp32 conv)" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "tvm"), "--allow-native", "--eval-tensors",
                 str(tmp_path / "eval.safetensors"), "--json", str(res)]) == 0
    r = json.loads(res.read_text())["tensors"]
    assert r["backend"] == "tvm" and 0 < r["rel_error"] < 0.05 and r["cosine_mean"] > 0.999
    # a token-id model's calibration does not come from tensors, and a tensor model needs them
    assert main(["quantize", "--model", str(onnx_path), "--recipe", "w8a8-conv", "--out", str(tmp_path / "o")]) == 2
    assert "takes tensors (image), not text: give calibration / example inputs with --calib-tensors" in \
        capsys.readouterr().err


def test_pareto_kv_lists_kv_bits_per_layer(hf_dir, tmp_path, capsys):
    pa = tmp_path / "kv"
    assert main(["pareto", "--kv", "--model", str(hf_dir), "--out", str(pa), "--budgets", "2.5", "4", "--kv-samples", "1",
                 "--seq-len", "64", "--max-windows", "1", "--kv-chunk", "16", "--calibration-samples", "0"]) == 0
    res = json.loads((pa / "pareto.json").read_text())
    low, high = res["points"]
    assert low["average_bits"] <= 2.5 and high["average_bits"] == 4 and len(res["search"]["errors"][0]) == 16
    assert {int(k[3]) for k, _ in res["search"]["pairs"]} == {2, 3, 4, 8}  # the default widths, 3 bits included
    assert low["bytes_per_token"] < high["bytes_per_token"] < low["fp32_bytes_per_token"]
    for p in res["points"]:
        m = json.loads((tmp_path / "kv" / f"kv{p['budget_bits']:g}bits" / "manifest.json").read_text())
        assert [[e[0], int(e[1][3]), int(e[2][3])] for e in m["recipe"]["kv_layers"]] == p["kv_bits"]
        assert m["recipe"]["kv_rotate"] and m["kv"]["quantization"]["rotate"]  # searched and built rotated
        folds = [f["action"] for f in m["folds"] if f["pass"] == "fold_kv_rotation"]
        assert folds == ["folded"] * len(p["kv_bits"])  # the values' rotation in v_proj / o_proj
        assert sum(k + v for _, k, v in p["kv_bits"]) == pytest.approx(p["average_bits"] * 2 * len(p["kv_bits"]))
    md = (pa / "pareto.md").read_text()
    assert "K / V bits per layer" in md and " ".join(f"K{k}V{v}" for _, k, v in low["kv_bits"]) in md
    assert main(["pareto", "--kv", "--model", str(hf_dir), "--out", str(tmp_path / "x"), "--points", "3"]) == 2
    assert "--budgets" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main(["pareto", "--kv", "--model", str(hf_dir), "--out", str(tmp_path / "y"), "--kv-bits", "2,9"])
    assert e.value.code == 2
    assert "bit widths must be integers in 2..8, got '2,9'" in capsys.readouterr().err


def test_pareto_kv_joint_context_one_byte_budget(hf_dir, tmp_path, capsys):
    """``pareto --kv --joint-context``: weight formats and KV bits under one total budget; each artifact's
    stored bytes plus its cache at the context fit the budget, and its manifest holds both choices."""
    import re

    pa = tmp_path / "joint"
    args = ["pareto", "--kv", "--joint-context", "4096", "--model", str(hf_dir), "--kv-samples", "1",
            "--kv-bits", "2,4,8",
            "--candidates", "int4-g16-asym-fp16", "int8-channel-sym-fp16", "--seq-len", "64", "--max-windows", "1",
            "--kv-chunk", "16", "--calibration-samples", "2", "--calibration-seq-len", "32"]
    assert main([*args, "--out", str(tmp_path / "probe"), "--budgets", "1"]) == 2  # below the cheapest: named
    cheapest = int(re.search(r"cheapest weights \+ KV cache \((\d+) bytes at 4096 tokens", capsys.readouterr().err)[1])
    assert main([*args, "--out", str(pa), "--budgets", "1GB", str(cheapest)]) == 0
    res = json.loads((pa / "pareto.json").read_text())
    top, mid = res["points"]  # room for everything: int8 weights, each layer's least-loss (K, V) pair
    assert set(top["weight_formats"]) == {"int8-channel-sym-fp16"} and res["range_bytes"] == [cheapest, top["total_bytes"]]
    pairs, errors = res["search"]["pairs"], res["search"]["errors"]
    assert len(pairs) == 9 and {int(k[3]) for k, _ in pairs} == {2, 4, 8}  # --kv-bits
    best = [pairs[min(range(len(row)), key=row.__getitem__)] for row in errors]
    assert [[i, int(k[3]), int(v[3])] for i, (k, v) in enumerate(best)] == top["kv_bits"]
    for p in (top, mid):
        m = json.loads((pa / f"joint{p['budget_bytes'] / 1e6:g}MB" / "manifest.json").read_text())
        assert m["allocation"]["joint"]["total_bytes"] == p["total_bytes"] <= p["budget_bytes"]
        assert [[e[0], int(e[1][3]), int(e[2][3])] for e in m["recipe"]["kv_layers"]] == p["kv_bits"]
        assert m["recipe"]["kv_rotate"] and m["kv"]["quantization"]["rotate"]  # searched and built rotated
        folds = [f["action"] for f in m["folds"] if f["pass"] == "fold_kv_rotation"]
        assert folds == ["folded"] * len(p["kv_bits"])  # the values' rotation in v_proj / o_proj
    # the probe states the cheapest total at the solver's byte resolution (rounded up), so the point bought with
    # exactly that budget may cost a little less, never more
    assert cheapest * 0.999 <= mid["total_bytes"] <= cheapest < top["total_bytes"]
    assert mid["predicted_weights"] + mid["predicted_kv"] >= top["predicted_weights"] + top["predicted_kv"]
    assert "K / V bits per layer" in (pa / "pareto.md").read_text()
