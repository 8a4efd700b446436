"""Asynchronous rounds for FedBuff: workers train continuously, a round ends when ``K`` updates are folded.

``BufferedAsyncRounds`` is the round protocol of ``fedzmq.federated.fedbuff.FedBuff``. It outlives a round:

- every participant has one trip in flight at any time: the newest global model out with the fit, the
  trained weights back, kept as the move from the model it started from (``DeltaReceiver``);
- when an update is complete, its staleness (the versions published since its model) fixes its weight and
  it is folded into the open buffer at once, with no ``await`` in between; its worker is re-dispatched with
  the newest model straight away. Nobody waits for a slow worker;
- the ``K``-th update seals the buffer: the new global model is computed there and then (so workers
  re-dispatched from now on get it), and the publication is queued for the federation, whose ``run_round``
  returns it as the round's outcome (``RoundMetrics.extra["updates"]``: one record per update);
- the round's deadline passing with no publication ready leaves the outcome empty (the federation's
  ``RoundFailed``); the buffer and the trips go on;
- a publication the federation refuses (fewer than ``min_workers`` distinct workers in it) is taken back
  with everything built on it, and the protocol goes on from the committed model (``_take_back``).

The federation's model is changed only by ``RoundOutcome.commit``. Each version still in use by a trip
is kept (one model copy per version in flight). ``close()`` cancels the trips: ``Federation.run`` calls it
when it returns; after ``run_round`` on its own call ``await federation.close()``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..client.pointers import Broadcast
from ..client.worker import RemoteWorker
from ..torchmodes import in_default_modes
from .base import State
from .fedbuff import BufferAggregator, DeltaReceiver
from .protocols import (Folder, RoundContext, RoundOutcome, RoundProtocol, fit_trip, hosted_model, reason,
                        worker_key)

if TYPE_CHECKING:
    from .fedbuff import FedBuff


@dataclass
class Publication:
    """A sealed buffer: the new global model and what went into it."""

    version: int
    state: State
    fits: dict[str, dict[str, Any]]
    updates: list[dict[str, Any]]
    dropped: dict[str, str] = field(default_factory=dict)


class BufferedAsyncRounds(RoundProtocol):
    """FedBuff's rounds (see the module's docstring)."""

    def __init__(self, strategy: "FedBuff") -> None:
        self.strategy = strategy
        self._context: RoundContext | None = None
        #: the version the federation's model holds, and the newest one sealed (ahead while queued)
        self._committed = -1
        self._version = -1
        #: the version of the publication ``run`` last returned (taken back if the federation did not commit it)
        self._returned = -1
        self._states: dict[int, State] = {}
        self._broadcasts: dict[int, Broadcast] = {}
        self._in_use: collections.Counter[int] = collections.Counter()
        self._buffer: BufferAggregator | None = None
        self._updates: list[dict[str, Any]] = []
        self._fits: dict[str, dict[str, Any]] = {}
        self._dropped: dict[str, str] = {}
        self._ready: collections.deque[Publication] = collections.deque()
        self._trips: dict[str, asyncio.Task[None]] = {}
        self._changed: asyncio.Event | None = None
        self._fold = Folder()
        self._dispatched = 0

    # --- the round --------------------------------------------------------------------------------

    async def run(self, context: RoundContext) -> RoundOutcome:
        if self._committed != context.number - 1 or self._buffer is None:
            await self.close()  # first round, a resumed run, or a run whose federation moved on without us
            self._start(context)
        elif self._returned > self._committed:
            self._take_back()  # the publication last returned was neither committed nor refused (its commit raised)
        self._context = context
        assert self._changed is not None
        idle = [w for w in context.participants if (t := self._trips.get(worker_key(w))) is None or t.done()]
        sends = self._host_model(idle, context)
        for worker in idle:
            key = worker_key(worker)
            self._trips[key] = asyncio.create_task(in_default_modes(self._trip(worker, sends.get(key))),
                                                   name=f"fedbuff-{key}")
        try:
            async with asyncio.timeout_at(context.deadline):
                while not self._ready:
                    self._changed.clear()
                    if not any(not t.done() for t in self._trips.values()):
                        break  # every trip failed: nothing more will arrive this round
                    await self._changed.wait()
        except TimeoutError:
            pass
        if not self._ready:
            dropped, self._dropped = self._dropped, {}
            return RoundOutcome({}, dropped, commit=lambda: None,
                                facts={"buffered": self._buffer.count if self._buffer else 0})
        publication = self._ready.popleft()
        self._returned = publication.version
        publication.dropped.update(self._dropped)
        self._dropped = {}

        def commit() -> None:
            model = context.model.state_dict()
            for name, tensor in publication.state.items():
                model[name].copy_(tensor)
            self._committed = publication.version
            self.strategy.version = publication.version
            self._forget_unused()

        return RoundOutcome(publication.fits, publication.dropped, commit=commit, refuse=self._take_back,
                            facts={"version": publication.version, "buffer_size": self.strategy.buffer_size,
                                   "updates": publication.updates})

    def _take_back(self) -> None:
        """The federation refused a publication (too few workers in it): forget it and everything built on it
        (later publications, the open buffer's updates, trips trained from it; those trips' updates are
        dropped when they arrive, and their workers re-dispatched), and go on from the committed model, so
        the next publication is made of updates of models the federation holds."""
        assert self._changed is not None
        for version in [v for v in self._states if v > self._committed]:
            del self._states[version]
            self._broadcasts.pop(version, None)
            self._in_use.pop(version, None)
        for record in self._updates:
            self._dropped[record["worker"]] = "its update was built on a publication the federation refused"
        self._version = self._returned = self._committed
        self._ready.clear()
        self._buffer = self.strategy.begin_round(self._committed + 1, self._states[self._committed])
        self._updates, self._fits = [], {}

    def _start(self, context: RoundContext) -> None:
        version = context.number - 1
        self._committed = self._version = self._returned = version
        self._states = {version: {k: v.detach().clone() for k, v in context.model.state_dict().items()}}
        self._broadcasts, self._in_use = {}, collections.Counter()
        self._buffer = self.strategy.begin_round(context.number, self._states[version])
        self._updates, self._fits, self._dropped = [], {}, {}
        self._ready.clear()
        self._changed = asyncio.Event()
        self._fold = Folder()

    async def close(self) -> None:
        """Cancel the trips in flight (their updates are lost) and free the versions they held."""
        trips, self._trips = list(self._trips.values()), {}
        for trip in trips:
            trip.cancel()
        await asyncio.gather(*trips, return_exceptions=True)
        await self._fold.close()
        self._buffer = None
        self._ready.clear()

    @staticmethod
    def _host_model(workers: list[RemoteWorker], context: RoundContext) -> dict[str, asyncio.Task[Any]]:
        """Start sending the model to the workers that have no copy, all at once, before any trip starts; the
        sends by worker. A trip's first send otherwise waited behind the fits already queued on its daemon
        (when sends of a model took turns process-wide, each until its reply): with 20 hosted clients per
        daemon, the first clients' re-dispatched fits kept the others' sends waiting, and 120 updates came
        from 7 of 40 clients, none of the second daemon's. Each trip waits for its own send only
        (``_trip``): waiting for all of them, one participant that did not answer (a stopped daemon not yet
        declared dead) held every trip to the round's deadline, and the round failed with no update."""
        return {worker_key(w): asyncio.ensure_future(hosted_model(w, context.remote_model))
                for w in workers if w.hosted(context.remote_model) is None}

    # --- one worker's trips, one after the other -------------------------------------------------------

    async def _trip(self, worker: RemoteWorker, sending: asyncio.Task[Any] | None = None) -> None:
        """``worker``'s fits, one after the other, each from the newest model, until one fails; ``sending``:
        its send of the model (``_host_model``), waited for within the first trip's time."""
        key = worker_key(worker)
        while True:
            context = self._context
            assert context is not None and self._changed is not None
            version = self._version
            base = self._states[version]
            broadcast = self._broadcasts.get(version) or self._broadcasts.setdefault(version, Broadcast(base))
            self._in_use[version] += 1
            self._dispatched += 1
            fit = {**context.fit_kwargs(), "seed": context.seed * 100_003 + self._dispatched}
            arrived: list[State] = []

            receive = functools.partial(self._receiver, base, arrived.append)
            deadline = asyncio.get_running_loop().time() + context.round_timeout
            try:
                async with asyncio.timeout_at(deadline):
                    if sending is not None:  # (cancelled with the trip; failed, fit_trip sends again and says why)
                        await asyncio.gather(sending, return_exceptions=True)
                        sending = None
                    metrics = await fit_trip(worker, context.remote_model, broadcast, fit, context.fit.dataset,
                                             receive, self._fold)
                delta = arrived[0]
            except Exception as exc:  # this worker is out until a round selects it again
                self._dropped[key] = reason(exc, deadline, context.round_timeout)
                self._changed.set()
                return
            finally:
                if self._states.get(version) is base:
                    self._in_use[version] -= 1
            if self._states.get(version) is base:
                self._arrived(key, version, delta, metrics, fit["seed"])
            else:
                self._dropped[key] = "trained from a publication the federation refused; re-dispatched"

    def _receiver(self, base: State, complete: Callable[[State], Any], num_samples: int) -> DeltaReceiver:
        """Keeps the update's move from ``base``; ``_arrived`` weighs and folds it, with its staleness then."""
        assert self._buffer is not None
        return DeltaReceiver(self._buffer, base, complete)

    def _arrived(self, key: str, version: int, delta: State, metrics: dict[str, Any], seed: int) -> None:
        """Fold one complete update into the open buffer (synchronously: nothing else runs meanwhile)."""
        assert self._buffer is not None and self._changed is not None
        staleness = self._version - version
        record = {"worker": key, "version": version, "staleness": staleness, "seed": seed,
                  "num_examples": int(metrics.get("num_examples", 0)), "loss": float(metrics.get("loss", 0.0))}
        limit = self.strategy.max_staleness
        if limit is not None and staleness > limit:
            self._dropped[key] = f"update {staleness} versions stale (max_staleness={limit}); re-dispatched"
            return
        record["weight"] = self._buffer.fold(delta, staleness)
        self._updates.append(record)
        self._fits[key] = dict(metrics)
        if self._buffer.count >= self.strategy.buffer_size:
            self._seal()

    def _seal(self) -> None:
        """The buffer is full: compute the next global model now, queue its publication, open a new buffer."""
        assert self._buffer is not None and self._changed is not None
        state = self._buffer.result()
        self._version += 1
        self._states[self._version] = state
        self._ready.append(Publication(self._version, state, self._fits, self._updates))
        self._buffer = self.strategy.begin_round(self._version + 1, state)
        self._updates, self._fits = [], {}
        self._forget_unused()
        self._changed.set()

    def _forget_unused(self) -> None:
        """Drop the model versions no trip uses any more (the newest and the committed one stay)."""
        keep = {self._version, self._committed} | {v for v, n in self._in_use.items() if n > 0}
        for version in [v for v in self._states if v not in keep]:
            del self._states[version]
            self._broadcasts.pop(version, None)
            self._in_use.pop(version, None)


__all__ = ["BufferedAsyncRounds", "Publication"]
