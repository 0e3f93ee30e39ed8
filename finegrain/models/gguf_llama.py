"""Load a Llama- or Qwen2-architecture GGUF file (llama.cpp format) into a transformers model, offline.

Every tensor is dequantized to fp32 with the ``gguf`` package. llama.cpp's converter permutes
the rows of Q and K for its RoPE layout; :func:`_unpermute_qk` undoes that (as transformers'
own GGUF loader does), so the model matches the Hugging Face layout exactly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from finegrain.io.checkpoint import TensorIndex, checked_finite
from finegrain.io.gguf_file import read_gguf

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


def _config(reader, path):
    """(transformers config, model class, q heads, kv heads, architecture) from a GGUF header."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

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
    return config, model_cls, n_head, n_kv, arch


def _hf_name(path, arch: str, gguf_name: str) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in _LAYER_NAMES:
        raise ValueError(f"{path}: GGUF tensor {gguf_name[:80]!r} is not one of the {arch} tensors finegrain reads")
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"


def _dequantized(t, arch: str, n_head: int, n_kv: int) -> np.ndarray:
    import gguf

    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    rest = t.name.split(".", 2)[-1]
    if rest in _QK_HEADS and t.name.startswith("blk.") and arch == "llama":
        w = _unpermute_qk(w, {"attn_q.weight": n_head, "attn_k.weight": n_kv}[rest])
    return w


def load_gguf_llama(path: str | Path) -> torch.nn.Module:
    """Build a ``LlamaForCausalLM`` (GGUF architecture ``llama``) or ``Qwen2ForCausalLM`` (``qwen2``:
    q/k/v biases, NeoX RoPE so no Q/K permutation) in fp32, eval mode, from a GGUF file."""
    reader = read_gguf(path)
    config, model_cls, n_head, n_kv, arch = _config(reader, path)
    state = {_hf_name(path, arch, t.name): torch.from_numpy(np.ascontiguousarray(_dequantized(t, arch, n_head, n_kv)))
             for t in reader.tensors}
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


class GGUFCheckpoint(TensorIndex):
    """A Llama / Qwen2 GGUF file read one tensor at a time for block-by-block compilation
    (``models/lazy.py``'s checkpoint interface, Hugging Face tensor names). The header is parsed once;
    each :meth:`load` reads that tensor's bytes with a plain file read (no mapping left behind, so the
    file's pages never pile up in the resident set) and dequantizes them to float32 (Q/K rows
    un-permuted)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        reader = read_gguf(self.path)
        self.config, self.model_cls, self.n_head, self.n_kv, self.arch = _config(reader, self.path)
        self.tensors = {}  # hf name -> (gguf name, type, byte offset, bytes, numpy dtype, numpy shape)
        for t in reader.tensors:
            self.tensors[_hf_name(self.path, self.arch, t.name)] = (
                t.name, t.tensor_type, int(t.data_offset), int(t.n_bytes), t.data.dtype, tuple(t.data.shape))
        self.shapes = {hf: tuple(int(d) for d in reversed(t.shape.tolist()))
                       for hf, t in zip(self.tensors, reader.tensors)}
        del reader

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from types import SimpleNamespace

        from finegrain.errors import InputError

        gname, qtype, offset, n_bytes, np_dtype, np_shape = self.tensors[name]
        raw = np.fromfile(self.path, dtype=np.uint8, count=n_bytes, offset=offset)
        if raw.size != n_bytes:
            raise InputError(f"{self.path}: tensor {gname!r} is cut short ({raw.size} of {n_bytes} bytes)")
        t = SimpleNamespace(name=gname, tensor_type=qtype, data=raw.view(np_dtype).reshape(np_shape))
        w = torch.from_numpy(np.ascontiguousarray(_dequantized(t, self.arch, self.n_head, self.n_kv))).to(dtype)
        return checked_finite(w, self.path, name)
