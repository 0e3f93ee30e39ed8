"""Artifacts: a directory with ``manifest.json`` + ``graph.json`` + ``model.safetensors``
(+ ``tokenizer/`` when the model has one).

* No pickle anywhere: the graph is JSON (``runtime/graph_json.py``), tensors are safetensors.
* Saving is atomic (a temporary directory renamed into place) and deterministic: the same
  compiled model saves to byte-identical files (no timestamps; sorted keys).
* Loading checks the format version and the SHA-256 of every file the manifest lists.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch.fx import GraphModule

from finegrain.compiler.ir import set_tensor
from finegrain.errors import ArtifactError
from finegrain.runtime.files import atomic_directory
from finegrain.runtime.graph_json import graph_from_json, graph_to_json

if TYPE_CHECKING:
    from finegrain.runtime.compiled import CompiledModel

ARTIFACT_VERSION = 1
MANIFEST, GRAPH, WEIGHTS, TOKENIZER = "manifest.json", "graph.json", "model.safetensors", "tokenizer"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dumps(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n"


def save_artifact(cm: "CompiledModel", path: str | Path, overwrite: bool = False) -> Path:
    path = Path(path)
    tensors = {name: t.detach().contiguous() for name, t in sorted(cm.gm.named_buffers())}  # fixed order: byte-identical saves
    with atomic_directory(path, overwrite) as tmp:
        (tmp / GRAPH).write_text(_dumps(graph_to_json(cm.gm.graph)))
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})  # one key: the writer orders a map randomly
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(str(tmp / TOKENIZER))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "finegrain_artifact": ARTIFACT_VERSION,
            "recipe": cm.recipe.to_dict(),
            "source": cm.source,
            "inputs": cm.input_specs,
            "quantized": cm.quantized,
            "layers": cm.layer_report,
            "folds": cm.folds,
            "allocation": cm.allocation,
            "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                        for n, t in sorted(tensors.items())},
            "files": {f: _sha256(tmp / f) for f in files},
        }
        (tmp / MANIFEST).write_text(_dumps(manifest))
    return path


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path} is not a finegrain artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mf} is corrupted (not valid JSON: {e})") from None
    version = manifest.get("finegrain_artifact")
    if version != ARTIFACT_VERSION:
        raise ArtifactError(f"{mf}: artifact version {version!r} is not supported (this finegrain reads {ARTIFACT_VERSION})")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: file {name} listed in the manifest is missing")
        if _sha256(f) != digest:
            raise ArtifactError(f"{path}: file {name} is corrupted (SHA-256 does not match the manifest)")


def load_artifact(path: str | Path):
    """A saved artifact -> ``CompiledModel``; a TVM deployment directory (``cm.build`` /
    ``finegrain build``) -> ``TvmDeployment`` (runs with the TVM runtime only)."""
    from finegrain.runtime.compiled import CompiledModel
    import finegrain.formats.ops  # noqa: F401  (the graph names finegrain:: ops)

    path = Path(path)
    from finegrain.backends.tvm.deploy import TvmDeployment, is_deployment

    if is_deployment(path):
        return TvmDeployment(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    graph = graph_from_json(json.loads((path / GRAPH).read_text()))
    tensors = load_file(str(path / WEIGHTS))
    expected = set(manifest["tensors"])
    if set(tensors) != expected:
        raise ArtifactError(f"{path / WEIGHTS}: tensors {sorted(set(tensors) ^ expected)[:5]} differ from the manifest")
    root = torch.nn.Module()
    for name, t in tensors.items():
        set_tensor(root, name, t)
    gm = GraphModule(root, graph)
    tokenizer = None
    if (path / TOKENIZER).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER), local_files_only=True)
    return CompiledModel.from_manifest(gm, manifest, tokenizer)
