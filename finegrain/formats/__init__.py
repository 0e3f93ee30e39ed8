"""Number formats: the only place bits, group sizes, symmetry and scale dtypes are defined."""
from finegrain.formats.base import QTensor, QuantFormat
from finegrain.formats.packing import pack, unpack

__all__ = ["QuantFormat", "QTensor", "pack", "unpack"]
