"""Order statistics and Byzantine-robust rules: FedMedian, FedTrimmedAvg, Krum (and Multi-Krum), Bulyan.

Each needs every update of the round at once (a coordinate's median needs all its values; Krum compares every
pair of updates), so each holds a copy of every update: one model per participant, in the model's own dtypes.
``max_held_bytes`` bounds that (default 1 GiB, None for no limit); the update that would pass it is refused
with ``HeldBytesExceeded`` and the round fails rather than aggregate only what fitted. None of them can run
under secure aggregation, which reveals only the sum of the updates.

All four are unweighted, like Flower's: sample counts are ignored, except by Multi-Krum's final mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .aggregators import DEFAULT_MAX_HELD_BYTES, HeldUpdatesAggregator
from .base import Aggregator, State, Strategy

#: elements of one entry converted to float64 at a time while measuring distances (bounds the temporaries)
_DISTANCE_CHUNK = 1 << 18


def median_of_sorted(s: torch.Tensor) -> torch.Tensor:
    """The median along dim 0 of values sorted along dim 0; the mean of the two middle ones for an even count."""
    k, h = s.shape[0], s.shape[0] // 2
    return s[h].clone() if k % 2 else (s[h - 1] + s[h]) / 2


def trimmed_mean_of_sorted(s: torch.Tensor, beta: float) -> torch.Tensor:
    """Drop int(beta·k) values at each end of k values sorted along dim 0, average the rest (Flower's count)."""
    k = s.shape[0]
    cut = int(beta * k)
    return s[cut:k - cut].mean(dim=0)


def pairwise_sq_distances(updates: Sequence[State], names: Sequence[str]) -> torch.Tensor:
    """d[i, j] = ||u_i − u_j||², the squared Euclidean distance over the entries ``names`` flattened together,
    in float64; symmetric (each pair is computed once) with a zero diagonal."""
    n = len(updates)
    upper = torch.zeros(n, n, dtype=torch.float64)
    for name in names:
        flats = [u[name].reshape(-1) for u in updates]
        for start in range(0, flats[0].numel(), _DISTANCE_CHUNK):
            x = torch.stack([f[start:start + _DISTANCE_CHUNK] for f in flats]).to(torch.float64)
            for i in range(n - 1):
                upper[i, i + 1:] += (x[i + 1:] - x[i]).square().sum(dim=1)
    return upper + upper.T


def krum_scores(distances: torch.Tensor, num_malicious: int) -> torch.Tensor:
    """Each update's Krum score: the sum of its squared distances to its n − f − 2 nearest other updates
    (at least one; none when it is alone), summed from the nearest."""
    n = distances.shape[0]
    closest = min(n - 1, max(1, n - num_malicious - 2))
    others = distances + torch.diag(torch.full((n,), float("inf"), dtype=distances.dtype))
    return others.sort(dim=1).values[:, :closest].sum(dim=1)


def krum_select(distances: torch.Tensor, num_malicious: int, keep: int) -> list[int]:
    """Krum: the index of the lowest score (the first one on a tie). Multi-Krum (keep > 0): the ``keep`` lowest,
    ties in index order."""
    scores = krum_scores(distances, num_malicious)
    if keep == 0:
        return [int(torch.argmin(scores))]
    if keep > len(scores):
        raise ValueError(f"Multi-Krum cannot keep {keep} of {len(scores)} updates (num_clients_to_keep too large)")
    return torch.sort(scores, stable=True).indices[:keep].tolist()


def bulyan_select(distances: torch.Tensor, num_malicious: int) -> list[int]:
    """Bulyan's first stage: θ = n − 2f updates, each the Krum choice among those not picked yet."""
    n, f = distances.shape[0], num_malicious
    if n < 4 * f + 3:
        raise ValueError(f"Bulyan needs at least 4f + 3 = {4 * f + 3} updates for num_malicious_clients={f}, got "
                         f"{n} (set the federation's min_workers to at least {4 * f + 3})")
    remaining, picked = list(range(n)), []
    for _ in range(n - 2 * f):
        sub = distances[remaining][:, remaining]
        picked.append(remaining.pop(krum_select(sub, f, 0)[0]))
    return picked


def mean_around_median(stacked: torch.Tensor, count: int) -> torch.Tensor:
    """Per coordinate, the mean of the ``count`` values (along dim 0) closest to their median."""
    median = median_of_sorted(stacked.sort(dim=0).values)
    nearest = (stacked - median).abs().argsort(dim=0, stable=True)[:count]
    return stacked.gather(0, nearest).mean(dim=0)


def _weighted_mean(values: list[torch.Tensor], samples: list[int]) -> torch.Tensor:
    total = sum(samples)
    if total <= 0:
        raise ValueError("the kept updates' sample counts sum to zero")
    acc = torch.zeros_like(values[0])
    for x, n in zip(values, samples):
        acc.add_(x, alpha=n)
    return acc / total


def _check_budget(max_held_bytes: int | None) -> int | None:
    if max_held_bytes is not None and max_held_bytes < 0:
        raise ValueError(f"max_held_bytes must be >= 0 or None, got {max_held_bytes}")
    return max_held_bytes


def _check_malicious(num_malicious_clients: int) -> int:
    if num_malicious_clients < 0:
        raise ValueError(f"num_malicious_clients must be >= 0, got {num_malicious_clients}")
    return int(num_malicious_clients)


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


class Krum(Strategy):
    """Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent"), with Flower's parameters.

    Each update gets a score: the sum of its squared Euclidean distances to its n − f − 2 nearest other updates
    (at least one), f = ``num_malicious_clients``. Krum's result is the update with the lowest score (the first
    one on a tie). Multi-Krum, ``num_clients_to_keep`` = m > 0, averages the m updates with the lowest scores,
    weighted by their sample counts: the paper averages them plainly, Flower weighs them, and fedzmq follows
    Flower. The paper's guarantee needs n ≥ 2f + 3; like Flower, Krum runs with fewer and does not refuse.

    Distances are over the float entries; a non-float entry is the maximum over the kept updates. Memory: every
    update of the round and an n × n distance matrix (see robust.py's docstring for ``max_held_bytes``)."""

    name = "krum"

    def __init__(self, *, num_malicious_clients: int = 0, num_clients_to_keep: int = 0,
                 max_held_bytes: int | None = DEFAULT_MAX_HELD_BYTES) -> None:
        if num_clients_to_keep < 0:
            raise ValueError(f"num_clients_to_keep must be >= 0, got {num_clients_to_keep}")
        self.num_malicious_clients = _check_malicious(num_malicious_clients)
        self.num_clients_to_keep = int(num_clients_to_keep)
        self.max_held_bytes = _check_budget(max_held_bytes)

    def _select(self, updates: Sequence[State], names: Sequence[str]) -> list[int]:
        distances = pairwise_sq_distances(updates, names)
        return krum_select(distances, self.num_malicious_clients, self.num_clients_to_keep)

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        reduce = _weighted_mean if self.num_clients_to_keep else (lambda values, _: values[0].clone())
        return HeldUpdatesAggregator(global_state, reduce, select=self._select,
                                     max_held_bytes=self.max_held_bytes, rule=type(self).__name__)


class Bulyan(Strategy):
    """Bulyan (El Mhamdi, Guerraoui and Rouault 2018, "The Hidden Vulnerability of Distributed Learning in
    Byzantium"), with Krum as its first rule, as in Flower's ``Bulyan``. Unweighted.

    With n updates and f = ``num_malicious_clients`` (n ≥ 4f + 3, else ``ValueError``): pick θ = n − 2f updates,
    each the Krum choice among the updates not picked yet; then, per coordinate, average the β = θ − 2f picked
    values closest to the picked values' median. A non-float entry is the maximum over the picked updates.
    Memory: every update of the round and an n × n distance matrix (see robust.py's docstring)."""

    name = "bulyan"

    def __init__(self, *, num_malicious_clients: int = 0,
                 max_held_bytes: int | None = DEFAULT_MAX_HELD_BYTES) -> None:
        self.num_malicious_clients = _check_malicious(num_malicious_clients)
        self.max_held_bytes = _check_budget(max_held_bytes)

    @property
    def min_updates(self) -> int:
        return 4 * self.num_malicious_clients + 3

    def _select(self, updates: Sequence[State], names: Sequence[str]) -> list[int]:
        return bulyan_select(pairwise_sq_distances(updates, names), self.num_malicious_clients)

    def _reduce(self, values: list[torch.Tensor], samples: list[int]) -> torch.Tensor:
        return mean_around_median(torch.stack(values), len(values) - 2 * self.num_malicious_clients)

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        return HeldUpdatesAggregator(global_state, self._reduce, select=self._select,
                                     max_held_bytes=self.max_held_bytes, rule=type(self).__name__)
