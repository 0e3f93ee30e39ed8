"""Hadamard matrices of any size the literature uses, and the fast Walsh-Hadamard transform.

QuaRot (Ashkboos et al. 2024) and its successors rotate activations by an orthogonal Hadamard
matrix so that outlier channels are spread over all channels. A Hadamard matrix of order n
exists only for n = 1, 2 or a multiple of 4; the constructions here are

* Sylvester: H_{2^k} (symmetric, applied in O(n log n) by the butterfly :func:`fwht`);
* Paley I (q prime, q = 3 mod 4): order q + 1 (4, 8, 12, 20, 24, 32, 44, 48, 60, 68, 72, ...);
* Paley II (q prime, q = 1 mod 4): order 2(q + 1) (12, 28, 36, 60, 76, 84, 108, ...);
* Kronecker products H_m (x) H_{2^k} of the above, so 576 = 36 * 16 and 1536 = 12 * 128 work.

When no factor m is known, :func:`hadamard_factor` falls back to the block-diagonal
I_m (x) H_{2^k} (still orthogonal, mixes only within blocks) and says so.

All matrices are returned unnormalized (entries +-1); divide by sqrt(n) for an orthogonal one.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) with chi the quadratic character mod prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(n, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one_block) + torch.kron((c == 0).double(), zero_block)


@lru_cache(maxsize=None)
def _small_orders() -> dict[int, tuple[str, int]]:
    """Orders m (not powers of two) with a known construction, up to 256."""
    out: dict[int, tuple[str, int]] = {}
    for q in range(3, 256):
        if not _is_prime(q):
            continue
        if q % 4 == 3:
            out.setdefault(q + 1, ("paley1", q))
        elif 2 * (q + 1) <= 256:
            out.setdefault(2 * (q + 1), ("paley2", q))
    return {m: v for m, v in out.items() if m & (m - 1)}


@lru_cache(maxsize=64)
def small_hadamard(m: int) -> torch.Tensor:
    """The m x m Hadamard matrix for an order in :func:`_small_orders` (or 1)."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    kind, q = _small_orders()[m]
    return _paley1(q) if kind == "paley1" else _paley2(q)


def hadamard_factor(n: int) -> tuple[int, bool]:
    """(m, exact): n = m * 2^k with the smallest m for which H_m is known (exact=True), or, when
    none exists, the odd part m of n for a block-diagonal I_m (x) H_{2^k} (exact=False)."""
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    known = _small_orders()
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        m = n // p
        if m == 1 or m in known:
            return m, True
        p //= 2
    return n // (n & -n), False


def hadamard_parts(n: int) -> tuple[torch.Tensor, int, bool]:
    """(F, p, exact) with the n x n Hadamard = F (x) H_p: F is H_m when known, else sqrt(m) I_m
    (the block-diagonal fallback, scaled so that both satisfy H H^T = n I)."""
    m, exact = hadamard_factor(n)
    f = small_hadamard(m) if exact else torch.eye(m, dtype=torch.float64) * math.sqrt(m)
    return f, n // m, exact


def hadamard_matrix(n: int) -> tuple[torch.Tensor, bool]:
    """(H, exact): an n x n matrix with H H^T = n I; entries +-1 when exact, else block-diagonal."""
    f, p, exact = hadamard_parts(n)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < p:
        sylvester = torch.kron(sylvester, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    return torch.kron(f, sylvester), exact


def random_orthogonal_hadamard(n: int, seed: int = 0) -> tuple[torch.Tensor, bool]:
    """Q = diag(random signs) H / sqrt(n): orthogonal, float64 (QuaRot's randomized Hadamard)."""
    h, exact = hadamard_matrix(n)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).double() * 2 - 1
    return signs[:, None] * h / math.sqrt(n), exact


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform over the last dim (a power of two): x @ H_{2^k}, by
    the O(n log n) butterfly."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, n)


def apply_hadamard(x: torch.Tensor, had_m: torch.Tensor) -> torch.Tensor:
    """x @ (H_m (x) H_p) / sqrt(n) over the last dim, with n = m * p: the 2^k part by :func:`fwht`,
    the small m x m part as a dense product. ``had_m`` is the factor F of :func:`hadamard_parts`."""
    n = x.shape[-1]
    m = had_m.shape[0]
    if n % m:
        raise ValueError(f"hadamard: last dim {n} is not a multiple of the factor size {m}")
    p = n // m
    y = fwht(x.reshape(*x.shape[:-1], m, p))
    if m > 1:
        y = torch.einsum("...kj,ki->...ij", y, had_m.to(y.device, y.dtype))
    return (y / math.sqrt(n)).reshape(x.shape)
