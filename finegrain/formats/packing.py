"""Dense bit packing of integer codes along the last dimension (storage layout of artifacts).

Codes of ``b`` bits are stored as an unsigned bit stream, little-endian within each byte:
element ``i`` of a row occupies bits ``[i*b, (i+1)*b)`` of the row's stream. For 4-bit codes
this is "low nibble = even element" (the ONNX Runtime MatMulNBits convention). Each row is padded
to whole bytes. Signed codes are stored offset by ``2^(b-1)``.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def packed_row_bytes(k: int, bits: int) -> int:
    return math.ceil(k * bits / 8)


def pack(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack ``codes`` ``[..., K]`` (int8/uint8 in range) into uint8 ``[..., ceil(K*bits/8)]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack: bits={bits} out of range 1..8")
    u = codes.to(torch.int16) + (2 ** (bits - 1) if signed else 0)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ValueError(f"pack: codes out of range for {bits}-bit {'signed' if signed else 'unsigned'} values")
    arr = u.to(torch.uint8).numpy()
    lead, k = arr.shape[:-1], arr.shape[-1]
    bit_planes = np.unpackbits(arr[..., None], axis=-1, bitorder="little")[..., :bits]  # [..., K, bits]
    stream = bit_planes.reshape(*lead, k * bits)
    return torch.from_numpy(np.packbits(stream, axis=-1, bitorder="little"))


def unpack(packed: torch.Tensor, bits: int, signed: bool, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., ceil(K*bits/8)]`` back to codes ``[..., K]``.

    Runs on every forward of the reference backend, so it is vectorized in torch. When ``b``
    divides 8, each byte holds ``8 / b`` whole codes (shifts on uint8); otherwise 8 codes of ``b``
    bits are exactly ``b`` bytes, assembled into one little-endian int64 and split by shifts.
    """
    if packed.shape[-1] != packed_row_bytes(k, bits):
        raise ValueError(f"unpack: last dim {packed.shape[-1]} bytes does not hold {k} x {bits}-bit codes")
    if packed.numel() == 0:  # no rows (an empty KV cache)
        return torch.zeros(*packed.shape[:-1], k, dtype=torch.int8 if signed else torch.uint8)
    if 8 % bits == 0:
        vals = torch.stack([(packed >> (bits * i)) & (2**bits - 1) for i in range(8 // bits)], dim=-1)
        vals = vals.reshape(*packed.shape[:-1], -1)[..., :k]
        return (vals.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8) if signed else vals
    lead, chunks = packed.shape[:-1], math.ceil(k / 8)
    p = torch.nn.functional.pad(packed, (0, chunks * bits - packed.shape[-1])) if chunks * bits > packed.shape[-1] else packed
    p = p.reshape(*lead, chunks, bits).to(torch.int64)
    word = p[..., 0]
    for i in range(1, bits):
        word = word | (p[..., i] << (8 * i))
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64)
    vals = ((word.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(*lead, chunks * 8)[..., :k]
    return (vals - 2 ** (bits - 1)).to(torch.int8) if signed else vals.to(torch.uint8)
