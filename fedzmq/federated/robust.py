"""Order statistics: FedMedian and FedTrimmedAvg.

Each needs every update of the round at once (a coordinate's median needs all its values), so each holds a
copy of every update: one model per participant, in the model's own dtypes. ``max_held_bytes`` bounds that
(default 1 GiB, None for no limit); the update that would pass it is refused with ``HeldBytesExceeded`` and
the round fails rather than aggregate only what fitted. Both are unweighted: sample counts are ignored.
"""

from __future__ import annotations

import torch

from .aggregators import DEFAULT_MAX_HELD_BYTES, HeldUpdatesAggregator
from .base import Aggregator, State, Strategy


def median_of_sorted(s: torch.Tensor) -> torch.Tensor:
    """The median along dim 0 of values sorted along dim 0; the mean of the two middle ones for an even count."""
    k, h = s.shape[0], s.shape[0] // 2
    return s[h].clone() if k % 2 else (s[h - 1] + s[h]) / 2


def trimmed_mean_of_sorted(s: torch.Tensor, beta: float) -> torch.Tensor:
    """Drop int(beta·k) values at each end of k values sorted along dim 0, average the rest (Flower's count)."""
    k = s.shape[0]
    cut = int(beta * k)
    return s[cut:k - cut].mean(dim=0)


def _check_budget(max_held_bytes: int | None) -> int | None:
    if max_held_bytes is not None and max_held_bytes < 0:
        raise ValueError(f"max_held_bytes must be >= 0 or None, got {max_held_bytes}")
    return max_held_bytes


class FedMedian(Strategy):
    """Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates"), unweighted. For an even count it is the mean of the two middle values (like
    ``numpy.median`` and Flower, unlike ``torch.median``, which returns the lower one)."""

    name = "fedmedian"

    def __init__(self, *, max_held_bytes: int | None = DEFAULT_MAX_HELD_BYTES) -> None:
        self.max_held_bytes = _check_budget(max_held_bytes)

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        return HeldUpdatesAggregator(global_state, lambda values, _: median_of_sorted(torch.stack(values).sort(0)[0]),
                                     max_held_bytes=self.max_held_bytes, rule=type(self).__name__)


class FedTrimmedAvg(Strategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018), unweighted: sort each coordinate over the k updates,
    drop b = int(beta·k) values at each end (Flower's count: k = 100, beta = 0.29 drops 28, as the float
    0.29·100 is just under 29), average the k − 2b left. beta in [0, 0.5), so at least one value is left."""

    name = "trimmedmean"

    def __init__(self, beta: float = 0.1, *, max_held_bytes: int | None = DEFAULT_MAX_HELD_BYTES) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        self.beta = beta
        self.max_held_bytes = _check_budget(max_held_bytes)

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        return HeldUpdatesAggregator(
            global_state, lambda values, _: trimmed_mean_of_sorted(torch.stack(values).sort(0)[0], self.beta),
            max_held_bytes=self.max_held_bytes, rule=type(self).__name__)
