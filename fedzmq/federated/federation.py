"""The coordinator: rounds of federated training over worker daemons, as concurrent coroutines.

A round (``Federation.run_round``) has one shape whatever the algorithm:

1. **select**: workers that stopped answering heartbeats are tried once more (a restarted daemon is
   seen at once), then a seeded random ``fraction`` of the live ones (at least ``min_workers``) is
   chosen, or with ``sampling="poisson"`` each live one independently with probability ``fraction``
   (what DP-FedAvg's accountant assumes); the others are recorded as unreachable;
2. **run the trips** with the strategy's round protocol (``fedzmq.federated.protocols``): by default
   every participant at once, one trip each (the global weights out with the fit, the trained weights
   back in its reply, folded into the strategy's aggregator as they arrive), under the round's
   deadline. A worker that errors, times out or dies is left out, with the reason;
3. **commit** the new model if at least ``min_workers`` updates arrived, else ``RoundFailed`` and the
   model is unchanged;
4. **record**: evaluate, keep ``RoundMetrics`` (who was selected, who delivered, who was left out and
   why, who was unreachable), and checkpoint the model, the strategy's state and the history.

The federation does not know which algorithm it runs: the strategy aggregates, its protocol runs the
trips.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import logging
import math
import random
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Mapping, Sequence

from torch import nn

from ..client.worker import RemoteWorker
from ..errors import CheckpointMismatch, FedzmqError
from ..torchmodes import default_modes, in_default_modes
from . import checkpoint as ckpt
from .base import Strategy, strategy_name
from .metrics import RoundMetrics
from .protocols import FitConfig, RoundContext, RoundOutcome, reason, remote_twin, twin_layout, worker_key
from .strategies import FedAvg

log = logging.getLogger("fedzmq.federated")

#: how long a worker that stopped answering gets to answer again before a round leaves it out
PROBE_SECONDS = 1.0
#: how often a probe looks whether a dead connection heard from its worker again (a heartbeat's answer)
PROBE_POLL_SECONDS = 0.02


class RoundFailed(FedzmqError):
    """Fewer than ``min_workers`` workers delivered an update; the global model did not change."""

    def __init__(self, round_number: int, delivered: int, needed: int, dropped: Mapping[str, str]) -> None:
        left_out = why_dropped(dropped) if dropped or not delivered else "no participant was left out"
        super().__init__(f"round {round_number} failed: updates from {delivered} of the {needed} required workers "
                         f"arrived ({left_out})")
        self.round = round_number
        self.dropped = dict(dropped)


def why_dropped(dropped: Mapping[str, str], reasons: int = 5, names: int = 3) -> str:
    """Who was left out and why, short whatever the number of workers (the whole is ``RoundFailed.dropped``):
    workers with the same reason together, a few names each, a few reasons. A thousand simulated clients
    that lost one connection are one reason, not a thousand."""
    if not dropped:
        return "no participants"
    by_reason: dict[str, list[str]] = {}
    for worker, why in sorted(dropped.items()):
        by_reason.setdefault(why, []).append(worker)
    parts = []
    for why, workers in sorted(by_reason.items(), key=lambda item: -len(item[1]))[:reasons]:
        more = f" and {len(workers) - names} more" if len(workers) > names else ""
        parts.append(f"{', '.join(workers[:names])}{more}: {why}")
    if len(by_reason) > reasons:
        parts.append(f"{len(by_reason) - reasons} other reasons")
    return "; ".join(parts)


def refuse_non_strategy(strategy: object) -> None:
    """``TypeError`` saying what to pass instead of a strategy's class or name (the class failed further on,
    comparing a number with a property; the name, missing an attribute)."""
    if isinstance(strategy, Strategy):
        return
    if isinstance(strategy, type) and issubclass(strategy, Strategy):
        raise TypeError(f"strategy must be a strategy, not its class: pass fz.{strategy.__name__}(), not "
                        f"fz.{strategy.__name__}")
    if isinstance(strategy, str):
        raise TypeError(f"strategy must be a strategy, not a name: pass fz.make_strategy({strategy!r})")
    raise TypeError(f"strategy must be a fz.Strategy (fz.FedAvg(), ...), not {type(strategy).__name__}")


def refuse_repeated_workers(workers: Sequence[RemoteWorker]) -> None:
    """``ValueError`` naming the workers listed more than once (by id): a round fits each entry, so a repeated
    one's data would weigh double in the model while its metrics, keyed by id, count it once."""
    repeated = sorted(k for k, n in collections.Counter(worker_key(w) for w in workers).items() if n > 1)
    if repeated:
        raise ValueError(f"a federation's workers must be distinct; listed more than once (by id): "
                         f"{', '.join(repeated)}")


