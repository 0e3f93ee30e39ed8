"""The one number-format descriptor, :class:`QuantFormat`, and its shared group math.

A format is (kind, bits, granularity, group size, symmetry, scale dtype, static/dynamic, clip
ratio). The
*kind* selects a family (``formats/integer.py`` today; MX, NVFP, minifloat, BitMoD and
dual-grained families plug into the same table) that owns the element math; everything about
*granularity* (how a tensor is cut into groups along its last dimension, ragged last groups,
exact storage bits) lives here once.

Granularity is always along the last dimension (the reduction dim K of a linear weight
``[N, K]`` or of an activation ``[..., K]``):

* ``tensor``  one scale for the whole tensor;
* ``channel`` one scale per row (weights: per output channel);
* ``token``   one scale per row of an activation (per token), normally ``dynamic``;
* ``group``   one scale per ``group_size`` consecutive elements of a row. A ragged last group
  (K not a multiple of the group size, e.g. SmolLM2's K=576 with g128) is quantized exactly
  with its own scale, and its bytes are counted: the group size is never silently changed.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch

from finegrain.configs import check_fields

Granularity = Literal["tensor", "channel", "token", "group"]
ScaleDtype = Literal["fp32", "fp16", "bf16"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "token", "group")
SCALE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCALE_BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "bf16": 16}


class QTensor(NamedTuple):
    """Quantized codes plus their per-group scale (fp32 values, already rounded to the scale
    dtype) and integer zero point (all zeros for symmetric formats)."""

    codes: torch.Tensor  # same shape as the source tensor; int8 (signed) or uint8 (unsigned)
    scale: torch.Tensor  # shape lead + (G,)
    zero: torch.Tensor  # shape lead + (G,), int32


class Family(Protocol):
    """Element math of one format kind, applied to grouped values ``[..., G, gs]``."""

    def validate(self, fmt: "QuantFormat") -> None: ...
    def element_bits(self, fmt: "QuantFormat") -> int: ...
    def metadata_bits(self, fmt: "QuantFormat") -> int: ...  # per group, besides the scale
    def code_range(self, fmt: "QuantFormat") -> tuple[int, int]: ...
    def choose_params(self, xg: torch.Tensor, fmt: "QuantFormat") -> tuple[torch.Tensor, torch.Tensor]: ...
    def encode(self, xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: "QuantFormat") -> torch.Tensor: ...
    def decode(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: "QuantFormat") -> torch.Tensor: ...


def _families() -> dict[str, Family]:
    # Literal table (no registry magic): a new family is one more entry here.
    from finegrain.formats.integer import INT

    return {"int": INT}


@dataclass(frozen=True)
class QuantFormat:
    """A number format and its granularity. Frozen; validates itself on construction."""

    kind: str = "int"
    bits: int = 8
    granularity: Granularity = "channel"
    group_size: int | None = None
    symmetric: bool = True
    scale: ScaleDtype = "fp16"
    dynamic: bool = False
    clip: float = 1.0  # range = clip x (max |x| or [min, max]) when scales are chosen from the data

    def __post_init__(self) -> None:
        families = _families()
        if not isinstance(self.clip, (int, float)) or isinstance(self.clip, bool) or not 0.0 < self.clip <= 1.0:
            raise ValueError(f"QuantFormat.clip={self.clip!r}: must be a number in (0, 1]")
        if self.kind not in families:
            raise ValueError(f"QuantFormat.kind={self.kind!r}: unknown kind; known: {sorted(families)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantFormat.granularity={self.granularity!r}: must be one of {GRANULARITIES}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"QuantFormat.group_size={self.group_size!r}: 'group' granularity needs a positive int")
        elif self.group_size is not None:
            raise ValueError(f"QuantFormat.group_size={self.group_size!r}: only valid with granularity='group'")
        if self.scale not in SCALE_DTYPES:
            raise ValueError(f"QuantFormat.scale={self.scale!r}: must be one of {sorted(SCALE_DTYPES)}")
        if self.dynamic and self.granularity not in ("token", "tensor"):
            raise ValueError(f"QuantFormat.dynamic=True needs granularity 'token' or 'tensor', not {self.granularity!r}")
        families[self.kind].validate(self)

    # ---- identity -------------------------------------------------------------------------
    @property
    def family(self) -> Family:
        return _families()[self.kind]

    @property
    def signed(self) -> bool:
        """Whether codes are signed (stored offset by 2^(bits-1) when packed)."""
        return self.family.code_range(self)[0] < 0

    @property
    def tag(self) -> str:
        """Compact, parseable name, e.g. ``int4-g128-asym-fp16``, ``int8-token-sym-fp32-dyn``,
        ``int4-token-sym-fp32-dyn-clip0.9``."""
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        parts = [f"{self.kind}{self.bits}", gran, "sym" if self.symmetric else "asym", self.scale]
        return "-".join(parts + (["dyn"] if self.dynamic else []) + ([f"clip{self.clip:g}"] if self.clip != 1.0 else []))

    @classmethod
    def parse(cls, tag: str) -> "QuantFormat":
        m = re.fullmatch(r"([a-z]+)(\d+)-(g\d+|tensor|channel|token)-(sym|asym)-(fp32|fp16|bf16)(-dyn)?"
                         r"(?:-clip([0-9.]+))?", tag)
        if not m:
            raise ValueError(f"format tag {tag!r} is malformed; expected e.g. 'int4-g128-asym-fp16'")
        kind, bits, gran, sym, scale, dyn, clip = m.groups()
        group = int(gran[1:]) if gran.startswith("g") else None
        return cls(kind=kind, bits=int(bits), granularity="group" if group else gran, group_size=group,
                   symmetric=sym == "sym", scale=scale, dynamic=bool(dyn), clip=float(clip) if clip else 1.0)

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
    def quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None) -> QTensor:
        """Reference quantizer. With ``scale`` (and ``zero``) given, encodes with those
        (static activations); otherwise chooses them from ``x`` (weights, dynamic activations)."""
        xg = self._grouped(x.float())
        if scale is None:
            scale, zero = self.family.choose_params(xg, self)
            scale = scale.to(SCALE_DTYPES[self.scale]).float()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group
        else:
            scale = scale.float().reshape(xg.shape[:-1])
            zero = torch.zeros_like(scale, dtype=torch.int32) if zero is None else zero.reshape(xg.shape[:-1])
        codes = self.family.encode(xg, scale, zero, self)
        pshape = self.param_shape(tuple(x.shape))
        return QTensor(self._ungrouped(codes, x.shape), scale.reshape(pshape), zero.to(torch.int32).reshape(pshape))

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reference dequantizer: the one definition every backend is tested against."""
        cg = self._grouped(q.codes)
        gshape = cg.shape[:-1]
        out = self.family.decode(cg, q.scale.float().reshape(gshape), q.zero.reshape(gshape), self)
        return self._ungrouped(out, q.codes.shape).to(dtype)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(x), x.dtype)

    # ---- size accounting --------------------------------------------------------------------
    def storage_bits(self, shape: tuple[int, ...]) -> int:
        """Exact bits to store a tensor of ``shape``: elements plus every stored scale, zero
        point and per-group metadata (dynamic formats store no scales)."""
        numel = math.prod(shape)
        bits = numel * self.family.element_bits(self)
        if not self.dynamic:
            per_group = SCALE_BITS[self.scale] + self.family.metadata_bits(self)
            bits += math.prod(self.param_shape(tuple(shape))) * per_group
        return bits

    def bits_per_element(self, shape: tuple[int, ...] | None = None) -> float:
        """True bits per element including scales; ``shape`` defaults to one row of a multiple
        of the group size (the nominal figure, e.g. 4.25 for int4-g128-asym-fp16)."""
        if shape is None:
            shape = (1, self.group_size or 4096)
        return self.storage_bits(shape) / math.prod(shape)

    def __str__(self) -> str:
        return self.tag
