"""A saved tiny artifact to attack, and a helper that edits one like a hostile author would:
change a file, then rewrite its hash and size in the manifest so the checksums still agree."""
import json
import shutil
from pathlib import Path

import pytest

from finegrain.io.files import dumps_json, file_records


@pytest.fixture(scope="session")
def saved(compiled, tmp_path_factory):
    """A w4a16 tiny-Llama artifact with SmolLM2's real tokenizer."""
    from finegrain.models.bundled import _smollm2_tokenizer

    cm = compiled("w4a16-g128")
    cm.tokenizer = _smollm2_tokenizer()
    try:
        path = tmp_path_factory.mktemp("sec") / "art"
        cm.save(path)
    finally:
        cm.tokenizer = None  # the compiled cache is shared with other tests
    return path


def resign(path: Path) -> None:
    """Rewrite the manifest's file records (hash + size) for every file it lists that still exists."""
    m = json.loads((path / "manifest.json").read_text())
    names = [n for n in m["files"] if (path / n).is_file() and not (path / n).is_symlink()]
    m["files"].update(file_records(path, names))
    (path / "manifest.json").write_text(dumps_json(m))


@pytest.fixture
def tamper(saved, tmp_path):
    """``tamper(graph=fn, manifest=fn)``: a copy of the artifact with graph.json / manifest.json edited
    by ``fn(obj)`` (in place or returning the new object) and the checksums rewritten."""
    count = [0]

    def make(graph=None, manifest=None, files=None) -> Path:
        count[0] += 1
        dst = tmp_path / f"evil{count[0]}"
        shutil.copytree(saved, dst)
        if graph is not None:
            g = json.loads((dst / "graph.json").read_text())
            g = graph(g) or g
            (dst / "graph.json").write_text(json.dumps(g))
        if files is not None:
            files(dst)
        resign(dst)
        if manifest is not None:
            m = json.loads((dst / "manifest.json").read_text())
            m = manifest(m) or m
            (dst / "manifest.json").write_text(json.dumps(m))
        return dst

    return make


@pytest.fixture
def sentinel(tmp_path):
    """A file path that any injected code would create; tests assert it never appears."""
    p = tmp_path / "PWNED"
    yield p
    assert not p.exists(), "injected code ran"
