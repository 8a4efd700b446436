"""Each aggregation strategy against numbers worked out by hand on tiny tensors (2-5 workers, 2 coordinates);
``aggregate()`` against the scheduler's streaming path, slice by slice and inside a real ``Federation``."""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch

import fedzmq as fz
from fedzmq.federated.strategies import (STRATEGIES, Aggregator, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian,
                                         FedProx, FedTrimmedAvg, FedYogi, Sequential, State, Strategy, make_strategy)
from fedzmq.testing.plugin import TEST_SETTINGS
from fedzmq.worker.datasets import Dataset


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def st(w: list[float], nbt: int = 0) -> State:
    """A two-coordinate model plus an int64 buffer like BatchNorm's num_batches_tracked."""
    return {"w": t(*w), "nbt": torch.tensor(nbt)}


def run_round(strategy: Strategy, global_state: State, updates: list[tuple[State, int]], r: int = 1) -> State:
    agg = strategy.begin_round(r, global_state)
    for state, n in updates:
        agg.add(state, n)
    assert agg.count == len(updates)
    return agg.result()


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype))


def fresh(name: str) -> Strategy:
    return make_strategy(name)


ALL = sorted(set(STRATEGIES) - {"fedtrimmedavg"})


# --- FedAvg / FedProx -----------------------------------------------------------------------------------------

def test_fedavg_weights_by_sample_count() -> None:
    updates = [(st([1, 2], nbt=5), 1), (st([3, 6], nbt=7), 3), (st([5, -2], nbt=6), 4)]
    out = run_round(FedAvg(), st([0, 0]), updates)
    # (1*1 + 3*3 + 4*5) / 8 = 30/8;  (1*2 + 3*6 + 4*(-2)) / 8 = 12/8
    close(out["w"], [3.75, 1.5])
    assert out["nbt"].dtype == torch.int64 and out["nbt"].item() == 7  # max, not averaged


def test_fedavg_two_workers_unequal_weights() -> None:
    out = run_round(FedAvg(), st([0, 0]), [(st([1, 2]), 1), (st([3, 6]), 3)])
    close(out["w"], [2.5, 5.0])  # (1 + 9)/4, (2 + 18)/4


def test_fedavg_keeps_float_dtypes() -> None:
    g = {"d": torch.zeros(2, dtype=torch.float64), "h": torch.zeros(2, dtype=torch.float16)}
    u1 = {"d": torch.tensor([1.0, 2.0], dtype=torch.float64), "h": torch.tensor([1.0, 2.0], dtype=torch.float16)}
    u2 = {"d": torch.tensor([4.0, 8.0], dtype=torch.float64), "h": torch.tensor([4.0, 8.0], dtype=torch.float16)}
    out = run_round(FedAvg(), g, [(u1, 2), (u2, 1)])
    assert out["d"].dtype == torch.float64 and out["h"].dtype == torch.float16
    close(out["d"], [2.0, 4.0])  # (2*1 + 4)/3, (2*2 + 8)/3
    close(out["h"], [2.0, 4.0])


def test_fedavg_zero_total_weight_is_an_error() -> None:
    agg = FedAvg().begin_round(1, st([0, 0]))
    agg.add(st([1, 1]), 0)
    with pytest.raises(ValueError, match="sum to zero"):
        agg.result()
    with pytest.raises(ValueError, match="num_samples"):
        agg.add(st([1, 1]), -1)


def test_fedprox_configures_mu_and_aggregates_like_fedavg() -> None:
    assert FedProx().configure_fit(1) == {"prox_mu": 0.01}
    assert FedProx(mu=0.5).configure_fit(7) == {"prox_mu": 0.5}
    assert FedAvg().configure_fit(1) == {}
    out = run_round(FedProx(mu=0.5), st([0, 0]), [(st([1, 2]), 1), (st([3, 6]), 3)])
    close(out["w"], [2.5, 5.0])
    with pytest.raises(ValueError):
        FedProx(mu=-1)


