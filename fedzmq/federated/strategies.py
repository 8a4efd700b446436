"""Federated aggregation strategies: how the coordinator turns the workers' models into the next global model.

One short class per algorithm, each written so it can be checked line by line against its paper. This module
has the weighted-mean family (FedAvg, FedProx, FedAdagrad, FedAdam, FedYogi) and Sequential; robust.py has the
order statistics (FedMedian, FedTrimmedAvg).
The interfaces, and the conventions every strategy follows, are in base.py; the aggregators in aggregators.py.

Run any strategy without daemons with ``strategy.aggregate(round_number, global_state, [(update, n), ...])``.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from .aggregators import HeldUpdatesAggregator, SequentialAggregator, ServerStepAggregator, WeightedMeanAggregator
from .base import Aggregator, State, Strategy, work_dtype
from .robust import FedMedian, FedTrimmedAvg


class FedAvg(Strategy):
    """Federated Averaging (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data"): new = sum(n_i * x_i) / sum(n_i), n_i = worker i's number of training samples.

    Streaming: the aggregator keeps one running weighted sum (``acc.add_(x, alpha=n)``) and divides at the end,
    so coordinator memory stays at three model copies (global + sum + the update being added) however many
    workers take part."""

    name = "fedavg"

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        return WeightedMeanAggregator(global_state)


class FedProx(FedAvg):
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): aggregation is FedAvg's;
    each worker minimises its loss + (mu/2)·||w − w_global||², so every fit gets ``prox_mu=mu``."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        if mu < 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        self.mu = mu

    def configure_fit(self, round_number: int) -> dict[str, Any]:
        return {"prox_mu": self.mu}


class FedOpt(Strategy):
    """Server-side adaptive optimization, Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2.

    With x the global model and x̄ the FedAvg mean of the round's updates, per float entry::

        Δ = x̄ − x
        m = β1·m + (1 − β1)·Δ
        v = <subclass rule>(v, Δ²)
        x = x + η·m / (√v + τ)

    m and v start at zero (not τ², which the paper also allows) and there is no bias correction, as in the
    paper. They persist across rounds and are what ``state_dict`` checkpoints, so a resumed run continues
    identically. m and v are kept in the working dtype. Subclasses differ only in ``_update_v``; FedAdam's and
    FedYogi's defaults (eta=1e-2, beta_1=0.9, beta_2=0.99, tau=1e-3) are the constructor's."""


    def __init__(self, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        if eta <= 0 or tau <= 0 or not (0 <= beta_1 < 1) or not (0 <= beta_2 < 1):
            raise ValueError(f"need eta > 0, tau > 0, 0 <= beta_1, beta_2 < 1; got {eta}, {tau}, {beta_1}, {beta_2}")
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self._m: State = {}
        self._v: State = {}

    @abc.abstractmethod
    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        """Advance the second moment ``v`` in place."""

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        _check_state_matches(self.name, self._m, global_state)
        return ServerStepAggregator(global_state, self._step)

    def _step(self, x: State, mean: State) -> State:
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
            new[k] = xw + self.eta * m / (v.sqrt() + self.tau)
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
    """FedAdagrad (Reddi et al. 2021): v = v + Δ². beta_1 defaults to 0 (m = Δ); beta_2 is unused."""

    name = "fedadagrad"

    def __init__(self, eta: float = 1e-1, tau: float = 1e-3, beta_1: float = 0.0) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=0.0, tau=tau)

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.add_(delta_sq)


class FedAdam(FedOpt):
    """FedAdam (Reddi et al. 2021): v = β2·v + (1 − β2)·Δ²."""

    name = "fedadam"

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.mul_(self.beta_2).add_(delta_sq, alpha=1 - self.beta_2)


class FedYogi(FedOpt):
    """FedYogi (Reddi et al. 2021): v = v − (1 − β2)·Δ²·sign(v − Δ²) (v moves towards Δ² additively)."""

    name = "fedyogi"

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.sub_(delta_sq * torch.sign(v - delta_sq), alpha=1 - self.beta_2)


class Sequential(Strategy):
    """The seed tutorial's mode (sequential / cyclic training, no averaging): the scheduler sends
    ``current_model()`` to each worker in turn and adds what it returns; the round's result is the model
    after the last worker. Sample counts are ignored."""

    name = "sequential"
    sequential = True

    def begin_round(self, round_number: int, global_state: State) -> SequentialAggregator:
        return SequentialAggregator(global_state)


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
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian, "trimmedmean": FedTrimmedAvg, "fedtrimmedavg": FedTrimmedAvg, "sequential": Sequential,
}


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build a strategy by name (case-insensitive); kwargs go to its constructor."""
    cls = STRATEGIES.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    return cls(**kwargs)


__all__ = ["Aggregator", "FedAdagrad", "FedAdam", "FedAvg", "FedMedian", "FedOpt", "FedProx", "FedTrimmedAvg",
           "FedYogi", "HeldUpdatesAggregator", "STRATEGIES", "Sequential", "SequentialAggregator", "State",
           "Strategy", "make_strategy"]
