"""Small randomly initialized reference models built from transformers configs (for tests)."""
from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 256, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3 // 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def tiny_mixtral(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 256, experts: int = 4, top_k: int = 2):
    """A Mixtral-style sparse MoE LM (routed experts only), random init."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3 // 2,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=512)
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).eval()


def tiny_qwen_moe(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 256, experts: int = 4, top_k: int = 2):
    """A Qwen2-MoE-style LM: routed experts plus a gated shared expert, random init."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3 // 2,
                         moe_intermediate_size=hidden * 3 // 4, shared_expert_intermediate_size=hidden * 3 // 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=512,
                         decoder_sparse_step=1, mlp_only_layers=[])
    torch.manual_seed(seed)
    return Qwen2MoeForCausalLM(cfg).eval()