def evaluated(result: Mapping[str, Any], key: str) -> float | None:
    """One number of what ``evaluate=`` returned, as a float: a 0-d tensor or a numpy scalar (what a loss
    computed with torch is, without ``.item()``) is one, and the round's checkpoint (JSON) takes only
    Python numbers. ``TypeError`` saying so for anything that is no single number."""
    value = result.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"evaluate= returned {key}={value!r}, which is not a number") from exc


EvaluateFn = Callable[[nn.Module], "Mapping[str, float] | Awaitable[Mapping[str, float]]"]
Sampling = Literal["fixed", "poisson"]


def fixed_sample_size(fraction: float, live: int, min_workers: int) -> int:
    """How many of ``live`` workers a ``sampling="fixed"`` round takes: Flower's count for ``fraction_fit``,
    ``max(int(fraction * live), min_workers)`` (rounded down, as Flower's ``num_fit_clients``: users moving from
    Flower get the rounds they had), and never more than there are."""
    return min(live, max(min_workers, int(fraction * live)))


def sampling_rate(sampling: Sampling, fraction: float) -> float:
    """The probability with which each client takes part in a round independently of the others: ``fraction``
    under Poisson sampling, else 1.0 (``Federation.sampling_rate`` says why); what DP's noise is calibrated
    for and its accountant amplifies by."""
    return fraction if sampling == "poisson" else 1.0


