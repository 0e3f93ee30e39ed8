"""The static KV cache of a TVM deployment (``cache="static"``, the default for KV-cache builds).

A KV-cache graph (``compile(kv_cache=True)``) concatenates each layer's past with the new keys /
values and returns the result, so running it as exported costs, per decode step and layer, a
new ``[B, Hkv, past + 1, d]`` tensor for K and one for V (allocated, the whole past copied in,
the previous one freed). Measured on SmolLM2 (``benchmarks/decode.py``, rows ``cache concat`` /
``cache static``) this made decode times swing with the allocator (first-visit page faults) and
cost a copy of the whole cache per step. A static build instead:

* the deployment holds, per layer, a preallocated ``[B, max_seq_len, Hkv, d]`` buffer for K and
  one for V, **token-major** so that the first ``P`` tokens are a contiguous prefix: each call
  takes zero-copy views ``[B, P, Hkv, d]`` of them as its past (:func:`to_static_cache` makes the
  graph's past inputs token-major, transposed inside the graph to the layout the model computes
  in);
* the graph returns only the new keys / values (``[B, S, Hkv, d]``, token-major) instead of the
  presents; the runtime writes them into the buffers at the cache position (``S`` rows per layer);
* where the fused attention kernel reads the cache (:func:`cache_parts` finds the concatenation
  of the past view and the new part), decode reads the cached keys / values in place and the new
  one beside them (``kernels/attention.cache_decode_attention_func``); prefill gathers them into
  the kernel's layout once. The concatenation and the transposes then have no reader and are
  removed, so decode touches each cached key and value once and allocates nothing per token.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from finegrain.compiler.ir import KV as KV_META  # the present keys / values' node meta
_TRANSPOSES = (torch.ops.aten.permute.default, torch.ops.aten.transpose.int)


def to_static_cache(gm: GraphModule) -> GraphModule:
    """Rewrite, in place, a prepared KV-cache graph (``lower.prepare`` output) for the static
    cache: each ``past_*`` placeholder becomes token-major ``[B, P, Hkv, d]`` (one transpose after
    it gives the ``[B, Hkv, P, d]`` its readers had), and each present output ``cat(past, new)``
    becomes ``new`` transposed to ``[B, S, Hkv, d]``. Returns ``gm``."""
    from finegrain.backends.tvm.lower_activations import TvmError

    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    pasts = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("past")]
    for ph in pasts:
        with graph.inserting_after(ph):
            t = graph.call_function(torch.ops.aten.transpose.int, (ph, 1, 2))
        ph.replace_all_uses_with(t, delete_user_cb=lambda u: u is not t)
    results = list(out.args[0])
    for i, n in enumerate(results):
        if not isinstance(n, torch.fx.Node) or KV_META not in n.meta:
            continue
        if n.target is not torch.ops.aten.cat.default or len(n.args[0]) != 2:
            raise TvmError(f"node {n.name}: the present of layer {n.meta[KV_META].get('layer')} is not cat(past, new); "
                           "build with cache='concat'")
        with graph.inserting_before(out):
            results[i] = graph.call_function(torch.ops.aten.transpose.int, (n.args[0][1], 1, 2))
    out.args = (tuple(results),)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def _placeholder_through_transpose(x):
    """The placeholder ``x`` transposes (dims 1, 2) after any one-input concatenations, else None."""
    while isinstance(x, torch.fx.Node) and x.target is torch.ops.aten.cat.default and len(x.args[0]) == 1:
        x = x.args[0][0]
    if not isinstance(x, torch.fx.Node) or x.target not in _TRANSPOSES:
        return None
    if x.target is torch.ops.aten.transpose.int:
        if sorted(d % 4 for d in x.args[1:3]) != [1, 2]:
            return None
    elif [d % 4 for d in x.args[1]] != [0, 2, 1, 3]:
        return None
    src = x.args[0]
    return src if isinstance(src, torch.fx.Node) and src.op == "placeholder" else None


def cache_parts(x):
    """``(past placeholder, new part)`` when ``x`` (an attention's K or V node in the exported
    program) is ``cat(transpose(past view), new)`` along the sequence, else None."""
    if not isinstance(x, torch.fx.Node) or x.target is not torch.ops.aten.cat.default or len(x.args[0]) != 2:
        return None
    dim = x.args[1] if len(x.args) > 1 else 0
    if dim not in (2, -2):
        return None
    past, new = x.args[0]
    ph = _placeholder_through_transpose(past)
    return (ph, new) if ph is not None else None
