"""The two interfaces every aggregation algorithm implements: ``Strategy`` and the per-round ``Aggregator``.

Modelled on Flower's ``Strategy``: one small interface, one short class per algorithm (strategies.py for the
averaging family, robust.py for the order statistics and the Byzantine-robust rules). A round goes::

    agg = strategy.begin_round(r, global_state)     # global_state is only read, never modified
    for each update, as it downloads:
        agg.begin_update(num_samples)
        agg.add_slice(name, start, values)          # flat elements [start, start + len(values)) of entry `name`
        agg.end_update()                            # or agg.abort_update() if the download broke off
    agg.write_result(model.state_dict())            # the new global model, written in place

``add(update, num_samples)`` and ``result()`` are the same path for whole updates (``add`` hands each entry
over as one slice, ``result`` writes into fresh tensors), and ``Strategy.aggregate`` is ``add`` for each update
then ``result``: the daemon-free way and the scheduler's streaming way are one mechanism.

Conventions shared by every strategy (so the scheduler need not care which one it runs):

* Every update must have the global model's keys and shapes (``ValueError`` otherwise).
* Only floating-point entries are aggregated. Other entries (BatchNorm's int64 ``num_batches_tracked``, bool
  masks) cannot be averaged meaningfully; they take the elementwise maximum over the updates the rule keeps
  (all of them, except for Krum and Bulyan, which keep some). Cyclic, which does not aggregate, keeps the
  last model's.
* The aggregator reads ``global_state`` by reference until the round ends: do not modify it meanwhile.
* Results have the global model's dtypes, are new tensors (never views of an input) and ``result()`` may be
  called more than once. Arithmetic runs in at least float32 (``torch.promote_types(dtype, float32)``) so
  half-precision models are not summed in half precision.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .protocols import RoundProtocol

State = dict[str, torch.Tensor]


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype arithmetic on ``t``'s values runs in: its own, but at least float32."""
    return torch.promote_types(t.dtype, torch.float32)


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes one copy of ``state`` takes in its own dtypes."""
    return sum(t.numel() * t.element_size() for t in state.values())


def check_samples(num_samples: int) -> None:
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")


class UpdateReceiver(abc.ABC):
    """One update arriving in pieces, while others may arrive at the same time (``Aggregator.receive``)."""

    @abc.abstractmethod
    def add_slice(self, name: str, start: int, values: torch.Tensor) -> None:
        """The flat elements [start, start + len(values)) of entry ``name`` of this update."""

    @abc.abstractmethod
    def end(self) -> None:
        """The update is complete (``ValueError``, and the update is dropped, if a piece is missing)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """The update broke off mid-download (the worker died)."""


