"""The coordinator: rounds of federated training over worker daemons, as concurrent coroutines.

One round (``Federation.run_round``):

1. choose the participants (a ``fraction`` of the workers that answer, at least ``min_workers``);
2. for each participant, concurrently and under the round's deadline: ping it (a worker that
   restarted gets the model anew), send the global weights, run ``fit`` on its own dataset, and
   download its updated weights - one download at a time, folded into the strategy's aggregator as
   it arrives, so the coordinator holds the global model, the running aggregate and one update,
   however many workers there are;
3. a worker that errors, times out or dies is left out of the round; the round succeeds when at
   least ``min_workers`` updates arrived and fails with ``RoundFailed`` otherwise (model unchanged);
4. evaluate, record ``RoundMetrics``, and checkpoint (model, strategy state, round, history).

The scheduler does not know which algorithm it runs: that is the ``Strategy``'s business.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from ..client.pointers import ModulePointer
from ..client.worker import RemoteWorker
from ..errors import FedzmqError, RemoteError
from . import checkpoint as ckpt
from .metrics import RoundMetrics
from .strategies import Aggregator, FedAvg, Strategy


class RoundFailed(FedzmqError):
    """Fewer than ``min_workers`` workers delivered an update; the global model did not change."""

    def __init__(self, round_number: int, delivered: int, needed: int, dropped: Mapping[str, str]) -> None:
        reasons = "; ".join(f"{w}: {why}" for w, why in sorted(dropped.items())) or "no participants"
        super().__init__(f"round {round_number} failed: {delivered} of the {needed} required updates arrived "
                         f"({reasons})")
        self.round = round_number
        self.dropped = dict(dropped)


@dataclass(frozen=True)
class FitConfig:
    """What every participant's local training does (the strategy may add to it, e.g. FedProx's mu)."""

    dataset: str
    loss: str = "cross_entropy"
    optimizer: Mapping[str, Any] = field(default_factory=lambda: {"cls": "SGD", "lr": 0.05})
    #: local epochs per round; one when neither this nor ``steps`` is given
    epochs: int | None = None
    #: local optimizer steps per round, instead of epochs
    steps: int | None = None
    batch_size: int = 32


def _reason(exc: BaseException) -> str:
    """One line saying why a worker was left out of a round."""
    if isinstance(exc, RemoteError):
        message = exc.remote_message
        name = exc.remote_type
    else:
        message, name = str(exc), type(exc).__name__
    first = message.splitlines()[0][:200] if message else ""
    return f"{name}: {first}" if first else name


EvaluateFn = Callable[[nn.Module], Mapping[str, float]]


class Federation:
    """Federated training of ``model`` over ``workers`` (connected ``RemoteWorker``s)."""

    def __init__(self, workers: Sequence[RemoteWorker], model: nn.Module, fit: FitConfig,
                 strategy: Strategy | None = None, *, fraction: float = 1.0, min_workers: int = 1,
                 round_timeout: float = 120.0, seed: int = 0, checkpoint_dir: str | None = None,
                 evaluate: EvaluateFn | None = None, evaluate_on_workers: bool = False,
                 eval_dataset: str | None = None) -> None:
        if not workers:
            raise ValueError("a federation needs at least one worker")
        if not 0 < fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        if min_workers < 1:
            raise ValueError("min_workers must be at least 1")
        self.workers = list(workers)
        self.model = model
        self.fit_config = fit
        self.strategy = strategy or FedAvg()
        self.fraction = fraction
        self.min_workers = min_workers
        self.round_timeout = round_timeout
        self.seed = seed
        self.checkpoint_dir = checkpoint_dir
        self.evaluate_fn = evaluate
        self.evaluate_on_workers = evaluate_on_workers
        self.eval_dataset = eval_dataset or fit.dataset
        self._download_slots = asyncio.Semaphore(1)  # one update in flight: the aggregators fold one at a time
        self.round = 0
        self.history: list[RoundMetrics] = []
        self.resumed_from: int | None = None
        #: why ``run`` stopped before its last round (a privacy budget), if it did
        self.stopped_early: str | None = None
        if checkpoint_dir:
            self._resume(checkpoint_dir)

    # --- running -------------------------------------------------------------------------------

    async def run(self, rounds: int, on_round: Callable[[RoundMetrics], None] | None = None) -> list[RoundMetrics]:
        """Run rounds until ``rounds`` are done in total (a resumed federation continues its count)."""
        while self.round < rounds:
            budget_left = getattr(self.strategy, "budget_left", None)
            if budget_left is not None and not budget_left(min(1.0, len(self.select(self.round + 1)) / len(self.workers))):
                self.stopped_early = f"stopped before round {self.round + 1}: it would exceed the privacy budget"
                break
            metrics = await self.run_round()
            if on_round is not None:
                on_round(metrics)
        return self.history

    async def run_round(self) -> RoundMetrics:
        number = self.round + 1
        started = time.perf_counter()
        sent_before, received_before = self._traffic()
        participants = self.select(number)
        start_state = {k: v.clone() for k, v in self.model.state_dict().items()} if self.strategy.sequential else None
        deadline = asyncio.get_running_loop().time() + self.round_timeout
        fits: dict[str, dict[str, Any]] = {}
        dropped: dict[str, str] = {}
        if getattr(self.strategy, "secure", False):
            from ..secagg.errors import SecAggAborted
            from .secure import run_secure_round

            try:
                fits, dropped, facts = await run_secure_round(self, self.strategy, participants, number, deadline)
            except SecAggAborted as exc:
                raise RoundFailed(number, 0, self.min_workers, {"secure aggregation": str(exc)}) from exc
            if len(fits) < self.min_workers:  # too late to refuse: checked against min_workers before
                raise RoundFailed(number, len(fits), self.min_workers, dropped)
            return await self._finish_round(number, started, sent_before, received_before, participants, fits,
                                            dropped, facts)
        aggregator = self.strategy.begin_round(number, self.model.state_dict())

        async def one(worker: RemoteWorker) -> None:
            key = worker.id or worker.address
            try:
                async with asyncio.timeout_at(deadline):
                    fits[key] = await self._train_one(worker, aggregator, number)
            except TimeoutError:
                dropped[key] = f"missed the round deadline of {self.round_timeout:g}s"
            except Exception as exc:  # any failure of one worker only removes it from this round
                dropped[key] = _reason(exc)

        if self.strategy.sequential:
            for worker in participants:  # the seed's mode: the model visits the workers in turn
                self.model.load_state_dict(aggregator.current_model())  # type: ignore[attr-defined]
                await one(worker)
        else:
            await asyncio.gather(*(one(w) for w in participants))

        if aggregator.count < self.min_workers:
            if self.strategy.sequential:
                self.model.load_state_dict(start_state)
            raise RoundFailed(number, aggregator.count, self.min_workers, dropped)
        aggregator.write_result(self.model.state_dict())  # in place, entry by entry
        return await self._finish_round(number, started, sent_before, received_before, participants, fits, dropped,
                                        {})

    async def _finish_round(self, number: int, started: float, sent_before: int, received_before: int,
                            participants: Sequence[RemoteWorker], fits: dict[str, dict[str, Any]],
                            dropped: dict[str, str], facts: dict[str, Any]) -> RoundMetrics:
        """Evaluate, record and checkpoint a round whose new model is in place."""
        self.round = number
        deadline = asyncio.get_running_loop().time() + self.round_timeout
        metrics = RoundMetrics(round=number, participants=sorted(fits), dropped=dropped, fits=fits, extra=facts)
        metrics.epsilon = facts.get("epsilon")
        total = sum(f["num_examples"] for f in fits.values())
        metrics.train_loss = sum(f["loss"] * f["num_examples"] for f in fits.values()) / max(1, total)
        if self.evaluate_fn is not None:
            result = self.evaluate_fn(self.model)
            metrics.eval_loss, metrics.eval_accuracy = result.get("loss"), result.get("accuracy")
        if self.evaluate_on_workers:
            await self._evaluate_on_workers(metrics, participants, deadline)
        sent_after, received_after = self._traffic()
        metrics.bytes_sent, metrics.bytes_received = sent_after - sent_before, received_after - received_before
        metrics.seconds = time.perf_counter() - started
        metrics.transfer_mb_per_s = (metrics.bytes_sent + metrics.bytes_received) / 1e6 / max(metrics.seconds, 1e-9)
        self.history.append(metrics)
        if self.checkpoint_dir:
            self._save_checkpoint()
        return metrics

    def select(self, round_number: int) -> list[RemoteWorker]:
        """The participants of a round: a seeded random ``fraction`` of the live workers."""
        alive = [w for w in self.workers if w.alive]
        candidates = alive if len(alive) >= self.min_workers else self.workers
        wanted = max(self.min_workers, math.ceil(self.fraction * len(self.workers)))
        if wanted >= len(candidates):
            return list(candidates)
        return random.Random(f"{self.seed}:{round_number}").sample(candidates, wanted)

    async def _fit(self, worker: RemoteWorker, remote: ModulePointer, round_number: int) -> dict[str, Any]:
        """The participant's local training for this round (the strategy may add to its arguments)."""
        config, extra = self.fit_config, self.strategy.configure_fit(round_number)
        return await remote.fit(config.dataset, loss=config.loss, optimizer=dict(config.optimizer),
                                epochs=config.epochs, steps=config.steps, batch_size=config.batch_size,
                                prox_mu=float(extra.get("prox_mu", 0.0)), seed=self.seed * 100_003 + round_number)

    async def _train_one(self, worker: RemoteWorker, aggregator: Aggregator, round_number: int) -> dict[str, Any]:
        await worker.refresh()  # a worker that restarted since the last round gets the model anew
        remote = await worker.send(self.model)
        result = await self._fit(worker, remote, round_number)
        async with self._download_slots:  # one download at a time, folded in piece by piece as it arrives
            aggregator.begin_update(int(result["num_examples"]))
            try:
                async for name, start, values in worker._module_slices(remote):
                    aggregator.add_slice(name, start, values)
            except BaseException:
                aggregator.abort_update()  # see the aggregator for what happens to the pieces that arrived
                raise
            aggregator.end_update()
        return result

    async def _evaluate_on_workers(self, metrics: RoundMetrics, participants: Sequence[RemoteWorker],
                                   deadline: float) -> None:
        results: list[dict[str, Any]] = []

        async def one(worker: RemoteWorker) -> None:
            try:
                async with asyncio.timeout_at(deadline):
                    remote = await worker.send(self.model)
                    results.append(await remote.evaluate(self.eval_dataset, loss=self.fit_config.loss))
            except Exception as exc:
                metrics.extra.setdefault("eval_dropped", {})[worker.id or worker.address] = type(exc).__name__

        await asyncio.gather(*(one(w) for w in participants if w.alive))
        total = sum(r["samples"] for r in results)
        if total:
            metrics.worker_eval_loss = sum(r["loss"] * r["samples"] for r in results) / total
            if all(r.get("accuracy") is not None for r in results):
                metrics.worker_eval_accuracy = sum(r["accuracy"] * r["samples"] for r in results) / total

    def _traffic(self) -> tuple[int, int]:
        return sum(w.bytes_sent for w in self.workers), sum(w.bytes_received for w in self.workers)

    # --- checkpoints ---------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        assert self.checkpoint_dir is not None
        ckpt.save(self.checkpoint_dir, ckpt.Checkpoint(
            round=self.round, model=self.model.state_dict(), strategy=self.strategy.state_dict(),
            history=[dataclasses.asdict(m) for m in self.history]))

    def _resume(self, directory: str) -> None:
        found = ckpt.load_latest(directory)
        if found is None:
            return
        self.model.load_state_dict(found.model)
        self.strategy.load_state_dict(found.strategy)
        self.round = found.round
        self.history = [RoundMetrics.from_dict(h) for h in found.history]
        self.resumed_from = found.round
