"""Small size helpers shared by the CLI and benchmarks."""
from __future__ import annotations

import torch


def fp_bytes(model: torch.nn.Module) -> int:
    """Bytes of a float model's parameters and buffers, tied tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
