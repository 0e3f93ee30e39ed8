"""``CompiledModel``: a quantized graph plus what it needs to run, describe and save itself."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from finegrain.backends import registry
from finegrain.backends.base import Artifact, Session
from finegrain.compiler.recipe import Recipe


@dataclass
class CompiledModel(Artifact):
    """Call it like the model (positional tensors), ``save`` it, ``load`` it back; run it on any
    registered backend with ``session(name)``. As loaded, it runs on the reference backend
    (``backend == "torch"``)."""

    backend = "torch"

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
    kv: dict | None = None  # KV-cache graph (compile(kv_cache=True)): layers, kv_heads, head_dim, dtype, max_seq_len
    spool: Any = None  # io/spool.TensorSpool holding (memory-mapped) weights of a block-by-block compile

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.session().run(*inputs)

    @property
    def recipe_name(self) -> str:
        return self.recipe.name

    def session(self, backend: str = "torch", **options) -> Session:
        """A runnable session on a registered backend (``backends/registry.py``): ``torch`` (the
        reference), ``onnx`` (ONNX Runtime; options ``style``, ``accuracy_level``, ``threads``:
        ``backends/onnx.py``), ``tvm`` (built into a temporary deployment; options ``target``,
        ``tune_trials``, ``max_seq_len``, ``threads``, ``int8``: ``backends/tvm/deploy.py``).
        Everything the backend cannot take is refused, by name, before any work."""
        return registry.get(backend).session(self, **options)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *, backend: str = "torch",
                 backend_options: dict | None = None, **options):
        """Generate after ``input_ids`` ([1, n] token ids) on ``backend`` (a session opened and closed
        for this call; open one yourself with ``session()`` to reuse it): greedy by default, or
        ``do_sample`` with ``temperature``, ``top_k``, ``top_p``, ``seed``; stops at
        ``eos_token_id``; ``streamer(token_id)`` sees each token as it comes. Returns a
        ``Generation`` (``backends/generation.py``). A KV-cache graph (``kv_cache=True``) prefills
        once and decodes over its cache; any other graph recomputes the sequence at each step
        (``Session.prefill`` / ``step``)."""
        with self.session(backend, **(backend_options or {})) as s:
            return s.generate(input_ids, max_new_tokens, **options)

    def check(self, backend: str) -> list:
        """What ``backend`` would refuse (``backends/base.py`` Refusal: where, what, why)."""
        return registry.get(backend).check(self)

    def export_onnx(self, path: str | Path, style: str = "qdq", accuracy_level: int = 0,
                    overwrite: bool = False) -> dict:
        """Write an ONNX model (``backends/onnx.py``): ``style`` ``qdq`` (DequantizeLinear) or
        ``matmulnbits`` (com.microsoft::MatMulNBits). Returns the files, bytes and per-weight forms."""
        return registry.get("onnx").export(self, path, style=style, accuracy_level=accuracy_level,
                                           overwrite=overwrite)

    def export_hf(self, out: str | Path, overwrite: bool = False, dtype: str = "float32") -> dict:
        """Write a Hugging Face model directory in the compressed-tensors schema (vLLM,
        ``transformers`` + ``compressed-tensors``; ``exports/hf.py``). Raises ExportError naming every
        layer / tensor the schema cannot hold, with nothing written. ``dtype``: float32 (exact),
        bfloat16 or float16 for the float tensors and scales."""
        from finegrain.exports.hf import export_hf

        return export_hf(self, out, overwrite=overwrite, dtype=dtype)

    def export_gguf(self, out: str | Path, overwrite: bool = False, tokenizer_gguf: str | Path | None = None,
                    dtype: str = "float32") -> dict:
        """Write a GGUF file for llama.cpp (``exports/gguf.py``; ``tokenizer_gguf``: a GGUF whose
        tokenizer fields to copy; ``dtype`` float32 / float16 for the unquantized matrices); ExportError
        names what GGUF cannot hold."""
        from finegrain.exports.gguf import export_gguf

        return export_gguf(self, out, overwrite=overwrite, tokenizer_gguf=tokenizer_gguf, dtype=dtype)

    def build(self, out: str | Path, target: str | dict | None = None, tune_trials: int = 0,
              max_seq_len: int = 2048, overwrite: bool = False, int8: bool = True, cache: str = "static",
              kv_storage: str = "packed") -> dict:
        """Compile ahead of time with TVM into the deployment directory ``out`` (a shared library,
        the weights in TVM's parameter format, a manifest; ``backends/tvm/deploy.py``). ``target``:
        ``"llvm"``/None = this CPU, or a TVM target dict. ``int8``: INT8 x INT2-4 linears (W4A8,
        DGQ) run integer dot products (``kernels/a8.py``); False keeps them on fp32 compute.
        ``cache`` (KV-cache artifacts): ``"static"`` preallocated buffers written in place, or
        ``"concat"`` (``backends/tvm/lower_cache.py``); ``kv_storage``: a static quantized cache held as
        the formats' codes (``"packed"``) or in fp32 (``"float"``). Returns the manifest."""
        return registry.get("tvm").export(self, out, target=target, tune_trials=tune_trials, max_seq_len=max_seq_len,
                                          overwrite=overwrite, int8=int8, cache=cache, kv_storage=kv_storage)

    def build_gpu(self, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> dict:
        """Write a GPU deployment (``backends/gpu/deploy.py``): this artifact plus every kernel weight
        already in the Triton kernels' layout, so a session starts without repacking; ``dtype``: the
        compute dtype its sessions default to. ``finegrain.load(out)`` returns it as its own session.
        Returns the manifest."""
        return registry.get("gpu").export(self, out, dtype=dtype, overwrite=overwrite)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        from finegrain.runtime.artifact import save_artifact

        return save_artifact(self, path, overwrite)

    def fingerprint(self) -> str:
        """SHA-256 over the graph (as ``save`` writes it), the KV layout and every stored tensor (name,
        dtype, shape, bytes) in name order: the same for a model and its saved-and-loaded copy, so a
        file exported from it (ONNX metadata ``finegrain.artifact``) can be matched to it later."""
        import hashlib

        from finegrain.io.files import dumps_json
        from finegrain.runtime.graph_json import graph_to_json

        h = hashlib.sha256(dumps_json({"graph": graph_to_json(self.gm.graph), "kv": self.kv}).encode())
        for name, t in sorted(self.gm.named_buffers()):
            t = t.detach().contiguous().cpu()
            h.update(f"{name}|{t.dtype}|{list(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

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
        if manifest.get("kv"):  # graph.json keeps no node meta: the presents' role from the cache graph's contract
            from finegrain.compiler.ir import KV

            out = gm.graph.output_node().args[0]
            for i, r in enumerate(out[1:]):  # output 1 + i: layer i // 2's key (even i) or value
                if isinstance(r, torch.fx.Node):
                    r.meta[KV] = {"layer": i // 2, "kind": ("key", "value")[i % 2]}
        return cls(gm=gm, recipe=recipe or Recipe.from_dict(manifest["recipe"]), input_specs=manifest["inputs"],
                   source=manifest.get("source", {}), quantized=manifest.get("quantized", {}),
                   layer_report=manifest.get("layers", {}), folds=manifest.get("folds", []),
                   allocation=manifest.get("allocation") or {}, tokenizer=tokenizer, kv=manifest.get("kv"),
                   warnings=manifest.get("warnings", []))
