"""Scale types: how each group's scale is chosen, stored and decoded.

* ``fp32`` / ``fp16`` / ``bf16``: ``s = amax * clip / max_value`` rounded to the dtype.
* ``e8m0`` (OCP Microscaling v1.0, MXINT8/MXFP8/MXFP6/MXFP4): a power of two shared by the block,
  ``X = 2^(floor(log2(amax)) - emax)`` with ``emax = floor(log2(max_value))`` the exponent of the
  element type's largest normal (E2M1: 2, E4M3: 8, E2M3: 2, E3M2: 4); values above
  ``max_value * X`` saturate (spec section 6.3). For INT elements the stored exponent is that of
  the code step (MXINT8's implicit 2^-6 is folded in). Stored as ``uint8`` biased by 127.
* ``e4m3`` (NVFP4 / NVINT4): two-level. One fp32 tensor scale ``t = max_g(s_g) / 448`` (so block
  scales fill the E4M3 range) and per block an E4M3 scale ``round_e4m3(s_g / t)``; the effective
  scale is ``e4m3 * t``. Stored as ``float8_e4m3fn`` plus ``scale2 = t``.
* ``int8`` (DGQ, Zhang et al. 2023): integer group scales ``S2`` in ``[1, S2max]`` times an fp16
  channel scale ``s1``, with ``S2max = 127 // max|q - z|`` so that ``S2 * (q - z)`` fits in INT8
  (INT4 -> INT8 dequantization, then an INT8 GEMM). ``s1`` is grid-searched per channel (phase 2
  of the paper's two-phase search; phase 1, the group scales, is the clip search of
  ``passes/weight_algorithms.py``). Stored as ``uint8`` plus ``scale2 = s1`` (fp16).
"""
from __future__ import annotations

import math

import torch

FLOAT_SCALES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCALE_TYPES = (*FLOAT_SCALES, "e8m0", "e4m3", "int8")
SCALE_BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "bf16": 16, "e8m0": 8, "e4m3": 8, "int8": 8}
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
DGQ_S1_GRID = 16  # phase-2 candidates per channel


def validate(fmt) -> None:
    if fmt.scale not in SCALE_TYPES:
        raise ValueError(f"QuantFormat.scale={fmt.scale!r}: must be one of {SCALE_TYPES}")
    if fmt.scale in ("e8m0", "e4m3"):
        if not fmt.symmetric or not (fmt.kind == "int" or fmt.kind.startswith("e")):
            raise ValueError(f"QuantFormat.scale={fmt.scale!r}: block scales take symmetric INT or minifloat "
                             f"elements, not {fmt.element} {'sym' if fmt.symmetric else 'asym'}")
    if fmt.scale == "int8":
        if fmt.kind != "int" or fmt.bits > 4 or fmt.granularity != "group" or fmt.dynamic:
            raise ValueError("QuantFormat.scale='int8' (dual-grained) needs static INT2-4 elements in groups, "
                             f"got {fmt.element} {fmt.granularity}{' dynamic' if fmt.dynamic else ''}")


def second_level_bits(fmt, shape: tuple[int, ...]) -> int:
    if fmt.scale == "e4m3":
        return 32  # one fp32 tensor scale
    if fmt.scale == "int8":
        return math.prod(shape[:-1]) * 16  # one fp16 channel scale per row
    return 0


def _amax(xg: torch.Tensor, clip) -> torch.Tensor:
    return xg.abs().amax(dim=-1) * clip


def dgq_max_factor(fmt) -> int:
    """Largest integer group scale S2 with S2 * (q - z) inside INT8: 16 for symmetric INT4
    (-8 * 16 = -128), 8 for asymmetric INT4 (|q - z| <= 15)."""
    lo, hi = fmt.family.code_range(fmt)
    return 128 // -lo if fmt.symmetric else 127 // (hi - lo)


