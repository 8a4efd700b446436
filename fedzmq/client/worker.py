"""``RemoteWorker``: the coordinator's handle on one worker daemon, and ``connect`` to make one.

``VirtualWorker`` (``fedzmq.client.virtual``) speaks the same protocol in-process over inproc, so a test
against it runs the same daemon code as production. What pointers ask of their worker (ops, gradients,
batched deletes) is in ``fedzmq.client.pointer_ops``; how values move, in ``fedzmq.client.transfers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import weakref
from typing import Any, Coroutine

import torch
import zmq.asyncio
from torch import nn

from ..codec import Limits, Ref
from ..errors import RemoteError, WorkerClosedError, WrongWorkerError
from ..security import KeyPath
from .connecting import Connecting
from .connection import GOODBYE_SECONDS, Connection, ConnectionSettings
from .pointer_ops import RELEASE_BATCH, RELEASE_DELAY, PointerOps
from .pointers import DatasetPointer, ModulePointer, Pointer, TensorPointer
from .futures import RunsEvenIfCancelledFirst, retrieve_error as _retrieve
from .transfers import Transfers

__all__ = ["RELEASE_BATCH", "RELEASE_DELAY", "RemoteWorker", "VirtualWorker", "connect", "connect_clients"]


class RemoteWorker(Transfers, PointerOps):
    """A connection to one worker (or to one logical client of a daemon hosting many), and the session it
    holds there: the namespace of everything this coordinator made on that worker, freed by ``close``.
    Make one with ``await fz.connect(address)`` or ``async with fz.connect(address) as bob``."""

    def __init__(self, address: str, *, settings: ConnectionSettings | None = None,
                 context: zmq.asyncio.Context | None = None, server_key: KeyPath | bytes | None = None,
                 client_key: KeyPath | None = None) -> None:
        self.address = address
        self.id: str | None = None
        self.instance: str | None = None
        #: the logical client of a daemon hosting many this worker talks to (None: the daemon itself), and
        #: the worker for the daemon itself whose connection it shares
        self.client: str | None = None
        self.host: RemoteWorker = self
        self._connection = Connection(address, settings, context, encode_default=self._to_ref,
                                      server_key=server_key, client_key=client_key)
        self._object_ids = itertools.count(1)
        self._released: list[int] = []
        #: closed: the session is gone on the worker, and nothing more is sent for it (a pointer collected
        #: later must not open a new session to delete what is gone already)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._modules: weakref.WeakKeyDictionary[nn.Module, ModulePointer] = weakref.WeakKeyDictionary()
        self._resets_seen = 0
        #: this logical client's session on the daemon (the daemon's own session is the connection's)
        self._client_session: str | None = None
        #: the live pointers by object id: the worker's errors say "object 3", ours name the pointer
        self._pointers: weakref.WeakValueDictionary[int, Pointer] = weakref.WeakValueDictionary()

    @classmethod
    def _hosted_client(cls, host: "RemoteWorker", client: str) -> "RemoteWorker":
        """A worker for one of the logical clients ``host``'s daemon hosts, sharing its connection."""
        worker = cls.__new__(cls)  # not __init__: it would open a second connection
        worker.address, worker.id, worker.instance = host.address, client, host.instance
        worker.client, worker.host = client, host
        worker._connection = host._connection
        worker._connection.users += 1
        worker._object_ids = itertools.count(1)
        worker._released, worker._loop, worker._closed = [], None, False
        worker._modules = weakref.WeakKeyDictionary()
        worker._resets_seen = host._connection.session_resets
        worker._client_session = None
        worker._pointers = weakref.WeakValueDictionary()
        return worker

    # --- lifecycle -----------------------------------------------------------------------------

    async def connect(self) -> "RemoteWorker":
        """Wait until the worker answers, and learn its id. An address whose host does not resolve raises
        ``AddressError`` at once (a malformed one did when this object was made)."""
        timeout = self._connection.settings.connect_timeout
        await self._connection.open(timeout)
        info = await self.request("ping", self._connection.announce(), timeout=timeout)
        self.id, self.instance = info["id"], info["instance"]
        self._note_session(info.get("session"))
        self._connection.adopt_worker_limits(info.get("limits") or {})
        self._connection.adopt_features(info.get("features"))
        return self

    def _note_session(self, session: str | None) -> None:
        """Record the worker-side session a ping named; a change means the old one's objects are gone."""
        if self.client is None:
            self._connection.note_session(session)
        elif session is not None and session != self._client_session:
            if self._client_session is not None:
                self._modules = weakref.WeakKeyDictionary()
            self._client_session = session

    async def clients(self, timeout: float | None = 30.0) -> list["RemoteWorker"]:
        """One worker per logical client this daemon hosts (``fedzmq-worker --clients-from``), each with
        its own id, dataset and session, all sharing this worker's connection (one socket, one heartbeat).
        Use them as separate workers: a ``Federation`` over them is the simulation of that many clients,
        with the same code as production. Close them (or this worker) when done."""
        ids = await self.request("clients", {}, timeout)
        return [RemoteWorker._hosted_client(self, client) for client in ids]

    async def hosted_client(self, client: str, timeout: float | None = 30.0) -> "RemoteWorker":
        """The worker of one logical client this daemon hosts, by its id, sharing this worker's
        connection (as ``clients()`` gives them all). A name the daemon does not host raises
        ``ObjectNotFound``."""
        worker = RemoteWorker._hosted_client(self, client)
        try:
            worker._note_session((await worker.request("ping", {}, timeout)).get("session"))
        except BaseException:
            await worker.close()
            raise
        return worker

    def close(self) -> Coroutine[Any, Any, None]:
        """End the session: the worker frees everything this client made there. The connection closes
        with the last worker that shares it. A coroutine that closes even when cancelled before its first
        step (``asyncio.wait_for(worker.close(), 0)``): it then runs on a task of its own."""
        return RunsEvenIfCancelledFirst(self._close())

    async def _close(self) -> None:
        """``close``'s work (an in-process worker adds the stop of its daemon)."""
        connection = self._connection
        if self._closed:
            if connection.users <= 0:  # a close that was cancelled may still be tearing the connection down
                await connection.close(say_goodbye=False)
            return
        self._closed = True
        self._released.clear()
        connection.users -= 1
        last = connection.users <= 0  # decided now: clients closed together must not all close the connection
        cancelled = True
        try:
            if self.client is not None and not connection.closed and connection.alive:
                with contextlib.suppress(Exception):  # (``submit`` refuses a closed client's commands)
                    await self.wait_reply(connection.submit("close", {}, client=self.client), GOODBYE_SECONDS)
            cancelled = False
        finally:  # cancelled or not, the last user closes the connection (without waiting on a goodbye if cancelled)
            if last:
                await connection.close(say_goodbye=not cancelled)

    async def close_connection(self, say_goodbye: bool = True) -> None:
        """Close this worker's connection now, whatever other workers share it, and without the bookkeeping
        of ``close``: for a test harness's tear-down, or a connect that failed. With ``say_goodbye=False``
        nothing more is sent, not even the goodbye that ends the session (the daemon's session then
        expires on its own). Normal code calls ``close``."""
        await self._connection.close(say_goodbye=say_goodbye)

    async def give_up_connection(self) -> None:
        """Close the connection of a ``connect`` that was cancelled: the goodbye that ends the session its ping
        opened on the daemon is sent, not awaited (``Connection.give_up``)."""
        await self._connection.give_up()

    def discard_unused(self) -> None:
        """Close the socket of a worker never connected nor used (a ``connect`` cancelled before it ran),
        at once: without a running loop's help, as a coroutine cancelled before it ran has none to give."""
        self._connection.discard_unused()

    async def __aenter__(self) -> "RemoteWorker":
        """Connect (if not yet connected) and close on leaving: ``async with RemoteWorker(addr) as bob``
        means the same as ``async with fz.connect(addr) as bob``."""
        if self.id is None:
            return await Connecting(self)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """True once ``close`` was called: the worker takes no more commands (a hosted client's are refused
        even while its connection stays open for the other clients)."""
        return self._closed

    @property
    def alive(self) -> bool:
        """False once the worker missed too many heartbeats (it turns True again if it answers)."""
        return self._connection.alive

    @property
    def limits(self) -> Limits:
        """The message limits in force on this worker's connection: ours, lowered to the worker's once
        it answered. What a reply may carry is bounded by these (a round sizes its trips by them)."""
        return self._connection.limits

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
        return await self.request("ping", self._connection.announce(), timeout)

    async def status(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """Id, version, sessions, objects and bytes held, uptime and counters of the worker."""
        return await self.request("status", {}, timeout)

    async def datasets(self, timeout: float | None = 30.0) -> list[DatasetPointer]:
        """The datasets this worker's owner made available (names, sizes, shapes; never values)."""
        return [DatasetPointer(self, info) for info in await self.request("datasets", {}, timeout)]

    async def search(self, query: str, timeout: float | None = 30.0) -> list[DatasetPointer]:
        """Datasets whose name, tags or description contain ``query`` (case-insensitive)."""
        return [DatasetPointer(self, info) for info in await self.request("datasets", {"query": query}, timeout)]

    async def refresh(self, timeout: float | None = 10.0) -> bool:
        """Ping the worker; if it restarted since we last saw it, forget what we had sent to the old one.

        Returns True when it restarted. Used by the scheduler to re-send models to a worker that
        came back after a crash."""
        info = await self.request("ping", self._connection.announce(), timeout)
        before = self._client_session
        self._note_session(info.get("session"))
        reset = self._connection.session_resets != self._resets_seen or (
            self.client is not None and before is not None and before != self._client_session)
        self._resets_seen = self._connection.session_resets
        if self.client is None:
            self._connection.adopt_features(info.get("features"))  # a restarted worker may be another version
        restarted = (self.instance is not None and info["instance"] != self.instance) or reset
        if restarted:
            self._modules = weakref.WeakKeyDictionary()
            self._released.clear()
        self.id, self.instance = info["id"], info["instance"]
        return restarted

    def hosted(self, model: nn.Module) -> ModulePointer | None:
        """This worker's copy of ``model``, if it was sent here and this worker's session still holds it
        (the connection's heartbeats notice a restart or an expired session: no request is made)."""
        if self._connection.session_resets != self._resets_seen:
            self._resets_seen = self._connection.session_resets
            self._modules = weakref.WeakKeyDictionary()
        pointer = self._modules.get(model)
        return pointer if pointer is not None and not pointer.deleted else None

    def forget(self, model: nn.Module) -> None:
        """Forget that ``model`` was sent here (its copy is gone): the next ``send`` builds it anew."""
        self._modules.pop(model, None)

    def secure_round_number(self) -> int:
        """A number for one secure-aggregation round on this worker, used by no other round of any session of
        its connection: the daemon keeps a session's secure rounds by it, and two federations over the same
        workers at once are both at round 1 (their own numbering) while their secure rounds are under way."""
        return next(self._connection.secure_round_numbers)

    def secagg(self, step: str, round_number: int, payload: Any, **extra: Any) -> "asyncio.Future[Any]":
        """Submit one step of a secure-aggregation round now (it takes its place in this worker's queue, so
        steps can be pipelined with other commands); await the returned future for the step's answer, as
        secure-aggregation message data (``fedzmq.secagg.messages``)."""
        from ..secagg.wire import from_codec, to_codec

        future = self.submit("secagg", {"step": step, "round": round_number, "payload": to_codec(payload), **extra})
        future.add_done_callback(_retrieve)

        async def answer() -> Any:
            return from_codec(await self.wait_reply(future))

        return asyncio.ensure_future(answer())

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

    # --- the pointers' interface (``fedzmq.client.host.PointerHost``), not for normal code --------

    def _before_request(self) -> None:
        """Hook for subclasses that must start something before the first request."""

    def submit(self, cmd: str, args: dict[str, Any], copy: bool = False, fusable: bool = False) -> asyncio.Future[Any]:
        """Send command ``cmd`` in this worker's session without waiting; returns the reply's future (for
        ``wait_reply``). ``copy=True`` copies its tensors' bytes at once: for requests that return
        before the worker has them (pipelined ops), so that the caller may change its tensors after.
        ``fusable``: an op a ``get`` of its output may join (``Connection.fetch_with``).
        Pointers' interface (``PointerHost``), not for normal code."""
        if self._closed and self.client is not None:  # its connection stays open for the other clients: the
            # daemon would open a new session for it. (The daemon's own session, which the clients' rounds
            # send their model to, lasts as long as the connection: its handle still sends while they hold it.)
            raise WorkerClosedError(f"hosted client {self.client!r} was closed")
        self._before_request()
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._connection.submit(cmd, args, copy=copy, client=self.client, default=self._to_ref,
                                       fusable=fusable)

    async def request(self, cmd: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        """Send command ``cmd`` and wait for its result (``submit``, then ``wait_reply``).
        Pointers' interface (``PointerHost``), not for normal code."""
        return await self.wait_reply(self.submit(cmd, args), timeout)

    async def wait_reply(self, future: asyncio.Future[Any], timeout: float | None = None) -> Any:
        """The reply's result, or its remote error naming the pointers the worker called "object N".
        Pointers' interface (``PointerHost``), not for normal code."""
        try:
            return await self._connection.wait(future, timeout)
        except RemoteError as exc:
            named = exc.naming(self._pointer_name)
            if named is exc:
                raise
            raise named from None

    def register_pointer(self, pointer: Pointer) -> None:
        """Remember a new pointer (weakly), so that the worker's errors about its object name it.
        Pointers' interface (``PointerHost``), not for normal code."""
        self._pointers[pointer.id] = pointer

    def _pointer_name(self, obj_id: int) -> str | None:
        pointer = self._pointers.get(obj_id)
        return pointer.describe() if pointer is not None else None

    def _to_ref(self, value: Any) -> Any:
        """Encoder hook: pointers become references, after checking they live here."""
        if isinstance(value, Pointer):
            if value.location is not self:
                raise WrongWorkerError(
                    f"{value!r} lives on {value.location.id!r}, but this operation runs on {self.id!r}; "
                    f"move the value first (await ptr.get(), then send it)")
            if value.deleted:
                raise ValueError(f"{value!r} was deleted")
            return Ref(value.id)
        if isinstance(value, nn.Module):
            raise TypeError("pass a ModulePointer (await worker.send(model)), not a local module")
        return value

    def new_id(self) -> int:
        """A fresh object id in this session. Pointers' interface (``PointerHost``), not for normal code."""
        return next(self._object_ids)

    def sent_modules(self) -> list[tuple[nn.Module, ModulePointer]]:
        """The local models sent here, with their pointers (a remote optimizer finds its model among them).
        Pointers' interface (``PointerHost``), not for normal code."""
        return list(self._modules.items())


def connect(address: str, *, client: str | None = None, server_key: KeyPath | bytes | None = None,
            client_key: KeyPath | None = None, settings: ConnectionSettings | None = None,
            context: zmq.asyncio.Context | None = None) -> Connecting:
    """Connect to a worker daemon: ``bob = await fz.connect(addr)`` or ``async with fz.connect(addr) as bob``.

    ``client`` names one logical client of a daemon hosting many (``fedzmq-worker --clients-from``): the
    worker is then that client, with its own id, dataset and session (``fz.connect_clients`` gives all
    of them on one connection). A name the daemon does not host raises ``fz.ObjectNotFound``.

    With keys (CurveZMQ): ``server_key`` is the daemon's public key (its ``.key`` file or the z85
    text) and ``client_key`` your own ``.key_secret`` file, whose public half the daemon must allow.

    ``address`` is ``"tcp://host:port"`` (or ``"ipc://path"``, ``"inproc://name"``). A malformed one
    (``"127.0.0.1:5555"``, a port out of range, ...) or one whose host does not resolve raises
    ``fz.AddressError`` at once, instead of waiting ``settings.connect_timeout`` for an answer."""
    return Connecting(RemoteWorker(address, settings=settings, context=context, server_key=server_key,
                                    client_key=client_key), client)


async def connect_clients(address: str, *, server_key: KeyPath | bytes | None = None,
                          client_key: KeyPath | None = None, settings: ConnectionSettings | None = None,
                          context: zmq.asyncio.Context | None = None) -> list[RemoteWorker]:
    """One ``RemoteWorker`` per logical client a daemon hosts (``fedzmq-worker --clients-from``), all on
    one connection: ``workers = await fz.connect_clients(addr)``. Close every one of them when done
    (the connection closes with the last)."""
    host = await connect(address, server_key=server_key, client_key=client_key, settings=settings, context=context)
    try:
        return await host.clients()
    finally:
        await host.close()  # the clients hold the connection now


# re-exported from its old home; it builds on RemoteWorker, so it is imported after it
from .virtual import VirtualWorker  # noqa: E402
