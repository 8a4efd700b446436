"""Differential privacy for federated rounds: clipping, distributed Gaussian noise, adaptive clipping, and
an accountant backed by Google's ``dp-accounting`` library.

The mechanism (user-level DP, add/remove one client, as in DP-FedAvg, McMahan et al. 2018):

* every client clips its update to L2 norm ``C`` (always; ``SecAggConfig.clip``) and scales it by its
  weight ``w <= 1``, so one client changes the weighted sum by at most ``C``;
* every client adds N(0, (sigma*C)**2 / n_expected) to each coordinate before quantization. Secure
  aggregation reveals only the sum, and the sum of ``m`` surviving clients' noise is N(0, (sigma*C)**2 * m /
  n_expected): the Gaussian mechanism with noise multiplier ``sigma * sqrt(m / n_expected)``;
* ``n_expected`` defaults to the round's threshold ``t``, the fewest survivors a finished round can have,
  so the multiplier is never below ``sigma`` (more survivors means more noise than needed, never less).
  Each round's actual multiplier is reported (``SecAggResult.effective_noise_multiplier``) and is what
  should be passed to ``PrivacyAccountant.step``; the guarantee is stated for the noise actually present.

The accountant composes, per round, a Poisson-subsampled Gaussian mechanism (``q`` = the probability that a
given client takes part in a round) and converts to (epsilon, delta) with RDP (default) or PLD accounting.
Install it with ``pip install dp-accounting`` (the ``privacy`` extra).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import torch

from .crypto import CsprngStream

Method = Literal["rdp", "pld"]


# --------------------------------------------------------------------------------------------------
# clipping and noise


def clip_update(update: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
    """``update * min(1, clip / ||update||_2)`` and the original norm (computed in float64)."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError("clip must be a positive finite number")
    norm = float(torch.linalg.vector_norm(update.detach().to(torch.float64)))
    if not math.isfinite(norm):
        raise ValueError("update has non-finite values")
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return update * factor, norm


def distributed_noise_std(noise_multiplier: float, clip: float, expected_survivors: int) -> float:
    """The std each of ``expected_survivors`` clients adds so that their sum has std ``noise_multiplier * clip``."""
    if expected_survivors < 1:
        raise ValueError("expected_survivors must be >= 1")
    return noise_multiplier * clip / math.sqrt(expected_survivors)


def effective_noise_multiplier(noise_multiplier: float, survivors: int, expected_survivors: int) -> float:
    """The multiplier actually present in a sum over ``survivors`` clients of distributed noise calibrated
    for ``expected_survivors``: ``noise_multiplier * sqrt(survivors / expected_survivors)``."""
    return noise_multiplier * math.sqrt(survivors / expected_survivors)


