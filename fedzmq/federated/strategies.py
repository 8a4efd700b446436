"""Federated aggregation strategies: how the coordinator turns the workers' models into the next global model.

One short class per algorithm, each written so it can be checked line by line against its paper, and against
Flower's class of the same name (docs/strategies.md lists every parameter and default beside Flower's). This
module has the weighted-mean family (FedAvg, FedProx, FedAvgM, FedAdagrad, FedAdam, FedYogi) and Cyclic;
robust.py has the order statistics and the Byzantine-robust rules (FedMedian, FedTrimmedAvg, Krum, Bulyan).
The interfaces, and the conventions every strategy follows, are in base.py; the aggregators in aggregators.py.

Run any strategy without daemons with ``strategy.aggregate(round_number, global_state, [(update, n), ...])``.
"""

from __future__ import annotations

import abc
import math
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from .aggregators import (DEFAULT_MAX_HELD_BYTES, HeldUpdatesAggregator, CyclicAggregator,
                          ServerStepAggregator, SumRecycler, WeightedMeanAggregator)
from .base import Aggregator, State, Strategy, work_dtype
from .robust import Bulyan, FedMedian, FedTrimmedAvg, Krum

if TYPE_CHECKING:
    from .protocols import RoundProtocol


class FedAvg(Strategy):
    """Federated Averaging (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data"): new = sum(n_i * x_i) / sum(n_i), n_i = worker i's number of training samples.

    Streaming: the aggregator keeps one running weighted sum (``acc.add_(x, alpha=n)``) and divides at the end,
    so coordinator memory stays at three model copies (global + sum + the update being added) however many
    workers take part. The sum's memory is reused from one round to the next (``SumRecycler``)."""

    name = "fedavg"
    aggregates_weighted_mean = True
    _sums: SumRecycler | None = None

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        if self._sums is None:
            self._sums = SumRecycler()
        return WeightedMeanAggregator(global_state, self._sums)


