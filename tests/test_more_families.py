"""Families found failing by a probe of 29 more transformers architectures (2026-12-07; the norm
folds of Gemma, Nemotron and Helium are in ``tests/passes/test_norm_families.py``): MPT's KV-cache
graph computes its ALiBi slice bounds with ``torch.sym_max``, which the artifact format now
stores (and ONNX Runtime runs) and TVM refuses by name; GPTBigCode's multi-query reshapes made the
TVM frontend compare symbolic dims with ``bool()``; Cohere's LayerNorm, written out as arithmetic, was not
recognized (no norm fold, the rotation refused); GPT-Neo's KV graph could not be captured (a fixed
causal-mask buffer sliced by ``past + seq``); DeepSeek's MLA cache (keys and values of different widths) was
refused."""
import pytest
import torch
import transformers as tf

import finegrain
from finegrain.errors import FinegrainError
from tests.backends.test_kv_packed import _decode as _decode_state
from tests.test_kv_cache import _rel

FLOAT = {"name": "float", "rules": [{"role": "linear"}]}


def _decode(session, x):
    return _decode_state(session, x)[0]  # prefill 5 tokens, then one step per token


def _mpt():
    torch.manual_seed(0)
    return tf.MptForCausalLM(tf.MptConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=128)).eval()


def test_mpt_kv_graph_saves_loads_and_runs_on_onnx(tmp_path):
    model = _mpt()
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    cm = finegrain.compile(model, (x[:, :8],), recipe=FLOAT, progress=False, kv_cache=True)
    assert any(n.target is torch.sym_max for n in cm.gm.graph.nodes)  # max(0, n - length) slice bounds
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
    assert _rel(ref, _decode(cm.session(), x)) < 1e-5
    cm.save(tmp_path / "mpt")  # before: "cannot serialize call target <function sym_max>"
    loaded = finegrain.load(tmp_path / "mpt")
    assert _rel(ref, _decode(loaded.session(), x)) < 1e-5
    pytest.importorskip("onnxruntime")
    assert _rel(ref, _decode(cm.session("onnx"), x)) < 1e-5


@pytest.mark.tvm
def test_mpt_is_refused_by_tvm_naming_the_node():
    pytest.importorskip("tvm")
    from finegrain.backends import registry

    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    cm = finegrain.compile(_mpt(), (x,), recipe=FLOAT, progress=False, kv_cache=True)
    (why,) = [str(r) for r in registry.get("tvm").check(cm) if "sym_max" in str(r)]
    assert "node sym_max" in why and "ALiBi" in why
    with pytest.raises(FinegrainError, match="sym_max"):
        cm.session("tvm")


@pytest.mark.tvm
def test_gpt_bigcode_decodes_on_tvm():
    pytest.importorskip("tvm")
    from tests.backends.targets import BUILD

    torch.manual_seed(0)
    model = tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                                         n_positions=128)).eval()
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    cm = finegrain.compile(model, (x[:, :8],), recipe="w4a16-g128", progress=False, kv_cache=True)
    ref = _decode(cm.session(), x)
    assert _rel(ref, _decode(cm.session("tvm", target=BUILD, max_seq_len=32), x)) < 1e-5