def gaussian_noise(shape: torch.Size | tuple[int, ...], std: float, *, stream: CsprngStream | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, std**2) noise drawn from a cryptographic stream (``os.urandom``-keyed unless ``stream`` is given)."""
    stream = stream or CsprngStream()
    n = math.prod(shape)
    return torch.from_numpy(std * stream.normal(n)).to(dtype).reshape(shape)


# --------------------------------------------------------------------------------------------------
# accounting


def _dp_accounting() -> Any:
    try:
        import dp_accounting
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("privacy accounting needs Google's dp-accounting: pip install 'dp-accounting>=0.6'"
                          " (or fedzmq[privacy])") from exc
    return dp_accounting


def _event(noise_multiplier: float, sampling_rate: float) -> Any:
    dpa = _dp_accounting()
    gaussian = dpa.GaussianDpEvent(noise_multiplier)
    return gaussian if sampling_rate >= 1.0 else dpa.PoissonSampledDpEvent(sampling_rate, gaussian)


def _fresh_accountant(method: Method) -> Any:
    dpa = _dp_accounting()
    if method == "rdp":
        return dpa.rdp.RdpAccountant()
    if method == "pld":
        return dpa.pld.PLDAccountant()
    raise ValueError("method must be 'rdp' or 'pld'")


class PrivacyAccountant:
    """(epsilon, delta) of a sequence of rounds of the (subsampled) Gaussian mechanism.

    noise_multiplier: ``sigma``, noise std divided by the clip norm (sensitivity) of the sum.
    sampling_rate: ``q``, the probability that a client takes part in a round (Poisson sampling; use 1.0
        when every client takes part in every round, which gives no amplification).
    delta: the target delta (typically well below 1 / number of clients).
    method: ``"rdp"`` (Renyi DP, Mironov 2017, the default) or ``"pld"`` (privacy loss distributions,
        tighter, slower).

    ``step()`` once per round (``noise_multiplier=`` the round's effective multiplier when it differs);
    ``epsilon`` is the epsilon spent so far at ``delta``.
    """

    def __init__(self, noise_multiplier: float, sampling_rate: float = 1.0, delta: float = 1e-5,
                 *, method: Method = "rdp") -> None:
        _check_params(noise_multiplier, sampling_rate, delta)
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_rate = float(sampling_rate)
        self.delta = float(delta)
        self.method = method
        self._accountant = _fresh_accountant(method)
        self._rounds = 0
        self._history: list[tuple[float, float, int]] = []  # (sigma, q, count)

    @property
    def rounds(self) -> int:
        return self._rounds

    def step(self, rounds: int = 1, *, noise_multiplier: float | None = None,
             sampling_rate: float | None = None) -> "PrivacyAccountant":
        """Account for ``rounds`` more rounds (with this round's own multiplier or rate if given)."""
        sigma = self.noise_multiplier if noise_multiplier is None else float(noise_multiplier)
        q = self.sampling_rate if sampling_rate is None else float(sampling_rate)
        _check_params(sigma, q, self.delta)
        if type(rounds) is not int or rounds < 0:
            raise ValueError("rounds must be a non-negative integer")
        if rounds:
            dpa = _dp_accounting()
            with quiet_orders():
                self._accountant.compose(dpa.SelfComposedDpEvent(_event(sigma, q), rounds))
            self._rounds += rounds
            self._history.append((sigma, q, rounds))
        return self

    @property
    def epsilon(self) -> float:
        return self.get_epsilon(self.delta)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any round; ``inf`` if a round had no noise)."""
        if self._rounds == 0:
            return 0.0
        with quiet_orders():
            return float(self._accountant.get_epsilon(delta))

    def state_dict(self) -> dict[str, Any]:
        """Plain data to checkpoint; ``load_state_dict`` replays it."""
        return {"noise_multiplier": self.noise_multiplier, "sampling_rate": self.sampling_rate,
                "delta": self.delta, "method": self.method, "history": [list(h) for h in self._history]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PrivacyAccountant":
        acc = cls(state["noise_multiplier"], state["sampling_rate"], state["delta"], method=state["method"])
        for sigma, q, count in state["history"]:
            acc.step(int(count), noise_multiplier=sigma, sampling_rate=q)
        return acc

    def __repr__(self) -> str:
        return (f"PrivacyAccountant(noise_multiplier={self.noise_multiplier}, sampling_rate={self.sampling_rate},"
                f" delta={self.delta}, method={self.method!r}, rounds={self._rounds})")


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_orders() -> Iterator[None]:
    """dp-accounting warns (through absl) about each fractional Renyi order it cannot evaluate, and then
    leaves it out, which only makes its epsilon a looser upper bound: dozens of lines per call, none of
    them a user can act on. Kept out while the block runs (the absl logger itself is left as it was)."""
    logger, quiet = logging.getLogger("absl"), _BelowError()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _check_params(noise_multiplier: float, sampling_rate: float, delta: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError("noise_multiplier must be a finite number >= 0")
    if not 0 < sampling_rate <= 1:
        raise ValueError("sampling_rate must be in (0, 1]")
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")


def compute_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float,
                    *, method: Method = "rdp") -> float:
    """Epsilon after ``rounds`` rounds at ``delta`` (a one-shot ``PrivacyAccountant``)."""
    return PrivacyAccountant(noise_multiplier, sampling_rate, delta, method=method).step(rounds).epsilon


def noise_multiplier_for_epsilon(target_epsilon: float, delta: float, rounds: int, sampling_rate: float = 1.0,
                                 *, method: Method = "rdp", tol: float = 1e-4) -> float:
    """The smallest noise multiplier (within ``tol``, rounded up) whose epsilon after ``rounds`` rounds is at
    most ``target_epsilon``, found by ``dp_accounting.calibrate_dp_mechanism`` (Brent's method)."""
    if not target_epsilon > 0:
        raise ValueError("target_epsilon must be > 0")
    if type(rounds) is not int or rounds < 1:
        raise ValueError("rounds must be a positive integer")
    _check_params(1.0, sampling_rate, delta)
    dpa = _dp_accounting()

    def calibrate(m: Method, bracket: Any) -> float:
        return dpa.calibrate_dp_mechanism(
            lambda: _fresh_accountant(m),
            lambda s: dpa.SelfComposedDpEvent(_event(s, sampling_rate), rounds),
            target_epsilon, delta, bracket_interval=bracket, tol=tol)

    with quiet_orders():
        sigma = calibrate("rdp", dpa.LowerEndpointAndGuess(1e-3, 1.0))
    if method == "pld":
        # PLD needs at most RDP's sigma (RDP's epsilon is an upper bound). Search below it, but never near
        # sigma -> 0, where a privacy loss distribution becomes huge.
        high = float(sigma) + tol
        low = high / 2
        for _ in range(10):
            if compute_epsilon(low, sampling_rate, rounds, delta, method="pld") > target_epsilon:
                break
            low /= 2
        with quiet_orders():
            sigma = calibrate("pld", dpa.ExplicitBracketInterval(low, high))
    sigma = float(sigma) + tol
    # the search guarantees |sigma - sigma*| <= tol; step up until the budget is met for certain
    while compute_epsilon(sigma, sampling_rate, rounds, delta, method=method) > target_epsilon:
        sigma += tol
    return sigma


# --------------------------------------------------------------------------------------------------
# adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy: "Differentially Private Learning with Adaptive
# Clipping", NeurIPS 2021)


def split_noise_multiplier(noise_multiplier: float, clip_bit_noise: float) -> float:
    """The update noise multiplier ``z_delta`` that, together with noise ``sigma_b`` on the sum of the
    clipping indicator bits, gives the privacy of one Gaussian mechanism with ``noise_multiplier`` ``z``
    (Andrew et al. 2021, Theorem 1): ``z_delta = (z**-2 - (2*sigma_b)**-2) ** -1/2``. Requires ``2*sigma_b > z``."""
    z, sb = float(noise_multiplier), float(clip_bit_noise)
    if z <= 0:
        return 0.0
    if not 2 * sb > z:
        raise ValueError("clip_bit_noise must exceed noise_multiplier / 2")
    return (z ** -2 - (2 * sb) ** -2) ** -0.5


@dataclass
class AdaptiveClipping:
    """Geometric update of the clip norm toward the ``target_quantile`` of the clients' update norms:
    ``C <- C * exp(-learning_rate * (clip_fraction - target_quantile))``, where ``clip_fraction`` is the
    (noisy) fraction of clients whose norm was at most ``C`` (``SecAggResult.clip_fraction`` with
    ``SecAggConfig(clip_bits=True, clip_bit_noise=sigma_b)``). Andrew et al. suggest ``target_quantile=0.5``,
    ``learning_rate=0.2`` and ``sigma_b = expected clients / 20``; see ``split_noise_multiplier`` for the
    update noise that keeps the overall multiplier.
    """

    clip: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    min_clip: float = 1e-6
    max_clip: float = 1e6

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError("clip must be a positive finite number")
        if not 0 < self.target_quantile < 1:
            raise ValueError("target_quantile must be in (0, 1)")

    def update(self, clip_fraction: float) -> float:
        """Fold in one round's (noisy) fraction and return the clip norm for the next round."""
        if not math.isfinite(clip_fraction):
            raise ValueError("clip_fraction must be finite")
        self.clip = float(np.clip(self.clip * math.exp(-self.learning_rate * (clip_fraction - self.target_quantile)),
                                  self.min_clip, self.max_clip))
        return self.clip

