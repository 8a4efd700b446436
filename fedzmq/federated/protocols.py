"""Round protocols: how one round's participants train and hand back their updates.

The federation selects the participants, records the round and checkpoints; a round protocol runs the
participants' trips; the strategy only aggregates (Flower separates its strategies from its workflows
the same way). Three protocols:

- ``AveragingRound``: every participant at once, one trip each: the global weights go out with the fit
  (encoded once, their frames shared by every send) and the trained weights come back in its reply;
  the updates are received concurrently and folded as they arrive.
- ``CyclicRound``: the seed's mode, the model visiting the participants in turn.
- ``SecureRound`` (``fedzmq.federated.secure``): secure aggregation's five steps.

A protocol never changes the model: it returns a ``RoundOutcome`` whose ``commit()`` writes the new
global model, which the federation calls only when enough updates arrived.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..client.module_pointer import clients_per_trip
from ..client.pointers import Broadcast, ModulePointer
from ..client.transfers import StatePieces
from ..client.worker import RemoteWorker
from ..errors import ObjectNotFound, ProtocolError, RemoteError, RequestTimeout
from ..optimizers import DEFAULT_OPTIMIZER, OPTIMIZERS
from ..torchmodes import in_default_modes
from .base import Aggregator, Strategy, UpdateReceiver

#: a fit's metrics, as a fit over many hosted clients lists them for each (``fedzmq.worker.training.METRICS``)
FIT_METRICS = ("loss", "samples_seen", "num_examples", "steps", "seconds")

#: pieces of an update with more elements than this are folded on a thread of their own, off the event
#: loop (the loop keeps receiving the other workers' replies meanwhile). Smaller ones fold on the loop:
#: ZeroMQ's I/O thread keeps receiving while they do, and on a machine whose cores the daemons share the
#: hop to a thread and back cost more than it freed (10^6-parameter rounds, A/B in one run: 12.4 against
#: 11.6 ms at N = 2, 33.5 against 29.4 ms at N = 8; 10^7 the same either way; docs/profile.md)
FOLD_INLINE_NUMEL = 1 << 21


@dataclass(frozen=True)
class FitConfig:
    """What every participant's local training does (the strategy may add to it, e.g. FedProx's mu).

    ``optimizer``: the local optimizer and its hyper-parameters (``fedzmq.optimizers.OPTIMIZERS``);
    the default is ``DEFAULT_OPTIMIZER``, SGD with learning rate 0.1, the same as ``ModulePointer.fit``
    and ``fedzmq train``."""

    dataset: str
    loss: str = "cross_entropy"
    optimizer: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_OPTIMIZER))
    #: local epochs per round; one when neither this nor ``steps`` is given
    epochs: int | None = None
    #: local optimizer steps per round, instead of epochs
    steps: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        """Checked here, where the mistake is made, not at the first round on every worker."""
        if self.epochs is not None and self.steps is not None:
            raise ValueError("FitConfig takes epochs or steps, not both")
        for name, least in (("epochs", 1), ("steps", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if value is not None:  # numpy's integers are ints here too; the wire gets Python's
                if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
                    raise ValueError(f"FitConfig {name} must be an int >= {least}, got {value!r}")
                object.__setattr__(self, name, int(value))
        hyper = dict(self.optimizer)
        cls = hyper.pop("cls", None)
        if cls not in OPTIMIZERS:
            raise ValueError(f"FitConfig optimizer {cls!r} is not one a worker makes: {', '.join(OPTIMIZERS)}")
        unknown = set(hyper) - OPTIMIZERS[cls][1]
        if unknown:
            raise ValueError(f"FitConfig optimizer: {cls} does not take {sorted(unknown)} "
                             f"(allowed: {sorted(OPTIMIZERS[cls][1])})")


@dataclass
class RoundContext:
    """What a protocol needs to run one round."""

    number: int
    participants: Sequence[RemoteWorker]
    model: nn.Module
    strategy: Strategy
    fit: FitConfig
    #: the round's deadline, in the event loop's clock
    deadline: float
    round_timeout: float
    seed: int
    #: the probability ``q`` with which each client took part, independently of the others (Poisson
    #: sampling, ``Federation(sampling="poisson")``), for a DP accountant's amplification by sampling;
    #: 1.0 when the selection was not Poisson (no amplification may be claimed then)
    sampling_rate: float = 1.0
    #: ``q`` times the number of clients: Poisson sampling's expected participants (None otherwise).
    #: DP rounds divide their noised sum by it (McMahan et al. 2018's fixed-denominator estimator), so the
    #: model depends on the clients' data only through that sum, not through how many took part
    expected_participants: float | None = None
    #: what the round's remote copies of the model are sent as (``remote_twin``): None for ``model`` itself
    remote: nn.Module | None = None

    @property
    def remote_model(self) -> nn.Module:
        """The module whose remote copy on each worker the round trains (``hosted_model``)."""
        return self.remote if self.remote is not None else self.model

    def fit_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of every participant's fit this round (the strategy's extras included)."""
        extra = self.strategy.configure_fit(self.number)
        return {"loss": self.fit.loss, "optimizer": dict(self.fit.optimizer), "epochs": self.fit.epochs,
                "steps": self.fit.steps, "batch_size": self.fit.batch_size,
                "prox_mu": float(extra.get("prox_mu", 0.0)),
                # the same seed for every participant: each daemon mixes it with its own secret
                "seed": self.seed * 100_003 + self.number}

    def why_left_out(self, exc: BaseException) -> str:
        """One line saying why a worker was left out of this round."""
        return reason(exc, self.deadline, self.round_timeout)


