"""Multiple-choice knapsack: one candidate per group, minimum summed value under a cost budget,
and its whole Pareto frontier in one dynamic program.

Costs are integers (bits or bytes). They are measured in *units* of ``unit`` (1 when the
instance is small enough, else the smallest unit keeping the table under ``max_units`` columns)
and rounded up, so every solution read off the table fits its budget in true costs; with
``unit == 1`` the solution is exactly optimal, otherwise optimal for the rounded costs (and a
budget less than ``groups x unit`` above the cheapest choice may be refused). The table ``dp[b]`` is the least total value
with total cost at most ``b`` units, built group by group in O(groups x candidates x units)
with numpy; ``arg`` keeps each group's choice per budget for reconstruction. The frontier is
every budget where ``dp`` strictly drops (the Pareto-optimal (cost, value) pairs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Point:
    cost: int  # true total cost of the picked candidates
    value: float  # summed value (predicted loss)
    picks: tuple[int, ...]  # candidate index per group


class Frontier:
    """The DP table of a multiple-choice knapsack instance; query any budget without re-solving."""

    def __init__(self, costs: list[list[int]], values: list[list[float]], max_units: int = 1 << 15):
        if not costs or len(costs) != len(values):
            raise ValueError("knapsack: need one cost list and one value list per group")
        for g, (c, v) in enumerate(zip(costs, values)):
            if not c or len(c) != len(v):
                raise ValueError(f"knapsack: group {g} has {len(c)} costs and {len(v)} values")
            if min(c) < 0 or any(not math.isfinite(x) for x in v):
                raise ValueError(f"knapsack: group {g} has a negative cost or a non-finite value")
        self.costs, self.values = costs, values
        total_max = sum(max(c) for c in costs)
        self.unit = max(1, math.ceil(total_max / max_units))
        units = [[math.ceil(x / self.unit) for x in c] for c in costs]
        self.units = units
        width = sum(max(u) for u in units) + 1
        dp = np.zeros(width)  # zero groups: value 0 at every budget
        self.arg = np.zeros((len(costs), width), dtype=np.int16)
        for g, (u, v) in enumerate(zip(units, values)):
            new = np.full(width, np.inf)
            for i, (ui, vi) in enumerate(zip(u, v)):
                cand = np.full(width, np.inf)
                cand[ui:] = dp[: width - ui] + vi
                better = cand < new
                new[better] = cand[better]
                self.arg[g, better] = i
            dp = new
        self.dp = dp

    @property
    def min_units(self) -> int:
        return sum(min(u) for u in self.units)

    @property
    def min_cost(self) -> int:
        return sum(min(c) for c in self.costs)

    def _reconstruct(self, b: int) -> Point:
        picks = []
        for g in range(len(self.costs) - 1, -1, -1):
            i = int(self.arg[g, b])
            picks.append(i)
            b -= self.units[g][i]
        picks.reverse()
        return Point(sum(c[i] for c, i in zip(self.costs, picks)), float(sum(v[i] for v, i in zip(self.values, picks))),
                     tuple(picks))

    def best(self, budget: int) -> Point:
        """Least-value choice with true total cost <= ``budget``."""
        b = min(budget // self.unit, len(self.dp) - 1)
        if b < 0 or not np.isfinite(self.dp[b]):
            raise ValueError(f"budget {budget} is below the cheapest choice ({self.min_cost}"
                             + (f"; {self.min_units * self.unit} at the solver's resolution of {self.unit})" if self.unit > 1 else ")"))
        return self._reconstruct(b)

    def points(self) -> list[Point]:
        """The Pareto frontier: cost increasing, value strictly decreasing (computed once)."""
        if getattr(self, "_points", None) is not None:
            return list(self._points)
        out: list[Point] = []
        finite = np.flatnonzero(np.isfinite(self.dp))
        prev = np.inf
        for b in finite:
            if self.dp[b] < prev - 1e-12 * max(1.0, abs(prev) if np.isfinite(prev) else 1.0):
                p = self._reconstruct(int(b))
                if not out or p.value < out[-1].value:
                    out.append(p)
                prev = self.dp[b]
        self._points = out
        return list(out)