# --- FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2) -------------------------------------------
#
# Round 1: x0 = [0, 1]; updates [2, 1] (n=1) and [5, -5] (n=2): mean [4, -3], so Δ1 = [4, -4].
# Round 2: updates x1 + [3, -3] (n=1) and x1 + [7.5, 0] (n=2): mean x1 + [6, -1], so Δ2 = [6, -1].
# eta = 1, tau = 1 everywhere below; Adam and Yogi use beta_1 = 0.25, beta_2 = 0.75 (distinct, and neither
# 0.5, so swapping beta and 1 - beta, or beta_1 and beta_2, changes the numbers); m0 = v0 = 0.

X0 = [0.0, 1.0]


def round1(s: Strategy) -> State:
    return run_round(s, st(X0, nbt=3), [(st([2, 1], nbt=4), 1), (st([5, -5], nbt=9), 2)], r=1)


def round2(s: Strategy, x1: State) -> State:
    w = x1["w"]
    return run_round(s, x1, [({"w": w + t(3, -3), "nbt": torch.tensor(2)}, 1),
                             ({"w": w + t(7.5, 0), "nbt": torch.tensor(11)}, 2)], r=2)


ADAPTIVE = {
    # Adagrad (beta_1 = 0): m = Δ; v = v + Δ².
    #   r1: m = [4, -4], v = [16, 16], x1 = x0 + m/(4 + 1) = [0.8, 0.2]
    #   r2: m = [6, -1], v = [52, 17], x2 = x1 + [6/(√52 + 1), -1/(√17 + 1)]
    "fedadagrad": (lambda: FedAdagrad(eta=1.0, tau=1.0),
                   [0.8, 0.2], [4, -4], [16, 16],
                   [0.8 + 6 / (math.sqrt(52) + 1), 0.2 - 1 / (math.sqrt(17) + 1)], [6, -1], [52, 17]),
    # Adam: m = 0.25 m + 0.75 Δ; v = 0.75 v + 0.25 Δ².
    #   r1: m = [3, -3], v = [4, 4], x1 = x0 + m/(2 + 1) = [1, 0]
    #   r2: m = [0.75 + 4.5, -0.75 - 0.75] = [5.25, -1.5], v = [3 + 9, 3 + 0.25] = [12, 3.25]
    "fedadam": (lambda: FedAdam(eta=1.0, beta_1=0.25, beta_2=0.75, tau=1.0),
                [1, 0], [3, -3], [4, 4],
                [1 + 5.25 / (math.sqrt(12) + 1), -1.5 / (math.sqrt(3.25) + 1)], [5.25, -1.5], [12, 3.25]),
    # Yogi: v = v - 0.25 Δ² sign(v - Δ²).
    #   r1: v = 0 - 0.25*16*(-1) = 4 (as Adam), m = [3, -3], x1 = [1, 0]
    #   r2: coordinate 0: Δ² = 36 > v: v = 4 + 9 = 13; coordinate 1: Δ² = 1 < v: v = 4 - 0.25 = 3.75
    "fedyogi": (lambda: FedYogi(eta=1.0, beta_1=0.25, beta_2=0.75, tau=1.0),
                [1, 0], [3, -3], [4, 4],
                [1 + 5.25 / (math.sqrt(13) + 1), -1.5 / (math.sqrt(3.75) + 1)], [5.25, -1.5], [13, 3.75]),
}


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_two_rounds_by_hand(name: str) -> None:
    make, x1_exp, m1, v1, x2_exp, m2, v2 = ADAPTIVE[name]
    s = make()
    x1 = round1(s)
    close(x1["w"], x1_exp)
    assert x1["nbt"].item() == 9  # int buffers: max of the updates, untouched by the optimizer
    sd1 = s.state_dict()
    assert sd1["strategy"] == name
    close(sd1["m.w"], m1)
    close(sd1["v.w"], v1)
    x2 = round2(s, x1)
    close(x2["w"], x2_exp)
    assert x2["nbt"].item() == 11
    sd2 = s.state_dict()
    close(sd2["m.w"], m2)
    close(sd2["v.w"], v2)
    close(sd1["m.w"], m1)  # the round-1 checkpoint is a snapshot, not a live view


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_resume_from_checkpoint_is_identical(name: str) -> None:
    make = ADAPTIVE[name][0]
    original = make()
    x1 = round1(original)
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)  # must survive a real checkpoint, safe loading included
    buf.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    a, b = round2(original, x1), round2(resumed, x1)
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["nbt"], b["nbt"])
    # without the moments the round-2 result differs: the state really matters
    assert not torch.equal(round2(make(), x1)["w"], a["w"])


