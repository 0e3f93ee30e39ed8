"""Low-bit TIR kernels for the TVM backend (``int4.py``: packed INT4 group-wise linear)."""
