"""Text generation over any backend session: ``session.generate(input_ids, max_new_tokens, ...)``.

It drives the session's ``prefill`` / ``step``; a backend that holds a KV cache makes those fast,
and generation gets faster with no change here. Greedy decoding or sampling (temperature, top-k,
top-p / nucleus, a seed for repeatability), an end-of-sequence id (or several), and a ``streamer``
callback that receives each new token id as it is produced. The result carries the new tokens
and the time spent in prefill (the prompt) and in decode (the rest).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from finegrain.errors import InputError


@dataclass
class Generation:
    """New token ids (prompt excluded), why generation stopped, and the time it took."""

    tokens: list[int] = field(default_factory=list)
    stopped: str = "length"  # "length" | "eos"
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(self.tokens) - 1, 0)  # the first new token comes from the prefill's logits
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps else float("nan")


def check_generation_args(input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
                          top_p: float | None, max_seq_len: int | None) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64,
                                                                                                 torch.int32):
        raise InputError(f"input_ids: expected an int64 tensor [1, n], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {list(getattr(input_ids, 'shape', []))}")
    if input_ids.shape[0] != 1:
        raise InputError(f"input_ids: generation takes one sequence (batch 1), got batch {input_ids.shape[0]}")
    if input_ids.shape[1] == 0:
        raise InputError("input_ids: the prompt is empty; give at least one token (e.g. the BOS token)")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens: must be an integer >= 0, got {max_new_tokens!r}")
    if max_seq_len is not None and input_ids.shape[1] + max_new_tokens > max_seq_len:
        raise InputError(f"prompt of {input_ids.shape[1]} tokens + {max_new_tokens} new tokens exceeds the "
                         f"{max_seq_len} tokens this session takes (max_seq_len)")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise InputError(f"temperature: must be a number > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InputError(f"top_k: must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1):
        raise InputError(f"top_p: must be a number in (0, 1], got {top_p!r}")


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> int:
    """The next id from one row of logits: argmax, or a sample after temperature, top-k, top-p."""
    logits = logits.float()
    if not do_sample:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(session, input_ids: torch.Tensor, max_new_tokens: int = 32, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Iterable[int] | None = None, seed: int | None = None,
             streamer: Callable[[int], None] | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` ids after ``input_ids`` ([1, n]) with ``session``."""
    check_generation_args(input_ids, max_new_tokens, temperature, top_k, top_p, getattr(session, "max_seq_len", None))
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = Generation(prompt_tokens=input_ids.shape[1])
    if max_new_tokens == 0:
        return out
    ids = input_ids.to(torch.int64) if input_ids.dtype != torch.int64 else input_ids
    t0 = time.perf_counter()
    logits, state = session.prefill(ids)
    out.prefill_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    while True:
        tok = next_token(logits[0, -1], do_sample, temperature, top_k, top_p, gen)
        out.tokens.append(tok)
        if streamer is not None:
            streamer(tok)
        if tok in eos:
            out.stopped = "eos"
            break
        if len(out.tokens) >= max_new_tokens:
            break
        logits, state = session.step(state, torch.tensor([[tok]], dtype=torch.int64))
    out.decode_seconds = time.perf_counter() - t1
    return out
