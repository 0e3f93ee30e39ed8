"""The stats store: per-node activation statistics that every pass after calibration reads.

Statistics, never whole activations, are kept, so memory is bounded by the number of observed
nodes times their channel count, plus fixed-size samples per node: magnitudes for percentiles and
``ROWS`` whole rows (tokens) for the passes that measure a layer's output error on real inputs
(smoothing's scale search), and, when a weight algorithm needs it (GPTQ, clip search), the
uncentered second moment ``X^T X`` ``[K, K]`` of each observed input (its Hessian up to a factor).
Channels are the last dimension (the K of the linear that consumes the tensor).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

RESERVOIR = 1 << 16  # magnitudes kept per node for percentiles
PER_BATCH_SAMPLE = 1 << 13
ROWS = 256  # token rows kept per node


def gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``x^T x`` of rows ``x`` ``[rows, K]``: only the blocks on and above the diagonal are
    multiplied (``blocks`` column blocks: 5/8 of the dense product's work at 4), the rest mirrored."""
    k = x.shape[-1]
    if k < 256:
        return x.T @ x
    edges = [round(i * k / blocks) for i in range(blocks + 1)]
    out = torch.empty(k, k, dtype=x.dtype)
    for i in range(blocks):
        a, b = edges[i], edges[i + 1]
        out[a:b, a:] = x[:, a:b].T @ x[:, a:]
        out[b:, a:b] = out[a:b, b:].T
    return out


@dataclass
class ChannelStats:
    count: int  # rows (tokens) seen
    min: torch.Tensor  # [K]
    max: torch.Tensor  # [K]
    sumsq: torch.Tensor  # [K], float64
    sample: torch.Tensor  # up to RESERVOIR |x| values, uniformly sampled across rows
    rows: torch.Tensor  # [<= ROWS, K] rows sampled uniformly across batches
    xtx: torch.Tensor | None = None  # [K, K] sum of x x^T over all rows (float32), when kept

    @property
    def hessian(self) -> torch.Tensor:
        """E[x x^T] ``[K, K]`` (GPTQ's H = 2 X^T X / n up to the factor 2)."""
        if self.xtx is None:
            raise KeyError("no X^T X was collected for this node (the recipe's weight algorithm did not ask for it)")
        return self.xtx / max(self.count, 1)
    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.max.abs(), self.min.abs())

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x_j^2] per channel."""
        return (self.sumsq / max(self.count, 1)).float()

    def percentile(self, q: float) -> float:
        """Percentile (0-100) of |x| over the whole tensor, from the bounded sample."""
        return float(torch.quantile(self.sample.float(), q / 100.0))


@dataclass
class StatsStore:
    """Statistics keyed by node name."""

    nodes: dict[str, ChannelStats] = field(default_factory=dict)
    seed: int = 0
    rows: int = ROWS  # token rows kept per node (0 when no pass needs them)
    hessian: bool = False  # accumulate X^T X per node (GPTQ, clip search)
    grouped: set = field(default_factory=set)  # inputs of grouped (MoE) ops: top-k rows per token

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    def __contains__(self, key: str) -> bool:
        return key in self.nodes

    def __getitem__(self, key: str) -> ChannelStats:
        return self.nodes[key]

    @property
    def tokens(self) -> int:
        """Rows (tokens) the calibration ran through the model: the most any observed input of
        a dense op saw (a grouped op's input holds top-k rows per token, an expert's a subset)."""
        return max((st.count for k, st in self.nodes.items() if k not in self.grouped and not k.endswith("]")),
                   default=0)

    def hessian_of(self, key: str) -> torch.Tensor | None:
        """E[x x^T] of node ``key``, or None when no X^T X was collected for it."""
        st = self.nodes.get(key)
        return None if st is None or st.xtx is None else st.hessian

    def update(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        mags = x.abs().flatten()
        take = torch.randint(0, mags.numel(), (min(PER_BATCH_SAMPLE, mags.numel()),), generator=self._gen)
        rows = x[torch.randperm(x.shape[0], generator=self._gen)[:self.rows]].clone()
        xtx = gram(x) if self.hessian else None
        new = ChannelStats(x.shape[0], x.amin(0), x.amax(0), x.double().pow(2).sum(0), mags[take], rows, xtx)
        old = self.nodes.get(key)
        if old is None:
            self.nodes[key] = new
            return
        if old.min.shape != new.min.shape:
            raise ValueError(f"node {key}: channel count changed between batches ({old.min.shape[0]} vs {new.min.shape[0]})")
        sample = torch.cat([old.sample, new.sample])
        if sample.numel() > RESERVOIR:
            sample = sample[torch.randperm(sample.numel(), generator=self._gen)[:RESERVOIR]]
        rows = torch.cat([old.rows, new.rows])
        if rows.shape[0] > self.rows:  # keep rows in proportion to the tokens each side has seen
            n_old = min(old.rows.shape[0], max(1, round(self.rows * old.count / (old.count + new.count))))
            pick_old = torch.randperm(old.rows.shape[0], generator=self._gen)[:n_old]
            pick_new = torch.randperm(new.rows.shape[0], generator=self._gen)[:self.rows - n_old]
            rows = torch.cat([old.rows[pick_old], new.rows[pick_new]])
        self.nodes[key] = ChannelStats(old.count + new.count, torch.minimum(old.min, new.min),
                                       torch.maximum(old.max, new.max), old.sumsq + new.sumsq, sample, rows,
                                       None if new.xtx is None else old.xtx + new.xtx)
