"""What ``connect`` returns: an object to ``await`` for a connected worker, or to use in ``async with``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generator

from ..errors import HandshakeFailed, WorkerError

if TYPE_CHECKING:
    from .worker import RemoteWorker


class Connecting:
    """What ``connect`` returns: ``await`` it for a worker, or use it in ``async with``."""

    def __init__(self, worker: RemoteWorker, client: str | None = None) -> None:
        self._worker = worker
        #: the hosted client asked for (``connect(..., client=...)``), and its worker once connected
        self._client = client
        self._connected: RemoteWorker | None = None

    def __await__(self) -> Generator[Any, None, RemoteWorker]:
        return self._connect().__await__()

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
                            "uses keys, are server_key and client_key right and is your key allowed?") from None
        except BaseException:
            await self._worker.close_connection(say_goodbye=False)
            raise

    async def __aenter__(self) -> RemoteWorker:
        return await self._connect()

    async def __aexit__(self, *exc: Any) -> None:
        await (self._connected or self._worker).close()
