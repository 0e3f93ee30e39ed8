"""Hadamard constructions, the fast transform and the ``finegrain::hadamard`` custom op."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finegrain.formats.hadamard import (apply_hadamard, fwht, hadamard_factor, hadamard_matrix, hadamard_parts,
                                        small_hadamard)
from finegrain.compiler.ops import HADAMARD


@pytest.mark.parametrize("m", [12, 20, 24, 28, 36, 44, 60, 76, 84, 108])
def test_paley_matrices_are_hadamard(m):
    h = small_hadamard(m)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=h.dtype))


@pytest.mark.parametrize("n,m", [(64, 1), (96, 12), (576, 36), (1536, 12), (14336, 28), (768, 12), (40, 20)])
def test_sizes_of_real_models_have_full_hadamards(n, m):
    assert hadamard_factor(n) == (m, True)
    if n > 2048:
        return  # the dense check below is O(n^3)
    h, exact = hadamard_matrix(n)
    assert exact and torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))


def test_block_diagonal_fallback_is_orthogonal_and_reported():
    n = 11008  # 43 * 256: no Hadamard of order 172 among the constructions
    assert hadamard_factor(n) == (43, False)
    f, p, exact = hadamard_parts(n)
    assert not exact and p == 256
    x = torch.randn(4, n, dtype=torch.float64)
    y = apply_hadamard(x, f)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)


def test_fwht_matches_dense_sylvester():
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    h, _ = hadamard_matrix(64)
    assert torch.allclose(fwht(x), x @ h, atol=1e-12)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(2, 12))


@settings(max_examples=25, deadline=None)
@given(n=st.sampled_from([4, 12, 24, 36, 48, 96, 144, 576]), rows=st.integers(1, 5), seed=st.integers(0, 1000))
def test_online_op_equals_dense_rotation(n, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    f, _, _ = hadamard_parts(n)
    h, _ = hadamard_matrix(n)
    dense = x @ h / math.sqrt(n)
    assert torch.allclose(apply_hadamard(x, f), dense, atol=1e-10)
    y = HADAMARD(x.float(), f.float())
    assert y.dtype == torch.float32 and torch.allclose(y.double(), dense, atol=1e-4)
    assert torch.allclose(dense @ (h.T / math.sqrt(n)), x, atol=1e-10)  # orthogonal: H^T undoes it


def test_hadamard_op_survives_export():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("f", hadamard_parts(24)[0].float())

        def forward(self, x):
            return HADAMARD(x, self.f) * 2

    ep = torch.export.export(M(), (torch.randn(3, 24),))
    assert any(n.target is HADAMARD for n in ep.graph.nodes)
    x = torch.randn(3, 24)
    assert torch.allclose(ep.module()(x), M()(x))
