"""Read a safetensors checkpoint one tensor at a time (models larger than RAM, ``driver/stream.py``).

A checkpoint is a directory's ``*.safetensors`` files (a sharded one's ``model.safetensors.index.json``
names which file holds which tensor; the headers are read either way and must agree with it). Each
read opens the file memory-mapped, copies one tensor out as float32 and closes the file again, so
the pages it touched are unmapped and never pile up in the process's resident set (a mapping kept
open over a 14 GB file would count every page read toward the peak RSS). Nothing is unpickled: a
directory holding only ``.bin`` / ``.pt`` weights is refused by the caller.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from finegrain.errors import InputError

INDEX = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20


def checked_finite(t: torch.Tensor, where, name: str) -> torch.Tensor:
    """``t``, or an InputError naming the weight when it holds NaN / Inf."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise InputError(f"{where}: weight {name!r} contains NaN or Inf; fix the checkpoint before quantizing")
    return t


class TensorIndex:
    """Names and shapes of a checkpoint's tensors (``self.shapes``), read from its headers."""

    shapes: dict[str, tuple[int, ...]]

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]


class SafetensorsCheckpoint(TensorIndex):
    """``{tensor name: file}`` of a checkpoint directory, read lazily: :meth:`load` returns one
    tensor as float32 (NaN / Inf refused by name), :meth:`shape` reads headers only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise InputError(f"{self.path}: no *.safetensors file (finegrain reads weights only from safetensors)")
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        if k in self.where:
                            raise InputError(f"{self.path}: tensor {k!r} is in both {self.where[k].name} and {f.name}")
                        self.where[k] = f
                        self.shapes[k] = tuple(h.get_slice(k).get_shape())
            except (SafetensorError, OSError) as e:
                raise InputError(f"{f}: not a valid safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
        index = self.path / INDEX
        if index.is_file():
            if index.stat().st_size > MAX_INDEX_BYTES:
                raise InputError(f"{index}: larger than {MAX_INDEX_BYTES >> 20} MiB")
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            for k, name in wmap.items() if isinstance(wmap, dict) else ():
                if k not in self.where or self.where[k].name != name:
                    raise InputError(f"{index}: weight_map[{k!r}] = {name!r}, but the headers put it in "
                                     f"{self.where[k].name if k in self.where else 'no file'}")

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor, copied out of the file as ``dtype``; the file is unmapped before returning."""
        f = self.where.get(name)
        if f is None:
            raise InputError(f"{self.path}: the checkpoint has no tensor {name!r}")
        try:
            with safe_open(str(f), framework="pt") as h:
                raw = h.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise InputError(f"{f}: tensor {name!r} does not read ({type(e).__name__}: {str(e)[:200]})") from None
        t = raw.to(dtype) if raw.dtype != dtype else raw.clone()
        del raw
        return checked_finite(t, f, name)
