"""Pointers: small local objects that stand for values held by a worker (like Ray's ``ObjectRef``).

A pointer owns an id and a location, nothing else. Operations on pointers send a command naming the
result's id and return the new pointer at once, without waiting (pipelining); ``await ptr`` waits until
the value exists and raises the remote error if its command failed. A pointer that is garbage
collected asks its worker to delete the value (batched with others).
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Generator, Mapping, Sequence

import torch
from torch import nn

from ..codec import DTYPES, Encoded
from ..errors import ShapeUnknown
from ..ops import METHODS, OPERATORS
from ..optimizers import DEFAULT_OPTIMIZER
from .meta import Meta, TensorMeta, known

if TYPE_CHECKING:
    from .optims import RemoteOptimizer
    from .worker import RemoteWorker


class Pointer:
    """Base of all pointers: an object id in ``location``'s session, and the future of its creation."""

    __slots__ = ("location", "id", "_ready", "_deleted", "__weakref__")

    def __init__(self, location: "RemoteWorker", obj_id: int, ready: asyncio.Future[Any]) -> None:
        self.location = location
        self.id = obj_id
        self._ready = ready
        self._deleted = False
        location._pointers[obj_id] = self  # so that the worker's errors can name this pointer

    def __await__(self) -> Generator[Any, None, Any]:
        yield from self.location._wait(self._ready).__await__()
        return self

    async def delete(self) -> None:
        """Delete the value on the worker now (otherwise it goes when the pointer is collected)."""
        if not self._deleted:
            self._deleted = True
            await self.location._request("delete", {"objs": [self.id]})

    def __del__(self) -> None:
        if not self._deleted:
            self.location._release(self.id)

    def describe(self) -> str:
        """How errors name this pointer (where the worker says ``object 3``): ``<TensorPointer 3 on 'bob'>``."""
        return f"<{type(self).__name__} {self.id} on {self.location.id!r}>"

    def __repr__(self) -> str:
        state = "pending" if not self._ready.done() else ("failed" if self._ready.exception() else "ready")
        return f"{self.describe()[:-1]} ({state})>"


class TensorPointer(Pointer):
    """A tensor on a worker. Supports the allowlisted operators and methods of ``fedzmq.ops``.

    ``shape``, ``dtype``, ``ndim``, ``size()`` and ``dim()`` answer without a round trip when the client
    knows them: for a value it sent, a dataset's tensors, a gradient (its leaf's), and what ops compute
    from those (worked out locally on torch's meta device, see ``fedzmq.client.meta``). Otherwise (a
    model's output) they raise ``ShapeUnknown``; ``await ptr.info()`` asks the worker once."""

    __slots__ = ("_meta",)

    def __init__(self, location: "RemoteWorker", obj_id: int, ready: asyncio.Future[Any], meta: Meta = None) -> None:
        super().__init__(location, obj_id, ready)
        self._meta: Meta = meta

    async def get(self, timeout: float | None = None) -> torch.Tensor:
        """Copy the tensor here. The remote value stays (the seed's ``get`` moved it; we keep both;
        ``move`` is the seed's way)."""
        return await self.location._get_tensor(self.id, timeout)

    # --- what the client knows of it ---------------------------------------------------------

    def _known(self) -> TensorMeta:
        meta = known(self._meta)
        if meta is None:
            raise ShapeUnknown(f"the shape and dtype of {self.describe()} are not known here (a model's forward "
                               "or an op the client cannot work out made it); `await ptr.info()` asks the worker "
                               "once, and the pointer remembers")
        if meta is not self._meta:
            self._meta = meta  # worked out: the op's inputs can go
        return meta

    @property
    def shape(self) -> torch.Size:
        """The remote tensor's shape, without a round trip (``ShapeUnknown`` if the client cannot know it)."""
        return self._known().shape

    @property
    def dtype(self) -> torch.dtype:
        """The remote tensor's dtype, without a round trip (``ShapeUnknown`` if the client cannot know it)."""
        return self._known().dtype

    @property
    def ndim(self) -> int:
        return len(self._known().shape)

    def dim(self) -> int:
        return len(self._known().shape)

    def size(self, dim: int | None = None) -> "torch.Size | int":
        """``shape``, or ``shape[dim]``, as ``torch.Tensor.size``."""
        shape = self._known().shape
        return shape if dim is None else shape[dim]

    async def info(self, timeout: float | None = None) -> dict[str, Any]:
        """Ask the worker: ``{"shape", "dtype", "requires_grad", "nbytes"}`` (never values, and never
        refused: shapes do not depend on data). The pointer remembers the shape and dtype."""
        result = await self.location._request("info", {"obj": self.id}, timeout)
        self._meta = TensorMeta(torch.Size(result["shape"]), DTYPES[result["dtype"]])
        return result

    def describe(self) -> str:
        known_meta = self._meta if isinstance(self._meta, TensorMeta) else None
        text = super().describe()
        return text if known_meta is None else f"{text[:-1]}: {known_meta}>"

    # --- moving it -----------------------------------------------------------------------------

    async def move(self, destination: "RemoteWorker", timeout: float | None = None) -> "TensorPointer":
        """Send the value to ``destination`` and delete it here, as the seed's ``ptr.move(worker)``:
        returns the pointer on ``destination`` (this one is then deleted). The value passes through this
        client, as ``get`` then ``send``, so the source's daemon decides whether it may leave: data it does
        not release raises ``PermissionDenied`` and stays where it is. ``requires_grad`` travels with it.
        A pointer already on ``destination`` is returned as it is."""
        if destination is self.location:
            return self
        moved = await destination.send(await self.get(timeout), timeout)
        await self.delete()
        return moved

    async def backward(self, gradient: "torch.Tensor | TensorPointer | None" = None) -> None:
        args: dict[str, Any] = {"obj": self.id}
        if gradient is not None:
            args["grad"] = gradient
        await self.location._request("backward", args)  # awaited: the gradient's bytes are sent by then

    @property
    def grad(self) -> "TensorPointer":
        """A pointer to this leaf's gradient on the worker, as it is now (a snapshot: later backward
        passes do not change it): ``await ptr.grad.get()``. Refused like any value whose data the
        owner does not release (a gradient of private data is private)."""
        return self.location._grad(self)

    def __getitem__(self, index: Any) -> "TensorPointer":
        return self.location._op("getitem", [self, index], {})

    def __bool__(self) -> bool:
        raise TypeError("a TensorPointer has no truth value here; use `await ptr.get()` to bring the value back")

    def __iter__(self) -> Any:
        raise TypeError("a TensorPointer cannot be iterated; index it (ptr[i]) or get() it")

    __hash__ = object.__hash__