def test_adaptive_defaults_and_validation() -> None:
    assert (FedAdam().eta, FedAdam().beta_1, FedAdam().beta_2, FedAdam().tau) == (1e-2, 0.9, 0.99, 1e-3)
    assert (FedYogi().eta, FedYogi().beta_1, FedYogi().beta_2, FedYogi().tau) == (1e-2, 0.9, 0.99, 1e-3)
    assert (FedAdagrad().eta, FedAdagrad().tau, FedAdagrad().beta_1) == (1e-1, 1e-3, 0.0)
    with pytest.raises(ValueError):
        FedAdam(beta_1=1.0)
    with pytest.raises(ValueError):
        FedAdagrad(tau=0.0)
    s = FedAdam()
    with pytest.raises(ValueError, match="cannot be loaded"):
        s.load_state_dict(FedYogi().state_dict())
    round1(s)
    with pytest.raises(ValueError, match="does not match"):
        s.begin_round(2, {"w": torch.zeros(3), "nbt": torch.tensor(0)})


def test_adaptive_step_happens_once_per_round() -> None:
    s = FedAdam(eta=1.0, beta_1=0.5, beta_2=0.75, tau=1.0)
    agg = s.begin_round(1, st(X0))
    agg.add(st([2, 1]), 1)
    agg.add(st([5, -5]), 2)
    first, second = agg.result(), agg.result()
    assert torch.equal(first["w"], second["w"]) and first["w"] is not second["w"]
    close(s.state_dict()["m.w"], [2, -2])  # not advanced twice
    with pytest.raises(RuntimeError):
        agg.add(st([0, 0]), 1)


# --- FedMedian / FedTrimmedAvg ---------------------------------------------------------------------------------

def test_median_odd_count() -> None:
    updates = [(st([1, 5], nbt=1), 10), (st([10, -1], nbt=4), 1), (st([3, 0], nbt=2), 100)]
    out = run_round(FedMedian(), st([0, 0]), updates)
    close(out["w"], [3, 0])  # sorted [1, 3, 10] and [-1, 0, 5]; sample counts are ignored
    assert out["nbt"].item() == 4


def test_median_even_count_is_mean_of_middles() -> None:
    updates = [(st([1, -1]), 1), (st([10, 2]), 2), (st([3, 0]), 3), (st([4, 8]), 4)]
    out = run_round(FedMedian(), st([0, 0]), updates)
    close(out["w"], [3.5, 1.0])  # sorted [1, 3, 4, 10] -> (3+4)/2;  [-1, 0, 2, 8] -> (0+2)/2


def test_trimmed_mean_drops_extremes() -> None:
    def trimmed(outlier: float) -> torch.Tensor:
        ws = [[1, -50], [2, 0], [3, 1], [4, 2], [outlier, 3]]
        return run_round(FedTrimmedAvg(beta=0.2), st([0, 0]), [(st(w), i + 1) for i, w in enumerate(ws)])["w"]

    # k = 5, beta = 0.2: drop floor(1.0) = 1 from each end: mean(2, 3, 4) = 3; mean(0, 1, 2) = 1
    close(trimmed(1000.0), [3, 1])
    close(trimmed(1e9), [3, 1])  # the outlier has no effect at all
    close(trimmed(-1e9), [2, 1])  # a low outlier is dropped too: mean(1, 2, 3) = 2


