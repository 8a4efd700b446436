"""What pointers ask of their worker: ops, gradients, forward calls, dataset tensors, and batched deletes.

``PointerOps`` is a base class of ``RemoteWorker`` (as ``Transfers`` is); it uses the worker's
``submit``/``wait_reply`` (requests), ``new_id`` (object ids), ``_to_ref`` (references), ``_connection``
and ``_loop``. Each method sends its command and returns the result's pointer at once (pipelining).
Its public methods are part of the pointers' interface (``fedzmq.client.host.PointerHost``), not for
normal code.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable, cast

from ..ops import output_count
from .connection import Connection
from .meta import Meta, TensorMeta, op_outputs
from .module_pointer import ModulePointer
from .pointers import TensorPointer
from .futures import retrieve_error as _retrieve

if TYPE_CHECKING:
    from .worker import RemoteWorker

#: remote deletes of collected pointers are batched: sent after this many seconds or this many ids
RELEASE_DELAY = 0.02
RELEASE_BATCH = 256


class PointerOps:
    """The commands behind pointer operations, as a base class of ``RemoteWorker``: kept apart from the
    worker's lifecycle and requests so each reads in one sitting."""

    _connection: Connection
    _loop: asyncio.AbstractEventLoop | None
    _released: list[int]
    _closed: bool
    client: str | None

    @property
    def _session_ended(self) -> bool:
        """Whether this handle's session on the daemon is over: its connection closed, or it is a hosted
        client's and was closed. A closed handle of the daemon itself (``connect_clients`` closes it as its
        clients take the connection over) keeps a session as long as the connection: rounds send their
        model there, and its releases must still go out (six federations left six models behind)."""
        return self._connection.closed or (self._closed and self.client is not None)

    def submit(self, cmd: str, args: dict[str, Any], copy: bool = False, fusable: bool = False) -> asyncio.Future[Any]:
        raise NotImplementedError

    async def wait_reply(self, future: asyncio.Future[Any], timeout: float | None = None) -> Any:
        raise NotImplementedError

    def new_id(self) -> int:
        raise NotImplementedError

    def _to_ref(self, value: Any) -> Any:
        raise NotImplementedError

    def _as_worker(self) -> "RemoteWorker":
        """This object as the RemoteWorker it is a base of (pointers name their worker)."""
        return cast("RemoteWorker", self)

    async def dataset_tensor(self, name: str, part: str, meta: TensorMeta | None = None) -> TensorPointer:
        """A pointer to dataset ``name``'s ``part`` (``"features"`` or ``"labels"``), once the worker made it."""
        out = self.new_id()
        ready = self.submit("dataset_tensor", {"dataset": name, "part": part, "out": out})
        pointer = TensorPointer(self._as_worker(), out, ready, meta)
        await self.wait_reply(ready)
        return pointer

    def run_op(self, op: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Send op ``op`` (``fedzmq.ops``); its output's pointer (a tuple for several), returned at once."""
        out = [self.new_id() for _ in range(output_count(op, args, kwargs))]
        # one output: a ``get`` of it in this pass of the event loop may join the op (``fetch_with``)
        ready = self.submit("op", {"op": op, "args": args, "kwargs": kwargs, "out": out}, copy=True,
                            fusable=len(out) == 1)
        ready.add_done_callback(_retrieve)
        metas = op_outputs(op, args, kwargs, len(out), TensorPointer, _meta_of)
        pointers = tuple(TensorPointer(self._as_worker(), obj_id, ready, meta) for obj_id, meta in zip(out, metas))
        return pointers if len(pointers) > 1 else pointers[0]

    def grad_of(self, pointer: TensorPointer) -> TensorPointer:
        """A pointer to the gradient of the leaf ``pointer`` stands for, as it is now, returned at once."""
        out = self.new_id()
        ready = self.submit("grad", {"obj": self._to_ref(pointer).id, "out": out})
        ready.add_done_callback(_retrieve)
        return TensorPointer(self._as_worker(), out, ready, pointer.meta)  # a gradient has its leaf's shape and dtype

    def call_module(self, module: ModulePointer, args: list[Any], kwargs: dict[str, Any]) -> TensorPointer:
        """Run the remote model's forward; its output's pointer, returned at once."""
        out = self.new_id()
        ready = self.submit("module_call", {"obj": module.id, "args": args, "kwargs": kwargs, "out": [out]},
                            copy=True)
        ready.add_done_callback(_retrieve)
        return TensorPointer(self._as_worker(), out, ready)

    def release(self, obj_id: int) -> None:
        """Called from ``Pointer.__del__``: queue a remote delete. Deletes go out in batches, every
        ``RELEASE_DELAY`` seconds or ``RELEASE_BATCH`` ids, never one message per collected pointer.
        (Order is safe: a pointer is collected only after every command naming it was sent.)"""
        if self._session_ended or self._loop is None or self._loop.is_closed():
            return
        self._released.append(obj_id)
        if len(self._released) >= RELEASE_BATCH:
            self._schedule(self._flush_released)
        elif len(self._released) == 1:
            self._schedule(lambda: self._loop.call_later(RELEASE_DELAY, self._flush_released))  # type: ignore

    def _schedule(self, callback: Callable[[], Any]) -> None:
        assert self._loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        try:
            if running is self._loop:
                self._loop.call_soon(callback)
            else:  # collected on another thread
                self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop closed while we were collected
            pass

    def _flush_released(self) -> None:
        ids, self._released = self._released, []
        if not ids or self._session_ended or not self._connection.alive:
            return
        self.submit("delete", {"objs": ids}).add_done_callback(_retrieve)  # in this (logical client's) session


def _meta_of(pointer: TensorPointer) -> Meta:
    return pointer.meta
