"""A started daemon as a test sees it: a connected worker plus fault injection."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..client.connection import ConnectionSettings
from ..client.worker import RemoteWorker
from ..launcher import DaemonProcess

PathLike = str | os.PathLike[str]


class DaemonHandle:
    """One daemon started by the ``fedzmq_daemons`` fixture.

    ``worker`` is a connected ``RemoteWorker``. The fault-injection calls act on the real process:
    ``kill()`` (SIGKILL), ``stop()``/``cont()`` (SIGSTOP/SIGCONT), ``restart()`` (same id and address),
    ``slow(seconds)`` (every later command waits that long before it runs; pings stay prompt).
    """

    def __init__(self, process: DaemonProcess, settings: ConnectionSettings | None = None, *,
                 server_key: Path | None = None, client_key: Path | None = None) -> None:
        self.process = process
        self.settings = settings
        #: the daemon's public key file and the client's secret key file, when started with ``keys=True``
        self.server_key = server_key
        self.client_key = client_key
        self.worker: RemoteWorker | None = None
        #: teardown checks the exit code is 0 unless this is False (``kill()`` sets it)
        self.expect_clean_exit = True
        self.stopped = False
        self.delay = 0.0

    @property
    def id(self) -> str:
        return self.process.id

    @property
    def address(self) -> str:
        assert self.process.address is not None, f"daemon {self.id} has not started"
        return self.process.address

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def running(self) -> bool:
        """True while the process exists (also while it is stopped with ``stop()``)."""
        return self.process.running

    def connection_keys(self) -> dict[str, Any]:
        """Keyword arguments for ``fz.connect`` / ``RemoteWorker`` to reach this daemon (keys, if any)."""
        if self.server_key is None:
            return {}
        return {"server_key": self.server_key, "client_key": self.client_key}

    async def connect(self, timeout: float = 30.0) -> RemoteWorker:
        """Open ``worker``: a session with the daemon, once it answered a ping."""
        worker = RemoteWorker(self.address, settings=self.settings, **self.connection_keys())
        try:
            await asyncio.wait_for(worker.connect(), timeout)
        except BaseException:
            await worker.close_connection(say_goodbye=False)
            raise
        self.worker = worker
        return worker

    # --- fault injection -------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash would. The client notices through missed heartbeats."""
        self.process.kill()
        self.expect_clean_exit = False
        self.stopped = False

    def stop(self) -> None:
        """SIGSTOP: the daemon hangs, answering nothing (not even pings), until ``cont()``."""
        self.process.pause()
        self.stopped = True

    def cont(self) -> None:
        """SIGCONT: a stopped daemon carries on where it was (``wait_answering()`` waits for that)."""
        self.process.resume()
        self.stopped = False

    async def restart(self, timeout: float = 60.0) -> RemoteWorker:
        """Start the daemon again (same id, same address, same flags) and wait until ``worker`` answers.

        ``timeout`` is as long as the fixtures wait for a first start (``Lease.start``): a restart is the
        same start, Python and torch imported afresh, and 30 s was too short on a loaded 2-core CI host.

        A running daemon is stopped cleanly first; a killed one is just started again. The same
        ``worker`` object reconnects by itself (ZeroMQ reconnects to the address), but its session and
        objects on the old process are gone: ``worker.instance`` is the new process's."""
        self.stopped = False
        await asyncio.to_thread(self.process.restart, timeout)
        self.expect_clean_exit = True
        self.delay = 0.0
        if self.worker is None:
            return await self.connect(timeout)
        await self.wait_answering(timeout)
        await self.worker.refresh(timeout=timeout)
        return self.worker

    async def slow(self, seconds: float) -> None:
        """Delay every later command of this daemon by ``seconds`` (0 to stop). Pings stay prompt."""
        assert self.worker is not None
        await self.worker.request("debug_delay", {"seconds": float(seconds)}, timeout=10.0)
        self.delay = float(seconds)

    async def wait_answering(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until ``worker`` answers a ping (after ``cont()`` or ``restart()``); returns the ping."""
        assert self.worker is not None
        async with asyncio.timeout(timeout):
            while True:
                if self.worker.alive:
                    try:
                        return await self.worker.ping(timeout=1.0)
                    except Exception:  # still down, or declared dead while we waited
                        pass
                await asyncio.sleep(0.05)

    # --- teardown --------------------------------------------------------------------------------

    async def close_connection(self) -> None:
        """Undo lasting faults (a stopped or slowed daemon) and end the session, without stopping it."""
        if self.stopped:
            self.cont()
        if self.worker is None:
            return
        if self.delay and self.process.running:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.wait_answering(5.0), 6.0)
                await self.worker.request("debug_delay", {"seconds": 0.0}, timeout=2.0)
                self.delay = 0.0
        await self.worker.close_connection(say_goodbye=self.process.running)

    async def close(self) -> int | None:
        """Close the connection and stop the daemon (SIGTERM); returns its exit code."""
        await self.close_connection()
        return await asyncio.to_thread(self.process.stop)

    def log_tail(self, lines: int = 30) -> str:
        return self.process.log_tail(lines)

    def __repr__(self) -> str:
        return f"<DaemonHandle {self.id} {self.process.address} pid={self.process.pid}>"


#: the data owner's terms a test daemon starts with: test data is a few rows (the seed's toy data has
#: two per worker), so one row may make a batch and a metric. Pass ``args=["--min-batch-size", "16"]``
#: (any flag given later wins) to test code against an owner's real terms.
TEST_TERMS = ["--min-batch-size", "1", "--min-metric-rows", "1"]


def daemon_args(datasets: Mapping[str, PathLike] | None, extra: Sequence[str] = (),
                models: Mapping[str, str] | None = None) -> list[str]:
    """The ``fedzmq-worker`` flags for one test daemon: fault injection, test terms, ``--data``,
    ``--model``, then the extras (which win over the terms)."""
    args = ["--fault-injection", *TEST_TERMS]
    for name, path in (datasets or {}).items():
        args += ["--data", f"{name}={os.fspath(path)}"]
    for name, target in (models or {}).items():
        args += ["--model", f"{name}={target}"]
    return [*args, *extra]


__all__ = ["DaemonHandle", "daemon_args"]