def test_trimmed_mean_small_beta_is_plain_mean_and_even_k() -> None:
    ws = [[1, 0], [2, 0], [3, 0], [10, 5]]
    out = run_round(FedTrimmedAvg(beta=0.1), st([0, 0]), [(st(w), 1) for w in ws])  # floor(0.4) = 0
    close(out["w"], [4, 1.25])
    out = run_round(FedTrimmedAvg(beta=0.25), st([0, 0]), [(st(w), 1) for w in ws])  # floor(1.0) = 1
    close(out["w"], [2.5, 0])  # mean(2, 3); mean(0, 0)
    for beta in (0.5, -0.1):
        with pytest.raises(ValueError):
            FedTrimmedAvg(beta=beta)


# --- Sequential ------------------------------------------------------------------------------------------------

def test_sequential_current_model_progression() -> None:
    s = Sequential()
    assert s.sequential and not FedAvg().sequential
    g = st([0, 0], nbt=5)
    agg = s.begin_round(1, g)
    close(agg.current_model()["w"], [0, 0])
    a = st([1, 2], nbt=6)
    agg.add(a, 10)
    a["w"].fill_(-7)  # the caller reuses its buffer: the aggregator kept its own copy
    close(agg.current_model()["w"], [1, 2])
    agg.add(st([3, 4], nbt=2), 1)
    cur = agg.current_model()
    close(cur["w"], [3, 4])
    cur["w"].fill_(99)  # a copy: scribbling on it changes nothing
    out = agg.result()
    close(out["w"], [3, 4])
    assert out["nbt"].item() == 2  # the last model, not a max
    close(g["w"], [0, 0])


# --- shared contract -------------------------------------------------------------------------------------------

def updates_for_contract() -> list[tuple[State, int]]:
    return [(st([1, 2], nbt=5), 1), (st([3, 6], nbt=7), 3), (st([5, -2], nbt=6), 4)]


@pytest.mark.parametrize("name", ALL)
def test_global_state_unmodified_and_results_are_new_tensors(name: str) -> None:
    g = st([0.5, -0.5], nbt=1)
    before = {k: v.clone() for k, v in g.items()}
    updates = updates_for_contract()
    out = run_round(fresh(name), g, updates)
    for k in g:
        assert torch.equal(g[k], before[k])
    inputs = [v.untyped_storage().data_ptr() for v in g.values()]
    inputs += [v.untyped_storage().data_ptr() for u, _ in updates for v in u.values()]
    for k, v in out.items():
        assert v.untyped_storage().data_ptr() not in inputs, k
        assert v.dtype == g[k].dtype and v.shape == g[k].shape


@pytest.mark.parametrize("name", [n for n in ALL if n != "sequential"])
def test_int_buffers_take_the_max(name: str) -> None:
    assert run_round(fresh(name), st([0, 0], nbt=100), updates_for_contract())["nbt"].item() == 7


@pytest.mark.parametrize("name", ALL)
def test_empty_round_and_mismatched_updates_are_errors(name: str) -> None:
    agg = fresh(name).begin_round(1, st([0, 0]))
    assert isinstance(agg, Aggregator) and agg.count == 0
    with pytest.raises(ValueError, match="no update"):
        agg.result()
    with pytest.raises(ValueError, match="missing"):
        agg.add({"w": t(1, 2)}, 1)
    with pytest.raises(ValueError, match="shape"):
        agg.add({"w": t(1, 2, 3), "nbt": torch.tensor(0)}, 1)
    assert agg.count == 0


@pytest.mark.parametrize("name", ALL)
def test_stateless_defaults(name: str) -> None:
    s = fresh(name)
    if name not in ADAPTIVE and name != "fedavgm":
        assert s.state_dict() == {}
        s.load_state_dict({})
    if name != "fedprox":
        assert s.configure_fit(1) == {}


