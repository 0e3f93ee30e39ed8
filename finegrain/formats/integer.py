"""Uniform integer formats INT2–INT8, symmetric or asymmetric (integer zero point).

Symmetric:  s = max|x| / (2^(b-1) - 1),  q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)
            (scales chosen from the data never use -2^(b-1): the Q range is [-7, 7] for INT4,
            the symmetric clipping of NVINT4 / "INT v.s. FP").
Asymmetric: s = (max' - min') / (2^b - 1),  z = round(-min' / s),
            q = clamp(round(x / s) + z, 0, 2^b - 1),  x̂ = (q - z) s,
            with min' = min(min, 0), max' = max(max, 0): the range always holds 0 (GPTQ and ONNX
            Runtime's blockwise quantizer do the same), so 0 is exact, z needs no clipping, and a
            constant group is represented exactly. The zero point is computed against the scale
            that is finally stored (after fp16 / two-level rounding).
The zero point is stored with ``bits`` bits per group (GPTQ / MatMulNBits convention).
With a clip ratio < 1 the range (max|x|, or min' and max') is multiplied by it before the scale
is chosen, and values beyond it saturate (QuaRot clips per-token activations at 0.9).
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

    def max_value(self, fmt) -> float:
        return float(2 ** (fmt.bits - 1) - 1)

    def _range(self, xg, clip):
        return xg.amin(dim=-1).clamp(max=0) * clip, xg.amax(dim=-1).clamp(min=0) * clip

    def choose_params(self, xg: torch.Tensor, fmt, clip) -> tuple[torch.Tensor, None]:
        if fmt.symmetric:
            return xg.abs().amax(dim=-1) * clip / self.max_value(fmt), None
        lo, hi = self._range(xg, clip)
        return (hi - lo) / (2**fmt.bits - 1), None

    def refine(self, xg, scale, meta, fmt, clip):
        if fmt.symmetric:
            return torch.zeros(scale.shape, dtype=torch.int32, device=scale.device), None
        lo, _ = self._range(xg, clip)
        return torch.clamp(torch.round(-lo / scale), 0, 2**fmt.bits - 1).to(torch.int32), None

    def codes(self, x, scale, zero, fmt) -> torch.Tensor:
        """``clamp(round(x / s) + z)`` as floats, ``scale`` / ``zero`` broadcast against ``x`` as given
        (``encode`` per group; GPTQ's integer sweep per column)."""
        lo, hi = self.code_range(fmt)
        return torch.round(x / scale).add_(zero).clamp_(lo, hi)

    def values(self, q, scale, zero) -> torch.Tensor:
        """``(q - z) s``: what codes ``q`` stand for (``decode``; GPTQ's integer sweep)."""
        return (q - zero) * scale

    def encode(self, xg, scale, zero, fmt, codebook=None) -> torch.Tensor:
        return self.codes(xg, scale.unsqueeze(-1), zero.unsqueeze(-1), fmt).to(torch.int8 if fmt.symmetric else torch.uint8)

    def decode(self, codes, scale, zero, fmt, codebook=None) -> torch.Tensor:
        return self.values(codes.float(), scale.unsqueeze(-1), zero.unsqueeze(-1))


INT = IntFamily()
