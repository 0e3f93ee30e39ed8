"""``CompiledModel``: a quantized graph plus what it needs to run, describe and save itself."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from finegrain.compiler.recipe import Recipe
from finegrain.errors import InputError

BACKENDS = ("torch", "onnx", "tvm")


def input_spec(t: torch.Tensor, name: str, dynamic_dims: list[int]) -> dict:
    return {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "dynamic_dims": dynamic_dims}


def check_inputs(specs: list[dict], inputs: tuple, what: str = "input") -> None:
    """Raise InputError unless ``inputs`` match ``specs`` (count, dtype, rank, static dims)."""
    if len(inputs) != len(specs):
        raise InputError(f"{what}: expected {len(specs)} tensor(s) ({', '.join(s['name'] for s in specs)}), got {len(inputs)}")
    for t, s in zip(inputs, specs):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{what} {s['name']!r}: expected a tensor, got {type(t).__name__}")
        if str(t.dtype).removeprefix("torch.") != s["dtype"] or t.dim() != len(s["shape"]):
            raise InputError(f"{what} {s['name']!r}: expected {s['dtype']} with {len(s['shape'])} dims "
                             f"(like {s['shape']}), got {str(t.dtype).removeprefix('torch.')} {list(t.shape)}")
        for d, (got, want) in enumerate(zip(t.shape, s["shape"])):
            if d not in s["dynamic_dims"] and got != want:
                raise InputError(f"{what} {s['name']!r}: dim {d} must be {want} (only dims {s['dynamic_dims']} "
                                 f"vary), got shape {list(t.shape)}")


def export_dynamic_shapes(specs: list[dict]) -> tuple:
    """``torch.export`` dynamic shapes for inputs described by ``specs`` (dim 0 = batch, 1 = seq)."""
    dims = {}
    out = []
    for s in specs:
        d = {}
        for i in s["dynamic_dims"]:
            key = "batch" if i == 0 else "seq" if i == 1 else f"{s['name']}_{i}"
            dims.setdefault(key, torch.export.Dim(key, min=1 if key == "batch" else 2, max=1 << 16))
            d[i] = dims[key]
        out.append(d or None)
    return tuple(out)


def example_inputs(specs: list[dict]) -> tuple:
    """Placeholder inputs matching ``specs`` (dynamic dims at least 2, so export keeps them symbolic)."""
    out = []
    for s in specs:
        shape = [max(n, 2) if i in s["dynamic_dims"] else n for i, n in enumerate(s["shape"])]
        dtype = getattr(torch, s["dtype"])
        out.append(torch.zeros(shape, dtype=dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype))
    return tuple(out)


@dataclass
class CompiledModel:
    """Call it like the model (positional tensors), ``save`` it, ``load`` it back."""

    gm: GraphModule
    recipe: Recipe
    input_specs: list[dict]
    source: dict = field(default_factory=dict)
    quantized: dict = field(default_factory=dict)  # weight fqn -> format, shape, bits
    layer_report: dict = field(default_factory=dict)  # op name -> error stats
    folds: list = field(default_factory=list)  # what each fold pass folded / refused, and why
    allocation: dict = field(default_factory=dict)  # bit allocation: frontier and chosen point (if any)
    tokenizer: Any = None
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)  # recipe rules that matched nothing, nothing quantized

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.session().run(*inputs)

    def session(self, backend: str = "torch", **options):
        """A runnable session on ``backend``: ``torch`` (the reference), ``onnx`` (ONNX Runtime;
        options ``style``, ``accuracy_level``, ``threads``: ``backends/onnx.py``) or ``tvm`` (built
        into a temporary deployment; options ``target``, ``tune_trials``, ``max_seq_len``,
        ``threads``: ``backends/tvm/deploy.py``)."""
        if backend not in BACKENDS:
            raise InputError(f"backend {backend!r} is not available; choose one of {BACKENDS}")
        if backend == "tvm":
            from finegrain.backends.tvm.deploy import TvmSession

            return TvmSession(self, **options)
        if backend == "onnx":
            from finegrain.backends.onnx import OnnxSession

            return OnnxSession(self, **options)
        if options:
            raise InputError(f"backend 'torch' takes no options, got {sorted(options)}")
        from finegrain.backends.torch_ref import TorchRefSession

        return TorchRefSession(self.gm, self.input_specs)

    def export_onnx(self, path: str | Path, style: str = "qdq", accuracy_level: int = 0,
                    overwrite: bool = False) -> dict:
        """Write an ONNX model (``backends/onnx.py``): ``style`` ``qdq`` (DequantizeLinear) or
        ``matmulnbits`` (com.microsoft::MatMulNBits). Returns the files, bytes and per-weight forms."""
        from finegrain.backends.onnx import export_onnx

        return export_onnx(self, path, style=style, accuracy_level=accuracy_level, overwrite=overwrite)

    def build(self, out: str | Path, target: str | dict | None = None, tune_trials: int = 0,
              max_seq_len: int = 2048, overwrite: bool = False, int8: bool = True) -> dict:
        """Compile ahead of time with TVM into the deployment directory ``out`` (a shared library,
        the weights in TVM's parameter format, a manifest; ``backends/tvm/deploy.py``). ``target``:
        ``"llvm"``/None = this CPU, or a TVM target dict. ``int8``: INT8 x INT2-4 linears (W4A8,
        DGQ) run integer dot products (``kernels/a8.py``); False keeps them on fp32 compute.
        Returns the manifest."""
        from finegrain.backends.tvm.deploy import build_deployment

        return build_deployment(self, out, target=target, tune_trials=tune_trials, max_seq_len=max_seq_len,
                                overwrite=overwrite, int8=int8)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        from finegrain.runtime.artifact import save_artifact

        return save_artifact(self, path, overwrite)

    # ---- size accounting --------------------------------------------------------------------
    def model_bytes(self) -> int:
        """Bytes of every stored tensor (what the artifact's safetensors holds)."""
        return sum(t.numel() * t.element_size() for _, t in self.gm.named_buffers())

    def quantized_bits_per_weight(self) -> float | None:
        """True bits per weight over the quantized tensors, scales and zero points included."""
        if not self.quantized:
            return None
        bits = sum(q["bits"] for q in self.quantized.values())
        n = sum(torch.Size(q["shape"]).numel() for q in self.quantized.values())
        return bits / n

    @classmethod
    def from_manifest(cls, gm: GraphModule, manifest: dict, tokenizer: Any = None,
                      recipe: Recipe | None = None) -> "CompiledModel":
        return cls(gm=gm, recipe=recipe or Recipe.from_dict(manifest["recipe"]), input_specs=manifest["inputs"],
                   source=manifest.get("source", {}), quantized=manifest.get("quantized", {}),
                   layer_report=manifest.get("layers", {}), folds=manifest.get("folds", []),
                   allocation=manifest.get("allocation") or {}, tokenizer=tokenizer,
                   warnings=manifest.get("warnings", []))