def test_make_strategy_names_and_error() -> None:
    expected = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi,
                "fedadagrad": FedAdagrad, "fedmedian": FedMedian, "trimmedmean": FedTrimmedAvg,
                "fedtrimmedavg": FedTrimmedAvg, "sequential": Sequential}
    assert STRATEGIES == expected
    for name, cls in expected.items():
        assert type(make_strategy(name)) is cls
    assert make_strategy("FedProx", mu=0.3).configure_fit(1) == {"prox_mu": 0.3}
    assert make_strategy("fedtrimmedavg", beta=0.2).beta == 0.2
    assert make_strategy("fedadam", eta=0.5).eta == 0.5
    assert make_strategy("fedavgm", server_momentum=0.9).server_momentum == 0.9
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'.*fedavg.*sequential"):
        make_strategy("fedsgd")


@pytest.mark.parametrize("name", ALL)
def test_real_module_with_batchnorm_round_trips(name: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    g = model.state_dict()
    updates = []
    for i, n in enumerate((2, 6)):
        u = {k: v.clone() for k, v in g.items()}
        u["0.weight"] += i + 1
        u["1.num_batches_tracked"] += 10 * (i + 1)
        updates.append((u, n))
    before = {k: v.clone() for k, v in g.items()}
    out = run_round(fresh(name), g, updates)
    assert all(torch.equal(g[k], before[k]) for k in g)  # g is live: the model's own tensors
    model.load_state_dict(out, strict=True)
    assert out["1.num_batches_tracked"].item() == 20  # max for the aggregators, the last model for Sequential
    if name in ("fedavg", "fedprox", "fedavgm"):
        torch.testing.assert_close(out["0.weight"], before["0.weight"] + (2 * 1 + 6 * 2) / 8)


# --- Flower's parameter names and counts -----------------------------------------------------------------------

def test_fedprox_takes_flowers_proximal_mu() -> None:
    assert FedProx(proximal_mu=0.3).configure_fit(1) == {"prox_mu": 0.3}
    assert FedProx(0.2).proximal_mu == 0.2 and FedProx().proximal_mu == 0.01
    assert FedProx(mu=0.4).proximal_mu == 0.4 and FedProx(mu=0.4).mu == 0.4  # the older name still works
    with pytest.raises(TypeError, match="not both"):
        FedProx(proximal_mu=0.1, mu=0.1)
    with pytest.raises(ValueError):
        FedProx(proximal_mu=-0.1)


def test_trimmed_mean_cuts_int_of_beta_times_k_like_flower() -> None:
    # k = 100, beta = 0.29: 0.29 * 100 is 28.999999999999996 in floats, so int() cuts 28 a side, not 29
    assert 0.29 * 100 < 29
    order = random.Random(0).sample(range(100), 100)
    updates = [({"w": t(float(i * i))}, 1) for i in order]  # squares: cutting 28 or 29 gives different means
    out = FedTrimmedAvg(beta=0.29).aggregate(1, {"w": t(0.0)}, updates)
    expected = sum(i * i for i in range(28, 72)) / 44
    close(out["w"], [expected])
    assert abs(expected - sum(i * i for i in range(29, 71)) / 42) > 1  # the other count would be caught


# --- FedOpt's bias correction (Flower's FedAdam) ---------------------------------------------------------------

def test_fedadam_bias_correction_is_flowers_step_size() -> None:
    # Flower's FedAdam: eta_t = eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1)), t = the round (1, 2, ...).
    # m and v are those of test_adaptive_two_rounds_by_hand: r1 m = [3, -3], v = [4, 4]; r2 m = [5.25, -1.5],
    # v = [12, 3.25]; only the step size changes.
    s = FedAdam(eta=1.0, beta_1=0.25, beta_2=0.75, tau=1.0, bias_correction=True)
    f1, f2 = math.sqrt(1 - 0.75 ** 2) / (1 - 0.25 ** 2), math.sqrt(1 - 0.75 ** 3) / (1 - 0.25 ** 3)
    assert s.step_size(1) == pytest.approx(f1) and s.step_size(2) == pytest.approx(f2)
    x1 = round1(s)
    close(x1["w"], [f1 * 3 / (2 + 1), 1 - f1 * 3 / (2 + 1)])
    x2 = round2(s, x1)
    w1 = x1["w"].tolist()
    close(x2["w"], [w1[0] + f2 * 5.25 / (math.sqrt(12) + 1), w1[1] - f2 * 1.5 / (math.sqrt(3.25) + 1)])
    assert FedAdam().bias_correction is False and FedAdam(eta=0.5).step_size(7) == 0.5  # the paper's default


def test_bias_correction_of_yogi_and_adagrad() -> None:
    f1 = math.sqrt(1 - 0.75 ** 2) / (1 - 0.25 ** 2)
    yogi = FedYogi(eta=1.0, beta_1=0.25, beta_2=0.75, tau=1.0, bias_correction=True)
    close(round1(yogi)["w"], [f1, 1 - f1])  # round 1 of Yogi is Adam's: m = [3, -3], v = [4, 4]
    # Adagrad has beta_1 = 0 and no beta_2, so the correction is 1: Flower's FedAdagrad and the paper agree
    plain, corrected = FedAdagrad(eta=1.0, tau=1.0), FedAdagrad(eta=1.0, tau=1.0, bias_correction=True)
    assert corrected.step_size(3) == 1.0
    assert torch.equal(round1(plain)["w"], round1(corrected)["w"])
    assert FedAdagrad(beta_1=0.5, bias_correction=True).step_size(1) == pytest.approx(0.1 / (1 - 0.25))


# --- FedAvgM -----------------------------------------------------------------------------------------------------

def test_fedavgm_two_rounds_by_hand() -> None:
    # round1/round2's updates: mean x0 + [4, -4], then x1 + [6, -1]; eta = 0.5, mu = 0.5.
    #   r1: g = x0 - mean = [-4, 4]; v = [-4, 4]; x1 = [0, 1] - 0.5 v = [2, -1]
    #   r2: g = [-6, 1]; v = 0.5 [-4, 4] + [-6, 1] = [-8, 3]; x2 = [2, -1] - 0.5 v = [6, -2.5]
    s = FedAvgM(server_learning_rate=0.5, server_momentum=0.5)
    x1 = round1(s)
    close(x1["w"], [2, -1])
    assert x1["nbt"].item() == 9
    close(s.state_dict()["momentum.w"], [-4, 4])
    x2 = round2(s, x1)
    close(x2["w"], [6, -2.5])
    close(s.state_dict()["momentum.w"], [-8, 3])
    # no momentum, eta = 2: x0 - 2 (x0 - mean) = [0, 1] + 2 [4, -4]
    close(round1(FedAvgM(server_learning_rate=2.0))["w"], [8, -7])


def test_fedavgm_defaults_are_fedavg_and_a_resumed_run_is_identical() -> None:
    assert (FedAvgM().server_learning_rate, FedAvgM().server_momentum) == (1.0, 0.0)  # Flower's defaults
    assert torch.equal(round1(FedAvgM())["w"], round1(FedAvg())["w"])  # bit for bit, as in Flower

    def make() -> FedAvgM:
        return FedAvgM(server_learning_rate=0.5, server_momentum=0.9)

    original = make()
    x1 = round1(original)
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)
    buf.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    a, b, c = round2(original, x1), round2(resumed, x1), round2(make(), x1)
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])
    for bad in ({"server_momentum": 1.0}, {"server_momentum": -0.1}, {"server_learning_rate": 0.0}):
        with pytest.raises(ValueError):
            FedAvgM(**bad)
    with pytest.raises(ValueError, match="cannot be loaded"):
        make().load_state_dict(FedAdam().state_dict())


