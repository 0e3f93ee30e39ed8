"""Weight quantization algorithms, each working with any :class:`QuantFormat`.

* :func:`rtn`: round to nearest with the format's own parameter choice (range of each group).
* :func:`clip_search`: per group, the clip ratio r in ``linspace(1, clip_min, grid)`` minimizing
  the group's output error ``dW_g H_gg dW_g^T`` (``H = E[x x^T]`` of the layer's calibration
  input, its diagonal block for the group: AWQ's / FineQuant's clip search without running the
  layer) or its weight MSE. Also phase 1 of DGQ's two-phase search (``formats/scales.py`` does
  phase 2).
* :func:`gptq`: GPTQ (Frantar et al. 2022). Columns are quantized one at a time and the error
  of each is spread over the columns not yet quantized through the Cholesky factor of
  ``H^-1`` (``H`` damped by ``damp * mean(diag H)``; dead inputs, ``H_jj = 0``, get weight 0),
  with lazy batch updates of ``block`` columns. With ``act_order`` the columns go by decreasing
  ``H_jj``; group parameters are fixed before the sweep from the original weights (the "static
  groups" variant), so groups stay contiguous in the stored layout whatever the order, and any
  format (minifloat, two-level, BitMoD, codebook) works: the sweep only encodes single columns
  with known parameters (``QuantFormat.quantize_column``). Without ``act_order`` a ``refresh``
  function re-chooses each group's parameters when the sweep reaches it, from the weights the
  earlier columns' updates changed (GPTQ's original scheme; single-level group formats).

Hessians are ``E[x x^T]`` of each linear's input: for GPTQ with the recipe's ``sequential`` (default)
measured by ``passes/quantize_weights.py`` on the partly quantized model as it replays the
calibration batches (every linear upstream already quantized), else from the stats store
(``compiler/stats.py``), one calibration pass over the floating-point model.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import torch

from finegrain.errors import InputError
from finegrain.formats import QTensor, QuantFormat
from finegrain.formats.integer import IntFamily


def rtn(w: torch.Tensor, fmt: QuantFormat) -> QTensor:
    return fmt.quantize(w)


def _group_view(fmt: QuantFormat, k: int) -> tuple[int, int]:
    """(groups per row, group width) for the error bookkeeping; non-group formats are one group."""
    if fmt.granularity == "group":
        return fmt.num_groups(k), fmt.group_size
    return 1, k


def _padded(x: torch.Tensor, g: int, gs: int) -> torch.Tensor:
    """``[N, K]`` -> ``[N, g, gs]`` with zeros after the last column."""
    n, k = x.shape
    return torch.nn.functional.pad(x, (0, g * gs - k)).reshape(n, g, gs)


def clip_search(w: torch.Tensor, fmt: QuantFormat, hessian: torch.Tensor | None, grid: int = 20,
                clip_min: float = 0.5) -> tuple[QTensor, torch.Tensor]:
    """Best clip ratio per group (and the weight quantized with it). ``hessian=None`` minimizes
    the weight MSE. Returns (QTensor, ratios ``[N, G]`` or ``[1]`` for per-tensor formats)."""
    n, k = w.shape
    g, gs = _group_view(fmt, k)
    # two-level scales couple the groups (a tensor / channel scale over all of them): search the
    # group scales with plain fp32 ones, then let the format pick its second level for the chosen
    # ratios (DGQ's phase 1 then phase 2)
    search = dataclasses.replace(fmt, scale="fp32") if fmt.scale in ("e4m3", "int8") else fmt
    hb = None
    if hessian is not None:
        hp = torch.nn.functional.pad(hessian.float(), (0, g * gs - k, 0, g * gs - k))
        hb = torch.stack([hp[i * gs:(i + 1) * gs, i * gs:(i + 1) * gs] for i in range(g)])  # [g, gs, gs]
    best_err = best = None
    for r in torch.linspace(1.0, clip_min, grid).tolist():
        d = _padded(search.fake_quantize(w, clip=r) - w, g, gs)
        err = torch.einsum("ngi,gij,ngj->ng", d, hb, d) if hb is not None else d.pow(2).sum(-1)
        if fmt.granularity == "tensor":
            err = err.sum().reshape(1)
        ratio = torch.full(err.shape, r)
        if best_err is None:
            best_err, best = err, ratio
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, ratio, best)
    return fmt.quantize(w, clip=best), best


class GptqFactor(NamedTuple):
    """What GPTQ needs of a Hessian, whatever the weight: dead inputs, column order, and the upper
    Cholesky factor of the damped ``H^-1`` (permuted), computed once for linears sharing an input."""

    dead: torch.Tensor
    perm: torch.Tensor
    U: torch.Tensor


def gptq_factor(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = True,
                where: str = "weight") -> GptqFactor:
    """:class:`GptqFactor` of ``hessian`` (damping x10 per retry while it is numerically indefinite)."""
    k = hessian.shape[0]
    H = hessian.detach().clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(k)
    H = H[perm][:, perm]
    for attempt in range(4):
        Hd = H + damp * (10 ** attempt) * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype)
        # U with Hd^-1 = U^T U, without forming the inverse: with J the reversal of the columns,
        # J Hd J = L L^T gives Hd = (J L J)(J L J)^T with J L J upper, so U = (J L J)^-1 = J L^-1 J
        # (one Cholesky and one triangular solve, half the work of a Cholesky of the inverse)
        L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
        if int(info) == 0:
            Linv = torch.linalg.solve_triangular(L, torch.eye(k, dtype=L.dtype), upper=False)
            return GptqFactor(dead, perm, Linv.flip(0, 1).float())
    raise InputError(f"{where}: GPTQ could not factor the calibration Hessian even with damping "
                     f"{damp * 1000:g}; check the calibration data for this layer's input")


def gptq(w: torch.Tensor, fmt: QuantFormat, hessian: torch.Tensor, params: QTensor, *, damp: float = 0.01,
         block: int = 128, act_order: bool = True, where: str = "weight",
         refresh: Callable[[torch.Tensor], QTensor] | None = None, factor: GptqFactor | None = None) -> QTensor:
    """GPTQ with fixed group parameters ``params`` (from :func:`rtn` or :func:`clip_search` on
    ``w``). Returns the QTensor with GPTQ's codes and ``params``' scales.

    ``refresh`` (without ``act_order``, for single-level group formats): the parameters of each
    group are recomputed by ``refresh(current weights)`` when the sweep reaches the group, on the
    weights the earlier columns' error updates have already changed (GPTQ's original scheme;
    the returned scales are then those). ``factor``: :func:`gptq_factor` of ``hessian`` with the
    same ``damp`` / ``act_order`` when the caller has it (linears reading one input share it)."""
    n, k = w.shape
    if hessian.shape != (k, k):
        raise InputError(f"{where}: Hessian shape {tuple(hessian.shape)} does not match the weight's K={k}")
    dead, perm, U = factor if factor is not None else gptq_factor(hessian, damp, act_order, where)
    W = w.detach().clone().float()
    W[:, dead] = 0.0
    W = W[:, perm]
    codes = torch.empty_like(params.codes)
    perm_l = perm.tolist()
    dynamic = (refresh is not None and not act_order and fmt.granularity == "group" and params.scale2 is None
               and params.codebook is None)
    if dynamic:
        params = params._replace(scale=params.scale.clone(), zero=params.zero.clone())
    integer = not dynamic and isinstance(fmt.family, IntFamily)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        if integer:
            W[:, i2:] -= _integer_block(W[:, i1:i2], U[i1:i2, i1:i2], fmt, params, perm[i1:i2], codes) @ U[i1:i2, i2:]
            continue
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = perm_l[i1 + i]
            if dynamic and col % fmt.group_size == 0:  # a group starts: its parameters from the updated weights
                cur = W.clone()
                cur[:, i1:i2] = W1
                fresh, g = refresh(cur), col // fmt.group_size
                params.scale[:, g], params.zero[:, g] = fresh.scale[:, g], fresh.zero[:, g]
            c, qv = fmt.quantize_column(W1[:, i], params, col)
            codes[:, col] = c.to(codes.dtype)
            e = (W1[:, i] - qv) / U1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return QTensor(codes, params.scale, params.zero, params.scale2, params.codebook)


@torch.no_grad()  # the weight is detached; views of the block are updated in place
def _integer_block(W1: torch.Tensor, U1: torch.Tensor, fmt: QuantFormat, params: QTensor, cols: torch.Tensor,
                   codes: torch.Tensor) -> torch.Tensor:
    """One lazy block of :func:`gptq`'s sweep for integer elements with fixed parameters: the
    arithmetic of ``quantize_column`` (``IntFamily.codes`` / ``values``, which encode / decode use)
    and of the rank-1 updates, value for value,
    with fewer operations per column (the sweep is bound by their count, not by arithmetic): the
    columns' scales and zero points gathered once per block, the block transposed so that a column
    is a contiguous row. Writes the codes of original columns ``cols``; returns the scaled errors
    ``[N, len(cols)]`` for the update of the later columns."""
    n = W1.shape[0]
    if fmt.granularity == "tensor":
        S = params.scale.float().reshape(1, 1).expand(len(cols), n)
        Z = params.zero.float().reshape(1, 1).expand(len(cols), n)
    else:
        g = cols // fmt.group_size if fmt.granularity == "group" else torch.zeros_like(cols)
        S, Z = params.scale[:, g].float().T, params.zero[:, g].float().T
    family = fmt.family
    WT = W1.T.contiguous()
    Q, E = torch.empty_like(WT), torch.empty_like(WT)
    d = U1.diagonal().tolist()
    for i, (w, s, z, u) in enumerate(zip(WT.unbind(0), S.unbind(0), Z.unbind(0), U1.unbind(0))):
        q = Q[i] = family.codes(w, s, z, fmt)
        e = E[i] = (w - family.values(q, s, z)) / d[i]
        WT[i + 1:].sub_(torch.outer(u[i + 1:], e))
    codes[:, cols] = Q.T.to(codes.dtype)
    return E.T.contiguous()
