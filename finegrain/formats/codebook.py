"""Non-uniform scalar codebooks: NormalFloat (QLoRA's NF4) and per-tensor Lloyd-Max codebooks.

Values are normalized by the group scale ``s = absmax * clip`` (so they lie in [-1, 1]) and
coded as the index of the nearest codebook level; ``x̂ = level[code] * s``.

* ``nf`` (NF4, Dettmers et al. 2023): the fixed levels of QLoRA, built the same way: the
  2^(b-1) positive and 2^(b-1) - 1 negative quantiles of N(0, 1) at probabilities spaced from
  0.5 to ``offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2``, plus an exact zero, normalized to [-1, 1].
* ``lm`` (Lloyd-Max): 2^b levels fitted to the tensor's own normalized values by Lloyd's
  algorithm (1-D k-means, initialized at quantiles); the codebook (2^b fp16 values) is stored
  once per tensor and counted in bits per weight. With ``granularity='tensor'`` this is the
  classical Lloyd-Max quantizer of the data (3.86 dB above D(R) at 4 bits for a Gaussian), and
  the scalar end of Q-Palette's palette: fractional-bit choices for bit allocation.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from finegrain.formats.bitmod import nearest

LLOYD_ITERS = 1000
LLOYD_BINS = 1 << 14
LLOYD_SAMPLES = 1 << 22


@lru_cache(maxsize=None)
def normal_float_levels(bits: int) -> torch.Tensor:
    offset = (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2  # QLoRA's 0.9677...
    n = torch.distributions.Normal(0.0, 1.0)
    half = 2 ** (bits - 1)
    pos = n.icdf(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -n.icdf(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


class _Normalized:
    """Shared parts: absmax group scale, nearest-level encoding, table decoding."""

    def element_bits(self, fmt) -> int:
        return fmt.bits

    def metadata_bits(self, fmt) -> int:
        return 0

    def code_range(self, fmt) -> tuple[int, int]:
        return 0, 2**fmt.bits - 1

    def max_value(self, fmt) -> float:
        return 1.0

    def _check(self, fmt, name: str, bits: range) -> None:
        if fmt.bits not in bits:
            raise ValueError(f"QuantFormat.bits={fmt.bits!r}: {name} codebooks support {bits.start}..{bits.stop - 1} bits")
        if not fmt.symmetric or fmt.dynamic or fmt.scale not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"{name} codebook formats are symmetric, static (weights) and take a float scale")

    def choose_params(self, xg, fmt, clip):
        return xg.abs().amax(dim=-1) * clip, None

    def levels(self, fmt, codebook):
        raise NotImplementedError

    def encode(self, xg, scale, zero, fmt, codebook=None) -> torch.Tensor:
        return nearest(xg / scale.unsqueeze(-1), self.levels(fmt, codebook)).to(torch.uint8)

    def decode(self, codes, scale, zero, fmt, codebook=None) -> torch.Tensor:
        return self.levels(fmt, codebook)[codes.long()] * scale.unsqueeze(-1)


class NormalFloatFamily(_Normalized):
    def validate(self, fmt) -> None:
        self._check(fmt, "NormalFloat", range(2, 9))

    def refine(self, xg, scale, meta, fmt, clip):
        return torch.zeros(scale.shape, dtype=torch.int32), None

    def levels(self, fmt, codebook):
        return normal_float_levels(fmt.bits)


class LloydMaxFamily(_Normalized):
    def validate(self, fmt) -> None:
        self._check(fmt, "Lloyd-Max", range(1, 9))

    def codebook_bits(self, fmt) -> int:
        return 2**fmt.bits * 16

    def refine(self, xg, scale, meta, fmt, clip):
        v = (xg / scale.unsqueeze(-1)).clamp(-1, 1).reshape(-1)
        if v.numel() > LLOYD_SAMPLES:
            v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:LLOYD_SAMPLES]]
        return torch.zeros(scale.shape, dtype=torch.int32), lloyd_max(v, 2**fmt.bits)

    def levels(self, fmt, codebook):
        if codebook is None:
            raise ValueError("Lloyd-Max format: the codebook is missing (QTensor.codebook)")
        return codebook.float()


def lloyd_max(v: torch.Tensor, n: int, iters: int = LLOYD_ITERS) -> torch.Tensor:
    """``n`` sorted levels minimizing E(v - level(v))^2 (Lloyd's algorithm), rounded to fp16.

    Runs on a fine histogram of ``v`` (``LLOYD_BINS`` bins, each represented by the mean of its
    values with its count as weight), so the many iterations the tails need (about 100 for a
    Gaussian to reach 3.86 dB at 4 bits) cost O(bins), not O(samples)."""
    v = v.double().flatten()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return torch.full((n,), lo).to(torch.float16).float()
    b = torch.clamp(((v - lo) / (hi - lo) * LLOYD_BINS).long(), 0, LLOYD_BINS - 1)
    cnt = torch.zeros(LLOYD_BINS, dtype=torch.float64).index_add_(0, b, torch.ones_like(v))
    pts = torch.zeros(LLOYD_BINS, dtype=torch.float64).index_add_(0, b, v)
    keep = cnt > 0
    cnt, pts = cnt[keep], pts[keep] / cnt[keep]
    cdf = torch.cumsum(cnt, 0) / cnt.sum()
    levels = pts[torch.searchsorted(cdf, (torch.arange(n, dtype=torch.float64) + 0.5) / n).clamp(max=len(pts) - 1)]
    for _ in range(iters):
        idx = nearest(pts, levels)
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, pts * cnt)
        tot = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, cnt)
        new = torch.where(tot > 0, sums / tot.clamp(min=1e-300), levels).sort().values
        done = torch.allclose(new, levels, rtol=0, atol=1e-12)
        levels = new
        if done:
            break
    return levels.to(torch.float16).float().sort().values


NF = NormalFloatFamily()
LLOYD_MAX = LloydMaxFamily()