@dataclass
class RoundOutcome:
    """Who delivered (with their fit metrics), who was left out and why, facts of the protocol, and how
    to write the round's new global model into the federation's model."""

    fits: dict[str, dict[str, Any]]
    dropped: dict[str, str]
    commit: Callable[[], None]
    facts: dict[str, Any] = field(default_factory=dict)
    #: called instead of ``commit`` when the federation refuses the round (too few updates), so a protocol
    #: that keeps work going between rounds (FedBuff) does not build on a model that was never committed
    refuse: Callable[[], None] = lambda: None


class RoundProtocol(abc.ABC):
    @abc.abstractmethod
    async def run(self, context: RoundContext) -> RoundOutcome:
        """Run the participants' trips; never change ``context.model`` (``RoundOutcome.commit`` does)."""

    async def close(self) -> None:
        """Stop work the protocol keeps going between rounds (FedBuff's trips). Default: there is none."""


def reason(exc: BaseException, deadline: float, round_timeout: float) -> str:
    """Why a worker was left out: the round's deadline only when it passed (a request's own timeout is
    not the deadline), else the error's type and first line (``WorkerDeadError: ... silent for 2.0s``)."""
    if isinstance(exc, TimeoutError) and not isinstance(exc, RequestTimeout):
        if asyncio.get_running_loop().time() >= deadline:
            return f"missed the round deadline of {round_timeout:g}s"
    if isinstance(exc, RemoteError):
        message, name = exc.remote_message, exc.remote_type
    else:
        message, name = str(exc), type(exc).__name__
    first = message.splitlines()[0][:200] if message else ""
    return f"{name}: {first}" if first else name


def remote_twin(model: nn.Module) -> nn.Module:
    """Another module object over the same memory as ``model``'s parameters and buffers (no copy of them): a
    federation sends its rounds' remote copies as this, so they are not the copy a user's own
    ``worker.send(model)`` loads and returns. A round's fit leaves a worker's locally trained weights in its
    remote copy; had the user's pointer been that copy, a ``get`` or an ``evaluate`` after the user's send
    could see them (a ``get`` even wrote them into the global model). Its parameters are other ``Parameter``
    objects (over the same storage), so a remote optimizer of ``model``'s parameters, which finds its model
    by them, still finds the user's copy and not the rounds'.

    Each submodule is copied shallowly, not deep-copied: a model holding something no deep copy takes (a
    lock, a file) is a model a send takes, and its other attributes (a big tensor that is no buffer) are
    shared, not copied. Tied parameters and shared submodules stay tied and shared."""
    params = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    return _twin_of(model, params, {})


def _twin_of(module: nn.Module, params: dict[int, nn.Parameter], made: dict[int, nn.Module]) -> nn.Module:
    """``module``'s twin (see ``remote_twin``), made once per module object (``made``)."""
    if id(module) in made:
        return made[id(module)]
    twin = object.__new__(type(module))  # (not ``copy.copy``: a parametrized module refuses to be pickled)
    vars(twin).update(vars(module))
    made[id(module)] = twin
    vars(twin)["_parameters"] = {n: None if p is None else params[id(p)] for n, p in module._parameters.items()}
    vars(twin)["_buffers"] = dict(module._buffers)
    vars(twin)["_modules"] = {n: None if c is None else _twin_of(c, params, made) for n, c in module._modules.items()}
    return twin


