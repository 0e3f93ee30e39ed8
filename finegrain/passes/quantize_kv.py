"""Quantize the KV cache on write (issue #17, first part), on a KV-cache graph
(``compile(kv_cache=True)``).

Each present key / value (the node marked with the ``kv`` role: ``cat(past, new)``) gets its new
part quantized and dequantized before the concatenation, so every token enters the cache once, in
the recipe's format, and the attention of this step and of every later step reads exactly those
values: the cache path (prefill in chunks, decode one token at a time) and a full-sequence
forward give the same numbers by construction. Formats (``recipe.kv_key``, ``recipe.kv_value``)
are dynamic integer or FP8 E4M3 formats over the head dimension: per token (``int8-token-sym-dyn``-like) or in
groups along it (``int4-g32-asym-fp16-dyn``: KIVI's value scheme); or static symmetric per-tensor
formats (``e4m3-tensor-sym-fp32``, preset ``kv8-fp8-static``: vLLM's FP8 cache), whose one scale per
layer and tensor is calibrated here (:func:`_static_qdq`: the largest |x| the calibration batches
write there, after the rotation when ``kv_rotate``) and stored as the constants
``kv_scale.<layer>.<key|value>`` (the compressed-tensors export writes them as ``k_scale`` / ``v_scale``).

KIVI's per-channel keys (``recipe.kv_key_axis="tokens"``: each channel over groups of G tokens), a
float residual window (``kv_window``), attention sinks (``kv_sinks``; with ``kv_sink_search`` found from
calibration: :func:`massive_positions`, RotateKV's attention-sink-aware quantization) and pre-RoPE keys
(``kv_pre_rope``: the RoPE ``inv_freq`` found among the keys' producers) replace the
concatenation by ``finegrain::kv_append(past, new, ...)`` (``compiler/ops.py``), which quantizes
the tokens that become quantizable at each write, so each token is still quantized exactly once;
the backends other than the reference refuse that op by name.

``recipe.kv_rotate`` rotates keys and values by the normalized Walsh-Hadamard matrix ``H`` over the
head dimension before they are quantized (RotateKV / QuaRot's K and V rotations, post-RoPE): the
query is rotated too (``(qH) . (kH) = q . k``) and the attention output is rotated back
(``(P V H) H = P V``; ``H`` is symmetric and its own inverse for power-of-two head dims), so
without quantization the graph computes exactly what it did. The key and query rotations are
online Hadamard ops (``compiler/ops.py``); the value rotation and its inverse on the attention
output are folded into ``v_proj`` / ``o_proj`` by ``passes/fold_kv_rotation.py`` where the graph
allows (``VALUE_ROTATED`` on the present), else online too. A head dim that is not a power of two
is reported and left unrotated.

ZipCache (``recipe.kv_zip_key`` / ``kv_zip_value``): the write is a ``kv_append`` with a
``finegrain::kv_saliency`` score (the normalized attention score of every cached token from a probe
subset of the layer's queries, wired in by :func:`_wire_saliency`); each block of ``kv_zip_block``
tokens is quantized once, the most salient ``kv_zip_ratio`` of each write in ``kv_key`` /
``kv_value``, the rest in the low format; keys channel-separable token-wise, or (``kv_key_axis:
tokens``) per channel over each block's salient / other tokens.

``recipe.kv_key_klt`` (with pre-RoPE keys per channel): each head's pre-RoPE keys coded in their
Karhunen-Loeve basis, calibrated here (:func:`klt_key_basis`: the eigenvectors of the key covariance
over the calibration batches, the mean subtracted; per-component widths 0 / 2-8 bits allocated by
:func:`klt_allocate` to the least squared error within the bytes the key format takes), constants
``kv_klt.<layer>.basis`` / ``.mean`` / ``.widths`` passed to ``kv_append``. Transform coding: the keys
are low-rank, so the first components take 4-8 bits and the last are dropped. Reference, ONNX Runtime
(arithmetic over an fp32 cache) and GPU (the reference op); TVM refuses it; the reference stores it packed
(``backends/kv_packed.KltKV``: one record per component width).

The reference backend's sessions store these presents packed (``backends/kv_packed.py``: codes
bit-packed, scales / zero points as stored, float windows and sinks fp32;
``report["kv_cache"]["bytes_per_token"]`` exactly for the per-token formats); TVM static builds
hold the writes that are not windowed packed too (``backends/tvm/lower_cache.py``: code words,
scales, zero points, a static format's code words alone; decode's attention reads them in place); ONNX
Runtime and GPU sessions store
fp32 holding the format's values;
``report["kv_cache"]`` states the bytes per token next to the fp32 cache's.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import operator

import torch
from torch.fx import GraphModule, Node

from finegrain.compiler.context import PassContext
from finegrain.compiler.ir import KV, MODULE, PASS_THROUGH, get_tensor
from finegrain.compiler.recipe import kv_static
from finegrain.compiler.regions import new_constant
from finegrain.compiler.ops import HADAMARD, KV_APPEND, KV_SALIENCY
from finegrain.errors import CaptureError, InputError
from finegrain.formats import QuantFormat
from finegrain.formats.ops import DEQUANTIZE, QUANTIZE

VALUE_ROTATED = "finegrain_kv_value_rotated"  # meta on a value present: fold_kv_rotation folded its Hadamard
BYTES_CONTEXT = 2048  # the context length the average bytes per token (float window and sinks included) is stated at
SDPA = torch.ops.aten.scaled_dot_product_attention.default
# the shared pass-through views plus what transformers' repeat_kv adds between a present and attention
_VIEWS = PASS_THROUGH | {torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default, torch.ops.aten.slice.Tensor}


def attentions_reading(present: Node) -> list[Node]:
    """The attention nodes reading ``present`` (as keys or values) through views / repeat_kv."""
    out, todo, seen = [], [present], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen or u.op != "call_function":
                continue
            seen.add(u)
            if u.target is SDPA and n in u.args[1:3]:
                out.append(u)
            elif u.target in _VIEWS and u.args[0] is n:
                todo.append(u)
    return out


def _qdq(graph, x: Node, fmt: QuantFormat) -> Node:
    q = graph.call_function(QUANTIZE, (x, fmt.tag))
    parts = tuple(graph.call_function(operator.getitem, (q, i)) for i in range(3))
    return graph.call_function(DEQUANTIZE, (*parts, fmt.tag, torch.float32))


def _scale_bytes(fmt: QuantFormat) -> int:
    return {"fp32": 4, "fp16": 2, "bf16": 2}.get(fmt.scale, 1)


def bytes_per_token(fmt: QuantFormat | None, head_dim: int, axis: str = "head_dim", window: int = 0,
                    sinks: int = 0, context: int | None = None, low: QuantFormat | None = None, ratio: float = 1.0,
                    block: int = 1, channel_norm: bool = False, widths: torch.Tensor | None = None) -> float:
    """Bytes one token's key (or value) of one head takes in ``fmt`` (codes, scales, zero points),
    on average over a cache of ``context`` tokens when ``window`` / ``sinks`` keep some in float
    (fp32: what the backends store). ``axis="tokens"``: per-channel parameters, one set per channel
    and group of ``G`` tokens, so ``head_dim / G`` of them per token; ``widths`` (``kv_key_klt``, ``[H,
    head_dim]``): each component at its own width (:func:`klt_cost`), averaged over the heads."""
    if fmt is None:
        return 4.0 * head_dim
    if low is not None:  # ZipCache: the salient fraction in fmt, the rest in low, a salient bit per token, the
        # channel normalizer (fp16, one per channel and block of keys); tokens wait in float for their block
        if axis == "tokens":  # per channel over each block's two subsets: a (scale, zero) per channel, block, subset
            quantized = head_dim * (ratio * fmt.bits + (1 - ratio) * low.bits) / 8 + 1 / 8 + sum(
                head_dim / block * (_scale_bytes(f) + (0 if f.symmetric else f.bits / 8)) for f in (fmt, low))
        else:
            quantized = (ratio * bytes_per_token(fmt, head_dim) + (1 - ratio) * bytes_per_token(low, head_dim) + 1 / 8
                         + (2 * head_dim / block if channel_norm else 0))
        if context is None:
            return quantized
        kept = min(context, window + sinks + block - 1)
        return (kept * 4.0 * head_dim + (context - kept) * quantized) / context
    scale = _scale_bytes(fmt)
    zero = 0 if fmt.symmetric else fmt.bits / 8
    if axis == "tokens" and widths is not None:
        quantized = sum(klt_cost(fmt, int(b)) for b in widths.flatten().tolist()) / 8 / max(widths.shape[0], 1)
    elif axis == "tokens":
        params = head_dim / fmt.group_size
        quantized = head_dim * fmt.bits / 8 + params * (scale + zero)
    elif kv_static(fmt):  # one calibrated scale per layer: the codes alone
        params, scale, zero = 0, 0, 0
        quantized = math.ceil(head_dim * fmt.bits / 8)
    else:  # as the reference backend stores it (backends/kv_packed.py): each token's codes and zero points
        params = fmt.num_groups(head_dim)  # bit-packed to whole bytes
        quantized = math.ceil(head_dim * fmt.bits / 8) + params * scale + math.ceil(params * zero)
    if not (window or sinks) or context is None:
        return quantized
    kept = min(context, window + sinks + (fmt.group_size - 1 if axis == "tokens" else 0))  # the most kept in float
    return (kept * 4.0 * head_dim + (context - kept) * quantized) / context


def token_bytes(r, fmt: QuantFormat | None, kind: str, head_dim: int, context: int | None = None,
                widths: torch.Tensor | None = None) -> float:
    """:func:`bytes_per_token` of one head's ``kind`` (``key`` / ``value``) in ``fmt`` as recipe ``r``
    writes it (axis, float window and sinks, ZipCache's low format), averaged over ``context``."""
    if fmt is None or not r.kv_windowed(kind):
        return bytes_per_token(fmt, head_dim)
    zipped = {}
    if r.kv_zip(kind):
        zipped = {"low": QuantFormat.parse(r.kv_zip_key if kind == "key" else r.kv_zip_value),
                  "ratio": r.kv_zip_ratio, "block": r.kv_zip_block, "channel_norm": kind == "key"}
    axis = r.kv_key_axis if kind == "key" else r.kv_value_axis
    return bytes_per_token(fmt, head_dim, axis, r.kv_window, r.kv_sinks, context, **zipped, widths=widths)


def _wire_saliency(gm: GraphModule, zips: dict, probes: float) -> None:
    """Give each ZipCache ``kv_append`` of a layer the normalized attention score of that layer's
    cache: one ``kv_saliency`` over the layer's (rotated, post-RoPE) queries and its keys' past / new."""
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    by_layer: dict[int, dict] = {}
    for n in g.nodes:
        if KV in n.meta and n.meta[KV]["layer"] in zips:
            by_layer.setdefault(n.meta[KV]["layer"], {})[n.meta[KV]["kind"]] = n
    for layer, kinds in sorted(by_layer.items()):
        key = kinds.get("key")
        atts = attentions_reading(key) if key is not None else []
        if not atts:
            raise CaptureError(f"layer {layer}: ZipCache needs the attention reading the layer's keys (its queries "
                               "rank the tokens); no scaled_dot_product_attention reads them")
        att = atts[0]
        q = att.args[0]
        if q.target is HADAMARD and order[q] > order[key]:  # the query rotation kv_rotate put before attention
            q.args[0].append(q)  # moved to right after the query it rotates
            order = {n: i for i, n in enumerate(g.nodes)}
        past, new = (key.args[0], key.args[1]) if key.target is KV_APPEND else (key.args[0][0], key.args[0][-1])
        appends = [n for n in (kinds.get("key"), kinds.get("value")) if n is not None and n.target is KV_APPEND
                   and len(n.args) > 8]
        first = min(appends, key=order.get)
        if order[q] > order[first]:
            raise CaptureError(f"layer {layer}: ZipCache's saliency needs the queries (node {q.name}) before the cache "
                               f"write (node {first.name})")
        scale = att.kwargs.get("scale") or 1 / math.sqrt(int(q.meta["val"].shape[-1]) if q.meta.get("val") is not None
                                                         else int(new.meta["val"].shape[-1]))
        with g.inserting_before(first):
            score = g.call_function(KV_SALIENCY, (q, past, new, float(probes), float(scale)))
        for m in appends:
            m.args = (*m.args[:8], score, *m.args[9:])
        order = {n: i for i, n in enumerate(g.nodes)}


def _rope_inv_freq(new: Node) -> tuple[Node | None, str]:
    """The ``inv_freq`` constant of the RoPE that produced the new keys ``new``: the one
    ``*inv_freq`` buffer among its producers, searched back to the projection (a linear) that made
    the keys, or (None, why)."""
    found, todo, seen = set(), [new], {new}
    while todo:
        n = todo.pop()
        if n.op == "get_attr" and str(n.target).endswith("inv_freq"):
            found.add(n)
        if n.op != "call_function" or n.target in (torch.ops.aten.linear.default, torch.ops.aten.mm.default,
                                                   torch.ops.aten.addmm.default):
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    if len(found) != 1:
        return None, (f"{len(found)} RoPE inv_freq constants reach the keys (need exactly one)" if found
                      else "no RoPE inv_freq constant reaches the keys (no rotary embedding found)")
    return found.pop(), ""


def _head_group_args(gm: GraphModule, where: str, val, fmt: QuantFormat, group: int, perm, log: list) -> dict:
    """kv_append's ``perm`` / ``head_group`` keywords for one layer's keys (RotateKV), checked."""
    h, d = (int(val.shape[1]), int(val.shape[-1])) if val is not None else (None, None)
    group = group or h  # 0: one group of all the layer's KV heads
    if h is None or h % group:
        raise InputError(f"{where}: kv_head_group {group} does not divide the {h} KV heads")
    if fmt.granularity == "group" and (group * d) % fmt.group_size:
        raise InputError(f"{where}: KV format {fmt.tag} groups of {fmt.group_size} do not divide the {group * d} "
                         f"channels of a head group")
    kw = {"head_group": group}
    if perm is not None:
        kw["perm"] = new_constant(gm, f"kv_reorder.{where.split()[1]}", perm.to(torch.int64))
    log.append({"pass": "quantize_kv", "site": where, "action": "rotated",
                "detail": f"pre-RoPE keys quantized after a Hadamard over groups of {group} heads ({group * d} "
                          f"channels){', channels reordered by calibration RMS' if perm is not None else ''}"})
    return kw


def _klt_args(gm: GraphModule, where: str, layer: int, klt: dict, inv_freq, log: list) -> dict:
    """kv_append's ``basis`` / ``mean`` / ``widths`` keywords for one layer's keys (``kv_key_klt``), or none
    (said in the log) where the pre-RoPE keys were not found or not calibrated."""
    if inv_freq is None or layer not in klt:
        log.append({"pass": "quantize_kv", "site": where, "action": "skipped",
                    "detail": "kv_key_klt: " + ("no RoPE found (the basis is one of pre-RoPE keys)" if inv_freq is None
                                                else "these keys were not reached by the calibration run")
                              + "; keys quantized per channel in the plain basis"})
        return {}
    basis, mean, widths, rel = klt[layer]
    log.append({"pass": "quantize_kv", "site": where, "action": "calibrated",
                "detail": f"pre-RoPE keys coded in their Karhunen-Loeve basis: widths per head "
                          f"{[sorted(w.tolist(), reverse=True) for w in widths]} bits; "
                          f"{int((widths == 0).sum())} of {widths.numel()} components dropped; calibration error "
                          f"{rel:.3g} of the key variance"})
    base = f"kv_klt.{layer}"
    return {"basis": new_constant(gm, base + ".basis", basis), "mean": new_constant(gm, base + ".mean", mean),
            "widths": new_constant(gm, base + ".widths", widths)}


def _pre_rope_keys(gm: GraphModule, batches: list, sites: dict, each) -> None:
    """Run ``gm`` once per calibration batch and call ``each(layer, k)`` with the new keys of ``sites``
    (layer -> (new-keys node, inv_freq tensor)), RoPE undone at their positions (from 0): ``k`` ``[B, H,
    T, d]``."""
    from finegrain.compiler.ops import _rope

    wanted = {new: layer for layer, (new, _) in sites.items()}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                layer = wanted[n]
                each(layer, _rope(out.detach().float(), 0, sites[layer][1], inverse=True))
            return out

    with torch.no_grad():
        for b in batches:
            Capture(gm).run(*b)


def _pre_rope_key_rms(gm: GraphModule, batches: list, sites: dict) -> dict:
    """Per layer, the RMS over the calibration tokens of each pre-RoPE key channel of all heads
    (``H * d``, head-major), from :func:`_pre_rope_keys`."""
    sums: dict[int, torch.Tensor] = {}

    def add(layer, k):
        sums[layer] = sums.get(layer, 0) + k.pow(2).sum(dim=(0, 2)).reshape(-1)  # [H * d]

    _pre_rope_keys(gm, batches, sites, add)
    count = sum(int(b[0].numel()) for b in batches)
    return {layer: (sq / max(count, 1)).sqrt() for layer, sq in sums.items()}


KLT_WIDTHS = (0, 2, 3, 4, 5, 6, 7, 8)  # the widths a Karhunen-Loeve key component may take (0: dropped)


def klt_cost(fmt: QuantFormat, bits: int) -> float:
    """Bits per element of a key component coded at ``bits`` in ``fmt``'s groups of tokens: the code,
    and per group a scale in ``fmt``'s stored dtype and a zero point at ``bits`` (as :func:`bytes_per_token`
    counts them); 0 bits: nothing stored."""
    return 0.0 if bits == 0 else bits + (8 * _scale_bytes(fmt) + bits) / fmt.group_size


def klt_allocate(y: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Widths of the components of ``y`` ``[B, d, n]`` (one head's calibration keys in its basis, ``n`` a
    multiple of ``fmt``'s group) minimizing their summed squared error (each width's error measured by
    coding ``y``) within the bits ``fmt`` takes at its own width (``d * klt_cost(fmt, fmt.bits)``), by
    greedy marginal return. Returns (widths ``[d]``, each component's error at its width ``[d]``)."""
    import dataclasses

    err = torch.stack([y.pow(2).mean(dim=(0, 2)) if b == 0 else
                       (dataclasses.replace(fmt, bits=b).fake_quantize(y) - y).pow(2).mean(dim=(0, 2))
                       for b in KLT_WIDTHS], 1)  # [d, widths]
    cost = torch.tensor([klt_cost(fmt, b) for b in KLT_WIDTHS], dtype=torch.float64)
    d = y.shape[1]
    budget, cur, spent = d * klt_cost(fmt, fmt.bits), torch.zeros(d, dtype=torch.long), 0.0
    while True:
        dc = cost[None, :] - cost[cur][:, None]  # [d, widths]: the bits each step up costs
        gain = (err[torch.arange(d), cur][:, None] - err).double() / dc.clamp_min(1e-9)
        gain[(dc <= 0) | (spent + dc > budget + 1e-9)] = -1.0
        best = int(gain.argmax())
        c, w = divmod(best, len(KLT_WIDTHS))
        if gain[c, w] <= 0:
            break
        spent += float(dc[c, w])
        cur[c] = w
    widths = torch.tensor([KLT_WIDTHS[i] for i in cur.tolist()], dtype=torch.int64)
    return widths, err[torch.arange(d), cur]


def klt_key_basis(gm: GraphModule, batches: list, sites: dict, fmt: QuantFormat, sinks: int) -> dict:
    """Per layer, the Karhunen-Loeve code of each head's pre-RoPE keys (``kv_key_klt``): ``(basis [H, d, d],
    mean [H, d], widths [H, d], relative error)`` from the new keys of ``sites`` (layer -> (new-keys node,
    inv_freq)) captured over the calibration batches, RoPE undone at their positions (from 0), the first
    ``sinks`` positions left out (kept in float). ``basis[h]``'s columns are the eigenvectors of head ``h``'s
    key covariance, largest first; ``widths`` from :func:`klt_allocate`. The keys as :func:`_pre_rope_keys`
    gives them."""
    keys: dict[int, list] = {}
    _pre_rope_keys(gm, batches, sites, lambda layer, k: keys.setdefault(layer, []).append(k[:, :, sinks:]))
    out = {}
    g = fmt.group_size
    for layer, ks in keys.items():
        ks = [k[:, :, : k.shape[2] // g * g] for k in ks if k.shape[2] >= g]
        if not ks:
            raise InputError(f"layer {layer} keys: kv_key_klt needs calibration sequences of at least {sinks + g} "
                             f"tokens (sinks + one group of {g})")
        x = torch.cat([k.transpose(1, 2).reshape(-1, k.shape[1], k.shape[-1]) for k in ks]).double()  # [N, H, d]
        mean = x.mean(0)
        xc = x - mean
        cov = torch.einsum("nhd,nhe->hde", xc, xc) / x.shape[0]
        ev, vec = torch.linalg.eigh(cov)
        basis = vec.flip(-1)  # [H, d, d], columns by decreasing variance
        widths, errs, total = [], 0.0, 0.0
        for h in range(x.shape[1]):
            y = torch.cat([torch.einsum("bnd,de->ben", k[:, h].double() - mean[h], basis[h]) for k in ks]).float()
            w, e = klt_allocate(y, fmt)
            widths.append(w)
            errs += float(e.sum())
            total += float(ev[h].sum())
        out[layer] = (basis.float(), mean.float(), torch.stack(widths), errs / max(total, 1e-30))
    return out


def _tapped(gm: GraphModule, nodes: list[Node], reduce) -> GraphModule:
    """A copy of ``gm``'s graph that returns ``reduce(graph, x)`` (nodes it adds after ``x``, the
    last one returned) for each of ``nodes``, what follows the last of them dropped; the constants
    are ``gm``'s, not copies."""
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    outs = []
    for x in nodes:
        with graph.inserting_after(by_name[x.name]):
            outs.append(reduce(graph, by_name[x.name]))
    next(n for n in graph.nodes if n.op == "output").args = (tuple(outs),)
    graph.eliminate_dead_code()
    return GraphModule(gm, graph)


def _absmax(gm: GraphModule, batches: list, nodes: list[Node]) -> dict[Node, float]:
    """The largest |x| of each of ``nodes`` over the calibration batches (``amax(|x|)`` tapped, run as
    generated code)."""
    def amax(graph, x):
        a = graph.call_function(torch.ops.aten.abs.default, (x,))
        with graph.inserting_after(a):
            return graph.call_function(torch.ops.aten.amax.default, (a,))

    inst = _tapped(gm, nodes, amax)
    hi = torch.zeros(len(nodes))
    with torch.inference_mode():
        for b in batches:
            hi = torch.maximum(hi, torch.stack([v.float() for v in inst(*b)]))
    return {x: float(h) for x, h in zip(nodes, hi)}


MASSIVE_RATIO = 20.0  # a token's residual RMS over the median token's beyond which it carries a massive activation


def massive_positions(gm: GraphModule, batches: list, search: int) -> dict:
    """Where the residual stream carries massive activations (Sun et al. 2024; RotateKV's attention sinks),
    from calibration: the residual stream (``compiler/regions.find_streams``: the embedding and every
    residual add after it; where no stream starts at the embedding, e.g. a LayerNorm follows it as in
    Bloom, the input of every norm instead) is captured per token as its RMS over the hidden dim
    (invariant under a residual rotation) and divided by the median token's RMS there; a token is *massive* where that ratio is at least
    ``MASSIVE_RATIO`` somewhere on the stream. Returns ``{"sinks": one past the last of the first
    ``search`` positions massive in at least half the batches (0: none), "positions": those positions, "ratio": the largest ratio at each of them,
    "site": the stream node where the largest was, "beyond": massive tokens at positions >= ``search``,
    "tokens": the tokens examined past ``search``, "batches": len(batches), "refusal": why nothing
    could be measured (no residual stream) or None}``."""
    from finegrain.compiler.regions import find_norms, find_streams, module_name

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    named = {}  # the embeddings and residual adds of every stream -> "module (node)"
    for s in find_streams(gm):
        for n in sorted(s.nodes, key=order.__getitem__):
            if n in s.sources or n.target is torch.ops.aten.add.Tensor:
                named[n] = f"{module_name(n)} ({n.name})"
    if not named:  # a stream that starts at a norm after the embedding (Bloom): what every norm reads
        for nm in sorted(find_norms(gm), key=lambda nm: order[nm.input]):
            named.setdefault(nm.input, f"{module_name(nm.input)} ({nm.input.name}, the input of {nm.name})")
    sites = list(named)
    out = {"sinks": 0, "positions": [], "ratio": [], "site": [], "beyond": 0, "tokens": 0, "batches": len(batches),
           "refusal": None}
    if not sites:
        out["refusal"] = ("no residual stream (an embedding and the adds after it) and no norm input was found in the "
                          "graph")
        return out

    def mean_square(graph, x):  # each token's mean square over the last (hidden) dim: [B, T]
        sq = graph.call_function(torch.ops.aten.mul.Tensor, (x, x))
        with graph.inserting_after(sq):
            return graph.call_function(torch.ops.aten.mean.dim, (sq, [-1]))

    inst = _tapped(gm, sites, mean_square)
    hits = torch.zeros(search, dtype=torch.long)
    best = torch.zeros(search)
    where = [""] * search
    with torch.inference_mode():
        for b in batches:
            ms = [v.float().sqrt().reshape(-1, v.shape[-1]) for v in inst(*b)]  # per site [B, T]
            ratios = torch.stack([m / m.median().clamp_min(1e-12) for m in ms])  # [sites, B, T]
            top, site = ratios.max(0)  # [B, T]
            n = min(search, top.shape[-1])
            hits[:n] += (top[:, :n] >= MASSIVE_RATIO).any(0).long()
            r, row = top[:, :n].max(0)  # the largest ratio at each searched position over the batch's rows
            for p in (r > best[:n]).nonzero().flatten().tolist():
                best[p], where[p] = float(r[p]), named[sites[int(site[row[p], p])]]
            out["beyond"] += int((top[:, n:] >= MASSIVE_RATIO).sum())
            out["tokens"] += int(top[:, n:].numel())
    found = [p for p in range(search) if hits[p] * 2 >= max(len(batches), 1) and hits[p] > 0]
    out.update(sinks=found[-1] + 1 if found else 0, positions=found, ratio=[round(float(best[p]), 1) for p in found],
               site=[where[p] for p in found])
    return out


def _find_sinks(gm: GraphModule, ctx: PassContext, log: list):
    """``ctx.recipe`` with ``kv_sinks`` from :func:`massive_positions` (``kv_sink_search``), the finding logged."""
    r = ctx.recipe
    where = f"attention sinks (kv_sink_search {r.kv_sink_search})"
    if not ctx.calibration:
        raise InputError(f"recipe {r.name!r}: kv_sink_search finds the attention sinks from calibration statistics; "
                         "give calibration data")
    m = massive_positions(gm, ctx.calibration, r.kv_sink_search)
    sinks = max(r.kv_sinks, m["sinks"])
    beyond = (f"; {m['beyond']} of {m['tokens']} calibration tokens past position {r.kv_sink_search - 1} are massive "
              "too (RotateKV's pivot tokens at run time are not kept: not built)" if m["beyond"] else "")
    if m["refusal"]:
        log.append({"pass": "quantize_kv", "site": where, "action": "skipped",
                    "detail": f"{m['refusal']}: kv_sinks stays {r.kv_sinks}"})
    elif m["positions"]:
        log.append({"pass": "quantize_kv", "site": where, "action": "calibrated",
                    "detail": f"massive activations at positions {m['positions']} (token RMS up to "
                              f"{', '.join(f'{x:g}' for x in m['ratio'])}x the median, at {', '.join(m['site'])}) in "
                              f"at least half of {m['batches']} calibration batch(es): kv_sinks {sinks}{beyond}"})
    else:
        log.append({"pass": "quantize_kv", "site": where, "action": "calibrated",
                    "detail": f"no massive activation (token RMS >= {MASSIVE_RATIO:g}x the median) among the first "
                              f"{r.kv_sink_search} positions in half of {m['batches']} calibration batch(es): kv_sinks "
                              f"stays {r.kv_sinks}{beyond}"})
    return dataclasses.replace(r, kv_sinks=sinks, kv_sink_search=0), m


def _static_qdq(gm: GraphModule, ctx: PassContext, sites: list, log: list) -> None:
    """Quantize each write of ``sites`` (present, written tensor, static format, where) with one
    scale per layer and tensor: the format's scale for the largest |x| the calibration batches
    write there (vLLM / llm-compressor's static FP8 cache: ``k_scale`` / ``v_scale``). The scales
    are constants ``kv_scale.<layer>.<key|value>``; they are calibrated on the float cache."""
    g = gm.graph
    if not ctx.calibration:
        raise InputError(f"{sites[0][3]}: the static KV format {sites[0][2].tag} takes its scale from calibration "
                         "data; give calibration data")
    g.lint()
    gm.recompile()
    hi = _absmax(gm, ctx.calibration, [x for _, x, _, _ in sites])
    for n, x, fmt, where in sites:
        q = fmt.quantize(torch.tensor([[-hi[x], hi[x]]], dtype=torch.float32))
        role = n.meta[KV]
        base = f"kv_scale.{role['layer']}.{role['kind']}"
        with g.inserting_before(n):
            scale = new_constant(gm, base, q.scale.reshape(1).float(), before=n)
            zero = new_constant(gm, base + "_zero", q.zero.reshape(1).to(torch.int32), before=n)
            qn = g.call_function(QUANTIZE, (x, fmt.tag, scale, zero))
            parts = tuple(g.call_function(operator.getitem, (qn, i)) for i in range(3))
            dq = g.call_function(DEQUANTIZE, (*parts, fmt.tag, torch.float32))
        dq.meta["val"] = x.meta.get("val")
        n.args = ([*n.args[0][:-1], dq], *n.args[1:])
        log.append({"pass": "quantize_kv", "site": where, "action": "calibrated",
                    "detail": f"static {fmt.tag}: scale {float(q.scale.reshape(-1)[0]):.6g} for |x| <= {hi[x]:.6g} "
                              f"over {len(ctx.calibration)} calibration batch(es)"})


def quantize_kv(gm: GraphModule, ctx: PassContext) -> GraphModule:
    r = ctx.recipe
    sink_found = None
    if r.kv_sink_search and (r.kv_key or r.kv_value or r.kv_layers) and any(KV in n.meta for n in gm.graph.nodes):
        r, sink_found = _find_sinks(gm, ctx, ctx.report.setdefault("folds", []))
    key_fmt = QuantFormat.parse(r.kv_key) if r.kv_key else None
    value_fmt = QuantFormat.parse(r.kv_value) if r.kv_value else None
    axes = {"key": r.kv_key_axis, "value": r.kv_value_axis}
    windowed = {kind: r.kv_windowed(kind) for kind in axes}
    pre_rope = 0
    per_layer = {e[0]: tuple(QuantFormat.parse(t) if t else None for t in e[1:]) for e in r.kv_layers}
    if key_fmt is None and value_fmt is None and not r.kv_rotate and not per_layer:
        return gm
    presents = [n for n in gm.graph.nodes if KV in n.meta]
    if not presents:
        raise InputError(f"recipe {r.name!r}: kv_key / kv_value / kv_rotate quantize the KV cache, which is in the "
                         "graph only when compiled with kv_cache=True (--kv-cache)")
    if per_layer and max(per_layer) >= len(presents) // 2:
        raise InputError(f"kv_layers: layer {max(per_layer)} does not exist (the model has {len(presents) // 2} layers)")
    log = ctx.report.setdefault("folds", [])
    g = gm.graph
    perms: dict[int, torch.Tensor] = {}
    klt: dict[int, tuple] = {}
    if (r.kv_reorder or r.kv_key_klt) and key_fmt is not None:  # from calibration statistics of the pre-RoPE keys
        sites = {}
        for n in presents:
            if n.meta[KV]["kind"] == "key" and n.target is torch.ops.aten.cat.default:
                inv, _ = _rope_inv_freq(n.args[0][-1])
                if inv is not None and inv.op == "get_attr":
                    sites[n.meta[KV]["layer"]] = (n.args[0][-1], get_tensor(gm, inv.target).detach().float())
        what = ("kv_reorder orders the key channels" if r.kv_reorder else
                "kv_key_klt codes the keys in a basis found and allocates its widths")
        if not ctx.calibration:
            raise InputError(f"recipe {r.name!r}: {what} by calibration statistics; give calibration data")
        if r.kv_reorder:
            rms = _pre_rope_key_rms(gm, ctx.calibration, sites)
            perms = {layer: torch.argsort(v, descending=True, stable=True) for layer, v in rms.items()}
        if r.kv_key_klt:
            klt = klt_key_basis(gm, ctx.calibration, sites, key_fmt, r.kv_sinks)
    factors: dict[int, Node] = {}
    zips: dict[int, dict] = {}  # layer -> {"key" / "value": True} (ZipCache appends, wired after the loop)
    rotated: set[Node] = set()  # the attentions reading a rotated cache
    q_rotated: set[Node] = set()  # ... whose query is rotated (for the keys)
    out_rotated: set[Node] = set()  # ... whose output is rotated back online (values not folded into v_proj / o_proj)
    head_dim = None
    static: list[tuple[Node, Node, QuantFormat, str]] = []  # (present, what it writes, static format, where)
    for n in presents:
        role = n.meta[KV]
        where = f"layer {role['layer']} {role['kind']}s (node {n.name})"
        if n.target is not torch.ops.aten.cat.default or len(n.args[0]) < 2:
            raise CaptureError(f"{where}: the present is not a concatenation of the past and the new tokens")
        new = n.args[0][-1]
        val = new.meta.get("val")
        d = int(val.shape[-1]) if val is not None else None
        head_dim = d
        fmt = key_fmt if role["kind"] == "key" else value_fmt
        if role["layer"] in per_layer:
            fmt = per_layer[role["layer"]][role["kind"] == "value"]
        if fmt is not None and axes[role["kind"]] == "tokens":
            if fmt.granularity != "group":
                raise InputError(f"{where}: kv_{role['kind']}_axis 'tokens' quantizes each channel over groups of G "
                                 f"tokens: the format needs a group size (e.g. int2-g32-asym-fp16-dyn), got {fmt.tag}")
        elif fmt is not None and fmt.granularity == "group" and (d is None or d % fmt.group_size):
            raise InputError(f"{where}: KV format {fmt.tag} groups of {fmt.group_size} do not divide the head dim {d}")
        x = new
        pow2 = d is not None and d & (d - 1) == 0
        rotate = r.kv_rotate and pow2 and bool(attentions_reading(n))
        if r.kv_rotate and not rotate:
            why = (f"head dim {d} is not a power of two" if not pow2 else
                   "no scaled_dot_product_attention reads this cache (an eager or ALiBi attention: the query and the "
                   "attention output cannot be rotated to match)")
            log.append({"pass": "quantize_kv", "site": where, "action": "skipped",
                        "detail": f"{why}: K / V left unrotated"})
        if rotate and d not in factors:
            factors[d] = new_constant(gm, f"kv_hadamard.factor_{d}", torch.ones(1, 1))
        folded = role["kind"] == "value" and n.meta.get(VALUE_ROTATED)  # v_proj writes them rotated already
        with g.inserting_before(n):
            if rotate and not folded:
                x = g.call_function(HADAMARD, (x, factors[d]))
                x.meta["val"], x.meta[MODULE] = val, new.meta.get(MODULE)
            if fmt is not None and windowed[role["kind"]]:
                if len(n.args[0]) != 2:
                    raise CaptureError(f"{where}: a windowed KV format needs the present as cat(past, new), got "
                                       f"{len(n.args[0])} parts")
                inv_freq = None
                if r.kv_pre_rope and role["kind"] == "key":
                    inv_freq, why = _rope_inv_freq(new)
                    if inv_freq is None:
                        log.append({"pass": "quantize_kv", "site": where, "action": "skipped",
                                    "detail": f"kv_pre_rope: {why}; keys quantized after RoPE"
                                              + ("; RotateKV's grouped-head rotation / channel reordering (of pre-RoPE "
                                                 "keys) not applied" if r.kv_head_group != 1 or r.kv_reorder else "")})
                    else:
                        pre_rope += 1
                zip_args = ()
                if r.kv_zip(role["kind"]):  # the score is wired in below, once the layer's queries are known
                    low = r.kv_zip_key if role["kind"] == "key" else r.kv_zip_value
                    zip_args = (None, low, float(r.kv_zip_ratio), r.kv_zip_block,
                                role["kind"] == "key" and axes["key"] != "tokens")
                    zips.setdefault(role["layer"], {})[role["kind"]] = True
                group_kw = {}
                if inv_freq is not None and role["kind"] == "key" and (r.kv_head_group != 1 or r.kv_reorder):
                    group_kw = _head_group_args(gm, where, val, fmt, r.kv_head_group, perms.get(role["layer"]), log)
                if r.kv_key_klt and role["kind"] == "key":
                    group_kw = _klt_args(gm, where, role["layer"], klt, inv_freq, log)
                m = g.call_function(KV_APPEND, (n.args[0][0], x, fmt.tag, axes[role["kind"]], r.kv_window, r.kv_sinks,
                                                inv_freq, bool(rotate and inv_freq is not None), *zip_args), group_kw)
                m.meta.update(n.meta)
            elif kv_static(fmt):  # its scale is calibrated below, on what this write sees (after the rotation)
                static.append((n, x, fmt, where))
            elif fmt is not None:
                x = _qdq(g, x, fmt)
                x.meta["val"] = val
        if fmt is not None and windowed[role["kind"]]:
            n.replace_all_uses_with(m)
            g.erase_node(n)
            n = m
        else:
            n.args = ([*n.args[0][:-1], x], *n.args[1:])
        if rotate:
            for att in attentions_reading(n):
                rotated.add(att)
                if role["kind"] == "key" and att not in q_rotated:  # (q H) . (k H) = q . k
                    q_rotated.add(att)
                    q = att.args[0]
                    with g.inserting_before(att):
                        hq = g.call_function(HADAMARD, (q, factors[d]))
                        hq.meta["val"] = q.meta.get("val")
                    att.args = (hq, *att.args[1:])
                if role["kind"] != "value" or folded or att in out_rotated:
                    continue
                out_rotated.add(att)  # (P v H) H = P v, before o_proj
                with g.inserting_after(att):
                    ho = g.call_function(HADAMARD, (att, factors[d]))
                    ho.meta["val"] = att.meta.get("val")
                att.replace_all_uses_with(ho, delete_user_cb=lambda u: u is not ho)
    if static:
        _static_qdq(gm, ctx, static, log)
    if zips:
        _wire_saliency(gm, zips, r.kv_zip_probes)
    layers = len(presents) // 2
    kv_heads = int(presents[0].meta["val"].shape[1]) if presents[0].meta.get("val") is not None else 0
    if head_dim:
        context = BYTES_CONTEXT

        def per_token(kind, at=None):  # summed over the layers (each layer's own format)
            total = 0.0
            for layer in range(layers):
                fmt = per_layer[layer][kind == "value"] if layer in per_layer else (key_fmt, value_fmt)[kind == "value"]
                w = klt[layer][2] if kind == "key" and layer in klt else None
                total += token_bytes(r, fmt, kind, head_dim, at, w)
            return kv_heads * total
        ctx.report["kv_cache"] = {
            "key": key_fmt.tag if key_fmt else None, "value": value_fmt.tag if value_fmt else None,
            "layers": [[e[0], e[1], e[2]] for e in r.kv_layers],
            "key_klt": ({str(layer): v[2].tolist() for layer, v in sorted(klt.items())} if klt else None),
            "key_axis": r.kv_key_axis, "pre_rope": pre_rope > 0, "value_axis": r.kv_value_axis,
            "window": r.kv_window, "sinks": r.kv_sinks,
            "sinks_found": ({k: sink_found[k] for k in ("positions", "ratio", "beyond", "tokens", "batches")}
                            if sink_found else None), "rotate": bool(r.kv_rotate and rotated),
            "bytes_per_token": round(per_token("key") + per_token("value"), 1),
            "bytes_per_token_at_context": round(per_token("key", context) + per_token("value", context), 1),
            "context": context,
            "fp32_bytes_per_token": layers * kv_heads * 8 * head_dim,
            "zip": ({"key": r.kv_zip_key, "value": r.kv_zip_value, "ratio": r.kv_zip_ratio, "block": r.kv_zip_block,
                     "probes": r.kv_zip_probes} if zips else None),
            "storage": ("packed by the reference backend (backends/kv_packed.py: codes bit-packed, scales and zero "
                        "points as stored, float windows / sinks fp32) and by TVM static builds (code words, scales, "
                        "zero points; a static format's code words alone; KIVI's, RotateKV's grouped-head and "
                        "ZipCache's windowed integer writes with their float tokens in a ring, ZipCache's low-bit "
                        "tokens in fields of the high format's width, its channel-normalized token-wise keys fp32); "
                        "fp32 holding the format's values in "
                        "ONNX Runtime (static INT8 per tensor: GroupQueryAttention's INT8 cache) / GPU sessions")}
    log.append({"pass": "quantize_kv", "site": f"{len(presents)} presents", "action": "quantized", "sites": len(presents),
                "detail": f"keys {key_fmt.tag if key_fmt else 'float'}, values {value_fmt.tag if value_fmt else 'float'}"
                          f"{f', ZipCache low formats {r.kv_zip_key} / {r.kv_zip_value}' if zips else ''}"
                          f"{', Hadamard-rotated (q and the attention output rotated to match)' if rotated else ''}"})
    g.lint()
    gm.recompile()
    return gm
