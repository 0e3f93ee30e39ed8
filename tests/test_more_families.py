"""Families found failing by a probe of 29 more transformers architectures (2026-12-07; the norm
folds of Gemma, Nemotron and Helium are in ``tests/passes/test_norm_families.py``): MPT's KV-cache
graph computes its ALiBi slice bounds with ``torch.sym_max``, which the artifact format now
stores (and ONNX Runtime runs) and TVM refuses by name; GPTBigCode's multi-query reshapes made the
TVM frontend compare symbolic dims with ``bool()``."""
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
