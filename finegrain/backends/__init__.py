"""Backends lower a quantized graph to a runtime. ``torch_ref`` is the ground truth."""
