"""Load a Llama- or Qwen2-architecture GGUF file (llama.cpp format) into a transformers model, offline.

Every tensor is dequantized to fp32 with the ``gguf`` package. llama.cpp's converter permutes
the rows of Q and K for its RoPE layout; :func:`_unpermute_qk` undoes that (as transformers'
own GGUF loader does), so the model matches the Hugging Face layout exactly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",  # qwen2
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_QK_HEADS = ("attn_q.weight", "attn_k.weight")  # rows permuted by llama.cpp's converter
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _field(reader, key: str):
    if key not in reader.fields:
        raise ValueError(f"GGUF file has no metadata field {key!r}")
    return reader.fields[key].contents()


def _optional(reader, key: str):
    return reader.fields[key].contents() if key in reader.fields else None


def load_gguf_llama(path: str | Path) -> torch.nn.Module:
    """Build a ``LlamaForCausalLM`` (GGUF architecture ``llama``) or ``Qwen2ForCausalLM`` (``qwen2``:
    q/k/v biases, NeoX RoPE so no Q/K permutation) in fp32, eval mode, from a GGUF file."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama' and 'qwen2')")
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    n_head, n_kv = _field(reader, f"{arch}.attention.head_count"), _field(reader, f"{arch}.attention.head_count_kv")
    names = {t.name for t in reader.tensors}
    config = config_cls(
        vocab_size=(_field(reader, f"{arch}.vocab_size") if f"{arch}.vocab_size" in reader.fields
                    else len(reader.fields["tokenizer.ggml.tokens"].data)),
        hidden_size=_field(reader, f"{arch}.embedding_length"),
        intermediate_size=_field(reader, f"{arch}.feed_forward_length"),
        num_hidden_layers=_field(reader, f"{arch}.block_count"),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        max_position_embeddings=_field(reader, f"{arch}.context_length"),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base")),
        bos_token_id=_optional(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_optional(reader, "tokenizer.ggml.eos_token_id"),
        tie_word_embeddings="output.weight" not in names,
    )
    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name in _TOP_NAMES:
            name = _TOP_NAMES[t.name]
        else:
            parts = t.name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in _LAYER_NAMES:
                raise ValueError(f"{path}: GGUF tensor {t.name[:80]!r} is not one of the {arch} tensors finegrain reads")
            _, layer, rest = parts
            name = f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
            if rest in _QK_HEADS and arch == "llama":
                w = _unpermute_qk(w, {"attn_q.weight": n_head, "attn_k.weight": n_kv}[rest])
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    with torch.device("meta"):
        model = model_cls(config)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb.__init__(config=config)  # real (non-meta) inv_freq buffers
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path}: GGUF file lacks tensors for {missing[:5]}")
    return model.eval()

