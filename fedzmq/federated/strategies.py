"""Federated aggregation strategies: how the coordinator turns the workers' models into the next global model.

Modelled on Flower's ``Strategy``: one small interface, one short class per algorithm, each written so it can be
checked line by line against its paper. A round goes::

    agg = strategy.begin_round(r, global_state)      # global_state is only read, never modified
    for each worker: fit(..., **strategy.configure_fit(r)); agg.add(its_state, its_num_samples)
    global_state = agg.result()

Conventions shared by every strategy (so the scheduler need not care which one it runs):

* Every update must have the global model's keys and shapes (``ValueError`` otherwise).
* Only floating-point entries are aggregated. Other entries (BatchNorm's int64 ``num_batches_tracked``, bool
  masks) cannot be averaged meaningfully; they take the elementwise maximum over the round's updates.
  (Sequential, which does not aggregate, keeps the last model's.)
* The aggregator reads ``global_state`` by reference until the round ends: do not modify it meanwhile.
* Results have the global model's dtypes, are new tensors (never views of an input) and ``result()`` may be
  called more than once. Arithmetic runs in at least float32 (``torch.promote_types(dtype, float32)``) so
  half-precision models are not summed in half precision.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import torch

State = dict[str, torch.Tensor]

def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class Aggregator(abc.ABC):
    """Folds workers' updated models into the next global model as they arrive (one at a time)."""

    _count: int = 0

    @abc.abstractmethod
    def add(self, state: State, num_samples: int) -> None:
        """Fold in one worker's updated model, trained on ``num_samples`` samples (ignored if unweighted)."""

    @abc.abstractmethod
    def result(self) -> State:
        """The new global model; raises ValueError if nothing was added."""

    @property
    def count(self) -> int:
        """How many updates were added."""
        return self._count

    # Streaming, slice by slice: the scheduler downloads an update in pieces (whole small tensors, or
    # chunks of big ones) and hands each over at once, so a whole update never has to sit in the
    # coordinator's memory. ``add_slice(name, start, values)`` gives the flat elements
    # [start, start + len(values)) of entry ``name``. The default collects the pieces and calls ``add``;
    # the weighted mean overrides it to fold each piece straight into its running sum.

    def begin_update(self, num_samples: int) -> None:
        self._pending: State = {}
        self._pending_samples = num_samples

    def add_slice(self, name: str, start: int, values: torch.Tensor) -> None:
        template = self._global_template(name)
        if name not in self._pending:
            self._pending[name] = torch.empty_like(template)
        self._pending[name].view(-1)[start:start + values.numel()].copy_(values.reshape(-1))

    def end_update(self) -> None:
        pending, self._pending = self._pending, {}
        self.add(pending, self._pending_samples)

    def abort_update(self) -> None:
        """The update broke off mid-download (worker died): forget what had arrived."""
        self._pending = {}

    def _global_template(self, name: str) -> torch.Tensor:
        template = getattr(self, "_global", {}).get(name)
        if template is None:
            raise ValueError(f"update entry {name!r} is not in the global model")
        return template

    def write_result(self, into: State) -> None:
        """Copy the new global model into ``into`` (the model's own tensors), in place."""
        with torch.no_grad():
            for name, value in self.result().items():
                into[name].copy_(value)


