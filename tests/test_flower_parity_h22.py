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
from fedzmq.secagg.dp import AdaptiveClipping
from fedzmq.worker import training
from fedzmq.worker.datasets import Dataset

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
    """Bulyan with f = 1 or 2 always ends on such a tie (its last pick is among 2f + 1 updates, scored by one
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
    assert "Bulyan with f = 1 or 2 meets such a tie" in text


def test_fedprox_adds_the_squared_distance_that_flower_states() -> None:
    """Flower's FedProx only sends ``proximal_mu``; its docstring states the term (mu/2)·||w − w_global||², while
    its example code sums unsquared per-tensor norms. fedzmq's worker adds the stated term: two full-batch SGD
    steps on y = w·x (MSE) give w2 = w1 − lr·(∇L(w1) + mu·(w1 − w0)), computed here by hand in float64."""
    x = torch.linspace(-1, 1, 16).unsqueeze(1)
    y = 3 * x
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
    lr, mu = 0.1, 2.0
    training.fit(model, Dataset("d", x, y), training.Terms(min_batch=4, shuffle_key=b"k"), loss="mse_loss",
                 optimizer={"cls": "SGD", "lr": lr}, batch_size=16, epochs=None, steps=2, prox_mu=mu, seed=0)
    xs, ys = x.double().squeeze(1), y.double().squeeze(1)

    def grad(w: float) -> float:
        return float((2 * (w * xs - ys) * xs).mean())

    w0 = 0.5
    w1 = w0 - lr * grad(w0)
    w2 = w1 - lr * (grad(w1) + mu * (w1 - w0))
    unsquared = w1 - lr * (grad(w1) + mu / 2 * (1.0 if w1 > w0 else -1.0))  # Flower's example code's term
    assert model.weight.item() == pytest.approx(w2, abs=1e-6)
    assert abs(w2 - unsquared) > 1e-2


#: ``DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), noise_multiplier=0.0, num_sampled_clients=4,
#: initial_clipping_norm=0.1, target_clipped_quantile=0.5, clip_norm_lr=0.2, clipped_count_stddev=0.0)``,
#: ``aggregate_fit`` of four updates of norm 10 (all clipped): Flower's clip norm afterwards. Flower counts the
#: clipped updates where Andrew et al. (2021) count those at most C, so its C shrinks when every update is clipped
FLOWER_CLIP_AFTER_ALL_CLIPPED = 0.09048374180359596


def test_adaptive_clipping_grows_the_clip_when_every_update_is_clipped_where_flower_shrinks_it() -> None:
    """fedzmq's AdaptiveClipping is Andrew et al.'s geometric rule on the fraction of updates at most C: none at
    most C moves C from 0.1 up to 0.1·e^0.1. Flower 1.42's adaptive clipping wrappers move it down to 0.1·e^-0.1.
    The documentation says so."""
    clipping = AdaptiveClipping(clip=0.1, target_quantile=0.5, learning_rate=0.2)
    assert clipping.update(0.0) == pytest.approx(0.1 * 1.1051709180756477)
    assert FLOWER_CLIP_AFTER_ALL_CLIPPED == pytest.approx(0.1 / 1.1051709180756477)
    text = " ".join(DOCS.read_text().split())
    assert "Flower's adaptive clipping counts the clipped updates" in text


def test_the_round_loop_beside_flowers_is_documented() -> None:
    """What a round does around the strategy differs from Flower's server loop (flwr/server/server.py,
    client_manager.py): the defaults of min_workers and Flower's min_fit_clients / min_available_clients, a
    round with too few updates (Flower: the model stays and the run goes on; fedzmq: RoundFailed), and who
    evaluates (Flower: a fraction_evaluate sample of every available client; fedzmq: the round's participants)."""
    text = " ".join(DOCS.read_text().split())
    for statement in ("`min_fit_clients=2`", "`accept_failures`", "`fraction_evaluate`", "`RoundFailed`",
                      "`fit_metrics_aggregation_fn`"):
        assert statement in text, statement


def test_fedavgm_whose_first_aggregated_round_is_not_round_one_starts_its_momentum_there() -> None:
    """Flower's FedAvgM sets its momentum only in round 1: when round 1 aggregated nothing (every client failed),
    ``FedAvgM(initial_parameters=..., server_momentum=0.9).aggregate_fit(2, results, [])`` raises
    ``AssertionError: Momentum should have been created on round 1.``. fedzmq's momentum starts at zero in the
    first round it aggregates, whatever its number: round 2 then gives round 1's model, x − η·(x − x̄)."""
    momentum = fz.FedAvgM(server_learning_rate=0.7, server_momentum=0.9)
    x = {"w": torch.zeros(2)}
    second = momentum.aggregate(2, x, [({"w": torch.ones(2)}, 1)])
    assert torch.allclose(second["w"], torch.full((2,), 0.7))
    text = " ".join(DOCS.read_text().split())
    assert "Momentum should have been created on round 1" in text


#: Flower 1.42's SecAgg+ encoding of one value (``quantize([np.array([v])], 8.0, 4194304)`` then ``dequantize``,
#: the defaults of ``SecAggPlusWorkflow``: clipping_range=8.0, quantization_range=2^22): values beyond ±8 come
#: back as ±8, and the step is 16 / 2^22 = 3.8e-6
FLOWER_SECAGGPLUS_ROUND_TRIP = {10.0: 8.0, -9.5: -8.0}


def test_secure_aggregation_beside_flowers_secaggplus_is_documented() -> None:
    """Flower's SecAgg+ quantizes each client's parameters (times num_examples / max_weight, max_weight=1000),
    clipped to ±8 per value; fedzmq's SecAgg without DP sums updates in a 64-bit ring with exact sample weights.
    A parameter of 10 comes out of Flower's secure mean as 8; the documentation says so."""
    assert FLOWER_SECAGGPLUS_ROUND_TRIP[10.0] != 10.0
    text = " ".join(DOCS.read_text().split())
    assert "`SecAggPlusWorkflow`" in text and "`max_weight=1000`" in text


#: eleven one-value updates; Bulyan(f=2) picks 5, -4, 3, -1, 1, -0.5 and 200 on both sides (in content order),
#: whose median is 1; the β = 3 values nearest it are 1, -0.5 and one of -1 and 3 (both 2 away)
ELEVEN = [-4.0, -1.0, -0.5, 0.0, 1.0, 3.0, 5.0, 100.0, -100.0, 200.0, -200.0]
#: ``Bulyan(num_malicious_clients=2, to_keep=0).aggregate_fit(1, results, [])``, num_examples 1 each, the results
#: in fedzmq's content order: NumPy's default argsort (numpy 2.4.6, x86-64) put -1 before 3
FLOWER_BULYAN_COORDINATE_TIE = -0.1666666716337204


def test_bulyan_breaks_a_tie_at_its_beta_nearest_value_in_pick_order_where_flowers_numpy_sort_may_not() -> None:
    """Per coordinate, Bulyan averages the β picked values nearest their median; two values equally far at the
    β-th place are a tie. fedzmq sorts stably (the earlier pick wins: 3, giving 7/6); Flower uses NumPy's
    default argsort, which is not stable (it kept -1: -1/6). Over 25 rounds of 7 to 11 honest float32 updates of
    200,000 values, 10 coordinates differed, by up to 7.6e-3. The documentation says so."""
    updates = [({"w": torch.tensor([v])}, 1) for v in ELEVEN]
    ours = fz.Bulyan(num_malicious_clients=2).aggregate(1, {"w": torch.zeros(1)}, updates)["w"].item()
    assert ours == pytest.approx(7 / 6) and FLOWER_BULYAN_COORDINATE_TIE == pytest.approx(-1 / 6)
    text = " ".join(DOCS.read_text().split())
    assert "Bulyan's per-coordinate step" in text