def choose(fmt, xg: torch.Tensor, clip):
    """(scale, zero, scale2, codebook) for grouped values ``xg`` ``[..., G, gs]``."""
    fam = fmt.family
    scale2 = None
    if fmt.scale == "e8m0":
        amax = _amax(xg, clip)
        _, e = torch.frexp(amax)  # amax = m 2^e, m in [0.5, 1): floor(log2 amax) = e - 1
        emax = math.floor(math.log2(fam.max_value(fmt)))
        exp = (e - 1 - emax).clamp(-127, 127)
        scale = torch.where(amax > 0, torch.exp2(exp.float()), torch.ones_like(amax))
        meta = None
    else:
        raw, meta = fam.choose_params(xg, fmt, clip)
        if fmt.scale in FLOAT_SCALES:
            scale = raw.to(FLOAT_SCALES[fmt.scale]).float()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group
        elif fmt.scale == "e4m3":
            t = raw.amax() / E4M3_MAX
            t = torch.where(t > 0, t, torch.ones_like(t)).reshape(1)
            scale = (raw / t).clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX).to(torch.float8_e4m3fn).float() * t
            scale2 = t
        else:  # int8: DGQ
            return _dual_grained(fmt, xg, raw, meta, clip)
    zero, codebook = fam.refine(xg, scale, meta, fmt, clip)
    return scale, zero, scale2, codebook


def _dual_grained(fmt, xg: torch.Tensor, raw: torch.Tensor, meta, clip):
    """Phase 2 of DGQ's search: per channel, the fp16 scale s1 (and hence S2 = round(s_g / s1))
    minimizing the channel's reconstruction error, over s1 = max_g(s_g) / S2max * f."""
    fam = fmt.family
    smax = dgq_max_factor(fmt)
    top = raw.amax(dim=-1, keepdim=True) / smax  # every group representable without clamping S2
    top = torch.where(top > 0, top, torch.ones_like(top))
    best = None
    for f in torch.linspace(1.0, 0.3, DGQ_S1_GRID).tolist():
        s1 = (top * f).to(torch.float16).float()
        s1 = torch.where(s1 > 0, s1, torch.ones_like(s1))
        s2 = torch.clamp(torch.round(raw / s1), 1, smax)
        scale = s2 * s1
        zero, _ = fam.refine(xg, scale, meta, fmt, clip)
        deq = fam.decode(fam.encode(xg, scale, zero, fmt), scale, zero, fmt)
        err = (deq - xg).pow(2).sum(dim=(-1, -2))  # per channel
        if best is None:
            best = [err, scale, zero, s1]
        else:
            better = err < best[0]
            best[0] = torch.where(better, err, best[0])
            best[1] = torch.where(better.unsqueeze(-1), scale, best[1])
            best[2] = torch.where(better.unsqueeze(-1), zero, best[2])
            best[3] = torch.where(better.unsqueeze(-1), s1, best[3])
    return best[1], best[2], best[3], None


def stored_scale(fmt, q) -> torch.Tensor:
    """The scale tensor an artifact stores for ``q`` (``load_scale`` inverts it exactly; 2-D
    blocks: one row per block, ``fmt.expand_rows`` restores the per-row view)."""
    if fmt.block_rows:
        q = q._replace(scale=q.scale[..., ::fmt.block_rows, :])
    if fmt.scale in FLOAT_SCALES:
        return q.scale.to(FLOAT_SCALES[fmt.scale])
    if fmt.scale == "e8m0":
        _, e = torch.frexp(q.scale)
        return (e - 1 + 127).to(torch.uint8)
    if fmt.scale == "e4m3":
        return (q.scale / q.scale2).to(torch.float8_e4m3fn)
    return torch.round(q.scale / q.scale2.float()).to(torch.uint8)


def stored_scale2(fmt, q) -> torch.Tensor:
    """The second-level scale as stored: fp32 tensor scale (``e4m3``), fp16 channel scales (``int8``)."""
    return q.scale2.to(torch.float16) if fmt.scale == "int8" else q.scale2.float()


def load_scale(fmt, stored: torch.Tensor, scale2: torch.Tensor | None) -> torch.Tensor:
    """Effective fp32 scales from stored ones (the inverse of :func:`stored_scale`)."""
    if fmt.scale in FLOAT_SCALES:
        return stored.float()
    if fmt.scale == "e8m0":
        return torch.exp2(stored.float() - 127)
    return stored.float() * scale2.float()
