"""KIVI-style windowed KV writes on TVM (issue #17, ``backends/tvm/lower_window.py``): per-channel
keys over token groups, a float window, sinks, pre-RoPE and rotated keys (per head, or RotateKV's
grouped heads), computed in the graph
(an fp32 cache holding the format's values). Prefill + decode over the TVM build give the reference
backend's logits and tokens for static and concat caches, across families; the writes differ from
the float model (the test would notice a write that quantized nothing); RotateKV's grouped-head
keys with reordered channels too; ZipCache's saliency-ranked mixed precision too."""
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finegrain
from finegrain.compiler.capture import kv_inputs

pytest.importorskip("tvm")

from tests.test_kv_cache import FLOAT, _family, _incremental, _rel  # noqa: E402
from tests.backends.targets import BUILD  # noqa: E402

pytestmark = pytest.mark.tvm

ROOT = Path(__file__).resolve().parents[2]
TARGET = BUILD  # AVX2 at LLVM opt-level 1 (tests/backends/targets.py)

KIVI = {"kv_key": "int4-g4-asym-fp16-dyn", "kv_value": "int4-g8-asym-fp16-dyn", "kv_key_axis": "tokens",
        "kv_window": 4, "kv_sinks": 1, "kv_pre_rope": True, "kv_rotate": True}
# RotateKV: pre-RoPE keys in groups of 2 heads (32 channels) reordered by calibration RMS, one Hadamard per group
GROUPED = {"kv_key": "int2-g8-asym-fp16-dyn", "kv_value": "int4-g8-asym-fp16-dyn", "kv_pre_rope": True,
           "kv_head_group": 2, "kv_reorder": True, "kv_window": 3, "kv_sinks": 1}
PLAIN = {"kv_key": "int2-g4-sym-fp32-dyn", "kv_value": "int4-token-asym-fp16-dyn", "kv_key_axis": "tokens",
         "kv_window": 3, "kv_sinks": 0}


def _recipe(**kv):
    return {**FLOAT, "name": "kv-window", **kv}


def _standalone_tokens(dep, prompt, new_tokens: int = 10) -> list:
    """The tokens ``examples/run_tvm_deploy.py`` (TVM's runtime alone: importing finegrain fails the run)
    generates from deployment ``dep`` after ``prompt``."""
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "assert not [m for m in sys.modules if m.startswith('finegrain')], 'imported finegrain'")
    res = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / "run_tvm_deploy.py"), str(dep),
                          "--ids", *map(str, prompt[0].tolist()), "--max-new-tokens", str(new_tokens)],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["new_tokens"]


