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
