"""The one table of backends. The API (``cm.session``), ``finegrain.load``, the CLI's
``--backend`` choices, ``finegrain eval``, ``finegrain backends`` and the README's capability
matrix all read :data:`BACKENDS`; a new backend is one folder implementing the contract in
``backends/base.py`` plus one line here. Entries are ``"module:attribute"`` so that importing
finegrain imports no backend's heavy dependencies (onnxruntime, TVM)."""
from __future__ import annotations

import importlib
from pathlib import Path

from finegrain.errors import InputError

BACKENDS: dict[str, str] = {
    "torch": "finegrain.backends.torch_ref:BACKEND",
    "onnx": "finegrain.backends.onnx:BACKEND",
    "tvm": "finegrain.backends.tvm.backend:BACKEND",
    "gpu": "finegrain.backends.gpu.backend:BACKEND",
}


def names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def get(name: str):
    """The backend object registered as ``name``."""
    if name not in BACKENDS:
        raise InputError(f"backend {name!r} is not available; choose one of {names()}")
    module, attr = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def recognize(path: str | Path):
    """The backend whose own artifact ``path`` is (e.g. a TVM deployment), or None."""
    for name in BACKENDS:
        backend = get(name)
        if backend.recognizes(Path(path)):
            return backend
    return None


def capability_matrix(rows: list[tuple[str, str, object]]) -> list[list[str]]:
    """``rows`` of (label, role, format-or-op) -> one status per backend (``native`` /
    ``emulated`` / ``refused``), from each backend's own capability functions."""
    return [[label, *(get(name).status(role, thing)[0] for name in BACKENDS)] for label, role, thing in rows]


def preset_rows() -> list[tuple[str, str, object]]:
    """Every format the presets use (as weight or activation) and the graph ops that are not
    formats: the capability matrix's rows."""
    from finegrain.compiler.recipe import PRESETS

    seen: dict[tuple[str, str], object] = {}
    for recipe in PRESETS.values():
        for rule in recipe.rules:
            for role, fmt in (("weight", rule.weight), ("activation", rule.activation)):
                if fmt is not None:
                    seen.setdefault((role, fmt.tag), fmt)
    rows = [(f"{role} {tag}", role, fmt) for (role, tag), fmt in sorted(seen.items())]
    from finegrain.formats import QuantFormat

    rows.append(("KV cache per token / head-dim groups (int4-g32-asym-fp16-dyn)", "kv",
                 QuantFormat.parse("int4-g32-asym-fp16-dyn")))
    rows.append(("KV cache FP8 E4M3 per token (e4m3-token-sym-fp32-dyn)", "kv",
                 QuantFormat.parse("e4m3-token-sym-fp32-dyn")))
    rows.append(("KV cache FP8 E4M3, one static scale per layer (e4m3-tensor-sym-fp32)", "kv",
                 QuantFormat.parse("e4m3-tensor-sym-fp32")))
    rows.append(("KV cache INT8, one static scale per layer (int8-tensor-sym-fp32)", "kv",
                 QuantFormat.parse("int8-tensor-sym-fp32")))
    return rows + [("online Hadamard (FWHT)", "op", "hadamard"), ("MoE grouped_linear", "op", "grouped_linear"),
                   ("KV cache per channel / float window (KIVI)", "op", "kv_append"),
                   ("KV cache keys in a calibrated Karhunen-Loeve basis (kv_key_klt)", "op", "kv_klt"),
                   ("activation outlier groups at 8 bits (FMPQ)", "op", "act_outliers"),
                   ("conv with a quantized weight", "op", "conv"),
                   ("LSTM / GRU with quantized weights", "op", "recurrent")]


def preset_matrix() -> list[list[str]]:
    """Per preset and backend: the weakest status over the preset's formats and ops."""
    from finegrain.compiler.recipe import PRESETS
    from finegrain.formats import QuantFormat

    rank = {"native": 0, "emulated": 1, "refused": 2}
    out = []
    for pname, recipe in PRESETS.items():
        items = [(role, fmt, rule.weight if role == "activation" else None) for rule in recipe.rules
                 for role, fmt in (("weight", rule.weight), ("activation", rule.activation)) if fmt]
        if recipe.rotate and recipe.online_hadamard and any(rule.activation for rule in recipe.rules):
            items.append(("op", "hadamard", None))  # online Hadamards go before activation-quantized linears only
        for role in ("conv", "recurrent"):
            if any(rule.role == role and rule.weight for rule in recipe.rules):
                items.append(("op", role, None))
        if recipe.act_outlier_fraction and any(rule.activation for rule in recipe.rules):
            items.append(("op", "act_outliers", None))
        for kind, tag in (("key", recipe.kv_key), ("value", recipe.kv_value)):
            if tag:
                items.append(("op", "kv_append", None) if recipe.kv_windowed(kind)
                             else ("kv", QuantFormat.parse(tag), None))
        cells = [pname]
        for name in BACKENDS:
            b = get(name)
            worst = "native"
            for role, thing, partner in items:
                worst = max(worst, b.status(role, thing, partner)[0], key=rank.get)
            cells.append(worst)
        out.append(cells)
    return out
