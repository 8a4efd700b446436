"""``VirtualWorker``: a worker in this process, the daemon's own code behind an ``inproc://`` socket."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Generator

import zmq.asyncio

from ..errors import WorkerClosedError
from ..modeldesc import ModelRegistry
from ..worker import Worker, WorkerConfig
from ..worker.datasets import Dataset
from .connection import ConnectionSettings
from .futures import retrieve_error
from .worker import RemoteWorker


class VirtualWorker(RemoteWorker):
    """A worker in this process: the daemon's own code behind an ``inproc://`` socket.

    ``bob = fz.VirtualWorker("bob")`` is usable at once from a coroutine; ``async with`` or
    ``await bob.close()`` stops it."""

    def __init__(self, worker_id: str, *, config: WorkerConfig | None = None, models: ModelRegistry | None = None,
                 datasets: "dict[str, Dataset] | None" = None, settings: ConnectionSettings | None = None,
                 context: zmq.asyncio.Context | None = None) -> None:
        context = context or zmq.asyncio.Context.instance()
        self.server = Worker(worker_id, config=config, models=models, datasets=datasets, context=context,
                             in_process=True)
        address = self.server.bind(f"inproc://fedzmq-{worker_id}-{uuid.uuid4().hex}")
        super().__init__(address, settings=settings, context=context)
        self._server_closing: asyncio.Future[None] | None = None
        self._announced = False
        self.id = worker_id
        self.instance = self.server.instance
        self._connection.adopt_worker_limits(self.server.ping_info()["limits"])  # as connect() would
        self._connection.adopt_features(self.server.ping_info()["features"])
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # made outside a coroutine: serving starts with the first request
        else:
            self.server.start()

    def _before_request(self) -> None:
        if not self._closed:  # once closed, the request fails as on any closed worker (WorkerClosedError)
            self.server.start()
            if not self._announced:  # what connect()'s ping tells a daemon (the pieces this client reads)
                self._announced = True
                self._connection.submit("ping", self._connection.announce()).add_done_callback(retrieve_error)

    async def __aenter__(self) -> "VirtualWorker":
        if self._closed:
            raise WorkerClosedError(f"in-process worker {self.id!r} was closed")
        self.server.start()
        return self

    async def _close(self) -> None:
        try:
            await super()._close()
        finally:  # a close that was cancelled (even twice) still stops the in-process daemon
            if self._server_closing is None:
                self._server_closing = asyncio.ensure_future(self.server.close())
            await asyncio.shield(self._server_closing)

    def __await__(self) -> Generator[Any, None, "VirtualWorker"]:
        async def ready() -> VirtualWorker:
            await self.ping()
            return self
        return ready().__await__()