# --- aggregate() is the streaming path -------------------------------------------------------------------------

def random_updates(rng: np.random.Generator, global_state: State, count: int) -> list[tuple[State, int]]:
    updates = []
    for i in range(count):
        u = {k: (v + torch.from_numpy(rng.normal(0, 1, tuple(v.shape))).to(v.dtype)) if v.is_floating_point()
             else v + int(rng.integers(0, 50)) for k, v in global_state.items()}
        if i == 3:  # a Byzantine one
            u = {k: v * 1000 if v.is_floating_point() else v for k, v in u.items()}
        updates.append((u, int(rng.integers(1, 60))))
    return updates


def stream_round(strategy: Strategy, r: int, live: State, updates: list[tuple[State, int]], rng: random.Random) -> None:
    """What Federation does: pieces of every update in any order, then the result written into the model."""
    agg = strategy.begin_round(r, live)
    for state, n in updates:
        agg.begin_update(n)
        pieces = [(name, start, x.reshape(-1)[start:start + 3]) for name, x in state.items()
                  for start in range(0, max(1, x.numel()), 3)]
        rng.shuffle(pieces)
        for piece in pieces:
            agg.add_slice(*piece)
        agg.end_update()
    assert agg.count == len(updates)
    agg.write_result(live)


def stream_cases() -> dict[str, Callable[[], Strategy]]:
    """Every strategy, with its server state where it has one."""
    cases: dict[str, Callable[[], Strategy]] = {name: STRATEGIES[name] for name in ALL}
    cases["fedadam"] = lambda: FedAdam(eta=0.1)
    cases["fedadam-flower"] = lambda: FedAdam(eta=0.1, tau=1e-9, bias_correction=True)
    cases["fedavgm"] = lambda: FedAvgM(server_learning_rate=0.7, server_momentum=0.9)
    return cases