@pytest.mark.parametrize("family,kv,cache,prefill", [
    ("llama", KIVI, "static", 13),   # prefill releases groups of new tokens; decode then releases one per 4 steps
    ("llama", PLAIN, "concat", 5),   # no pre-RoPE, symmetric 2-bit keys, values per token, no sink
    ("llama", GROUPED, "concat", 6),  # RotateKV's grouped heads with reordered channels
    ("qwen2", GROUPED, "static", 11),
    ("llama", {**GROUPED, "kv_rotate": True, "kv_reorder": False}, "static", 7),  # per-head rotated, not reordered
    ("qwen2", KIVI, "static", 6),    # q / k / v biases
    ("llama", {**KIVI, "kv_window": 0}, "static", 6),  # no float window: a decode step's token completes a group
    ("phi3", KIVI, "static", 9),     # fused qkv projection
    ("gemma3", KIVI, "concat", 7),   # sliding-window layers, QK-norm
])
def test_windowed_kv_on_tvm_equals_the_reference(family, kv, cache, prefill, tmp_path, monkeypatch):
    model = _family(family)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    cm = finegrain.compile(model, (ids,), recipe=_recipe(**kv), progress=False, kv_cache=True,
                           calibration=[(ids,)] if kv.get("kv_reorder") else None)  # the channel order's statistics
    ref, _ = _incremental(cm, x, prefill=prefill)
    with torch.no_grad():
        fp = model(x).logits
    assert _rel(fp, ref) > 1e-3  # the writes quantize: what the TVM build must reproduce is not the float model
    deployed = (family, cache) == ("llama", "static") and kv is KIVI  # built once as a deployment, also run standalone
    built = _record_builds(monkeypatch)  # the Relax modules built (read below: which kernels each function calls)
    if deployed:
        cm.build(tmp_path / "dep", target=TARGET, max_seq_len=48)
    with cm.session("tvm", **({"path": tmp_path / "dep"} if deployed else
                               {"target": TARGET, "max_seq_len": 48, "cache": cache})) as s:
        assert s.kv["cache"] == cache
        inc, state = _incremental(s, x, prefill=prefill)
        assert _rel(ref, inc) <= 1e-4, _rel(ref, inc)
        prompt = x[:, :prefill]
        assert s.generate(prompt, 10).tokens == cm.generate(prompt, 10).tokens
        if cache == "concat":  # presents as tensors: chunked prefill over a past made by another call
            half = s.run_all(*kv_inputs(cm.kv, x[:, :14]))
            rest = s.run_all(*kv_inputs(cm.kv, x[:, 14:], list(half[1:]), 14))
            want = cm.session(kv_storage="float").run_all(*kv_inputs(cm.kv, x[:, 14:], list(half[1:]), 14))
            assert _rel(want[0], rest[0]) <= 1e-4
    if cache == "static":
        h, d = cm.kv["kv_heads"], cm.kv["head_dim"]
        shapes = [tuple(p.shape) for p in state["past"]]
        if kv.get("kv_head_group", 1) > 1:  # RotateKV's grouped heads packed as virtual heads of their rotated space: keys' 2-bit
            # codes and values' 4-bit, d / 8 groups per row each, rings of sinks + window + 1 fp32 rows
            w = kv["kv_window"]
            assert shapes[:8] == [(1, 48, h, d // 16), (1, 48, h, d // 8), (1, 48, h, d // 8), (1, 1 + w + 1, h, d),
                                  (1, 48, h, d // 8), (1, 48, h, d // 8), (1, 48, h, d // 8), (1, 1 + w + 1, h, d)], shapes
        else:  # packed (window_cache.py): keys' 4-bit codes, scales / zeros of d / G channels per row, a ring of
            # sinks + window + G fp32 rows; values' per token (d / 8 groups), a ring of sinks + window + 1
            w = kv["kv_window"]
            assert shapes[:8] == [(1, 48, h, d // 8), (1, 48, h, d // 4), (1, 48, h, d // 4), (1, 1 + w + 4, h, d),
                                  (1, 48, h, d // 8), (1, 48, h, d // 8), (1, 48, h, d // 8), (1, 1 + w + 1, h, d)], shapes
    if cache == "static":
        called = _called(built[0])
        # decode's attention reads the packed codes and the ring in place, after the step's commit wrote the
        # released rows' codes and the ring; the past is not decoded to fp32 (prefill still decodes it once);
        # RotateKV's grouped heads by their own kernel (each token's rotated rows taken back once for all heads)
        grouped_ = kv.get("kv_head_group", 1) > 1
        assert any(n.startswith("decode_attention_wpack") and ("_grouped" in n) == grouped_
                   for n in called["decode"]), called["decode"]
        assert any(n.startswith("decode_kv_wpack_commit") and n.endswith("_ring") for n in called["decode"])
        assert not any(n.startswith("decode_kv_wpack_read") for n in called["decode"]), called["decode"]
        assert any(n.startswith("kv_wpack_read") for n in called["prefill"]), called["prefill"]
        if kv["kv_window"] >= 1:
            # a decode step's one token stays in the ring (a float window): its rows are zeros, its attention row
            # as it came
            assert not {"decode_kv_wpack_rows", "decode_kv_window_new", "decode_kv_window_write"} & called["decode"]
    if deployed:
        # the standalone runtime script (no finegrain) generates the same tokens
        assert _standalone_tokens(tmp_path / "dep", prompt) == cm.generate(prompt, 10).tokens


def _record_builds(monkeypatch) -> list:
    """The Relax modules the TVM builds of this test compile, appended as they are built."""
    from finegrain.backends.tvm import build

    built = []
    executable = build.build_executable
    monkeypatch.setattr(build, "build_executable", lambda mod, *a, **k: built.append(mod) or executable(mod, *a, **k))
    return built


def _called(mod) -> dict:
    """The attention / KV functions the ``prefill`` and ``decode`` functions of a built module call."""
    import re

    return {f: set(re.findall(r"\b((?:decode_)?(?:attention|kv)_\w+)", mod[f].script())) for f in ("prefill", "decode")}


@pytest.mark.parametrize("heads,group,reorder,rotated,fmt,axis", [
    (2, 1, False, True, "int2-g4-asym-fp16-dyn", "tokens"),  # KIVI: per-channel keys, per-head rotation
    (2, 2, True, True, "int2-g8-asym-fp16-dyn", "head_dim"),  # RotateKV: 2 heads' 32 channels reordered, one FWHT
    (3, 3, True, False, "int4-token-sym-fp32-dyn", "head_dim"),  # 48 channels: the Hadamard's 12 x 12 factor
])
def test_windowed_write_function_equals_kv_append_at_every_release(heads, group, reorder, rotated, fmt, axis):
    """The lowered write alone, over pasts of every length around the window and group edges
    (nothing released, one group, a prefill releasing several): equal to the reference op, for
    KIVI's per-channel keys and RotateKV's grouped-head keys (channels reordered)."""
    import numpy as np
    import tvm
    from tvm import relax

    from finegrain.backends.tvm.lower_window import relax_converters
    from finegrain.compiler.ops import kv_append, kv_quantized_span

    d, freq = 16, 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    window, sinks = 5, 1
    perm = torch.randperm(heads * d, generator=torch.Generator().manual_seed(3)) if reorder else None
    bb = relax.BlockBuilder()
    p_len, s_len = tvm.tirx.Var("p", "int64"), tvm.tirx.Var("s", "int64")
    past = relax.Var("past", relax.TensorType([1, heads, p_len, d], "float32"))
    new = relax.Var("new", relax.TensorType([1, heads, s_len, d], "float32"))
    f_ = relax.Var("f", relax.TensorType([d // 2], "float32"))
    pm = relax.const(perm.numpy(), "int64") if reorder else None

    class Importer:  # the two calls a converter makes on the Relax frontend's importer
        block_builder = bb

        @staticmethod
        def retrieve_args(node):
            return node

    with bb.function("main", [past, new, f_]):
        with bb.dataflow():
            y = relax_converters("")["kv_window_write.default"](
                (past, new, f_, fmt, axis, window, sinks, rotated, pm, group), Importer)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=tvm.target.Target(TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    g = torch.Generator().manual_seed(0)
    unit = 4 if axis == "tokens" else 1
    for p, s in [(0, 1), (0, 3), (0, 17), (3, 1), (5, 1), (9, 1), (10, 1), (13, 1), (7, 9), (14, 2), (17, 1)]:
        a, b = torch.randn(1, heads, p, d, generator=g) * 3, torch.randn(1, heads, s, d, generator=g) * 3
        want = kv_append(a, b, fmt, axis, window, sinks, freq, rotated, perm=perm, head_group=group)
        got = vm["main"](*(tvm.runtime.tensor(t.numpy()) for t in (a, b, freq))).numpy()
        assert np.abs(got - want.numpy()).max() <= 1e-5 * want.abs().max().item(), (p, s)
        lo, hi = kv_quantized_span(axis, unit, p, p + s, window, sinks)
        changed = (want - torch.cat([a, b], 2)).abs().amax(dim=(0, 1, 3)) > 1e-3  # per token
        assert changed.tolist() == [lo <= t < hi for t in range(p + s)], (p, s)


@pytest.mark.parametrize("fmt,axis,pre_rope,zipped", [
    ("int4-g4-asym-fp16-dyn", "tokens", True, None),  # KIVI's keys: per channel over 4 tokens, pre-RoPE, rotated
    ("int2-g8-asym-fp32-dyn", "head_dim", False, None),  # values: per token in groups of 8 along the head dim
    # RotateKV's grouped heads (both heads' 32 channels reordered, one Hadamard; or reordered only, G = 1): the
    # rotated rows' groups of 8 held as virtual heads
    ("int2-g8-asym-fp16-dyn", "head_dim", True, ("grouped", 2)),
    ("int4-g16-asym-fp32-dyn", "head_dim", True, ("grouped", 1)),
    # ZipCache: half of each write's blocks of 4 at 4 bits, the rest at 2; keys per channel over each block's
    # salient / other tokens (32 pairs over 4 rows), values per token
    ("int4-g8-asym-fp16-dyn", "tokens", True, ("int2-g8-asym-fp16-dyn", 0.5, 4)),
    ("int4-g8-asym-fp16-dyn", "head_dim", False, ("int2-g8-asym-fp16-dyn", 0.25, 4)),
    ("int8-g8-asym-fp32-dyn", "tokens", False, ("int4-g8-asym-fp32-dyn", 0.5, 64)),  # a block longer than 2 d
])
def test_packed_window_layout_holds_what_kv_append_writes(fmt, axis, pre_rope, zipped):
    """``window_cache.py``'s layout (reference ops): over a run of writes of every size (prefills that
    release several groups, decode steps, the ring wrapping several times), what ``kv_wpack_read``
    decodes from codes / spread scales / ring is the cache ``kv_append`` builds, and the past
    ``kv_wpack_commit`` hands attention is ``kv_append``'s after the write (ZipCache's too: every token's
    codes at the high format's width, the salient flag beside the zero points)."""
    from finegrain.backends.tvm.window_cache import (commit_ref, kv_wpack_commit, kv_wpack_read, kv_wpack_rows,
                                                     window_layout)
    from finegrain.compiler.ops import kv_append, kv_quantized_until

    heads, d, window, sinks = 2, 16, 5, 1
    group = {}
    if zipped is not None and zipped[0] == "grouped":  # a channel order as calibration would give (outliers first)
        group = {"perm": torch.randperm(heads * d, generator=torch.Generator().manual_seed(3)), "head_group": zipped[1]}
        zipped = None
    length = 64 if zipped is None or zipped[2] < 64 else 200
    freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)) if pre_rope else None
    lay = window_layout(fmt, axis, d, window, sinks, None if zipped is None else (*zipped, False),
                        group.get("head_group"))
    assert lay.get("head_group") == group.get("head_group")
    unit = zipped[2] if zipped else 4 if axis == "tokens" else 1
    assert lay["ring"] == sinks + window + unit
    if zipped:
        assert lay["zcols"] == lay["cols"] + (axis == "tokens") and lay["words"] == d * int(fmt[3]) // 32
    sdt = torch.float16 if lay["scale"] == "float16" else torch.float32
    codes = torch.zeros(1, length, heads, lay["words"], dtype=torch.int32)
    scales = torch.zeros(1, length, heads, lay["cols"], dtype=sdt)
    zeros = torch.zeros(1, length, heads, lay["zcols"], dtype=torch.uint8)
    ring = torch.zeros(1, lay["ring"], heads, d)
    opts = (freq, fmt, axis, window, sinks, pre_rope)
    g = torch.Generator().manual_seed(0)
    want, p = torch.zeros(1, heads, 0, d), 0
    sizes = (3, 1, 1, 9, 1, 1, 1, 1, 1, 1, 1, 1, 13, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 7, 1)
    for s in sizes + ((70, 1, 1, 2, 40) if length > 64 else ()):
        new = torch.randn(1, heads, s, d, generator=g) * 3
        score = torch.rand(1, heads, p + s, generator=g)
        zopts = group if zipped is None else dict(fmt_low=zipped[0], ratio=zipped[1], block=zipped[2])
        sopts = group if zipped is None else {"score": score, **zopts}
        read = kv_wpack_read(codes[:, :p], scales[:, :p], zeros[:, :p], ring, *opts, **zopts)
        assert torch.allclose(read.transpose(1, 2), want, rtol=0, atol=1e-5 * (want.abs().max().item() if p else 0)), p
        rows = [kv_wpack_rows(read, new, *opts, j, **sopts) for j in range(3)]
        past_att = kv_wpack_commit(read, new, codes[:, :p], scales[:, :p], zeros[:, :p], ring, *opts, **sopts)
        commit_ref(read, new, codes[:, :p], scales[:, :p], zeros[:, :p], ring, *opts, **sopts)
        want = kv_append(want, new, fmt, axis, window, sinks, freq, pre_rope,
                         *(() if zipped is None else (score, *zipped, False)), **group)
        assert torch.equal(past_att.transpose(1, 2), want[:, :, :p])
        for buf, r in zip((codes, scales, zeros), rows):
            buf[:, p:p + s] = r
        p += s
    assert p > 2 * lay["ring"]  # the ring wrapped; every token released so far has its code rows written
    qu = kv_quantized_until(p, lay["axis"], lay["unit"], window, sinks)
    assert qu > p // 2 and (codes[0, sinks:qu] != 0).flatten(1).any(-1).all()


ZIP_LOW = ("int2-g8-asym-fp16-dyn", "int2-g8-asym-fp16-dyn", 8)  # ZipCache's low key / value formats, block


@pytest.mark.parametrize("d,key_fmt,key_axis,pre_rope,rotated,value_fmt,window,zipped", [
    (64, "int4-g32-asym-fp16-dyn", "tokens", True, True, "int4-g32-asym-fp16-dyn", 5, None),  # SmolLM2's kivi4 shapes
    (64, "int2-g16-asym-fp16-dyn", "tokens", True, True, "int2-g16-asym-fp16-dyn", 5, None),  # and kivi2's
    (16, "int2-g4-asym-fp32-dyn", "tokens", True, False, "int2-g8-asym-fp32-dyn", 5, None),  # RoPE without the rotation
    (32, "int4-g8-asym-fp16-dyn", "head_dim", True, True, "int8-g32-asym-fp16-dyn", 5, None),  # per-token keys, pre-RoPE
    (8, "int4-g8-asym-fp16-dyn", "tokens", True, True, "int4-g8-asym-fp16-dyn", 5, None),  # one 8-lane block: no strides
    (16, "int4-g4-asym-fp16-dyn", "tokens", False, False, "int2-g4-asym-fp16-dyn", 5, None),  # keys as attention reads them
    # no float window: the step's token completes a group, whose last parameter row is in the released span
    (16, "int4-g4-asym-fp16-dyn", "tokens", True, True, "int4-g8-asym-fp16-dyn", 0, None),
    # ZipCache: per-channel key pairs of both subsets by each token's salient flag, values per token (mixed formats)
    (16, "int4-g8-asym-fp16-dyn", "tokens", True, True, "int4-g8-asym-fp16-dyn", 3, ZIP_LOW),
    (32, "int4-g8-asym-fp16-dyn", "tokens", True, False, "int4-g8-asym-fp16-dyn", 0, (*ZIP_LOW[:2], 64)),  # zip42's
    # shape: no window, a block of 2 d tokens (one pair a row, the last in the span)
])
def test_window_decode_attention_reads_the_packed_buffers_as_kv_wpack_read_decodes_them(d, key_fmt, key_axis,
                                                                                        pre_rope, rotated, value_fmt,
                                                                                        window, zipped):
    """``window_cache.decode_attention_func`` (decode's attention over the packed window, read in place)
    gives the attention over what ``kv_wpack_read`` decodes from the same buffers after the step's write
    (tokens quantized up to ``kv_quantized_until(P + 1)``, sinks and float tokens from the rings), with
    3 query heads per K / V head and some keys masked (among them the first of a group). The past spans
    two of the kernel's split-K chunks, the second starting inside a key group. Without a float window
    the step's token completes a group: row ``P``'s parameters come from the released span. ZipCache's
    layouts: each token's salient flag picks its per-channel key pairs."""
    import numpy as np
    import tvm

    from finegrain.backends.tvm.kernels.attention import DECODE_MIN_CHUNK, padded_keys
    from finegrain.backends.tvm.window_cache import _read, decode_attention_func, window_layout

    b, hk, group, sinks, max_len = 1, 2, 3, 1, DECODE_MIN_CHUNK + 160
    h, scale = hk * group, 1.0 / d ** 0.5
    g = torch.Generator().manual_seed(d + window)
    freq = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d)).float() if pre_rope else None
    kinds = []
    lays = [window_layout(fmt, axis, d, window, sinks, None if zipped is None else (low, 0.5, zipped[2], False))
            for fmt, axis, low in ((key_fmt, key_axis, zipped and zipped[0]), (value_fmt, "head_dim", zipped and zipped[1]))]
    unit = lays[0]["unit"]
    p = DECODE_MIN_CHUNK + 61
    if window == 0:  # the step's write (token P) completes a unit
        p += (sinks - p - 1) % unit
    for lay, f in zip(lays, (freq, None)):
        sdt = torch.float16 if lay["scale"] == "float16" else torch.float32
        zeros = torch.randint(0, 2 ** lay["bits"], (b, p + 1, hk, lay["zcols"]), generator=g).to(torch.uint8)
        zeros[..., lay["cols"]:] = torch.randint(0, 2, zeros[..., lay["cols"]:].shape, generator=g).to(torch.uint8)
        # after the write of token P: P + 1 rows (the last row's codes are never read; its parameters are when
        # the step completes a unit: the kernel takes that row from the released span's)
        grown = (torch.randint(-2 ** 31, 2 ** 31 - 1, (b, p + 1, hk, lay["words"]), generator=g, dtype=torch.int64).int(),
                 (torch.rand(b, p + 1, hk, lay["cols"], generator=g) * 0.5 + 0.05).to(sdt), zeros)
        ring = torch.randn(b, lay["ring"], hk, d, generator=g)
        past = _read(*grown, ring, f, lay, rotated and f is not None)[:, :p]
        bufs = (*(x[:, :p] for x in grown), ring)
        kinds.append((lay, bufs, past, torch.randn(b, hk, 1, d, generator=g), [x[:, p:] for x in grown[1:]]))
    (klay, kbufs, kpast, kn, kspan), (vlay, vbufs, vpast, vn, _) = kinds
    if zipped is not None:  # both subsets present among the quantized keys
        flags = kbufs[2][0, sinks:, :, -1]
        assert 0 < flags.float().mean() < 1
    q = torch.randn(b, h, 1, d, generator=g)
    masked = [0, sinks + 16, 30, 31, DECODE_MIN_CHUNK + 1, p - 2]
    bias = torch.zeros(1, padded_keys(p + 1))
    bias[0, masked] = -torch.inf
    bias[0, p + 1:] = -torch.inf
    keys, values = (torch.cat([x.transpose(1, 2), n], 2).repeat_interleave(group, 1) for x, n in ((kpast, kn),
                                                                                                  (vpast, vn)))
    att = (q @ keys.transpose(-1, -2)) * scale + bias[:, :p + 1]
    want = torch.softmax(att, -1) @ values
    half = d // 2 if pre_rope else 1
    if pre_rope:
        ang = torch.arange(p, dtype=torch.float64)[:, None] * freq.double()[None, :]
        table = torch.cat([ang.cos(), ang.sin()], 1).float()
    else:
        table = torch.zeros(1, 2)
    func = decode_attention_func(b, h, hk, d, max_len, scale, klay, vlay, half if pre_rope else 0, rotated)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    args = [tvm.runtime.tensor(x.numpy()) for x in (q, *kbufs, kn, *kspan, *vbufs, vn, bias, table,
                                                     torch.zeros(b, h, 1, d))]
    lib(*args)
    got = args[-1].numpy()
    assert np.abs(got - want.numpy()).max() <= 2e-5 * max(1.0, want.abs().max().item()), np.abs(got - want.numpy()).max()


@pytest.mark.parametrize("d,hk,g,fmt,rotated,reorder,window", [
    (16, 2, 2, "int2-g8-asym-fp16-dyn", False, True, 3),  # GROUPED's shapes: 2 heads in one group of 32 channels
    (16, 3, 3, "int4-g16-asym-fp16-dyn", True, True, 0),  # 48 channels: a 12 x 12 factor... over blocks of 4: refused
    (64, 3, 3, "int4-g64-asym-fp16-dyn", True, True, 0),  # rotatekv4 on SmolLM2: 192 channels, 12 blocks of 16
    (16, 4, 2, "int4-g8-asym-fp16-dyn", True, False, 2),  # two groups, not reordered, per-head rotated
    (8, 2, 2, "int4-g8-asym-fp16-dyn", True, True, 1),  # RoPE pairs not a whole vector (4 of 8 lanes)
    (16, 2, 2, "int4-g8-asym-fp16-dyn", False, True, 1),  # partial RoPE: 8 of 16 channels rotary (below)
])
def test_grouped_decode_attention_reads_rotatekv_keys_as_the_grouped_read_decodes_them(d, hk, g, fmt, rotated, reorder,
                                                                                        window):
    """``window_cache.grouped_decode_attention_func`` (decode's attention over RotateKV's grouped-head keys
    read in place: each token's rotated rows taken back through the grouped Hadamard, the channel order
    and RoPE) gives the attention over what ``kv_wpack_read`` decodes from the same buffers (channels
    reordered across the groups), 2 query heads per K / V head, some keys masked; the past spans several
    of the kernel's chunks. Blocks of the grouped Hadamard under 8 channels are refused by name."""
    import numpy as np
    import tvm

    from finegrain.backends.tvm.kernels.attention import padded_keys
    from finegrain.backends.tvm.window_cache import _read, grouped_decode_attention_func, window_layout
    from finegrain.compiler.ops import _group_factor

    b, group, sinks, p = 1, 2, 1, 150
    h, scale = hk * group, 1.0 / d ** 0.5
    gen = torch.Generator().manual_seed(d + hk)
    rotary = d // 2 if window != 1 or d == 8 else d // 4  # RoPE pairs (the last case: partial RoPE)
    freq = 1.0 / (10000 ** (torch.arange(0, 2 * rotary, 2).double() / (2 * rotary))).float()
    klay = window_layout(fmt, "head_dim", d, window, sinks, None, g)
    vlay = window_layout("int4-g8-asym-fp16-dyn", "head_dim", d, window, sinks)
    fac = _group_factor(g * d, True)
    if (g * d // fac.shape[0]) < 8:
        with pytest.raises(ValueError, match="blocks of 4 channels"):
            grouped_decode_attention_func(b, h, hk, d, p + 8, scale, klay, vlay, rotary, rotated, fac.shape[0])
        return
    perm = torch.randperm(hk * d, generator=gen) if reorder else torch.arange(hk * d)
    kinds = []
    for lay, f, pm in ((klay, freq, perm if reorder else None), (vlay, None, None)):
        # after the write of token P: P + 1 rows (the last one's never read: per-token keys and values)
        grown = (torch.randint(-2 ** 31, 2 ** 31 - 1, (b, p + 1, hk, lay["words"]), generator=gen,
                               dtype=torch.int64).int(),
                 (torch.rand(b, p + 1, hk, lay["cols"], generator=gen) * 0.5 + 0.05).half(),
                 torch.randint(0, 2 ** lay["bits"], (b, p + 1, hk, lay["zcols"]), generator=gen).to(torch.uint8))
        ring = torch.randn(b, lay["ring"], hk, d, generator=gen)
        past = _read(*grown, ring, f, lay, rotated and f is not None, perm=pm)[:, :p]
        kinds.append(((*(x[:, :p] for x in grown), ring), past, torch.randn(b, hk, 1, d, generator=gen)))
    (kbufs, kpast, kn), (vbufs, vpast, vn) = kinds
    q = torch.randn(b, h, 1, d, generator=gen)
    bias = torch.zeros(1, padded_keys(p + 1))
    bias[0, [0, 5, 64, 65, p - 1]] = -torch.inf
    bias[0, p + 1:] = -torch.inf
    keys, values = (torch.cat([x.transpose(1, 2), n], 2).repeat_interleave(group, 1) for x, n in ((kpast, kn),
                                                                                                  (vpast, vn)))
    want = torch.softmax((q @ keys.transpose(-1, -2)) * scale + bias[:, :p + 1], -1) @ values
    ang = torch.arange(p, dtype=torch.float64)[:, None] * freq.double()[None, :]
    table = torch.cat([ang.cos(), ang.sin()], 1).float()
    func = grouped_decode_attention_func(b, h, hk, d, p + 8, scale, klay, vlay, rotary, rotated, fac.shape[0])
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    span = [torch.zeros(b, 1, hk, klay["cols"]).half(), torch.zeros(b, 1, hk, klay["zcols"], dtype=torch.uint8)]
    args = [tvm.runtime.tensor(x.numpy()) for x in (q, *kbufs, kn, *span, *vbufs, vn, bias, table, perm, fac,
                                                     torch.zeros(b, h, 1, d))]
    lib(*args)
    got = args[-1].numpy()
    assert np.abs(got - want.numpy()).max() <= 2e-5 * max(1.0, want.abs().max().item()), np.abs(got - want.numpy()).max()


def test_the_static_build_packs_kivi_and_says_why_it_leaves_a_layer_fp32():
    """``pack_window_cache``: KIVI's asymmetric integer writes packed (codes, scales, zeros, a ring of
    ``sinks + window + G`` rows per layer and K / V), RotateKV's grouped-head keys too (as virtual heads of
    their rotated space); grouped heads whose groups span the rotated row, and symmetric formats, left in an
    fp32 cache, each layer named with the reason (warned and listed in the manifest by the build)."""
    from finegrain.backends.tvm.lower import prepare

    model = _family("llama")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    for kv, why in ((KIVI, [9, 6]), (GROUPED, [5, 5]), ({**GROUPED, "kv_key": "int2-token-asym-fp16-dyn"},
                                                        "grouped-head keys are packed with groups"),
                    (PLAIN, "asymmetric integer formats")):
        cm = finegrain.compile(model, (ids,), recipe=_recipe(**kv), progress=False, kv_cache=True,
                               calibration=[(ids,)] if kv.get("kv_reorder") else None)
        pgm, _ = prepare(cm.gm, cm.input_specs, pack_kv=True)
        layers = cm.kv["layers"]
        if isinstance(why, list):  # packed: the rings' rows
            assert pgm.kv_unpacked == [] and len(pgm.kv_buffers) == 8 * layers
            assert [b.get("rows") for b in pgm.kv_buffers[:8]] == [None, None, None, why[0], None, None, None, why[1]]
            assert all(b["name"].startswith("kvw_") for b in pgm.kv_buffers)
        else:
            assert len(pgm.kv_unpacked) == layers and all(why in line for line in pgm.kv_unpacked), pgm.kv_unpacked
            assert [line.split(":")[0] for line in pgm.kv_unpacked] == [f"layer {i}" for i in range(layers)]
            assert all("packed" not in b for b in pgm.kv_buffers)


def test_kv_storage_float_keeps_an_fp32_cache_with_the_same_logits():
    """``cm.session("tvm", kv_storage="float")`` / ``finegrain build --kv-storage float``: a static build
    of RotateKV's grouped heads (packed by default, each past key taken back through the grouped rotation
    every step) holds every
    layer in an fp32 cache of the formats' values instead, with the packed build's logits; a bad value
    is named before any build."""
    from finegrain.errors import InputError

    model = _family("qwen2")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    cm = finegrain.compile(model, (ids,), recipe=_recipe(**GROUPED), progress=False, kv_cache=True,
                           calibration=[(ids,)])
    ref, _ = _incremental(cm, x, prefill=9)
    h, d = cm.kv["kv_heads"], cm.kv["head_dim"]
    for storage, first in (("packed", (1, 40, h, d // 16)), ("float", (1, 40, h, d))):
        with cm.session("tvm", target=TARGET, max_seq_len=40, kv_storage=storage) as s:
            inc, state = _incremental(s, x, prefill=9)
            assert tuple(state["past"][0].shape) == first
            assert len(state["past"]) == (8 if storage == "packed" else 2) * cm.kv["layers"]
            assert _rel(ref, inc) <= 1e-4, (storage, _rel(ref, inc))
    with pytest.raises(InputError, match="kv_storage 'fp8': 'packed'"):
        cm.session("tvm", target=TARGET, max_seq_len=40, kv_storage="fp8")


# ZipCache: the salient half of each write's released tokens (normalized attention score of probe queries) at 4
# bits, the rest at 2; keys per channel over each block's subsets (pre-RoPE, rotated) or token-wise after the
# per-channel normalizer
ZIP_CHANNEL = {"kv_key": "int4-g4-asym-fp16-dyn", "kv_value": "int4-g8-asym-fp16-dyn", "kv_key_axis": "tokens",
               "kv_window": 3, "kv_sinks": 1, "kv_pre_rope": True, "kv_rotate": True,
               "kv_zip_key": "int2-g4-asym-fp16-dyn", "kv_zip_value": "int2-g8-asym-fp16-dyn", "kv_zip_block": 4,
               "kv_zip_ratio": 0.5, "kv_zip_probes": 0.5}
ZIP_TOKEN = {"kv_key": "int4-token-asym-fp16-dyn", "kv_value": "int4-g8-asym-fp16-dyn",
             "kv_zip_key": "int2-token-asym-fp16-dyn", "kv_zip_value": "int2-g8-asym-fp16-dyn", "kv_zip_block": 4,
             "kv_zip_ratio": 0.25, "kv_zip_probes": 0.1}


@pytest.mark.parametrize("fmt,axis,low,channel_norm,pre_rope", [
    ("int4-token-asym-fp16-dyn", "head_dim", "int2-token-asym-fp16-dyn", True, False),  # ZipCache's own keys
    ("int4-g8-asym-fp16-dyn", "tokens", "int2-g8-asym-fp16-dyn", False, True),  # per channel over each subset
    ("int8-g8-asym-fp16-dyn", "head_dim", "int4-g8-asym-fp16-dyn", False, False),  # values in groups of 8
])
def test_zipcache_write_and_saliency_functions_equal_the_reference(fmt, axis, low, channel_norm, pre_rope):
    """The lowered ZipCache write alone (scores given), over pasts of every length around the window and
    block edges, equals ``kv_append`` and changes exactly the tokens it releases; the lowered saliency
    equals ``kv_saliency`` (probes of a chunk, of a decode step, GQA)."""
    import numpy as np
    import tvm
    from tvm import relax

    from finegrain.backends.tvm.lower_window import _saliency, relax_converters
    from finegrain.compiler.ops import kv_append, kv_quantized_span, kv_saliency_ref

    heads, d, window, sinks, block, ratio = 2, 16, 3, 1, 4, 0.5
    freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    bb = relax.BlockBuilder()
    p_len, s_len = tvm.tirx.Var("p", "int64"), tvm.tirx.Var("s", "int64")
    past = relax.Var("past", relax.TensorType([1, heads, p_len, d], "float32"))
    new = relax.Var("new", relax.TensorType([1, heads, s_len, d], "float32"))
    score = relax.Var("score", relax.TensorType([1, heads, p_len + s_len], "float32"))
    f_ = relax.Var("f", relax.TensorType([d // 2], "float32"))
    q = relax.Var("q", relax.TensorType([1, 3 * heads, s_len, d], "float32"))

    class Importer:  # the two calls a converter makes on the Relax frontend's importer
        block_builder = bb

        @staticmethod
        def retrieve_args(node):
            return node

    conv = relax_converters("")
    with bb.function("write", [past, new, f_, score]):
        with bb.dataflow():
            out = bb.emit_output(conv["kv_window_write.default"](
                (past, new, f_ if pre_rope else None, fmt, axis, window, sinks, pre_rope, None, 1, score, low, ratio,
                 block, channel_norm), Importer))
        bb.emit_func_output(out)
    with bb.function("saliency", [q, past, new]):
        with bb.dataflow():
            out = bb.emit_output(conv["kv_saliency.default"]((q, past, new, 0.3, 0.25), Importer))
        bb.emit_func_output(out)
    # as a static build calls it: the past token-major (read in place), nothing computed unless the writes release
    past_tm = relax.Var("past_tm", relax.TensorType([1, p_len, heads, d], "float32"))
    with bb.function("saliency_static", [q, past_tm, new]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit_te(lambda q_, a_, n_: _saliency(q_, a_, n_, 0.3, 0.25, (window, sinks, block),
                                                                         token_major=True), q, past_tm, new))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target(TARGET)), tvm.cpu())
    g = torch.Generator().manual_seed(0)

    def run(fn, *xs):
        return vm[fn](*(tvm.runtime.tensor(t.numpy()) for t in xs)).numpy()

    for p, s in [(0, 1), (0, 3), (0, 17), (3, 1), (5, 1), (8, 1), (9, 1), (13, 1), (7, 9), (14, 2), (0, 40)]:
        a, b = torch.randn(1, heads, p, d, generator=g) * 3, torch.randn(1, heads, s, d, generator=g) * 3
        sc = torch.rand(1, heads, p + s, generator=g)
        want = kv_append(a, b, fmt, axis, window, sinks, freq if pre_rope else None, pre_rope, sc, low, ratio, block,
                         channel_norm)
        got = run("write", a, b, freq, sc)
        assert np.abs(got - want.numpy()).max() <= 1e-5 * want.abs().max().item(), (p, s)
        lo, hi = kv_quantized_span("tokens", block, p, p + s, window, sinks)
        changed = (want - torch.cat([a, b], 2)).abs().amax(dim=(0, 1, 3)) > 1e-3  # per token
        assert changed.tolist() == [lo <= t < hi for t in range(p + s)], (p, s)
        qs = torch.randn(1, 3 * heads, s, d, generator=g)
        want = kv_saliency_ref(qs, a, b, 0.3, 0.25)
        assert np.abs(run("saliency", qs, a, b) - want.numpy()).max() <= 1e-6 * want.abs().max().item(), (p, s)
        got = run("saliency_static", qs, a.transpose(1, 2).contiguous(), b)
        if lo < hi:
            assert np.abs(got - want.numpy()).max() <= 1e-6 * want.abs().max().item(), (p, s)
        else:  # no block released: the score is not read, and not computed
            assert not got.any(), (p, s)


@pytest.mark.parametrize("family,kv,cache,prefill", [
    ("llama", ZIP_CHANNEL, "static", 13),  # packed; a deployment, also run by the standalone runtime script
    ("qwen2", ZIP_TOKEN, "concat", 9),  # GQA, biases; ZipCache's token-wise keys with the channel normalizer
    ("qwen2", ZIP_TOKEN, "static", 9),  # the channel normalizer is not packed: an fp32 cache, said so
    ("llama", {**ZIP_CHANNEL, "kv_window": 0, "kv_rotate": False, "kv_zip_block": 8}, "static", 11),  # zip42's shape
])
def test_zipcache_on_tvm_equals_the_reference(family, kv, cache, prefill, tmp_path, monkeypatch):
    """ZipCache's writes and saliency lowered: prefill + decode over the TVM build give the reference
    backend's logits and tokens. A static build holds them packed (``window_cache.zip_layout``: every
    token's codes at the high format's width, per-channel key parameters of both subsets spread over
    each block's rows with the salient flag beside them, values' per token, a ring of ``sinks + window +
    block`` rows), but ZipCache's channel-normalized token-wise keys, which stay in an fp32 cache of the
    format's values and say so; ZipCache over RotateKV's grouped heads is refused by name."""
    from finegrain.backends.tvm.lower_activations import TvmError

    model = _family(family)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    cm = finegrain.compile(model, (ids,), recipe=_recipe(**kv), progress=False, kv_cache=True)
    ref, _ = _incremental(cm, x, prefill=prefill)
    plain = finegrain.compile(model, (ids,), recipe=_recipe(**{k: v for k, v in kv.items() if "zip" not in k}),
                              progress=False, kv_cache=True)
    assert _rel(_incremental(plain, x, prefill=prefill)[0], ref) > 1e-3  # the low format is used: not KIVI-4
    prompt = x[:, :prefill]
    packed = cache == "static" and kv is not ZIP_TOKEN
    deployed = packed and kv is ZIP_CHANNEL
    built = _record_builds(monkeypatch)
    if deployed:
        cm.build(tmp_path / "dep", target=TARGET, max_seq_len=48)
    said = (pytest.warns(UserWarning, match="ZipCache's channel-normalized token-wise writes stay in an fp32 cache")
            if cache == "static" and not packed else contextlib.nullcontext())
    with said:
        session = cm.session("tvm", **({"path": tmp_path / "dep"} if deployed else
                                        {"target": TARGET, "max_seq_len": 48, "cache": cache}))
    with session as s:
        inc, state = _incremental(s, x, prefill=prefill)
        assert _rel(ref, inc) <= 1e-4, _rel(ref, inc)
        assert s.generate(prompt, 10).tokens == cm.generate(prompt, 10).tokens
    h, d = cm.kv["kv_heads"], cm.kv["head_dim"]
    shapes = [tuple(p.shape) for p in state["past"]]
    if packed:  # decode's attention reads the packed buffers in place (each key's pairs by its salient flag); the
        # decoded past is read only by the saliency, and computed (lazily) only in a step that releases a block
        called = _called(built[0])
        assert any(n.startswith("decode_attention_wpack") for n in called["decode"]), called["decode"]
        reads = [n for n in called["decode"] if n.startswith("decode_kv_wpack_read")]
        assert reads and all(n.endswith("_lazy") for n in reads), called["decode"]
        assert not any(n.endswith("_lazy") for n in called["prefill"]), called["prefill"]
    if packed:  # keys: 4-bit codes (the 2-bit tokens' too), 2 d pairs of a block over its rows + the flag column;
        # values: 4-bit codes, d / 8 groups per token; rings of sinks + window + block rows
        block, ring = kv["kv_zip_block"], 1 + kv["kv_window"] + kv["kv_zip_block"]
        cols = 2 * d // block
        assert shapes[:8] == [(1, 48, h, d // 8), (1, 48, h, cols), (1, 48, h, cols + 1), (1, ring, h, d),
                              (1, 48, h, d // 8), (1, 48, h, d // 8), (1, 48, h, d // 8), (1, ring, h, d)], shapes
    elif cache == "static":
        assert shapes[:2] == [(1, 48, h, d)] * 2
    if deployed:
        assert _standalone_tokens(tmp_path / "dep", prompt) == cm.generate(prompt, 10).tokens
        grouped = finegrain.compile(model, (ids,), recipe=_recipe(**{**ZIP_TOKEN, "kv_pre_rope": True,
                                                                        "kv_head_group": 2}),
                                    progress=False, kv_cache=True)
        with pytest.raises(TvmError, match=r"node kv_append\w* \(KV cache write\): ZipCache over RotateKV's grouped"):
            grouped.session("tvm", target=TARGET, max_seq_len=32)