"""Differential privacy: distributed noise through secure aggregation, clipping, the accountant
(Google's dp-accounting), adaptive clipping, and local DP-SGD. Plain pytest; every random draw is seeded."""

from __future__ import annotations

import math
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from fedzmq.secagg import (
    AdaptiveClipping, PrivacyAccountant, SecAggConfig, clip_update, compute_epsilon, distributed_noise_std,
    effective_noise_multiplier, noise_multiplier_for_epsilon, private_gradients, run_round, split_noise_multiplier,
)
from fedzmq.secagg.crypto import CsprngStream
from fedzmq.secagg.dp import gaussian_noise

scipy_stats = pytest.importorskip("scipy.stats")
scipy_optimize = pytest.importorskip("scipy.optimize")
# the accountant needs the optional dp-accounting package (the "privacy" extra); the rest does not
needs_accounting = pytest.mark.skipif(find_spec("dp_accounting") is None, reason="pip install dp-accounting")


def seeds(n: int, salt: int = 0) -> dict[int, bytes]:
    return {i: bytes([i, salt]) * 16 for i in range(n)}


# ---------------------------------------------------------------------------------------------------
# noise through secure aggregation


def test_csprng_normal_is_standard_and_reproducible():
    a = CsprngStream(b"\x07" * 32).normal(200_001)
    assert np.array_equal(a, CsprngStream(b"\x07" * 32).normal(200_001))
    assert abs(a.mean()) < 0.01 and abs(a.std() - 1) < 0.01
    assert scipy_stats.kstest(a[:20_000], "norm").pvalue > 1e-4
    b = CsprngStream().normal(10)
    assert not np.array_equal(b, CsprngStream().normal(10))


def test_aggregate_noise_std_is_sigma_times_clip():
    n, d, sigma, clip = 8, 100_000, 1.0, 0.5
    cfg = SecAggConfig(tuple(range(n)), 5, d, clip=clip, noise_multiplier=sigma, expected_survivors=n)
    assert cfg.client_noise_std == pytest.approx(distributed_noise_std(sigma, clip, n))
    zeros = {i: torch.zeros(d) for i in range(n)}
    result = run_round(cfg, zeros, noise_seeds=seeds(n))
    noise = result.weighted_sum.numpy()
    assert result.noise_std == pytest.approx(sigma * clip)
    assert result.effective_noise_multiplier == pytest.approx(sigma)
    # sample std of 1e5 normals is within 1% of the truth with overwhelming probability (sd ~0.22%)
    assert noise.std() == pytest.approx(sigma * clip, rel=0.015)
    assert abs(noise.mean()) < 5 * sigma * clip / math.sqrt(d)
    assert scipy_stats.kstest(noise[:20_000] / (sigma * clip), "norm").pvalue > 1e-4
    assert result.mean.numpy().std() == pytest.approx(sigma * clip / n, rel=0.015)  # divided by total weight


def test_noise_shortfall_rule_and_report():
    """n_expected defaults to the threshold: the sum never carries less than sigma*C; with more survivors it
    carries sigma*C*sqrt(m/t), and the result reports the multiplier actually present."""
    n, d, sigma, clip = 8, 100_000, 2.0, 1.0
    cfg = SecAggConfig(tuple(range(n)), 5, d, clip=clip, noise_multiplier=sigma)
    assert cfg.expected_survivors == 5
    zeros = {i: torch.zeros(d) for i in range(n)}
    for dropped in ([], [1, 6], [0, 3, 7]):
        result = run_round(cfg, zeros, drop_before_masked=dropped, noise_seeds=seeds(n, len(dropped)))
        m = n - len(dropped)
        assert result.effective_noise_multiplier == pytest.approx(effective_noise_multiplier(sigma, m, 5))
        assert result.effective_noise_multiplier >= sigma
        assert result.weighted_sum.numpy().std() == pytest.approx(result.noise_std, rel=0.015)


