"""The reference backend: executes the quantized FX graph with PyTorch eager kernels
(dequantize-then-compute). Ground truth that every other backend is tested against."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

import finegrain.formats.ops  # noqa: F401  (registers the finegrain:: custom ops)

SUPPORTED_FORMAT_KINDS = ("int",)


class TorchRefSession:
    def __init__(self, gm: GraphModule, input_specs: list[dict]):
        self.gm, self.input_specs = gm, input_specs

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        from finegrain.runtime.compiled import check_inputs

        check_inputs(self.input_specs, inputs)
        with torch.inference_mode():
            return self.gm(*inputs)
