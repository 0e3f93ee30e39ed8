"""Open a GGUF file with the ``gguf`` package's reader, three times faster.

``gguf.GGUFReader`` maps the file with ``np.memmap`` and parses the header by slicing that map once
per value: about 250,000 slices for SmolLM2's tokenizer arrays, each paying ``np.memmap``'s
Python-level ``__array_finalize__`` (4.6 s of the reader's 4.7 s there). :func:`read_gguf` keeps the
mapping but parses through a plain ``ndarray`` view of it: the same bytes, the same fields and tensors
(their ``data`` plain arrays over the mapping), 1.5 s. Nothing in the file is executed either way:
GGUF is a flat header of typed values and tensor descriptors.
"""
from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def _reader_class():
    import gguf
    import numpy as np

    class _PlainViewReader(gguf.GGUFReader):
        """``GGUFReader`` whose ``data`` (assigned ``np.memmap(path)`` by its constructor) is kept as an
        ``ndarray`` view of the map; with a reader that no longer assigns ``data`` this is the plain
        reader."""

        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray)

    return _PlainViewReader


def read_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` over ``path`` (raises what the reader raises for a malformed file)."""
    return _reader_class()(str(path))