class Strategy(abc.ABC):
    """One federated algorithm: per-round fit arguments, an aggregator per round, and checkpointable state."""

    name: str
    sequential: bool = False  # True only for Sequential: workers are visited in turn, from current_model()

    def configure_fit(self, round_number: int) -> dict[str, Any]:
        """Extra arguments for every participant's local fit this round. Default none."""
        return {}

    @abc.abstractmethod
    def begin_round(self, round_number: int, global_state: State) -> Aggregator: ...

    def state_dict(self) -> dict[str, Any]:
        """Server-side state to checkpoint (tensors and plain numbers/strings). Stateless by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned. Stateless by default."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class _CheckedAggregator(Aggregator):
    """Validates each update against the round's global model (kept by reference, only read) and counts it."""

    def __init__(self, global_state: State) -> None:
        self._global = global_state

    def _check(self, state: State, num_samples: int) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if state.keys() != self._global.keys():
            missing, extra = sorted(self._global.keys() - state.keys()), sorted(state.keys() - self._global.keys())
            raise ValueError(f"update does not match the global model: missing {missing}, unexpected {extra}")
        for k, ref in self._global.items():
            if state[k].shape != ref.shape:
                raise ValueError(f"update's {k!r} has shape {tuple(state[k].shape)}, expected {tuple(ref.shape)}")
        self._count += 1

    def _require_updates(self) -> None:
        if not self._count:
            raise ValueError("no update was added this round")


class _WeightedMeanAggregator(_CheckedAggregator):
    """Streaming sample-weighted mean: one running sum per float entry, so memory is global + sum + one update."""

    def __init__(self, global_state: State) -> None:
        super().__init__(global_state)
        self._acc: State = {}
        self._total = 0
        self._segments: list[tuple[str, int, int]] = []
        #: pieces folded in by updates that broke off mid-download: (start, length, weight) per entry.
        #: They cannot be taken out again (that would need the update in memory), so their elements are
        #: averaged over the updates that delivered them; every other element over the complete updates.
        self._partial: dict[str, list[tuple[int, int, int]]] = {}

    def add(self, state: State, num_samples: int) -> None:
        self._check(state, num_samples)
        for k, x in state.items():
            ref, acc = self._global[k], self._acc.get(k)
            if ref.is_floating_point():
                if acc is None:
                    acc = self._acc[k] = torch.zeros_like(ref, dtype=_work_dtype(ref))
                acc.add_(x, alpha=num_samples)
            else:
                self._acc[k] = x.detach().to(ref.dtype, copy=True) if acc is None else torch.maximum(acc, x)
        self._total += num_samples

    def begin_update(self, num_samples: int) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self._pending_samples = num_samples
        self._pending_elements: dict[str, int] = {}

    def add_slice(self, name: str, start: int, values: torch.Tensor) -> None:
        ref = self._global_template(name)
        values = values.reshape(-1)
        if start < 0 or start + values.numel() > ref.numel():
            raise ValueError(f"slice [{start}, {start + values.numel()}) is outside {name!r}")
        acc = self._acc.get(name)
        if acc is None:
            acc = self._acc[name] = (torch.zeros_like(ref, dtype=_work_dtype(ref)) if ref.is_floating_point()
                                     else torch.full_like(ref, torch.iinfo(ref.dtype).min if ref.dtype != torch.bool
                                                          else False))
        target = acc.view(-1)[start:start + values.numel()]
        if ref.is_floating_point():
            target.add_(values, alpha=self._pending_samples)
        else:
            torch.maximum(target, values.to(ref.dtype), out=target)
        self._pending_elements[name] = self._pending_elements.get(name, 0) + values.numel()
        self._segments.append((name, start, values.numel()))

    def end_update(self) -> None:
        incomplete = [k for k, ref in self._global.items() if self._pending_elements.get(k, 0) != ref.numel()]
        if incomplete:
            self.abort_update()
            raise ValueError(f"update is missing (parts of) {sorted(incomplete)}")
        self._total += self._pending_samples
        self._count += 1
        self._segments = []

    def abort_update(self) -> None:
        for name, start, length in self._segments:
            self._partial.setdefault(name, []).append((start, length, self._pending_samples))
        self._segments = []
        self._pending_elements = {}

    def _entry_mean(self, name: str) -> torch.Tensor:
        """One entry of sum(n_i * x_i) / sum(n_i) in the working dtype (non-float entries: the max)."""
        acc, ref = self._acc[name], self._global[name]
        if not ref.is_floating_point():
            return acc
        if name not in self._partial:
            return acc / self._total
        weights = torch.full((ref.numel(),), float(self._total), dtype=acc.dtype)
        for start, length, weight in self._partial[name]:
            weights[start:start + length] += weight
        return acc / weights.view(ref.shape)

    def write_result(self, into: State) -> None:
        """The mean, written entry by entry: never a whole extra model in memory."""
        self._require_updates()
        if self._total <= 0:
            raise ValueError("the updates' sample counts sum to zero")
        with torch.no_grad():
            for name, acc in self._acc.items():
                target = into[name]
                if name not in self._partial and acc.dtype == target.dtype and target.is_floating_point():
                    torch.div(acc, self._total, out=target)  # straight into the model: no temporary
                else:
                    target.copy_(self._entry_mean(name))

    def _mean(self) -> State:
        """sum(n_i * x_i) / sum(n_i) in the working dtype (non-float entries: the max, copied)."""
        self._require_updates()
        if self._total <= 0:
            raise ValueError("the updates' sample counts sum to zero")
        return {k: self._entry_mean(k).clone() if not self._global[k].is_floating_point() else self._entry_mean(k)
                for k in self._acc}

    def result(self) -> State:
        mean = self._mean()
        return {k: mean[k].to(ref.dtype) for k, ref in self._global.items()}


