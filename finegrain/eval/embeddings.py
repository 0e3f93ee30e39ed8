"""Encoder quality: cosine similarity of sentence embeddings, float vs quantized, on real text.

Sentences are the first ``n`` non-heading paragraphs of WikiText-2 test or the user's text (truncated to ``max_len``
tokens); embeddings are mean-pooled over the attention mask and L2-normalized, as
sentence-transformers does for all-MiniLM-L6-v2.
"""
from __future__ import annotations

from typing import Callable

import torch

from finegrain.data import Text, wikitext2
from finegrain.errors import InputError

EncodeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) -> hidden states


def real_sentences(n: int = 256, text: Text | None = None) -> list[str]:
    return [r for r in (text or wikitext2()).paragraphs() if not r.startswith("=")][:n]


def sentence_embeddings(encode: EncodeFn, tokenizer, sentences: list[str], batch: int = 32,
                        max_len: int = 128) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), batch):
            enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt")
            h = encode(enc["input_ids"], enc["attention_mask"])
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
    return torch.cat(out)


def embedding_cosine(encode_fp: EncodeFn, encode_q: EncodeFn, tokenizer, n: int = 256, text: Text | None = None) -> dict:
    sents = real_sentences(n, text)
    if not sents:
        raise InputError(f"{text.name if text else 'wikitext2-test'}: no paragraphs to embed")
    a = sentence_embeddings(encode_fp, tokenizer, sents)
    b = sentence_embeddings(encode_q, tokenizer, sents)
    cos = (a * b).sum(-1)
    return {"text": (text or wikitext2()).name, "sentences": len(sents), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
