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


def markdown_table(columns: list[str], rows: list[list]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def pareto_lines(model: str, alloc, fp: dict, rows: list[dict], seq_len: int) -> list[str]:
    """``finegrain pareto``'s Markdown report: the frontier points' sizes, predicted and measured loss."""
    lines = [f"# Bit allocation frontier: {model}, {alloc.sensitivity} sensitivity, "
             f"{len(alloc.groups)} groups x {len(alloc.candidates)} candidates, solver {alloc.solver_seconds:.3f} s",
             "", f"FP ppl {fp['ppl']:.3f} ({fp['windows']} windows of {seq_len}).", "",
             "| bits/weight | model MB | predicted | ppl | ΔNLL vs FP | formats (linears) |", "|---|---|---|---|---|---|"]
    for r in rows:
        fm = ", ".join(f"{k}: {v}" for k, v in sorted(r["formats"].items()))
        lines.append(f"| {r['bits_per_weight']:.3f} | {r['model_bytes'] / 1e6:.1f} | {r['predicted']:.4g} | {r['ppl']:.3f} | "
                     f"{r['delta_nll']:+.4f} | {fm} |")
    val = alloc.extra.get("validation")
    if val:
        lines += ["", f"Proxy validation: {len(val['pairs'])} groups quantized alone to {val['pairs'][0]['format']}, "
                      f"Spearman(predicted, measured ΔNLL) = {val['spearman']:.3f}."]
    return lines


def plot_frontier(path: Path, alloc, rows: list[dict]) -> None:
    """``finegrain pareto``'s PNG: predicted loss along the frontier and the measured ΔNLL of its points."""
    plt = pyplot()
    if plt is None:
        return
    pts = alloc.frontier.points()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([alloc.bits_per_weight(p) for p in pts], [p.value for p in pts], "-", color="tab:blue", lw=1,
            label=f"predicted ({alloc.sensitivity})")
    ax.plot([r["bits_per_weight"] for r in rows], [r["predicted"] for r in rows], "o", color="tab:blue")
    ax.set_xlabel("bits per weight (allocated linears)")
    ax.set_ylabel("predicted loss (sensitivity sum)")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot([r["bits_per_weight"] for r in rows], [r["delta_nll"] for r in rows], "s--", color="tab:red",
             label="measured ΔNLL vs FP")
    ax2.set_ylabel("measured ΔNLL (nats/token)")
    fig.legend(loc="upper right", fontsize=8)
    ax.set_title("Bit allocation frontier: predicted vs measured")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
