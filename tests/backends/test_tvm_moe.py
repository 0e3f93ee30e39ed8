"""Mixture-of-experts graphs on TVM (2026-12-07; before: refused by node): the grouped GEMM is one
gather-GEMM over the experts' dequantized weights (each row's expert counted from the offsets),
with converters for the routing ops the Relax frontend lacked or mistyped (``histc``, ``empty`` of
a symbolic size, ``div`` by an int with a rounding mode). Against the reference session."""
import pytest
import torch

import finegrain

pytest.importorskip("tvm")

from tests.backends.targets import BUILD  # noqa: E402
from tests.test_kv_cache import _rel  # noqa: E402
from tests.test_more_families import _decode  # noqa: E402

pytestmark = pytest.mark.tvm


def test_moe_without_a_cache_matches_the_reference():
    from finegrain.backends import registry
    from finegrain.models.tiny import tiny_mixtral

    gen = torch.Generator().manual_seed(1)
    cm = finegrain.compile(tiny_mixtral(experts=4), (torch.randint(0, 256, (1, 16), generator=gen),),
                           recipe="w4a16-g128", progress=False)
    assert "grouped_linear" not in " ".join(str(r) for r in registry.get("tvm").check(cm))
    ref, tvm = cm.session(), cm.session("tvm", target=BUILD, max_seq_len=64)
    for n in (16, 5, 1):  # other lengths route other rows to each expert (some get none)
        ids = torch.randint(0, 256, (1, n), generator=gen)
        assert _rel(ref(ids), tvm(ids)) < 1e-5


def test_moe_with_a_shared_expert_decodes_over_the_cache():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32)).eval()
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    cm = finegrain.compile(model, (x[:, :8],), recipe="w4a16-g128", progress=False, kv_cache=True)
    ref = _decode(cm.session(), x)  # prefill 5 tokens, then one step per token
    assert _rel(ref, _decode(cm.session("tvm", target=BUILD, max_seq_len=32), x)) < 1e-5