@pytest.mark.parametrize("case", sorted(stream_cases()))
def test_aggregate_equals_the_streaming_path(case: str) -> None:
    make = stream_cases()[case]
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    live = model.state_dict()  # the model's own tensors: written in place, as the scheduler does
    pure = {k: v.clone() for k, v in live.items()}
    by_aggregate, by_stream = make(), make()
    rng, shuffle = np.random.default_rng(2), random.Random(3)
    for r in (1, 2):
        updates = random_updates(rng, pure, 7)
        copies = [({k: v.clone() for k, v in u.items()}, n) for u, n in updates]
        before = {k: v.clone() for k, v in pure.items()}
        new = by_aggregate.aggregate(r, pure, updates)
        stream_round(by_stream, r, live, updates, shuffle)
        for k in live:
            assert torch.equal(new[k], live[k]), (case, r, k)
            assert new[k].dtype == before[k].dtype and not torch.equal(new[k], before[k])
            assert torch.equal(pure[k], before[k])  # aggregate() did not touch its inputs
            assert all(torch.equal(u[k], c[k]) for (u, _), (c, _) in zip(updates, copies))
        pure = new


@pytest.mark.parametrize("name", ["fedmedian", "trimmedmean", "sequential"])
def test_held_updates_forget_a_broken_download_and_refuse_an_incomplete_one(name: str) -> None:
    updates = [(st([float(i), -float(i)], nbt=i), i + 1) for i in range(4)]
    agg = make_strategy(name).begin_round(1, st([0, 0]))
    agg.begin_update(5)
    agg.add_slice("w", 0, t(1000.0))  # the worker dies half-way through its update
    agg.abort_update()
    agg.begin_update(5)
    agg.add_slice("w", 0, t(1000.0, 1000.0))
    with pytest.raises(ValueError, match="missing.*nbt"):
        agg.end_update()
    for state, n in updates:
        agg.add(state, n)
    assert agg.count == 4
    assert all(torch.equal(a, b) for a, b in zip(agg.result().values(),
                                                 make_strategy(name).aggregate(1, st([0, 0]), updates).values()))


# --- what the robust rules hold, and the budget ----------------------------------------------------------------

