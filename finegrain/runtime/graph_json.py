"""FX graph <-> JSON, so artifacts never need pickle.

Targets are resolved only from ``torch.ops.<namespace>`` and the ``operator`` module (an
allow-list), so a crafted artifact cannot name arbitrary Python callables. Arguments may be
nodes, Python scalars / strings / None, lists and tuples of those, and torch dtypes, devices,
layouts and memory formats.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch.fx import Graph, Node

from finegrain.errors import ArtifactError

_LAYOUTS = {str(torch.strided): torch.strided, str(torch.sparse_coo): torch.sparse_coo}
_MEMORY_FORMATS = {str(m): m for m in (torch.contiguous_format, torch.preserve_format, torch.channels_last)}
_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return "torch.ops." + str(target)  # e.g. torch.ops.aten.linear.default
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return "operator." + target.__name__
    raise ArtifactError(f"cannot serialize call target {target!r}: only torch.ops and operator functions are allowed")


def _resolve_target(name: str) -> Any:
    if name.startswith("operator."):
        fn = getattr(operator, name.split(".", 1)[1], None)
        if fn is None:
            raise ArtifactError(f"graph.json names unknown operator function {name!r}")
        return fn
    if name.startswith("torch.ops."):
        obj: Any = torch.ops
        for part in name.split(".")[2:]:
            obj = getattr(obj, part, None)
            if obj is None:
                raise ArtifactError(f"graph.json names op {name!r}, which this torch build does not have")
        return obj
    raise ArtifactError(f"graph.json names disallowed target {name!r}")


def _enc(a: Any) -> Any:
    if isinstance(a, Node):
        return {"node": a.name}
    if isinstance(a, bool) or a is None or isinstance(a, (int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, (list, tuple)):
        return {"list" if isinstance(a, list) else "tuple": [_enc(x) for x in a]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a)}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a)}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a)}
    raise ArtifactError(f"cannot serialize graph argument {a!r} of type {type(a).__name__}")


def _dec(a: Any, env: dict[str, Node]) -> Any:
    if not isinstance(a, dict):
        return a
    (kind, v), = a.items()
    decoders = {
        "node": lambda: env[v],
        "float": lambda: float(v),
        "list": lambda: [_dec(x, env) for x in v],
        "tuple": lambda: tuple(_dec(x, env) for x in v),
        "dtype": lambda: _DTYPES[v],
        "device": lambda: torch.device(v),
        "layout": lambda: _LAYOUTS[v],
        "memory_format": lambda: _MEMORY_FORMATS[v],
    }
    if kind not in decoders:
        raise ArtifactError(f"graph.json: unknown argument encoding {kind!r}")
    return decoders[kind]()


def graph_to_json(graph: Graph) -> list[dict]:
    nodes = []
    for n in graph.nodes:
        rec = {"name": n.name, "op": n.op}
        if n.op == "call_function":
            rec["target"] = _target_name(n.target)
        elif n.op in ("get_attr", "placeholder"):
            rec["target"] = n.target
        elif n.op != "output":
            raise ArtifactError(f"cannot serialize node {n.name} with op {n.op!r}")
        rec["args"] = _enc(tuple(n.args))
        rec["kwargs"] = {k: _enc(v) for k, v in n.kwargs.items()}
        nodes.append(rec)
    return nodes


def graph_from_json(nodes: list[dict]) -> Graph:
    graph, env = Graph(), {}
    try:
        for rec in nodes:
            args = _dec(rec["args"], env)
            kwargs = {k: _dec(v, env) for k, v in rec["kwargs"].items()}
            op = rec["op"]
            if op == "placeholder":
                new = graph.placeholder(rec["target"])
            elif op == "get_attr":
                new = graph.get_attr(rec["target"])
            elif op == "call_function":
                new = graph.call_function(_resolve_target(rec["target"]), args, kwargs)
            elif op == "output":
                new = graph.output(args[0])
            else:
                raise ArtifactError(f"graph.json: node {rec.get('name')} has unknown op {op!r}")
            new.name = rec["name"]
            env[rec["name"]] = new
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"graph.json is malformed: {type(e).__name__}: {e}") from None
    graph.lint()
    return graph