def twin_layout(model: nn.Module) -> list[tuple[Any, ...]]:
    """What a remote twin was made over: each submodule, and its parameters' and buffers' objects, memory,
    dtype and ``requires_grad``. It changes when the user replaces a layer or a parameter, or converts the
    model (``model.double()`` gives its parameters new memory); a load (``load_state_dict``) or a round's
    commit, which write in place, leave it as it was."""
    return [(name, id(m), [(n, id(p), p.data_ptr(), p.dtype, p.requires_grad) for n, p in m._parameters.items()
                           if p is not None],
             [(n, id(b)) for n, b in m._buffers.items() if b is not None])
            for name, m in model.named_modules(remove_duplicate=False)]


def worker_key(worker: RemoteWorker) -> str:
    return worker.id or worker.address


async def hosted_model(worker: RemoteWorker, model: nn.Module) -> ModulePointer:
    """The worker's copy of ``model``, sent now if it has none (first round, or its session was reset:
    the connection's heartbeats tell, no ping needed). The round's weights go with the fit either way."""
    return worker.hosted(model) or await worker.send(model)


async def fit_trip(worker: RemoteWorker, model: nn.Module, broadcast: Broadcast, fit: Mapping[str, Any],
                   dataset: str, receive: Callable[[int], UpdateReceiver], fold: "Folder") -> dict[str, Any]:
    """One participant's round trip: the weights and the fit out, the trained weights back, folded into
    the round's aggregate as they arrive. Returns the fit's metrics."""
    for attempt in (1, 2):
        pointer = await hosted_model(worker, model)
        try:
            update = await pointer.fit_and_fetch(dataset, load=broadcast, **fit)
            break
        except ObjectNotFound:  # the daemon restarted between two heartbeats: send the model again
            if attempt == 2:
                raise
            worker.forget(model)
    try:
        receiver = receive(int(update.metrics["num_examples"]))
    except BaseException:  # (refused before any piece is read: a strategy's held-bytes limit, say)
        await update.pieces.aclose()  # the daemon keeps nothing for what will not be read
        raise
    await fold_update(receiver, update.pieces, fold)
    return update.metrics


async def fold_update(receiver: UpdateReceiver, pieces: StatePieces, fold: "Folder") -> None:
    """Fold one update's pieces into ``receiver`` and end it; on a failure abort it (what is left unread of
    the pieces is given up, so the daemon keeps nothing for it)."""
    try:
        async with contextlib.aclosing(pieces) as entries:
            async for name, start, values in entries:
                await fold(receiver, name, start, values)
        receiver.end()
    except BaseException:
        receiver.abort()
        raise


class Folder:
    """Folds pieces of updates into a round's aggregate: small ones on the event loop, big ones on a
    thread of the event loop's default executor, one at a time (two pieces never fold into the same sum
    at once). The executor's threads outlive the round: a thread started and joined per round cost more
    than the fold of a 10^6-parameter update on a loaded machine."""

    def __init__(self) -> None:
        self._one_at_a_time = asyncio.Lock()
        self._running: asyncio.Future[None] | None = None

    async def __call__(self, receiver: UpdateReceiver, name: str, start: int, values: torch.Tensor) -> None:
        async with self._one_at_a_time:  # (a small piece of an entry may come while a big one folds)
            if values.numel() <= FOLD_INLINE_NUMEL:
                receiver.add_slice(name, start, values)
                return
            running = self._running = asyncio.get_running_loop().run_in_executor(None, receiver.add_slice, name,
                                                                                   start, values)
            try:
                await asyncio.shield(running)
            finally:  # a fold cannot be stopped: a cancelled caller still waits for it to finish
                if not running.done():
                    await asyncio.wait([running])

    async def close(self) -> None:
        """Wait for a fold still running on its thread (its caller was cancelled twice): after this the
        aggregate is not being written to."""
        if self._running is not None and not self._running.done():
            await asyncio.wait([self._running])


