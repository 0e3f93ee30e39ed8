"""Vendored calibration / evaluation text (see PROVENANCE.md for sources and licenses)."""
from __future__ import annotations

import hashlib
from pathlib import Path

_HERE = Path(__file__).parent
WIKITEXT2_TEST = _HERE / "wiki.test.raw"
BROWN_SLICE = _HERE / "brown_slice.txt"
_SHA256 = {
    WIKITEXT2_TEST.name: "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
    BROWN_SLICE.name: "32affa0944b323600cce0348372211f5261b7c57d9046f928d22d399a7736086",
}


def _read_checked(path: Path) -> str:
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _SHA256[path.name]:
        raise RuntimeError(f"vendored data file {path} is corrupted: sha256 {digest} != {_SHA256[path.name]}")
    return raw.decode("utf-8")


def wikitext2_test() -> str:
    """The WikiText-2 test stream: rows joined with blank lines, as `"\\n\\n".join(test["text"])`."""
    rows = _read_checked(WIKITEXT2_TEST).replace("\r", "").split("\n")
    return "\n\n".join(r for r in rows if r)


def brown_paragraphs() -> list[str]:
    """Calibration paragraphs from the Brown corpus slice (one per line)."""
    return [line for line in _read_checked(BROWN_SLICE).split("\n") if line.strip()]
