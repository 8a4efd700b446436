"""How values move between the coordinator and a worker: one message when small, a stream when big.

A tensor or model entry bigger than one message (``Limits.chunk_bytes``, agreed with the worker at
connect time) travels as a stream of pieces of at most ``STREAM_PIECE_BYTES``: a window of
``STREAM_WINDOW`` pieces in flight, each acknowledged, so neither side holds more than the object plus
the pieces in flight, and a broken stream fails cleanly (the partial object is deleted with its
pointer, or with the session).

``Transfers`` is a base class of ``RemoteWorker``; it uses the worker's ``submit``/``wait_reply``
(requests), ``new_id`` (object ids), ``_connection`` (limits) and ``_modules`` (models sent). Its public
methods are part of the pointers' interface (``fedzmq.client.host.PointerHost``), not for normal code.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from functools import partial
from typing import TYPE_CHECKING, Any, AsyncContextManager, AsyncGenerator, Awaitable, Callable, cast

import torch
from torch import nn

from ..codec import DTYPE_NAMES, DTYPES, StreamInfo, tensor_buffer
from ..errors import FedzmqError, ProtocolError, RemoteError
from ..modeldesc import describe
from ..torchmodes import default_modes
from .futures import retrieve_error
from .meta import TensorMeta
from .pointers import Broadcast, ModulePointer, TensorPointer
from .turns import model_turn

if TYPE_CHECKING:
    from .connection import Connection
    from .worker import RemoteWorker

#: pieces of a stream in flight at once (flow control: the window of unacknowledged requests)
STREAM_WINDOW = 4

#: the largest piece of a stream. Small enough that the receiving side's allocator reuses the pieces'
#: memory instead of mapping fresh pages for each (glibc serves blocks under its 32 MiB mmap threshold
#: from the heap once one was freed), big enough that per-message costs vanish. Measured on 2 cores
#: (docs/benchmarks_big.md): 1 GiB send+get went from 0.74x raw pyzmq with 128 MiB pieces to 1.14x.
STREAM_PIECE_BYTES = 16 << 20

#: pieces of a download copied into place at once, each on a thread of the event loop's executor. The
#: copy is mostly the first touch of the destination's fresh pages, and page faults on two cores
#: overlap: a 4 GiB get took 5.1 to 5.5 s with one thread and 4.1 to 4.4 s with two here, and four
#: threads did no better (docs/benchmarks_big.md).
#: It also keeps the event loop free while a get lands.
LANDING_THREADS = 2


class Transfers:
    _connection: "Connection"
    _modules: "weakref.WeakKeyDictionary[nn.Module, ModulePointer]"
    #: the sends of a model to this worker under way, each resolved when it ends

    def submit(self, cmd: str, args: dict[str, Any], copy: bool = False, fusable: bool = False) -> asyncio.Future[Any]:
        raise NotImplementedError

    async def wait_reply(self, future: asyncio.Future[Any], timeout: float | None = None) -> Any:
        raise NotImplementedError

    async def request(self, cmd: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        raise NotImplementedError

    def new_id(self) -> int:
        raise NotImplementedError

    def _as_worker(self) -> "RemoteWorker":
        """This object as the RemoteWorker it is a base of (pointers name their worker)."""
        return cast("RemoteWorker", self)

    def _piece_bytes(self) -> int:
        """A stream's piece size: ``STREAM_PIECE_BYTES``, or less if the worker's messages are smaller."""
        return min(STREAM_PIECE_BYTES, self._connection.limits.chunk_bytes)

    async def _upload(self, data: torch.Tensor, request: Callable[[int, torch.Tensor], tuple[str, dict[str, Any]]],
                      timeout: float | None, first: asyncio.Future[Any] | None = None, start: int = 0) -> None:
        """Send ``data`` (flat bytes) from byte ``start`` on in pieces, ``request(offset, piece)`` naming each
        command, with at most ``STREAM_WINDOW`` unanswered: neither side holds more than the object plus the
        pieces in flight."""
        chunk = self._piece_bytes()
        window: list[asyncio.Future[Any]] = [first] if first is not None else []
        for future in window:
            future.add_done_callback(retrieve_error)  # a late error after a timeout is not "never retrieved"
        for offset in range(start, data.numel(), chunk):
            window.append(self.submit(*request(offset, data[offset:offset + chunk])))
            window[-1].add_done_callback(retrieve_error)
            if len(window) >= STREAM_WINDOW:
                await self.wait_reply(window.pop(0), timeout)
                self._connection.note_progress()
        for future in window:
            await self.wait_reply(future, timeout)

    async def _download(self, nbytes: int, request: Callable[[int, int], tuple[str, dict[str, Any]]],
                        land: Callable[[int, torch.Tensor], Awaitable[Any] | None], timeout: float | None) -> None:
        """Fetch ``nbytes`` in pieces (``request(offset, length)``), handing each to ``land(offset, bytes)``
        as it arrives, with at most ``STREAM_WINDOW`` in flight. ``land`` may return an awaitable (a copy
        running on a thread): at most ``LANDING_THREADS`` run at once, and all are done on return."""
        chunk = self._piece_bytes()
        window: list[tuple[int, int, asyncio.Future[Any]]] = []
        landing: list[asyncio.Future[Any]] = []

        async def arrived(start: int, length: int, future: asyncio.Future[Any]) -> None:
            data = await self.wait_reply(future, timeout)
            if not (isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.dim() == 1
                    and data.numel() == length):
                raise ProtocolError(f"the worker answered a read of {length} bytes at {start} with "
                                    f"{type(data).__name__} {getattr(data, 'shape', '')}")
            done = land(start, data)
            if done is not None:
                landing.append(asyncio.ensure_future(done))
                if len(landing) >= LANDING_THREADS:
                    await asyncio.wait(landing[:1])  # popped only once done: the finally waits for the rest
                    landing.pop(0).result()

        try:
            for offset in range(0, nbytes, chunk):
                length = min(chunk, nbytes - offset)
                future = self.submit(*request(offset, length))
                future.add_done_callback(retrieve_error)  # a late error after a timeout is not "never retrieved"
                window.append((offset, length, future))
                if len(window) >= STREAM_WINDOW:
                    await arrived(*window.pop(0))
            while window:
                await arrived(*window.pop(0))
            while landing:
                await asyncio.wait(landing[:1])
                landing.pop(0).result()
        finally:
            # copies already running on threads cannot be stopped: they finish before the destination
            # is given up or returned (asyncio.wait, unlike gather, cancels nothing it waits for)
            if landing:
                await asyncio.wait(landing)
                for copy in landing:
                    retrieve_error(copy)

    # --- tensors -------------------------------------------------------------------------------

    async def _send_tensor(self, tensor: torch.Tensor, timeout: float | None) -> TensorPointer:
        """The tensor's bytes leave uncopied (ZeroMQ reads its memory after ``submit`` returns): changed in
        place meanwhile (by another coroutine, between two awaits of this send), the worker could store it
        part old, part new. Then a copy of what it is now is sent instead, as if the change came first."""
        if tensor.is_inference():  # it keeps no version counter to tell a change by: a copy, taken now
            with default_modes():
                tensor = tensor.clone()
        version = tensor._version
        pointer = await self._send_tensor_once(tensor, timeout)
        if tensor._version == version:
            return pointer
        with default_modes():
            now = tensor.detach().clone().requires_grad_(tensor.requires_grad)
        return await self._send_tensor_once(now, timeout)

    async def _send_tensor_once(self, tensor: torch.Tensor, timeout: float | None) -> TensorPointer:
        obj_id = self.new_id()
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes <= self._connection.limits.chunk_bytes:
            ready = self.submit("store", {"out": obj_id, "value": tensor})
            pointer = TensorPointer(self._as_worker(), obj_id, ready, TensorMeta.of(tensor))
            await self.wait_reply(ready, timeout)
            return pointer
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"dtype {tensor.dtype} cannot be sent")
        # a stream: allocate on the worker, then write the bytes in chunks (a broken stream leaves a
        # partial object that the pointer's collection, or the session's end, deletes)
        ready = self.submit("alloc", {"out": obj_id, "dtype": DTYPE_NAMES[tensor.dtype],
                                      "shape": list(tensor.shape), "grad": tensor.requires_grad})
        pointer = TensorPointer(self._as_worker(), obj_id, ready, TensorMeta.of(tensor))
        await self._upload(_flat_bytes(tensor), lambda offset, data: (
            "write", {"obj": obj_id, "offset": offset, "data": data}), timeout, first=ready)
        return pointer

    async def fetch_tensor(self, obj_id: int, timeout: float | None,
                           made_by: asyncio.Future[Any] | None = None) -> torch.Tensor:
        """The tensor's value; ``made_by``: the reply future of the op that made it, which this ``get``
        joins when that op still waits to leave and nothing followed it (``Connection.fetch_with``)."""
        fetched = self._connection.fetch_with(made_by) if made_by is not None else None
        if fetched is not None:
            result = await self.wait_reply(fetched, timeout)
        else:
            result = await self.request("get", {"obj": obj_id}, timeout)
        if not isinstance(result, StreamInfo):
            return result
        with default_modes():  # not the caller's modes: inference tensors would refuse the copies (threads' modes)
            out = torch.empty(result.shape, dtype=DTYPES[result.dtype])
            target = _flat_bytes(out)
        loop = asyncio.get_running_loop()
        await self._download(result.nbytes, lambda offset, length: (
            "read", {"obj": obj_id, "offset": offset, "length": length}),
            lambda offset, data: loop.run_in_executor(None, _copy_into, target, offset, data), timeout)
        with default_modes():
            return out.requires_grad_(result.requires_grad)

    # --- modules -------------------------------------------------------------------------------

    async def _send_module(self, module: nn.Module, timeout: float | None) -> ModulePointer:
        """Sends of one model to this worker, one after the other: two coroutines sending it at once (its
        first send, say) get what two sends in a row give, one remote copy that the second loads into. Sends of
        it to other workers go on meanwhile (they only read it); a get into it waits (``fedzmq.client.turns``)."""
        async with model_turn(module, sending_to=self):
            return await self._send_module_now(module, timeout)

    def module_turn(self, module: nn.Module) -> AsyncContextManager[None]:
        """A ``get`` into ``module``: alone, no send of it to any worker meanwhile (``fedzmq.client.turns``)."""
        return model_turn(module)

    async def _send_module_now(self, module: nn.Module, timeout: float | None) -> ModulePointer:
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
        if known is not None and not known.deleted:  # a load of the model the worker has: one write
            await known.load(Broadcast(state, chunk), timeout)
            return known
        spec = describe(module)
        parts: dict[str, Any] = dict(inline)
        uploads = []
        for name, tensor in streamed.items():
            uploads.append(await self._send_tensor(tensor, timeout))
            parts[name] = uploads[-1]
        obj_id = self.new_id()
        ready = self.submit("module_put", {"out": obj_id, "spec": spec, "state": parts})
        pointer = ModulePointer(self._as_worker(), obj_id, ready, module)
        await self.wait_reply(ready, timeout)  # on failure the uploads are deleted with their pointers
        for upload in uploads:  # the module adopted them: the worker dropped them from the session
            upload.mark_deleted()
        if not module.training:
            await pointer.train(False)
        self._modules[module] = pointer
        return pointer

    async def stream_into(self, pointer: ModulePointer, broadcast: "Broadcast", timeout: float | None) -> "Broadcast":
        """Stream a broadcast's big entries straight into the remote model (``module_write``); returns it as
        split for this worker, whose ``inline`` part goes in the same request as the command that loads it (a
        ``module_load``, or the fit or evaluation that loads it first), which the caller sends without
        awaiting anything else: the model's ``writing`` lock, held meanwhile, keeps the model's other
        commands from coming between the pieces and that request. (A refusal of that request leaves the
        model torn when ``streamed``: the caller then ``discard``s it.)

        A write in pieces is one write. Its first piece carries every entry's dtype and shape, and is
        answered before another leaves: a state the model cannot take changes nothing. A write that stops
        after that (cancelled, a deadline, a lost connection) would leave the model part old, part new: the
        remote model is then discarded (``discard``), and the next send of the model sends it whole."""
        broadcast = broadcast.for_chunk(self._connection.limits.chunk_bytes)
        async with pointer.writing:
            if not broadcast.streamed:
                return broadcast
            entries = {name: [DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)), list(tensor.shape),
                              name in broadcast.streamed] for name, tensor in broadcast.state.items()}
            name, tensor = next(iter(broadcast.streamed.items()))
            data = _flat_bytes(tensor)
            first = self.submit("module_write", {"obj": pointer.id, "name": name, "offset": 0,
                                                 "data": data[:self._piece_bytes()], "entries": entries})
            first.add_done_callback(retrieve_error)
            try:
                await self.wait_reply(first, timeout)  # none other leaves before the entries are checked
            except RemoteError:  # refused: it wrote nothing
                raise
            except BaseException:  # (cancelled, or no answer in time: it may have written)
                self.discard(pointer)
                raise
            await self._write_streamed(pointer, broadcast, data, timeout)
        return broadcast

    def discard(self, pointer: ModulePointer) -> None:
        """Delete a remote model whose write in pieces did not finish (its state is part old, part new), and
        forget it was sent: later commands on its pointer fail with ``ObjectNotFound``, and the next send of
        the model (a federated round's, say) builds it anew, whole. The delete is sent, not awaited."""
        if pointer.deleted:
            return
        pointer.mark_deleted()
        local = pointer.local
        if local is not None and self._modules.get(local) is pointer:
            del self._modules[local]
        with contextlib.suppress(FedzmqError):  # (a closed connection: the model goes with the session)
            self.submit("delete", {"objs": [pointer.id]}).add_done_callback(retrieve_error)

    async def _write_streamed(self, pointer: ModulePointer, broadcast: "Broadcast", data: torch.Tensor,
                              timeout: float | None) -> None:
        """``stream_into``'s pieces after the first (the first entry's, whose bytes are ``data``), which the
        worker took: stopped part-way (cancelled, a deadline, a refusal, a lost connection), they leave the
        model part old, part new, and it is discarded."""
        try:
            for index, (name, tensor) in enumerate(broadcast.streamed.items()):
                await self._upload(data if index == 0 else _flat_bytes(tensor),
                                   partial(_module_write, pointer.id, name), timeout,
                                   start=self._piece_bytes() if index == 0 else 0)
        except BaseException:
            self.discard(pointer)
            raise

    async def module_slices(self, pointer: ModulePointer,
                            timeout: float | None = None) -> AsyncGenerator[tuple[str, int, torch.Tensor], None]:
        """The remote module's parameters and buffers as (name, first element, flat values) pieces:
        small entries whole, big ones chunk by chunk, so no caller needs a whole copy in memory."""
        await pointer.settled()  # (a write being sent: read all of it)
        state = await self.request_state("module_state", {"obj": pointer.id}, pointer.id, timeout)
        async with contextlib.aclosing(self.state_pieces(pointer, state, timeout)) as pieces:
            async for piece in pieces:
                yield piece

    def state_pieces(self, pointer: ModulePointer, state: dict[str, Any],
                     timeout: float | None = None) -> "StatePieces":
        """A module state a reply carried (``module_state``, or a fit's ``reply_state``) as pieces: the
        inline entries as they are, the ``StreamInfo`` ones fetched chunk by chunk with ``module_read``."""
        if not isinstance(state, dict):
            raise ProtocolError(f"the worker answered with {type(state).__name__} where a model state belongs")
        return StatePieces(self, pointer, state, timeout)

    async def read_pieces(self, pointer: ModulePointer, state: dict[str, Any], timeout: float | None,
                          unread: dict[str, StreamInfo]) -> AsyncGenerator[tuple[str, int, torch.Tensor], None]:
        """``StatePieces``' generator. ``unread``: the streamed entries whose reads the worker keeps and no
        download has started; given up (``give_up_reads``) when the generator ends before them."""
        try:
            for name, value in state.items():
                if isinstance(value, torch.Tensor):
                    yield name, 0, value.reshape(-1)
                    continue
                if not isinstance(value, StreamInfo):
                    raise ProtocolError(f"the worker sent {type(value).__name__} for model entry {name!r}")
                unread.pop(name, None)  # its download ends its kept read, however it ends
                dtype = DTYPES[value.dtype]
                itemsize = torch.empty((), dtype=dtype).element_size()
                pieces: asyncio.Queue[tuple[int, torch.Tensor] | None] = asyncio.Queue()
                task = asyncio.ensure_future(self._fetch_entry(pointer, name, value, pieces, timeout))
                try:
                    while (piece := await pieces.get()) is not None:
                        yield name, piece[0] // itemsize, piece[1].view(dtype)
                finally:
                    if not task.done():
                        task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                task.result()  # a failed download raises here
        finally:
            self.give_up_reads(pointer.id, unread)

    async def request_state(self, cmd: str, args: dict[str, Any], obj_id: int, timeout: float | None) -> Any:
        """A request whose reply carries the state of model ``obj_id`` (``module_state``, a fit with
        ``reply_state``). The worker keeps that state's streamed entries until they are read, so a caller
        that stops waiting (cancelled, or timed out) gives them up once the reply comes."""
        future = self.submit(cmd, args)
        try:
            return await self.wait_reply(asyncio.shield(future), timeout)  # (taken even if nobody waits)
        except BaseException:
            future.add_done_callback(partial(self._give_up_reply, obj_id, cmd))
            raise

    def _give_up_reply(self, obj_id: int, cmd: str, future: asyncio.Future[Any]) -> None:
        """``give_up_reads`` for every kept read in a state reply nobody waits for any more."""
        if future.cancelled() or future.exception() is not None:
            return
        reply = future.result()
        for state in reply_states(cmd, reply.result if reply.ok else None):
            self.give_up_reads(obj_id, kept_reads(state))

    def give_up_reads(self, obj_id: int, unread: dict[str, StreamInfo]) -> None:
        """Say that the streamed entries in ``unread`` will not be read (a read of nothing at each one's
        end), so the worker keeps nothing for them; empties ``unread``."""
        while unread:
            name, info = unread.popitem()
            with contextlib.suppress(FedzmqError):  # (closed: the session's end lets the read go)
                self.submit(*_module_read(obj_id, name, info.stream, info.nbytes, 0)).add_done_callback(retrieve_error)

    async def _fetch_entry(self, pointer: ModulePointer, name: str, info: StreamInfo,
                           pieces: "asyncio.Queue[tuple[int, torch.Tensor] | None]", timeout: float | None) -> None:
        """Download one streamed model entry into ``pieces`` (then None, also when it fails). The worker
        keeps the entry as its reply saw it until the read's last byte (``info.stream``): a download
        that stops early says so with a read of nothing at the end, so nothing stays kept for it."""
        read = partial(_module_read, pointer.id, name, info.stream)
        finished = False
        try:
            await self._download(info.nbytes, read, lambda offset, data: pieces.put_nowait((offset, data)), timeout)
            finished = True
        finally:
            pieces.put_nowait(None)
            if not finished and info.stream is not None and info.nbytes:
                self.give_up_reads(pointer.id, {name: info})


def reply_states(cmd: str, result: Any) -> list[dict[str, Any]]:
    """The model states a reply to ``cmd`` carries: ``module_state``'s result itself, a fit's ``state``, a fit
    over hosted clients' ``weighted_sum`` or each of its ``states``. Told apart by the command, not by the
    result's keys: a model's own entries can be named ``state`` or ``metrics``."""
    if not isinstance(result, dict):
        return []
    if cmd == "module_state":
        return [result]
    found = [result.get("state"), result.get("weighted_sum"), *(result.get("states") or [])]
    return [state for state in found if isinstance(state, dict)]


def kept_reads(state: dict[str, Any]) -> dict[str, StreamInfo]:
    """The entries of a state reply whose reads the worker keeps until they are read or given up."""
    return {name: value for name, value in state.items()
            if isinstance(value, StreamInfo) and value.stream is not None and value.nbytes}


class StatePieces:
    """A model state a reply carried, as ``(name, first element, flat values)`` pieces, the streamed entries
    fetched as they are iterated (iterate it once). The worker keeps each streamed entry as the reply saw
    it until it is read (``fedzmq.worker.kept``): entries this will not read, because it was closed
    part-way or dropped without being iterated, are given up, so the worker keeps nothing for them."""

    def __init__(self, host: Transfers, pointer: ModulePointer, state: dict[str, Any], timeout: float | None) -> None:
        unread = kept_reads(state)
        self._host, self._obj_id, self._unread = host, pointer.id, unread
        self._pieces = host.read_pieces(pointer, state, timeout, unread)
        if unread:  # dropped unread: its generator never ran, and so never gives them up itself
            weakref.finalize(self, _give_up_later, asyncio.get_running_loop(), host, pointer.id, unread)

    def __aiter__(self) -> "StatePieces":
        return self

    async def __anext__(self) -> tuple[str, int, torch.Tensor]:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        """End the pieces now, giving up what is unread: a generator closed before it ran never reaches its
        own give-up, and waiting for the collection left the daemon holding the entries while a traceback
        (or a caller keeping it) kept this alive."""
        await self._pieces.aclose()
        self._host.give_up_reads(self._obj_id, self._unread)


def _give_up_later(loop: asyncio.AbstractEventLoop, host: Transfers, obj_id: int,
                   unread: dict[str, StreamInfo]) -> None:
    """``give_up_reads`` on the event loop's thread (a collection can run on any thread)."""
    if unread:
        with contextlib.suppress(RuntimeError):  # the loop closed: so did the connection
            loop.call_soon_threadsafe(host.give_up_reads, obj_id, unread)


def _module_write(obj_id: int, name: str, offset: int, data: torch.Tensor) -> tuple[str, dict[str, Any]]:
    return "module_write", {"obj": obj_id, "name": name, "offset": offset, "data": data}


def _module_read(obj_id: int, name: str, stream: int | None, offset: int, length: int) -> tuple[str, dict[str, Any]]:
    args = {"obj": obj_id, "name": name, "offset": offset, "length": length}
    if stream is not None:  # the entry as the reply that reported it saw it (``fedzmq.worker.kept``)
        args["stream"] = stream
    return "module_read", args


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor, without copying when it is contiguous."""
    return torch.frombuffer(tensor_buffer(tensor), dtype=torch.uint8) if tensor.numel() else torch.empty(
        0, dtype=torch.uint8)




def _copy_into(target: torch.Tensor, offset: int, data: torch.Tensor) -> None:
    """Land a downloaded piece at ``offset`` of ``target`` (on a thread, in its default modes: the view too)."""
    target[offset:offset + data.numel()].copy_(data)