class Aggregator(abc.ABC):
    """Folds the workers' updated models into the next global model as they arrive.

    ``receive(num_samples)`` is what the scheduler drives, once per update: it downloads the updates of a
    round concurrently, in pieces (whole small tensors, or chunks of big ones), and hands each piece to its
    update's receiver at once, so an aggregator that does not need a whole update (the weighted mean)
    never has one in memory. ``begin_update``/``add_slice``/``end_update`` are the same for one update at
    a time."""

    def __init__(self, global_state: State) -> None:
        self._global = global_state
        self._count = 0
        self._receiving: UpdateReceiver | None = None

    @property
    def count(self) -> int:
        """How many updates were added (completely)."""
        return self._count

    # --- streaming: what the scheduler drives ----------------------------------------------------------------

    @abc.abstractmethod
    def receive(self, num_samples: int) -> UpdateReceiver:
        """An update trained on ``num_samples`` samples starts to arrive (others may be arriving too)."""

    @abc.abstractmethod
    def write_result(self, into: State) -> None:
        """Write the new global model into ``into`` (the model's own tensors), in place. ``ValueError`` if no
        update was added."""

    #: whether ``receive_sum`` works: the new model depends on the updates only through their weighted sum
    accepts_sums = False

    def receive_sum(self, weight: int, count: int) -> UpdateReceiver:
        """``count`` updates already combined where they were trained (a daemon hosting many clients):
        their pieces are ``sum(n_i * x_i)`` in float64 (non-float entries their maximum), ``weight`` is
        ``sum(n_i)``. Only for aggregators that ``accepts_sums``."""
        raise NotImplementedError(f"{type(self).__name__} needs each update on its own")

    def begin_update(self, num_samples: int) -> None:
        """``receive``, for one update at a time: the next calls go to this update."""
        self._receiving = self.receive(num_samples)

    def add_slice(self, name: str, start: int, values: torch.Tensor) -> None:
        if self._receiving is None:
            raise RuntimeError("add_slice before begin_update")
        self._receiving.add_slice(name, start, values)

    def end_update(self) -> None:
        receiving, self._receiving = self._receiving, None
        if receiving is None:
            raise RuntimeError("end_update before begin_update")
        receiving.end()

    def abort_update(self) -> None:
        receiving, self._receiving = self._receiving, None
        if receiving is not None:
            receiving.abort()

    # --- whole updates: the same path --------------------------------------------------------------------------

    def add(self, state: Mapping[str, torch.Tensor], num_samples: int) -> None:
        """Fold in one whole update: checked against the global model, then handed over entry by entry."""
        self._check_update(state)
        self.begin_update(num_samples)
        try:
            for name in self._global:
                self.add_slice(name, 0, state[name])
        except BaseException:
            self.abort_update()
            raise
        self.end_update()

    def result(self) -> State:
        """The new global model, in new tensors of the global model's dtypes."""
        out = {k: torch.empty_like(v) for k, v in self._global.items()}
        self.write_result(out)
        return out

    # --- shared checks -----------------------------------------------------------------------------------------

    def _check_update(self, state: Mapping[str, torch.Tensor]) -> None:
        if state.keys() != self._global.keys():
            missing, extra = sorted(self._global.keys() - state.keys()), sorted(state.keys() - self._global.keys())
            raise ValueError(f"update does not match the global model: missing {missing}, unexpected {extra}")
        for k, ref in self._global.items():
            if state[k].shape != ref.shape:
                raise ValueError(f"update's {k!r} has shape {tuple(state[k].shape)}, expected {tuple(ref.shape)}")

    def check_slice(self, name: str, start: int, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the global entry, the values flattened), after checking the slice fits in the entry: for the
        ``UpdateReceiver``s of aggregators, before they fold a slice in (``ValueError`` if it does not fit)."""
        ref = self._global.get(name)
        if ref is None:
            raise ValueError(f"update entry {name!r} is not in the global model")
        values = values.detach().reshape(-1)
        if start < 0 or start + values.numel() > ref.numel():
            raise ValueError(f"slice [{start}, {start + values.numel()}) is outside {name!r}")
        return ref, values

    def _require_updates(self) -> None:
        if not self._count:
            raise ValueError("no update was added this round")


class Strategy(abc.ABC):
    """One federated algorithm: per-round fit arguments, an aggregator per round, and checkpointable state."""

    #: a short name (``fedavg``); a user's own strategy may leave it out (``strategy_name``)
    name: str
    #: True if the new model depends on the round's updates only through their sample-weighted mean, so it can be
    #: computed from the sum secure aggregation reveals. ``SecAgg`` refuses every strategy that does not say so.
    aggregates_weighted_mean: bool = False

    @property
    def min_updates(self) -> int:
        """The fewest updates a round of this strategy can aggregate (a federation with fewer workers is
        refused when made, not after its first round has trained)."""
        return 1

    def configure_fit(self, round_number: int) -> dict[str, Any]:
        """Extra arguments for every participant's local fit this round. Default none."""
        return {}

    def round_protocol(self) -> "RoundProtocol":
        """How this strategy's rounds run: by default every participant at once, one trip each, updates
        folded as they arrive (``fedzmq.federated.protocols``). Cyclic and secure aggregation differ."""
        from .protocols import AveragingRound

        return AveragingRound()

    def stop_reason(self, round_number: int, sampling_rate: float) -> str | None:
        """Why the federation must stop before round ``round_number`` (a privacy budget spent), or None."""
        return None

    @abc.abstractmethod
    def begin_round(self, round_number: int, global_state: State) -> Aggregator: ...

    def aggregate(self, round_number: int, global_state: Mapping[str, torch.Tensor],
                  updates: Iterable[tuple[Mapping[str, torch.Tensor], int]]) -> State:
        """One round without daemons: the new global model from ``[(update_state_dict, num_examples), ...]``.

        It runs the aggregator the scheduler runs (``begin_round``, then ``add`` per update, then ``result``),
        so it computes what a ``Federation`` round would from the same updates. The inputs are not modified
        and the result is new tensors; the strategy's own server state (FedAdam's moments, FedAvgM's momentum)
        advances by one round, as it would in a federation."""
        aggregator = self.begin_round(round_number, dict(global_state))
        for state, num_samples in updates:
            aggregator.add(state, num_samples)
        return aggregator.result()

    def state_dict(self) -> dict[str, Any]:
        """Server-side state to checkpoint (tensors and plain numbers/strings). Stateless by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned. Stateless by default."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def strategy_name(strategy: Strategy) -> str:
    """The strategy's ``name``, or its class's name when it gives none (a user's own subclass need not)."""
    return getattr(strategy, "name", None) or type(strategy).__name__
