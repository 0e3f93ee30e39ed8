"""io/spool.py: the streaming safetensors writer and the tensor spool of block-by-block compiles."""
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finegrain.io import spool as spool_mod
from finegrain.io.spool import TensorSpool, write_safetensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w.float": torch.randn(5, 7, generator=g),
        "b.bf16": torch.randn(3, generator=g).to(torch.bfloat16),
        "codes": torch.randint(0, 255, (4, 9), generator=g, dtype=torch.uint8),
        "i8": torch.randint(-128, 127, (6,), generator=g, dtype=torch.int8),
        "fp8": torch.randn(2, 8, generator=g).to(torch.float8_e4m3fn),
        "mask": torch.rand(3, 3, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "idx": torch.arange(10, dtype=torch.int64),
    }


def _check_same(path, tensors):
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(back[k].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else back[k],
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_writer_round_trips_every_dtype_and_is_deterministic(tmp_path):
    ts = _tensors()
    write_safetensors(tmp_path / "a.safetensors", ts, {"format": "pt"})
    _check_same(tmp_path / "a.safetensors", ts)
    write_safetensors(tmp_path / "b.safetensors", dict(reversed(list(ts.items()))), {"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    raw = (tmp_path / "a.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0 and raw[8:9] == b"{"


def test_spooled_tensors_are_mapped_and_copied_file_to_file(tmp_path, monkeypatch):
    ts = _tensors()
    sp = TensorSpool(tmp_path)
    spooled = {k: sp.put(t) if k != "idx" else t for k, t in ts.items()}
    for k, t in spooled.items():
        assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                           ts[k].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else ts[k]), k
    assert sp.location(spooled["w.float"]) is not None and sp.location(spooled["idx"]) is None
    assert sp.location(spooled["empty"]) is None  # empty tensors are kept as they are
    assert sp.location(ts["w.float"]) is None  # the original, not the spooled copy
    assert sp.path.stat().st_size == sp.nbytes >= sum(t.numel() * t.element_size() for t in ts.values())
    from_memory = []
    real = spool_mod._bytes_of
    monkeypatch.setattr(spool_mod, "_bytes_of", lambda t: from_memory.append(tuple(t.shape)) or real(t))
    write_safetensors(tmp_path / "s.safetensors", spooled, {"format": "pt"}, spool=sp)
    assert sorted(from_memory) == sorted([(0, 4), (10,)])  # only the two not in the spool went through memory
    _check_same(tmp_path / "s.safetensors", ts)
    d = sp.dir
    assert d.exists()
    sp.close()
    assert not d.exists()


def test_spool_copy_falls_back_to_plain_reads(tmp_path, monkeypatch):
    ts = {"a": torch.randn(100, 33), "b": torch.arange(7, dtype=torch.int32)}
    sp = TensorSpool(tmp_path)
    spooled = {k: sp.put(t) for k, t in ts.items()}

    def no_copy(*a):
        raise OSError("EXDEV")
    monkeypatch.setattr(spool_mod.os, "copy_file_range", no_copy)
    write_safetensors(tmp_path / "f.safetensors", spooled, spool=sp)
    back = load_file(str(tmp_path / "f.safetensors"))
    assert torch.equal(back["a"], ts["a"]) and torch.equal(back["b"], ts["b"])


def test_writer_refuses_a_dtype_safetensors_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="'z'"):
        write_safetensors(tmp_path / "x.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})