def test_cohere_rotated_decodes_through_the_cache_on_onnx():
    """Cohere writes its LayerNorm out as arithmetic; canonicalize makes it ``aten.layer_norm``, so
    the residual rotation folds (before: refused, naming the ``mean`` node) and the rotated graph
    with a KV cache runs on ONNX Runtime as on the reference."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = tf.CohereForCausalLM(tf.CohereConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=128)).eval()
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    cm = finegrain.compile(model, (x[:, :8],), recipe="w4a8-rot", progress=False, kv_cache=True)
    actions = [(f["pass"], f["action"]) for f in cm.folds]
    assert actions.count(("fold_norms", "folded")) == 3 and ("fold_rotation", "folded") in actions, cm.folds
    ref = _decode(cm.session(), x)
    with torch.no_grad():
        assert _rel(model(x, use_cache=False).logits, ref) < 0.2  # W4A8: close to float, not equal
    assert _rel(ref, _decode(cm.session("onnx"), x)) < 1e-5


def _gpt_neo():
    torch.manual_seed(0)
    return tf.GPTNeoForCausalLM(tf.GPTNeoConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                                                attention_types=[[["global", "local"], 1]], window_size=8,
                                                max_position_embeddings=128)).eval()


def test_gpt_neo_kv_graph_is_captured_for_half_the_positions_each(tmp_path):
    """GPT-Neo slices a fixed [128, 128] causal-mask buffer by ``past + seq``: export cannot prove that
    for seq, past <= 128 each (before: a CaptureError). The KV graph is captured for seq <= 64 and
    past <= 64, with a warning that says so (terminal and manifest); it decodes as the full forward
    on the reference and ONNX Runtime, and TVM refuses it by node."""
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match="up to 64 new tokens per call and 64 past tokens"):
        cm = finegrain.compile(_gpt_neo(), (x[:, :8],), recipe=FLOAT, progress=False, kv_cache=True)
    assert any("past + seq by its 128 positions" in w for w in cm.warnings)
    with torch.no_grad():
        ref = _gpt_neo()(x, use_cache=False).logits
    assert _rel(ref, _decode(cm.session(), x)) < 1e-5  # local (window 8 < 24) and global layers
    cm.save(tmp_path / "neo")
    assert finegrain.load(tmp_path / "neo").warnings == cm.warnings
    pytest.importorskip("onnxruntime")
    assert _rel(ref, _decode(cm.session("onnx"), x)) < 1e-5
    pytest.importorskip("tvm")
    from finegrain.backends import registry

    (why,) = [str(r) for r in registry.get("tvm").check(cm)]
    assert "node slice_1" in why and "attention_bias" in why and "run-time size" in why


def _deepseek_v3():
    torch.manual_seed(0)
    return tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=128, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)).eval()


def test_deepseek_mla_cache_of_two_widths(tmp_path):
    """DeepSeek-V3's MLA caches a latent (kv_lora_rank wide) as "keys" and the rotary key as "values",
    one head each: the KV graph carries both widths (``value_heads`` / ``value_dim``; before: a
    CaptureError), decodes as the full forward, saves, loads and runs on ONNX Runtime; KV
    quantization and the backends with a cache of equal shapes refuse it by name."""
    from finegrain.backends import registry
    from finegrain.compiler.recipe import get_recipe, with_kv

    model = _deepseek_v3()
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    cm = finegrain.compile(model, (x[:, :8],), recipe=FLOAT, progress=False, kv_cache=True)
    assert (cm.kv["kv_heads"], cm.kv["head_dim"], cm.kv["value_heads"], cm.kv["value_dim"]) == (1, 16, 1, 8)
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
    assert _rel(ref, _decode(cm.session(), x)) < 1e-5
    cm.save(tmp_path / "ds")
    assert _rel(ref, _decode(finegrain.load(tmp_path / "ds").session(), x)) < 1e-5
    (why,) = [str(r) for r in registry.get("tvm").check(cm)]
    assert "keys of 1 x 16 and values of 1 x 8" in why
    with pytest.raises(FinegrainError, match="only a float cache"):
        finegrain.compile(model, (x[:, :8],), recipe=with_kv(get_recipe("w4a16-g128"), "kivi4"), progress=False,
                          kv_cache=True)
    pytest.importorskip("onnxruntime")
    assert _rel(ref, _decode(cm.session("onnx"), x)) < 1e-5


def test_a_model_with_its_own_cache_class_is_a_capture_error():
    """MiniMax's forward refuses transformers' DynamicCache (its linear-attention layers keep a cache of
    their own): a CaptureError naming the model and the reason (before: transformers' bare ValueError)."""
    from finegrain.errors import CaptureError

    torch.manual_seed(0)
    model = tf.MiniMaxForCausalLM(tf.MiniMaxConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                                   max_position_embeddings=128)).eval()
    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    with pytest.raises(CaptureError, match=r"MiniMaxForCausalLM: its forward does not take transformers' DynamicCache"):
        finegrain.compile(model, (x,), recipe=FLOAT, progress=False, kv_cache=True)
    assert finegrain.compile(model, (x,), recipe=FLOAT, progress=False)(x).shape == (1, 8, 256)  # without: fine
