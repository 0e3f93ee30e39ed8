"""The LLVM targets the TVM tests build for.

``AVX2`` (znver3) builds and runs on every x86-64 machine CI gets. ``BUILD`` is the same CPU at
LLVM opt-level 1, for tests that build a whole model: the same Relax import, schedules and TIR
kernels (vectorization is TIR's, not LLVM's), with about a third less build time (LLVM's
default O3 pipeline and object emission are roughly half of a small model's build). The kernel
tests (``test_tvm_kernels.py``, ``test_tvm_attention.py``, ``test_tvm_a8.py``) and the per-ISA
build test in ``test_tvm_backend.py`` keep LLVM's default level, which is what users build with
unless their target says otherwise."""
AVX2 = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}
BUILD = {**AVX2, "opt-level": 1}
