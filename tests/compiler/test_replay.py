"""compiler/replay.py: node-by-node execution over all batches, input substitution at targets,
nothing after the last target runs."""
import pytest
import torch
import torch.nn.functional as F
from torch.fx import symbolic_trace

from finegrain.compiler.replay import replay


@torch.fx.wrap
def _boom(x):
    raise AssertionError("a node after the last target ran")


class Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(8, 4))
        self.w2 = torch.nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        h = torch.relu(F.linear(x, self.w1))
        return _boom(F.linear(h, self.w2))


def test_targets_see_upstream_substitutions_and_nothing_after_runs():
    gm = symbolic_trace(Chain())
    lin = [n for n in gm.graph.nodes if n.target is F.linear]
    batches = [(torch.randn(2, 4),), (torch.randn(5, 4),)]
    seen = {}

    def hook(node, values):
        x = values(node.args[0])
        seen[node] = [v.clone() for v in x]
        if node is lin[0]:
            return {node.args[1]: torch.ones(8, 4)}  # lin1 runs with an all-ones weight
        return {}

    replay(gm, batches, lin, hook)
    assert [v.shape for v in seen[lin[0]]] == [(2, 4), (5, 4)]
    for (x,), h in zip(batches, seen[lin[1]]):
        torch.testing.assert_close(h, torch.relu(x @ torch.ones(8, 4).T))  # not the stored w1


def test_a_node_after_the_targets_would_raise():
    gm = symbolic_trace(Chain())
    with pytest.raises(AssertionError, match="after the last target"):
        gm(torch.randn(2, 4))  # the check above can fail: the whole graph does run _boom
