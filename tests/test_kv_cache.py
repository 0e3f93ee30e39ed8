"""The KV cache as graph tensors (compile(kv_cache=True)): decoding one token at a time over the
cache gives the full-sequence logits at every position, for the families the loader takes (GQA,
q/k/v biases, QK-norm, sliding windows, partial / fused projections); quantized graphs too; the
artifact round-trips; greedy generation equals transformers'; bad prompts get clear errors; a
backend that does not lower the cache graph refuses it by name; ONNX Runtime's and TVM's are in
tests/backends/test_onnx_kv.py and test_tvm_kv.py."""
import json

import pytest
import torch
import transformers as T

import finegrain
from finegrain.compiler.ir import KV
from finegrain.errors import ArtifactError, FinegrainError, InputError

FLOAT = {"name": "float", "rules": [{"role": "linear"}]}
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _family(name):
    torch.manual_seed(0)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**COMMON)).eval()
    if name == "qwen2":  # q/k/v biases
        return T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON)).eval()
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**COMMON, sliding_window=None)).eval()
    if name == "qwen3":  # QK-norm, explicit head_dim
        return T.Qwen3ForCausalLM(T.Qwen3Config(**COMMON, head_dim=24)).eval()
    if name == "phi3":  # fused qkv / gate_up projections
        return T.Phi3ForCausalLM(T.Phi3Config(**COMMON, pad_token_id=0)).eval()
    if name == "gemma3":  # sliding-window layers (window 8 < the 24 tokens below), QK-norm, 1 + w norms
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8)).eval()
    # not Llama-shaped (the KV presets across families, tests/passes/test_quantize_kv.py)
    small = dict(vocab_size=256, num_hidden_layers=2, max_position_embeddings=128)
    if name == "gpt2":  # learned positions, Conv1D, one fused c_attn split three ways
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()
    if name == "opt":  # learned positions (offset 2), LayerNorm with bias
        return T.OPTForCausalLM(T.OPTConfig(**small, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                            word_embed_proj_dim=64)).eval()
    if name == "gpt_neox":  # partial rotary (a quarter of the head dim), fused qkv, parallel residual
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**small, hidden_size=64, num_attention_heads=4,
                                                    intermediate_size=128, rotary_pct=0.25)).eval()
    if name == "phi":  # partial rotary (half), parallel attention and MLP, dense biases
        return T.PhiForCausalLM(T.PhiConfig(**COMMON, partial_rotary_factor=0.5)).eval()
    if name == "falcon":  # the new decoder architecture: fused qkv with grouped K / V heads
        return T.FalconForCausalLM(T.FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, new_decoder_architecture=True,
                                                  num_kv_heads=2)).eval()
    if name == "olmo2":  # norms after attention and MLP (not before), QK-norm over all heads
        return T.Olmo2ForCausalLM(T.Olmo2Config(**COMMON)).eval()
    if name == "gemma2":  # eager attention (logit softcapping): no scaled_dot_product_attention
        return T.Gemma2ForCausalLM(T.Gemma2Config(**COMMON, head_dim=16)).eval()
    if name == "bloom":  # ALiBi, a LayerNorm right after the embedding, fused qkv
        return T.BloomForCausalLM(T.BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4)).eval()
    raise KeyError(name)