def test_clipping_bounds_each_contribution():
    x = torch.randn(1000) * 10
    clipped, norm = clip_update(x, 2.5)
    assert norm == pytest.approx(float(x.norm()), rel=1e-6)
    assert float(clipped.norm()) <= 2.5 * (1 + 1e-6)
    small = torch.full((10,), 0.01)
    assert torch.equal(clip_update(small, 2.5)[0], small)
    with pytest.raises(ValueError):
        clip_update(x, 0.0)
    # through secure aggregation: huge updates, all in one direction, average to norm exactly C
    n, d, clip = 4, 1000, 1.5
    direction = torch.randn(d)
    updates = {i: direction * (100 + i) for i in range(n)}
    result = run_round(SecAggConfig(tuple(range(n)), 3, d, clip=clip), updates)
    assert float(result.mean.double().norm()) == pytest.approx(clip, rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# the accountant


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The tight epsilon of one Gaussian mechanism of sensitivity 1 (Balle & Wang, ICML 2018, Thm 8)."""
    N = scipy_stats.norm.cdf

    def gap(eps: float) -> float:
        return N(0.5 / sigma - eps * sigma) - math.exp(eps) * N(-0.5 / sigma - eps * sigma) - delta

    return scipy_optimize.brentq(gap, 1e-9, 500)


@needs_accounting
def test_epsilon_for_sigma_1_ten_full_rounds_is_finite_positive_and_near_the_exact_value():
    acc = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=1.0, delta=1e-5)
    assert acc.epsilon == 0.0
    for _ in range(10):
        acc.step()
    eps = acc.epsilon
    assert 0 < eps < math.inf and acc.rounds == 10
    # 10 rounds of sigma with q = 1 compose exactly into one Gaussian with sigma / sqrt(10)
    exact = exact_gaussian_epsilon(1.0 / math.sqrt(10), 1e-5)
    assert exact <= eps <= 1.3 * exact  # RDP is an upper bound, and not a loose one here
    pld = PrivacyAccountant(1.0, 1.0, 1e-5, method="pld").step(10).epsilon
    assert pld == pytest.approx(exact, rel=0.01)


@needs_accounting
def test_accountant_matches_the_library_and_grows_with_rounds():
    sigma, q, delta = 1.1, 0.05, 1e-6
    acc = PrivacyAccountant(sigma, q, delta)
    previous = 0.0
    for rounds in (1, 10, 100, 500):
        acc.step(rounds - acc.rounds)
        import dp_accounting

        direct = dp_accounting.rdp.RdpAccountant()
        direct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
        assert acc.epsilon == pytest.approx(direct.get_epsilon(delta), rel=1e-12)
        assert acc.epsilon > previous
        previous = acc.epsilon
    # sampling amplifies privacy; more noise spends less
    assert compute_epsilon(sigma, q, 100, delta) < compute_epsilon(sigma, 1.0, 100, delta)
    assert compute_epsilon(2 * sigma, q, 100, delta) < compute_epsilon(sigma, q, 100, delta)
    # no noise: no privacy
    assert PrivacyAccountant(0.0, 1.0, delta).step().epsilon == math.inf


@needs_accounting
def test_accountant_takes_each_rounds_effective_multiplier_and_checkpoints():
    acc = PrivacyAccountant(1.0, 0.5, 1e-5)
    acc.step(5).step(noise_multiplier=1.3).step(2, noise_multiplier=0.9)
    again = PrivacyAccountant.from_state_dict(acc.state_dict())
    assert again.rounds == 8 and again.epsilon == pytest.approx(acc.epsilon, rel=1e-12)
    uniform = PrivacyAccountant(1.0, 0.5, 1e-5).step(8).epsilon
    assert acc.epsilon != uniform
    with pytest.raises(ValueError):
        PrivacyAccountant(1.0, 0.0, 1e-5)
    with pytest.raises(ValueError):
        PrivacyAccountant(1.0, 1.0, 0.0)


@needs_accounting
@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_noise_multiplier_for_a_target_epsilon(method):
    target, delta, q = 3.0, 1e-5, 0.1
    rounds = 50 if method == "rdp" else 10  # PLD is exact but slower
    sigma = noise_multiplier_for_epsilon(target, delta, rounds, q, method=method)
    assert compute_epsilon(sigma, q, rounds, delta, method=method) <= target
    assert compute_epsilon(sigma * 0.98, q, rounds, delta, method=method) > target


# ---------------------------------------------------------------------------------------------------
# adaptive clipping


def test_adaptive_clipping_tracks_the_target_quantile():
    rng = np.random.default_rng(0)
    norms = rng.lognormal(mean=0.0, sigma=0.5, size=200)
    clipping = AdaptiveClipping(clip=0.05, target_quantile=0.5, learning_rate=0.2)
    for _ in range(300):
        clipping.update(float(np.mean(norms <= clipping.clip)))
    assert clipping.clip == pytest.approx(float(np.median(norms)), rel=0.1)


def test_clip_bits_through_secure_aggregation():
    n, d = 6, 100
    g = torch.Generator().manual_seed(1)
    updates = {i: torch.randn(d, generator=g) * (0.05 * (i + 1)) for i in range(n)}
    norms = [float(u.norm()) for u in updates.values()]
    clip = float(np.median(norms))
    cfg = SecAggConfig(tuple(range(n)), 4, d, clip=clip, clip_bits=True)
    result = run_round(cfg, updates)
    assert result.clip_fraction == pytest.approx(np.mean(np.array(norms) <= clip), abs=1e-6)
    noisy = SecAggConfig(tuple(range(n)), 4, d, clip=clip, clip_bits=True, clip_bit_noise=0.3,
                         noise_multiplier=0.1, expected_survivors=n)
    result = run_round(noisy, updates, noise_seeds=seeds(n))
    assert abs(result.clip_fraction - np.mean(np.array(norms) <= clip)) < 6 * 0.3 / n


def test_split_noise_multiplier_follows_andrew_et_al():
    assert split_noise_multiplier(1.0, 5.0) == pytest.approx((1 - 1 / 100) ** -0.5)
    assert split_noise_multiplier(0.0, 1.0) == 0.0
    with pytest.raises(ValueError):
        split_noise_multiplier(1.0, 0.5)


# ---------------------------------------------------------------------------------------------------
# local DP-SGD


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_private_gradients_clip_each_sample_exactly():
    model = _model()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 5, generator=g) * 3, torch.randint(0, 3, (16,), generator=g)
    loss = torch.nn.functional.cross_entropy
    clip = 0.5
    out = private_gradients(model, loss, x, y, clip=clip, noise_multiplier=0.0)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, out.grads[name])  # apply=True wrote .grad
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(16):
        model.zero_grad()
        loss(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        assert out.per_sample_norms[i].item() == pytest.approx(norm, rel=1e-4)
        for name in grads:
            expected[name] += grads[name] * min(1.0, clip / norm)
    for name, p in model.named_parameters():
        assert torch.allclose(out.grads[name], expected[name] / 16, atol=1e-6)


def test_private_gradients_noise_std():
    model = torch.nn.Linear(500, 20)
    x, y = torch.randn(4, 500), torch.randn(4, 20)
    loss = torch.nn.functional.mse_loss
    clip, sigma = 0.7, 3.0
    clean = private_gradients(model, loss, x, y, clip=clip, noise_multiplier=0.0, apply=False).grads
    noisy = private_gradients(model, loss, x, y, clip=clip, noise_multiplier=sigma, apply=False,
                              stream=CsprngStream(b"\x03" * 32)).grads
    noise = torch.cat([(noisy[k] - clean[k]).flatten() for k in clean]).double()
    assert float(noise.std()) == pytest.approx(sigma * clip / 4, rel=0.03)


def test_gaussian_noise_helper():
    t = gaussian_noise((300, 100), 2.0, stream=CsprngStream(b"\x05" * 32))
    assert t.shape == (300, 100) and t.dtype == torch.float32
    assert float(t.std()) == pytest.approx(2.0, rel=0.02)


def test_the_accountant_keeps_dp_accountings_order_warnings_out(caplog):
    """dp-accounting warned once per fractional Renyi order it left out: dozens of lines before a
    README example's answer, none of them actionable."""
    import logging

    from fedzmq.secagg.dp import compute_epsilon

    with caplog.at_level(logging.WARNING):
        epsilon = compute_epsilon(0.7, 0.1, 40, 1e-5)
    assert epsilon > 0 and not [r for r in caplog.records if r.name == "absl"]
