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
* ``finegrain::hadamard(x, factor)``: the online rotation x @ (F (x) H_{2^k}) / sqrt(n) over the
  last dim (``formats/hadamard.py``), O(n log n) in the power-of-two part; ``factor`` is the
  small dense F (a 1 x 1 one for powers of two). Inserted by ``passes/fold_rotation.py``.
* ``finegrain::grouped_linear(x, weight, offsets)``: a mixture-of-experts grouped GEMM. ``x``
  ``[S, K]`` holds the rows routed to each expert, sorted by expert; ``offsets`` ``[E]`` are the
  cumulative row counts (expert ``e`` owns rows ``offsets[e-1]:offsets[e]``); ``weight`` is
  ``[E, N, K]`` (each expert a linear's ``[N, K]``); out ``[S, N]``. ``passes/canonicalize.py``
  rewrites the grouped matmuls ``transformers`` exports (``transformers::grouped_mm_fallback``,
  ``aten._grouped_mm`` on a transposed ``[E, N, K]`` constant) into it, so expert weights are
  quantizable like linears and artifacts do not need ``transformers`` to load. Differentiable.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from finegrain.formats import scales
from finegrain.formats.base import QTensor, QuantFormat
from finegrain.formats.hadamard import apply_hadamard
from finegrain.formats.packing import unpack


@lru_cache(maxsize=256)
def _fmt(tag: str) -> QuantFormat:
    return QuantFormat.parse(tag)


def unpack_weight(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  fmt: QuantFormat, shape: list[int], scale2: torch.Tensor | None = None,
                  codebook: torch.Tensor | None = None) -> QTensor:
    codes = unpack(packed, fmt.bits, fmt.signed, shape[-1])
    if zero is None or zero.numel() == 0:
        z = torch.zeros(scale.shape, dtype=torch.int32)
    else:
        z = unpack(zero, fmt.family.metadata_bits(fmt), False, scale.shape[-1]).to(torch.int32)
    return QTensor(codes.reshape(shape), scales.load_scale(fmt, scale, scale2), z, scale2, codebook)


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


@torch.library.custom_op("finegrain::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return apply_hadamard(x, factor).to(x.dtype)


@hadamard.register_fake
def _(x, factor):
    return torch.empty_like(x)


def _grouped(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], weight.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ weight[e].T.to(x.dtype)
        start = end
    return out


@torch.library.custom_op("finegrain::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 3 or x.dim() != 2 or offsets.dim() != 1 or offsets.shape[0] != weight.shape[0]:
        raise ValueError(f"grouped_linear: x [S, K], weight [E, N, K], offsets [E] expected; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(offsets.shape)}")
    return _grouped(x, weight, offsets)


@grouped_linear.register_fake
def _(x, weight, offsets):
    return x.new_empty(x.shape[0], weight.shape[1])


def _grouped_linear_bwd(ctx, grad):
    x, weight = ctx.saved_tensors
    gx = gw = None
    if ctx.needs_input_grad[0]:
        gx = _grouped(grad, weight.transpose(1, 2), ctx.offsets).to(x.dtype)
    if ctx.needs_input_grad[1]:
        gw = torch.zeros_like(weight)
        start = 0
        for e, end in enumerate(ctx.offsets.tolist()):
            if end > start:
                gw[e] = (grad[start:end].T @ x[start:end]).to(weight.dtype)
            start = end
    return gx, gw, None


def _grouped_linear_setup(ctx, inputs, output):
    x, weight, offsets = inputs
    ctx.save_for_backward(x, weight)
    ctx.offsets = offsets


grouped_linear.register_autograd(_grouped_linear_bwd, setup_context=_grouped_linear_setup)

DEQUANTIZE_PACKED = torch.ops.finegrain.dequantize_packed.default
QUANTIZE = torch.ops.finegrain.quantize.default
DEQUANTIZE = torch.ops.finegrain.dequantize.default
HADAMARD = torch.ops.finegrain.hadamard.default
GROUPED_LINEAR = torch.ops.finegrain.grouped_linear.default
