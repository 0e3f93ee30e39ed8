"""Sensitivity of the model to quantizing one weight with one format (for bit allocation).

Three estimates, cheapest first:

* ``output``: ``tr(dW H dW^T)`` with ``H = E[x x^T]`` of the layer's calibration input from the
  stats store: the expected squared error added to the layer's output per token. Cheap (no
  forward passes), blind to what happens downstream of the layer.
* ``fisher``: ``1/2 sum F_ij dW_ij^2``, the second-order Taylor estimate of the increase in
  mean token NLL with the empirical Fisher diagonal ``F`` (squared gradients of the calibration
  loss; a sequence's gradient of the *mean* NLL over its T tokens is scaled by T to estimate the
  per-token Fisher, assuming token gradients are uncorrelated). In nats, so it predicts ΔNLL.
  Causal LMs only (the graph's output must be next-token logits for its first input).
* :func:`measured_delta_nll`: the real ΔNLL of quantizing one weight alone, on calibration
  batches (a forward pass per (weight, format)): used to validate the estimates on the most
  sensitive candidates, never inside the solver.

``dW`` is the RTN error of the candidate format (``fmt.fake_quantize``), whatever weight
algorithm the recipe runs afterwards.
"""
from __future__ import annotations

import contextlib

import torch
from torch.fx import GraphModule

from finegrain.compiler.ir import get_tensor, set_tensor
from finegrain.errors import InputError
from finegrain.formats import QuantFormat
from finegrain.compiler.ops import HADAMARD


def output_error(dw: torch.Tensor, hessian: torch.Tensor) -> float:
    return float((dw @ hessian * dw).sum())


def fisher_error(dw: torch.Tensor, fisher: torch.Tensor) -> float:
    return float(0.5 * (fisher * dw.pow(2)).sum())


def fisher_applies(gm: GraphModule) -> bool:
    """Whether 'fisher' can run: the graph maps token ids [B, T] to logits [B, T, V] over its
    embedding's vocabulary (from the exported shapes) and has no online Hadamard op (no autograd
    formula for it yet)."""
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    x, y = (ph[0].meta.get("val") if ph else None), getattr(out, "meta", {}).get("val")
    if x is None or y is None or x.dtype not in (torch.int64, torch.int32) or x.dim() != 2 or y.dim() != 3:
        return False
    vocab = {get_tensor(gm, n.args[0].target).shape[0] for n in gm.graph.nodes
             if n.op == "call_function" and n.target is torch.ops.aten.embedding.default and n.args[0].op == "get_attr"}
    if y.shape[-1] not in vocab:
        return False
    return not any(n.op == "call_function" and n.target is HADAMARD for n in gm.graph.nodes)


def _logits(gm: GraphModule, batch: tuple) -> torch.Tensor:
    out = gm(*batch)
    out = out[0] if isinstance(out, (tuple, list)) else out
    ids = batch[0]
    if out.dim() != 3 or out.shape[:2] != ids.shape or ids.dtype not in (torch.int64, torch.int32):
        raise InputError("sensitivity 'fisher' / measured ΔNLL need a causal LM: the graph's output must be "
                         f"logits [batch, seq, vocab] for its first input (token ids); got output {tuple(out.shape)}")
    return out


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@contextlib.contextmanager
def _swapped(gm: GraphModule, tensors: dict[str, torch.Tensor]):
    old = {t: get_tensor(gm, t) for t in tensors}
    try:
        for t, v in tensors.items():
            set_tensor(gm, t, v)
        yield
    finally:
        for t, v in old.items():
            set_tensor(gm, t, v)


def fisher_diagonal(gm: GraphModule, batches: list[tuple], targets: list[str], progress=lambda x, desc: x) -> dict[str, torch.Tensor]:
    """Per-token empirical Fisher diagonal of the mean NLL for each weight tensor in ``targets``."""
    if any(n.op == "call_function" and n.target is HADAMARD for n in gm.graph.nodes):
        raise InputError("sensitivity 'fisher' does not run through the online Hadamard op yet; use sensitivity 'output'")
    leaves = {t: get_tensor(gm, t).detach().clone().requires_grad_(True) for t in targets}
    acc = {t: torch.zeros_like(v) for t, v in leaves.items()}
    with _swapped(gm, leaves), torch.enable_grad():
        for batch in progress(batches, desc="fisher"):
            ids = batch[0]
            loss = _nll(_logits(gm, batch), ids)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for t, g in zip(leaves, grads):
                if g is not None:
                    acc[t] += g.pow(2) * (ids.shape[1] - 1)
    return {t: a / max(len(batches), 1) for t, a in acc.items()}


def mean_nll(gm: GraphModule, batches: list[tuple]) -> float:
    with torch.inference_mode():
        return sum(float(_nll(_logits(gm, b), b[0])) for b in batches) / len(batches)


def measured_delta_nll(gm: GraphModule, batches: list[tuple], weight_targets: list, fmt: QuantFormat,
                       base: float) -> float:
    """Mean NLL with ``weight_targets`` RTN-quantized to ``fmt`` (all else float) minus ``base``.
    A target is a weight's name, or ``(name, expert)`` for one expert of an ``[E, N, K]`` weight
    (``expert=None``: the whole tensor)."""
    swapped: dict[str, torch.Tensor] = {}
    for t in weight_targets:
        name, expert = (t, None) if isinstance(t, str) else t
        w = swapped.get(name, get_tensor(gm, name)).clone()
        if expert is None:
            w = fmt.fake_quantize(w.float()).to(w.dtype)
        else:
            w[expert] = fmt.fake_quantize(w[expert].float()).to(w.dtype)
        swapped[name] = w
    with _swapped(gm, swapped):
        return mean_nll(gm, batches) - base
