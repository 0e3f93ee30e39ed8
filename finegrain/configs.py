"""The one check every dict -> frozen-dataclass config loader starts with."""
from __future__ import annotations

import dataclasses
from typing import Any


def check_fields(cls: type, d: Any, where: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming ``where`` unless ``d`` is a mapping of ``cls``'s fields."""
    if not isinstance(d, dict):
        raise error(f"{where}: expected a mapping of {cls.__name__} fields, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise error(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