def _operator(op: str, swapped: bool) -> Any:
    def method(self: TensorPointer, other: Any = None) -> Any:
        if op in ("neg", "abs"):
            return self.location._op(op, [self], {})
        return self.location._op(op, [other, self] if swapped else [self, other], {})

    method.__name__ = f"__{op}__"
    return method


def _method(op: str) -> Any:
    def method(self: TensorPointer, *args: Any, **kwargs: Any) -> Any:
        return self.location._op(op, [self, *args], kwargs)

    method.__name__ = op
    method.__doc__ = f"Remote ``{op}`` (see fedzmq.ops.OPS); returns a pointer at once."
    return method


for _dunder, (_op, _swapped) in OPERATORS.items():
    setattr(TensorPointer, _dunder, _operator(_op, _swapped))
for _name in METHODS:
    if not hasattr(TensorPointer, _name):
        setattr(TensorPointer, _name, _method(_name))


class ModulePointer(Pointer):
    """A model on a worker, bound to the local module it was sent from."""

    __slots__ = ("_local",)

    def __init__(self, location: "RemoteWorker", obj_id: int, ready: asyncio.Future[Any], local: nn.Module) -> None:
        super().__init__(location, obj_id, ready)
        self._local = weakref.ref(local)

    @property
    def local(self) -> nn.Module | None:
        return self._local()

    def __call__(self, *args: Any, **kwargs: Any) -> TensorPointer:
        """Run forward on the worker; returns a pointer to the output at once."""
        return self.location._module_call(self, list(args), kwargs)

    forward = __call__

    async def get(self, timeout: float | None = None) -> nn.Module:
        """Copy the remote parameters and buffers into the local module, in place, and return it."""
        module = self._local()
        if module is None:
            raise ReferenceError("the local module this pointer was sent from no longer exists")
        # each piece lands straight in the local tensor (no second copy of the model), written through a
        # detached view: no grad mode is needed, and none may be held across the awaits of this loop
        local = {name: tensor.detach() for name, tensor in module.state_dict(keep_vars=True).items()}
        async for name, start, values in self.location._module_slices(self, timeout):
            local[name].view(-1)[start:start + values.numel()].copy_(values)
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
        args = await self._fit_args(dataset, loss, optimizer, epochs, steps, batch_size, prox_mu, seed, load, timeout)
        return await self.location._request("fit", args, timeout)

    async def fit_and_fetch(self, dataset: "DatasetPointer | str", *, loss: str = "cross_entropy",
                            optimizer: "dict[str, Any] | RemoteOptimizer | None" = None, epochs: int | None = None,
                            steps: int | None = None, batch_size: int = 32, prox_mu: float = 0.0, seed: int = 0,
                            load: "Mapping[str, torch.Tensor] | Broadcast | None" = None,
                            timeout: float | None = None) -> "FitUpdate":
        """``fit``, with the trained weights coming back in the same trip (one request and one reply per
        worker for a federated round of a small model; big entries follow as streams). Returns a
        ``FitUpdate``: the metrics, and the trained state as pieces to fold or copy as they arrive."""
        args = await self._fit_args(dataset, loss, optimizer, epochs, steps, batch_size, prox_mu, seed, load, timeout)
        args["reply_state"] = True
        reply = await self.location._request("fit", args, timeout)
        if not isinstance(reply, dict) or not isinstance(reply.get("metrics"), dict):
            from ..errors import ProtocolError
            raise ProtocolError(f"the worker answered a fit with {type(reply).__name__}, not metrics and a state")
        return FitUpdate(reply["metrics"], self.location._state_pieces(self, reply.get("state") or {}, timeout))

    async def fit_clients(self, clients: "Sequence[str]", dataset: str, *, combine: bool,
                          load: "Mapping[str, torch.Tensor] | Broadcast", timeout: float | None = None,
                          **fit: Any) -> dict[str, Any]:
        """A round for many of the logical clients this model's daemon hosts, in one trip: each client
        starts from ``load``, trains on its own ``dataset``, and the reply carries ``metrics`` (by client)
        and either ``sum`` and ``weight`` (``combine``: ``sum(n_i * (x_i - load))`` in float64 and
        ``sum(n_i)``, what a weighted mean needs) or ``states`` (each client's trained state). ``fit``
        takes ``fit``'s keyword arguments (a fresh optimizer per client)."""
        args = await self._fit_args(dataset, fit.pop("loss", "cross_entropy"), fit.pop("optimizer", None),
                                    fit.pop("epochs", None), fit.pop("steps", None), fit.pop("batch_size", 32),
                                    fit.pop("prox_mu", 0.0), fit.pop("seed", 0), load, timeout)
        if fit:
            raise TypeError(f"fit_clients() got unexpected arguments {sorted(fit)}")
        args.update(clients=list(clients), combine=combine, reply_state=True)
        reply = await self.location._request("fit", args, timeout)
        if not isinstance(reply, dict) or not isinstance(reply.get("metrics"), dict):
            from ..errors import ProtocolError
            raise ProtocolError(f"the worker answered a fit over clients with {type(reply).__name__}")
        return reply

    async def load(self, state: "Mapping[str, torch.Tensor] | Broadcast",
                   timeout: float | None = None) -> "asyncio.Future[Any]":
        """Load weights into the remote model in place, pipelined: big entries are streamed first, then the
        load is sent and its future returned at once, so the next command can follow it without a round
        trip (``await`` the future for the load's own outcome)."""
        broadcast = state if isinstance(state, Broadcast) else Broadcast(state)
        inline = await self.location._stream_into(self, broadcast, timeout)
        return self.location._submit("module_load", {"obj": self.id, "state": inline})

    async def _fit_args(self, dataset: "DatasetPointer | str", loss: str,
                        optimizer: "dict[str, Any] | RemoteOptimizer | None", epochs: int | None, steps: int | None,
                        batch_size: int, prox_mu: float, seed: int,
                        load: "Mapping[str, torch.Tensor] | Broadcast | None", timeout: float | None) -> dict[str, Any]:
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
            args["optim"] = await optimizer._ensure()
        if load is not None:
            broadcast = load if isinstance(load, Broadcast) else Broadcast(load)
            args["load"] = await self.location._stream_into(self, broadcast, timeout)
        return args

    async def evaluate(self, dataset: "DatasetPointer | str", *, loss: str = "cross_entropy",
                       batch_size: int = 1024, load: "Mapping[str, torch.Tensor] | Broadcast | None" = None,
                       timeout: float | None = None) -> dict[str, Any]:
        """Loss and accuracy on the worker's dataset: ``{"loss", "accuracy", "samples", "seconds"}``.
        ``load`` (a state dict, or a ``Broadcast``) is loaded into the remote model first, in the same trip."""
        args: dict[str, Any] = {"module": self.id, "loss": loss, "batch_size": batch_size,
                                "dataset": _dataset_name(self.location, dataset)}
        if load is not None:
            broadcast = load if isinstance(load, Broadcast) else Broadcast(load)
            args["load"] = await self.location._stream_into(self, broadcast, timeout)
        return await self.location._request("evaluate", args, timeout)

    async def train(self, mode: bool = True) -> None:
        await self.location._request("module_mode", {"obj": self.id, "train": mode})

    async def eval_mode(self) -> None:
        """Put the remote module in evaluation mode: ``train(False)``."""
        await self.train(False)

    eval = eval_mode  # the name nn.Module uses for it


