"""``ModulePointer``: a model on a worker, and what it does there (forward, fit, evaluate, load, get).

``FitUpdate`` is what ``fit_and_fetch`` brings back.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Mapping, Sequence, TypeVar

import torch
from torch import nn

from ..codec import Encoded, Limits
from ..errors import RemoteError, RequestTimeout, WorkerError
from ..optimizers import DEFAULT_OPTIMIZER
from .broadcast import Broadcast
from .futures import finish
from .pointers import DatasetPointer, Pointer, TensorPointer

T = TypeVar("T")

if TYPE_CHECKING:
    from .host import PointerHost
    from .transfers import StatePieces
    from .optims import RemoteOptimizer


def clients_per_trip(entries: int, combine: bool, limits: Limits | None = None) -> int:
    """How many hosted clients one fit over clients names, so that its reply stays within half of what
    one message may carry (``Limits.max_items`` values, ``max_frames`` frames): per client, its metrics
    (or its error) and, when not combined, its state of ``entries`` tensors."""
    limits = limits or Limits()
    budget = limits.max_items // 2
    if combine:  # the one weighted sum, then each client's metrics
        return max(1, (budget - 6 * entries) // 8)
    # each client's metrics and its state: a tensor is a map entry, a tag and four values, and a frame
    most = budget // (8 + 6 * entries)
    if entries:
        most = min(most, (limits.max_frames // 2) // entries)
    return max(1, most)


class ModulePointer(Pointer):
    """A model on a worker, bound to the local module it was sent from."""

    __slots__ = ("_local", "writing")

    def __init__(self, location: "PointerHost", obj_id: int, ready: asyncio.Future[Any], local: nn.Module) -> None:
        super().__init__(location, obj_id, ready)
        self._local = weakref.ref(local)
        #: held while a write of this model is sent: its entries bigger than a chunk go in pieces, then the
        #: command that loads the rest. A command on the model sent by the coroutine methods here waits for
        #: it (``settled``), so it sees all of that write or none of it, as the same code run in order does.
        #: (``remote(x)`` returns its pointer at once, and so does not wait.)
        self.writing = asyncio.Lock()

    async def settled(self) -> None:
        """Wait until no write of this model is being sent (``writing``); the caller's next command,
        sent without awaiting anything else, comes after all of it."""
        async with self.writing:
            pass

    @property
    def local(self) -> nn.Module | None:
        return self._local()

    def __call__(self, *args: Any, **kwargs: Any) -> TensorPointer:
        """Run forward on the worker; returns a pointer to the output at once."""
        return self.location.call_module(self, list(args), kwargs)

    forward = __call__

    async def get(self, timeout: float | None = None) -> nn.Module:
        """Copy the remote parameters and buffers into the local module, in place, and return it. Cancelled
        once a piece has landed, it finishes first: the local model is never left part old, part new."""
        module = self._local()
        if module is None:
            raise ReferenceError("the local module this pointer was sent from no longer exists")
        async with self.location.module_turn(module):  # no send of the model to this worker reads it meanwhile
            return await self._land_remote_state(module, timeout)

    async def _land_remote_state(self, module: nn.Module, timeout: float | None) -> nn.Module:
        """``get``'s work, in its turn: the remote entries copied into ``module``'s tensors as they arrive."""
        # each piece lands straight in the local tensor (no second copy of the model), written through a
        # detached view: no grad mode is needed, and none may be held across the awaits of this loop
        local = {name: tensor.detach() for name, tensor in module.state_dict(keep_vars=True).items()}
        pieces = self.location.module_slices(self, timeout)

        def land(piece: tuple[str, int, torch.Tensor]) -> None:
            name, start, values = piece
            local[name].view(-1)[start:start + values.numel()].copy_(values)

        async def land_the_rest() -> None:
            async with contextlib.aclosing(pieces):
                async for piece in pieces:
                    land(piece)

        try:  # the read is asked for in this coroutine's own step, so it comes before what it sends next
            first = await anext(pieces, None)
        except BaseException:
            await pieces.aclose()
            raise
        if first is not None:
            land(first)
            await finish(asyncio.ensure_future(land_the_rest()))
        return module

    async def fit(self, dataset: "DatasetPointer | str", *, loss: str = "cross_entropy",
                  optimizer: "dict[str, Any] | RemoteOptimizer | None" = None, epochs: int | None = None,
                  steps: int | None = None, batch_size: int = 32, prox_mu: float = 0.0, seed: int = 0,
                  load: "Mapping[str, torch.Tensor] | Broadcast | None" = None,
                  timeout: float | None = None) -> dict[str, Any]:
        """Train on the worker's dataset, entirely there: E epochs (default 1) or S steps of minibatches.

        ``optimizer`` is ``{"cls": "SGD", "lr": 0.1, ...}`` (a fresh one for this call; the default is
        ``fedzmq.optimizers.DEFAULT_OPTIMIZER``, SGD with lr 0.1) or a ``RemoteOptimizer`` of this worker over
        this model (its state persists across calls). ``prox_mu`` adds FedProx's proximal term. ``load``
        (a state dict, or a ``Broadcast`` of one) is loaded into the remote model first, in the same trip.
        ``seed`` repeats a run's shuffle on this daemon; the daemon mixes it with its own secret, so it
        cannot choose which rows share a batch. Returns ``{"loss", "samples_seen", "num_examples",
        "steps", "seconds"}``."""
        args, wrote = await self._fit_args(dataset, loss, optimizer, epochs, steps, batch_size, prox_mu, seed, load,
                                           timeout)
        return await self._after_write(self.location.request("fit", args, timeout), wrote)

    async def fit_and_fetch(self, dataset: "DatasetPointer | str", *, loss: str = "cross_entropy",
                            optimizer: "dict[str, Any] | RemoteOptimizer | None" = None, epochs: int | None = None,
                            steps: int | None = None, batch_size: int = 32, prox_mu: float = 0.0, seed: int = 0,
                            load: "Mapping[str, torch.Tensor] | Broadcast | None" = None,
                            timeout: float | None = None) -> "FitUpdate":
        """``fit``, with the trained weights coming back in the same trip (one request and one reply per
        worker for a federated round of a small model; big entries follow as streams). Returns a
        ``FitUpdate``: the metrics, and the trained state as pieces to fold or copy as they arrive."""
        args, wrote = await self._fit_args(dataset, loss, optimizer, epochs, steps, batch_size, prox_mu, seed, load,
                                           timeout)
        args["reply_state"] = True
        reply = await self._after_write(self.location.request_state("fit", args, self.id, timeout), wrote)
        if not isinstance(reply, dict) or not isinstance(reply.get("metrics"), dict):
            from ..errors import ProtocolError
            raise ProtocolError(f"the worker answered a fit with {type(reply).__name__}, not metrics and a state")
        return FitUpdate(reply["metrics"], self.location.state_pieces(self, reply.get("state") or {}, timeout))

    async def fit_clients(self, clients: "Sequence[str]", dataset: str, *, combine: bool,
                          load: "Mapping[str, torch.Tensor] | Broadcast", timeout: float | None = None,
                          **fit: Any) -> dict[str, Any]:
        """A round for many of the logical clients this model's daemon hosts, in one trip: each client
        starts from ``load``, trains on its own ``dataset``, and the reply carries ``metrics`` (by client)
        and either ``weighted_sum`` and ``weight`` (``combine``: ``sum(n_i * x_i)`` in float64 and
        ``sum(n_i)``, what a weighted mean needs) or ``states`` (each client's trained state); entries past the
        piece size this client reads are ``StreamInfo``, read with ``state_pieces`` of this pointer. ``fit``
        takes ``fit``'s keyword arguments (a fresh optimizer per client). More clients than one reply
        can carry within the connection's limits (``clients_per_trip``) raise ``ValueError`` before
        anything is sent: a federated round splits them into trips itself."""
        known = ("loss", "optimizer", "epochs", "steps", "batch_size", "prox_mu", "seed")
        if set(fit) - set(known):  # (checked before anything is sent, as the others below)
            raise TypeError(f"fit_clients() got unexpected arguments {sorted(set(fit) - set(known))}")
        local = self._local()
        if local is None:  # its entries size the reply: without them the trip could be too big to decode
            raise ReferenceError("the local module this pointer was sent from no longer exists")
        entries = len(local.state_dict())
        most = clients_per_trip(entries, combine, self.location.limits)
        if len(clients) > most:
            each = "their combined update" if combine else f"a state of {entries} entries each"
            raise ValueError(f"fit_clients: {len(clients)} clients are more than one reply can carry within the "
                             f"connection's limits ({most}, with {each}); split them into calls of at most {most}")
        args, wrote = await self._fit_args(dataset, fit.pop("loss", "cross_entropy"), fit.pop("optimizer", None),
                                           fit.pop("epochs", None), fit.pop("steps", None), fit.pop("batch_size", 32),
                                           fit.pop("prox_mu", 0.0), fit.pop("seed", 0), load, timeout)
        args.update(clients=list(clients), combine=combine, reply_state=True)
        reply = await self._after_write(self.location.request_state("fit", args, self.id, timeout), wrote)
        if not isinstance(reply, dict) or not isinstance(reply.get("metrics"), dict):
            from ..errors import ProtocolError
            raise ProtocolError(f"the worker answered a fit over clients with {type(reply).__name__}")
        return reply

    async def load(self, state: "Mapping[str, torch.Tensor] | Broadcast", timeout: float | None = None) -> None:
        """Load weights into the remote model in place (some or all of its entries), as ``load_state_dict``
        does: a name the model does not have, or an entry of another dtype or shape, raises the worker's
        ``BadRequest``, and then nothing is loaded."""
        outcome = await self.start_load(state, timeout)
        try:
            await outcome
        except asyncio.CancelledError:  # (its outcome task may be cancelled before it ran, and not see it)
            if isinstance(state, Broadcast) and not (outcome.done() and not outcome.cancelled()):
                self.location.discard(self)  # its uncopied entries may yet be read changed: see _after_write
            raise

    async def start_load(self, state: "Mapping[str, torch.Tensor] | Broadcast",
                         timeout: float | None = None) -> "asyncio.Task[None]":
        """``load``, pipelined: big entries are streamed first, then the load is sent and a task for its
        outcome returned at once (awaiting it raises the load's refusal), so that the next command can
        follow without a round trip. The inline entries of a plain ``state`` are copied as the load is sent (as
        an op's arguments are), so the caller may change them once this returns: sent as they were, ZeroMQ
        read them later, and a daemon loaded what they had become, even a mixture of their bytes. A
        ``Broadcast`` is sent as it is (encoded once for many workers): keep it unchanged until the outcome."""
        broadcast = state if isinstance(state, Broadcast) else Broadcast(state)
        split = await self.location.stream_into(self, broadcast, timeout)
        loaded = self.location.submit("module_load", {"obj": self.id, "state": split.inline},
                                      copy=not isinstance(state, Broadcast))

        async def outcome() -> None:  # the reply's wait made in the task: one cancelled before it ran leaves none
            await self._after_write(self.location.wait_reply(loaded, timeout), bool(split.streamed),
                                    uncopied=isinstance(state, Broadcast))

        return asyncio.ensure_future(outcome())

    async def _after_write(self, request: "Awaitable[T]", wrote: bool, uncopied: bool = False) -> T:
        """The outcome of the command that ends a write (a load, or a fit or evaluation that loads first):
        refused after big entries were written in pieces, it leaves the model part old, part new (the small
        entries it carried not loaded), and the model is discarded (``Transfers.discard``). ``uncopied``: the
        request's inline entries left without a copy (a ``Broadcast``'s, a send's): cancelled, the caller
        goes on and may change them while ZeroMQ still reads them (local training after a deadline), so the
        model, which would load them part old, part new, is discarded too."""
        try:
            return await request
        except asyncio.CancelledError:
            if uncopied:
                self.location.discard(self)
            raise
        except RequestTimeout:  # sent: the worker runs it whole, answered or not
            raise
        except (RemoteError, WorkerError):  # refused, or the connection went before the answer
            if wrote:
                self.location.discard(self)
            raise

    async def _fit_args(self, dataset: "DatasetPointer | str", loss: str,
                        optimizer: "dict[str, Any] | RemoteOptimizer | None", epochs: int | None, steps: int | None,
                        batch_size: int, prox_mu: float, seed: int,
                        load: "Mapping[str, torch.Tensor] | Broadcast | None",
                        timeout: float | None) -> tuple[dict[str, Any], bool]:
        """A fit's arguments, and whether a load among them was written in pieces first."""
        args: dict[str, Any] = {"module": self.id, "dataset": _dataset_name(self.location, dataset), "loss": loss,
                                "batch_size": batch_size, "seed": seed}
        if steps is not None:
            args["steps"] = steps
        else:
            args["epochs"] = 1 if epochs is None else epochs
        if prox_mu:
            args["prox_mu"] = float(prox_mu)
        if optimizer is None or isinstance(optimizer, dict):
            args["optimizer"] = dict(optimizer or DEFAULT_OPTIMIZER)
        else:
            if optimizer.worker is not self.location:
                from ..errors import WrongWorkerError
                raise WrongWorkerError(f"that optimizer lives on {optimizer.worker.id!r}, the model on "
                                       f"{self.location.id!r}")
            args["optim"] = await optimizer.remote_id()
        if load is not None:  # (last: the caller sends the fit without awaiting anything in between)
            split = await self.location.stream_into(self, load if isinstance(load, Broadcast) else Broadcast(load),
                                                    timeout)
            args["load"] = _inline_taken(load, split)
            return args, bool(split.streamed)
        await self.settled()
        return args, False

    async def evaluate(self, dataset: "DatasetPointer | str", *, loss: str = "cross_entropy",
                       batch_size: int = 1024, load: "Mapping[str, torch.Tensor] | Broadcast | None" = None,
                       timeout: float | None = None) -> dict[str, Any]:
        """Loss and accuracy on the worker's dataset: ``{"loss", "accuracy", "samples", "seconds"}``.
        ``load`` (a state dict, or a ``Broadcast``) is loaded into the remote model first, in the same trip."""
        args: dict[str, Any] = {"module": self.id, "loss": loss, "batch_size": batch_size,
                                "dataset": _dataset_name(self.location, dataset)}
        wrote = False
        if load is None:
            await self.settled()
        else:
            split = await self.location.stream_into(self, load if isinstance(load, Broadcast) else Broadcast(load),
                                                    timeout)
            args["load"], wrote = _inline_taken(load, split), bool(split.streamed)
        return await self._after_write(self.location.request("evaluate", args, timeout), wrote)

    async def train(self, mode: bool = True) -> None:
        await self.location.request("module_mode", {"obj": self.id, "train": mode})

    async def eval_mode(self) -> None:
        """Put the remote module in evaluation mode: ``train(False)``."""
        await self.train(False)

    eval = eval_mode  # the name nn.Module uses for it


@dataclass
class FitUpdate:
    """What ``ModulePointer.fit_and_fetch`` brings back: the fit's metrics, and the trained state as
    ``(name, first element, flat values)`` pieces, fetched as they are iterated (iterate it once)."""

    metrics: dict[str, Any]
    #: iterate it once; close it (``aclose``, or ``contextlib.aclosing``) to give up what is left unread
    pieces: "StatePieces"


def _inline_taken(load: "Mapping[str, torch.Tensor] | Broadcast", split: Broadcast) -> Encoded:
    """The inline entries of a fit's or an evaluation's ``load``: a plain state's copied now, as an op's
    arguments are (they left uncopied, and a caller that reused its buffers after a cancellation had the
    worker load a mixture); a ``Broadcast``'s as they are (encoded once for many workers)."""
    if isinstance(load, Broadcast):
        return split.inline
    return Encoded({name: tensor.clone() for name, tensor in split.state.items() if name not in split.streamed})


def _dataset_name(worker: "PointerHost", dataset: "DatasetPointer | str") -> str:
    if isinstance(dataset, DatasetPointer):
        if dataset.location is not worker:
            from ..errors import WrongWorkerError
            raise WrongWorkerError(f"dataset {dataset.name!r} lives on {dataset.location.id!r}, "
                                   f"the model on {worker.id!r}")
        return dataset.name
    return str(dataset)
