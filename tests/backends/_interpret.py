"""Test tooling: Triton's interpreter patches ``triton.language`` once per kernel launch and again at
every call of a ``@triton.jit`` helper inside it (``InterpretedFunction.__call__``), once per program
of the grid; the second patch is the first one over again when the helper lives in the launched
kernel's module, and it was ~25% of an interpreted decode step (cProfile, 2026-12-07). ``install``
skips those repeats: a helper's patch is skipped while a launch from the same module (the same
``__globals__``) holds its patch. A skip that were wrong would leave ``triton.language`` unpatched
inside the helper, which raises (a builtin called without its interpreter semantic), so it cannot
turn a failing kernel test into a passing one. Does nothing on a Triton without ``_patch_lang``."""
from __future__ import annotations


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
