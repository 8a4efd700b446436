"""SecAgg+ (Bell et al., CCS 2020): who shares keys, Shamir shares and pairwise masks with whom.

Bonawitz et al. (2017) pair every client with all ``n - 1`` others, so each client does O(n) work and
receives O(n) keys and shares, and the server O(n^2). SecAgg+ replaces the complete graph by a sparse
random graph of degree ``k = O(log n)``: a client shares its secrets with, and masks against, only its
``k`` neighbours; a dropped client's masks are removed with its neighbours' shares. Work and bytes per
client become O(k), the server's O(n k).

The graph (as in the paper's implementation and Flower's ``secaggplus``): a Harary graph ``H_{k,n}`` --
the ring on which each node is joined to the ``k/2`` nearest on either side -- laid over a random
permutation of the clients. The permutation is the order of ``SHA-256(tag || seed || id)``, so every
client computes the same neighbours from the ``graph_seed`` the server draws per round and sends in the
``SecAggConfig``; it is bound into the configuration's digest like every other parameter.

Parameters (``choose_parameters``). The paper asks three things of the graph of a round
("good" graphs), given at most a fraction ``gamma`` of corrupted clients and ``delta`` of drop-outs:

1. *connectivity*: the graph minus the corrupted and the dropped clients stays connected, otherwise the
   server learns the sum of each component on its own (security, failure probability ``2**-sigma``);
2. *enough survivors*: every dropped client keeps at least ``t`` neighbours that answer, so its masks
   can be removed (correctness, failure probability ``2**-eta``);
3. *too few corrupted neighbours*: nobody has ``2t - k - 1`` or more corrupted neighbours, so the server
   and the corrupted cannot gather ``t`` shares of both a client's self-mask seed and its mask key
   (security, ``2**-sigma``). The ``- 1`` counts the client's own share, which it holds and reveals as
   one of the ``t`` when it survives.

For the Harary graph over a uniformly random permutation, with clients corrupted and dropped
independently of the permutation (the semi-honest server draws ``graph_seed`` with ``os.urandom``),
we bound each failure by a union bound over the ``n`` clients, with each neighbour corrupted
(dropped) independently with probability ``gamma`` (``delta``):

1. the ring minus a set ``S`` is connected whenever no ``k/2`` consecutive positions are all in ``S``
   (consecutive remaining nodes are then within ``k/2`` and hence joined): ``n (gamma + delta)**(k/2)``;
2. ``n P[Bin(k, delta) > k - t] <= 2**-eta``;
3. ``n P[Bin(k, gamma) >= 2t - k - 1] <= 2**-sigma``.

``choose_parameters`` returns the smallest even ``k`` for which some ``t`` meets all three, and the
smallest such ``t`` (the most drop-out tolerant one is ``k - q`` in 2; we keep the smallest secure one
so that the margin goes to drop-outs). With the defaults (``gamma = delta = 0.05``, ``sigma = 40``,
``eta = 30``): n = 100 -> k = 66, t = 46; n = 1,000 -> k = 72, t = 50; n = 10^5 -> k = 80, t = 55:
``k`` grows as ``log n``. Where no ``k < n - 1`` works (small ``n``), the complete graph is returned
(``degree`` None, the Bonawitz protocol) with the strict-majority threshold.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

GRAPH_TAG = b"fedzmq-secagg+/graph/1"


def ring_order(client_ids: Sequence[int], seed: bytes) -> list[int]:
    """The clients in the order of the round's random permutation: sorted by ``SHA-256(tag || seed || id)``.

    A hash, not a seeded PRNG: its output is fixed by the standard, so clients on other Python or
    numpy versions compute the same permutation."""
    prefix = hashlib.sha256(GRAPH_TAG)
    prefix.update(len(seed).to_bytes(4, "big") + seed)

    def key(i: int) -> bytes:
        h = prefix.copy()
        h.update(i.to_bytes(4, "big"))
        return h.digest()

    return sorted(client_ids, key=key)


def is_complete(n: int, degree: int | None) -> bool:
    """``degree`` None, or at least ``n - 1``: everybody is everybody's neighbour (Bonawitz et al.)."""
    return degree is None or degree >= n - 1


def check_degree(n: int, degree: int | None) -> None:
    """A Harary ring lattice is k-regular for even ``k``; ``k >= n - 1`` means the complete graph."""
    if degree is None:
        return
    if type(degree) is not int or degree < 2:
        raise ValueError(f"degree must be None or an integer >= 2, got {degree!r}")
    if degree < n - 1 and degree % 2:
        raise ValueError(f"degree must be even (below n - 1 = {n - 1}), got {degree}")


