"""GGUF export (exports/gguf.py): the blocks decode (``gguf``'s reference dequantizer, the same
arithmetic as llama.cpp) to finegrain's weights, the file loads back through finegrain's own GGUF
importer with the reference logits, and llama.cpp itself (``llama-cpp-python``, optional extra
``llama``: skipped where it is not installed) runs it within 1% perplexity of the reference."""
import math
import re

import gguf
import numpy as np
import pytest
import torch

import finegrain
from finegrain.errors import ExportError
from finegrain.exports.graph import read_graph
from finegrain.models.gguf_llama import _unpermute_qk, load_gguf_llama

Q40 = {"name": "q4_0", "rules": [{"role": "linear", "weight": "int4-g32-sym-fp16"}]}


@pytest.fixture(scope="module")
def llama128(tiny128):
    get, inputs, model = tiny128
    return get, inputs(48)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()


@pytest.mark.parametrize("recipe, kind", [("w8a16", "Q8_0"), (Q40, "Q4_0"), ("w4a16-g128", "Q4_1"),
                                          ("w4a16-g64", "Q4_1")], ids=["q8_0", "q4_0", "q4_1-g128", "q4_1-g64"])
def test_blocks_decode_to_finegrains_weights(llama128, recipe, kind, tmp_path):
    get, x = llama128
    cm = get(recipe)
    info = cm.export_gguf(tmp_path / "m.gguf")
    assert info["types"] == {"F32": 6, kind: 14}, info
    linears = read_graph(cm.gm).linears
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    heads = {"attn_q.weight": 4, "attn_k.weight": 2}
    checked = 0
    for t in reader.tensors:
        if t.tensor_type.name != kind:
            continue
        blk, layer, rest = t.name.split(".", 2)
        hf = {"attn_q.weight": "self_attn.q_proj", "attn_k.weight": "self_attn.k_proj", "attn_v.weight": "self_attn.v_proj",
              "attn_output.weight": "self_attn.o_proj", "ffn_gate.weight": "mlp.gate_proj",
              "ffn_up.weight": "mlp.up_proj", "ffn_down.weight": "mlp.down_proj"}[rest]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if rest in heads:
            w = _unpermute_qk(w, heads[rest])
        lin = linears[f"model.layers.{layer}.{hf}.weight"]
        ref = lin.fmt.dequantize(lin.q, torch.float32)
        if kind == "Q4_1":  # the block min is fp16: -zero * d rounded
            assert (torch.from_numpy(w) - ref).abs().max() <= info["max_q4_1_min_error"] + 1e-7
            assert info["max_q4_1_min_error"] <= 1e-3 * ref.abs().max()
        else:
            assert torch.equal(torch.from_numpy(w), ref), t.name
        checked += 1
    assert checked == 14
    # finegrain's own GGUF importer reads it back into a Llama with the reference logits
    back = load_gguf_llama(tmp_path / "m.gguf")
    with torch.no_grad():
        err = _rel(cm(x), back(x).logits)
    assert err <= (1e-5 if kind != "Q4_1" else 5e-3), err


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="mean")
    return math.exp(float(nll))


