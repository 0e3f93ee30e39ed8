"""Tensors on disk as they are produced, saved later as one safetensors file without ever holding
them all in memory (block-by-block compilation, ``driver/stream.py``: each block's quantized weights
are spooled when the block is done, so a 7 B model's packed weights never sit in RAM together).

* :class:`TensorSpool`: ``put(t)`` appends ``t``'s bytes to one spool file (in a temporary directory,
  removed when the spool is garbage collected) and returns a tensor of the same shape and dtype
  memory-mapped from it (copy-on-write: reading it brings pages in, writing never reaches the
  file). The mapped tensor runs like any other; only the pages actually read become resident.
* :func:`write_safetensors`: a safetensors file from ``{name: tensor}`` where spooled tensors are
  copied file-to-file (``os.copy_file_range``; no page of them is mapped into this process) and the
  others written from memory. ``safetensors.torch.save_file`` would read every mapped tensor through
  the process's address space, so its resident set would grow by the whole file. The header is the
  format's (little-endian u64 length, JSON with dtype / shape / data_offsets per tensor and
  ``__metadata__``, padded with spaces to 8 bytes); tensors in sorted-name order, so the same
  tensors always give the same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_ALIGN = 64


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a uint8 array (no copy for a contiguous CPU tensor)."""
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


class TensorSpool:
    """Append-only tensor store in one file; see the module docstring."""

    def __init__(self, directory: str | Path | None = None):
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=".finegrain-spool-", dir=directory))
        self.path = self.dir / "tensors.bin"
        self._file = open(self.path, "wb")
        self._size = 0
        self._where: dict[int, tuple[int, int]] = {}  # data_ptr of a returned tensor -> (offset, nbytes)
        self._cleanup = weakref.finalize(self, TensorSpool._remove, self._file, self.dir)

    @staticmethod
    def _remove(f, d: Path) -> None:
        f.close()
        shutil.rmtree(d, ignore_errors=True)

    @property
    def nbytes(self) -> int:
        return self._size

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` written to the spool; returns the memory-mapped copy (``t`` itself when it is empty)."""
        if t.numel() == 0 or t.dtype not in ST_DTYPE:
            return t
        raw = _bytes_of(t)
        pad = -self._size % _ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self._size += pad
        offset = self._size
        self._file.write(memoryview(raw))
        self._file.flush()
        self._size += raw.nbytes
        mm = np.memmap(self.path, dtype=np.uint8, mode="c", offset=offset, shape=(raw.nbytes,))
        out = torch.from_numpy(mm).view(t.dtype).reshape(t.shape)
        self._where[out.data_ptr()] = (offset, raw.nbytes)
        return out

    def location(self, t: torch.Tensor) -> tuple[int, int] | None:
        """(offset, bytes) in the spool file of a tensor :meth:`put` returned, else None."""
        loc = self._where.get(t.data_ptr()) if t.device.type == "cpu" and t.numel() else None
        return loc if loc is not None and loc[1] == t.numel() * t.element_size() and t.is_contiguous() else None

    def close(self) -> None:
        self._cleanup()


def _copy_range(src, dst, offset: int, count: int) -> None:
    """``count`` bytes of ``src`` from ``offset`` appended to ``dst`` (flushed, at its end)."""
    while count > 0:
        try:
            n = os.copy_file_range(src.fileno(), dst.fileno(), count, offset)
        except (AttributeError, OSError):  # no copy_file_range here (other OS / file system): plain reads
            src.seek(offset)
            n = dst.write(src.read(min(count, 1 << 24)))
            dst.flush()
        if n <= 0:
            raise OSError(f"short copy from the tensor spool at byte {offset}")
        offset += n
        count -= n
    dst.seek(0, os.SEEK_END)  # the buffered writer's position after the kernel-side copy


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      spool: TensorSpool | None = None) -> None:
    """Write ``tensors`` as a safetensors file at ``path`` (module docstring)."""
    names = sorted(tensors)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for n in names:
        t = tensors[n]
        if t.dtype not in ST_DTYPE:
            raise TypeError(f"tensor {n!r}: dtype {t.dtype} has no safetensors code")
        size = t.numel() * t.element_size()
        header[n] = {"dtype": ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    src = open(spool.path, "rb") if spool is not None else None
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            f.flush()
            for n in names:
                t = tensors[n]
                loc = spool.location(t) if spool is not None else None
                if loc is not None:
                    _copy_range(src, f, *loc)
                else:
                    f.write(memoryview(_bytes_of(t)))
                    f.flush()
    finally:
        if src is not None:
            src.close()
