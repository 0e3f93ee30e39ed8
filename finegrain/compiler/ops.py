"""Graph ops that are not number formats, as ``torch.library`` custom ops (with fake kernels):

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
* ``finegrain::weight(w)``: the identity on a weight matrix ``[N, K]`` that an op other than a linear
  reads (an LSTM / GRU / RNN's ``weight_ih`` / ``weight_hh``, gates stacked along N). It makes that
  matrix a quantizable op (kind ``recurrent``): ``insert_qdq`` puts the dequantized weight in its
  place. Inserted by ``passes/canonicalize.py``.
"""
from __future__ import annotations

import torch

from finegrain.formats.hadamard import apply_hadamard


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


@torch.library.custom_op("finegrain::weight", mutates_args=())
def weight(w: torch.Tensor) -> torch.Tensor:
    return w.clone()


@weight.register_fake
def _(w):
    return torch.empty_like(w)


weight.register_autograd(lambda ctx, grad: grad)


HADAMARD = torch.ops.finegrain.hadamard.default
GROUPED_LINEAR = torch.ops.finegrain.grouped_linear.default
WEIGHT = torch.ops.finegrain.weight.default  # identity marking a recurrent layer's weight matrix (a quantizable op)
