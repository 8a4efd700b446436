"""What ``connect`` returns: an object to ``await`` for a connected worker, or to use in ``async with``."""

from __future__ import annotations

from collections.abc import Coroutine as CoroutineABC
from typing import TYPE_CHECKING, Any, Coroutine, Generator

from ..errors import HandshakeFailed, RemoteError, WorkerError

if TYPE_CHECKING:
    from .worker import RemoteWorker


class Connecting(CoroutineABC[Any, Any, "RemoteWorker"]):
    """What ``connect`` returns: ``await`` it for a worker, use it in ``async with``, or make it a task
    (``asyncio.create_task``, a ``TaskGroup``'s): it is a coroutine. One cancelled or closed before it ran
    closes the socket its worker opened at once (nothing will ever connect it); one cancelled once its ping
    left sends the goodbye that ends the session the ping opened, without waiting for its answer."""

    def __init__(self, worker: RemoteWorker, client: str | None = None) -> None:
        self._worker = worker
        #: the hosted client asked for (``connect(..., client=...)``), and its worker once connected
        self._client = client
        self._connected: RemoteWorker | None = None
        #: the connecting coroutine, once a task (or an ``await``) started it
        self._running: Coroutine[Any, Any, RemoteWorker] | None = None

    def _coroutine(self) -> Coroutine[Any, Any, RemoteWorker]:
        if self._running is None:
            self._running = self._connect()
        return self._running

    def __await__(self) -> Generator[Any, None, RemoteWorker]:
        if self._connected is not None:  # awaited again once connected: its worker, as before it was a coroutine
            return _ready(self._connected).__await__()
        return self._coroutine().__await__()


    def send(self, value: Any) -> Any:
        return self._coroutine().send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if self._running is None:  # cancelled before it ran (a task cancelled at once)
            self._worker.discard_unused()
        return self._coroutine().throw(typ, val, tb)

    def close(self) -> None:
        if self._running is None:
            self._worker.discard_unused()
            return
        self._running.close()

    async def _connect(self) -> RemoteWorker:
        host = await self._connect_host()
        if self._client is None:
            self._connected = host
            return host
        try:  # the client's worker holds the connection; the daemon's own handle is not handed out
            self._connected = await host.hosted_client(self._client)
        finally:
            await host.close()
        return self._connected

    async def _connect_host(self) -> RemoteWorker:
        try:
            return await self._worker.connect()
        except HandshakeFailed:  # it says what to check already
            await self._worker.close_connection(say_goodbye=False)
            raise
        except (WorkerError, TimeoutError) as exc:
            await self._worker.close_connection(say_goodbye=False)
            raise type(exc)(f"{exc}. Nothing answered at {self._worker.address}: is the daemon running, and if it "
                            "uses keys, are server_key and client_key right (--server-key and --client-key on the "
                            "command line) and is your key allowed?") from None
        except RemoteError:  # the daemon refused the session (--max-sessions, a revoked key): none to end
            await self._worker.close_connection(say_goodbye=False)
            raise
        except BaseException:  # cancelled: a daemon its ping reached opened a session for it
            await self._worker.give_up_connection()
            raise

    async def __aenter__(self) -> RemoteWorker:
        return await self._connect()

    async def __aexit__(self, *exc: Any) -> None:
        await (self._connected or self._worker).close()


async def _ready(worker: RemoteWorker) -> RemoteWorker:
    """A worker already connected, as an awaitable: what a ``Connecting`` awaited again gives."""
    return worker
