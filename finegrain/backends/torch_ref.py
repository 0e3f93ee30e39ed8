"""The reference backend: executes the quantized FX graph with PyTorch eager kernels
(dequantize-then-compute). Ground truth that every other backend is tested against; it takes
every format (all emulated: the codes are dequantized and computed in float)."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

import finegrain.compiler.ops  # noqa: F401  (registers the finegrain:: custom ops)
import finegrain.formats.ops  # noqa: F401
from finegrain.backends.base import BackendBase, Session
from finegrain.errors import InputError
from finegrain.io.signature import check_inputs


class TorchRefSession(Session):
    """Runs the graph. On a KV-cache graph (``kv``: ``compile(kv_cache=True)``) ``run(ids)`` is a
    forward over an empty past (the logits), ``run(*all_inputs)`` the graph itself (logits and
    presents), and ``prefill`` / ``step`` carry the presents as the next step's past: one token per
    decode step, the cache growing by concatenation."""

    backend = "torch"

    def __init__(self, gm: GraphModule, input_specs: list[dict], kv: dict | None = None):
        self.gm, self.input_specs, self.kv = gm, input_specs, kv
        self.max_seq_len = kv["max_seq_len"] if kv else None

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.kv and len(inputs) == 1:
            return self.kv_forward(inputs[0], None, 0)[0]
        return self.run_all(*inputs)

    def run_all(self, *inputs: torch.Tensor):
        check_inputs(self.input_specs, inputs)
        with torch.inference_mode():
            return self.gm(*inputs)


class TorchBackend(BackendBase):
    name = "torch"
    description = "PyTorch eager reference (dequantize, compute in fp32)"
    kv_cache = True

    def capability(self, fmt, role: str, partner=None) -> tuple[str, str]:
        return "emulated", "the reference dequantizes / fake-quantizes and computes in fp32"

    def op_capability(self, op: str) -> tuple[str, str]:
        return "emulated", "torch ops"

    def session(self, compiled, **options) -> TorchRefSession:
        if options:
            raise InputError(f"backend 'torch' takes no options, got {sorted(options)}")
        return TorchRefSession(compiled.gm, compiled.input_specs, getattr(compiled, "kv", None))


BACKEND = TorchBackend()
