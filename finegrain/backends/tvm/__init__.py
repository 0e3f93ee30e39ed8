"""TVM backend (issue #7, in progress): today only the low-bit kernels in ``kernels/``; the Relax
lowering of whole graphs and ahead-of-time builds are not written yet."""
