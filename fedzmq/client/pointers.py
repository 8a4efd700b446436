"""Pointers: small local objects that stand for values held by a worker (like Ray's ``ObjectRef``).

A pointer owns an id and a location, nothing else. Operations on pointers send a command naming the
result's id and return the new pointer at once, without waiting (pipelining); ``await ptr`` waits until
the value exists and raises the remote error if its command failed. A pointer that is garbage
collected asks its worker to delete the value (batched with others).

Here: the base ``Pointer``, ``TensorPointer`` and ``DatasetPointer``; ``ModulePointer`` and ``FitUpdate``
are in ``fedzmq.client.module_pointer``, ``Broadcast`` in ``fedzmq.client.broadcast`` (all importable from here).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Generator

import torch

from ..codec import DTYPES
from ..errors import ShapeUnknown, WorkerError
from ..ops import METHODS, OPERATORS
from .broadcast import Broadcast
from .futures import retrieve_error
from .meta import Meta, TensorMeta, known

if TYPE_CHECKING:
    from .host import PointerHost
    from .worker import RemoteWorker

__all__ = ["Broadcast", "DatasetPointer", "FitUpdate", "ModulePointer", "Pointer", "TensorPointer"]


class Pointer:
    """Base of all pointers: an object id in ``location``'s session, and the future of its creation.
    What a pointer does goes through ``location``'s pointer interface (``fedzmq.client.host.PointerHost``)."""

    __slots__ = ("location", "id", "_ready", "_deleted", "__weakref__")

    def __init__(self, location: "PointerHost", obj_id: int, ready: asyncio.Future[Any]) -> None:
        self.location = location
        self.id = obj_id
        self._ready = ready
        self._deleted = False
        location.register_pointer(self)  # so that the worker's errors can name this pointer

    def __await__(self) -> Generator[Any, None, Any]:
        # shielded: the creation's future is the pointer's, shared by every awaiter and by later awaits;
        # cancelling one awaiter (a timeout) must not cancel it for the others
        yield from self.location.wait_reply(asyncio.shield(self._ready)).__await__()
        return self

    async def delete(self) -> None:
        """Delete the value on the worker now (otherwise it goes when the pointer is collected)."""
        if not self._deleted:
            self._deleted = True
            await self.location.request("delete", {"objs": [self.id]})

    def __del__(self) -> None:
        if not self._deleted:
            self.location.release(self.id)

    @property
    def deleted(self) -> bool:
        """True once the value is gone from the worker's session: ``delete`` was called, or the worker
        dropped it itself (``mark_deleted``)."""
        return self._deleted

    def mark_deleted(self) -> None:
        """Record that the worker dropped the value itself (a model it was sent for adopted it): nothing is
        deleted, now or when this pointer is collected."""
        self._deleted = True

    def describe(self) -> str:
        """How errors name this pointer (where the worker says ``object 3``): ``<TensorPointer 3 on 'bob'>``."""
        return f"<{type(self).__name__} {self.id} on {self.location.id!r}>"

    def __repr__(self) -> str:
        ready = self._ready
        state = "pending" if not ready.done() else "failed" if ready.cancelled() or ready.exception() else "ready"
        return f"{self.describe()[:-1]} ({state})>"