class AveragingRound(RoundProtocol):
    """Every participant trains at once; one trip each; updates folded concurrently as they arrive.

    Participants that are logical clients of one daemon (``fz.connect_clients``) go in one trip for all
    of them (a few, when one reply could not carry them all: ``clients_per_trip``): the daemon trains
    each in turn and, when the strategy needs only the weighted sum of the updates, combines them there,
    exactly (``Aggregator.receive_sum``), so a round of a thousand simulated clients is a few messages."""

    async def run(self, context: RoundContext) -> RoundOutcome:
        state = context.model.state_dict()
        aggregator = context.strategy.begin_round(context.number, state)
        broadcast = Broadcast(state)  # encoded once for every send (the model does not change this round)
        fit, fits, dropped = context.fit_kwargs(), {}, {}
        fold = Folder()

        async def one(worker: RemoteWorker) -> None:
            try:
                async with asyncio.timeout_at(context.deadline):
                    fits[worker_key(worker)] = await fit_trip(worker, context.remote_model, broadcast, fit,
                                                              context.fit.dataset, aggregator.receive, fold)
            except Exception as exc:  # one worker's failure only removes it from this round
                dropped[worker_key(worker)] = context.why_left_out(exc)

        async def hosted_clients(host: RemoteWorker, clients: list[RemoteWorker]) -> None:
            try:
                async with asyncio.timeout_at(context.deadline):
                    await clients_trip(host, clients, context.remote_model, broadcast, fit, context.fit.dataset,
                                       aggregator, fold, fits, dropped)
            except Exception as exc:  # its clients not settled yet (earlier trips' stand) are left out
                why = context.why_left_out(exc)
                dropped.update({key: why for key in map(worker_key, clients) if key not in fits and key not in dropped})

        singles, groups = group_by_host(context.participants)
        try:
            # each a task of its own: in the default modes, as the round is (``Federation.run_round``)
            await asyncio.gather(*(in_default_modes(one(w)) for w in singles),
                                 *(in_default_modes(hosted_clients(host, clients)) for host, clients in groups))
        finally:
            await fold.close()
        return RoundOutcome(fits, dropped, commit=lambda: aggregator.write_result(context.model.state_dict()))


def group_by_host(workers: Sequence[RemoteWorker]
                  ) -> tuple[list[RemoteWorker], list[tuple[RemoteWorker, list[RemoteWorker]]]]:
    """Workers on their own, and logical clients grouped by the daemon hosting them (two or more)."""
    by_host: dict[int, list[RemoteWorker]] = {}
    for worker in workers:
        if worker.client is not None:
            by_host.setdefault(id(worker.host), []).append(worker)
    groups = [(clients[0].host, clients) for clients in by_host.values() if len(clients) > 1]
    grouped = {id(w) for _, clients in groups for w in clients}
    return [w for w in workers if id(w) not in grouped], groups


async def clients_trip(host: RemoteWorker, clients: Sequence[RemoteWorker], model: nn.Module, broadcast: Broadcast,
                       fit: Mapping[str, Any], dataset: str, aggregator: Aggregator, fold: "Folder",
                       fits: dict[str, dict[str, Any]], dropped: dict[str, str]) -> None:
    """Trips for many clients of one daemon, as many per trip as a reply can carry within the limits the
    connection agreed on (``clients_per_trip``: 3,000 clients in one reply of their metrics were more
    values than a message may hold), one after the other (the daemon trains them in turn anyway)."""
    for client in [c for c in clients if c.closed]:  # (its own commands would be refused: the host's must not
        # train it in their stead)
        dropped[worker_key(client)] = f"WorkerClosedError: hosted client {client.client!r} was closed"
    clients = [c for c in clients if not c.closed]
    per_trip = clients_per_trip(len(broadcast.state), aggregator.accepts_sums, host.limits)
    for start in range(0, len(clients), per_trip):
        await _clients_group_trip(host, clients[start:start + per_trip], model, broadcast, fit, dataset, aggregator,
                                  fold, fits, dropped)


