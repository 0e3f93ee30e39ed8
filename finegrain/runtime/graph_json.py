"""FX graph <-> JSON, so artifacts never need pickle, and a graph read from a file can never run
anything but the operators it names from an allow-list.

torch.fx turns a graph into Python source (``GraphModule.recompile``): node names become variable
names, placeholder targets parameter names, ``get_attr`` targets attribute paths, keyword names
keywords. So every string from the file that could reach that source is checked before a node is
made, and the loader never builds source text of its own:

* names, placeholder targets and keyword names: identifiers (``[A-Za-z_][A-Za-z0-9_]*``), no
  Python keyword or builtin name (FX must keep the name unchanged: a name it would rename is
  refused), unique, at most :data:`MAX_NAME` characters; ``get_attr`` targets: dot-separated
  ``[A-Za-z0-9_]+`` parts naming a stored tensor;
* call targets: ``torch.ops.<ns>.<op>.<overload>`` resolving to a real ``OpOverload`` with
  ``ns`` in :data:`OP_NAMESPACES` (the overload must be listed by its packet; no attribute walk
  reaches anything else), minus operators that touch files; or ``operator.<fn>`` from
  :data:`OPERATORS`, or ``torch.sym_max`` / ``torch.sym_min`` (:data:`SYM_FUNCTIONS`: the max / min of
  two shape integers, as MPT's ALiBi slice bounds ``max(0, n - length)`` export); keyword names must be
  arguments of the operator's schema;
* argument values: JSON scalars (integers within int64, finite floats, or ``{"float": "inf" |
  "-inf" | "nan"}``, strings up to :data:`MAX_STRING`), lists / tuples nested at most
  :data:`MAX_DEPTH` deep, references to earlier nodes, and dtypes / devices / layouts / memory
  formats from fixed tables.

Anything else is an :class:`ArtifactError` that names the node and the field.
"""
from __future__ import annotations

import builtins
import keyword
import math
import operator
import re
from typing import Any

import torch
from torch.fx import Graph, Node

from finegrain.errors import ArtifactError