class TensorPointer(Pointer):
    """A tensor on a worker. Supports the allowlisted operators and methods of ``fedzmq.ops``.

    ``shape``, ``dtype``, ``ndim``, ``size()`` and ``dim()`` answer without a round trip when the client
    knows them: for a value it sent, a dataset's tensors, a gradient (its leaf's), and what ops compute
    from those (worked out locally on torch's meta device, see ``fedzmq.client.meta``). Otherwise (a
    model's output) they raise ``ShapeUnknown``; ``await ptr.info()`` asks the worker once."""

    __slots__ = ("_meta",)

    def __init__(self, location: "PointerHost", obj_id: int, ready: asyncio.Future[Any], meta: Meta = None) -> None:
        super().__init__(location, obj_id, ready)
        self._meta: Meta = meta

    async def get(self, timeout: float | None = None) -> torch.Tensor:
        """Copy the tensor here. The remote value stays (the seed's ``get`` moved it; we keep both;
        ``move`` is the seed's way)."""
        return await self.location.fetch_tensor(self.id, timeout, made_by=self._ready)

    # --- what the client knows of it ---------------------------------------------------------

    @property
    def meta(self) -> Meta:
        """What the client knows of the value's shape and dtype, as it stands, without working anything out:
        a ``TensorMeta``, a pending op it can be worked out from, or None (``fedzmq.client.meta``). An op's
        or a gradient's pointer starts from its inputs' (``shape`` and ``dtype`` are the way to read it)."""
        return self._meta

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
        result = await self.location.request("info", {"obj": self.id}, timeout)
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
        A pointer already on ``destination`` is returned as it is. Cancelled before the destination has the
        value, the move leaves it on the source; once the destination has it, the move completes: the
        source's delete is sent, before anything sent after the move, but not awaited (a cancellation while
        awaiting it dropped the new pointer, and with it the destination's copy)."""
        if destination is self.location:
            return self
        moved = await destination.send(await self.get(timeout), timeout)
        if not self._deleted:
            self._deleted = True
            with contextlib.suppress(WorkerError):  # (the source is gone: its copy went with its session)
                self.location.submit("delete", {"objs": [self.id]}).add_done_callback(retrieve_error)
        return moved

    async def backward(self, gradient: "torch.Tensor | TensorPointer | None" = None) -> None:
        args: dict[str, Any] = {"obj": self.id}
        if gradient is not None:
            args["grad"] = gradient
        await self.location.request("backward", args)  # awaited: the gradient's bytes are sent by then

    @property
    def grad(self) -> "TensorPointer":
        """A pointer to this leaf's gradient on the worker, as it is now (a snapshot: later backward
        passes do not change it): ``await ptr.grad.get()``. Refused like any value whose data the
        owner does not release (a gradient of private data is private)."""
        return self.location.grad_of(self)

    def __getitem__(self, index: Any) -> "TensorPointer":
        return self.location.run_op("getitem", [self, index], {})

    def __bool__(self) -> bool:
        raise TypeError("a TensorPointer has no truth value here; use `await ptr.get()` to bring the value back")

    def __iter__(self) -> Any:
        raise TypeError("a TensorPointer cannot be iterated; index it (ptr[i]) or get() it")

    __hash__ = object.__hash__


def _operator(op: str, swapped: bool) -> Any:
    def method(self: TensorPointer, other: Any = None) -> Any:
        if op in ("neg", "abs"):
            return self.location.run_op(op, [self], {})
        return self.location.run_op(op, [other, self] if swapped else [self, other], {})

    method.__name__ = f"__{op}__"
    return method


def _method(op: str) -> Any:
    def method(self: TensorPointer, *args: Any, **kwargs: Any) -> Any:
        return self.location.run_op(op, [self, *args], kwargs)

    method.__name__ = op
    method.__doc__ = f"Remote ``{op}`` (see fedzmq.ops.OPS); returns a pointer at once."
    return method


for _dunder, (_op, _swapped) in OPERATORS.items():
    setattr(TensorPointer, _dunder, _operator(_op, _swapped))
for _name in METHODS:
    if not hasattr(TensorPointer, _name):
        setattr(TensorPointer, _name, _method(_name))


class DatasetPointer:
    """A dataset the worker's owner loaded at start-up: its name and shape, never its values."""

    __slots__ = ("location", "name", "info")

    def __init__(self, location: "PointerHost", info: dict[str, Any]) -> None:
        self.location = location
        self.name: str = info["name"]
        self.info = info

    async def features(self) -> TensorPointer:
        """A pointer to the features, for computing on the worker; ``get`` of it (or of anything but an
        aggregate computed from it) is refused with ``PermissionDenied``."""
        return await self.location.dataset_tensor(self.name, "features", self._meta("feature"))

    async def labels(self) -> TensorPointer:
        return await self.location.dataset_tensor(self.name, "labels", self._meta("label"))

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


# re-exported from their old home; they build on the pointers above, so they are imported after them
from .module_pointer import FitUpdate, ModulePointer  # noqa: E402
