"""Passkey retrieval (Mohtashami & Jaggi 2023, the long-context sanity check KV-cache papers run):
a random 5-digit key hidden at some depth of repetitive filler text, the model asked for it at the
end. A quantized KV cache that destroys what the model stored far back fails it even where the
perplexity of the recent tokens looks fine.

``passkey_prompt`` builds the prompt (deterministic from ``seed``); ``passkey_trial`` runs it on a
session through its cache (prefill the prompt, greedy decode) and says whether the key came back.
"""
from __future__ import annotations

import random

_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_INTRO = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. " \
         "I will quiz you about the important information there.\n"


def passkey_prompt(tokenizer, n_tokens: int = 1500, depth: float = 0.5, seed: int = 0) -> tuple[list[int], str]:
    """Token ids of a prompt about ``n_tokens`` long with the key at relative ``depth`` of the filler,
    and the key (5 digits)."""
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    fixed = len(tokenizer.encode(_INTRO + needle + question))
    per = len(tokenizer.encode(_FILLER * 8)) / 8
    reps = max(1, round((n_tokens - fixed) / per))
    before = round(reps * depth)
    text = _INTRO + _FILLER * before + needle + _FILLER * (reps - before) + question
    return tokenizer.encode(text), key


def passkey_trial(session, tokenizer, n_tokens: int = 1500, depth: float = 0.5, seed: int = 0) -> dict:
    """Prefill the prompt through ``session``'s KV cache, decode 8 tokens greedily; ``found``: the
    key is in the answer."""
    import torch

    ids, key = passkey_prompt(tokenizer, n_tokens, depth, seed)
    gen = session.generate(torch.tensor([ids]), max_new_tokens=8)
    answer = tokenizer.decode(gen.tokens)
    return {"key": key, "answer": answer.strip(), "found": key in answer, "prompt_tokens": len(ids), "depth": depth}
