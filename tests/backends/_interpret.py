"""Test tooling: Triton's interpreter patches ``triton.language`` once per kernel launch and again at
every call of a ``@triton.jit`` helper inside it (``InterpretedFunction.__call__``), once per program
of the grid; the second patch is the first one over again when the helper lives in the launched
kernel's module, and it was ~25% of an interpreted decode step (cProfile, 2026-12-07). ``install``
skips those repeats: a helper's patch is skipped while a launch from the same module (the same
``__globals__``) holds its patch. A skip that were wrong would leave ``triton.language`` unpatched
inside the helper, which raises (a builtin called without its interpreter semantic), so it cannot
turn a failing kernel test into a passing one. Does nothing on a Triton without ``_patch_lang``."""
from __future__ import annotations

import contextlib
import dataclasses


class _Held:
    """The launch's patch scope: restoring it ends the launch."""

    def __init__(self, scope, held: list, g: dict):
        self.scope, self.held, self.g = scope, held, g

    def restore(self):
        self.held.remove(self.g)
        self.scope.restore()


class _Nothing:
    def restore(self):
        pass


def install() -> bool:
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    real = getattr(interpreter, "_patch_lang", None)
    if real is None or getattr(real, "_finegrain_once", False):
        return False
    held: list[dict] = []

    def patch_lang(fn):
        g = fn.__globals__
        if any(h is g for h in held):  # a helper of a running launch's module: already patched
            return _Nothing()
        held.append(g)
        try:
            return _Held(real(fn), held, g)
        except BaseException:
            held.remove(g)
            raise

    patch_lang._finegrain_once = True
    interpreter._patch_lang = patch_lang
    return True


@contextlib.contextmanager
def overflow_checks_off():
    """Triton's interpreter checks every integer add / sub / mul for int32 overflow (its
    ``sanitize_overflow`` option, on by default there; a GPU build checks only with ``debug``): a third
    of an interpreted decode step. The model-level GPU tests (``test_gpu_backend.py``,
    ``test_gpu_deploy.py``) run with it off: they launch the same kernels that ``test_gpu_kernels.py``
    runs with the checks on, at its ragged shapes (the kernels each file launches compared by name,
    2026-12-07: every one is in the kernel file), and test the lowering and runtime around them."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is None or not hasattr(options, "sanitize_overflow"):
        yield
        return
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    try:
        yield
    finally:
        builder.options = options
