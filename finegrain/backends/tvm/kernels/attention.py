"""Masked scaled-dot-product attention for CPU as one TIR function (prefill and decode).

``aten.scaled_dot_product_attention(q, k, v, mask, scale)`` decomposed by Relax becomes a batched
matmul, an additive mask, a "safe" softmax over ``seq x seq`` and a second matmul: four passes over
the score matrix, its softmax scalar with symbolic shapes (at 512 tokens SmolLM2 spent 1.1 s of a
2.4 s prefill there). This kernel computes one query row per parallel task, its scores kept in a
row buffer (``max_seq_len`` floats, L1-resident):

1. scores ``s_j = scale q . k_j + bias_j`` for 32 keys at a time (4 independent 8-lane FMA chains
   over ``d``, from ``kt`` = K transposed to ``[d, keys]`` so keys are contiguous); a 32-key block
   whose bias is ``-inf`` throughout (the causal upper triangle) is skipped;
2. ``m = max_j s_j``; ``p_j = exp(s_j - m)`` with a vectorized polynomial ``exp`` (Cephes
   ``expf``: ``2^n`` times a degree-7 polynomial of the remainder, ~1 ulp; exactly 0 below
   -87.3, so masked keys contribute nothing); ``l = sum_j p_j``;
3. ``o = (sum_j p_j v_j) / l`` over the keys with ``p_j != 0``, ``d`` in 8-lane vectors.

A fully masked row gives zeros (the ``_safe_softmax`` semantics torch's decomposition uses). The
mask arrives as an additive fp32 ``bias[seq, keys]`` (0 or -inf; built once per mask by the
lowering, shared by all layers), padded with -inf to whole 32-key blocks; ``kt``'s key axis is
padded the same way. Grouped-query attention reads K / V head ``h // (H / Hkv)``. Queries and keys may differ in
number (decoding over a KV cache: S new queries, T = past + S keys).
"""
from __future__ import annotations

import math

from finegrain.backends.tvm.kernels import memoized

LANES = 8
KEY_BLOCK = 32  # keys per score block: 4 vectors of 8

# Cephes expf: exp(x) = 2^n exp(r), r = x - n ln 2 in [-ln2/2, ln2/2]
_LOG2E = 1.44269504088896341
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
EXP_MIN = -87.3  # below: 0 (2^n would leave the normal range)


def vexp(x):
    """``exp(x)`` for ``x <= 0`` (or -inf) as TIR arithmetic the vectorizer keeps in vectors."""
    from tvm import tirx

    f32 = "float32"
    xc = tirx.max(x, tirx.const(EXP_MIN, f32))
    n = tirx.floor(xc * tirx.const(_LOG2E, f32) + tirx.const(0.5, f32))
    r = xc - n * tirx.const(_LN2_HI, f32) - n * tirx.const(_LN2_LO, f32)
    p = tirx.const(_P[0], f32)
    for c in _P[1:]:
        p = p * r + tirx.const(c, f32)
    p = p * r * r + r + tirx.const(1.0, f32)
    two_n = tirx.reinterpret(f32, (n.astype("int32") + 127) << 23)
    return tirx.Select(x < tirx.const(EXP_MIN, f32), tirx.const(0.0, f32), p * two_n)


