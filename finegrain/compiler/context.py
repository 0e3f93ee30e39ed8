"""``PassContext``: what passes share besides ``node.meta``. A leaf of the compiler floor, so passes
can annotate ``ctx: PassContext`` without importing the driver."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from finegrain.compiler.recipe import Recipe
from finegrain.compiler.stats import StatsStore


@dataclass
class PassContext:
    """What passes share besides ``node.meta``: the recipe, calibration data, the stats store,
    and a report that ends up in the artifact's summary."""

    recipe: Recipe
    calibration: list[tuple] = field(default_factory=list)
    stats: StatsStore = field(default_factory=StatsStore)
    report: dict = field(default_factory=dict)
    allocation: Any = None  # passes/allocate_bits.Allocation when the recipe allocates bits
    show_progress: bool = True
    strict_recipe: bool = False  # a rule matching nothing / nothing quantized: an error instead of a warning
    check_rules: bool = True  # False for a part of a graph (driver/stream.py checks the rules on the whole)

    def __post_init__(self) -> None:
        if not self.stats.nodes and self.recipe.smoothing is None:
            self.stats.rows = 0  # only smoothing's search reads token rows: don't keep them
        self.stats.hessian = self.recipe.needs_float_hessian

    def progress(self, items: Iterable, desc: str) -> Iterable:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, disable=not self.show_progress, leave=False)
