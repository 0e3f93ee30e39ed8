"""Artifacts: a directory with ``manifest.json`` + ``graph.json`` + ``model.safetensors``
(+ ``tokenizer/`` when the model has one).

* No pickle anywhere: the graph is JSON (``runtime/graph_json.py``), tensors are safetensors.
* Saving is atomic (a temporary directory renamed into place) and deterministic: the same
  compiled model saves to byte-identical files (no timestamps; sorted keys).
* An artifact is data: loading one runs nothing from it. The loader reads only the files the
  manifest lists, by names that stay inside the directory, after checking each one's size (before
  reading) and SHA-256; the graph is rebuilt from an allow-list (``graph_json.py``); tensor
  shapes and dtypes are read from the safetensors header and must equal the manifest's before
  any tensor is loaded; the input signature is checked against sane limits; the tokenizer is
  loaded from the listed files only, without remote code. Checksums detect corruption, not
  tampering: the safety comes from the loader, not from the hashes.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch.fx import Graph, GraphModule

from finegrain.compiler.capture import check_kv_layout
from finegrain.compiler.ir import set_tensor
from finegrain.errors import ArtifactError, FinegrainError
from finegrain.io.files import (atomic_directory, dumps_json, file_records, load_listed_tokenizer, read_json_file,
                                verify_files)
from finegrain.io.signature import check_input_specs, is_int
from finegrain.io.spool import ST_DTYPE, write_safetensors
from finegrain.runtime.graph_json import graph_from_json, graph_to_json

if TYPE_CHECKING:
    from finegrain.runtime.compiled import CompiledModel

ARTIFACT_VERSION = 2  # 2: files carry their byte counts
MANIFEST, GRAPH, WEIGHTS, TOKENIZER = "manifest.json", "graph.json", "model.safetensors", "tokenizer"


# the safetensors dtype codes, one table with the writer's (io/spool.py): code -> torch dtype name
_ST_DTYPES = {code: str(dt).removeprefix("torch.") for dt, code in ST_DTYPE.items()}
_DTYPES = set(_ST_DTYPES.values())


def save_artifact(cm: "CompiledModel", path: str | Path, overwrite: bool = False) -> Path:
    path = Path(path)
    tensors = {name: t.detach().contiguous() for name, t in sorted(cm.gm.named_buffers())}  # fixed order: byte-identical saves
    with atomic_directory(path, overwrite) as tmp:
        (tmp / GRAPH).write_text(dumps_json(graph_to_json(cm.gm.graph)))
        # streamed: a spooled weight (block-by-block compile) is copied file to file, never read into memory
        write_safetensors(tmp / WEIGHTS, tensors, {"format": "pt"}, spool=getattr(cm, "spool", None))
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(str(tmp / TOKENIZER))
        files = [p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()]
        manifest = {
            "finegrain_artifact": ARTIFACT_VERSION,
            "recipe": cm.recipe.to_dict(),
            "source": cm.source,
            "inputs": cm.input_specs,
            "quantized": cm.quantized,
            "layers": cm.layer_report,
            "folds": cm.folds,
            "allocation": cm.allocation,
            "warnings": cm.warnings,
            **({"kv": cm.kv} if cm.kv else {}),
            "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                        for n, t in sorted(tensors.items())},
            "files": file_records(tmp, files),
        }
        (tmp / MANIFEST).write_text(dumps_json(manifest))
    return path


def read_manifest(path: str | Path) -> dict:
    """The manifest of the artifact at ``path``, its version and structure checked (not its files)."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path} is not a finegrain artifact: {MANIFEST} is missing")
    manifest = read_json_file(mf)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mf}: must hold a JSON object")
    version = manifest.get("finegrain_artifact")
    if version != ARTIFACT_VERSION:
        raise ArtifactError(f"{mf}: artifact version {version!r} is not supported (this finegrain reads "
                            f"{ARTIFACT_VERSION}; re-save artifacts of older versions with the finegrain that wrote them)")
    for key, typ in (("recipe", dict), ("inputs", list), ("tensors", dict), ("files", dict), ("quantized", dict),
                     ("layers", dict), ("folds", list), ("source", dict)):
        if not isinstance(manifest.get(key), typ):
            raise ArtifactError(f"{mf}: field {key!r} must be a JSON {'object' if typ is dict else 'array'}")
    if not isinstance(manifest.get("warnings", []), list):
        raise ArtifactError(f"{mf}: field 'warnings' must be a JSON array")
    check_input_specs(manifest["inputs"], f"{mf}: inputs")
    if "kv" in manifest:
        check_kv_layout(manifest["kv"], manifest["inputs"], str(mf))
    _check_tensor_table(manifest["tensors"], mf)
    _check_quantized(manifest["quantized"], mf)
    return manifest