class Federation:
    """Federated training of ``model`` over ``workers`` (connected ``RemoteWorker``s).

    ``fit`` says what every participant's local training does; ``strategy`` (default ``FedAvg()``) how
    the updates become the next model. Per round, a seeded random ``fraction`` of the live workers
    takes part (at least ``min_workers``, and a round with fewer updates fails), within
    ``round_timeout`` seconds. ``evaluate`` (a function, or an ``async def``, of the model returning
    ``{"loss", "accuracy"}``) runs on the coordinator after every round, on a held-out set you keep;
    ``evaluate_on_workers`` also evaluates the new model on the participants' own data (``eval_dataset``,
    default the fit's), reported as sample-weighted aggregates. With ``checkpoint_dir`` the run resumes where a previous
    one stopped. ``run()`` returns the history: one ``RoundMetrics`` per round.

    ``sampling``: ``"fixed"`` (default) takes exactly ``max(min_workers, int(fraction * live))`` workers
    (Flower's count for ``fraction_fit``), drawn without replacement from a generator seeded with ``seed``
    and the round number (reproducible).
    ``"poisson"`` takes each live worker independently with probability ``fraction`` (so the number varies
    from round to round, and may fall below ``min_workers``: that round is then recorded as skipped, with the
    model unchanged and ``extra["skipped"]`` saying why, not failed), drawn from the
    operating system's random source: this is the sampling under which a DP accountant may claim
    amplification by sampling (DP-FedAvg, McMahan et al. 2018; the sampled Gaussian mechanism, Mironov
    et al. 2019), and that claim needs a draw nobody outside the coordinator can predict or see."""

    def __init__(self, workers: Sequence[RemoteWorker], model: nn.Module, fit: FitConfig,
                 strategy: Strategy | None = None, *, fraction: float = 1.0, min_workers: int = 1,
                 round_timeout: float = 120.0, seed: int = 0, checkpoint_dir: str | None = None,
                 evaluate: EvaluateFn | None = None, evaluate_on_workers: bool = False,
                 eval_dataset: str | None = None, sampling: Sampling = "fixed") -> None:
        if not workers:
            raise ValueError("a federation needs at least one worker")
        if not 0 < fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        if min_workers < 1:
            raise ValueError("min_workers must be at least 1")
        if sampling not in ("fixed", "poisson"):
            raise ValueError("sampling must be 'fixed' or 'poisson'")
        self.workers = list(workers)
        refuse_repeated_workers(self.workers)
        self.model = model
        #: the module the rounds' remote copies are sent as: not ``model``, whose remote copy is the user's
        self._remote = remote_twin(model)
        #: what ``_remote`` was made over (``twin_layout``): a round remakes it when the model changed since
        self._remote_layout = twin_layout(model)
        self.fit_config = fit
        self.strategy = strategy if strategy is not None else FedAvg()
        refuse_non_strategy(self.strategy)
        selected = fixed_sample_size(fraction, len(self.workers), min_workers)
        if selected < self.strategy.min_updates:
            raise ValueError(f"{type(self.strategy).__name__} needs at least {self.strategy.min_updates} updates a "
                             f"round; this federation takes {selected} of its {len(self.workers)} workers a round "
                             "(fraction, min_workers)")
        self.fraction = fraction
        self.sampling = sampling
        self.min_workers = min_workers
        self.round_timeout = round_timeout
        self.seed = seed
        if checkpoint_dir:  # before anything trains: a state found unsavable after a commit would leave the
            ckpt.check_strategy_state(self.strategy.state_dict())  # round, history and checkpoint disagreeing
        self.checkpoint_dir = checkpoint_dir
        self.evaluate_fn = evaluate
        self.evaluate_on_workers = evaluate_on_workers
        self.eval_dataset = eval_dataset or fit.dataset
        self.round = 0
        #: the workers unreachable now (by key), and the round in which each was first found so. Only a worker
        #: that stopped answering since the last round is given ``PROBE_SECONDS`` to answer again: waiting for
        #: every dead one in every round made rounds of 10 ms take a second each while a daemon stayed down
        self.unreachable_since: dict[str, int] = {}
        self.history: list[RoundMetrics] = []
        self.resumed_from: int | None = None
        #: why ``run`` stopped before its last round (a privacy budget), if it did
        self.stopped_early: str | None = None
        #: one round at a time: a round reads ``round`` and the model when it starts and writes them when it
        #: commits, so two coroutines' rounds of one federation must run one after the other
        self._one_round_at_a_time = asyncio.Lock()
        #: the task holding that lock: an ``evaluate=`` (which runs inside a round) asking for it would wait forever
        self._round_task: asyncio.Task[Any] | None = None
        if checkpoint_dir:
            # in the default modes, as a round's own work: a strategy state loaded while another coroutine holds
            # inference mode across an await became inference tensors, and every later round failed to update them
            with default_modes():
                self._resume(checkpoint_dir)

    # --- running -------------------------------------------------------------------------------

    async def run(self, rounds: int, on_round: Callable[[RoundMetrics], Any] | None = None) -> list[RoundMetrics]:
        """Run rounds until ``rounds`` are done in total (a resumed federation continues its count);
        returns the history, one ``RoundMetrics`` per round. ``on_round`` (a function or an ``async def``)
        is called with each round's metrics. Work the strategy keeps going between rounds (FedBuff's trips)
        is stopped when it returns."""
        try:
            while (metrics := await self._round_until(rounds)) is not None:
                if on_round is not None:
                    called = on_round(metrics)
                    if inspect.isawaitable(called):  # an ``async def`` callback
                        await called
        finally:
            await self.close()
        return self.history

    async def _round_until(self, rounds: int) -> RoundMetrics | None:
        """The next round, if fewer than ``rounds`` are done and the strategy lets it run, else None: decided
        in turn with the other coroutines' rounds (a check made before waiting for another's round would run
        one round too many)."""
        async with self._in_turn():
            if self.round >= rounds:
                return None
            stop = self.strategy.stop_reason(self.round + 1, self.sampling_rate())
            if stop is not None:
                self.stopped_early = f"stopped before round {self.round + 1}: {stop}"
                log.warning("%s", self.stopped_early)  # (a run of no round at all is otherwise silent)
                return None
            return await in_default_modes(self._run_round())

    async def close(self) -> None:
        """Stop what the strategy's round protocol keeps going between rounds (FedBuff's trips in flight;
        nothing for synchronous rounds). ``run`` does it; call it after using ``run_round`` on its own, or
        use the federation as ``async with fz.Federation(...) as federation:``. It waits for a round under
        way in another coroutine (whose trips it would otherwise stop) to end first; called inside a round
        (by its ``evaluate=``), it stops them at once, as it did before rounds took turns."""
        if self._inside_round():
            await self.strategy.round_protocol().close()
            return
        async with self._in_turn():
            await self.strategy.round_protocol().close()

    def _inside_round(self) -> bool:
        """Whether this task holds the one-round lock (it is running a round, and this is its ``evaluate=``)."""
        return self._round_task is not None and self._round_task is asyncio.current_task()

    @contextlib.asynccontextmanager
    async def _in_turn(self) -> AsyncIterator[None]:
        """The one-round lock, held by this task. Asked for by the task holding it (an ``evaluate=`` running a
        round of its own federation), it would wait for itself forever: a ``RuntimeError`` says so."""
        if self._inside_round():
            raise RuntimeError("a round of this federation was asked for inside one of its rounds (its "
                               "evaluate=), which it would wait for forever")
        async with self._one_round_at_a_time:
            self._round_task = asyncio.current_task()
            try:
                yield
            finally:
                self._round_task = None

    async def __aenter__(self) -> "Federation":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def sampling_rate(self) -> float:
        """``q`` for a DP accountant: the probability with which each worker takes part in a round,
        independently of the others. That is ``fraction`` under Poisson sampling; under fixed-size sampling
        it is 1.0, because a fixed-size sample is not the Poisson sampling the accountant's amplification
        assumes: the guarantee claimed is then that of every client in every round (an upper bound)."""
        return sampling_rate(self.sampling, self.fraction)

    async def run_round(self) -> RoundMetrics:
        """One round: select, run the participants' trips, commit, record (see the module's docstring).
        It computes in torch's default modes whatever modes its caller holds (``in_default_modes``).
        Rounds of one federation run one after the other: two coroutines' ``run_round`` calls are two
        rounds, as they would be awaited in turn (not two round 1s from the same model)."""
        async with self._in_turn():
            return await in_default_modes(self._run_round())

    def _rounds_twin(self) -> nn.Module:
        """The module the rounds' remote copies are sent as (``remote_twin``), made anew when the model changed
        since it was made (a layer replaced, ``model.double()``, ``federation.model`` set): the twin of the
        model as it was would be sent, and its description would refuse the round's weights."""
        layout = twin_layout(self.model)
        if layout != self._remote_layout:
            self._remote, self._remote_layout = remote_twin(self.model), layout
        return self._remote

    async def _run_round(self) -> RoundMetrics:
        number = self.round + 1
        started = time.perf_counter()
        sent_before, received_before = self._traffic()
        selected, unreachable = await self.select(number)
        needed = max(self.min_workers, self.strategy.min_updates)
        if self.sampling == "poisson" and len(selected) < needed:
            # each worker drawn independently: a round may draw too few. It is recorded with the model as it
            # was (nothing is released, so no privacy is spent), rather than ending the run
            skipped = RoundOutcome({}, {}, commit=lambda: None, facts={
                "skipped": f"Poisson sampling drew {len(selected)} of {len(self.workers) - len(unreachable)} "
                           f"workers, fewer than the {needed} a round needs",
                "epsilon": self.history[-1].epsilon if self.history else None})
            return await self._record(number, started, sent_before, received_before, selected, unreachable, skipped)
        loop = asyncio.get_running_loop()
        context = RoundContext(number=number, participants=selected, model=self.model, strategy=self.strategy,
                               remote=self._rounds_twin(), fit=self.fit_config,
                               deadline=loop.time() + self.round_timeout, round_timeout=self.round_timeout,
                               seed=self.seed,
                               sampling_rate=self.sampling_rate(),
                               expected_participants=(self.fraction * len(self.workers)
                                                      if self.sampling == "poisson" else None))
        outcome = await self.strategy.round_protocol().run(context)
        if len(outcome.fits) < self.min_workers:
            outcome.refuse()
            raise RoundFailed(number, len(outcome.fits), self.min_workers, outcome.dropped)
        outcome.commit()
        return await self._record(number, started, sent_before, received_before, selected, unreachable, outcome)

    async def select(self, round_number: int) -> tuple[list[RemoteWorker], list[RemoteWorker]]:
        """The round's participants, and the workers left out as unreachable. A worker that stopped
        answering since the last round is given a second to answer again: a daemon that restarted takes
        part at once. One unreachable for longer is pinged without a wait (its heartbeats go on: it
        rejoins in the first round after one of them is answered)."""
        dead = [w for w in self.workers if not w.alive]
        await asyncio.gather(*(in_default_modes(self._probe(w, PROBE_SECONDS if worker_key(w) not in
                                                            self.unreachable_since else 0.0)) for w in dead))
        alive = [w for w in self.workers if w.alive]
        unreachable = [w for w in self.workers if not w.alive]
        self.unreachable_since = {worker_key(w): self.unreachable_since.get(worker_key(w), round_number)
                                  for w in unreachable}
        if self.sampling == "poisson":
            draw = random.SystemRandom()  # unpredictable: amplification by sampling needs a hidden draw
            return [w for w in alive if draw.random() < self.fraction], unreachable
        wanted = fixed_sample_size(self.fraction, len(alive), self.min_workers)
        if wanted >= len(alive):
            return alive, unreachable
        return random.Random(f"{self.seed}:{round_number}").sample(alive, wanted), unreachable

    @staticmethod
    async def _probe(worker: RemoteWorker, seconds: float) -> None:
        """Give a worker that stopped answering up to ``seconds`` to answer again. A connection judged dead
        fails requests at once until the daemon answers one of its heartbeats, so a ping alone gave a
        daemon restarted at its address no time at all: the round after the restart left it out (its
        hosted clients too). The heartbeats go on meanwhile; an answer to one revives the connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not worker.alive and loop.time() < deadline:
            await asyncio.sleep(PROBE_POLL_SECONDS)
        try:
            await worker.ping(timeout=max(deadline - loop.time(), PROBE_POLL_SECONDS))
        except Exception:  # still unreachable: the round leaves it out
            pass

    async def _record(self, number: int, started: float, sent_before: int, received_before: int,
                      selected: Sequence[RemoteWorker], unreachable: Sequence[RemoteWorker],
                      outcome: RoundOutcome) -> RoundMetrics:
        """Evaluate, record and checkpoint a round whose new model is in place."""
        self.round = number
        fits = outcome.fits
        metrics = RoundMetrics(round=number, participants=sorted(fits), dropped=dict(outcome.dropped),
                               selected=sorted(worker_key(w) for w in selected),
                               unreachable=sorted(worker_key(w) for w in unreachable), fits=fits,
                               extra=dict(outcome.facts))
        metrics.epsilon = outcome.facts.get("epsilon")
        # over the fits that told their loss (a secure daemon withholds it, NaN, when it is a function of
        # weights that leave only masked); exactly rounded (fsum): the same whatever order the fits
        # arrived in, so reruns repeat it
        told = [f for f in fits.values() if not math.isnan(f["loss"])]
        total = sum(f["num_examples"] for f in told)
        metrics.train_loss = math.fsum(f["loss"] * f["num_examples"] for f in told) / max(1, total) \
            if told else math.nan  # (none: a secure round's, or a round that drew no one)
        try:
            if self.evaluate_fn is not None:
                result = self.evaluate_fn(self.model)
                if inspect.isawaitable(result):  # an ``async def`` evaluation
                    result = await result
                metrics.eval_loss, metrics.eval_accuracy = evaluated(result, "loss"), evaluated(result, "accuracy")
            if self.evaluate_on_workers:
                await self._evaluate_on_workers(metrics, [w for w in selected if worker_key(w) in fits])
        finally:  # the new model is in place: the round is recorded and checkpointed even when its evaluation
            # on the workers was cancelled (a deadline around run_round) or failed, so that ``round``,
            # ``history`` and the checkpoint never disagree
            sent_after, received_after = self._traffic()
            metrics.bytes_sent, metrics.bytes_received = sent_after - sent_before, received_after - received_before
            metrics.seconds = time.perf_counter() - started
            metrics.transfer_mb_per_s = (metrics.bytes_sent + metrics.bytes_received) / 1e6 / max(metrics.seconds,
                                                                                                   1e-9)
            self.history.append(metrics)
            if self.checkpoint_dir:
                self._save_checkpoint()
        return metrics

    async def _evaluate_on_workers(self, metrics: RoundMetrics, workers: Sequence[RemoteWorker]) -> None:
        """The new model on the participants' own data, one trip each (the weights go with the command)."""
        from ..client.pointers import Broadcast
        from .protocols import hosted_model

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.round_timeout
        broadcast = Broadcast(self.model.state_dict())
        results: list[dict[str, Any]] = []

        async def one(worker: RemoteWorker) -> None:
            try:
                async with asyncio.timeout_at(deadline):
                    remote = await hosted_model(worker, self._remote)
                    results.append(await remote.evaluate(self.eval_dataset, loss=self.fit_config.loss, load=broadcast))
            except Exception as exc:
                metrics.extra.setdefault("eval_dropped", {})[worker_key(worker)] = reason(exc, deadline,
                                                                                         self.round_timeout)

        await asyncio.gather(*(in_default_modes(one(w)) for w in workers if w.alive))
        total = sum(r["samples"] for r in results)
        if total:
            # exactly rounded (fsum): the results arrive in any order, and reruns must repeat the numbers
            metrics.worker_eval_loss = math.fsum(r["loss"] * r["samples"] for r in results) / total
            if all(r.get("accuracy") is not None for r in results):
                metrics.worker_eval_accuracy = math.fsum(r["accuracy"] * r["samples"] for r in results) / total

    def _traffic(self) -> tuple[int, int]:
        hosts = {id(w.host): w.host for w in self.workers}.values()  # hosted clients share their host's connection
        return sum(h.bytes_sent for h in hosts), sum(h.bytes_received for h in hosts)

    # --- checkpoints ---------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        assert self.checkpoint_dir is not None
        ckpt.save(self.checkpoint_dir, ckpt.Checkpoint(
            round=self.round, model=self.model.state_dict(), strategy=self.strategy.state_dict(),
            history=[dataclasses.asdict(m) for m in self.history], strategy_name=strategy_name(self.strategy)))

    def _resume(self, directory: str) -> None:
        found = ckpt.load_latest(directory)
        if found is None:
            return
        elsewhere = "give this run its own checkpoint_dir, or remove that one"
        name = strategy_name(self.strategy)
        if found.strategy_name is not None and found.strategy_name != name:
            raise CheckpointMismatch(f"the checkpoint of round {found.round} in {directory} was written by strategy "
                                     f"{found.strategy_name}; this run's is {name} (resume with that strategy, or "
                                     f"{elsewhere})")
        try:
            self.model.load_state_dict(found.model)
        except RuntimeError as exc:  # torch's words alone did not say where the other model came from
            raise CheckpointMismatch(f"the checkpoint of round {found.round} in {directory} is of another model "
                                     f"({elsewhere}): {exc}") from None
        self.strategy.load_state_dict(found.strategy)
        self.round = found.round
        self.history = [RoundMetrics.from_dict(h) for h in found.history]
        self.resumed_from = found.round


__all__ = ["FitConfig", "Federation", "RoundFailed", "sampling_rate"]
