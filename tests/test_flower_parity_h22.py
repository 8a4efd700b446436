"""fedzmq against Flower 1.42 where scripts/flower_parity.py does not look: client sampling, Multi-Krum asked to
keep more updates than it has, ties in Krum and Bulyan, and what docs/strategies.md says about each.

These tests do not import flwr: Flower's numbers are embedded, each with the Flower call that made it (flwr
1.42.0, numpy 2.4.6, in a separate venv; /tmp/h22/gen/flower_values.py of the session that wrote them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fedzmq as fz
from fedzmq.federated.aggregators import content_digest

pytestmark = pytest.mark.timeout(60)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "strategies.md"

#: (live clients n, fraction f, minimum m, clients sampled) from
#: ``flwr.server.strategy.FedAvg(fraction_fit=f, min_fit_clients=m).num_fit_clients(n)[0]``, which is
#: ``max(int(n * f), m)``: Flower rounds n·f down (0.29 · 100 is 28.999999999999996: 28 clients)
FLOWER_SAMPLED = [
    (3, 0.5, 1, 1), (3, 0.7, 1, 2), (3, 0.99, 1, 2), (3, 0.1, 2, 2),
    (5, 0.29, 1, 1), (5, 0.5, 1, 2), (5, 0.7, 1, 3), (5, 0.99, 1, 4), (5, 0.5, 2, 2),
    (7, 0.25, 1, 1), (7, 0.29, 1, 2), (7, 0.5, 1, 3), (7, 0.7, 1, 4), (7, 0.99, 1, 6), (7, 0.1, 2, 2),
    (10, 0.25, 1, 2), (10, 0.29, 1, 2), (10, 0.3, 1, 3), (10, 0.5, 1, 5), (10, 0.7, 1, 7), (10, 0.99, 1, 9),
    (100, 0.29, 1, 28), (100, 0.3, 1, 30), (100, 0.99, 1, 99),
]


@pytest.mark.parametrize("live, fraction, minimum, flower", FLOWER_SAMPLED,
                         ids=[f"{n}x{f}-min{m}" for n, f, m, _ in FLOWER_SAMPLED])
async def test_fixed_sampling_takes_as_many_workers_as_flowers_fraction_fit(live: int, fraction: float,
                                                                          minimum: int, flower: int) -> None:
    """Users moving from Flower set ``fraction`` as they set ``fraction_fit``; docs/strategies.md promised the
    same count. fedzmq took ceil(n·f): 3 of 5 workers at fraction 0.5 where Flower takes 2, all 10 at 0.99
    where Flower takes 9."""
    workers = [fz.VirtualWorker(f"w{i}") for i in range(live)]
    try:
        federation = fz.Federation(workers, torch.nn.Linear(2, 2), fz.FitConfig(dataset="d"), fz.FedAvg(),
                                   fraction=fraction, min_workers=minimum)
        selected, unreachable = await federation.select(1)
        assert (len(selected), len(unreachable)) == (flower, 0)
    finally:
        for worker in workers:
            await worker.close()


async def test_a_strategy_that_needs_more_updates_is_refused_with_flowers_count() -> None:
    """The check made when a federation is made counts as ``select`` does: Bulyan(f=1) needs 7 updates, and
    fraction 0.69 of 10 workers is 6 of them in Flower's count (ceil gave 7 and let it through)."""
    workers = [fz.VirtualWorker(f"w{i}") for i in range(10)]
    fit = fz.FitConfig(dataset="d")
    try:
        with pytest.raises(ValueError, match="this federation takes 6 of its 10 workers"):
            fz.Federation(workers, torch.nn.Linear(2, 2), fit, fz.Bulyan(num_malicious_clients=1), fraction=0.69)
        assert fz.Federation(workers, torch.nn.Linear(2, 2), fit, fz.Bulyan(num_malicious_clients=1),
                             fraction=0.7).round == 0
    finally:
        for worker in workers:
            await worker.close()