def _check_tensor_table(tensors: dict, mf: Path) -> None:
    for name, rec in tensors.items():
        if (not isinstance(rec, dict) or set(rec) != {"shape", "dtype"} or rec["dtype"] not in _DTYPES
                or not isinstance(rec["shape"], list) or not all(is_int(d) and d >= 0 for d in rec["shape"])):
            raise ArtifactError(f"{mf}: tensors[{name[:80]!r}] must be {{'shape': [ints >= 0], 'dtype': one of "
                                f"{sorted(_DTYPES)}}}")


def _check_quantized(quantized: dict, mf: Path) -> None:
    for name, q in quantized.items():
        if (not isinstance(q, dict) or not is_int(q.get("bits")) or q["bits"] < 0
                or not isinstance(q.get("shape"), list) or not all(is_int(d) and d >= 0 for d in q["shape"])):
            raise ArtifactError(f"{mf}: quantized[{name[:80]!r}] needs integer 'bits' and a 'shape' of integers")


def _check_weights_header(path: Path, expected: dict) -> None:
    """Names, shapes and dtypes in the safetensors header equal the manifest's (no tensor read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                raise ArtifactError(f"{path}: tensors {sorted(names ^ set(expected))[:5]} differ from the manifest")
            for name in sorted(names):
                sl = f.get_slice(name)
                shape, dtype = list(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype())
                if shape != expected[name]["shape"] or dtype != expected[name]["dtype"]:
                    raise ArtifactError(f"{path}: tensor {name} is {dtype} {shape} in the file but "
                                        f"{expected[name]['dtype']} {expected[name]['shape']} in the manifest")
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a valid safetensors file ({type(e).__name__}: {str(e)[:200]})") from None


def graph_module(graph: "Graph | list", tensors: dict[str, torch.Tensor]) -> GraphModule:
    """A GraphModule over ``tensors`` from a checked graph (or graph.json's node list)."""
    if isinstance(graph, list):
        graph = graph_from_json(graph, tensor_names=set(tensors))
    root = torch.nn.Module()
    for name, t in tensors.items():
        set_tensor(root, name, t)
    try:
        return GraphModule(root, graph)
    except (AttributeError, RuntimeError, TypeError, ValueError, SyntaxError) as e:
        raise ArtifactError(f"the graph does not match the stored tensors ({type(e).__name__}: {str(e)[:200]})") from None


def load_artifact(path: str | Path, allow_native: bool = False):
    """A saved artifact -> ``CompiledModel``. A directory another backend wrote (its
    ``recognizes``, e.g. a TVM deployment from ``cm.build`` / ``finegrain build``) -> that
    backend's loaded artifact; when it holds native code (``native_artifacts``) only with
    ``allow_native=True``, otherwise this raises ArtifactError saying so. Either way the result
    is an ``Artifact`` (``backends/base.py``) whose ``backend`` says what runs it."""
    from finegrain.backends import registry
    from finegrain.compiler.recipe import Recipe
    from finegrain.runtime.compiled import CompiledModel

    path = Path(path)
    backend = registry.recognize(path)
    if backend is not None:
        if backend.native_artifacts and not allow_native:
            raise ArtifactError(f"{path} is a {backend.name} deployment: it holds native code (e.g. model.so) that runs "
                                "when loaded. Load it only if you trust its author: finegrain.load(path, "
                                "allow_native=True) / --allow-native")
        return backend.load(path, artifact_loader=load_artifact)
    manifest = read_manifest(path)
    verify_files(path, manifest["files"], required=(GRAPH, WEIGHTS))
    _check_weights_header(path / WEIGHTS, manifest["tensors"])
    graph = graph_from_json(read_json_file(path / GRAPH, limit=manifest["files"][GRAPH]["bytes"]),
                            tensor_names=set(manifest["tensors"]))
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path / WEIGHTS}: {type(e).__name__}: {str(e)[:200]}") from None
    gm = graph_module(graph, tensors)
    try:
        recipe = Recipe.from_dict(manifest["recipe"])
    except FinegrainError as e:
        raise ArtifactError(f"{path / MANIFEST}: {e}") from None
    tokenizer = load_listed_tokenizer(path, manifest["files"], TOKENIZER)
    return CompiledModel.from_manifest(gm, manifest, tokenizer, recipe=recipe)
