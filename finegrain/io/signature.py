"""Model input signatures: the specs an artifact records (name, dtype, shape, which dims vary),
checks of real inputs against them, ``torch.export`` dynamic shapes and example inputs built from
them, and :func:`check_input_specs` for specs read from a file (sane limits before anything is
allocated). A leaf: backends and the runtime import it."""
from __future__ import annotations

import math
import re

import torch

from finegrain.errors import ArtifactError, InputError

_INPUT_DTYPES = {"int64", "int32", "float32", "float16", "bfloat16", "bool"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_INPUTS, MAX_RANK, MAX_DIM, MAX_INPUT_ELEMENTS = 512, 8, 1 << 20, 1 << 26  # KV-cache graphs: 2 + 2 x layers inputs


def input_spec(t: torch.Tensor, name: str, dynamic_dims: list[int], dims: list[dict] | None = None) -> dict:
    """An input's spec; ``dims`` (one per dynamic dim, declared with ``compile(inputs=...)``):
    ``{"label", "min", "max"}``, the size's name in exports and the range the model accepts."""
    spec = {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "dynamic_dims": dynamic_dims}
    return {**spec, "dims": [dict(d) for d in dims]} if dims else spec


def check_inputs(specs: list[dict], inputs: tuple, what: str = "input") -> None:
    """Raise InputError unless ``inputs`` match ``specs`` (count, dtype, rank, static dims)."""
    if len(inputs) != len(specs):
        raise InputError(f"{what}: expected {len(specs)} tensor(s) ({', '.join(s['name'] for s in specs)}), got {len(inputs)}")
    for t, s in zip(inputs, specs):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{what} {s['name']!r}: expected a tensor, got {type(t).__name__}")
        if str(t.dtype).removeprefix("torch.") != s["dtype"] or t.dim() != len(s["shape"]):
            raise InputError(f"{what} {s['name']!r}: expected {s['dtype']} with {len(s['shape'])} dims "
                             f"(like {s['shape']}), got {str(t.dtype).removeprefix('torch.')} {list(t.shape)}")
        for d, (got, want) in enumerate(zip(t.shape, s["shape"])):
            if d not in s["dynamic_dims"] and got != want:
                raise InputError(f"{what} {s['name']!r}: dim {d} must be {want} (only dims {s['dynamic_dims']} "
                                 f"vary), got shape {list(t.shape)}")
        for d, r in zip(s["dynamic_dims"], s.get("dims") or []):
            if not r["min"] <= t.shape[d] <= r["max"]:
                raise InputError(f"{what} {s['name']!r}: dim {d} ({r['label']}) must be in {r['min']}..{r['max']} "
                                 f"(the sizes the model takes), got shape {list(t.shape)}")


def export_dynamic_shapes(specs: list[dict]) -> tuple:
    """``torch.export`` dynamic shapes for inputs described by ``specs`` (a declared dim ``Dim.AUTO``,
    as at capture; otherwise dim 0 = batch, 1 = seq; a KV-cache graph's ``past_*`` inputs share one
    ``past`` dim (min 0) and its seq may be 1)."""
    kv = any(s["name"].startswith("past_") for s in specs)
    dims = {}
    out = []
    for s in specs:
        d = {}
        declared = dict(zip(s["dynamic_dims"], s.get("dims") or []))
        for i in s["dynamic_dims"]:
            if i in declared:  # as captured: export infers the range this graph allows (it may be narrower at the
                d[i] = torch.export.Dim.AUTO  # low end than the source model's: derived sizes must stay >= 2)
                continue
            past = kv and s["name"].startswith("past_") and i == 2
            key = "batch" if i == 0 else "past" if past else "seq" if i == 1 else f"{s['name']}_{i}"
            low = 0 if past else 1 if key == "batch" or kv else 2
            dims.setdefault(key, torch.export.Dim(key, min=low, max=1 << 16))
            d[i] = dims[key]
        out.append(d or None)
    return tuple(out)


def example_inputs(specs: list[dict]) -> tuple:
    """Placeholder inputs matching ``specs`` (dynamic dims at least 2, so export keeps them symbolic)."""
    out = []
    for s in specs:
        shape = [max(n, 2) if i in s["dynamic_dims"] else n for i, n in enumerate(s["shape"])]
        dtype = getattr(torch, s["dtype"])
        out.append(torch.zeros(shape, dtype=dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype))
    return tuple(out)


def check_input_specs(specs: object, where: str) -> None:
    """An input signature read from a file: names, dtypes, ranks and sizes within sane limits."""
    if not isinstance(specs, list) or not 1 <= len(specs) <= MAX_INPUTS:
        raise ArtifactError(f"{where}: expected 1..{MAX_INPUTS} input specs")
    for i, s in enumerate(specs):
        w = f"{where}[{i}]"
        if not isinstance(s, dict) or set(s) - {"dims"} != {"name", "dtype", "shape", "dynamic_dims"}:
            raise ArtifactError(f"{w}: expected an object with name, dtype, shape, dynamic_dims (and dims)")
        if not isinstance(s["name"], str) or not _NAME.match(s["name"]) or len(s["name"]) > 64:
            raise ArtifactError(f"{w}.name: {str(s['name'])[:64]!r} is not an identifier")
        if s["dtype"] not in _INPUT_DTYPES:
            raise ArtifactError(f"{w}.dtype: {str(s['dtype'])[:32]!r} is not one of {sorted(_INPUT_DTYPES)}")
        shape, dyn = s["shape"], s["dynamic_dims"]
        if (not isinstance(shape, list) or not 0 <= len(shape) <= MAX_RANK
                or not all(is_int(d) and 1 <= d <= MAX_DIM for d in shape)):
            raise ArtifactError(f"{w}.shape: expected at most {MAX_RANK} dims, each in 1..{MAX_DIM}")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise ArtifactError(f"{w}.shape: {shape} has more than {MAX_INPUT_ELEMENTS} elements")
        if not isinstance(dyn, list) or not all(is_int(d) and 0 <= d < len(shape) for d in dyn) or len(set(dyn)) != len(dyn):
            raise ArtifactError(f"{w}.dynamic_dims: expected distinct dims of the shape")
        dims = s.get("dims", [])
        if not isinstance(dims, list) or ("dims" in s and len(dims) != len(dyn)) or not all(
                isinstance(x, dict) and set(x) == {"label", "min", "max"} and isinstance(x["label"], str)
                and _NAME.match(x["label"]) and len(x["label"]) <= 64 and is_int(x["min"]) and is_int(x["max"])
                and 1 <= x["min"] <= x["max"] <= MAX_DIM for x in dims):
            raise ArtifactError(f"{w}.dims: expected one {{label, min, max}} per dynamic dim (an identifier, "
                                f"1 <= min <= max <= {MAX_DIM})")


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
