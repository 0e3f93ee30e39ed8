"""Shared output of benchmarks and reports: markdown + JSON side by side, and matplotlib if present."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_tables(out: str | Path, lines: list[str], payload: dict[str, Any]) -> Path:
    """Write ``<out>.md`` (``lines``) and ``<out>.json`` (``payload``), print the markdown."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print("\n".join(lines))
    return out


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend, or None (with a message) when the ``plot``
    extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install finegrain[plot]): no PNG")
        return None
    return plt