@pytest.mark.parametrize("recipe", ["w8a16", Q40, "w4a16-g128"], ids=["q8_0", "q4_0", "q4_1"])
def test_llama_cpp_runs_the_export(llama128, recipe, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    get, _ = llama128
    cm = get(recipe)
    cm.export_gguf(tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, logits_all=True, verbose=False,
                          n_threads=2)
    gen = torch.Generator().manual_seed(7)
    ours, theirs = [], []
    for _ in range(2):  # two windows
        ids = torch.randint(0, 256, (64,), generator=gen)
        llm.reset()
        llm.eval(ids.tolist())
        got = torch.tensor(np.array(llm.scores[:64]))
        with torch.no_grad():
            ref = cm(ids[None])[0]
        assert _rel(ref, got) < 0.02  # llama.cpp quantizes activations to Q8 blocks in its CPU dot products
        ours.append(_ppl(ref, ids))
        theirs.append(_ppl(got, ids))
    assert abs(sum(theirs) / sum(ours) - 1) < 0.01, (ours, theirs)


@pytest.mark.parametrize("recipe, needle", [
    ("w3a16-g128", "int3-g128-asym-fp16: GGUF blocks hold INT8 symmetric"),
    ("fp8", "e4m3-channel-sym-fp32"),
    ("w4a8-rot", "online Hadamard"),
    ("w8a8-os+", r"smooth_shift[^\n]*: a tensor in the compiled graph \(a fold added it\)"),  # one line per reason
])
def test_refusals_name_what_and_write_nothing(llama128, recipe, needle, tmp_path):
    get, _ = llama128
    with pytest.raises(ExportError) as e:
        get(recipe).export_gguf(tmp_path / "m.gguf")
    assert re.search(needle, str(e.value)), str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_architecture_outside_the_table_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=128, n_positions=64)).eval()
    cm = finegrain.compile(model, (torch.randint(0, 128, (1, 8)),), recipe="w8a16", progress=False)
    with pytest.raises(ExportError, match="GPT2LMHeadModel.*not one the export writes"):
        cm.export_gguf(tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_existing_file_is_kept_without_overwrite(llama128, tmp_path):
    get, _ = llama128
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(finegrain.errors.FinegrainError, match="exists"):
        get("w8a16").export_gguf(out)
    assert out.read_bytes() == b"mine"
    get("w8a16").export_gguf(out, overwrite=True)
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "llama"


def test_qwen2_with_qkv_biases(tmp_path):
    """qwen2: q/k/v biases, untied head, NeoX RoPE (no Q/K permutation): finegrain's importer reads
    the export back exactly (Q8_0), and llama.cpp runs it where installed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 24))
    cm = finegrain.compile(model, (ids,), recipe="w8a16", progress=False)
    info = cm.export_gguf(tmp_path / "q.gguf")
    assert info["types"] == {"F32": 13, "Q8_0": 14}
    assert gguf.GGUFReader(str(tmp_path / "q.gguf")).fields["general.architecture"].contents() == "qwen2"
    back = load_gguf_llama(tmp_path / "q.gguf")
    assert type(back).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert _rel(cm(ids), back(ids).logits) <= 1e-5
    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(model_path=str(tmp_path / "q.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids[0].tolist())
    assert _rel(cm(ids)[0], torch.tensor(np.array(llm.scores[:24]))) < 0.02


def test_float16_matrices_and_file_mode(llama128, tmp_path):
    import os
    import stat

    get, x = llama128
    cm = get(Q40)
    full = cm.export_gguf(tmp_path / "a.gguf")
    half = cm.export_gguf(tmp_path / "b.gguf", dtype="float16")
    assert half["types"] == {"F32": 5, "F16": 1, "Q4_0": 14} and half["bytes"] < full["bytes"]
    assert stat.S_IMODE(os.stat(tmp_path / "b.gguf").st_mode) & 0o044  # readable like any output file
    back = load_gguf_llama(tmp_path / "b.gguf")
    with torch.no_grad():
        assert _rel(cm(x), back(x).logits) < 1e-2
    with pytest.raises(ExportError, match="float32 or float16"):
        cm.export_gguf(tmp_path / "c.gguf", dtype="bfloat16")


def test_a_kv_cache_artifact_exports_too(tmp_path):
    """The KV-cache graph has the same weights (and torch.export's literal constants, which are not
    checkpoint tensors): it exports and reads back like the plain graph."""
    from finegrain.models.tiny import tiny_llama

    model = tiny_llama(seed=2, hidden=128)
    ids = torch.randint(0, 256, (1, 12))
    cm = finegrain.compile(model, (ids,), recipe=Q40, progress=False, kv_cache=True)
    assert cm.export_gguf(tmp_path / "m.gguf")["types"] == {"F32": 6, "Q4_0": 14}
    with torch.no_grad():
        assert _rel(cm(ids), load_gguf_llama(tmp_path / "m.gguf")(ids).logits) <= 1e-5