class FedAvg(Strategy):
    """Federated Averaging (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data"): new = sum(n_i * x_i) / sum(n_i), n_i = worker i's number of training samples.

    Streaming: the aggregator keeps one running weighted sum (``acc.add_(x, alpha=n)``) and divides at the end,
    so coordinator memory stays at three model copies (global + sum + the update being added) however many
    workers take part."""

    name = "fedavg"

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        return _WeightedMeanAggregator(global_state)


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


class _FedOptAggregator(_WeightedMeanAggregator):
    """FedAvg mean, then one server optimizer step. The step (which advances m and v) runs once, on the first
    ``result()``; later calls return copies of the same model, and adding after it is an error."""

    def __init__(self, strategy: FedOpt, global_state: State) -> None:
        super().__init__(global_state)
        self._strategy = strategy
        self._new: State | None = None

    def add(self, state: State, num_samples: int) -> None:
        if self._new is not None:
            raise RuntimeError("this round was already aggregated")
        super().add(state, num_samples)

    def result(self) -> State:
        if self._new is None:
            self._new = self._strategy._step(self._global, self._mean())
            self._acc = {}
        return {k: t.clone() for k, t in self._new.items()}

    def begin_update(self, num_samples: int) -> None:
        if self._new is not None:
            raise RuntimeError("this round was already aggregated")
        super().begin_update(num_samples)

    write_result = Aggregator.write_result  # the optimizer step, not the plain mean


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
        if self._m:  # a model that changed shape would silently reset or misapply the moments
            floats = {k: t.shape for k, t in global_state.items() if t.is_floating_point()}
            if floats != {k: t.shape for k, t in self._m.items()}:
                raise ValueError(f"{self.name} state does not match the model's float entries")
        return _FedOptAggregator(self, global_state)

    def _step(self, x: State, mean: State) -> State:
        new: State = {}
        for k, ref in x.items():
            if not ref.is_floating_point():
                new[k] = mean[k]
                continue
            xw = ref.to(_work_dtype(ref))
            delta = mean[k] - xw
            if k not in self._m:
                self._m[k], self._v[k] = torch.zeros_like(delta), torch.zeros_like(delta)
            m, v = self._m[k], self._v[k]
            m.mul_(self.beta_1).add_(delta, alpha=1 - self.beta_1)
            self._update_v(v, delta.square())
            new[k] = (xw + self.eta * m / (v.sqrt() + self.tau)).to(ref.dtype)
        return new

    def state_dict(self) -> dict[str, Any]:
        """{"strategy": name, "m.<entry>": m, "v.<entry>": v}: flat, so torch.load(weights_only=True) reads it."""
        return {"strategy": self.name, **{f"m.{k}": t.clone() for k, t in self._m.items()},
                **{f"v.{k}": t.clone() for k, t in self._v.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("strategy", self.name) != self.name:
            raise ValueError(f"state of {state['strategy']!r} cannot be loaded into {self.name!r}")
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


class _OrderStatisticAggregator(_CheckedAggregator):
    """Holds a copy of every update of the round (memory: one model per participant), because an order
    statistic needs all values of a coordinate at once. Sample counts are ignored (unweighted)."""

    def __init__(self, global_state: State, reduce_sorted: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(global_state)
        self._reduce_sorted = reduce_sorted  # (values sorted along dim 0) -> aggregate over dim 0
        self._updates: dict[str, list[torch.Tensor]] = {k: [] for k in global_state}

    def add(self, state: State, num_samples: int) -> None:
        self._check(state, num_samples)
        for k, x in state.items():
            self._updates[k].append(x.detach().to(self._global[k].dtype, copy=True))

    def result(self) -> State:
        self._require_updates()
        out: State = {}
        for k, ref in self._global.items():
            stacked = torch.stack(self._updates[k])
            if ref.is_floating_point():
                out[k] = self._reduce_sorted(stacked.to(_work_dtype(ref)).sort(dim=0).values).to(ref.dtype)
            else:
                out[k] = stacked.amax(dim=0)
        return out


def _median_of_sorted(s: torch.Tensor) -> torch.Tensor:
    k, h = s.shape[0], s.shape[0] // 2
    return s[h].clone() if k % 2 else (s[h - 1] + s[h]) / 2


class FedMedian(Strategy):
    """Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates"), unweighted. For an even count it is the mean of the two middle values (like
    ``torch.quantile(q=0.5)``, unlike ``torch.median``, which returns the lower one). Holds all updates of a
    round: one model copy per participant."""

    name = "fedmedian"

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        return _OrderStatisticAggregator(global_state, _median_of_sorted)


class FedTrimmedAvg(Strategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018), unweighted: sort each coordinate over the k updates,
    drop b = floor(beta·k) values at each end, average the k − 2b left. beta in [0, 0.5), so at least one
    value is always left. Holds all updates of a round: one model copy per participant."""

    name = "trimmedmean"

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        def trimmed_mean(s: torch.Tensor) -> torch.Tensor:
            k = s.shape[0]
            b = math.floor(self.beta * k + 1e-9)  # tolerance: 0.29 * 100 is 28.999999999999996 in floats
            return s[b:k - b].mean(dim=0)

        return _OrderStatisticAggregator(global_state, trimmed_mean)


class SequentialAggregator(_CheckedAggregator):
    """The model visits the workers in turn: each ``add`` replaces the current model (copied), ``result()`` is
    the last one added. Holds one model copy besides the global one."""

    def __init__(self, global_state: State) -> None:
        super().__init__(global_state)
        self._current: State | None = None

    def add(self, state: State, num_samples: int) -> None:
        self._check(state, num_samples)
        self._current = None  # release the previous model before copying the new one
        self._current = {k: x.detach().to(self._global[k].dtype, copy=True) for k, x in state.items()}

    def current_model(self) -> State:
        """A copy of the model the next worker starts from: the global model before any add, then the last."""
        return {k: t.clone() for k, t in (self._global if self._current is None else self._current).items()}

    def result(self) -> State:
        self._require_updates()
        return self.current_model()


class Sequential(Strategy):
    """The seed tutorial's mode (sequential / cyclic training, no averaging): the scheduler sends
    ``current_model()`` to each worker in turn and adds what it returns; the round's result is the model
    after the last worker. Sample counts are ignored."""

    name = "sequential"
    sequential = True

    def begin_round(self, round_number: int, global_state: State) -> SequentialAggregator:
        return SequentialAggregator(global_state)


STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian, "trimmedmean": FedTrimmedAvg, "fedtrimmedavg": FedTrimmedAvg,
    "sequential": Sequential,
}


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build a strategy by name (case-insensitive); kwargs go to its constructor."""
    cls = STRATEGIES.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    return cls(**kwargs)
