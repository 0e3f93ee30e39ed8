"""``aten.scaled_dot_product_attention`` -> one ``call_tir`` to ``kernels/attention.py``.

Relax's own lowering of the decomposed op (matmul, additive mask, safe softmax, matmul) ran the
softmax scalar over ``seq x seq`` with symbolic shapes. Where every attention of the exported
program fits the kernel (:func:`fits`: fp32 ``[B, H, S, d]`` with ``d`` a multiple of 8, K / V heads
dividing H, no dropout, a bool or float mask whose leading dims are 1, or ``is_causal`` without a
mask), the export keeps the op whole (:func:`keep_undecomposed`) and
:func:`converter` emits: K transposed to ``[B, Hkv, d, T32]`` (T keys padded to whole 32-key
blocks; T = past + S over a KV cache), the mask as an additive fp32 ``bias[S, T32]`` (0 / -inf,
-inf in the padding; built once per mask and shared by every layer that reads it), and the kernel
call; with one query (decode) the kernel reads K untransposed instead
(``decode_attention_func``); over a static cache decode reads the cache buffers in place
(``cache_decode_attention_func``; a packed cache's codes: ``packed_decode_attention_func``; KIVI's packed
window, codes and ring after the step's commit: ``window_cache.decode_attention_func``, RotateKV's
grouped-head keys ``window_cache.grouped_decode_attention_func``, for the attentions
``window_cache.mark_fused_decode`` marked; these split the past into chunks
processed in parallel, ``attention._split_decode``). :func:`share_kv_heads` first undoes transformers' ``repeat_kv`` so
the kernel reads each grouped K / V head once. Otherwise the decomposition and Relax's lowering
stay, unchanged.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _val(x):
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else None


def fits(node: torch.fx.Node) -> str | None:
    """None when the kernel computes ``node`` exactly as torch does, else the reason it does not."""
    q, k, v = (_val(a) for a in node.args[:3])
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    if any(t is None or t.dtype != torch.float32 or t.dim() != 4 for t in (q, k, v)):
        return "q / k / v are not fp32 [B, H, S, d]"
    d = q.shape[-1]
    if not isinstance(d, int) or d % 8 or k.shape[-1] != d or v.shape[-1] != d or not isinstance(q.shape[0], int):
        return f"head dim {d} is not a static multiple of 8 (or the batch is symbolic)"
    if not isinstance(q.shape[1], int) or not isinstance(k.shape[1], int) or q.shape[1] % k.shape[1]:
        return "query heads are not a multiple of the K / V heads"
    if dropout:
        return "dropout"
    if mask is not None:
        m = _val(mask)
        if causal or m is None or m.dtype not in (torch.bool, torch.float32) or m.dim() < 2:
            return "a mask that is not one bool / fp32 [.., S, T] tensor"
        if any(not isinstance(s, int) or s != 1 for s in m.shape[:-2]):
            return "a mask with batch or head dims"
    return None


def keep_undecomposed(ep, table) -> tuple:
    """``(ep, kept)`` for ``ep`` exported with SDPA kept whole: when every attention fits the kernel,
    ``ep`` and True; otherwise ``ep`` decomposed by ``table`` (SDPA included: one more trace, the
    other ops are already decomposed) and False."""
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is SDPA]
    if nodes and all(fits(n) is None for n in nodes):
        return ep, True
    return (ep.run_decompositions(table) if nodes else ep), False


def _repeated_heads(x):
    """``x`` when it is transformers' ``repeat_kv`` of a K / V tensor (``view(clone(expand(
    unsqueeze(kv, 2))))`` to ``[B, Hkv * n, S, d]``), else None."""
    ops = torch.ops.aten
    chain = []
    for want in (ops.view.default, ops.clone.default, ops.expand.default, ops.unsqueeze.default):
        if not isinstance(x, torch.fx.Node) or x.target is not want or len(x.users) != 1:
            return None
        chain.append(x)
        x = x.args[0]
    if chain[-1].args[1] != 2 or not isinstance(x, torch.fx.Node) or _val(x) is None or _val(x).dim() != 4:
        return None
    return x


def share_kv_heads(ep) -> int:
    """Each kept attention whose K / V are repeated per query head (``repeat_kv``: what transformers
    does when a mask is given) reads the grouped K / V instead (the kernel maps query head ``h`` to
    K / V head ``h // (H / Hkv)`` itself): the per-head copies, ``H / Hkv`` times the cache per layer
    and step, are not made. Returns how many attentions changed."""
    changed = 0
    for n in ep.graph.nodes:
        if n.op != "call_function" or n.target is not SDPA:
            continue
        k, v = (_repeated_heads(a) for a in n.args[1:3])
        q = _val(n.args[0])
        if k is None or v is None or q.shape[1] % _val(k).shape[1]:
            continue
        n.args = (n.args[0], k, v, *n.args[3:])
        changed += 1
    if changed:
        ep.graph.eliminate_dead_code()
        ep.graph_module.recompile()
    return changed


def converter(prefix: str, max_seq_len: int, shared: dict | None = None):
    """The Relax converter of a kept attention. ``shared``: what ``lower_window.relax_converters``
    recorded for the packed windows (``window_cache.mark_fused_decode``), whose decode step this
    converter reads in place."""
    from tvm import relax, te, tirx

    from finegrain.backends.tvm.kernels.attention import (KEY_BLOCK, attention_func, cache_decode_attention_func,
                                                          decode_attention_func, packed_decode_attention_func)
    from finegrain.backends.tvm.lower_cache import KV_DECODE, cache_parts, kv_layout
    from finegrain.backends.tvm.window_cache import FUSED
    from finegrain.backends.tvm.window_cache import decode_attention_func as window_attention_func
    from finegrain.backends.tvm.window_cache import grouped_decode_attention_func as grouped_attention_func

    shared = {} if shared is None else shared

    funcs: dict = {}
    biases: list = []  # (mask value or None, causal, bias)

    def bias_for(bb, mask, causal: bool, s, t, t32):
        # the bias and K-transpose functions are opaque (op_pattern 8): fused with the mask's own
        # arange / compare ops, two functions taking the same symbolic lengths made FuseTIR define
        # a variable twice (SmolLM2's prefill over a cache)
        for prev, c, out in biases:
            if c == causal and ((prev is None and mask is None) or (prev is not None and mask is not None
                                                                    and prev.same_as(mask))):
                return out
        inf = tirx.const(-math.inf, "float32")
        zero = tirx.const(0.0, "float32")
        if mask is None:  # torch's is_causal is top-left aligned (key j <= query i) also when S != T
            def fn():
                return te.compute((s, t32), lambda i, j: te.if_then_else(
                    j < (tirx.min(i + 1, t) if causal else t), zero, inf), name="attention_bias")
            out = bb.emit_te(fn, primfunc_name_hint=f"{prefix}attention_bias",
                             primfunc_attrs={"op_pattern": 8})
        else:
            nd = len(mask.ty.shape)
            boolean = mask.ty.dtype == "bool"

            def fn(m):
                def body(i, j):
                    val = m(*([0] * (nd - 2)), i, j)
                    return te.if_then_else(j < t, te.if_then_else(val, zero, inf) if boolean else val, inf)
                return te.compute((s, t32), body, name="attention_bias")
            out = bb.emit_te(fn, mask, primfunc_name_hint=f"{prefix}attention_bias",
                             primfunc_attrs={"op_pattern": 8})
        biases.append((mask, causal, out))
        return out

    def convert(node, importer):
        bb = importer.block_builder
        args = importer.retrieve_args(node)
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else None
        causal = bool(args[5]) if len(args) > 5 else bool(node.kwargs.get("is_causal", False))
        b, h, s, d = q.ty.shape
        hk, t = k.ty.shape[1], k.ty.shape[2]
        scale = node.kwargs.get("scale")
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(int(d))
        t32 = tirx.floordiv(t + KEY_BLOCK - 1, KEY_BLOCK) * KEY_BLOCK
        bias = bias_for(bb, mask, causal, s, t, t32)
        longest = int(t) if isinstance(t, tirx.IntImm) else max_seq_len
        tag = "" if scale == 1.0 / math.sqrt(int(d)) else f"_scale{len(funcs)}"
        one = isinstance(s, tirx.IntImm) and int(s) == 1  # one query per head: K read in the cache's layout
        # a static cache (lower_cache.py): K / V = cat(transposed view of the cache, new part)
        kc, vc = cache_parts(node.args[1]), cache_parts(node.args[2])
        parts = None if kc is None or vc is None else [importer.env[x] for x in (*kc, *vc)]
        packed = parts and kc[0].target is KV_DECODE and vc[0].target is KV_DECODE
        fused = node.meta.get(FUSED)
        if one and fused:  # a packed window (window_cache.py): codes and ring read in place after the commit
            ks, vs = (shared[name] for name in fused)
            lays = [ks["layout"], vs["layout"]]
            key = (f"{prefix}attention_wpack_b{int(b)}_h{int(h)}_kv{int(hk)}_d{int(d)}_s{longest}{tag}_"
                   f"r{ks['rope_half']}{int(ks['rotated'])}_"
                   + "_".join(f"{x['bits']}{x['axis'][0]}{x['unit']}g{x['group']}w{x['window']}s{x['sinks']}"
                              f"{x['scale']}c{x['cols']}z{x['zcols']}" for x in lays))
            grouped = ks.get("grouped")  # RotateKV's grouped heads: the channel order and the Hadamard's factor
            if grouped is not None:
                m = int(grouped[1].ty.shape[0])
                key += f"_grouped{lays[0]['head_group']}_m{m}"
            if key not in funcs:
                func = (window_attention_func(int(b), int(h), int(hk), int(d), longest, scale, *lays, ks["rope_half"],
                                              ks["rotated"]) if grouped is None else
                        grouped_attention_func(int(b), int(h), int(hk), int(d), longest, scale, *lays, ks["rope_half"],
                                               ks["rotated"], m))
                funcs[key] = bb.add_func(func.with_attrs({"op_pattern": 8, "global_symbol": key}), key)
            ins = [q, *ks["buffers"], importer.env[kc[1]], *ks["span"], *vs["buffers"], importer.env[vc[1]], bias,
                   ks["table"], *(grouped or [])]
            return bb.emit(relax.call_tir(funcs[key], ins, relax.TensorType([b, h, s, d], "float32")))
        if one and packed:  # codes read in place: the decode of the whole past is left without a reader
            lays = [kv_layout(c.args[3], int(d)) for c in (kc[0], vc[0])]
            key = (f"{prefix}attention_packed_b{int(b)}_h{int(h)}_kv{int(hk)}_d{int(d)}_s{longest}{tag}_"
                   + "_".join(f"{x['bits']}g{x['group']}{'a' if x['asym'] else 's'}{x['scale']}"
                              f"{'_static' if x.get('static') else ''}" for x in lays))
            if key not in funcs:
                func = packed_decode_attention_func(int(b), int(h), int(hk), int(d), longest, scale, *lays)
                funcs[key] = bb.add_func(func.with_attrs({"op_pattern": 8, "global_symbol": key}), key)
            ins = [q]
            for c, new, lay in ((kc[0], kc[1], lays[0]), (vc[0], vc[1], lays[1])):
                codes, scales, zeros = (importer.env[a] if a is not None else None for a in c.args[:3])
                if lay.get("static"):  # the calibrated scale, [1] fp32 as the kernel reads it
                    scales = bb.emit(relax.op.reshape(relax.op.astype(scales, "float32"), [1]))
                if zeros is None:
                    zeros = relax.const(np.zeros((1, 1, 1, 1), "uint8"))
                ins += [codes, scales, zeros, importer.env[new]]
            return bb.emit(relax.call_tir(funcs[key], [*ins, bias], relax.TensorType([b, h, s, d], "float32")))
        if one and parts:
            make, kind = cache_decode_attention_func, "_cache"
        else:
            make, kind = (decode_attention_func, "_one") if one else (attention_func, "")
        key = f"{prefix}attention{kind}_b{int(b)}_h{int(h)}_kv{int(hk)}_d{int(d)}_s{longest}{tag}"
        if key not in funcs:
            func = make(int(b), int(h), int(hk), int(d), longest, scale).with_attrs({"op_pattern": 8, "global_symbol": key})
            funcs[key] = bb.add_func(func, key)
        out = relax.TensorType([b, h, s, d], "float32")
        if one and parts:  # cached keys / values read in place, the new one beside them
            kp, kn, vp, vn = parts
            return bb.emit(relax.call_tir(funcs[key], [q, kp, kn, vp, vn, bias], out))
        if parts:  # prefill over a static cache: gather past and new once, in the kernel's layouts
            kp, kn, vp, vn = parts
            p = kp.ty.shape[1]
            k = bb.emit_te(lambda x, y: te.compute((b, hk, d, t32), lambda bi, hi, di, j: te.if_then_else(
                j < p, x[bi, tirx.min(j, p - 1), hi, di], te.if_then_else(
                    j < t, y[bi, hi, tirx.max(j - p, 0), di], tirx.const(0.0, "float32"))), name="keys_t"), kp, kn,
                primfunc_name_hint=f"{prefix}attention_cache_keys_t", primfunc_attrs={"op_pattern": 8})
            v = bb.emit_te(lambda x, y: te.compute((b, hk, t, d), lambda bi, hi, j, di: te.if_then_else(
                j < p, x[bi, tirx.min(j, p - 1), hi, di], y[bi, hi, tirx.max(j - p, 0), di]), name="values"), vp, vn,
                primfunc_name_hint=f"{prefix}attention_cache_values", primfunc_attrs={"op_pattern": 8})
        elif not one:  # the prefill kernel reads K transposed, keys padded to whole blocks
            k = bb.emit_te(lambda x: te.compute((b, hk, d, t32), lambda bi, hi, di, j: te.if_then_else(
                j < t, x[bi, hi, j, di], tirx.const(0.0, "float32")), name="keys_t"), k,
                primfunc_name_hint=f"{prefix}attention_keys_t", primfunc_attrs={"op_pattern": 8})
        return bb.emit(relax.call_tir(funcs[key], [q, k, v, bias], out))

    return convert