class FedProx(FedAvg):
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): aggregation is FedAvg's;
    each worker minimises its loss + (mu/2)·||w − w_global||², so every fit gets ``prox_mu=proximal_mu``.

    ``proximal_mu`` is Flower's name (Flower has no default; fedzmq's is 0.01); ``mu=`` is the older spelling."""

    name = "fedprox"

    def __init__(self, proximal_mu: float | None = None, *, mu: float | None = None) -> None:
        if proximal_mu is not None and mu is not None:
            raise TypeError("give proximal_mu or mu (the same thing), not both")
        value = proximal_mu if proximal_mu is not None else mu if mu is not None else 0.01
        if value < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {value}")
        self.proximal_mu = float(value)

    @property
    def mu(self) -> float:
        """The older name of ``proximal_mu``."""
        return self.proximal_mu

    def configure_fit(self, round_number: int) -> dict[str, Any]:
        return {"prox_mu": self.proximal_mu}


class FedAvgM(Strategy):
    """FedAvg with server momentum (Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification"). The server treats the move away from the FedAvg mean
    x̄ as a gradient and takes one step of SGD with momentum on it, per float entry::

        g = x − x̄
        v = μ·v + g          (v starts at zero; Flower sets v = g in round 1, the same thing)
        x = x − η·v

    η = ``server_learning_rate``, μ = ``server_momentum``, both named and defaulted as in Flower's ``FedAvgM``.
    With μ = 0 and η = 1 the result is the FedAvg mean itself, as in Flower. v persists across rounds and is
    what ``state_dict`` checkpoints. Memory: the weighted mean's three model copies, plus v when μ > 0."""

    name = "fedavgm"
    aggregates_weighted_mean = True

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.0) -> None:
        if server_learning_rate <= 0 or not 0 <= server_momentum < 1:
            raise ValueError("need server_learning_rate > 0 and 0 <= server_momentum < 1; got "
                             f"{server_learning_rate}, {server_momentum}")
        self.server_learning_rate, self.server_momentum = float(server_learning_rate), float(server_momentum)
        self._momentum: State = {}

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        _check_state_matches(self.name, self._momentum, global_state)
        return ServerStepAggregator(global_state, self._step)

    def _step(self, x: State, mean: State) -> State:
        if self.server_momentum == 0 and self.server_learning_rate == 1:
            return mean  # x − 1·(x − x̄) is x̄: return it exactly
        new: State = {}
        for k, ref in x.items():
            if not ref.is_floating_point():
                new[k] = mean[k]
                continue
            xw = ref.to(work_dtype(ref))
            g = xw - mean[k]
            if self.server_momentum > 0:
                v = self._momentum.setdefault(k, torch.zeros_like(g))
                g = v.mul_(self.server_momentum).add_(g)
            new[k] = xw - self.server_learning_rate * g
        return new

    def state_dict(self) -> dict[str, Any]:
        """{"strategy": "fedavgm", "momentum.<entry>": v}; v exists once a round ran with momentum."""
        return {"strategy": self.name, **{f"momentum.{k}": t.clone() for k, t in self._momentum.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_strategy_name(self.name, state)
        tensors = {k: t for k, t in state.items() if k != "strategy"}
        if any(not k.startswith("momentum.") for k in tensors):
            raise ValueError(f"malformed {self.name} state: keys {sorted(tensors)}")
        self._momentum = {k[len("momentum."):]: t.detach().clone() for k, t in tensors.items()}


class FedOpt(Strategy):
    """Server-side adaptive optimization, Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2.

    With x the global model and x̄ the FedAvg mean of the round's updates, per float entry::

        Δ = x̄ − x
        m = β1·m + (1 − β1)·Δ
        v = <subclass rule>(v, Δ²)
        x = x + η_t·m / (√v + τ)

    m and v start at zero and persist across rounds; they are what ``state_dict`` checkpoints, so a resumed
    run continues identically. They are kept in the working dtype.

    ``bias_correction=False`` (the default) is the paper: η_t = η. ``bias_correction=True`` is Flower's FedAdam:
    η_t = η·√(1 − β2^(t+1)) / (1 − β1^(t+1)) with t the round number (1 in the first round; Flower's exponent
    is one ahead of Adam's step count, and fedzmq follows it so the numbers agree). Flower's FedYogi and
    FedAdagrad apply no correction, like the paper. FedAdam's defaults (eta=1e-2, tau=1e-3) are not Flower's
    (1e-1, 1e-9), nor is FedAdagrad's tau (Flower: 1e-9): docs/strategies.md has both side by side, and why."""

    aggregates_weighted_mean = True

    def __init__(self, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3, *,
                 bias_correction: bool = False) -> None:
        if eta <= 0 or tau <= 0 or not (0 <= beta_1 < 1) or not (0 <= beta_2 < 1):
            raise ValueError(f"need eta > 0, tau > 0, 0 <= beta_1, beta_2 < 1; got {eta}, {tau}, {beta_1}, {beta_2}")
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.bias_correction = bool(bias_correction)
        self._m: State = {}
        self._v: State = {}

    @abc.abstractmethod
    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        """Advance the second moment ``v`` in place."""

    def step_size(self, round_number: int) -> float:
        """η_t of round ``round_number``: η, or with ``bias_correction`` Flower's corrected rate."""
        if not self.bias_correction:
            return self.eta
        if round_number < 0:
            raise ValueError(f"round_number must be >= 0, got {round_number}")
        t = round_number + 1
        return self.eta * math.sqrt(1 - self.beta_2 ** t) / (1 - self.beta_1 ** t)

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        _check_state_matches(self.name, self._m, global_state)
        return ServerStepAggregator(global_state, partial(self._step, self.step_size(round_number)))

    def _step(self, eta: float, x: State, mean: State) -> State:
        new: State = {}
        for k, ref in x.items():
            if not ref.is_floating_point():
                new[k] = mean[k]
                continue
            xw = ref.to(work_dtype(ref))
            delta = mean[k] - xw
            if k not in self._m:
                self._m[k], self._v[k] = torch.zeros_like(delta), torch.zeros_like(delta)
            m, v = self._m[k], self._v[k]
            m.mul_(self.beta_1).add_(delta, alpha=1 - self.beta_1)
            self._update_v(v, delta.square())
            new[k] = xw + eta * m / (v.sqrt() + self.tau)
        return new

    def state_dict(self) -> dict[str, Any]:
        """{"strategy": name, "m.<entry>": m, "v.<entry>": v}: flat, so torch.load(weights_only=True) reads it."""
        return {"strategy": self.name, **{f"m.{k}": t.clone() for k, t in self._m.items()},
                **{f"v.{k}": t.clone() for k, t in self._v.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_strategy_name(self.name, state)
        moments = {k: t for k, t in state.items() if k != "strategy"}
        m = {k[2:]: t.detach().clone() for k, t in moments.items() if k.startswith("m.")}
        v = {k[2:]: t.detach().clone() for k, t in moments.items() if k.startswith("v.")}
        if len(m) + len(v) != len(moments) or m.keys() != v.keys():
            raise ValueError(f"malformed {self.name} state: keys {sorted(moments)}")
        self._m, self._v = m, v


class FedAdagrad(FedOpt):
    """FedAdagrad (Reddi et al. 2021): v = v + Δ². beta_1 defaults to 0 (m = Δ; Flower fixes it at 0);
    there is no beta_2."""

    name = "fedadagrad"

    def __init__(self, eta: float = 1e-1, tau: float = 1e-3, beta_1: float = 0.0, *,
                 bias_correction: bool = False) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=0.0, tau=tau, bias_correction=bias_correction)

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.add_(delta_sq)


class FedAdam(FedOpt):
    """FedAdam (Reddi et al. 2021): v = β2·v + (1 − β2)·Δ². Flower's FedAdam is
    ``FedAdam(eta=0.1, tau=1e-9, bias_correction=True)``."""

    name = "fedadam"

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.mul_(self.beta_2).add_(delta_sq, alpha=1 - self.beta_2)


class FedYogi(FedOpt):
    """FedYogi (Reddi et al. 2021): v = v − (1 − β2)·Δ²·sign(v − Δ²) (v moves towards Δ² additively).
    Its defaults are Flower's."""

    name = "fedyogi"

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.sub_(delta_sq * torch.sign(v - delta_sq), alpha=1 - self.beta_2)


class Cyclic(Strategy):
    """The seed tutorial's mode (cyclic training, no averaging): the scheduler sends the current model to
    each worker in turn and each trains on from where the last stopped; the round's result is the model
    after the last worker. Sample counts are ignored. (Named ``Cyclic``, not ``Sequential``, so that it
    cannot be mistaken for ``torch.nn.Sequential``; ``make_strategy("sequential")`` still finds it.)"""

    name = "cyclic"

    def round_protocol(self) -> "RoundProtocol":
        from .protocols import CyclicRound

        return CyclicRound()

    def begin_round(self, round_number: int, global_state: State) -> CyclicAggregator:
        return CyclicAggregator(global_state)


def _check_strategy_name(name: str, state: dict[str, Any]) -> None:
    if state.get("strategy", name) != name:
        raise ValueError(f"state of {state['strategy']!r} cannot be loaded into {name!r}")


def _check_state_matches(name: str, server_state: State, global_state: State) -> None:
    """A model that changed shape would silently reset or misapply server state such as moments."""
    if server_state:
        floats = {k: t.shape for k, t in global_state.items() if t.is_floating_point()}
        if floats != {k: t.shape for k, t in server_state.items()}:
            raise ValueError(f"{name} state does not match the model's float entries")


STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad, "fedmedian": FedMedian, "trimmedmean": FedTrimmedAvg, "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum, "bulyan": Bulyan, "cyclic": Cyclic, "sequential": Cyclic,
}


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build a strategy by name (case-insensitive); kwargs go to its constructor."""
    cls = STRATEGIES.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    return cls(**kwargs)


__all__ = ["Aggregator", "Bulyan", "DEFAULT_MAX_HELD_BYTES", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM",
           "FedMedian", "FedOpt", "FedProx", "FedTrimmedAvg", "FedYogi", "HeldUpdatesAggregator", "Krum",
           "STRATEGIES", "Cyclic", "CyclicAggregator", "State", "Strategy", "make_strategy"]