ROBUST = {"fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg}


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_rules_refuse_updates_past_max_held_bytes(name: str) -> None:
    g = st([0, 0])  # two float32 and one int64: 16 bytes an update
    agg = ROBUST[name](max_held_bytes=2 * 16).begin_round(1, g)
    agg.add(st([1, 1]), 1)
    agg.add(st([2, 2]), 1)
    assert agg.held_bytes == 32
    with pytest.raises(fz.HeldBytesExceeded, match=f"{ROBUST[name].__name__} holds every update.*update 3 would "
                                                   "make that 48 bytes.*max_held_bytes=32"):
        agg.add(st([3, 3]), 1)
    assert agg.count == 2 and agg.held_bytes == 32
    with pytest.raises(fz.HeldBytesExceeded, match="cannot be aggregated without the updates it refused"):
        agg.result()  # never a result from only the updates that fitted
    unlimited = ROBUST[name](max_held_bytes=None)
    assert unlimited.aggregate(1, g, [(st([1, 1]), 1)] * 40)["w"].tolist() == [1, 1]
    assert ROBUST[name]().max_held_bytes == 1 << 30
    with pytest.raises(ValueError):
        ROBUST[name](max_held_bytes=-1)


# --- inside a real Federation: the round equals aggregate() of the updates it streamed ---------------------------

class _Recording(Strategy):
    """The wrapped strategy, keeping a copy of every update the scheduler streams into its aggregator."""

    def __init__(self, inner: Strategy) -> None:
        self.inner, self.name, self.sequential = inner, inner.name, inner.sequential
        self.rounds: list[list[tuple[State, int]]] = []

    def configure_fit(self, round_number: int) -> dict:
        return self.inner.configure_fit(round_number)

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        self.rounds.append([])
        return _RecordingAggregator(self.inner.begin_round(round_number, global_state), global_state, self.rounds[-1])


class _RecordingAggregator(Aggregator):
    def __init__(self, inner: Aggregator, global_state: State, into: list[tuple[State, int]]) -> None:
        super().__init__(global_state)
        self._inner, self._into = inner, into

    @property
    def count(self) -> int:
        return self._inner.count

    def begin_update(self, num_samples: int) -> None:
        self._inner.begin_update(num_samples)
        self._update = ({k: torch.zeros_like(v) for k, v in self._global.items()}, num_samples)

    def add_slice(self, name: str, start: int, values: torch.Tensor) -> None:
        self._inner.add_slice(name, start, values)
        self._update[0][name].view(-1)[start:start + values.numel()].copy_(values.reshape(-1))

    def end_update(self) -> None:
        self._inner.end_update()
        self._into.append(self._update)

    def abort_update(self) -> None:
        self._inner.abort_update()

    def write_result(self, into: State) -> None:
        self._inner.write_result(into)

    def current_model(self) -> State:
        return self._inner.current_model()  # type: ignore[attr-defined]


def _workers(n: int) -> list[fz.VirtualWorker]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40 * n, 5, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return [fz.VirtualWorker(f"w{i}", datasets={"d": Dataset("d", x[40 * i:40 * i + 20 + 5 * i],
                                                                y[40 * i:40 * i + 20 + 5 * i])},
                             settings=TEST_SETTINGS) for i in range(n)]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


FIT = fz.FitConfig(dataset="d", optimizer={"cls": "SGD", "lr": 0.1}, steps=2, batch_size=8)


@pytest.mark.timeout(90)
async def test_every_strategy_in_a_federation_equals_aggregate_of_the_updates_it_streamed() -> None:
    workers = _workers(3)
    try:
        for case, make in sorted(stream_cases().items()):
            model, recorder, replay = _model(), _Recording(make()), make()
            federation = fz.Federation(workers, model, FIT, recorder, seed=4)
            for r in (1, 2):
                before = {k: v.clone() for k, v in model.state_dict().items()}
                await federation.run_round()
                assert len(recorder.rounds[-1]) == 3, case
                expected = replay.aggregate(r, before, recorder.rounds[-1])
                for k, v in model.state_dict().items():
                    assert torch.equal(v, expected[k]), (case, r, k)
                assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"]), case
    finally:
        for w in workers:
            await w.close()
