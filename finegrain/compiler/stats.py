"""The stats store: per-node activation statistics that every pass after calibration reads.

Statistics, never activations, are kept, so memory is bounded by the number of observed nodes
times their channel count (plus a fixed-size sample of magnitudes per node for percentiles).
Channels are the last dimension (the K of the linear that consumes the tensor).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

RESERVOIR = 1 << 16  # magnitudes kept per node for percentiles
PER_BATCH_SAMPLE = 1 << 13


@dataclass
class ChannelStats:
    count: int  # rows (tokens) seen
    min: torch.Tensor  # [K]
    max: torch.Tensor  # [K]
    sumsq: torch.Tensor  # [K], float64
    sample: torch.Tensor  # up to RESERVOIR |x| values, uniformly sampled across rows

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

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    def __contains__(self, key: str) -> bool:
        return key in self.nodes

    def __getitem__(self, key: str) -> ChannelStats:
        return self.nodes[key]

    def update(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        mags = x.abs().flatten()
        take = torch.randint(0, mags.numel(), (min(PER_BATCH_SAMPLE, mags.numel()),), generator=self._gen)
        new = ChannelStats(x.shape[0], x.amin(0), x.amax(0), x.double().pow(2).sum(0), mags[take])
        old = self.nodes.get(key)
        if old is None:
            self.nodes[key] = new
            return
        if old.min.shape != new.min.shape:
            raise ValueError(f"node {key}: channel count changed between batches ({old.min.shape[0]} vs {new.min.shape[0]})")
        sample = torch.cat([old.sample, new.sample])
        if sample.numel() > RESERVOIR:
            sample = sample[torch.randperm(sample.numel(), generator=self._gen)[:RESERVOIR]]
        self.nodes[key] = ChannelStats(old.count + new.count, torch.minimum(old.min, new.min),
                                       torch.maximum(old.max, new.max), old.sumsq + new.sumsq, sample)
