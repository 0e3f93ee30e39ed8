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
    backend = "torch"

    def __init__(self, gm: GraphModule, input_specs: list[dict]):
        self.gm, self.input_specs = gm, input_specs

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        check_inputs(self.input_specs, inputs)
        with torch.inference_mode():
            return self.gm(*inputs)


class TorchBackend(BackendBase):
    name = "torch"
    description = "PyTorch eager reference (dequantize, compute in fp32)"

    def capability(self, fmt, role: str, partner=None) -> tuple[str, str]:
        return "emulated", "the reference dequantizes / fake-quantizes and computes in fp32"

    def op_capability(self, op: str) -> tuple[str, str]:
        return "emulated", "torch ops"

    def session(self, compiled, **options) -> TorchRefSession:
        if options:
            raise InputError(f"backend 'torch' takes no options, got {sorted(options)}")
        return TorchRefSession(compiled.gm, compiled.input_specs)


BACKEND = TorchBackend()
