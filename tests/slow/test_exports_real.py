"""The exports on the real bundled SmolLM2, proven by their real clients (slow tier): llama.cpp
(``llama-cpp-python``, optional extra: skipped where absent) gives the reference perplexity of the
same artifact within 1% on 2 WikiText-2 windows and tokenizes like the artifact's tokenizer;
transformers + compressed-tensors gives the reference logits."""
import numpy as np
import pytest
import torch

from finegrain.eval.perplexity import perplexity
from finegrain.jobs import compile_loaded

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from finegrain.models import load_model

    return load_model("smollm2-135m")


def test_gguf_in_llama_cpp_matches_the_reference_perplexity(smollm2, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from finegrain.models.bundled import SMOLLM2_DIST, SMOLLM2_FILE, _locate

    cm = compile_loaded(smollm2, "w4a16-g64", samples=2, seq_len=128, progress=False)
    info = cm.export_gguf(tmp_path / "m.gguf", tokenizer_gguf=_locate(SMOLLM2_DIST, SMOLLM2_FILE))
    assert info["types"] == {"F32": 62, "Q4_1": 210}, info
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=512, logits_all=True, verbose=False,
                          n_threads=2)
    text = "The quick brown fox jumps over the lazy dog. Quantization keeps 4 bits per weight."
    assert llm.tokenize(text.encode(), add_bos=False) == smollm2.tokenizer(text).input_ids

    def llama_logits(window):
        llm.reset()
        llm.eval(window[0].tolist())
        return torch.tensor(np.array(llm.scores[: window.shape[1]]))[None]

    ref = perplexity(lambda w: cm(w), smollm2.tokenizer, 512, 2, progress=False)
    got = perplexity(llama_logits, smollm2.tokenizer, 512, 2, progress=False)
    assert abs(got.ppl / ref.ppl - 1) < 0.01, (ref.ppl, got.ppl)


def test_compressed_tensors_export_matches_the_reference(smollm2, tmp_path):
    pytest.importorskip("compressed_tensors")
    from finegrain.exports.hf import load_hf_export

    recipe = {"name": "w4a16-g64-sym", "rules": [{"role": "linear", "weight": "int4-g64-sym-fp16"}]}
    cm = compile_loaded(smollm2, recipe, samples=2, seq_len=128, progress=False)
    cm.export_hf(tmp_path / "hf")
    hf = load_hf_export(tmp_path / "hf")
    ids = smollm2.tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref, got = cm(ids), hf(ids).logits
    assert float((ref - got).abs().max() / ref.abs().max()) <= 1e-4