#: three updates, weights 10, 20, 30 (``aggregate_krum(results, 0, keep)`` in flwr.server.strategy.aggregate)
THREE = [({"w": torch.tensor([0.0, 0.0])}, 10), ({"w": torch.tensor([1.0, 0.0])}, 20),
         ({"w": torch.tensor([0.0, 3.0])}, 30)]
#: Flower's Multi-Krum result for num_clients_to_keep = 3..6 of those three updates: keep = n is the weighted
#: mean of all three; keep = n + 1 is the best update alone, n + 2 the best two (``argsort(...)[::-1][n - keep:]``
#: slices from a negative start)
FLOWER_MULTI_KRUM = {3: [1 / 3, 1.5], 4: [0.0, 0.0], 5: [2 / 3, 0.0], 6: [1 / 3, 1.5]}


def test_multi_krum_keeping_more_updates_than_it_has_is_refused_where_flower_keeps_fewer() -> None:
    """Flower's Multi-Krum, asked to keep more updates than arrived (a round where some clients failed), returns
    the mean of some other number of them (keep = n + 1 gives the single best). fedzmq refuses the round; the
    documentation says so."""
    zero = {"w": torch.zeros(2)}
    agreed = fz.Krum(num_clients_to_keep=3).aggregate(1, zero, THREE)["w"]
    assert torch.allclose(agreed, torch.tensor(FLOWER_MULTI_KRUM[3]))
    for keep in (4, 5, 6):
        with pytest.raises(ValueError, match=f"cannot keep {keep} of 3 updates"):
            fz.Krum(num_clients_to_keep=keep).aggregate(1, zero, THREE)
    text = " ".join(DOCS.read_text().split())
    assert "more updates than the round has" in text


#: seven one-coordinate float32 updates near one another, the sixth far away: Bulyan(f=1) picks θ = 5, the last
#: from 3 left, where n − f − 2 = 0 nearest make two mutual nearest neighbours tie exactly
SEVEN = [0.4735400080680847, -0.35186800360679626, -0.6327109932899475, -0.3116370141506195, 0.020663000643253326,
         5.360000133514404, -0.10939600318670273]
#: ``Bulyan(num_malicious_clients=1, to_keep=0).aggregate_fit(1, results, [])``, each result's num_examples 1,
#: with the results in SEVEN's order (as if they arrived so), and in fedzmq's content order
FLOWER_BULYAN_ARRIVAL, FLOWER_BULYAN_CONTENT = -0.4320720136165619, -0.25763365626335144


def _in_content_order(updates: list[tuple[dict[str, torch.Tensor], int]]) -> list[tuple[dict[str, torch.Tensor], int]]:
    return sorted(updates, key=lambda u: (content_digest(u[0]), u[1]))


def test_bulyan_and_krum_break_ties_in_content_order_where_flower_breaks_them_in_arrival_order() -> None:
    """Bulyan with f <= 2 always ends on such a tie (its last pick is among 2f + 1 updates, scored by one
    neighbour each), so Flower's Bulyan depends on the order the results came in; fedzmq's does not.
    Fed in fedzmq's content order, Flower gives fedzmq's model exactly:
    ``Bulyan(num_malicious_clients=1, to_keep=0).aggregate_fit(1, results, [])`` with the results in that
    order gives fedzmq's model; in the listed (arrival) order, another."""
    updates = [({"w": torch.tensor([v])}, 1) for v in SEVEN]
    zero = {"w": torch.zeros(1)}
    ours = fz.Bulyan(num_malicious_clients=1).aggregate(1, zero, updates)["w"].item()
    assert ours == FLOWER_BULYAN_CONTENT != FLOWER_BULYAN_ARRIVAL
    assert fz.Bulyan(num_malicious_clients=1).aggregate(1, zero, updates[::-1])["w"].item() == ours
    assert [u[0]["w"].item() for u in _in_content_order(updates)] != SEVEN  # the two orders differ
    text = " ".join(DOCS.read_text().split())
    assert "Bulyan with f ≤ 2 meets such a tie" in text