OP_NAMESPACES = ("aten", "finegrain")
OPERATORS = {name: getattr(operator, name) for name in (
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift")}
SYM_FUNCTIONS = {"sym_max": torch.sym_max, "sym_min": torch.sym_min}  # torch.<fn>: pure functions of shape integers
_FILE_OPS = {"from_file", "save", "load"}  # aten operators that read or write files
MAX_NAME, MAX_STRING, MAX_DEPTH, MAX_NODES = 256, 4096, 16, 1 << 20
_INT64 = (-(1 << 63), (1 << 63) - 1)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ATTR_PART = re.compile(r"[A-Za-z0-9_]+\Z")  # module paths have numeric parts (layers.0)
_DEVICE = re.compile(r"(cpu|cuda|meta)(:[0-9]{1,3})?\Z")
_RESERVED = set(dir(builtins)) | {"self", "torch", "device", "inf", "nan", "fx_pytree", "pytree", "NoneType"}
_LAYOUTS = {str(torch.strided): torch.strided, str(torch.sparse_coo): torch.sparse_coo}
_MEMORY_FORMATS = {str(m): m for m in (torch.contiguous_format, torch.preserve_format, torch.channels_last)}
_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_NODE_KEYS = {"name", "op", "target", "args", "kwargs"}


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload) and target.namespace in OP_NAMESPACES:
        return "torch.ops." + str(target)  # e.g. torch.ops.aten.linear.default
    if getattr(target, "__module__", None) in ("_operator", "operator") and OPERATORS.get(target.__name__) is target:
        return "operator." + target.__name__
    if SYM_FUNCTIONS.get(getattr(target, "__name__", None)) is target:
        return "torch." + target.__name__
    raise ArtifactError(f"cannot serialize call target {target!r}: only torch.ops.{{{','.join(OP_NAMESPACES)}}} "
                        f"operators, operator.{{{','.join(OPERATORS)}}} and torch.{{{','.join(SYM_FUNCTIONS)}}} "
                        "are allowed")


def _is_name(s: Any) -> bool:
    return (isinstance(s, str) and len(s) <= MAX_NAME and _IDENT.match(s) is not None
            and not keyword.iskeyword(s) and s not in _RESERVED)


def _resolve_target(name: Any, where: str) -> Any:
    """The operator ``name`` names, or ArtifactError; never an attribute walk beyond an op packet."""
    if not isinstance(name, str):
        raise ArtifactError(f"{where}: target must be a string, got {type(name).__name__}")
    parts = name.split(".")
    if len(parts) == 2 and parts[0] == "operator" and parts[1] in OPERATORS:
        return OPERATORS[parts[1]]
    if len(parts) == 2 and parts[0] == "torch" and parts[1] in SYM_FUNCTIONS:
        return SYM_FUNCTIONS[parts[1]]
    if len(parts) != 5 or parts[:2] != ["torch", "ops"] or parts[2] not in OP_NAMESPACES:
        raise ArtifactError(f"{where}: disallowed target {name[:MAX_NAME]!r} (allowed: torch.ops.<ns>.<op>.<overload> "
                            f"with ns in {OP_NAMESPACES}, operator.<fn> with fn in {sorted(OPERATORS)}, or torch.<fn> with fn in "
                            f"{sorted(SYM_FUNCTIONS)})")
    ns, op, overload = parts[2:]
    if not (_IDENT.match(op) and _IDENT.match(overload)) or op in _FILE_OPS:
        raise ArtifactError(f"{where}: disallowed operator {name[:MAX_NAME]!r}")
    if ns == "finegrain":
        import finegrain.compiler.ops  # noqa: F401  (registers the finegrain:: operators)
        import finegrain.formats.ops  # noqa: F401
    try:
        packet = getattr(getattr(torch.ops, ns), op)
    except (AttributeError, RuntimeError):
        packet = None
    if not isinstance(packet, torch._ops.OpOverloadPacket) or overload not in packet.overloads():
        raise ArtifactError(f"{where}: operator {name!r} does not exist in this torch build / finegrain version")
    op_ = getattr(packet, overload)
    if not isinstance(op_, torch._ops.OpOverload) or op_.namespace != ns:
        raise ArtifactError(f"{where}: {name!r} is not an operator overload")
    if any(str(a.type).startswith("str") and any(k in a.name for k in ("file", "path")) for a in op_._schema.arguments):
        raise ArtifactError(f"{where}: operator {name!r} touches files and is not allowed in a graph")
    return op_


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


def _dec(a: Any, env: dict[str, Node], where: str, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise ArtifactError(f"{where}: arguments nested deeper than {MAX_DEPTH}")
    if a is None or isinstance(a, bool):
        return a
    if isinstance(a, int):
        if not _INT64[0] <= a <= _INT64[1]:
            raise ArtifactError(f"{where}: integer argument outside int64")
        return a
    if isinstance(a, float):
        if not math.isfinite(a):
            raise ArtifactError(f"{where}: non-finite float written as a JSON number")
        return a
    if isinstance(a, str):
        if len(a) > MAX_STRING:
            raise ArtifactError(f"{where}: string argument longer than {MAX_STRING} characters")
        return a
    if not isinstance(a, dict) or len(a) != 1:
        raise ArtifactError(f"{where}: unsupported argument encoding of type {type(a).__name__}")
    (kind, v), = a.items()
    if kind in ("list", "tuple"):
        if not isinstance(v, list):
            raise ArtifactError(f"{where}: {kind} argument must be a JSON array")
        items = [_dec(x, env, where, depth + 1) for x in v]
        return items if kind == "list" else tuple(items)
    if not isinstance(v, str):
        raise ArtifactError(f"{where}: {kind!r} argument must be a string")
    if kind == "node":
        if v not in env:
            raise ArtifactError(f"{where}: refers to node {v[:MAX_NAME]!r}, which is not defined before it")
        return env[v]
    if kind == "float":
        if v not in ("inf", "-inf", "nan"):
            raise ArtifactError(f"{where}: float argument {v[:40]!r} must be 'inf', '-inf' or 'nan'")
        return float(v)
    table = {"dtype": _DTYPES, "layout": _LAYOUTS, "memory_format": _MEMORY_FORMATS}.get(kind)
    if table is not None:
        if v not in table:
            raise ArtifactError(f"{where}: unknown {kind} {v[:40]!r}")
        return table[v]
    if kind == "device":
        if not _DEVICE.match(v):
            raise ArtifactError(f"{where}: device {v[:40]!r} is not cpu, cuda[:N] or meta")
        return torch.device(v)
    raise ArtifactError(f"{where}: unknown argument encoding {kind[:40]!r}")


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


def graph_from_json(nodes: Any, tensor_names: set[str] | None = None) -> Graph:
    """A Graph from ``graph_to_json``'s output, checked as the module docstring says.
    ``tensor_names``: the stored tensors ``get_attr`` nodes may name (None: any valid path)."""
    if not isinstance(nodes, list) or not nodes:
        raise ArtifactError("graph.json must hold a non-empty JSON array of nodes")
    if len(nodes) > MAX_NODES:
        raise ArtifactError(f"graph.json has {len(nodes)} nodes (more than {MAX_NODES})")
    graph, env = Graph(), {}
    for i, rec in enumerate(nodes):
        where = f"graph.json node {i}"
        if not isinstance(rec, dict):
            raise ArtifactError(f"{where}: must be a JSON object")
        name = rec.get("name")
        if not _is_name(name):
            raise ArtifactError(f"{where}: name {str(name)[:MAX_NAME]!r} is not a plain identifier")
        where = f"graph.json node {i} ({name})"
        if name in env:
            raise ArtifactError(f"{where}: name defined twice")
        op = rec.get("op")
        keys = set(rec)
        if op not in ("placeholder", "get_attr", "call_function", "output") or \
                keys != (_NODE_KEYS - {"target"} if op == "output" else _NODE_KEYS):  # exactly what the writer writes
            raise ArtifactError(f"{where}: op {str(op)[:40]!r} with fields {sorted(keys)[:8]} is not a node this "
                                "finegrain writes")
        if op == "output" and i != len(nodes) - 1:
            raise ArtifactError(f"{where}: the output node must be last")
        args = _dec(rec["args"], env, f"{where} args")
        kw = rec["kwargs"]
        if not isinstance(kw, dict) or not isinstance(args, tuple):
            raise ArtifactError(f"{where}: args must be a tuple and kwargs an object")
        target = rec.get("target")
        if op == "placeholder":
            if not _is_name(target) or args or kw:
                raise ArtifactError(f"{where}: a placeholder takes an identifier target and no arguments")
        elif op == "get_attr":
            if (not isinstance(target, str) or len(target) > 4 * MAX_NAME
                    or not all(_ATTR_PART.match(p) and not keyword.iskeyword(p) for p in target.split(".")) or args or kw
                    or (tensor_names is not None and target not in tensor_names)):
                raise ArtifactError(f"{where}: get_attr target {str(target)[:MAX_NAME]!r} is not a stored tensor")
        elif op == "call_function":
            target = _resolve_target(target, where)
            allowed = {a.name for a in target._schema.arguments} if isinstance(target, torch._ops.OpOverload) else set()
            bad = [k for k in kw if k not in allowed]
            if bad:
                raise ArtifactError(f"{where}: keyword {str(bad[0])[:MAX_NAME]!r} is not an argument of {rec['target']}")
        elif len(args) != 1 or kw:
            raise ArtifactError(f"{where}: the output node takes one argument")
        kwargs = {k: _dec(v, env, f"{where} kwarg {k}") for k, v in kw.items()}
        new = graph.create_node(op, target if op != "output" else "output", args, kwargs, name=name)
        if new.name != name:  # FX would rename it: a name it reserves
            raise ArtifactError(f"{where}: name {name!r} is reserved")
        env[name] = new
    if nodes[-1].get("op") != "output":
        raise ArtifactError("graph.json: the last node must be the output")
    try:
        graph.lint()
    except (RuntimeError, ValueError, TypeError) as e:
        raise ArtifactError(f"graph.json is not a valid graph: {e}") from None
    return graph