class Broadcast:
    """A model state to load into many workers' copies of a model (a federated round's global weights),
    encoded once: the entries that fit one message travel inline, their msgpack and frames shared by
    every send; bigger ones are streamed to each worker before its fit. Its tensors' memory is sent
    without copying, so the state must not change until the round's sends are done."""

    __slots__ = ("state", "chunk_bytes", "inline", "streamed")

    def __init__(self, state: Mapping[str, torch.Tensor], chunk_bytes: int = 128 << 20) -> None:
        self.state = {name: tensor.detach() for name, tensor in state.items()}
        self.chunk_bytes = chunk_bytes
        inline, budget = {}, chunk_bytes
        for name, tensor in self.state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes <= budget and tensor.is_contiguous():
                inline[name] = tensor
                budget -= nbytes
        self.streamed = {k: v for k, v in self.state.items() if k not in inline}
        self.inline = Encoded(inline)

    def for_chunk(self, chunk_bytes: int) -> "Broadcast":
        """This broadcast split for a worker whose messages are at most ``chunk_bytes`` (the same one when
        it agrees)."""
        return self if chunk_bytes == self.chunk_bytes else Broadcast(self.state, chunk_bytes)


@dataclass
class FitUpdate:
    """What ``ModulePointer.fit_and_fetch`` brings back: the fit's metrics, and the trained state as
    ``(name, first element, flat values)`` pieces, fetched as they are iterated (iterate it once)."""

    metrics: dict[str, Any]
    pieces: AsyncIterator[tuple[str, int, torch.Tensor]]


