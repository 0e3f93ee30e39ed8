"""The command line on a local Hugging Face directory (a tiny Llama with SmolLM2's real tokenizer)."""
import json

import pytest

from finegrain.cli import main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from finegrain.models.bundled import _smollm2_tokenizer
    from finegrain.models.tiny import tiny_llama

    tok = _smollm2_tokenizer()
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny_llama(seed=3, vocab=len(tok)).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


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
    assert "model.layers.0.self_attn.q_proj: weight format int3-g128-asym-fp16" in err
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
    pytest.importorskip("onnxruntime_genai")
    assert main(["export", str(art), "--genai", str(tmp_path / "genai"), "--style", "matmulnbits", "--check"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime-genai generated 16 tokens greedily" in out and "the first 16 equal" in out
    assert (tmp_path / "genai" / "genai_config.json").is_file() and (tmp_path / "genai" / "tokenizer.json").is_file()


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
