"""Uniform integer formats INT2–INT8, symmetric or asymmetric (integer zero point).

Symmetric:  s = max|x| / (2^(b-1) - 1),  q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1).
Asymmetric: s = (max' - min') / (2^b - 1),  z = round(-min' / s),
            q = clamp(round(x / s) + z, 0, 2^b - 1),  x̂ = (q - z) s,
            with min' = min(min, 0), max' = max(max, 0): the range always holds 0 (GPTQ and ONNX
            Runtime's blockwise quantizer do the same), so 0 is exact, z needs no clipping, and a
            constant group is represented exactly.
The zero point is stored with ``bits`` bits per group (GPTQ / MatMulNBits convention).
With ``fmt.clip`` < 1 the range (max|x|, or min' and max') is multiplied by it before the scale is
chosen, and values beyond it saturate (QuaRot clips per-token activations at 0.9).
"""
from __future__ import annotations

import torch


class IntFamily:
    def validate(self, fmt) -> None:
        if not isinstance(fmt.bits, int) or not 2 <= fmt.bits <= 8:
            raise ValueError(f"QuantFormat.bits={fmt.bits!r}: integer formats support 2..8 bits")

    def element_bits(self, fmt) -> int:
        return fmt.bits

    def metadata_bits(self, fmt) -> int:
        return 0 if fmt.symmetric else fmt.bits  # the integer zero point

    def code_range(self, fmt) -> tuple[int, int]:
        if fmt.symmetric:
            return -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1
        return 0, 2**fmt.bits - 1

    def choose_params(self, xg: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
        if fmt.symmetric:
            scale = xg.abs().amax(dim=-1) * fmt.clip / (2 ** (fmt.bits - 1) - 1)
            return scale, torch.zeros_like(scale, dtype=torch.int32)
        qmax = 2**fmt.bits - 1
        lo, hi = xg.amin(dim=-1).clamp(max=0) * fmt.clip, xg.amax(dim=-1).clamp(min=0) * fmt.clip
        scale = (hi - lo) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        # the zero point must be rounded against the scale that will be stored
        from finegrain.formats.base import SCALE_DTYPES

        safe = safe.to(SCALE_DTYPES[fmt.scale]).float()
        zero = torch.clamp(torch.round(-lo / safe), 0, qmax).to(torch.int32)
        return scale, zero

    def encode(self, xg, scale, zero, fmt) -> torch.Tensor:
        lo, hi = self.code_range(fmt)
        q = torch.round(xg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
        return torch.clamp(q, lo, hi).to(torch.int8 if fmt.symmetric else torch.uint8)

    def decode(self, codes, scale, zero, fmt) -> torch.Tensor:
        return (codes.to(torch.int32) - zero.unsqueeze(-1)).float() * scale.unsqueeze(-1)


INT = IntFamily()
