"""The one number-format descriptor, :class:`QuantFormat`, and its shared group math.

A format is (element kind, bits, granularity, group size, symmetry, scale type, static/dynamic,
clip ratio). The *kind* selects a family that owns the element math (one file each):
``integer.py`` (INT2-8), ``minifloat.py`` (FP8 E4M3/E5M2, FP6 E3M2/E2M3, FP4 E2M1 via
``ml_dtypes``), ``bitmod.py`` (BitMoD per-group datatypes), ``codebook.py`` (NF4 and per-tensor
Lloyd-Max codebooks). The *scale type* (``scales.py``) says how each group's scale is stored:
fp32/fp16/bf16; ``e8m0`` (OCP MX: a shared power of two); ``e4m3`` (NVFP4/NVINT4: an FP8 block
scale times one fp32 tensor scale); ``int8`` (DGQ: an integer group scale times an fp16 channel
scale). Everything about *granularity* (how a tensor is cut into groups along its last dimension,
ragged last groups, exact storage bits) lives here once.

Granularity is always along the last dimension (the reduction dim K of a linear weight
``[N, K]`` or of an activation ``[..., K]``):

* ``tensor``  one scale for the whole tensor;
* ``channel`` one scale per row (weights: per output channel);
* ``token``   one scale per row of an activation (per token), normally ``dynamic``;
* ``group``   one scale per ``group_size`` consecutive elements of a row (MX: 32, NVFP4: 16). A
  ragged last group (K not a multiple of the group size, e.g. SmolLM2's K=576 with g128) is
  quantized exactly with its own scale, and its bytes are counted: the group size is never
  silently changed. With ``block_rows`` R (weights only) a scale is shared by R consecutive rows
  too: 2-D blocks of R x group_size (the block-wise FP8 of recent MoE releases: 128 x 128, tag
  ``e4m3-g128x128-sym-fp32``; torchao's ``block_size`` tuple). The block's scale is chosen from all
  its values; a ragged last row block is exact like a ragged group. :class:`QTensor` still carries
  the effective scale of every row (``[N, G]``); the artifact stores one per block
  (``stored_param_shape``), ``scales.stored_scale`` / ``formats.ops.unpack_weight`` convert.

:class:`QTensor` always carries the *effective* fp32 scale of every group (what ``decode``
multiplies by); ``scales.stored_scale`` / ``scales.load_scale`` convert it to and from what an
artifact stores (e.g. E8M0 exponents, FP8 block scales plus ``scale2``), bit-exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch

from finegrain.configs import check_fields

Granularity = Literal["tensor", "channel", "token", "group"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "token", "group")
MAX_GROUP = 1 << 16  # the largest group size a format may name (sane limit for formats read from files)


class QTensor(NamedTuple):
    """Quantized codes plus their per-group effective scale (fp32, exactly what the stored scale
    decodes to), per-group integer metadata ``zero`` (the zero point of asymmetric INT, the
    datatype id of BitMoD, else zeros), the second-level scale of two-level scale types
    (``scale2``: NV tensor scale ``(1,)`` or DGQ channel scales ``lead + (1,)``) and the codebook
    of codebook formats."""

    codes: torch.Tensor  # same shape as the source tensor; int8 (signed) or uint8 (unsigned)
    scale: torch.Tensor  # shape lead + (G,), fp32
    zero: torch.Tensor  # shape lead + (G,), int32
    scale2: torch.Tensor | None = None
    codebook: torch.Tensor | None = None


class Family(Protocol):
    """Element math of one format kind, applied to grouped values ``[..., G, gs]``.

    ``max_value`` is the largest code magnitude in scale units (127 for INT8, 6 for E2M1, 1 for a
    normalized codebook): scales are chosen as ``amax * clip / max_value``.
    """

    def validate(self, fmt: "QuantFormat") -> None: ...
    def element_bits(self, fmt: "QuantFormat") -> int: ...
    def metadata_bits(self, fmt: "QuantFormat") -> int: ...  # per group, besides the scale
    def code_range(self, fmt: "QuantFormat") -> tuple[int, int]: ...
    def max_value(self, fmt: "QuantFormat") -> float: ...
    def choose_params(self, xg: torch.Tensor, fmt: "QuantFormat", clip) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def refine(self, xg: torch.Tensor, scale: torch.Tensor, meta, fmt: "QuantFormat", clip) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def encode(self, xg, scale, zero, fmt: "QuantFormat", codebook=None) -> torch.Tensor: ...
    def decode(self, codes, scale, zero, fmt: "QuantFormat", codebook=None) -> torch.Tensor: ...


@functools.lru_cache(maxsize=1)
def _families() -> dict[str, Family]:
    # Built once (``QuantFormat.family`` asks per call: GPTQ's column sweep asks ~150,000 times).
    # Literal table (no registry magic): a new family is one more entry here.
    from finegrain.formats.bitmod import BITMOD
    from finegrain.formats.codebook import LLOYD_MAX, NF
    from finegrain.formats.integer import INT
    from finegrain.formats.minifloat import MINIFLOATS

    return {"int": INT, **MINIFLOATS, "bitmod": BITMOD, "nf": NF, "lm": LLOYD_MAX}


def _clip_of(clip, xg: torch.Tensor) -> torch.Tensor | float:
    """A clip ratio as a float or a tensor broadcastable to ``xg.shape[:-1]``."""
    return clip if isinstance(clip, (int, float)) else clip.float().reshape(xg.shape[:-1])


@dataclass(frozen=True)
class QuantFormat:
    """A number format and its granularity. Frozen; validates itself on construction."""

    kind: str = "int"
    bits: int = 8
    granularity: Granularity = "channel"
    group_size: int | None = None
    symmetric: bool = True
    scale: str = "fp16"
    dynamic: bool = False
    clip: float = 1.0  # range = clip x (max |x| or [min, max]) when scales are chosen from the data
    block_rows: int | None = None  # 2-D blocks: rows sharing a group's scale (weights; group granularity)

    def __post_init__(self) -> None:
        from finegrain.formats import scales

        families = _families()
        if not isinstance(self.clip, (int, float)) or isinstance(self.clip, bool) or not 0.0 < self.clip <= 1.0:
            raise ValueError(f"QuantFormat.clip={self.clip!r}: must be a number in (0, 1]")
        if self.kind not in families:
            raise ValueError(f"QuantFormat.kind={self.kind!r}: unknown kind; known: {sorted(families)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantFormat.granularity={self.granularity!r}: must be one of {GRANULARITIES}")
        if self.granularity == "group":
            if (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                    or not 1 <= self.group_size <= MAX_GROUP):
                raise ValueError(f"QuantFormat.group_size={self.group_size!r}: 'group' granularity needs an integer in "
                                 f"[1, {MAX_GROUP}]")
        elif self.group_size is not None:
            raise ValueError(f"QuantFormat.group_size={self.group_size!r}: only valid with granularity='group'")
        if self.block_rows is not None:
            if (not isinstance(self.block_rows, int) or isinstance(self.block_rows, bool)
                    or not 1 <= self.block_rows <= MAX_GROUP):
                raise ValueError(f"QuantFormat.block_rows={self.block_rows!r}: must be an integer in [1, {MAX_GROUP}]")
            if self.granularity != "group" or self.dynamic or not self.symmetric or self.scale == "int8":
                raise ValueError("QuantFormat.block_rows (2-D blocks) needs static, symmetric 'group' granularity with "
                                 "a float, E8M0 or E4M3 scale (a weight format)")
        if self.dynamic and self.granularity == "channel":
            raise ValueError("QuantFormat.dynamic=True needs granularity 'token', 'tensor' or 'group', not 'channel'")
        families[self.kind].validate(self)
        scales.validate(self)

    # ---- identity -------------------------------------------------------------------------
    @property
    def family(self) -> Family:
        return _families()[self.kind]

    @property
    def signed(self) -> bool:
        """Whether codes are signed (stored offset by 2^(bits-1) when packed)."""
        return self.family.code_range(self)[0] < 0

    @property
    def element(self) -> str:
        """The element name: ``int4``, ``e2m1``, ``bitmod3``, ``nf4``, ``lm4``."""
        return self.kind if re.fullmatch(r"e\dm\d", self.kind) else f"{self.kind}{self.bits}"

    @property
    def tag(self) -> str:
        """Compact, parseable name, e.g. ``int4-g128-asym-fp16``, ``int8-token-sym-fp32-dyn``,
        ``e2m1-g32-sym-e8m0`` (MXFP4), ``e2m1-g16-sym-e4m3`` (NVFP4), ``int4-token-sym-fp32-dyn-clip0.9``,
        ``e4m3-g128x128-sym-fp32`` (2-D blocks: groups of 128 along K shared by 128 rows)."""
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        if self.block_rows:
            gran += f"x{self.block_rows}"
        parts = [self.element, gran, "sym" if self.symmetric else "asym", self.scale]
        return "-".join(parts + (["dyn"] if self.dynamic else []) + ([f"clip{self.clip:g}"] if self.clip != 1.0 else []))

    @classmethod
    def parse(cls, tag: str) -> "QuantFormat":
        m = re.fullmatch(r"(?:([a-z]+?)(\d+)|(e\dm\d))-(g\d+(?:x\d+)?|tensor|channel|token)-(sym|asym)-([a-z0-9]+)"
                         r"(-dyn)?(?:-clip([0-9.]+))?", tag)
        if not m:
            raise ValueError(f"format tag {tag!r} is malformed; expected e.g. 'int4-g128-asym-fp16' or 'e2m1-g32-sym-e8m0'")
        kind, bits, mini, gran, sym, scale, dyn, clip = m.groups()
        if mini:
            kind, bits = mini, 1 + int(mini[1]) + int(mini[3])
        group, _, rows = gran[1:].partition("x") if gran.startswith("g") else (None, "", "")
        return cls(kind=kind, bits=int(bits), granularity="group" if group else gran,
                   group_size=int(group) if group else None, symmetric=sym == "sym", scale=scale, dynamic=bool(dyn),
                   clip=float(clip) if clip else 1.0, block_rows=int(rows) if rows else None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "format") -> "QuantFormat":
        check_fields(cls, d, where)
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    # ---- grouping ---------------------------------------------------------------------------
    def num_groups(self, k: int) -> int:
        """Groups per row of length ``k`` (1 for tensor/channel/token)."""
        return math.ceil(k / self.group_size) if self.granularity == "group" else 1

    def param_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale / zero tensors for a tensor of ``shape``."""
        if self.granularity == "tensor":
            return (1,)
        return tuple(shape[:-1]) + (self.num_groups(shape[-1]),)

    def stored_param_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scales an artifact stores: ``param_shape``, with one row per block of
        ``block_rows`` rows for 2-D blocks."""
        p = self.param_shape(shape)
        if self.block_rows:
            return p[:-2] + (math.ceil(p[-2] / self.block_rows), p[-1])
        return p

    def _blocked(self, xg: torch.Tensor) -> torch.Tensor:
        """Grouped values ``[..., N, G, gs]`` as ``[..., NB, G, R * gs]``: every 2-D block one
        group (a ragged last row block padded by repeating the last row: no block's range changes)."""
        r, n = self.block_rows, xg.shape[-3]
        pad = -n % r
        if pad:
            xg = torch.cat([xg, xg[..., -1:, :, :].expand(*xg.shape[:-3], pad, *xg.shape[-2:])], dim=-3)
        lead, g, gs = xg.shape[:-3], xg.shape[-2], xg.shape[-1]
        return xg.reshape(*lead, -1, r, g, gs).transpose(-3, -2).reshape(*lead, -1, g, r * gs)

    def per_row(self) -> "QuantFormat":
        """This format with one group per row (``token`` granularity): a grouped format applied to a
        ``[..., G, group]`` view, or a block of tokens, with the same element, scale and clip."""
        return dataclasses.replace(self, granularity="token", group_size=None)

    def expand_rows(self, p: torch.Tensor, rows: int) -> torch.Tensor:
        """Per-block parameters ``[..., NB, G]`` -> per row ``[..., rows, G]`` (identity unless
        ``block_rows``)."""
        if not self.block_rows:
            return p
        return p.repeat_interleave(self.block_rows, dim=-2)[..., :rows, :]

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """View ``x`` as ``[..., G, gs]``; a ragged last group is padded by repeating the row's
        last element, which changes no group's min, max or absmax (so its scale stays exact)."""
        if self.granularity == "tensor":
            return x.reshape(1, 1, -1)
        if self.granularity in ("channel", "token"):
            return x.unsqueeze(-2)
        k, gs = x.shape[-1], self.group_size
        pad = self.num_groups(k) * gs - k
        if pad:
            x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
        return x.reshape(*x.shape[:-1], -1, gs)

    def _ungrouped(self, xg: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.granularity == "tensor":
            return xg.reshape(shape)
        flat = xg.reshape(*xg.shape[:-2], -1)
        return flat[..., : shape[-1]].reshape(shape)

    # ---- reference quantize / dequantize -------------------------------------------------------
    def quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                 *, clip: "float | torch.Tensor | None" = None) -> QTensor:
        """Reference quantizer. With ``scale`` (and ``zero``) given, encodes with those
        (static activations); otherwise chooses them from ``x`` (weights, dynamic activations).
        ``clip`` overrides ``self.clip``, as a float or one ratio per group (clip search)."""
        from finegrain.formats import scales

        xg = self._grouped(x.float())
        pshape = self.param_shape(tuple(x.shape))
        scale2 = codebook = None
        if scale is None and self.block_rows:
            if isinstance(clip, torch.Tensor):
                raise ValueError(f"{self.tag}: a clip ratio per group does not apply to 2-D blocks (search per block)")
            if x.dim() < 2:
                raise ValueError(f"{self.tag}: 2-D blocks need a matrix, got shape {tuple(x.shape)}")
            xb = self._blocked(xg)
            scale, zero, scale2, codebook = scales.choose(self, xb, _clip_of(self.clip if clip is None else clip, xb))
            scale, zero = self.expand_rows(scale, xg.shape[-3]), self.expand_rows(zero, xg.shape[-3])
        elif scale is None:
            c = _clip_of(self.clip if clip is None else clip, xg)
            scale, zero, scale2, codebook = scales.choose(self, xg, c)
        else:
            scale = scale.float().reshape(xg.shape[:-1])
            zero = torch.zeros_like(scale, dtype=torch.int32) if zero is None else zero.reshape(xg.shape[:-1])
        codes = self.family.encode(xg, scale, zero, self, codebook)
        return QTensor(self._ungrouped(codes, x.shape), scale.reshape(pshape), zero.to(torch.int32).reshape(pshape),
                       scale2, codebook)

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reference dequantizer: the one definition every backend is tested against."""
        cg = self._grouped(q.codes)
        gshape = cg.shape[:-1]
        out = self.family.decode(cg, q.scale.float().reshape(gshape), q.zero.reshape(gshape), self, q.codebook)
        return self._ungrouped(out, q.codes.shape).to(dtype)

    def fake_quantize(self, x: torch.Tensor, *, clip: "float | torch.Tensor | None" = None) -> torch.Tensor:
        return self.dequantize(self.quantize(x, clip=clip), x.dtype)

    def column_params(self, q: QTensor, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of column ``col`` of a quantized 2-D weight, each ``[N, 1]`` (GPTQ
        quantizes one column at a time with fixed group parameters)."""
        n = q.codes.shape[0]
        if self.granularity == "tensor":
            return q.scale.reshape(1, 1).expand(n, 1), q.zero.reshape(1, 1).expand(n, 1)
        g = col // self.group_size if self.granularity == "group" else 0
        return q.scale[:, g:g + 1], q.zero[:, g:g + 1]

    def quantize_column(self, w: torch.Tensor, q: QTensor, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[N]`` and dequantized values ``[N]`` of one weight column ``w`` ``[N]`` under the
        fixed parameters of ``q`` (column ``col``'s group)."""
        s, z = self.column_params(q, col)
        codes = self.family.encode(w.float().reshape(-1, 1, 1), s, z, self, q.codebook)
        return codes.reshape(-1), self.family.decode(codes, s, z, self, q.codebook).reshape(-1)

    # ---- size accounting --------------------------------------------------------------------
    def storage_bits(self, shape: tuple[int, ...]) -> int:
        """Exact bits to store a tensor of ``shape``: elements plus every stored scale, zero
        point, per-group metadata, second-level scale and codebook (dynamic formats store no
        scales)."""
        from finegrain.formats import scales

        numel = math.prod(shape)
        bits = numel * self.family.element_bits(self)
        if not self.dynamic:
            per_group = scales.SCALE_BITS[self.scale] + self.family.metadata_bits(self)
            bits += math.prod(self.stored_param_shape(tuple(shape))) * per_group
            bits += scales.second_level_bits(self, tuple(shape))
            bits += getattr(self.family, "codebook_bits", lambda f: 0)(self)
        return bits

    def stored_bytes(self, shape: tuple[int, ...]) -> int:
        """Exact bytes an artifact stores for a weight of ``shape`` (the layout of
        ``passes/insert_qdq.py``: each row's codes and packed metadata padded to whole bytes)."""
        from finegrain.formats import scales

        lead, k = math.prod(shape[:-1]), shape[-1]
        pshape = self.stored_param_shape(tuple(shape))
        total = lead * math.ceil(k * self.family.element_bits(self) / 8)
        total += math.prod(pshape) * scales.SCALE_BITS[self.scale] // 8
        mbits = self.family.metadata_bits(self)
        if mbits:
            total += math.prod(pshape[:-1]) * math.ceil(pshape[-1] * mbits / 8)
        total += scales.second_level_bits(self, tuple(shape)) // 8
        return total + getattr(self.family, "codebook_bits", lambda f: 0)(self) // 8

    def bits_per_element(self, shape: tuple[int, ...] | None = None) -> float:
        """True bits per element including scales; ``shape`` defaults to one row of 4096 (the
        nominal figure, e.g. 4.156 for int4-g128-asym-fp16; per-tensor scales and codebooks
        are amortized over that one row only, so real tensors come out a little lower)."""
        if shape is None:
            shape = (1, max(4096, self.group_size or 0))
        return self.storage_bits(shape) / math.prod(shape)

    def __str__(self) -> str:
        return self.tag