class NeighbourGraph:
    """The round's graph: ``neighbours(i)`` in O(k) after one O(n log n) permutation."""

    def __init__(self, client_ids: Sequence[int], degree: int | None, seed: bytes) -> None:
        check_degree(len(client_ids), degree)
        self.n = len(client_ids)
        self.complete = is_complete(self.n, degree)
        self.degree = self.n - 1 if self.complete else int(degree or 0)
        self._ids = tuple(sorted(client_ids))
        self._order: list[int] = [] if self.complete else ring_order(self._ids, seed)
        self._position = {i: p for p, i in enumerate(self._order)}

    def neighbours(self, i: int) -> tuple[int, ...]:
        """``i``'s neighbours, sorted, ``i`` excluded."""
        if self.complete:
            if i not in self._ids:
                raise KeyError(i)
            return tuple(j for j in self._ids if j != i)
        p, half, order = self._position[i], self.degree // 2, self._order
        return tuple(sorted(order[(p + d) % self.n] for d in range(-half, half + 1) if d))

    def neighbourhood(self, i: int) -> frozenset[int]:
        """``i`` and its neighbours: the points of ``i``'s Shamir shares. Worked out anew each time (a
        client asks for about 2k of them a round; keeping them would hold O(k^2) ids per client), without
        the sort ``neighbours`` needs."""
        if self.complete:
            if i not in self._ids:
                raise KeyError(i)
            return frozenset(self._ids)
        p, half, order, n = self._position[i], self.degree // 2, self._order, self.n
        return frozenset(order[(p + d) % n] for d in range(-half, half + 1))


# --------------------------------------------------------------------------------------------------
# parameters


def binomial_tail(k: int, p: float, m: int) -> float:
    """``P[Bin(k, p) >= m]``, exactly (k is at most a few hundred here)."""
    if m <= 0:
        return 1.0
    if m > k:
        return 0.0
    return math.fsum(math.comb(k, j) * p**j * (1 - p) ** (k - j) for j in range(m, k + 1))


@dataclass(frozen=True)
class GraphParameters:
    """A round's graph degree (None: complete graph) and Shamir threshold, and the assumptions behind them."""

    degree: int | None
    threshold: int
    dropout: float
    corrupt: float
    sigma: float
    eta: float
    meets_bounds: bool  # False: no degree below n - 1 met the bounds, or ``degree`` was fixed and cannot


def threshold_for_degree(n: int, degree: int, *, dropout: float = 0.05, corrupt: float = 0.05,
                         sigma: float = 40, eta: float = 30) -> int | None:
    """The smallest ``t`` meeting conditions 2 and 3 of the module docstring for degree ``degree``
    (condition 1 does not depend on ``t``), or None if none does."""
    k = degree
    # condition 2: t <= k - q, where q is the fewest dropped neighbours exceeded with prob <= 2**-eta / n
    q = next(m for m in range(k + 1) if n * binomial_tail(k, dropout, m + 1) <= 2.0**-eta)
    # condition 3: 2t - k - 1 >= c, where c corrupted neighbours occur with prob <= 2**-sigma / n
    c = next(m for m in range(k + 2) if n * binomial_tail(k, corrupt, m) <= 2.0**-sigma)
    t = max(2, math.ceil((c + k + 1) / 2))
    return t if t <= k - q else None


def connected_bound(n: int, degree: int, dropout: float, corrupt: float) -> float:
    """Condition 1's failure bound: ``n (gamma + delta)**(k/2)``."""
    return n * min(1.0, dropout + corrupt) ** (degree // 2)


def choose_parameters(n: int, *, dropout: float = 0.05, corrupt: float = 0.05, sigma: float = 40,
                      eta: float = 30, degree: int | None = None) -> GraphParameters:
    """Degree ``k`` and threshold ``t`` for ``n`` clients, per the module docstring: the smallest even
    ``k`` (O(log n)) meeting the three conditions at drop-out fraction ``dropout`` (delta), corrupted
    fraction ``corrupt`` (gamma), security ``2**-sigma`` and correctness ``2**-eta``.

    Where none exists below ``n - 1``: the complete graph and ``default_threshold(n)``, a strict majority.
    With ``degree`` given, only ``t`` is chosen; if no ``t`` meets the bounds at that degree, the
    neighbourhood's strict majority ``(k + 1) // 2 + 1`` (``meets_bounds`` False)."""
    if n < 2:
        raise ValueError("secure aggregation needs at least 2 clients")
    if not (0 <= dropout < 1 and 0 <= corrupt < 1 and dropout + corrupt < 1):
        raise ValueError("dropout and corrupt must be fractions in [0, 1) with a sum below 1")
    args = dict(dropout=dropout, corrupt=corrupt, sigma=sigma, eta=eta)
    if degree is not None:
        check_degree(n, degree)
        if is_complete(n, degree):
            return GraphParameters(None, max(2, n // 2 + 1), meets_bounds=False, **args)
        t = threshold_for_degree(n, degree, dropout=dropout, corrupt=corrupt, sigma=sigma, eta=eta)
        ok = t is not None and connected_bound(n, degree, dropout, corrupt) <= 2.0**-sigma
        return GraphParameters(degree, t if t is not None else (degree + 1) // 2 + 1, meets_bounds=ok, **args)
    for k in range(2, n - 1, 2):
        if connected_bound(n, k, dropout, corrupt) > 2.0**-sigma:
            continue
        t = threshold_for_degree(n, k, dropout=dropout, corrupt=corrupt, sigma=sigma, eta=eta)
        if t is not None:
            return GraphParameters(k, t, meets_bounds=True, **args)
    return GraphParameters(None, max(2, n // 2 + 1), meets_bounds=False, **args)


__all__ = [
    "GraphParameters", "NeighbourGraph", "binomial_tail", "check_degree", "choose_parameters", "connected_bound",
    "is_complete", "ring_order", "threshold_for_degree",
]
