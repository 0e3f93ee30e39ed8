"""finegrain's quantize/dequantize as ``torch.library`` custom ops (with fake kernels).

They are single nodes in an exported graph, survive re-export, and each backend lowers them.
The CPU kernels call the format's reference quantize/dequantize (``QuantFormat``), so the
graph-side semantics are defined in exactly one place. The format travels as its tag string.

* ``finegrain::dequantize_packed(packed, scale, zero, fmt, shape, out_dtype, scale2?, codebook?)``:
  a weight stored as bit-packed codes (``formats/packing.py``), per-group scales as the format
  stores them (``formats/scales.py``: fp16, E8M0 exponents, FP8 block scales, DGQ integers),
  packed per-group metadata (zero points, BitMoD datatype ids), the second-level scale of
  two-level scale types and the codebook of codebook formats.
* ``finegrain::quantize(x, fmt, scale?, zero?) -> (codes, scale, zero)``: activations; dynamic
  formats choose scale/zero from ``x`` at run time, static ones take calibrated constants.
* ``finegrain::dequantize(codes, scale, zero, fmt, out_dtype)``.

The graph ops that are not number formats (the online Hadamard, the MoE grouped GEMM) live in
``compiler/ops.py``.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from finegrain.formats import scales
from finegrain.formats.base import QTensor, QuantFormat
from finegrain.formats.packing import unpack


@lru_cache(maxsize=256)
def _fmt(tag: str) -> QuantFormat:
    return QuantFormat.parse(tag)


def unpack_weight(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  fmt: QuantFormat, shape: list[int], scale2: torch.Tensor | None = None,
                  codebook: torch.Tensor | None = None) -> QTensor:
    codes = unpack(packed, fmt.bits, fmt.signed, shape[-1])
    if zero is None or zero.numel() == 0:
        z = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
    else:
        z = unpack(zero, fmt.family.metadata_bits(fmt), False, scale.shape[-1]).to(torch.int32)
    # 2-D blocks store one scale per block: expand_rows gives the per-row view every consumer reads
    return QTensor(codes.reshape(shape), fmt.expand_rows(scales.load_scale(fmt, scale, scale2), shape[-2]),
                   fmt.expand_rows(z, shape[-2]), scale2, codebook)


@torch.library.custom_op("finegrain::dequantize_packed", mutates_args=())
def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: str,
                      shape: list[int], out_dtype: torch.dtype, scale2: torch.Tensor | None = None,
                      codebook: torch.Tensor | None = None) -> torch.Tensor:
    f = _fmt(fmt)
    return f.dequantize(unpack_weight(packed, scale, zero, f, shape, scale2, codebook), out_dtype)


@dequantize_packed.register_fake
def _(packed, scale, zero, fmt, shape, out_dtype, scale2=None, codebook=None):
    return packed.new_empty(shape, dtype=out_dtype)


@torch.library.custom_op("finegrain::quantize", mutates_args=())
def quantize(x: torch.Tensor, fmt: str, scale: torch.Tensor | None = None,
             zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = _fmt(fmt).quantize(x, scale, zero)
    return q.codes, q.scale.clone(), q.zero.clone()  # custom ops may not return (views of) inputs


@quantize.register_fake
def _(x, fmt, scale=None, zero=None):
    f = _fmt(fmt)
    pshape = (1,) if f.granularity == "tensor" else (*x.shape[:-1], f.num_groups(x.shape[-1]))
    code_dtype = torch.int8 if f.signed else torch.uint8
    return (x.new_empty(x.shape, dtype=code_dtype), x.new_empty(pshape, dtype=torch.float32),
            x.new_empty(pshape, dtype=torch.int32))


@torch.library.custom_op("finegrain::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: str,
               out_dtype: torch.dtype) -> torch.Tensor:
    return _fmt(fmt).dequantize(QTensor(codes, scale, zero), out_dtype)


@dequantize.register_fake
def _(codes, scale, zero, fmt, out_dtype):
    return codes.new_empty(codes.shape, dtype=out_dtype)


DEQUANTIZE_PACKED = torch.ops.finegrain.dequantize_packed.default
QUANTIZE = torch.ops.finegrain.quantize.default
DEQUANTIZE = torch.ops.finegrain.dequantize.default
