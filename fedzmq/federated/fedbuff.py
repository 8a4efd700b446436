"""FedBuff: buffered asynchronous aggregation (Nguyen et al. 2022, "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS), the strategy and its buffer.

Workers train all the time, each from whatever global model was newest when it was last dispatched. The
coordinator folds every update as it arrives into a buffer, weighted by how stale it is, and after ``K``
updates publishes a new global model (the paper's Algorithm 1, in fedzmq's sign convention)::

    Δ_i = x_i − w^(τ_i)               the move of update i from the model it started from, version τ_i
    buffer += s(t − τ_i) · Δ_i        t the current version: t − τ_i is the update's staleness
    after K updates:  w^(t+1) = w^(t) + η_g · buffer / K,   buffer = 0,   t = t + 1

``s(τ) = 1/√(1 + τ)`` by default (``staleness="sqrt"``, the paper's choice), ``"constant"`` for ``s = 1``,
or any function of the staleness. η_g is ``server_learning_rate`` (default 1.0). The mean is unweighted by
sample counts, as in the paper. Non-float entries take the elementwise maximum over the buffer's updates.

The rounds themselves are run by ``fedzmq.federated.asyncround.BufferedAsyncRounds``: a round of a
``Federation`` is one publication. ``strategy.aggregate(r, global, updates)`` is one buffer of fresh
(staleness 0) updates; ``begin_round(...).receive_stale(base, staleness)`` folds older ones by hand.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from .base import Aggregator, State, Strategy, UpdateReceiver, check_samples, work_dtype

if TYPE_CHECKING:
    from .asyncround import BufferedAsyncRounds

StalenessFn = Callable[[int], float]


def sqrt_staleness(staleness: int) -> float:
    """The paper's weight: 1/√(1 + staleness)."""
    return 1.0 / math.sqrt(1.0 + staleness)


def constant_staleness(staleness: int) -> float:
    """No discount: every update weighs 1, however stale."""
    return 1.0


STALENESS: dict[str, StalenessFn] = {"sqrt": sqrt_staleness, "constant": constant_staleness}


class BufferAggregator(Aggregator):
    """FedBuff's buffer over one global model: the staleness-weighted sum of the updates' moves.

    Each update arrives in pieces into a ``DeltaReceiver`` that keeps its move from the model it started
    from (one model copy per update downloading); when it is complete, ``fold`` adds it, weighted, to the
    sum. Memory: the global model, the sum, and one copy per update in flight."""

    def __init__(self, global_state: State, weight: StalenessFn, server_learning_rate: float) -> None:
        super().__init__(global_state)
        self._weight = weight
        self._lr = server_learning_rate
        self._sum: State = {}
        self._max: State = {}
        #: the weight each folded update got, in the order they were folded
        self.weights: list[float] = []

    def receive(self, num_samples: int) -> UpdateReceiver:
        """A fresh update (trained from this buffer's global model: staleness 0)."""
        check_samples(num_samples)
        return self.receive_stale(self._global, 0)

    def receive_stale(self, base: Mapping[str, torch.Tensor], staleness: int) -> "DeltaReceiver":
        """An update trained from ``base`` (an older global model), ``staleness`` versions behind this one."""
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        return DeltaReceiver(self, base, lambda delta: self.fold(delta, staleness))

    def fold(self, delta: State, staleness: int) -> float:
        """Add one complete move (float entries; non-float ones as the update's values), weighted by its
        staleness. Returns the weight it got."""
        weight = float(self._weight(staleness))
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"the staleness function gave {weight} for staleness {staleness}")
        for name, values in delta.items():
            if self._global[name].is_floating_point():
                acc = self._sum.get(name)
                if acc is None:
                    self._sum[name] = values.mul(weight)
                else:
                    acc.add_(values, alpha=weight)
            else:
                self._max[name] = values.clone() if name not in self._max else torch.maximum(self._max[name], values)
        self.weights.append(weight)
        self._count += 1
        return weight

    def write_result(self, into: State) -> None:
        """w + η_g · sum / (updates folded): the paper's K when the buffer is full."""
        self._require_updates()
        with torch.no_grad():
            for name, ref in self._global.items():
                if ref.is_floating_point():
                    step = self._sum[name].view(ref.shape) * (self._lr / self._count)
                    into[name].copy_(ref.to(step.dtype) + step)
                else:
                    into[name].copy_(self._max[name].view(ref.shape))