async def _clients_group_trip(host: RemoteWorker, clients: Sequence[RemoteWorker], model: nn.Module,
                              broadcast: Broadcast, fit: Mapping[str, Any], dataset: str, aggregator: Aggregator,
                              fold: "Folder", fits: dict[str, dict[str, Any]], dropped: dict[str, str]) -> None:
    """One trip for many clients of one daemon: their updates combined there when the aggregator takes
    sums, else each brought back and received on its own. Each client's fit metrics go in ``fits``,
    a client whose fit failed (with why) in ``dropped``."""
    combine = aggregator.accepts_sums
    for attempt in (1, 2):
        pointer = await hosted_model(host, model)
        try:
            reply = await pointer.fit_clients([w.client for w in clients if w.client is not None], dataset,
                                              combine=combine, load=broadcast, **fit)
            break
        except ObjectNotFound:
            if attempt == 2:
                raise
            host.forget(model)
    metrics: dict[str, Any] = reply["metrics"]
    failed = {c: m["error"] for c, m in metrics.items() if isinstance(m, dict)}
    trained = {c: dict(zip(FIT_METRICS, m)) for c, m in metrics.items() if not isinstance(m, dict)}
    by_client = {w.client: w for w in clients}
    for client, error in failed.items():
        if client in by_client:
            dropped[worker_key(by_client[client])] = f"{error.get('type')}: {error.get('message', '')}"[:200]
    pieces = [host.state_pieces(pointer, state) for state in _reply_states(reply, combine)]
    try:  # every state's pieces made first: those a failure leaves unread are given up, so the daemon keeps none
        await _fold_clients(reply, pieces, trained, by_client, aggregator, fold, fits)
    finally:
        for state_pieces in pieces:
            await state_pieces.aclose()


def _reply_states(reply: dict[str, Any], combine: bool) -> list[Any]:
    """The states a fit over hosted clients sent back: its weighted sum, or each client's state."""
    if combine:
        return [reply["weighted_sum"]] if "weighted_sum" in reply else []
    states = reply.get("states")
    return states if isinstance(states, list) else []


async def _fold_clients(reply: dict[str, Any], pieces: list[StatePieces], trained: dict[str, dict[str, Any]],
                        by_client: dict[str | None, RemoteWorker], aggregator: Aggregator, fold: "Folder",
                        fits: dict[str, dict[str, Any]]) -> None:
    """Receive and fold the states of a fit over hosted clients (``pieces``, in the reply's order)."""
    combine = aggregator.accepts_sums
    if combine:
        if trained and "weighted_sum" not in reply:
            raise ProtocolError("a daemon combined its clients' updates without 'weighted_sum' (sum(n_i * x_i)): "
                                "is it another version of fedzmq?")
        receivers = [(aggregator.receive_sum(int(reply["weight"]), len(trained)), pieces[0],
                      list(trained))] if trained else []
    else:
        states = reply.get("states")
        if not isinstance(states, list) or len(states) != len(trained):
            raise ProtocolError(f"a daemon trained {len(trained)} clients and sent back "
                                f"{len(states) if isinstance(states, list) else 'no list of'} states")
        receivers = [(aggregator.receive(int(fit_metrics["num_examples"])), state_pieces, [client])
                     for (client, fit_metrics), state_pieces in zip(trained.items(), pieces)]
    for receiver, state_pieces, delivered in receivers:
        await fold_update(receiver, state_pieces, fold)
        # recorded as soon as folded: a later receiver's failure must not call these dropped
        for client in delivered:
            if client in by_client:
                fits[worker_key(by_client[client])] = trained[client]


class CyclicRound(RoundProtocol):
    """The seed's mode: the model visits the participants in turn, each starting from the previous one's
    result; the round's model is the last one's."""

    async def run(self, context: RoundContext) -> RoundOutcome:
        aggregator = context.strategy.begin_round(context.number, context.model.state_dict())
        fit, fits, dropped = context.fit_kwargs(), {}, {}
        fold = Folder()
        try:
            for worker in context.participants:
                try:
                    async with asyncio.timeout_at(context.deadline):
                        broadcast = Broadcast(aggregator.current_model())  # type: ignore[attr-defined]
                        fits[worker_key(worker)] = await fit_trip(worker, context.remote_model, broadcast, fit,
                                                                  context.fit.dataset, aggregator.receive, fold)
                except Exception as exc:
                    dropped[worker_key(worker)] = context.why_left_out(exc)
        finally:
            await fold.close()
        return RoundOutcome(fits, dropped, commit=lambda: aggregator.write_result(context.model.state_dict()))


__all__ = ["AveragingRound", "FitConfig", "Folder", "RoundContext", "RoundOutcome", "RoundProtocol",
           "CyclicRound", "fit_trip", "hosted_model", "reason", "remote_twin", "twin_layout", "worker_key"]