def _incremental(cm, x, prefill):
    s = cm.session()
    logits, state = s.prefill(x[:, :prefill])
    outs = [logits]
    for t in range(prefill, x.shape[1]):
        logits, state = s.step(state, x[:, t:t + 1])
        outs.append(logits)
    return torch.cat(outs, 1), state


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3"])
def test_decode_over_the_cache_equals_the_full_sequence(family):
    model = _family(family)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    cm = finegrain.compile(model, (ids,), recipe=FLOAT, progress=False, kv_cache=True)
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).logits
    inc, state = _incremental(cm, x, prefill=5)
    assert _rel(ref, inc) <= 1e-4, (family, _rel(ref, inc))
    assert _rel(ref, cm(x)) <= 1e-5  # ids alone: a forward over an empty past
    kv = cm.kv
    assert kv["layers"] == 2 and kv["kv_heads"] == 2 and len(state["past"]) == 4
    assert state["past"][0].shape == (1, kv["kv_heads"], 24, kv["head_dim"]) and state["pos"] == 24
    roles = [n.meta[KV] for n in cm.gm.graph.nodes if KV in n.meta]
    assert roles == [{"layer": i // 2, "kind": ("key", "value")[i % 2]} for i in range(4)]


@pytest.mark.parametrize("recipe", ["w4a16-g128", "w8a8"])
def test_quantized_cache_graph_decodes_like_its_full_forward(compiled, tiny_llama, tiny_inputs, recipe, tmp_path):
    example, calib, test = tiny_inputs
    cm = finegrain.compile(tiny_llama, example, recipe=recipe, calibration=calib, progress=False, kv_cache=True)
    plain = compiled(recipe)
    with torch.no_grad():
        assert _rel(plain(test), cm(test)) <= 1e-5  # the same quantized model as without the cache
    inc, _ = _incremental(cm, test, prefill=3)
    assert _rel(cm(test), inc) <= 1e-4
    cm.save(tmp_path / "art")
    back = finegrain.load(tmp_path / "art")
    assert back.kv == cm.kv
    inc2, _ = _incremental(back, test, prefill=10)
    assert _rel(cm(test), inc2) <= 1e-4


def test_greedy_generation_equals_transformers(tiny_llama):
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    cm = finegrain.compile(tiny_llama, (ids,), recipe=FLOAT, progress=False, kv_cache=True)
    for seed in range(3):
        prompt = torch.randint(0, 256, (1, 4 + seed), generator=torch.Generator().manual_seed(10 + seed))
        with torch.no_grad():
            want = tiny_llama.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1]:].tolist()
        got = cm.generate(prompt, max_new_tokens=16)
        assert got.tokens == want
        assert got.decode_seconds > 0 and got.prefill_tokens_per_second > 0


def test_bad_prompts_are_clear_errors(tiny_llama):
    ids = torch.randint(0, 256, (1, 8))
    cm = finegrain.compile(tiny_llama, (ids,), recipe=FLOAT, progress=False, kv_cache=True)
    with pytest.raises(InputError, match="prompt is empty"):
        cm.generate(torch.zeros(1, 0, dtype=torch.int64), 4)
    with pytest.raises(InputError, match="exceeds the 512 tokens"):
        cm.generate(torch.zeros(1, 500, dtype=torch.int64), 20)
    with pytest.raises(InputError, match="int64"):
        cm.generate(torch.zeros(1, 5), 4)
    s = cm.session()
    _, state = s.prefill(torch.zeros(1, 510, dtype=torch.int64))
    with pytest.raises(InputError, match="past the 512 tokens"):
        s.step(state, torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(InputError, match="past_key_0"):
        s.run(*([torch.zeros(1, 2, dtype=torch.int64)] * 2), *([torch.zeros(1, 2, 3, 15)] * 4))  # head_dim is 16


def test_every_backend_lowers_the_cache_graph_and_one_that_does_not_refuses_it(tiny_llama):
    from finegrain.backends import registry
    from finegrain.backends.base import BackendBase

    cm = finegrain.compile(tiny_llama, (torch.randint(0, 256, (1, 8)),), recipe="w8a16", progress=False,
                           kv_cache=True)
    for name in registry.names():
        backend = registry.get(name)
        assert backend.kv_cache, name  # torch, onnx, tvm all take it today
        if not backend.available():
            assert cm.check(name) == [], name

    class NoCache(BackendBase):  # the contract's default: a backend that never said it lowers the cache
        name = "nocache"

    refusals = NoCache().check(cm)
    assert refusals and "KV-cache graph" in str(refusals[-1]), refusals


def test_a_tampered_kv_layout_is_refused(tiny_llama, tmp_path):
    cm = finegrain.compile(tiny_llama, (torch.randint(0, 256, (1, 8)),), recipe="w8a16", progress=False,
                           kv_cache=True)
    cm.save(tmp_path / "art")
    mf = tmp_path / "art" / "manifest.json"
    m = json.loads(mf.read_text())
    m["kv"]["layers"] = 3  # inputs no longer match
    mf.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="KV-cache artifact's inputs"):
        finegrain.load(tmp_path / "art")
    m["kv"]["layers"] = "2; rm -rf /"
    mf.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="field 'kv'"):
        finegrain.load(tmp_path / "art")
    m["kv"]["layers"] = 2
    for extra in ({"value_dim": 8}, {"value_heads": 1, "value_dim": -8}, {"value_heads": 1, "value_dim": "8"}):
        mf.write_text(json.dumps({**m, "kv": {**m["kv"], **extra}}))  # MLA's value shape: both fields, integers
        with pytest.raises(ArtifactError, match="value_heads with value_dim"):
            finegrain.load(tmp_path / "art")


def test_kv_cache_needs_a_causal_lm():
    with pytest.raises(InputError, match="transformers causal LM"):
        finegrain.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),), recipe="w8a16", progress=False, kv_cache=True)
