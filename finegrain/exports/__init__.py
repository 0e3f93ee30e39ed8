"""Exports into other engines' checkpoint formats, from the same quantized graph.

* ``hf.py``: a Hugging Face model directory in the **compressed-tensors** schema (what
  llm-compressor writes and vLLM serves): packed integer weights, FP8, W8A8 dynamic activations.
* ``gguf.py``: a **GGUF** file for llama.cpp (Q8_0, Q4_0, Q4_1 blocks, F32 for the rest).

Both read the compiled graph (``graph.py``: each quantized linear's codes and scales, every other
constant under the source model's parameter name) and refuse by name what the target cannot hold
(an online Hadamard, a tensor a fold added, a format the schema lacks). They sit on the backends'
floor: they take a ``CompiledModel`` as an argument and import neither the passes nor the driver.
"""