def _softmax():
    """The TVMScript macro ``softmax(sc, red, tot, base, n)`` every kernel here runs on one row of
    scores ``sc[base : base + n]`` (``n`` a multiple of 8; masked keys -inf): ``tot[0]`` = the max
    (0 for a fully masked row, so exp gives 0 everywhere), ``sc`` <- ``exp(s - max)`` in place,
    ``tot[1]`` = their sum; ``red`` is an 8-lane scratch."""
    from tvm import tirx
    from tvm.script import tirx as T

    neg_inf = tirx.const(-math.inf, "float32")

    @T.macro
    def softmax(sc, red, tot, base, n):
        for lane in T.vectorized(LANES):
            red[lane] = neg_inf
        for jo in T.serial(n // LANES):
            for lane in T.vectorized(LANES):
                red[lane] = T.max(red[lane], sc[base + jo * LANES + lane])
        tot[0] = neg_inf
        for lane in T.serial(LANES):
            tot[0] = T.max(tot[0], red[lane])
        if tot[0] == neg_inf:
            tot[0] = T.float32(0)
        for lane in T.vectorized(LANES):
            red[lane] = T.float32(0)
        for jo in T.serial(n // LANES):
            for lane in T.vectorized(LANES):
                sc[base + jo * LANES + lane] = vexp(sc[base + jo * LANES + lane] - tot[0])
                red[lane] = red[lane] + sc[base + jo * LANES + lane]
        tot[1] = T.float32(0)
        for lane in T.serial(LANES):
            tot[1] = tot[1] + red[lane]

    return softmax


def _dot8(part):
    """The 8 lanes of ``part`` summed pairwise (the order every kernel here uses)."""
    return (part[0] + part[1]) + (part[2] + part[3]) + ((part[4] + part[5]) + (part[6] + part[7]))


def padded_keys(max_seq_len: int) -> int:
    return -(-max_seq_len // KEY_BLOCK) * KEY_BLOCK


DECODE_SPLITS = 8  # the most chunks a decode step splits each K / V head's cached keys into (split-K)
DECODE_MIN_CHUNK = 256  # the fewest keys a chunk takes: below, one item's fixed costs outweigh the balance


def decode_chunk(p, row: int):
    """The keys per chunk of a decode step over ``p`` cached keys (a TIR expression; a multiple of 32):
    ``p / DECODE_SPLITS`` rounded up, at least :data:`DECODE_MIN_CHUNK`, at most ``row`` (the kernel's
    padded ``max_seq_len``: its score rows)."""
    from tvm import tirx

    step = DECODE_SPLITS * KEY_BLOCK
    return tirx.min(tirx.const(row, "int64"),
                    tirx.max(tirx.const(DECODE_MIN_CHUNK, "int64"), (p + step - 1) // step * KEY_BLOCK))


def chunk_scores(p, j0, chunk):
    """How many scores the chunk of ``chunk`` keys from ``j0`` softmaxes: its keys up to ``p``, padded with
    -inf to whole 8-lane vectors (a TIR expression)."""
    from tvm import tirx

    return tirx.min(chunk, (p - j0 + LANES - 1) // LANES * LANES)


def _split_decode(batch: int, kv_heads: int, group: int, d: int, scale: float, row: int, value_at=None,
                  per_task: int = 1):
    """The TVMScript macros of the split-K ("flash-decoding") decode kernels over a static cache. One
    parallel work item per K / V head and chunk of ``decode_chunk(p, row)`` cached keys (a decode step
    has only ``batch x kv_heads`` heads, 3 for SmolLM2: one task each left cores idle and the
    threads unbalanced), each writing its query heads' partial softmax into scratch; one task per
    head then merges the chunks and the new key. Scratch index ``at = (task * DECODE_SPLITS + c) *
    group``: ``pm[at + g]`` the chunk's max score, ``pl[at + g]`` its sum of ``exp(s - max)`` (0:
    nothing visible), ``po[(at + g) * d ..]`` its sum of ``exp(s - max) v``. Scores of chunk key
    ``jj`` at ``sc[g * row + jj]``.

    * ``open_chunk(sc, n)``: every score -inf (the keys the caller does not score: masked, or past the end);
    * ``close_chunk(sc, red, tot, pm, pl, out, at, n)``: each query head's chunk row softmaxed in place
      (the same :func:`_softmax` as every kernel here), its max and sum stored, the local sums
      ``out[group * d]`` zeroed;
    * ``add_value(out, sc, x, bi, j, kh, jj)``: the value of cached key ``j`` (chunk key ``jj``) added
      into ``out``, its element ``a`` read as ``value_at(x, bi, j, kh, a)`` (default ``x[a]``: a row
      already unpacked);
    * ``store_chunk(out, po, at)``: ``out`` into the scratch (summed in a local buffer: the compiler
      keeps it apart from every other buffer, which it cannot assume of the scratch);
    * ``merge(q, kn, vn, bias, o, pm, pl, po, p, nc)``: one parallel task per K / V head: the new key's
      score, then ``o = (sum_c e^(m_c - M) o_c + e^(s_new - M) v_new) / (sum_c e^(m_c - M) l_c +
      e^(s_new - M))`` over the ``nc`` chunks that see a key (a fully masked row gives zeros).

    ``per_task`` > 1: one work item reads ``per_task`` K / V heads (``kv_heads`` then counts the items'
    heads, ``group`` the query heads of all ``per_task``, ``group / per_task`` each): ``add_value``'s
    ``kh`` is then the head's place within the item (its value added into its own query heads only),
    and the merge reads the new key and value of each query head's own K / V head."""
    from tvm import tirx
    from tvm.script import tirx as T

    softmax = _softmax()
    nv = d // LANES
    chunks = DECODE_SPLITS
    neg_inf = tirx.const(-math.inf, "float32")
    lanes, dot8, exp = LANES, _dot8, vexp  # closure names: the macros are used in other modules too
    if value_at is None:
        def value_at(x, bi, j, kh, a):
            return x[a]

    @T.macro
    def open_chunk(sc, n):
        for g in T.serial(group):
            for jo in T.serial(n // lanes):
                for lane in T.vectorized(lanes):
                    sc[g * row + jo * lanes + lane] = neg_inf

    @T.macro
    def close_chunk(sc, red, tot, pm, pl, out, at, n):
        for g in T.serial(group):
            softmax(sc, red, tot, g * row, n)
            pm[at + g] = tot[0]
            pl[at + g] = tot[1]
        for a in T.vectorized(group * d):
            out[a] = T.float32(0)

    per = group // per_task  # query heads per K / V head

    def own(kh, g):  # the K / V head (in kn / vn) of the item's query head g
        return kh * per_task + g // per if per_task > 1 else kh

    @T.macro
    def add_value(out, sc, x, bi, j, kh, jj):
        for g in T.serial(group):
            if sc[g * row + jj] != T.float32(0):
                for dv in T.unroll(nv):
                    for lane in T.vectorized(lanes):
                        out[g * d + dv * lanes + lane] = out[g * d + dv * lanes + lane] + sc[
                            g * row + jj] * value_at(x, bi, j, kh, dv * lanes + lane)

    if per_task > 1:
        @T.macro
        def add_value(out, sc, x, bi, j, kh, jj):  # noqa: F811 - K / V head kh of the item: its own query heads
            for g0 in T.serial(per):
                if sc[(kh * per + g0) * row + jj] != T.float32(0):
                    for dv in T.unroll(nv):
                        for lane in T.vectorized(lanes):
                            r = kh * per + g0
                            out[r * d + dv * lanes + lane] = out[r * d + dv * lanes + lane] + sc[
                                r * row + jj] * value_at(x, bi, j, kh, dv * lanes + lane)

    @T.macro
    def store_chunk(out, po, at):
        for a in T.vectorized(group * d):
            po[at * d + a] = out[a]

    @T.macro
    def merge_head(q, kn, vn, bias, o, pm, pl, po, part, tot, acc, bi, kh, task, p, nc):
        for g in T.serial(group):
            tot[2] = neg_inf  # the new key's score
            if bias[0, p] > neg_inf:
                for lane in T.vectorized(lanes):
                    part[lane] = T.float32(0)
                for dv in T.serial(nv):
                    for lane in T.vectorized(lanes):
                        part[lane] = part[lane] + q[bi, kh * group + g, 0, dv * lanes + lane] * kn[
                            bi, own(kh, g), 0, dv * lanes + lane]
                tot[2] = dot8(part) * T.float32(scale) + bias[0, p]
            tot[0] = tot[2]  # M: the largest score any visible key has
            for c in T.serial(nc):
                if pl[(task * chunks + c) * group + g] > T.float32(0):
                    tot[0] = T.max(tot[0], pm[(task * chunks + c) * group + g])
            tot[1] = T.float32(0)
            for a in T.vectorized(d):
                acc[a] = T.float32(0)
            for c in T.serial(nc):
                if pl[(task * chunks + c) * group + g] > T.float32(0):
                    tot[3] = exp(pm[(task * chunks + c) * group + g] - tot[0])
                    tot[1] = tot[1] + tot[3] * pl[(task * chunks + c) * group + g]
                    for a in T.vectorized(d):
                        acc[a] = acc[a] + tot[3] * po[((task * chunks + c) * group + g) * d + a]
            if tot[2] > neg_inf:
                tot[3] = exp(tot[2] - tot[0])
                tot[1] = tot[1] + tot[3]
                for a in T.vectorized(d):
                    acc[a] = acc[a] + tot[3] * vn[bi, own(kh, g), 0, a]
            for a in T.vectorized(d):
                o[bi, kh * group + g, 0, a] = T.if_then_else(tot[1] > T.float32(0), acc[a] / tot[1], T.float32(0))

    @T.macro
    def merge(q, kn, vn, bias, o, pm, pl, po, p, nc):
        for task in T.parallel(batch * kv_heads):
            part = T.decl_buffer((lanes,), "float32", scope="local")
            tot = T.decl_buffer((4,), "float32", scope="local")
            acc = T.decl_buffer((d,), "float32", scope="local")
            merge_head(q, kn, vn, bias, o, pm, pl, po, part, tot, acc, task // kv_heads, task % kv_heads, task, p, nc)

    return open_chunk, close_chunk, add_value, store_chunk, merge


def _check_heads(heads: int, kv_heads: int, d: int) -> None:
    if d % LANES or heads % kv_heads:
        raise ValueError(f"attention kernel: head dim {d} must be a multiple of {LANES} and heads {heads} a multiple "
                         f"of the K/V heads {kv_heads}")


@memoized
def attention_func(batch: int, heads: int, kv_heads: int, d: int, max_seq_len: int, scale: float):
    """The PrimFunc ``f(q[B, H, S, d], kt[B, Hkv, d, T32], v[B, Hkv, T, d], bias[S, T32], o[B, H, S, d])``
    for ``S`` queries over ``T`` keys (``T = S`` without a cache, past + S over a KV cache) with
    ``T <= max_seq_len`` and ``T32`` = T rounded up to 32 (all symbolic)."""
    from tvm import tirx
    from tvm.script import tirx as T

    _check_heads(heads, kv_heads, d)
    row = padded_keys(max_seq_len)
    group = heads // kv_heads
    nv, nb = d // LANES, KEY_BLOCK // LANES
    neg_inf = tirx.const(-math.inf, "float32")
    f32 = "float32"
    softmax = _softmax()

    @T.prim_func(s_tir=True)
    def func(q_h: T.handle, kt_h: T.handle, v_h: T.handle, bias_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        s = T.int64()
        t = T.int64()
        s32 = T.int64()
        q = T.match_buffer(q_h, (batch, heads, s, d), f32)
        kt = T.match_buffer(kt_h, (batch, kv_heads, d, s32), f32)
        v = T.match_buffer(v_h, (batch, kv_heads, t, d), f32)
        bias = T.match_buffer(bias_h, (s, s32), f32)
        o = T.match_buffer(o_h, (batch, heads, s, d), f32)
        assert s32 <= row, "attention kernel: sequence longer than the max_seq_len it was built for"
        assert t <= s32, "attention kernel: keys padded to fewer than the key count"
        for task in T.parallel(batch * heads * s):
            sc = T.decl_buffer((row,), f32, scope="local")
            acc = T.decl_buffer((KEY_BLOCK,), f32, scope="local")
            red = T.decl_buffer((LANES,), f32, scope="local")
            out = T.decl_buffer((d,), f32, scope="local")
            live = T.decl_buffer((1,), "int32", scope="local")
            tot = T.decl_buffer((2,), f32, scope="local")
            bi = task // (heads * s)
            hi = task // s % heads
            i = task % s
            kh = hi // group
            # 1. scores, one 32-key block at a time; blocks masked throughout are skipped
            for jo in T.serial(s32 // KEY_BLOCK):
                live[0] = 0
                for jj in T.serial(KEY_BLOCK):
                    if bias[i, jo * KEY_BLOCK + jj] > neg_inf:
                        live[0] = 1
                if live[0] == 1:
                    for a in T.vectorized(KEY_BLOCK):
                        acc[a] = T.float32(0)
                    for dd in T.serial(d):
                        for jv in T.unroll(nb):
                            for lane in T.vectorized(LANES):
                                acc[jv * LANES + lane] = acc[jv * LANES + lane] + q[bi, hi, i, dd] * kt[
                                    bi, kh, dd, jo * KEY_BLOCK + jv * LANES + lane]
                    for a in T.vectorized(KEY_BLOCK):
                        sc[jo * KEY_BLOCK + a] = acc[a] * T.float32(scale) + bias[i, jo * KEY_BLOCK + a]
                else:
                    for a in T.vectorized(KEY_BLOCK):
                        sc[jo * KEY_BLOCK + a] = neg_inf
            # 2. max, exp, sum
            softmax(sc, red, tot, 0, s32)
            # 3. probabilities times V
            for a in T.vectorized(d):
                out[a] = T.float32(0)
            for j in T.serial(t):
                if sc[j] != T.float32(0):
                    for dv in T.unroll(nv):
                        for lane in T.vectorized(LANES):
                            out[dv * LANES + lane] = out[dv * LANES + lane] + sc[j] * v[bi, kh, j, dv * LANES + lane]
            for a in T.vectorized(d):
                o[bi, hi, i, a] = T.if_then_else(tot[1] > T.float32(0), out[a] / tot[1], T.float32(0))

    return func


@memoized
def decode_attention_func(batch: int, heads: int, kv_heads: int, d: int, max_seq_len: int, scale: float):
    """One new query per head over a KV cache: the PrimFunc ``f(q[B, H, 1, d], k[B, Hkv, T, d],
    v[B, Hkv, T, d], bias[1, T32], o[B, H, 1, d])`` reading K / V in the cache's own layout (no
    transposed copy of K per step, no per-head copy of a shared K / V head: the caller passes the
    grouped tensors). One parallel task per K / V head computes its ``H / Hkv`` query heads, so each
    cached key and value is read once per step: ``s_j = scale q . k_j + bias_j`` with ``d`` in 8-lane
    vectors, the same softmax as :func:`attention_func` (masked keys contribute nothing, a fully
    masked row gives zeros), ``o = (sum_j p_j v_j) / l``."""
    from tvm import tirx
    from tvm.script import tirx as T

    _check_heads(heads, kv_heads, d)
    row = padded_keys(max_seq_len)
    group = heads // kv_heads
    nv = d // LANES
    neg_inf = tirx.const(-math.inf, "float32")
    f32 = "float32"
    softmax = _softmax()

    @T.prim_func(s_tir=True)
    def func(q_h: T.handle, k_h: T.handle, v_h: T.handle, bias_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        t = T.int64()
        t32 = T.int64()
        q = T.match_buffer(q_h, (batch, heads, 1, d), f32)
        k = T.match_buffer(k_h, (batch, kv_heads, t, d), f32)
        v = T.match_buffer(v_h, (batch, kv_heads, t, d), f32)
        bias = T.match_buffer(bias_h, (1, t32), f32)
        o = T.match_buffer(o_h, (batch, heads, 1, d), f32)
        assert t32 <= row, "attention kernel: sequence longer than the max_seq_len it was built for"
        assert t <= t32, "attention kernel: keys padded to fewer than the key count"
        for task in T.parallel(batch * kv_heads):
            sc = T.decl_buffer((group * row,), f32, scope="local")
            part = T.decl_buffer((LANES,), f32, scope="local")
            red = T.decl_buffer((LANES,), f32, scope="local")
            out = T.decl_buffer((d,), f32, scope="local")
            tot = T.decl_buffer((2,), f32, scope="local")
            bi = task // kv_heads
            kh = task % kv_heads
            # 1. scores of every query head of this K / V head, one key at a time (K read once)
            for j in T.serial(t32):
                if j < t and bias[0, j] > neg_inf:
                    for g in T.serial(group):
                        for lane in T.vectorized(LANES):
                            part[lane] = T.float32(0)
                        for dv in T.serial(nv):
                            for lane in T.vectorized(LANES):
                                part[lane] = part[lane] + q[bi, kh * group + g, 0, dv * LANES + lane] * k[
                                    bi, kh, j, dv * LANES + lane]
                        sc[g * row + j] = _dot8(part) * T.float32(scale) + bias[0, j]
                else:
                    for g in T.serial(group):
                        sc[g * row + j] = neg_inf
            for g in T.serial(group):
                # 2. max, exp, sum over whole 8-key vectors (the padding is -inf)
                softmax(sc, red, tot, g * row, t32)
                # 3. probabilities times V
                for a in T.vectorized(d):
                    out[a] = T.float32(0)
                for j in T.serial(t):
                    if sc[g * row + j] != T.float32(0):
                        for dv in T.unroll(nv):
                            for lane in T.vectorized(LANES):
                                out[dv * LANES + lane] = out[dv * LANES + lane] + sc[g * row + j] * v[
                                    bi, kh, j, dv * LANES + lane]
                for a in T.vectorized(d):
                    o[bi, kh * group + g, 0, a] = T.if_then_else(tot[1] > T.float32(0), out[a] / tot[1],
                                                                 T.float32(0))

    return func


@memoized
def cache_decode_attention_func(batch: int, heads: int, kv_heads: int, d: int, max_seq_len: int, scale: float):
    """:func:`decode_attention_func` over a static cache: the PrimFunc ``f(q[B, H, 1, d],
    kp[B, P, Hkv, d], kn[B, Hkv, 1, d], vp[B, P, Hkv, d], vn[B, Hkv, 1, d], bias[1, T32],
    o[B, H, 1, d])`` whose keys / values are the ``P`` cached ones, read where the cache holds them
    (token-major views of the deployment's preallocated buffers: nothing is concatenated or copied
    per step), then the new one (T = P + 1). Same scores, softmax and masking as the other kernels,
    split over the cached keys (:func:`_split_decode`: one parallel item per K / V head and
    ``decode_chunk(P, row)`` keys, then a merge with the new key), so a long past keeps every core busy
    although a step has only ``batch x kv_heads`` heads."""
    from tvm import tirx
    from tvm.script import tirx as T

    _check_heads(heads, kv_heads, d)
    row = padded_keys(max_seq_len)
    group = heads // kv_heads
    nv = d // LANES
    neg_inf = tirx.const(-math.inf, "float32")
    f32 = "float32"
    chunks = DECODE_SPLITS
    open_chunk, close_chunk, add_value, store_chunk, merge = _split_decode(
        batch, kv_heads, group, d, scale, row, lambda x, bi, j, kh, a: x[bi, j, kh, a])

    @T.prim_func(s_tir=True)
    def func(q_h: T.handle, kp_h: T.handle, kn_h: T.handle, vp_h: T.handle, vn_h: T.handle, bias_h: T.handle,
             o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        p = T.int64()
        t32 = T.int64()
        q = T.match_buffer(q_h, (batch, heads, 1, d), f32)
        kp = T.match_buffer(kp_h, (batch, p, kv_heads, d), f32)
        kn = T.match_buffer(kn_h, (batch, kv_heads, 1, d), f32)
        vp = T.match_buffer(vp_h, (batch, p, kv_heads, d), f32)
        vn = T.match_buffer(vn_h, (batch, kv_heads, 1, d), f32)
        bias = T.match_buffer(bias_h, (1, t32), f32)
        o = T.match_buffer(o_h, (batch, heads, 1, d), f32)
        assert t32 <= row, "attention kernel: sequence longer than the max_seq_len it was built for"
        assert p + 1 <= t32, "attention kernel: keys padded to fewer than the key count"
        chunk = decode_chunk(p, row)
        nc = (p + chunk - T.int64(1)) // chunk
        pm = T.decl_buffer((batch * kv_heads * chunks * group,), f32)
        pl = T.decl_buffer((batch * kv_heads * chunks * group,), f32)
        po = T.decl_buffer((batch * kv_heads * chunks * group * d,), f32)
        for item in T.parallel(batch * kv_heads * nc):
            sc = T.decl_buffer((group * row,), f32, scope="local")
            out = T.decl_buffer((group * d,), f32, scope="local")
            part = T.decl_buffer((LANES,), f32, scope="local")
            red = T.decl_buffer((LANES,), f32, scope="local")
            tot = T.decl_buffer((2,), f32, scope="local")
            task = item // nc
            bi = task // kv_heads
            kh = task % kv_heads
            at = (task * chunks + item % nc) * group
            j0 = item % nc * chunk
            # 1. scores of this chunk's cached keys (-inf: masked, or past the cache's end)
            n = chunk_scores(p, j0, chunk)
            open_chunk(sc, n)
            for jj in T.serial(T.min(chunk, p - j0)):
                if bias[0, j0 + jj] > neg_inf:
                    for g in T.serial(group):
                        for lane in T.vectorized(LANES):
                            part[lane] = T.float32(0)
                        for dv in T.serial(nv):
                            for lane in T.vectorized(LANES):
                                part[lane] = part[lane] + q[bi, kh * group + g, 0, dv * LANES + lane] * kp[
                                    bi, j0 + jj, kh, dv * LANES + lane]
                        sc[g * row + jj] = _dot8(part) * T.float32(scale) + bias[0, j0 + jj]
            # 2. max, exp, sum; 3. probabilities times the chunk's values
            close_chunk(sc, red, tot, pm, pl, out, at, n)
            for jj in T.serial(T.min(chunk, p - j0)):
                add_value(out, sc, vp, bi, j0 + jj, kh, jj)
            store_chunk(out, po, at)
        # 4. the chunks and the new key merged
        merge(q, kn, vn, bias, o, pm, pl, po, p, nc)

    return func

def _at(t, *idx):  # a TIR buffer (kernels) or a TE tensor (lower_cache's decode)
    from tvm import te

    return t(*idx) if isinstance(t, te.Tensor) else t[idx]


def _dequantized(u, s, z, lay: dict, bi, j, kh, grp):
    """Code ``u`` (unsigned, as stored) of a packed cache row in group ``grp`` as fp32: offset back,
    minus the zero point (FP8: the E4M3 pattern's value), times the group scale."""
    from tvm import tirx

    f32 = "float32"
    scale = _at(s, 0) if lay.get("static") else _at(s, bi, j, kh, grp)  # static: the layer's one scale [1]
    if lay.get("fp8"):  # an E4M3 bit pattern
        from finegrain.backends.tvm.lower_activations import e4m3_value

        return e4m3_value(u) * scale.astype(f32)
    v = u.astype(f32) + tirx.const(float(lay["lo"]), f32)
    if lay["asym"]:
        v = v - _at(z, bi, j, kh, grp).astype(f32)
    return v * scale.astype(f32)


def _code(c, lay: dict, bi, j, kh, a):
    """The unsigned code of element ``a`` of a packed cache row (``lower_cache.kv_layout``): word
    ``a % W``, bits ``(a // W) * bits ..``."""
    from tvm import tirx

    w, bits = lay["words"], lay["bits"]
    return (_at(c, bi, j, kh, a % w) >> ((a // w) * bits)) & tirx.const(2 ** bits - 1, "int32")


def _cached(c, s, z, lay: dict, bi, j, kh, a):
    """Element ``a`` of a packed cache row (:func:`_code`), dequantized in fp32."""
    return _dequantized(_code(c, lay, bi, j, kh, a), s, z, lay, bi, j, kh, a // lay["group"])


def _repeated_words(c, bi, j, kh, w: int):
    """The ``w`` words of cache row ``(bi, j, kh)`` loaded as one vector and repeated to fill 8 lanes
    (a ``Shuffle``: x86's ``vbroadcasti128`` for 4 words). A lane-wise copy ``words[l] = c[.., l % w]``
    compiled to 8 scalar loads, and two 4-word stores reloaded as one vector stalled."""
    from tvm import tirx

    i64 = "int64"
    if w == 1:
        return tirx.Broadcast(tirx.BufferLoad(c, [bi, j, kh, tirx.const(0, i64)]), LANES)
    row = tirx.BufferLoad(c, [bi, j, kh, tirx.Ramp(tirx.const(0, i64), tirx.const(1, i64), w)])
    return tirx.Shuffle([row] * (LANES // w), [tirx.const(i, "int32") for i in range(LANES)])


def _unpack_row(lay: dict, dequantize=None):
    """The TVMScript macro ``unpack(x, c, s, z, bi, j, kh, words)``: row ``j`` of a packed cache
    (:func:`_code`'s layout) into the fp32 buffer ``x[0:d]``, 8 elements a vector, each code ``u`` (int32, unsigned) as
    ``dequantize(u, a, grp, s, z, bi, j, kh)`` (``grp``: element ``a``'s group along the head dim, one
    index for the whole vector when groups span whole vectors; default: the format's, scales ``s`` and
    zero points ``z`` of the row's groups). With ``W`` a multiple of 8 a vector's lanes read
    contiguous words. With fewer (2-bit codes of a 64-wide head: 4 words) they would gather them
    (the kernel read 2-bit rows 2.3x slower than 4-bit ones), so the row's words are first loaded
    once, repeated to 8 lanes into the int32 scratch ``words[8]``, and each vector shifts them by
    its lanes' places."""
    from tvm import tirx
    from tvm.script import tirx as T

    w, bits, g = lay["words"], lay["bits"], lay["group"]
    nv, mask = lay["d"] // LANES, tirx.const(2 ** bits - 1, "int32")
    lanes, repeated = LANES, _repeated_words  # closure names: a macro cannot see this module's globals where used
    if dequantize is None:
        def dequantize(u, a, grp, s, z, bi, j, kh):
            return _dequantized(u, s, z, lay, bi, j, kh, grp)

    def group_of(dv, lane):  # a scale / zero point load per vector, not per lane, where the group spans it
        return (dv * LANES) // g if g % LANES == 0 else (dv * LANES + lane) // g

    if w % LANES == 0:
        def element(c, s, z, bi, j, kh, words, dv, lane):
            a = dv * LANES + lane
            return dequantize(_code(c, lay, bi, j, kh, a), a, group_of(dv, lane), s, z, bi, j, kh)

        @T.macro
        def unpack(x, c, s, z, bi, j, kh, words):
            for dv in T.serial(nv):
                for lane in T.vectorized(lanes):
                    x[dv * lanes + lane] = element(c, s, z, bi, j, kh, words, dv, lane)

        return unpack
    if LANES % w:
        raise ValueError(f"packed attention: {w} words a row neither divide nor are a multiple of {LANES}")
    per = LANES // w  # places one vector covers

    def element(c, s, z, bi, j, kh, words, dv, lane):
        u = (words[lane] >> ((dv * per + lane // w) * bits)) & mask
        return dequantize(u, dv * LANES + lane, group_of(dv, lane), s, z, bi, j, kh)

    @T.macro
    def unpack(x, c, s, z, bi, j, kh, words):
        words[T.Ramp(T.int64(0), T.int64(1), lanes)] = repeated(c, bi, j, kh, w)
        for dv in T.serial(nv):
            for lane in T.vectorized(lanes):
                x[dv * lanes + lane] = element(c, s, z, bi, j, kh, words, dv, lane)

    return unpack


@memoized
def packed_decode_attention_func(batch: int, heads: int, kv_heads: int, d: int, max_seq_len: int, scale: float,
                                 key: dict, value: dict):
    """:func:`cache_decode_attention_func` over a **packed** static cache (``lower_cache.py``): the
    PrimFunc ``f(q[B, H, 1, d], kc[B, P, Hkv, Wk] int32, ks[B, P, Hkv, d / Gk] (a static format's one fp32
    scale ``[1]``), kz, kn[B, Hkv, 1, d],
    vc, vs, vz, vn, bias[1, T32], o[B, H, 1, d])`` reads each cached key / value as its codes, scales
    and zero points (``kz`` / ``vz`` ``[B, P, Hkv, d / G]`` uint8 for an asymmetric format, else a
    ``[1, 1, 1, 1]`` placeholder nobody reads), unpacks and dequantizes it once per step in
    registers (shared by the ``H / Hkv`` query heads reading it) and computes the same scores,
    softmax and weighted sum as the fp32 kernel, split over the past the same way. ``key`` / ``value``: the layouts
    (``kv_layout``)."""
    from tvm import tirx
    from tvm.script import tirx as T

    _check_heads(heads, kv_heads, d)
    for lay in (key, value):
        if lay["d"] != d:
            raise ValueError(f"packed attention: layout for head dim {lay['d']}, kernel for {d}")
    row = padded_keys(max_seq_len)
    group = heads // kv_heads
    nv = d // LANES
    neg_inf = tirx.const(-math.inf, "float32")
    f32 = "float32"
    kw, kg, vw, vg = key["words"], d // key["group"], value["words"], d // value["group"]
    kzs = (batch, 1, kv_heads, kg) if key["asym"] else (1, 1, 1, 1)
    vzs = (batch, 1, kv_heads, vg) if value["asym"] else (1, 1, 1, 1)
    kzp, vzp = key["asym"], value["asym"]
    kst, vst = bool(key.get("static")), bool(value.get("static"))  # one calibrated fp32 scale [1]
    ksd, vsd = ("float32" if kst else key["scale"]), ("float32" if vst else value["scale"])
    chunks = DECODE_SPLITS
    open_chunk, close_chunk, add_value, store_chunk, merge = _split_decode(batch, kv_heads, group, d, scale, row)
    unpack_key, unpack_value = _unpack_row(key), _unpack_row(value)

    @T.prim_func(s_tir=True)
    def func(q_h: T.handle, kc_h: T.handle, ks_h: T.handle, kz_h: T.handle, kn_h: T.handle, vc_h: T.handle,
             vs_h: T.handle, vz_h: T.handle, vn_h: T.handle, bias_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        p = T.int64()
        t32 = T.int64()
        q = T.match_buffer(q_h, (batch, heads, 1, d), f32)
        kc = T.match_buffer(kc_h, (batch, p, kv_heads, kw), "int32")
        ks = T.match_buffer(ks_h, (1,) if kst else (batch, p, kv_heads, kg), ksd)
        kz = T.match_buffer(kz_h, (kzs[0], p if kzp else 1, kzs[2], kzs[3]), "uint8")
        kn = T.match_buffer(kn_h, (batch, kv_heads, 1, d), f32)
        vc = T.match_buffer(vc_h, (batch, p, kv_heads, vw), "int32")
        vs = T.match_buffer(vs_h, (1,) if vst else (batch, p, kv_heads, vg), vsd)
        vz = T.match_buffer(vz_h, (vzs[0], p if vzp else 1, vzs[2], vzs[3]), "uint8")
        vn = T.match_buffer(vn_h, (batch, kv_heads, 1, d), f32)
        bias = T.match_buffer(bias_h, (1, t32), f32)
        o = T.match_buffer(o_h, (batch, heads, 1, d), f32)
        assert t32 <= row, "attention kernel: sequence longer than the max_seq_len it was built for"
        assert p + 1 <= t32, "attention kernel: keys padded to fewer than the key count"
        chunk = decode_chunk(p, row)
        nc = (p + chunk - T.int64(1)) // chunk
        pm = T.decl_buffer((batch * kv_heads * chunks * group,), f32)
        pl = T.decl_buffer((batch * kv_heads * chunks * group,), f32)
        po = T.decl_buffer((batch * kv_heads * chunks * group * d,), f32)
        for item in T.parallel(batch * kv_heads * nc):
            sc = T.decl_buffer((group * row,), f32, scope="local")
            out = T.decl_buffer((group * d,), f32, scope="local")
            part = T.decl_buffer((LANES,), f32, scope="local")
            red = T.decl_buffer((LANES,), f32, scope="local")
            row_v = T.decl_buffer((d,), f32, scope="local")
            words = T.decl_buffer((LANES,), "int32", scope="local")
            tot = T.decl_buffer((2,), f32, scope="local")
            task = item // nc
            bi = task // kv_heads
            kh = task % kv_heads
            at = (task * chunks + item % nc) * group
            j0 = item % nc * chunk
            # 1. scores: each of the chunk's cached keys unpacked once, then dotted with the group's queries
            n = chunk_scores(p, j0, chunk)
            open_chunk(sc, n)
            for jj in T.serial(T.min(chunk, p - j0)):
                if bias[0, j0 + jj] > neg_inf:
                    unpack_key(row_v, kc, ks, kz, bi, j0 + jj, kh, words)
                    for g in T.serial(group):
                        for lane in T.vectorized(LANES):
                            part[lane] = T.float32(0)
                        for dv in T.serial(nv):
                            for lane in T.vectorized(LANES):
                                part[lane] = part[lane] + q[bi, kh * group + g, 0, dv * LANES + lane] * row_v[
                                    dv * LANES + lane]
                        sc[g * row + jj] = _dot8(part) * T.float32(scale) + bias[0, j0 + jj]
            # 2. max, exp, sum; 3. probabilities times V: each cached value unpacked once, added into every query head
            close_chunk(sc, red, tot, pm, pl, out, at, n)
            for jj in T.serial(T.min(chunk, p - j0)):
                unpack_value(row_v, vc, vs, vz, bi, j0 + jj, kh, words)
                add_value(out, sc, row_v, bi, j0 + jj, kh, jj)
            store_chunk(out, po, at)
        # 4. the chunks and the new key merged
        merge(q, kn, vn, bias, o, pm, pl, po, p, nc)

    return func