class DatasetPointer:
    """A dataset the worker's owner loaded at start-up: its name and shape, never its values."""

    __slots__ = ("location", "name", "info")

    def __init__(self, location: "RemoteWorker", info: dict[str, Any]) -> None:
        self.location = location
        self.name: str = info["name"]
        self.info = info

    async def features(self) -> TensorPointer:
        """A pointer to the features, for computing on the worker; ``get`` of it (or of anything but an
        aggregate computed from it) is refused with ``PermissionDenied``."""
        return await self.location._dataset_tensor(self.name, "features", self._meta("feature"))

    async def labels(self) -> TensorPointer:
        return await self.location._dataset_tensor(self.name, "labels", self._meta("label"))

    def _meta(self, part: str) -> TensorMeta | None:
        """A part's shape and dtype from the dataset's description (None if the worker did not give them)."""
        shape, dtype = self.info.get(f"{part}_shape"), DTYPES.get(str(self.info.get(f"{part}_dtype")))
        if not isinstance(shape, list) or dtype is None:
            return None
        return TensorMeta(torch.Size([self.samples, *shape]), dtype)

    def __getitem__(self, index: Any) -> Any:
        raise TypeError("index the features pointer instead: (await ds.features())[i]")

    @property
    def samples(self) -> int:
        return int(self.info["samples"])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.info["feature_shape"])

    @property
    def num_classes(self) -> int | None:
        return self.info.get("num_classes")

    @property
    def tags(self) -> list[str]:
        return list(self.info.get("tags", []))

    @property
    def description(self) -> str:
        return self.info.get("description", "")

    def __repr__(self) -> str:
        return (f"<DatasetPointer {self.name!r} on {self.location.id!r}: {self.samples} samples of "
                f"{list(self.feature_shape)}, classes={self.num_classes}, tags={self.tags}>")


def _dataset_name(worker: "RemoteWorker", dataset: "DatasetPointer | str") -> str:
    if isinstance(dataset, DatasetPointer):
        if dataset.location is not worker:
            from ..errors import WrongWorkerError
            raise WrongWorkerError(f"dataset {dataset.name!r} lives on {dataset.location.id!r}, "
                                   f"the model on {worker.id!r}")
        return dataset.name
    return str(dataset)
