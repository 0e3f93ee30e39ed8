"""The README's main job, ``finegrain demo``, on the bundled SmolLM2 (slow tier; its own file so that
pytest-xdist's ``--dist loadfile`` runs it beside the other real-model tests, not after them)."""
import pytest

pytestmark = pytest.mark.slow


def test_demo_command(tmp_path, capsys):
    from finegrain.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--seq-len", "256", "--max-windows", "1", "--calibration-samples", "2",
                 "--calibration-seq-len", "128", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "calibration text: brown in the chat template" in text  # an instruct model: --calib-chat by default
    assert "fp32" in text and "w4a16-g128-rot-gptq" in text and (out / "manifest.json").is_file()
    # the demo ends with both models answering a chat prompt, with tokens/s and the size ratio
    assert "What is the capital of France?" in text and "fp32 (transformers, KV cache)" in text
    assert "tokens/s" in text and "of fp32" in text
    # the quantized model is evaluated and chats through the fastest backend here (TVM when installed)
    import importlib.util

    backend = "tvm" if importlib.util.find_spec("tvm") else "torch"
    assert f"w4a16-g128-rot-gptq ({backend})" in text and f"finegrain, {backend} backend, KV cache" in text
