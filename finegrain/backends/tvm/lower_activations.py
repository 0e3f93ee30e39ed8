"""Activation quantization in the TVM lowering: the ``fake_quant`` and ``a8_linear`` ops
(reference implementations), their scales chosen exactly as the reference does, the fake-quant
converter (fp32 compute) and :class:`A8Emitter`, which feeds INT8 codes to the integer-dot kernel
(``kernels/a8.py``). ``lower.py`` decides which linears get which."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from finegrain.errors import FinegrainError
from finegrain.formats import QuantFormat
from finegrain.formats.minifloat import MINIFLOATS
from finegrain.backends.tvm.kernels import a8


class TvmError(FinegrainError):
    """The TVM backend cannot lower or build this model; the message names the node / layer."""


@torch.library.custom_op("finegrain::fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, fmt: str, scale: Optional[torch.Tensor] = None,
               zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` of an activation in one op (reference implementation)."""
    f = QuantFormat.parse(fmt)
    return f.dequantize(f.quantize(x, scale, zero), x.dtype)


@fake_quant.register_fake
def _(x, fmt, scale=None, zero=None):
    return torch.empty_like(x)


@torch.library.custom_op("finegrain::a8_linear", mutates_args=())
def a8_linear(x: torch.Tensor, act: str, act_scale: Optional[torch.Tensor], act_zero: Optional[torch.Tensor],
              w: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, cs: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fake_quant(x, act) @ W^T + bias`` with W in the integer-dot kernel's layout (``kernels/a8.py``;
    reference implementation: the TVM kernel computes it with INT8 codes and integer sums)."""
    return F.linear(fake_quant(x, act, act_scale, act_zero), a8.unpack_weight_ref(w, ga, gb, cs), bias)


@a8_linear.register_fake
def _(x, act, act_scale, act_zero, w, ga, gb, cs, bias=None):
    return x.new_empty((*x.shape[:-1], w.shape[1]))


FAKE_QUANT = torch.ops.finegrain.fake_quant.default
A8_LINEAR = torch.ops.finegrain.a8_linear.default


def act_format(fmt: str, where: str) -> QuantFormat:
    """The activation formats the TVM lowering computes: integers per token / tensor with float
    scales, dynamic or static, and dynamic integers in groups along the row (fake-quantized)."""
    f = QuantFormat.parse(fmt)
    blocks = f.scale in ("e8m0", "e4m3") and f.granularity in ("group", "token") and f.dynamic and f.symmetric
    if f.kind not in ("int", *MINIFLOATS) or not (f.scale in ("fp32", "fp16", "bf16") or blocks) or f.block_rows \
            or not (f.granularity in ("token", "tensor") or (f.granularity == "group" and f.dynamic)):
        raise TvmError(f"{where}: activation format {fmt} has no TVM lowering (integer and minifloat activations "
                       "per token or per tensor with float scales do, and dynamic ones in groups along the row with "
                       "float, E8M0 (MX) or two-level E4M3 (NV) scales)")
    return f


def _minifloat_round(v, f: QuantFormat):
    """``v`` (fp32, already divided by its scale) rounded to the minifloat grid of ``f`` as the
    reference's cast rounds it (``formats/minifloat.py``): saturated at the largest finite value,
    then to nearest, ties to even, on the step ``2^(max(floor(log2 |v|), emin) - mantissa bits)``
    (subnormals below the smallest normal)."""
    from tvm import te, tirx

    emin, mant = MINIFLOATS[f.kind].emin, MINIFLOATS[f.kind].mantissa
    m = tirx.const(f.family.max_value(f), "float32")
    c = te.max(te.min(v, m), -m)
    a = te.abs(c)
    step = _pow2(te.max(_floor_log2(a), emin) - mant)
    q = tirx.nearbyint(a / step) * step
    return tirx.Select(c < tirx.const(0.0, "float32"), -q, q)


def e4m3_bits(v, f: QuantFormat):
    """The FP8 E4M3 bit pattern (int32, 0..255) of fp32 ``v`` (already divided by its scale) as torch's
    cast encodes it: :func:`_minifloat_round`'s value, then sign, exponent and mantissa fields (normal:
    ``(e + 7) << 3 | (|q| / 2^(e - 3) - 8)``; subnormal: ``|q| / 2^-9``); the sign from ``v``, so a
    negative value that rounds to zero is -0 (0x80) as in torch."""
    from tvm import tirx

    q = tirx.abs(_minifloat_round(v, f))
    e = tirx.max(_floor_log2(q), -6)  # the subnormals' (and zero's) exponent: the normal branch stays finite
    normal = tirx.nearbyint(q / _pow2(e - 3)).astype("int32") - 8 + ((e + 7) << 3)
    sub = tirx.nearbyint(q * tirx.const(512.0, "float32")).astype("int32")
    mag = tirx.Select(q >= tirx.const(2.0 ** -6, "float32"), normal, sub)
    return tirx.Select(v < tirx.const(0.0, "float32"), mag | 128, mag)


def e4m3_value(u):
    """The fp32 value of the E4M3 bit pattern ``u`` (int32, 0..255; no NaN: the encoder saturates):
    the pattern read as fp16 and converted (``kernels.lowbit.minifloat_half``, exact), times 2^8."""
    from tvm import tirx

    from finegrain.backends.tvm.kernels.lowbit import half_gain, minifloat_half

    return minifloat_half(u, "e4m3") * tirx.const(1.0 / half_gain("e4m3"), "float32")


def _pow2(e):
    """``2^e`` (fp32) for an int32 exponent in the normal range [-126, 127], built from its bits."""
    from tvm import tirx

    return tirx.reinterpret("float32", (e + 127) << 23)


def _floor_log2(v):
    """``floor(log2 v)`` of a positive normal fp32 ``v``: its biased exponent bits, exactly."""
    from tvm import tirx

    return ((tirx.reinterpret("int32", v) >> 23) & 255) - 127


def _block_scale(bb, amax, f: QuantFormat, prefix: str):
    """The scales of symmetric INT groups with block scale types (``formats/scales.choose``):
    ``e8m0``: ``2^(floor(log2(amax * clip)) - emax)`` (1 for an all-zero group; the exponent is
    clamped at -126, the reference's at -127: they differ only for groups under 2^-120);
    ``e4m3``: the two-level NVINT scale, ``round_e4m3(s_g / t) * t`` with ``s_g = amax * clip /
    max_value`` and ``t = max_g(s_g) / 448`` over the whole tensor (E4M3 rounding computed on its
    grid: step ``2^(max(floor(log2 v), -6) - 3)``, half to even, saturating at 448)."""
    import math

    from tvm import relax, te, tirx

    c = float(f.clip)
    if f.scale == "e8m0":
        emax = math.floor(math.log2(f.family.max_value(f)))
        a = bb.emit(relax.op.multiply(amax, relax.const(c, "float32")))

        def e8(a_):
            def body(*i):
                ex = te.max(te.min(_floor_log2(a_(*i)) - emax, 127), -126)
                return tirx.Select(a_(*i) > tirx.const(0.0, "float32"), _pow2(ex), tirx.const(1.0, "float32"))

            return te.compute(a_.shape, body, name="e8m0_scale")

        return bb.emit_te(e8, a, primfunc_name_hint=f"{prefix}act_e8m0_scale")
    raw = bb.emit(relax.op.divide(relax.op.multiply(amax, relax.const(c, "float32")),
                                  relax.const(f.family.max_value(f), "float32")))
    t = bb.emit(relax.op.divide(relax.op.max(raw, axis=None, keepdims=True), relax.const(448.0, "float32")))
    t = bb.emit(relax.op.where(relax.op.greater(t, relax.const(0.0, "float32")), t, relax.const(1.0, "float32")))

    def e4(r_, t_):
        def body(*i):
            tv = t_(*[0] * len(i))
            v = te.max(te.min(r_(*i) / tv, tirx.const(448.0, "float32")), tirx.const(2.0 ** -9, "float32"))
            step = _pow2(te.max(_floor_log2(v), -6) - 3)
            return te.min(tirx.nearbyint(v / step) * step, tirx.const(448.0, "float32")) * tv

        return te.compute(r_.shape, body, name="e4m3_scale")

    return bb.emit_te(e4, raw, t, primfunc_name_hint=f"{prefix}act_e4m3_scale")


def _row_groups(bb, xf, f: QuantFormat, prefix: str):
    """``xf[..., K]`` viewed as ``[..., ceil(K / G), G]`` for a format in groups of ``G`` along the row,
    a ragged last group padded by repeating the row's last element (as ``QuantFormat._grouped``:
    no group's min / max / absmax changes), and the same format per token over that view."""
    from tvm import te

    k, g = int(xf.ty.shape[-1]), f.group_size
    ng = -(-k // g)

    def gather(x_):
        return te.compute((*x_.shape[:-1], ng, g),
                          lambda *i: x_(*i[:-2], te.min(i[-2] * g + i[-1], k - 1)), name="act_groups")

    xg = bb.emit_te(gather, xf, primfunc_name_hint=f"{prefix}act_groups")
    return xg, f.per_row()


def convert_fake_quant(prefix: str):
    def convert(node, importer):
        return _fake_quant(node, importer, prefix)

    return convert


def _fake_quant(node, importer, prefix: str):
    """Activation fake quantization, as the reference computes it: dynamic scales from the row /
    tensor / group range (fp16-rounded when the format stores fp16 scales; E8M0 / two-level E4M3
    block scales), integers rounded half to even and clipped, minifloats rounded on their grid."""
    from tvm import relax, te, tirx

    bb = importer.block_builder
    args = importer.retrieve_args(node)
    x, fmt = args[0], args[1]
    f = act_format(fmt, f"node {node.name}")
    lo, hi = f.family.code_range(f)
    xf = bb.emit(relax.op.astype(x, "float32")) if x.ty.dtype != "float32" else x
    grouped = f.granularity == "group"
    if grouped:  # per group along the row: the scales of the padded group view, read at k // G
        if (args[2] if len(args) > 2 else None) is not None:
            raise TvmError(f"node {node.name}: static scales for activation groups ({fmt}) have no TVM lowering")
        xg, tok = _row_groups(bb, xf, f, prefix)
        s, z = _act_scale(bb, xg, tok, None, None, prefix)
    else:
        s, z = _act_scale(bb, xf, f, args[2] if len(args) > 2 else None, args[3] if len(args) > 3 else None, prefix)

    def fq(x_, s_, z_):
        def body(*idx):
            if grouped:
                at = (*idx[:-1], idx[-1] // f.group_size, 0)
                sv, zv = s_(*at), z_(*at)
            else:
                sv, zv = _bcast(s_, idx), _bcast(z_, idx)
            if f.kind in MINIFLOATS:
                return _minifloat_round(x_(*idx) / sv, f) * sv
            q = te.max(te.min(tirx.nearbyint(x_(*idx) / sv) + zv, float(hi)), float(lo))
            return (q - zv) * sv

        return te.compute(x_.shape, body, name="fake_quant")

    y = bb.emit_te(fq, xf, s, z, primfunc_name_hint=f"{prefix}act_fake_quant")
    return bb.emit(relax.op.astype(y, x.ty.dtype)) if x.ty.dtype != "float32" else y


def _bcast(t, idx):
    """``t`` (shape ``[.., 1]`` or ``[1, .., 1]``) read at ``idx``, broadcast over its unit dims."""
    from tvm import tirx

    return t(*[0 if isinstance(d, tirx.IntImm) and int(d) == 1 else i for d, i in zip(t.shape, idx)])


def _act_scale(bb, xf, f: QuantFormat, scale, zero, prefix: str):
    """``(scale, zero point)`` of activation ``xf`` (fp32) in format ``f``, keepdims-shaped: the
    static ones reshaped, or the dynamic ones from the row / tensor range as the reference
    chooses them."""
    from tvm import relax, te, tirx

    nd = len(xf.ty.shape)
    if scale is not None:
        s = bb.emit(relax.op.astype(scale, "float32"))
        z = bb.emit(relax.op.astype(zero, "float32"))
        if f.granularity == "tensor":
            s, z = bb.emit(relax.op.reshape(s, [1] * nd)), bb.emit(relax.op.reshape(z, [1] * nd))
        return s, z
    axis = [-1] if f.granularity == "token" else list(range(nd))
    zero_c = relax.const(0.0, "float32")
    c = float(f.clip)
    if f.scale in ("e8m0", "e4m3"):
        s = _block_scale(bb, bb.emit(relax.op.max(relax.op.abs(xf), axis=axis, keepdims=True)), f, prefix)
        return s, bb.emit(relax.op.multiply(s, zero_c))
    if f.symmetric:
        amax = bb.emit(relax.op.max(relax.op.abs(xf), axis=axis, keepdims=True))
        # amax * clip / max_value in this order, as the reference: amax * (1 / 127) differs by an ulp
        s = bb.emit(relax.op.divide(relax.op.multiply(amax, relax.const(c, "float32")),
                                    relax.const(f.family.max_value(f), "float32")))
    else:
        mn = bb.emit(relax.op.multiply(relax.op.minimum(relax.op.min(xf, axis=axis, keepdims=True), zero_c),
                                       relax.const(c, "float32")))
        mx = bb.emit(relax.op.multiply(relax.op.maximum(relax.op.max(xf, axis=axis, keepdims=True), zero_c),
                                       relax.const(c, "float32")))
        s = bb.emit(relax.op.divide(relax.op.subtract(mx, mn), relax.const(float(2 ** f.bits - 1), "float32")))
    if f.scale in ("fp16", "bf16"):
        s = bb.emit(relax.op.astype(relax.op.astype(s, "float16" if f.scale == "fp16" else "bfloat16"), "float32"))
    s = bb.emit(relax.op.where(relax.op.greater(s, zero_c), s, relax.const(1.0, "float32")))
    if f.symmetric:
        return s, bb.emit(relax.op.multiply(s, zero_c))

    def zp(mn_, s_):
        return te.compute(mn_.shape, lambda *i: te.max(te.min(tirx.nearbyint(-mn_(*i) / s_(*i)),
                                                              float(2 ** f.bits - 1)), 0.0), name="zp")

    return s, bb.emit_te(zp, mn, s, primfunc_name_hint=f"{prefix}act_zero_point")


def flat_rows(shape: list):
    """The row count of ``x[..., K]`` flattened to ``[rows, K]`` (symbolic when a dim is)."""
    rows = shape[0]
    for d in shape[1:-1]:
        rows = rows * d
    return rows


class A8Emitter:
    """Emits integer-dot linears into a Relax block: the activation's INT8 codes, group sums and
    row scales (computed once per activation and shared by the linears that read it: q / k / v,
    gate / up), then one ``call_tir`` to ``kernels/a8.py``'s kernel (GEMV for one row, else rows
    padded to whole blocks, run, cut). Used by the importer and by ``benchmarks/tvm_kernels.py``."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.funcs: dict = {}
        self.quantized: list = []  # (activation, format tag, group size, (codes, sums, scales))

    def quantize(self, bb, x, x2, f: QuantFormat, scale, zero, gs: int, rows, padded):
        from tvm import te, tirx

        for prev, tag, g, out in self.quantized:  # the same activation (the importer's value of one FX node)
            if prev.same_as(x) and tag == f.tag and g == gs:
                return out
        lo, hi = f.family.code_range(f)
        k = int(x2.ty.shape[-1])
        s, _ = _act_scale(bb, x2, f, scale, zero, self.prefix)

        def codes(x_, s_):
            return te.compute((padded, k), lambda i, c: te.if_then_else(
                i < rows, te.max(te.min(tirx.nearbyint(x_[i, c] / _bcast(s_, (i, c))), float(hi)), float(lo)),
                0.0).astype("int8"), name="act_codes")

        def sums(q_):
            r = te.reduce_axis((0, gs), "r")
            return te.compute((padded, k // gs), lambda i, g: te.sum(q_[i, g * gs + r].astype("int32"), axis=r),
                              name="act_group_sums")

        def row_scales(s_):
            return te.compute((padded,), lambda i: te.if_then_else(i < rows, _bcast(s_, (i, 0)), 0.0),
                              name="act_row_scales")

        xq = bb.emit_te(codes, x2, s, primfunc_name_hint=f"{self.prefix}act_codes")
        out = (xq, bb.emit_te(sums, xq, primfunc_name_hint=f"{self.prefix}act_group_sums"),
               bb.emit_te(row_scales, s, primfunc_name_hint=f"{self.prefix}act_row_scales"))
        self.quantized.append((x, f.tag, gs, out))
        return out

    def linear(self, bb, x, f: QuantFormat, scale, zero, w, ga, gb, cs, bias=None):
        """``y = a8_linear(x, ...)`` for a Relax value ``x[..., K]``."""
        from tvm import relax, te, tirx

        shape = list(x.ty.shape)
        k, n, g_count = int(shape[-1]), int(w.ty.shape[1]), int(ga.ty.shape[0])
        gs, epilogue = k // g_count, "int" if ga.ty.dtype == "int32" else "float"
        rows = flat_rows(shape)
        one = isinstance(rows, tirx.IntImm) and int(rows) == 1
        rb = 1 if one else a8.ROW_BLOCK
        mq = 1 if one else tirx.floordiv(rows + rb - 1, rb)
        x2 = bb.emit(relax.op.reshape(x, [rows, k]))
        if x.ty.dtype != "float32":
            x2 = bb.emit(relax.op.astype(x2, "float32"))
        xq, xs, xsc = self.quantize(bb, x, x2, f, scale, zero, gs, rows, mq * rb)
        key = f"{self.prefix}a8{epilogue}_{'gemv' if one else 'gemm'}_k{k}_n{n}_g{gs}"
        if key not in self.funcs:
            func = a8.linear_func(1 if one else None, k, n, gs, epilogue).with_attrs(
                {"op_pattern": 8, "global_symbol": key})  # opaque: nothing is fused into it
            self.funcs[key] = bb.add_func(func, key)
        ins = [bb.emit(relax.op.reshape(xq, [mq, rb, k])), bb.emit(relax.op.reshape(xs, [mq, rb, g_count])),
               bb.emit(relax.op.reshape(xsc, [mq, rb])), w, ga, gb, cs]
        y3 = bb.emit(relax.call_tir(self.funcs[key], ins, relax.TensorType([mq, rb, n], "float32")))
        y = bb.emit(relax.op.reshape(y3, [mq * rb, n]))
        if not one:
            y = bb.emit_te(lambda t: te.compute((rows, n), lambda i, c: t[i, c], name="cut_rows"), y,
                           primfunc_name_hint=f"{self.prefix}cut_rows")
        y = bb.emit(relax.op.reshape(y, [*shape[:-1], n]))
        if x.ty.dtype != "float32":
            y = bb.emit(relax.op.astype(y, x.ty.dtype))
        return bb.emit(relax.op.add(y, bias)) if bias is not None else y


def convert_a8_linear(prefix: str):
    emitter = A8Emitter(prefix)

    def convert(node, importer):
        args = importer.retrieve_args(node)
        x, act, scale, zero, w, ga, gb, cs = args[:8]
        f = act_format(act, f"node {node.name}")
        return emitter.linear(importer.block_builder, x, f, scale, zero, w, ga, gb, cs,
                              args[8] if len(args) > 8 else None)

    return convert
