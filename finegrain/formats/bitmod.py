"""BitMoD per-group datatypes (Chen et al., HPCA 2025, "Bit-serial Mixture-of-Datatype LLM
Acceleration").

A 4-bit FP4 (E2M1) grid has two zeros; BitMoD gives the redundant pattern a *special value* and
lets every group pick, by minimum squared error, one of four datatypes (the paper's "mixed"
setting): FP4 {0, ±1, ±2, ±3, ±4, ±6, ±8, ±12} (E2M1 in units of 0.5) plus one of +5 / -5
(extra resolution) or +16 / -16 (extra range). At 3 bits: FP3 {0, ±1, ±2, ±4} plus +3 / -3 or
+6 / -6. Each group stores its scale (``absmax * clip / max|levels|`` of its datatype), its
codes (indexes into the sorted 2^b levels) and a 2-bit datatype id in the per-group metadata slot
(``QTensor.zero``), counted in bits per weight. Symmetric, weights only.
"""
from __future__ import annotations

from functools import lru_cache

import torch

_FP4 = [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
_FP3 = [0.0, 1.0, 2.0, 4.0]
SPECIAL = {4: (5.0, -5.0, 16.0, -16.0), 3: (3.0, -3.0, 6.0, -6.0)}


def _levels(base: list[float], special: float) -> list[float]:
    return sorted(set(base) | {-v for v in base} | {special})


def nearest(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``levels`` (a tie goes to the lower level)."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(v, mids)


class BitModFamily:
    def validate(self, fmt) -> None:
        if fmt.bits not in SPECIAL:
            raise ValueError(f"QuantFormat.bits={fmt.bits!r}: BitMoD datatypes exist for {sorted(SPECIAL)} bits")
        if not fmt.symmetric or fmt.dynamic or fmt.scale not in ("fp32", "fp16", "bf16"):
            raise ValueError("BitMoD formats are symmetric, static (weights) and take a float scale")

    @staticmethod
    @lru_cache(maxsize=None)
    def tables(bits: int) -> torch.Tensor:
        """The four datatypes' sorted levels, ``[4, 2^bits]`` (built once per bit width)."""
        base = _FP4 if bits == 4 else _FP3
        return torch.tensor([_levels(base, s) for s in SPECIAL[bits]], dtype=torch.float32)

    def element_bits(self, fmt) -> int:
        return fmt.bits

    def metadata_bits(self, fmt) -> int:
        return 2  # datatype id of the group

    def code_range(self, fmt) -> tuple[int, int]:
        return 0, 2**fmt.bits - 1

    def max_value(self, fmt) -> float:
        return float(self.tables(fmt.bits).abs().amax())

    def choose_params(self, xg, fmt, clip):
        amax = xg.abs().amax(dim=-1) * clip
        best_err = best_scale = best_id = None
        for i, lv in enumerate(self.tables(fmt.bits)):
            s = amax / lv.abs().max()
            s = torch.where(s > 0, s, torch.ones_like(s))
            deq = lv[nearest(xg / s.unsqueeze(-1), lv)] * s.unsqueeze(-1)
            err = (deq - xg).pow(2).sum(-1)
            if best_err is None:
                best_err, best_scale, best_id = err, s, torch.zeros(err.shape, dtype=torch.int32)
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, s, best_scale)
                best_id = torch.where(better, torch.full_like(best_id, i), best_id)
        return best_scale, best_id

    def refine(self, xg, scale, meta, fmt, clip):
        return meta, None

    def encode(self, xg, scale, zero, fmt, codebook=None) -> torch.Tensor:
        v = xg / scale.unsqueeze(-1)
        codes = torch.zeros(v.shape, dtype=torch.uint8)
        for i, lv in enumerate(self.tables(fmt.bits)):
            codes = torch.where((zero == i).unsqueeze(-1), nearest(v, lv).to(torch.uint8), codes)
        return codes

    def decode(self, codes, scale, zero, fmt, codebook=None) -> torch.Tensor:
        t = self.tables(fmt.bits)
        flat = t.reshape(-1)[zero.long().unsqueeze(-1) * t.shape[1] + codes.long()]
        return flat * scale.unsqueeze(-1)


BITMOD = BitModFamily()
