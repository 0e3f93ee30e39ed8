"""KVTuner-style layer-wise KV-cache precision (issue #17): one (key format, value format) pair per
layer, chosen offline under an average-bits budget with the project's multiple-choice knapsack
(``compiler/knapsack.py``).

``kv_sensitivity`` compiles the model once with a KV cache whose every write is a
``finegrain::kv_append`` (the recipe fields ``kv_key_axis`` / ``kv_window`` / ``kv_sinks`` /
``kv_pre_rope`` say how), returns every attention output as an extra graph output, and then, for
each layer and candidate pair, quantizes *only that layer's* K / V (the others stay float by an
unreachable window) and measures, on calibration tokens, either the relative squared error of that
layer's attention output (``objective="attention"``, KVTuner's sensitivity: the attention-output
error, not the K / V error) or the increase of the model's next-token loss (``objective="loss"``:
what the quantized layer costs the output, including how later layers amplify or absorb it; the
same forwards, the logits instead of the attention outputs), or (``objective="gain"``) the attention-output
error times the layer's gain: the least-squares slope of the loss increase on the attention-output error over
that layer's pairs (both from the same forwards). One window's loss increases at 4 or 8 bits are mostly noise;
the slope is set by the pairs that cost something, so the ranking of a layer's pairs stays the attention
error's and the layers are weighed by what their error costs the loss.
``kv_allocate`` prunes each layer's pairs to its error / bits Pareto front (intra-layer pruning)
and solves the knapsack at an average of ``budget_bits`` bits per cached element (keys and values
together); the result is a recipe's ``kv_layers``. ``joint_allocate`` puts the layers' pairs (loss
objective) in one knapsack with a weight bit allocation's groups (Fisher sensitivity: both in nats),
costs in bytes: the stored weights plus the cache at a stated context (``driver.api.compile_joint``,
``finegrain pareto --kv --joint-context``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from finegrain.compiler.ir import KV
from finegrain.compiler.knapsack import Frontier
from finegrain.compiler.ops import KV_APPEND
from finegrain.errors import InputError
from finegrain.formats import QuantFormat

_FLOAT_WINDOW = 1 << 20  # a window (the most kv_window takes) no cache here reaches: nothing quantized


@dataclass
class Sensitivity:
    pairs: list[tuple[str, str]]  # candidate (key format, value format) tags
    errors: list[list[float]]  # [layer][pair]: attention-output relative squared error, or loss increase (nats)
    bits: list[int]  # per pair: key bits + value bits (element bits)


def _pair_bits(pair: tuple[str, str]) -> int:
    return QuantFormat.parse(pair[0]).bits + QuantFormat.parse(pair[1]).bits


OBJECTIVES = ("attention", "loss", "gain")


def kv_sensitivity(model, calibration: list[torch.Tensor], fields: dict, pairs: list[tuple[str, str]],
                   progress: bool = False, objective: str = "attention") -> Sensitivity:
    """Per layer and pair, the attention-output error (or, ``objective="loss"``, the next-token loss
    increase) with only that layer's cache quantized. ``fields``: the recipe's KV fields besides the
    formats (axis, window, sinks, pre-RoPE, rotate); ``calibration``: token id tensors ``[1, S]``."""
    if objective not in OBJECTIVES:
        raise InputError(f"kv_sensitivity: objective {objective!r} is not one of {OBJECTIVES}")
    from finegrain.compiler.capture import kv_inputs
    from finegrain.driver.api import compile as fg_compile
    from finegrain.passes.quantize_kv import attentions_reading

    if not pairs:
        raise InputError("kv_sensitivity: no candidate (key, value) pairs")
    top = max(pairs, key=_pair_bits)
    recipe = {"name": "kv-tune", "rules": [], **fields, "kv_key": top[0], "kv_value": top[1],
              "kv_window": _FLOAT_WINDOW}  # every write a kv_append, nothing quantized until a layer is probed
    cm = fg_compile(model, (calibration[0][:, :8],), recipe=recipe, progress=False, kv_cache=True)
    g = cm.gm.graph
    appends = {(n.meta[KV]["layer"], n.meta[KV]["kind"]): n for n in g.nodes if n.target is KV_APPEND}
    layers = cm.kv["layers"]
    if len(appends) != 2 * layers:
        raise InputError("kv_sensitivity: the recipe fields must quantize keys and values")
    attn = [attentions_reading(appends[(i, "key")])[0] for i in range(layers)]
    out = next(n for n in g.nodes if n.op == "output")
    n_out = len(out.args[0])
    out.args = (tuple(out.args[0]) + tuple(attn),)
    cm.gm.recompile()

    def run():
        """(mean next-token NLL over every calibration token (logits: output 0; 0.0 where the objective
        reads only the attention outputs: no cross-entropy over the vocabulary), attention outputs)."""
        with torch.inference_mode():
            outs = [cm.gm(*kv_inputs(cm.kv, ids)) for ids in calibration]
            if objective == "attention":
                return 0.0, [o[n_out:] for o in outs]
            nll = sum(float(torch.nn.functional.cross_entropy(o[0][0, :-1].float(), ids[0, 1:], reduction="sum"))
                      for o, ids in zip(outs, calibration))
            return nll / sum(ids.shape[1] - 1 for ids in calibration), [o[n_out:] for o in outs]

    def attention_error(got, ref, i: int) -> float:
        num = sum(float((o[i] - r[i]).pow(2).sum()) for o, r in zip(got, ref))
        return num / sum(float(r[i].pow(2).sum()) for r in ref)

    ref = run()
    window = fields.get("kv_window", 0)
    errors = []
    from tqdm.auto import tqdm

    for i in tqdm(range(layers), desc="KV sensitivity", disable=not progress, leave=False):
        att, loss = [], []
        for k, v in pairs:
            for kind, tag in (("key", k), ("value", v)):
                a = appends[(i, kind)]
                a.args = (a.args[0], a.args[1], tag, a.args[3], window, *a.args[5:])
            cm.gm.recompile()
            nll, outs = run()
            att.append(attention_error(outs, ref[1], i))
            loss.append(nll - ref[0])
        for kind in ("key", "value"):
            a = appends[(i, kind)]
            a.args = (*a.args[:4], _FLOAT_WINDOW, *a.args[5:])
        if objective == "gain":
            g = layer_gain(att, loss)
            errors.append([g * e for e in att])
        else:
            errors.append(loss if objective == "loss" else att)
    return Sensitivity(list(pairs), errors, [_pair_bits(p) for p in pairs])


def layer_gain(att: list[float], loss: list[float]) -> float:
    """The least-squares slope (through zero) of one layer's loss increases on its attention-output
    errors, floored at a thousandth of the mean ratio so that a layer whose loss the noise hides still
    ranks its pairs."""
    den = sum(e * e for e in att)
    if den <= 0:
        return 0.0
    slope = sum(e * d for e, d in zip(att, loss)) / den
    floor = 1e-3 * abs(sum(loss)) / max(sum(att), 1e-30)
    return max(slope, floor, 1e-12)


def pareto_pairs(errors: list[float], bits: list[int]) -> list[int]:
    """Indices of the pairs on one layer's error / bits Pareto front (no other pair has fewer or
    equal bits and a lower error)."""
    keep = []
    for j in sorted(range(len(bits)), key=lambda j: (bits[j], errors[j])):
        if not keep or errors[j] < errors[keep[-1]]:
            keep.append(j)
    return keep


def kv_allocate(sens: Sensitivity, budget_bits: float) -> tuple[list[list], dict]:
    """``kv_layers`` (``[layer, key tag, value tag]``) minimizing the summed attention-output error at
    an average of at most ``budget_bits`` bits per cached element, and a summary (average bits,
    predicted error, pairs kept per layer)."""
    fronts = [pareto_pairs(e, sens.bits) for e in sens.errors]
    costs = [[sens.bits[j] for j in f] for f in fronts]
    values = [[sens.errors[i][j] for j in f] for i, f in enumerate(fronts)]
    frontier = Frontier(costs, values)
    layers = len(fronts)
    budget = int(budget_bits * 2 * layers + 1e-9)
    point = frontier.best(budget)
    chosen = [fronts[i][p] for i, p in enumerate(point.picks)]
    kv_layers = [[i, *sens.pairs[j]] for i, j in enumerate(chosen)]
    return kv_layers, {"average_bits": point.cost / (2 * layers), "predicted_error": point.value,
                       "pairs_kept": [len(f) for f in fronts],
                       "frontier": [(p.cost / (2 * layers), p.value) for p in frontier.points()]}


@dataclass
class JointAllocation:
    """Weights and KV cache under one byte budget: a multiple-choice knapsack whose groups are the
    weight groups of a bit allocation (``passes/allocate_bits.py``; costs their stored bytes, values
    the predicted next-token loss increase, ``sensitivity="fisher"``) followed by one group per
    layer's cache (its (K, V) pairs on the layer's loss / bytes Pareto front; costs the bytes the
    layer's cache holds at ``context`` tokens, values the measured loss increase of
    :func:`kv_sensitivity` with ``objective="loss"``). Both values are nats per token, so a byte saved
    in weights and a byte saved in the cache are traded on one scale."""

    frontier: Frontier
    weight_groups: int
    fronts: list[list[int]]  # per layer: indices into ``pairs`` kept
    pairs: list[tuple[str, str]]
    pair_bytes: list[float]  # bytes per token of one layer's cache (all its KV heads, K and V) per pair
    context: int
    fixed_bytes: int  # stored bytes outside the allocated weights (the budget pays them first)

    @property
    def min_bytes(self) -> int:
        """The least total any budget may give (the cheapest choice at the solver's resolution)."""
        return self.fixed_bytes + self.frontier.min_units * self.frontier.unit

    @property
    def max_bytes(self) -> int:
        """The total of the least-loss choice (more bytes buy nothing)."""
        return self.fixed_bytes + sum(map(max, self.frontier.costs))

    def best(self, budget_bytes: int) -> tuple[tuple[int, ...], list[list], dict]:
        """(weight picks per group, ``kv_layers``, summary) of the least predicted loss whose weights +
        cache at ``context`` tokens fit ``budget_bytes``."""
        room = budget_bytes - self.fixed_bytes
        try:
            point = self.frontier.best(room)
        except ValueError:
            raise InputError(f"joint budget {budget_bytes} bytes: below the cheapest weights + KV cache "
                             f"({self.min_bytes} bytes at {self.context} tokens)") from None
        g = self.weight_groups
        chosen = [self.fronts[i][p] for i, p in enumerate(point.picks[g:])]
        kv_layers = [[i, *self.pairs[j]] for i, j in enumerate(chosen)]
        w_cost = sum(self.frontier.costs[i][p] for i, p in enumerate(point.picks[:g]))
        w_value = sum(self.frontier.values[i][p] for i, p in enumerate(point.picks[:g]))
        kv_cost = point.cost - w_cost
        return point.picks[:g], kv_layers, {
            "budget_bytes": budget_bytes, "context": self.context, "fixed_bytes": self.fixed_bytes,
            "weight_bytes": w_cost, "kv_bytes": kv_cost, "total_bytes": self.fixed_bytes + point.cost,
            "predicted_weights": w_value, "predicted_kv": point.value - w_value,
            "kv_average_bits": sum(_pair_bits(self.pairs[j]) for j in chosen) / (2 * len(chosen))}


def joint_allocate(weight_bytes: list[list[int]], weight_values: list[list[float]], sens: Sensitivity,
                   pair_bytes: list[float], context: int, fixed_bytes: int = 0) -> JointAllocation:
    """The :class:`JointAllocation` of a weight allocation's groups (``weight_bytes[g][i]``,
    ``weight_values[g][i]``) and the KV cache's layers (``sens``, loss objective; ``pair_bytes``:
    one layer's bytes per token for each of ``sens.pairs``) at ``context`` cached tokens."""
    if context < 1:
        raise InputError(f"joint allocation: context must be >= 1 token, got {context}")
    if len(pair_bytes) != len(sens.pairs):
        raise InputError(f"joint allocation: {len(pair_bytes)} byte counts for {len(sens.pairs)} pairs")
    costs_kv = [math.ceil(b * context) for b in pair_bytes]
    fronts = [pareto_pairs(e, costs_kv) for e in sens.errors]
    costs = [list(c) for c in weight_bytes] + [[costs_kv[j] for j in f] for f in fronts]
    values = [list(v) for v in weight_values] + [[sens.errors[i][j] for j in f] for i, f in enumerate(fronts)]
    return JointAllocation(Frontier(costs, values), len(weight_bytes), fronts, list(sens.pairs), list(pair_bytes),
                           context, fixed_bytes)
