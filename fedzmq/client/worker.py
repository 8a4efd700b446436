"""``RemoteWorker``: the coordinator's handle on one worker daemon; ``VirtualWorker``: one in-process.

Both speak the same protocol over ZeroMQ (tcp for daemons, inproc for virtual workers), so a test
against a ``VirtualWorker`` runs the same daemon code as production.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
import weakref
from typing import Any, AsyncIterator, Callable, Generator

import torch
import zmq.asyncio
from torch import nn

from ..codec import DTYPE_NAMES, DTYPES, Ref, StreamInfo, tensor_buffer
from ..errors import WorkerError, WrongWorkerError
from ..security import KeyPath
from ..modeldesc import ModelRegistry, describe
from ..ops import output_count
from ..worker import Worker, WorkerConfig
from ..worker.datasets import Dataset
from .connection import Connection, ConnectionSettings
from .pointers import DatasetPointer, ModulePointer, Pointer, TensorPointer

#: chunks of a streamed tensor in flight at once (flow control: the window of unacknowledged writes)
STREAM_WINDOW = 4
#: remote deletes of collected pointers are batched: sent after this many seconds or this many ids
RELEASE_DELAY = 0.02
RELEASE_BATCH = 256


class RemoteWorker:
    """A session with one worker. Make one with ``await fz.connect(address)``."""

    def __init__(self, address: str, *, settings: ConnectionSettings | None = None,
                 context: zmq.asyncio.Context | None = None, server_key: KeyPath | bytes | None = None,
                 client_key: KeyPath | None = None) -> None:
        self.address = address
        self.id: str | None = None
        self.instance: str | None = None
        self._connection = Connection(address, settings, context, encode_default=self._to_ref,
                                      server_key=server_key, client_key=client_key)
        self._object_ids = itertools.count(1)
        self._released: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._modules: weakref.WeakKeyDictionary[nn.Module, ModulePointer] = weakref.WeakKeyDictionary()

    # --- lifecycle -----------------------------------------------------------------------------

    async def connect(self) -> "RemoteWorker":
        """Wait until the worker answers, and learn its id."""
        info = await self._request("ping", {}, timeout=self._connection.settings.connect_timeout)
        self.id, self.instance = info["id"], info["instance"]
        self._connection.adopt_worker_limits(info.get("limits") or {})
        return self

    async def close(self) -> None:
        """End the session: the worker frees everything this client made there."""
        self._released.clear()
        await self._connection.close()

    async def __aenter__(self) -> "RemoteWorker":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def alive(self) -> bool:
        """False once the worker missed too many heartbeats (it turns True again if it answers)."""
        return self._connection.alive

    @property
    def bytes_sent(self) -> int:
        return self._connection.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._connection.bytes_received

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} at {self.address}>"

    # --- public API ----------------------------------------------------------------------------

    async def ping(self, timeout: float | None = 10.0) -> dict[str, Any]:
        return await self._request("ping", {}, timeout)

    async def status(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """Id, version, sessions, objects and bytes held, uptime and counters of the worker."""
        return await self._request("status", {}, timeout)

    async def datasets(self, timeout: float | None = 30.0) -> list[DatasetPointer]:
        """The datasets this worker's owner made available (names, sizes, shapes; never values)."""
        return [DatasetPointer(self, info) for info in await self._request("datasets", {}, timeout)]

    async def search(self, query: str, timeout: float | None = 30.0) -> list[DatasetPointer]:
        """Datasets whose name, tags or description contain ``query`` (case-insensitive)."""
        return [DatasetPointer(self, info) for info in await self._request("datasets", {"query": query}, timeout)]

    async def _dataset_tensor(self, name: str, part: str) -> TensorPointer:
        out = self._new_id()
        ready = self._submit("dataset_tensor", {"dataset": name, "part": part, "out": out})
        pointer = TensorPointer(self, out, ready)
        await self._wait(ready)
        return pointer

    async def refresh(self, timeout: float | None = 10.0) -> bool:
        """Ping the worker; if it restarted since we last saw it, forget what we had sent to the old one.

        Returns True when it restarted. Used by the scheduler to re-send models to a worker that
        came back after a crash."""
        info = await self._request("ping", {}, timeout)
        restarted = self.instance is not None and info["instance"] != self.instance
        if restarted:
            self._modules = weakref.WeakKeyDictionary()
            self._released.clear()
        self.id, self.instance = info["id"], info["instance"]
        return restarted

    async def send(self, obj: torch.Tensor | nn.Module, timeout: float | None = None) -> Any:
        """Send a tensor (-> ``TensorPointer``) or a model (-> ``ModulePointer``) to this worker.

        Sending a model that was sent here before updates the remote copy in place, so remote
        optimizers created over it stay bound to it."""
        if isinstance(obj, TensorPointer):  # a move: the value comes here, then goes there
            if obj.location is self:
                return obj
            return await self._send_tensor(await obj.get(timeout), timeout)
        if isinstance(obj, torch.Tensor):
            return await self._send_tensor(obj, timeout)
        if isinstance(obj, nn.Module):
            return await self._send_module(obj, timeout)
        raise TypeError(f"can send a torch.Tensor or an nn.Module, not {type(obj).__name__}")

    # --- internals used by pointers ------------------------------------------------------------

    def _before_request(self) -> None:
        """Hook for subclasses that must start something before the first request."""

    def _submit(self, cmd: str, args: dict[str, Any]) -> asyncio.Future[Any]:
        self._before_request()
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._connection.submit(cmd, args)

    async def _request(self, cmd: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        return await self._connection.wait(self._submit(cmd, args), timeout)

    async def _wait(self, future: asyncio.Future[Any], timeout: float | None = None) -> Any:
        return await self._connection.wait(future, timeout)

    def _to_ref(self, value: Any) -> Any:
        """Encoder hook: pointers become references, after checking they live here."""
        if isinstance(value, Pointer):
            if value.location is not self:
                raise WrongWorkerError(
                    f"{value!r} lives on {value.location.id!r}, but this operation runs on {self.id!r}; "
                    f"move the value first (await ptr.get(), then send it)")
            if value._deleted:
                raise ValueError(f"{value!r} was deleted")
            return Ref(value.id)
        if isinstance(value, nn.Module):
            raise TypeError("pass a ModulePointer (await worker.send(model)), not a local module")
        return value

    def _new_id(self) -> int:
        return next(self._object_ids)

    def _op(self, op: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        out = [self._new_id() for _ in range(output_count(op, args, kwargs))]
        ready = self._submit("op", {"op": op, "args": args, "kwargs": kwargs, "out": out})
        ready.add_done_callback(_retrieve)
        pointers = tuple(TensorPointer(self, obj_id, ready) for obj_id in out)
        return pointers if len(pointers) > 1 else pointers[0]

    def _module_call(self, module: ModulePointer, args: list[Any], kwargs: dict[str, Any]) -> TensorPointer:
        out = self._new_id()
        ready = self._submit("module_call", {"obj": module.id, "args": args, "kwargs": kwargs, "out": [out]})
        ready.add_done_callback(_retrieve)
        return TensorPointer(self, out, ready)

    def _release(self, obj_id: int) -> None:
        """Called from ``Pointer.__del__``: queue a remote delete. Deletes go out in batches, every
        ``RELEASE_DELAY`` seconds or ``RELEASE_BATCH`` ids, never one message per collected pointer.
        (Order is safe: a pointer is collected only after every command naming it was sent.)"""
        if self._connection.closed or self._loop is None or self._loop.is_closed():
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
        if not ids or self._connection.closed or not self._connection.alive:
            return
        self._connection.submit("delete", {"objs": ids}).add_done_callback(_retrieve)

    # --- streams: big values move in chunks, a bounded window of them in flight ----------------

    async def _upload(self, data: torch.Tensor, request: Callable[[int, torch.Tensor], tuple[str, dict[str, Any]]],
                      timeout: float | None, first: asyncio.Future[Any] | None = None) -> None:
        """Send ``data`` (flat bytes) in chunks, ``request(offset, chunk)`` naming each command, with at most
        ``STREAM_WINDOW`` unanswered: neither side holds more than the object plus the chunks in flight."""
        chunk = self._connection.limits.chunk_bytes
        window: list[asyncio.Future[Any]] = [first] if first is not None else []
        try:
            for offset in range(0, data.numel(), chunk):
                window.append(self._submit(*request(offset, data[offset:offset + chunk])))
                if len(window) >= STREAM_WINDOW:
                    await self._wait(window.pop(0), timeout)
                    self._connection.note_progress()
            for future in window:
                await self._wait(future, timeout)
        finally:
            for future in window:
                future.add_done_callback(_retrieve)

    async def _download(self, nbytes: int, request: Callable[[int, int], tuple[str, dict[str, Any]]],
                        land: Callable[[int, torch.Tensor], None], timeout: float | None) -> None:
        """Fetch ``nbytes`` in chunks (``request(offset, length)``), handing each to ``land(offset, bytes)``
        as it arrives, with at most ``STREAM_WINDOW`` in flight."""
        chunk = self._connection.limits.chunk_bytes
        window: list[tuple[int, asyncio.Future[Any]]] = []
        try:
            for offset in range(0, nbytes, chunk):
                window.append((offset, self._submit(*request(offset, min(chunk, nbytes - offset)))))
                if len(window) >= STREAM_WINDOW:
                    start, future = window.pop(0)
                    land(start, await self._wait(future, timeout))
            for start, future in window:
                land(start, await self._wait(future, timeout))
        finally:
            for _, future in window:
                future.add_done_callback(_retrieve)

    # --- tensors -------------------------------------------------------------------------------

    async def _send_tensor(self, tensor: torch.Tensor, timeout: float | None) -> TensorPointer:
        obj_id = self._new_id()
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes <= self._connection.limits.chunk_bytes:
            ready = self._submit("store", {"out": obj_id, "value": tensor})
            pointer = TensorPointer(self, obj_id, ready)
            await self._wait(ready, timeout)
            return pointer
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"dtype {tensor.dtype} cannot be sent")
        # a stream: allocate on the worker, then write the bytes in chunks (a broken stream leaves a
        # partial object that the pointer's collection, or the session's end, deletes)
        ready = self._submit("alloc", {"out": obj_id, "dtype": DTYPE_NAMES[tensor.dtype],
                                       "shape": list(tensor.shape), "grad": tensor.requires_grad})
        pointer = TensorPointer(self, obj_id, ready)
        await self._upload(_flat_bytes(tensor), lambda offset, data: (
            "write", {"obj": obj_id, "offset": offset, "data": data}), timeout, first=ready)
        return pointer

    async def _get_tensor(self, obj_id: int, timeout: float | None) -> torch.Tensor:
        result = await self._request("get", {"obj": obj_id}, timeout)
        if not isinstance(result, StreamInfo):
            return result
        out = torch.empty(result.shape, dtype=DTYPES[result.dtype])
        target = _flat_bytes(out)
        await self._download(result.nbytes, lambda offset, length: (
            "read", {"obj": obj_id, "offset": offset, "length": length}),
            lambda offset, data: target[offset:offset + data.numel()].copy_(data), timeout)
        return out.requires_grad_(result.requires_grad)

    # --- modules -------------------------------------------------------------------------------

    async def _send_module(self, module: nn.Module, timeout: float | None) -> ModulePointer:
        """Small entries travel inline (one chunk's worth in all); big ones as streams: into the
        existing remote module (``module_write``) or as objects the new module adopts (``module_put``)."""
        state = module.state_dict()
        chunk = self._connection.limits.chunk_bytes
        inline: dict[str, torch.Tensor] = {}
        budget = chunk
        for name, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes <= budget and tensor.is_contiguous():
                inline[name] = tensor
                budget -= nbytes
        streamed = {k: v for k, v in state.items() if k not in inline}
        known = self._modules.get(module)
        if known is not None and not known._deleted:
            loaded = self._submit("module_load", {"obj": known.id, "state": inline})
            loaded.add_done_callback(_retrieve)
            for name, tensor in streamed.items():
                await self._upload(_flat_bytes(tensor), lambda offset, data, name=name: (
                    "module_write", {"obj": known.id, "name": name, "offset": offset, "data": data}), timeout)
            await self._wait(loaded, timeout)
            return known
        spec = describe(module)
        parts: dict[str, Any] = dict(inline)
        uploads = []
        for name, tensor in streamed.items():
            uploads.append(await self._send_tensor(tensor, timeout))
            parts[name] = uploads[-1]
        obj_id = self._new_id()
        ready = self._submit("module_put", {"out": obj_id, "spec": spec, "state": parts})
        for upload in uploads:  # the module adopts them: the worker drops them from the session itself
            upload._deleted = True
        pointer = ModulePointer(self, obj_id, ready, module)
        await self._wait(ready, timeout)
        if not module.training:
            await pointer.train(False)
        self._modules[module] = pointer
        return pointer

    async def _module_slices(self, pointer: ModulePointer,
                             timeout: float | None = None) -> AsyncIterator[tuple[str, int, torch.Tensor]]:
        """The remote module's parameters and buffers as (name, first element, flat values) pieces:
        small entries whole, big ones chunk by chunk, so no caller needs a whole copy in memory."""
        state = await self._request("module_state", {"obj": pointer.id}, timeout)
        for name, value in state.items():
            if not isinstance(value, StreamInfo):
                yield name, 0, value.reshape(-1)
                continue
            dtype = DTYPES[value.dtype]
            itemsize = torch.empty((), dtype=dtype).element_size()
            pieces: asyncio.Queue[tuple[int, torch.Tensor] | None] = asyncio.Queue()

            async def fetch(name: str = name, info: StreamInfo = value) -> None:
                try:
                    await self._download(info.nbytes, lambda offset, length: (
                        "module_read", {"obj": pointer.id, "name": name, "offset": offset, "length": length}),
                        lambda offset, data: pieces.put_nowait((offset, data)), timeout)
                finally:
                    pieces.put_nowait(None)

            task = asyncio.ensure_future(fetch())
            try:
                while (piece := await pieces.get()) is not None:
                    offset, data = piece
                    yield name, offset // itemsize, data.view(dtype)
            finally:
                if not task.done():
                    task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            task.result()  # a failed download raises here

    def _module_pointer(self, module: nn.Module) -> ModulePointer | None:
        return self._modules.get(module)

    def _modules_sent(self) -> list[tuple[nn.Module, ModulePointer]]:
        return list(self._modules.items())


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor, without copying when it is contiguous."""
    return torch.frombuffer(tensor_buffer(tensor), dtype=torch.uint8) if tensor.numel() else torch.empty(
        0, dtype=torch.uint8)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a pipelined future's error as seen: it is raised where the pointer is awaited."""
    if not future.cancelled():
        future.exception()


class _Connecting:
    """What ``connect`` returns: ``await`` it for a worker, or use it in ``async with``."""

    def __init__(self, worker: RemoteWorker) -> None:
        self._worker = worker

    def __await__(self) -> Generator[Any, None, RemoteWorker]:
        return self._connect().__await__()

    async def _connect(self) -> RemoteWorker:
        try:
            return await self._worker.connect()
        except (WorkerError, TimeoutError) as exc:
            await self._worker._connection.close(say_goodbye=False)
            raise type(exc)(f"{exc}. Nothing answered at {self._worker.address}: is the daemon running, and if it "
                            "uses keys, are server_key and client_key right and is your key allowed?") from None
        except BaseException:
            await self._worker._connection.close(say_goodbye=False)
            raise

    async def __aenter__(self) -> RemoteWorker:
        return await self._connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self._worker.close()


def connect(address: str, *, server_key: KeyPath | bytes | None = None, client_key: KeyPath | None = None,
            settings: ConnectionSettings | None = None, context: zmq.asyncio.Context | None = None) -> _Connecting:
    """Connect to a worker daemon: ``bob = await fz.connect(addr)`` or ``async with fz.connect(addr) as bob``.

    With keys (CurveZMQ): ``server_key`` is the daemon's public key (its ``.key`` file or the z85
    text) and ``client_key`` your own ``.key_secret`` file, whose public half the daemon must allow."""
    return _Connecting(RemoteWorker(address, settings=settings, context=context, server_key=server_key,
                                    client_key=client_key))


class VirtualWorker(RemoteWorker):
    """A worker in this process: the daemon's own code behind an ``inproc://`` socket.

    ``bob = fz.VirtualWorker("bob")`` is usable at once from a coroutine; ``async with`` or
    ``await bob.close()`` stops it."""

    def __init__(self, worker_id: str, *, config: WorkerConfig | None = None, models: ModelRegistry | None = None,
                 datasets: "dict[str, Dataset] | None" = None, settings: ConnectionSettings | None = None,
                 context: zmq.asyncio.Context | None = None) -> None:
        context = context or zmq.asyncio.Context.instance()
        self.server = Worker(worker_id, config=config, models=models, datasets=datasets, context=context)
        address = self.server.bind(f"inproc://fedzmq-{worker_id}-{uuid.uuid4().hex}")
        super().__init__(address, settings=settings, context=context)
        self.id = worker_id
        self.instance = self.server.instance
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # made outside a coroutine: serving starts with the first request
        else:
            self.server.start()

    def _before_request(self) -> None:
        self.server.start()

    async def __aenter__(self) -> "VirtualWorker":
        self.server.start()
        return self

    async def close(self) -> None:
        await super().close()
        await self.server.close()

    def __await__(self) -> Generator[Any, None, "VirtualWorker"]:
        async def ready() -> VirtualWorker:
            await self.ping()
            return self
        return ready().__await__()
