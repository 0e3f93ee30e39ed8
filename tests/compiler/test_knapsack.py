"""The multiple-choice knapsack solver against brute force; budgets, frontier, determinism."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finegrain.compiler.knapsack import Frontier


def brute(costs, values, budget):
    best = None
    for picks in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(cc[i] for cc, i in zip(costs, picks))
        v = sum(vv[i] for vv, i in zip(values, picks))
        if c <= budget and (best is None or v < best[1] - 1e-12):
            best = (c, v)
    return best


instances = st.lists(st.lists(st.tuples(st.integers(0, 30), st.floats(0, 100)), min_size=1, max_size=4),
                     min_size=1, max_size=5)


@settings(max_examples=80, deadline=None)
@given(instances, st.integers(0, 150))
def test_optimal_against_brute_force(inst, budget):
    costs = [[c for c, _ in g] for g in inst]
    values = [[v for _, v in g] for g in inst]
    f = Frontier(costs, values)
    assert f.unit == 1
    want = brute(costs, values, budget)
    if want is None:
        with pytest.raises(ValueError, match="below the cheapest"):
            f.best(budget)
        return
    got = f.best(budget)
    assert got.cost <= budget  # budget respected exactly
    assert got.value == pytest.approx(want[1], abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(instances)
def test_frontier_is_monotone_and_pareto(inst):
    costs = [[c for c, _ in g] for g in inst]
    values = [[v for _, v in g] for g in inst]
    pts = Frontier(costs, values).points()
    assert pts
    for a, b in zip(pts, pts[1:]):
        assert a.cost < b.cost and a.value > b.value
    for p in pts:  # each point is optimal at its own cost
        assert p.value == pytest.approx(brute(costs, values, p.cost)[1], abs=1e-9)


def test_large_instance_uses_units_and_still_fits():
    rng = np.random.default_rng(0)
    costs = [[int(x) for x in rng.integers(10**6, 10**8, 5)] for _ in range(60)]
    values = [[float(x) for x in rng.random(5)] for _ in range(60)]
    f = Frontier(costs, values, max_units=4096)
    assert f.unit > 1
    for budget in np.linspace(f.min_units * f.unit, sum(max(c) for c in costs), 7).astype(int):
        p = f.best(int(budget))
        assert p.cost <= budget


def test_deterministic():
    costs = [[3, 5, 8], [2, 4, 9], [1, 6, 7]]
    values = [[9.0, 4.0, 1.0], [7.0, 3.0, 0.5], [5.0, 5.0, 0.2]]
    a = [p.picks for p in Frontier(costs, values).points()]
    b = [p.picks for p in Frontier(costs, values).points()]
    assert a == b


def test_bad_instances_are_named():
    with pytest.raises(ValueError, match="group 1"):
        Frontier([[1], [2, 3]], [[0.0], [1.0]])
