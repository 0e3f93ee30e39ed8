"""GPU deployments (``finegrain build --backend gpu``, ``cm.build_gpu``): a directory holding

* ``artifact/``: the finegrain artifact the deployment was built from (graph, weights, tokenizer;
  its own manifest and checks), which loads and runs anywhere;
* ``kernels.safetensors``: every weight a Triton kernel reads, already in the kernel layout
  (``kernels.pack_weight``: codes in int32 words along K, N contiguous; scales, zero points and
  DGQ channel scales as the kernels read them), named ``<layer>.<part>``;
* ``manifest.json``: version, compute dtype, the artifact's fingerprint (``cm.fingerprint()``:
  the kernels belong to exactly that artifact), per layer its format, shape and kernel fields, and
  the SHA-256 and size of ``kernels.safetensors``.

It is data: loading one (``finegrain.load``) reads JSON and safetensors only, checks every file's
hash, that the kernel layers are exactly the artifact's, and each tensor's dtype and shape and each
kernel field against what the layer's format implies (a tampered manifest cannot make a kernel
read past a buffer). The loaded :class:`GpuDeployment` is its own session: the session starts
without unpacking or repacking a weight.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from finegrain.backends.base import Artifact, BackendError
from finegrain.backends.gpu.backend import GpuSession, default_device
from finegrain.errors import ArtifactError
from finegrain.formats import QuantFormat
from finegrain.io.files import atomic_directory, dumps_json, file_records, read_json_file, verify_files

VERSION = 1
MANIFEST = "manifest.json"
KERNELS = "kernels.safetensors"
ARTIFACT = "artifact"
PARTS = ("qw", "s", "z", "s1")
DTYPES = ("float32", "bfloat16", "float16")


def is_deployment(path: Path) -> bool:
    mf = Path(path) / MANIFEST
    if not mf.is_file() or not (Path(path) / KERNELS).is_file():
        return False
    try:
        return isinstance(m := read_json_file(mf), dict) and "finegrain_gpu_deploy" in m
    except ArtifactError:
        return False


def build_deployment(cm, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write the GPU deployment of ``cm`` to ``out`` (atomically: nothing is left half-written);
    ``dtype``: the compute dtype its sessions default to. Returns the manifest."""
    from safetensors.torch import save_file

    from finegrain.backends.gpu.lower import _META, kernel_weights, repack

    if dtype not in DTYPES:
        raise BackendError(f"build --backend gpu: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tensors, layers = {}, {}
    for n, layer, fmt, shape in kernel_weights(cm.gm):
        p = repack(cm.gm, n)
        layers[layer] = {"format": fmt.tag, "shape": shape, **{k: p[k] for k in _META}}
        tensors.update({f"{layer}.{part}": p[part].contiguous() for part in PARTS if p[part] is not None})
    with atomic_directory(out, overwrite) as tmp:
        cm.save(tmp / ARTIFACT)
        save_file(tensors, str(tmp / KERNELS), metadata={"format": "finegrain-gpu"})
        manifest = {"finegrain_gpu_deploy": VERSION, "dtype": dtype, "fingerprint": cm.fingerprint(),
                    "recipe": cm.recipe_name, "inputs": cm.input_specs, "layers": layers,
                    "files": file_records(tmp, [KERNELS])}
        (tmp / MANIFEST).write_text(dumps_json(manifest))
    return manifest


def _checked(where: str, fmt: QuantFormat, shape: list, rec: object, tensors: dict) -> dict:
    """Layer ``where``'s kernel layout from the manifest record and the file's tensors, each field and
    tensor checked against what its format and shape imply."""
    from finegrain.backends.gpu.kernels import layout_spec
    from finegrain.backends.gpu.lower import _META

    n, k = shape
    fields, parts = layout_spec(fmt, n, k)
    if not isinstance(rec, dict) or rec.get("format") != fmt.tag or rec.get("shape") != [n, k]:
        raise ArtifactError(f"{where}: the manifest's record must name the artifact's format {fmt.tag} and shape "
                            f"{[n, k]}")
    p = {}
    for key in _META:
        v = rec.get(key)
        if key == "scale2":
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ArtifactError(f"{where}: field scale2 must be a finite number, got {repr(v)[:40]}")
        elif type(v) is not type(fields[key]) or v != fields[key]:
            raise ArtifactError(f"{where}: field {key} is {repr(v)[:40]}; format {fmt.tag} of shape {[n, k]} "
                                f"gives {fields[key]!r}")
        p[key] = v
    for part in PARTS:
        t = tensors.get(f"{where}.{part}")
        if part not in parts:
            if t is not None:
                raise ArtifactError(f"{where}: {KERNELS} holds {where}.{part}, which format {fmt.tag} has no use for")
            p[part] = None
            continue
        dt, want = parts[part]
        if t is None or t.dtype != dt or list(t.shape) != want:
            got = "missing" if t is None else f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
            raise ArtifactError(f"{where}: tensor {part} must be {str(dt).removeprefix('torch.')} {want} in "
                                f"{KERNELS}, got {got}")
        p[part] = t
    return p


class GpuDeployment(GpuSession, Artifact):
    """A loaded GPU deployment: both the artifact (``backend == "gpu"``) and its own session on the
    CUDA device (``device`` / ``dtype`` override where it runs and the compute dtype it was built
    with; ``decode_graph``: as ``GpuSession``'s). ``session("torch")`` etc. run its ``artifact/`` on another backend. ``artifact_loader``:
    ``runtime.artifact.load_artifact`` (``finegrain.load`` passes it; backends sit below the runtime)."""

    backend = "gpu"

    def __init__(self, path: str | Path, artifact_loader, device: str | None = None, dtype: str | None = None,
                 decode_graph: bool = False):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from finegrain.backends import registry
        from finegrain.backends.gpu.lower import kernel_weights

        path = Path(path)
        manifest = read_json_file(path / MANIFEST)
        if not isinstance(manifest, dict) or manifest.get("finegrain_gpu_deploy") != VERSION:
            raise ArtifactError(f"{path}: GPU deployment version {manifest.get('finegrain_gpu_deploy')!r} is not "
                                f"supported (this finegrain reads {VERSION})" if isinstance(manifest, dict) else
                                f"{path / MANIFEST}: must hold a JSON object")
        if manifest.get("dtype") not in DTYPES or not isinstance(manifest.get("layers"), dict):
            raise ArtifactError(f"{path / MANIFEST}: 'dtype' must be one of {', '.join(DTYPES)} and 'layers' an object")
        verify_files(path, manifest.get("files"), required=(KERNELS,))
        reason = registry.get("gpu").available()
        if reason:
            raise BackendError(f"{path} is a GPU deployment and backend 'gpu' is not available here: {reason}. Its "
                               f"artifact loads anywhere: finegrain.load({str(path / ARTIFACT)!r})")
        if artifact_loader is None:
            raise ArtifactError(f"{path}: a GPU deployment is loaded by finegrain.load (it holds a finegrain artifact)")
        cm = artifact_loader(path / ARTIFACT)
        if cm.fingerprint() != manifest.get("fingerprint"):
            raise ArtifactError(f"{path}: {KERNELS} was built from another artifact than {ARTIFACT}/ (fingerprints "
                                "differ)")
        try:
            tensors = load_file(str(path / KERNELS))
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{path / KERNELS}: {type(e).__name__}: {str(e)[:200]}") from None
        want = {layer: (fmt, shape) for _, layer, fmt, shape in kernel_weights(cm.gm)}
        if set(want) != set(manifest["layers"]):
            diff = sorted(set(want) ^ set(manifest["layers"]))
            raise ArtifactError(f"{path / MANIFEST}: the kernel layers differ from the artifact's: {diff[:5]}")
        prepacked = {layer: _checked(layer, *want[layer], manifest["layers"][layer], tensors) for layer in want}
        extra = set(tensors) - {f"{layer}.{part}" for layer, p in prepacked.items() for part in PARTS if p[part] is not None}
        if extra:
            raise ArtifactError(f"{path / KERNELS}: tensors no kernel layer reads: {sorted(extra)[:5]}")
        dt = getattr(torch, dtype or manifest["dtype"])
        super().__init__(cm, device or default_device(), dt, prepacked=prepacked, decode_graph=decode_graph)
        self.path, self.manifest, self.compiled = path, manifest, cm
        self.tokenizer, self.quantized, self.source = cm.tokenizer, cm.quantized, cm.source
        self.recipe_name = cm.recipe_name

    def session(self, backend: str | None = None, **options):
        if backend in (None, "gpu") and not options:
            return self
        return self.compiled.session(backend or "gpu", **options)
