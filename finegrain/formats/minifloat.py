"""Minifloat elements: FP8 E4M3 / E5M2 (OCP FP8), FP6 E3M2 / E2M3 and FP4 E2M1 (OCP MX v1.0).

Encodings are the ``ml_dtypes`` bit patterns (``float8_e4m3fn``, ``float8_e5m2``,
``float6_e3m2fn``, ``float6_e2m3fn``, ``float4_e2m1fn``): sign, exponent, mantissa, in the low
``bits`` of a byte. Encoding divides by the group scale, saturates to the largest finite value
(FP8 E4M3 448, E5M2 57344, E3M2 28, E2M3 7.5, E2M1 6; no Inf/NaN is ever produced) and rounds
to nearest, ties to even: through torch's own float8 dtypes for FP8 (the same bits as ml_dtypes,
tested) and for FP6/FP4 by ml_dtypes on CPU tensors, by torch arithmetic on any other device
(``MinifloatFamily._round_bits``, the same bits, tested). Decoding is a table lookup of all
``2^bits`` patterns. Codes are unsigned bit patterns; packing stores them as they are.
"""
from __future__ import annotations

import math
from functools import cached_property

import ml_dtypes
import numpy as np
import torch


class MinifloatFamily:
    def __init__(self, name: str, np_dtype, torch_dtype: torch.dtype | None):
        self.name, self.np_dtype, self.torch_dtype = name, np_dtype, torch_dtype
        self.bits = 1 + int(name[1]) + int(name[3])

    def validate(self, fmt) -> None:
        if fmt.bits != self.bits:
            raise ValueError(f"QuantFormat.bits={fmt.bits!r}: {self.name} elements have {self.bits} bits")
        if not fmt.symmetric:
            raise ValueError(f"QuantFormat.symmetric=False: {self.name} elements are sign-magnitude (symmetric only)")

    def element_bits(self, fmt) -> int:
        return self.bits

    def metadata_bits(self, fmt) -> int:
        return 0

    def code_range(self, fmt) -> tuple[int, int]:
        return 0, 2**self.bits - 1

    def max_value(self, fmt=None) -> float:
        return float(ml_dtypes.finfo(self.np_dtype).max)

    @cached_property
    def emin(self) -> int:
        """Exponent of the smallest normal value (subnormals below it step by ``2^(emin - mantissa)``)."""
        return int(math.log2(float(ml_dtypes.finfo(self.np_dtype).smallest_normal)))

    @cached_property
    def mantissa(self) -> int:
        """Explicit mantissa bits."""
        return int(ml_dtypes.finfo(self.np_dtype).nmant)

    @cached_property
    def table(self) -> torch.Tensor:
        """Value of every bit pattern (NaN/Inf patterns included; encoding never emits them)."""
        pats = np.arange(2**self.bits, dtype=np.uint8).view(self.np_dtype)
        return torch.from_numpy(pats.astype(np.float32))

    def choose_params(self, xg, fmt, clip):
        return xg.abs().amax(dim=-1) * clip / self.max_value(), None

    def refine(self, xg, scale, meta, fmt, clip):
        return torch.zeros(scale.shape, dtype=torch.int32, device=scale.device), None

    def cast(self, v: torch.Tensor) -> torch.Tensor:
        """Bit patterns (uint8) of fp32 values ``v`` rounded to nearest-even, saturating, on ``v``'s
        device: FP8 by torch's own dtypes, FP6 / FP4 (no torch dtype) by ml_dtypes on CPU and by
        :meth:`_round_bits` elsewhere (the same bits)."""
        m = self.max_value()
        v = v.clamp(-m, m)
        if self.torch_dtype is not None:
            return v.to(self.torch_dtype).view(torch.uint8)
        if v.device.type == "cpu":  # ml_dtypes' C cast: 4-9x faster than the arithmetic on CPU
            return torch.from_numpy(np.ascontiguousarray(v.numpy()).astype(self.np_dtype).view(np.uint8))
        return self._round_bits(v)

    def _round_bits(self, v: torch.Tensor) -> torch.Tensor:
        """The ``ml_dtypes`` cast of saturated fp32 ``v`` (finite, ``|v| <= max``) to this element, by
        torch arithmetic (so it runs on any device: the GPU backend quantizes MX / NV activations on
        the GPU): the binade from ``frexp`` (exact, no log rounding), floored at the smallest normal's
        (subnormals share its step), the value divided by its step ``2^(e - mantissa)`` (exact: a
        power of two) and rounded half to even by ``torch.round``, then sign, exponent field and
        mantissa assembled; a rounding that carries into the next binade is re-read from the result.
        Negative values rounding to zero keep the sign bit, as the cast does. Tested bit-exact against
        ``ml_dtypes`` on every fp16 value and random fp32 ones (``tests/formats``)."""
        mant, emin = self.mantissa, self.emin
        a = v.abs().float()
        e = (torch.frexp(a)[1] - 1).clamp_min(emin)  # floor(log2 a) for a > 0; zero and subnormals: emin
        r = torch.round(torch.ldexp(a, mant - e))  # the value in units of its step, ties to even
        r_val = torch.ldexp(r, e - mant)
        e2 = (torch.frexp(r_val)[1] - 1).clamp_min(emin)  # the binade after rounding (a carry moves it up)
        normal = r_val >= 2.0 ** emin
        field = torch.where(normal, e2 - emin + 1, torch.zeros_like(e2))
        m_bits = torch.where(normal, torch.ldexp(r_val, mant - e2) - 2 ** mant, r_val * 2.0 ** (mant - emin))
        code = (field << mant) | m_bits.to(torch.int32)
        return (code | (torch.signbit(v).to(torch.int32) << (self.bits - 1))).to(torch.uint8)

    def encode(self, xg, scale, zero, fmt, codebook=None) -> torch.Tensor:
        return self.cast(xg / scale.unsqueeze(-1))

    def decode(self, codes, scale, zero, fmt, codebook=None) -> torch.Tensor:
        return self.table.to(codes.device)[codes.long()] * scale.unsqueeze(-1)


MINIFLOATS = {
    "e4m3": MinifloatFamily("e4m3", ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn),
    "e5m2": MinifloatFamily("e5m2", ml_dtypes.float8_e5m2, torch.float8_e5m2),
    "e3m2": MinifloatFamily("e3m2", ml_dtypes.float6_e3m2fn, None),
    "e2m3": MinifloatFamily("e2m3", ml_dtypes.float6_e2m3fn, None),
    "e2m1": MinifloatFamily("e2m1", ml_dtypes.float4_e2m1fn, None),
}
