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
* ``finegrain::kv_append(past, new, fmt, axis, window, sinks)``: a quantized KV cache's write,
  ``cat(past, new)`` along the tokens (dim 2 of ``[B, H, T, d]``) with the tokens that *become
  quantizable at this call* quantized and dequantized in format ``fmt`` (a dynamic integer tag),
  every other token passed through: the past holds what earlier calls stored, so each token is
  quantized exactly once, whatever the chunking (prefill, decode, chunked prefill). ``axis``
  ``"head_dim"``: one token is a unit (its groups run along the head dim; values, KIVI); ``"tokens"``:
  a unit is ``G`` consecutive tokens (``fmt``'s group size) quantized per channel, statistics over
  those tokens (KIVI's keys). The first ``sinks`` tokens (attention sinks) are never quantized; a
  unit is quantized once ``window`` newer tokens follow it (KIVI's full-precision residual window:
  for ``"tokens"``, also the group must be full). With ``inv_freq`` (keys, ``recipe.kv_pre_rope``) the
  tokens are quantized *before* RoPE (KVQuant / RotateKV: pre-RoPE keys keep their outlier channels
  in place, so per-channel scales fit them): RoPE at the token's cache position is undone, the
  pre-RoPE key quantized, RoPE applied again, which is what storing pre-RoPE codes and rotating
  after dequantization computes; ``rotated``: the keys arrive Hadamard-rotated (``kv_rotate``), so
  the Hadamard is undone around the RoPE and the pre-RoPE key is rotated before quantization
  (RotateKV's order). Positions are cache indices (sessions start at position 0). With ``score``
  (ZipCache): tokens are released in blocks of ``block`` (after the window and sinks), and of the
  tokens one write releases the fraction ``ratio`` with the highest score is quantized in ``fmt``,
  the rest in ``fmt_low``, token-wise; ``channel_norm`` (keys): channel-separable token-wise
  quantization. Inserted by ``passes/quantize_kv.py``.
* ``finegrain::kv_saliency(q, past, new, probes, scale)``: ZipCache's normalized attention score of
  every cached token from a probe subset of this call's queries (the ``score`` of ``kv_append``).
"""
from __future__ import annotations

import math

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


def kv_quantized_until(t, axis: str, group: int, window: int, sinks: int, maximum=max):
    """How many tokens (from the first, sinks included) a cache of ``t`` tokens holds quantized or
    as sinks: whole units of ``group`` tokens (per-channel keys) or single tokens at least ``window``
    old. ``maximum``: ``max``, or a symbolic one (``tirx.max``) for a length known at run time."""
    n = maximum(t - window - sinks, 0)
    return sinks + (n // group * group if axis == "tokens" else n)


def kv_quantized_span(axis: str, group: int, past: int, total: int, window: int, sinks: int) -> tuple[int, int]:
    """Token range ``[a, b)`` of a ``[.., T, d]`` cache that a write growing it from ``past`` to
    ``total`` tokens quantizes (empty when ``a >= b``): the units whose last token is at least
    ``window`` tokens old now and was not before (see ``kv_append``)."""
    return (kv_quantized_until(past, axis, group, window, sinks),
            kv_quantized_until(total, axis, group, window, sinks))


def _rope(x: torch.Tensor, start: int, inv_freq: torch.Tensor, inverse: bool) -> torch.Tensor:
    """RoPE (``rotate_half`` convention, the first ``2 * len(inv_freq)`` channels) of tokens at
    positions ``start, start + 1, ..`` of ``x`` ``[B, H, T, d]``, or its inverse (the rotation by
    minus the angles). Angles in float64, so the two are inverse to float32 rounding."""
    half = inv_freq.shape[0]
    pos = torch.arange(start, start + x.shape[2], dtype=torch.float64, device=x.device)
    ang = pos[:, None] * inv_freq.to(x.device, torch.float64)[None, :]
    cos, sin = ang.cos().float(), ang.sin().float()
    if inverse:
        sin = -sin
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)


def _hadamard(x: torch.Tensor) -> torch.Tensor:
    return apply_hadamard(x, torch.ones(1, 1, device=x.device)).to(x.dtype)


def _group_factor(n: int, inverse: bool) -> torch.Tensor:
    from finegrain.formats.hadamard import hadamard_parts

    f = hadamard_parts(n)[0].float()
    return f.T.contiguous() if inverse else f


def _to_head_groups(seg: torch.Tensor, perm: torch.Tensor | None, g: int) -> torch.Tensor:
    """RotateKV's outlier-aware grouped-head rotation of keys ``seg`` ``[B, H, n, d]``: the channels of
    all heads (``H * d``, head-major) permuted by ``perm`` (outlier-aware reordering), then an
    orthonormal Hadamard over each group of ``g`` heads' channels: ``[B, H / g, n, g * d]`` (the layout
    a format's groups then run along)."""
    b, h, n, d = seg.shape
    if perm is not None and not torch.equal(torch.sort(perm.reshape(-1)).values, torch.arange(h * d, device=perm.device)):
        raise ValueError(f"kv_append: perm must be a permutation of the {h * d} key channels (got a tensor of "
                         f"{perm.numel()} values that is not)")
    if h % g:
        raise ValueError(f"kv_append: head_group {g} does not divide the {h} KV heads")
    x = seg.permute(0, 2, 1, 3).reshape(b, n, h * d)
    if perm is not None:
        x = x[..., perm]
    x = x.reshape(b, n, h // g, g * d).permute(0, 2, 1, 3)
    return apply_hadamard(x.float(), _group_factor(g * d, False))


def _from_head_groups(x: torch.Tensor, perm: torch.Tensor | None, h: int) -> torch.Tensor:
    """The inverse of :func:`_to_head_groups`: ``[B, H / g, n, g * d]`` -> ``[B, H, n, d]``."""
    b, hg, n, gd = x.shape
    d = gd * hg // h
    x = apply_hadamard(x, _group_factor(gd, True)).permute(0, 2, 1, 3).reshape(b, n, h * d)
    if perm is not None:
        x = x[..., torch.argsort(perm)]
    return x.reshape(b, n, h, d).permute(0, 2, 1, 3)


def _zip_fake_quantize(seg: torch.Tensor, score: torch.Tensor, fmt, low, ratio: float, block: int,
                       channel_norm: bool, per_channel: bool = False) -> torch.Tensor:
    """ZipCache's mixed precision on ``seg`` ``[B, H, n, d]`` (the blocks released by one write, ``n`` a
    multiple of ``block``): per (batch, head) the ``round(ratio * n)`` tokens of highest ``score`` in
    ``fmt``, the rest in ``low`` (both token-wise; ranked over the whole write as ZipCache ranks a
    prefill: measured better than a fixed share per block, which starves the early, most attended
    tokens); ``channel_norm``: channel-separable token-wise quantization (each channel divided by the
    square root of its absolute maximum over its block, stored in fp16, multiplied back after
    dequantization); ``per_channel`` (keys on the ``tokens`` axis: ZipCache's saliency on KIVI's
    keys): each channel quantized over the block's salient tokens in ``fmt`` and over the rest in
    ``low``, one (scale, zero) per channel, block and subset."""
    b, h, n, d = seg.shape
    x = seg.reshape(b, h, n // block, block, d)
    salient = zip_salient(score, ratio).reshape(b, h, n // block, block)
    if per_channel:  # each channel over the block's salient tokens in fmt, over the others in low
        xt = x.transpose(3, 4)  # [b, h, blocks, d, block]
        out = torch.empty_like(xt)
        for f, member in ((fmt, salient), (low, ~salient)):
            m, filled = zip_subset_rows(xt, member)
            out = torch.where(m, zip_block_format(f).fake_quantize(filled), out)
        return out.transpose(3, 4).reshape(b, h, n, d)
    c = None
    if channel_norm:
        c = zip_channel_norm(x).float().unsqueeze(3)
        x = x / c
    out = torch.where(salient.unsqueeze(-1), fmt.fake_quantize(x), low.fake_quantize(x))
    return (out * c if c is not None else out).reshape(b, h, n, d)


def klt_fake_quantize(seg: torch.Tensor, f, basis: torch.Tensor, mean: torch.Tensor,
                      widths: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys ``seg`` ``[B, H, n, d]`` (``n`` a multiple of ``f``'s group) through their
    Karhunen-Loeve code (``kv_key_klt``): ``y = (x - mean) @ basis`` per head (``basis`` ``[H, d, d]``
    orthonormal, ``mean`` ``[H, d]``), component ``c`` of head ``h`` quantized in ``f`` at
    ``widths[h, c]`` bits per channel over groups of ``f.group_size`` tokens (0: dropped, the mean
    kept), then ``x = y @ basis^T + mean``."""
    import dataclasses

    y = klt_forward(seg, basis, mean)
    out = torch.zeros_like(y)
    for b in sorted(set(widths.flatten().tolist()) - {0}):
        q = dataclasses.replace(f, bits=int(b)).fake_quantize(y)
        out = torch.where((widths == b)[None, :, :, None], q, out)
    return klt_back(out, basis, mean)


def klt_forward(seg: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Keys ``[B, H, n, d]`` to their Karhunen-Loeve components, channel-major ``[B, H, d, n]``."""
    return torch.einsum("bhnd,hde->bhen", seg - mean.to(seg.dtype)[None, :, None], basis.to(seg.dtype)).contiguous()


def klt_back(y: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Components ``[B, H, d, n]`` back to keys ``[B, H, n, d]`` (:func:`klt_forward`'s inverse)."""
    return torch.einsum("bhen,hde->bhnd", y, basis.to(y.dtype)) + mean.to(y.dtype)[None, :, None]


def zip_salient(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """ZipCache's salient tokens of one write: per (batch, head) the ``round(ratio * n)`` of highest
    ``score`` ``[B, H, n]`` (a bool mask of that shape)."""
    k = round(ratio * score.shape[-1])
    salient = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if k:
        salient.scatter_(-1, score.topk(k, dim=-1).indices, True)
    return salient


def zip_channel_norm(x: torch.Tensor) -> torch.Tensor:
    """The fp16 channel normalizer of blocks ``x`` ``[B, H, blocks, block, d]``: the square root of each
    channel's absolute maximum over its block, ``[B, H, blocks, d]``."""
    return x.abs().amax(dim=3).clamp_min(1e-6).sqrt().half()


def zip_subset_rows(xt: torch.Tensor, member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For channels over blocks ``xt`` ``[B, H, blocks, d, block]`` and a token subset ``member``
    ``[B, H, blocks, block]``: (the subset's mask, shaped as ``xt``; ``xt`` with the non-members
    replaced by a member of their block, so a per-row range over it is the subset's)."""
    m = member.unsqueeze(3).expand_as(xt)
    first = member.float().argmax(-1)[..., None, None].expand(*xt.shape[:-1], 1)
    return m, torch.where(m, xt, xt.gather(-1, first))


def zip_block_format(f):
    """``f`` with one group per row: a channel over a block's subset of tokens."""
    return f.per_row()


def kv_append_ref(past: torch.Tensor, new: torch.Tensor, fmt: str, axis: str, window: int, sinks: int,
              inv_freq: torch.Tensor | None = None, rotated: bool = False, score: torch.Tensor | None = None,
              fmt_low: str | None = None, ratio: float = 1.0, block: int = 1,
              channel_norm: bool = False, perm: torch.Tensor | None = None, head_group: int = 1,
              basis: torch.Tensor | None = None, mean: torch.Tensor | None = None,
              widths: torch.Tensor | None = None) -> torch.Tensor:
    """``cat(past, new)`` on the token axis with the tokens that become quantizable at this write
    quantized (``kv_quantized_span``: window, sinks, per-channel groups of tokens). ``inv_freq``: keys
    quantized before RoPE (``rotated``: they arrive per-head Hadamard-rotated, undone first);
    ``score`` ... ``channel_norm``: ZipCache; ``perm`` / ``head_group`` (pre-RoPE keys, head-dim
    formats): quantized in RotateKV's grouped-head rotated space (:func:`_to_head_groups`); ``basis`` /
    ``mean`` / ``widths`` (pre-RoPE keys per channel): coded in their calibrated Karhunen-Loeve basis
    (:func:`klt_fake_quantize`, in place of the per-head Hadamard when ``rotated``)."""
    from finegrain.formats import QuantFormat

    out = torch.cat([past, new], 2)
    f = QuantFormat.parse(fmt)
    if score is None:
        a, b = kv_quantized_span(axis, f.group_size or 1, past.shape[2], out.shape[2], window, sinks)
    else:  # ZipCache: token-wise, released in blocks of ``block`` tokens
        a, b = kv_quantized_span("tokens", block, past.shape[2], out.shape[2], window, sinks)
    if a < b:
        seg = out[:, :, a:b].float()
        grouped = inv_freq is not None and (perm is not None or head_group > 1)  # RotateKV's grouped space
        klt = inv_freq is not None and basis is not None  # the calibrated basis replaces the per-head Hadamard
        per_head = rotated and not grouped and not klt  # the per-head rotation applies to the pre-RoPE key quantized
        if inv_freq is not None:  # quantize the pre-RoPE keys (RoPE undone, applied again after dequantization)
            seg = _rope(_hadamard(seg) if rotated else seg, a, inv_freq, inverse=True)
            seg = _hadamard(seg) if per_head else seg
        if klt:
            seg = klt_fake_quantize(seg, f, basis, mean, widths)
        elif grouped:
            seg = _from_head_groups(f.fake_quantize(_to_head_groups(seg, perm, head_group)), perm, seg.shape[1])
        elif score is not None:
            seg = _zip_fake_quantize(seg, score[:, :, a:b], f, QuantFormat.parse(fmt_low), ratio, block, channel_norm,
                                     axis == "tokens")
        elif axis == "tokens":  # per channel: groups of G tokens along the (transposed) token axis
            seg = f.fake_quantize(seg.transpose(2, 3).contiguous()).transpose(2, 3)
        else:
            seg = f.fake_quantize(seg)
        if inv_freq is not None:
            seg = _rope(_hadamard(seg) if per_head else seg, a, inv_freq, inverse=False)
            seg = _hadamard(seg) if rotated else seg
        out[:, :, a:b] = seg.to(out.dtype)
    return out


kv_append = torch.library.custom_op("finegrain::kv_append", mutates_args=())(kv_append_ref)


@kv_append.register_fake
def _(past, new, fmt, axis, window, sinks, inv_freq=None, rotated=False, score=None, fmt_low=None, ratio=1.0, block=1,
      channel_norm=False, perm=None, head_group=1, basis=None, mean=None, widths=None):
    return torch.cat([past, new], 2)


def probe_counts(s, probes: float, ceil=lambda p, s: math.ceil(p * s), maximum=max, minimum=min) -> tuple:
    """``(n, recent, stride)`` of ZipCache's probe subset of ``s`` queries (:func:`probe_queries`):
    ``n = ceil(probes * s)`` of them (at least one), the ``recent = (n + 1) // 2`` most recent, the
    other ``n - recent`` at every ``stride``-th query from the first. Integer arithmetic only (besides
    the one ceiling), so a backend computes the same set for a length known at run time (``ceil(probes, s)``,
    ``maximum`` and ``minimum`` symbolic)."""
    n = minimum(s, maximum(1, ceil(probes, s)))
    recent = (n + 1) // 2
    return n, recent, maximum((s - recent) // maximum(n - recent, 1), 1)


def probe_queries(s: int, probes: float) -> torch.Tensor:
    """ZipCache's probe subset of ``s`` queries (indices, ascending): the ``n`` of :func:`probe_counts`,
    half the most recent, half spread evenly over the rest (deterministic, where ZipCache samples at
    random)."""
    n, recent, stride = probe_counts(s, probes)
    spread = torch.arange(n - recent, device="cpu") * stride  # made on the host: an index set from ints
    return torch.cat([spread, torch.arange(s - recent, s, device="cpu")])


def kv_saliency_ref(q: torch.Tensor, past: torch.Tensor, new: torch.Tensor, probes: float,
                scale: float) -> torch.Tensor:
    """ZipCache's normalized attention score of every cached token ``[B, Hkv, past + S]``: the causal
    attention probabilities of the probe queries (``q`` ``[B, H, S, d]`` at positions ``past ..``),
    summed over the probes and the query heads sharing the K / V head, divided by how many of them
    see the token (a token late in the sequence is seen by few queries: the plain sum underrates it)."""
    k = torch.cat([past, new], 2).float()
    b, h, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    idx = probe_queries(s, probes).to(q.device)
    qp = q[:, :, idx].float().reshape(b, hkv, h // hkv, len(idx), d)
    logits = torch.einsum("bgrnd,bgtd->bgrnt", qp, k) * scale
    sees = torch.arange(t, device=q.device)[None, :] <= (t - s + idx)[:, None]  # [n, T]
    att = torch.softmax(logits.masked_fill(~sees, float("-inf")), dim=-1)
    count = sees.sum(0).clamp_min(1) * (h // hkv)
    return att.sum(dim=(2, 3)) / count


kv_saliency = torch.library.custom_op("finegrain::kv_saliency", mutates_args=())(kv_saliency_ref)


@kv_saliency.register_fake
def _(q, past, new, probes, scale):
    return q.new_empty(past.shape[0], past.shape[1], past.shape[2] + new.shape[2])


KV_SALIENCY = torch.ops.finegrain.kv_saliency.default
HADAMARD = torch.ops.finegrain.hadamard.default
KV_APPEND = torch.ops.finegrain.kv_append.default
GROUPED_LINEAR = torch.ops.finegrain.grouped_linear.default
WEIGHT = torch.ops.finegrain.weight.default  # identity marking a recurrent layer's weight matrix (a quantizable op)
