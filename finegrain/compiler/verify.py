"""Invariants checked between passes (``run_passes`` calls :func:`verify` after each one)."""
from __future__ import annotations

from torch.fx import GraphModule

from finegrain.compiler.ir import get_tensor


class VerifyError(RuntimeError):
    pass


def verify(gm: GraphModule, after: str) -> None:
    """Graph well-formed; every ``get_attr`` resolves to a tensor; one output."""
    try:
        gm.graph.lint()
    except Exception as e:
        raise VerifyError(f"after pass {after!r}: graph is malformed: {e}") from e
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        raise VerifyError(f"after pass {after!r}: graph has {len(outputs)} output nodes")
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                get_tensor(gm, n.target)
            except AttributeError:
                raise VerifyError(f"after pass {after!r}: node {n.name} reads missing constant {n.target!r}") from None
