"""Write a compiled model as a GGUF file for llama.cpp (``gguf`` package, no llama.cpp needed).

Which finegrain weight formats map onto llama.cpp blocks of 32 (K a multiple of 32, group size a
multiple of 32 or per channel: a group of 128 is four blocks with the same scale):

* INT8 symmetric -> ``Q8_0`` (fp16 scale d, int8 codes): exact;
* INT4 symmetric -> ``Q4_0`` (d, codes + 8 as nibbles): exact;
* INT4 asymmetric -> ``Q4_1`` (d, min m = -zero * d in fp16, unsigned nibbles): exact up to the fp16
  rounding of m (llama.cpp stores a min, finegrain an integer zero point; the export reports the
  largest weight difference it makes);
* everything else finegrain keeps in float (embeddings, norms, an unquantized head) -> ``F32``.

Refused by name, nothing written: other formats (INT2/3 and INT5-7: llama.cpp's K-quants have
quantized 6-bit sub-scales that finegrain's fp16 groups do not equal; FP8, MX, NV, BitMoD,
codebooks), scales fp16 cannot hold, groups that are not whole blocks, an online Hadamard, a
tensor a fold added (e.g. a shift bias) or an architecture llama.cpp's ``llama`` / ``qwen2``
graphs do not describe (RoPE scaling, sliding windows, other families).

The Llama Q and K rows are permuted into llama.cpp's RoPE layout (the permutation
``models/gguf_llama.py`` undoes on import); a row permutation moves whole quantization groups, so
it is exact. Tokenizer: copied field by field from a GGUF (``tokenizer_gguf``, e.g. the bundled
model's own file), else built from a byte-level BPE ``transformers`` tokenizer (``gpt2`` model,
pre-tokenizer ``default``), else ``no_vocab`` (token ids only; the result says so).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from finegrain.errors import ExportError, listed
from finegrain.exports.graph import QuantLinear
from finegrain.exports.hf import collect

ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight"}
BLOCK = 32


def gguf_name(key: str) -> str | None:
    if key in _TOP:
        return _TOP[key]
    parts = key.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER:
        return f"blk.{parts[2]}.{_LAYER[parts[3]]}"
    return None


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (the inverse of ``gguf_llama._unpermute_qk``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in (None, "default"):
        raise ValueError(f"RoPE scaling {kind!r} (the export writes plain RoPE only)")
    theta = cfg.get("rope_theta", params.get("rope_theta") if isinstance(params, dict) else None)
    return float(theta if theta is not None else 10000.0)


def _blocks(lin: QuantLinear) -> tuple[str, dict] | None:
    """(GGML type name, per-row arrays) for a weight llama.cpp blocks hold, or raise ValueError."""
    f, q = lin.fmt, lin.q
    n, k = lin.shape
    if f.kind != "int" or q.codebook is not None or (f.bits, f.symmetric) not in ((8, True), (4, True), (4, False)):
        raise ValueError(f"weight format {f.tag}: GGUF blocks hold INT8 symmetric (Q8_0) and INT4 symmetric / "
                         "asymmetric (Q4_0 / Q4_1) exactly; no exact llama.cpp type for this one")
    gs = f.group_size if f.granularity == "group" else k
    if k % BLOCK or gs % BLOCK:
        raise ValueError(f"weight format {f.tag}: K = {k} and the group ({gs}) must be multiples of llama.cpp's "
                         f"block of {BLOCK}")
    nb = k // BLOCK
    per_row = (lambda t: t.reshape(1, 1).expand(n, 1)) if f.granularity == "tensor" else (lambda t: t.reshape(n, -1))
    scale = per_row(q.scale.float())  # [n, ceil(k / gs)]; a ragged last group is still whole blocks
    d = scale.repeat_interleave(gs // BLOCK, dim=1)[:, :nb]
    if not torch.equal(d.half().float(), d):
        raise ValueError(f"weight format {f.tag}: {f.scale} scales are not all representable in fp16 (GGUF's d)")
    codes = q.codes.to(torch.int32).reshape(n, k)
    if f.symmetric:
        name = "Q8_0" if f.bits == 8 else "Q4_0"
        return name, {"d": d, "codes": codes}
    zero = per_row(q.zero.to(torch.int32)).repeat_interleave(gs // BLOCK, dim=1)[:, :nb]
    if f.signed:  # asymmetric codes are unsigned in finegrain; a signed variant would need an offset
        codes, zero = codes + 8, zero + 8
    return "Q4_1", {"d": d, "m": -(zero.float() * d), "codes": codes, "zero": zero}


def _pack(kind: str, arrays: dict) -> np.ndarray:
    """Rows of GGML blocks (uint8 [n, k / 32 * bytes])."""
    d = arrays["d"].numpy().astype(np.float16)
    n, nb = d.shape
    codes = arrays["codes"].numpy().reshape(n, nb, BLOCK)
    parts = [d.reshape(n, nb, 1).view(np.uint8)]
    if kind == "Q8_0":
        parts.append(codes.astype(np.int8).view(np.uint8))
    else:
        if kind == "Q4_1":
            parts.append(arrays["m"].numpy().astype(np.float16).reshape(n, nb, 1).view(np.uint8))
        u = (codes + (8 if kind == "Q4_0" else 0)).astype(np.uint8)
        if u.max(initial=0) > 15:
            raise ValueError("4-bit codes out of range")
        parts.append(u[..., :16] | (u[..., 16:] << 4))
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(n, -1))


def _tokenizer_fields(writer, tokenizer, tokenizer_gguf, vocab_size: int) -> str:
    import gguf

    from finegrain.io.gguf_file import read_gguf

    if tokenizer_gguf is not None:
        reader = read_gguf(tokenizer_gguf)
        for name, field in reader.fields.items():
            if name.startswith("tokenizer."):
                vtype = field.types[0]
                sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
        return f"copied from {Path(tokenizer_gguf).name}"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE" or not tokenizer.is_fast or len(tokenizer) > vocab_size:
        writer.add_tokenizer_model("no_vocab")
        return "none (no byte-level BPE tokenizer in the artifact: llama.cpp takes token ids)"
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.get_added_vocab().values())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added
                            else gguf.TokenType.NORMAL if tokens[i] is not None else gguf.TokenType.UNUSED
                            for i in range(vocab_size)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(int(getattr(tokenizer, attr)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return "byte-level BPE from the artifact's tokenizer (pre-tokenizer 'default')"


def plan_gguf(cm) -> dict:
    cfg, _, state, problems, kv = collect(cm)
    if kv:
        problems.append(f"KV cache: static scales ({next(iter(kv.values())).fmt.tag}) have no GGUF form; llama.cpp "
                        "picks its cache type at run time (--cache-type-k / --cache-type-v q8_0)")
    archs = cfg.get("architectures") or []
    arch = ARCHS.get(archs[0]) if archs else None
    if arch is None:
        raise ExportError(f"GGUF export: architecture {archs} is not one the export writes ({', '.join(ARCHS)})")
    try:
        theta = _rope_theta(cfg)
    except ValueError as e:
        raise ExportError(f"GGUF export of {archs[0]}: {e}") from None
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", arch == "llama"):
        problems.append(f"config: sliding-window attention ({cfg['sliding_window']}) is not in llama.cpp's "
                        f"{arch} graph")
    n_head, n_kv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    tensors: dict[str, tuple] = {}
    for key, item in state.items():
        name = gguf_name(key)
        if name is None:
            problems.append(f"{key}: no llama.cpp {arch} tensor for it")
            continue
        perm = n_head if name.endswith("attn_q.weight") else n_kv if name.endswith("attn_k.weight") else None
        perm = perm if arch == "llama" else None  # qwen2 uses NeoX RoPE in llama.cpp: no permutation
        if isinstance(item, QuantLinear):
            try:
                kind, arrays = _blocks(item)
            except ValueError as e:
                problems.append(f"{item.module}: {e}")
                continue
            if perm:
                arrays = {k: torch.from_numpy(permute_rows(v.numpy(), perm)) for k, v in arrays.items()}
            tensors[name] = (kind, arrays, item)
        else:
            w = item.float().numpy()
            tensors[name] = ("F32", permute_rows(w, perm) if perm else w, None)
    if problems:
        raise ExportError(f"GGUF export of {archs[0]}: {len(problems)} thing(s) cannot be written:\n  "
                          + listed(problems))
    return {"config": cfg, "arch": arch, "theta": theta, "tensors": tensors, "n_head": n_head, "n_kv": n_kv}


def export_gguf(cm, out: str | Path, overwrite: bool = False, tokenizer_gguf: str | Path | None = None,
                dtype: str = "float32") -> dict:
    """Write ``out`` (a .gguf file, atomically). ``dtype``: the float matrices finegrain did not
    quantize (embeddings, an unquantized head) as ``F32`` (``float32``, exact) or ``F16``
    (``float16``, half the bytes, rounded; 1-D norms stay F32 as llama.cpp wants). Returns {"path",
    "bytes", "types": {type: count}, "tokenizer", "max_q4_1_min_error"} (the largest |weight|
    change the fp16 min of Q4_1 makes)."""
    import gguf

    if dtype not in ("float32", "float16"):
        raise ExportError(f"dtype {dtype!r}: GGUF float tensors are float32 or float16")

    out = Path(out)
    if out.is_dir() or (out.exists() and not overwrite):
        raise ExportError(f"{out} exists" + (" and is a directory" if out.is_dir() else
                                             "; pass overwrite=True (--overwrite) to replace it"))
    plan = plan_gguf(cm)
    cfg, arch = plan["config"], plan["arch"]
    hidden, heads = int(cfg["hidden_size"]), plan["n_head"]
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    vocab = int(cfg["vocab_size"])
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    types: Counter = Counter()
    worst = 0.0
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(str((cm.source or {}).get("model", "finegrain model")))
        w.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
        w.add_embedding_length(hidden)
        w.add_block_count(int(cfg["num_hidden_layers"]))
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(heads)
        w.add_head_count_kv(plan["n_kv"])
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(plan["theta"])
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        w.add_vocab_size(vocab)
        for name, (kind, data, lin) in plan["tensors"].items():
            if kind == "F32":
                half = dtype == "float16" and data.ndim == 2
                types["F16" if half else "F32"] += 1
                w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16 if half else np.float32))
                continue
            types[kind] += 1
            packed = _pack(kind, data)
            w.add_tensor(name, packed, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
            if kind == "Q4_1":
                exact = (data["codes"] - data["zero"].repeat_interleave(BLOCK, dim=1)).float() * \
                    data["d"].repeat_interleave(BLOCK, dim=1)
                got = torch.from_numpy(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_1)).float()
                worst = max(worst, float((got.reshape(exact.shape) - exact).abs().max()))
        main = max((t for t in types if t not in ("F32", "F16")), key=types.get, default="F32")
        w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                         "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[main])
        tok_note = _tokenizer_fields(w, cm.tokenizer, tokenizer_gguf, vocab)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the file is a deliverable like any other
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"path": str(out), "bytes": out.stat().st_size, "types": dict(types), "tokenizer": tok_note,
            "max_q4_1_min_error": worst}
