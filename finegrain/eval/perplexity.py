"""Perplexity on WikiText-2 test (or the user's own text) and calibration batches from the Brown
corpus (or the user's own text: ``finegrain.data.read_text``).

Protocol (DESIGN.md): tokenize the evaluation stream once, cut it into non-overlapping
windows of ``seq_len`` tokens (capped by the model's context), average the next-token NLL over
every predicted token, ppl = exp(mean NLL). Windows are streamed: only one window's logits exist
at a time. ``max_windows`` evaluates the first N windows (quick runs; say so when reporting), ``first_window``
skips the windows before it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from finegrain.data import Text, brown, wikitext2
from finegrain.errors import InputError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
_TOKEN_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def text_ids(tokenizer, text: Text) -> torch.Tensor:
    """The token ids of ``text.joined()`` (cached per tokenizer and text content)."""
    key = (id(tokenizer), text.sha256)
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = torch.tensor(tokenizer(text.joined()).input_ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def wikitext_ids(tokenizer) -> torch.Tensor:
    return text_ids(tokenizer, wikitext2())


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    windows_available: int
    seq_len: int
    seconds: float
    text: str = "wikitext2-test"

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(logits_fn: LogitsFn, tokenizer, seq_len: int = 2048, max_windows: int | None = None,
               progress: bool = True, first_window: int = 0, text: Text | None = None) -> PerplexityResult:
    """Mean next-token NLL of ``logits_fn`` over windows of ``seq_len`` of ``text`` (default
    WikiText-2 test), from window ``first_window`` on (a held-out slice for checks tuned on the
    first windows)."""
    if seq_len < 2:
        raise InputError(f"seq_len must be >= 2, got {seq_len}")
    text = text or wikitext2()
    ids = text_ids(tokenizer, text)
    available = ids.numel() // seq_len
    if available == 0:
        raise InputError(f"seq_len {seq_len} is longer than the tokenized text {text.name} ({ids.numel()} tokens); "
                         "use a shorter --seq-len or more text")
    if not 0 <= first_window < available:
        raise InputError(f"first_window {first_window} is outside the {available} windows of {seq_len} tokens")
    n = available - first_window if not max_windows else min(max_windows, available - first_window)
    from tqdm.auto import tqdm

    total_nll, total_tokens, t0 = 0.0, 0, time.perf_counter()
    with torch.inference_mode():
        for w in tqdm(range(first_window, first_window + n), desc=f"ppl@{seq_len}", disable=not progress, leave=False):
            window = ids[w * seq_len:(w + 1) * seq_len].unsqueeze(0)
            logits = logits_fn(window)
            nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum")
            total_nll += float(nll)
            total_tokens += seq_len - 1
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, n, available, seq_len, round(time.perf_counter() - t0, 2),
                            text.name)


def cache_path_logits(session, chunk: int = 256) -> LogitsFn:
    """Logits of a window computed through ``session``'s KV cache: the first ``chunk`` tokens prefilled,
    each next chunk over the cache the earlier ones wrote (a quantized cache is read as stored)."""
    if chunk < 1:
        raise InputError(f"chunk must be >= 1 token, got {chunk}")

    def fn(window: torch.Tensor) -> torch.Tensor:
        outs, state = [], None
        for c in range(0, window.shape[1], chunk):
            part = window[:, c:c + chunk]
            logits, state = session.prefill(part) if state is None else session.step(state, part)
            outs.append(logits)
        return torch.cat(outs, 1)
    return fn


def calibration_batches(tokenizer, samples: int = 32, seq_len: int = 512, seed: int = 0,
                        text: Text | None = None) -> list[tuple[torch.Tensor]]:
    """``samples`` random windows of ``seq_len`` tokens from ``text`` (default the Brown corpus
    slice; fixed seed)."""
    text = text or brown()
    ids = text_ids(tokenizer, text)
    if ids.numel() <= seq_len:
        raise InputError(f"calibration seq_len {seq_len} exceeds the calibration text {text.name} ({ids.numel()} "
                         "tokens); use a shorter --calibration-seq-len or more text")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=gen)
    return [(ids[s:s + seq_len].unsqueeze(0).clone(),) for s in starts.tolist()]
