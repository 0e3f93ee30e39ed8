"""TIR kernels for the TVM backend (``lowbit.py``: packed low-bit group-wise linears; ``a8.py``:
integer-dot W(<=4)A8 linears; ``dense.py``: fp32 GEMV; ``attention.py``: fused attention over
plain, cached and packed K / V).

:func:`memoized` makes a kernel builder return the same PrimFunc for the same arguments within a
process: parsing a TVMScript kernel or scheduling a TE one takes ~0.1-1 s, and a model asks for
the same kernel in every layer of both functions (prefill, decode), and each build again."""
from __future__ import annotations

import functools


def _frozen(x):
    """A hashable, exact key for plain arguments; TypeError for anything else."""
    if isinstance(x, dict):
        return ("dict", tuple(sorted((k, _frozen(v)) for k, v in x.items())))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_frozen(v) for v in x))
    if isinstance(x, float):
        return ("float", repr(x))  # 0.0 and -0.0 differ
    if x is None or isinstance(x, (bool, int, str)):
        return (type(x).__name__, x)
    raise TypeError(f"not a plain argument: {type(x).__name__}")


class _Args:
    __slots__ = ("args", "kwargs", "key")

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs, self.key = args, kwargs, _frozen((args, kwargs))

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Args) and other.key == self.key


def memoized(builder):
    """``builder`` (plain arguments -> PrimFunc) built once per distinct arguments (the 256 most
    recent kept). PrimFuncs are immutable: callers name theirs with ``with_attrs``, which copies.
    Arguments that are not plain data (ints, floats, strings, None, dicts / lists of them) build
    every time."""
    cached = functools.lru_cache(maxsize=256)(lambda a: builder(*a.args, **a.kwargs))

    @functools.wraps(builder)
    def build(*args, **kwargs):
        try:
            key = _Args(args, kwargs)
        except TypeError:
            return builder(*args, **kwargs)
        return cached(key)

    build.cache_info = cached.cache_info
    return build