class DeltaReceiver(UpdateReceiver):
    """One update arriving in pieces: its move from ``base`` is kept, in the working dtype, until it is
    complete, then handed to ``complete`` (so a buffer that fills meanwhile never holds half of it)."""

    def __init__(self, aggregator: Aggregator, base: Mapping[str, torch.Tensor],
                 complete: Callable[[State], Any]) -> None:
        self.aggregator, self.base, self.complete = aggregator, base, complete
        self.delta: State = {}
        self.elements: dict[str, int] = {}

    def add_slice(self, name: str, start: int, values: torch.Tensor) -> None:
        ref, flat = self.aggregator.check_slice(name, start, values)
        base = self.base[name].reshape(-1)[start:start + flat.numel()]
        if name not in self.delta:
            dtype = work_dtype(ref) if ref.is_floating_point() else ref.dtype
            self.delta[name] = torch.empty(ref.numel(), dtype=dtype)
        target = self.delta[name][start:start + flat.numel()]
        if ref.is_floating_point():
            torch.sub(flat.to(target.dtype), base.to(target.dtype), out=target)
        else:
            target.copy_(flat)
        self.elements[name] = self.elements.get(name, 0) + flat.numel()

    def end(self) -> None:
        missing = [k for k, ref in self.base.items() if self.elements.get(k, 0) != ref.numel()]
        if missing:
            self.abort()
            raise ValueError(f"update is missing (parts of) {sorted(missing)}")
        delta, self.delta = self.delta, {}
        self.complete(delta)

    def abort(self) -> None:
        self.delta = {}


class FedBuff(Strategy):
    """Buffered asynchronous aggregation (Nguyen et al. 2022): publish a new global model every
    ``buffer_size`` updates, each weighted by ``staleness`` (``"sqrt"``: 1/√(1 + τ), the paper's;
    ``"constant"``; or a function of τ), the buffer's mean scaled by ``server_learning_rate``.
    ``max_staleness``: updates staler than this are dropped (and their worker re-dispatched); None keeps all.

    Used through ``Federation.run(rounds)``: a round is one publication, so ``rounds`` publications. Workers
    are never waited for: each is re-dispatched with the newest model the moment its update arrives, and a
    slow one simply contributes staler updates. ``RoundMetrics.extra["updates"]`` lists every update of a
    publication: its worker, the version it trained from, its staleness and weight."""

    name = "fedbuff"

    def __init__(self, buffer_size: int = 10, staleness: str | StalenessFn = "sqrt", *,
                 server_learning_rate: float = 1.0, max_staleness: int | None = None) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {max_staleness}")
        if isinstance(staleness, str) and staleness not in STALENESS:
            raise ValueError(f"staleness must be one of {sorted(STALENESS)} or a function, got {staleness!r}")
        self.buffer_size = int(buffer_size)
        self.staleness = staleness
        self.server_learning_rate = float(server_learning_rate)
        self.max_staleness = max_staleness
        self._protocol: "BufferedAsyncRounds | None" = None
        #: the version of the last model published (the federation's round number); set by its round
        #: protocol (``fedzmq.federated.asyncround``) when the federation commits a publication
        self.version = 0

    def weight(self, staleness: int) -> float:
        """The weight of an update ``staleness`` versions old."""
        fn = STALENESS[self.staleness] if isinstance(self.staleness, str) else self.staleness
        return float(fn(staleness))

    def begin_round(self, round_number: int, global_state: State) -> BufferAggregator:
        return BufferAggregator(global_state, self.weight, self.server_learning_rate)

    def round_protocol(self) -> "BufferedAsyncRounds":
        """The same protocol every round: its trips go on between publications."""
        from .asyncround import BufferedAsyncRounds

        if self._protocol is None:
            self._protocol = BufferedAsyncRounds(self)
        return self._protocol

    def state_dict(self) -> dict[str, Any]:
        """{"strategy": "fedbuff", "version": n}. Updates in flight or in the open buffer are not saved:
        a resumed run starts a fresh buffer from the checkpointed model."""
        return {"strategy": self.name, "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("strategy", self.name) != self.name:
            raise ValueError(f"state of {state['strategy']!r} cannot be loaded into {self.name!r}")
        self.version = int(state.get("version", 0))

    def __repr__(self) -> str:
        staleness = self.staleness if isinstance(self.staleness, str) else getattr(self.staleness, "__name__", "fn")
        return (f"FedBuff(buffer_size={self.buffer_size}, staleness={staleness!r}, "
                f"server_learning_rate={self.server_learning_rate}, max_staleness={self.max_staleness})")


__all__ = ["BufferAggregator", "DeltaReceiver", "FedBuff", "STALENESS", "constant_staleness", "sqrt_staleness"]
