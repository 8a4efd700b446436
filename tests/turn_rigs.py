"""Set-ups that hold the process's generator turn (``GENERATOR_TURN``) as an embedded engine's seeded fit
would, for tests of what waits behind it. test_h38 and test_h40 each wrote these out per test; one copy here
keeps their tear-down order (give the turn back, then let what waited end, then close) the same everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

import fedzmq as fz
from fedzmq.client.connection import ConnectionSettings
from fedzmq.worker.randomness import GENERATOR_TURN


def hold_turn_until(release: threading.Event, held: threading.Event) -> None:
    """An embedded engine's torch thread in a long seeded dropout fit: it holds the process's generator
    turn until told (the daemon's own drawing commands wait for it on their torch thread)."""
    with GENERATOR_TURN:
        held.set()
        release.wait(60)


class TurnHolder:
    """A thread that takes the generator turn when ``take`` is called and gives it back on ``release``
    (which ``held_generator_turn`` calls however the test ends, so no waiter is left for the 60 s)."""

    def __init__(self) -> None:
        self._release, self._held = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=hold_turn_until, args=(self._release, self._held))

    def take(self) -> None:
        """Start holding the turn; returns once it is held (so what is sent next waits for it)."""
        self._thread.start()
        if not self._held.wait(10):
            raise TimeoutError("the generator turn was not taken within 10 s")

    def release(self) -> None:
        self._release.set()
        if self._thread.is_alive():
            self._thread.join(10)


@contextlib.contextmanager
def held_generator_turn() -> Iterator[TurnHolder]:
    """A ``TurnHolder`` whose turn, if taken, is given back when the block ends."""
    holder = TurnHolder()
    try:
        yield holder
    finally:
        holder.release()


@dataclass
class TurnRig:
    """An in-process daemon, clients connected to it, the turn holder, and the calls the test left running
    (``pending``: each is waited for once the turn is given back)."""

    server: fz.Worker
    address: str
    turn: TurnHolder
    workers: list[fz.RemoteWorker] = field(default_factory=list)
    pending: list[asyncio.Future[Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def in_process_server_with_turn(config: fz.WorkerConfig, clients: int, settings: ConnectionSettings,
                                      **connect: Any) -> AsyncIterator[TurnRig]:
    """An in-process worker "bob" on loopback tcp under ``config`` and ``clients`` clients connected to it
    (``connect``: ``fz.connect``'s keyword arguments besides ``settings``; ``client_key`` may be a list, one
    per client). Torn down in the order that leaves nothing waiting: the turn given back, the pending calls
    ended (60 s at most), the clients closed, the server closed."""
    server = fz.Worker("bob", config=config)
    address = server.bind("tcp://127.0.0.1:0")
    server.start()
    keys = connect.pop("client_key", None)
    with held_generator_turn() as turn:
        rig = TurnRig(server, address, turn)
        try:
            for i in range(clients):
                key = {"client_key": keys[i]} if keys is not None else {}
                rig.workers.append(await fz.connect(address, settings=settings, **connect, **key))
            yield rig
        finally:
            turn.release()
            await asyncio.wait_for(asyncio.gather(*rig.pending, return_exceptions=True), 60)
            for worker in rig.workers:
                await worker.close()
            await server.close()
