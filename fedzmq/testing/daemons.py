"""A started daemon as a test sees it: a connected worker plus fault injection."""

from __future__ import annotations

import asyncio
from typing import Sequence

from ..client.connection import ConnectionSettings
from ..client.worker import RemoteWorker, connect
from ..launcher import DaemonProcess


class DaemonHandle:
    """One daemon started by the ``fedzmq_daemons`` fixture.

    ``worker`` is a connected ``RemoteWorker``. The fault-injection calls act on the real process:
    ``kill()`` (SIGKILL), ``stop()``/``cont()`` (SIGSTOP/SIGCONT), ``restart()`` (same id and address),
    ``slow(seconds)`` (every later command waits that long before it runs).
    """

    def __init__(self, process: DaemonProcess, settings: ConnectionSettings | None = None) -> None:
        self.process = process
        self.settings = settings
        self.worker: RemoteWorker | None = None
        self.expect_clean_exit = True

    @property
    def id(self) -> str:
        return self.process.id

    @property
    def address(self) -> str:
        assert self.process.address is not None
        return self.process.address

    async def connect(self, timeout: float = 30.0) -> RemoteWorker:
        worker = RemoteWorker(self.address, settings=self.settings)
        await asyncio.wait_for(worker.connect(), timeout)
        self.worker = worker
        return worker

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash would."""
        self.process.kill()
        self.expect_clean_exit = False

    def stop(self) -> None:
        """SIGSTOP: the daemon hangs, answering nothing, until ``cont()``."""
        self.process.pause()

    def cont(self) -> None:
        """SIGCONT: a stopped daemon carries on where it was."""
        self.process.resume()

    async def restart(self, timeout: float = 30.0) -> RemoteWorker:
        """Start the daemon again (same id, same address) and wait until ``worker`` answers again.

        The same ``worker`` object reconnects by itself (ZeroMQ reconnects to the address), but its
        session and objects on the old process are gone: ``worker.refresh()`` notices the new instance."""
        await asyncio.to_thread(self.process.restart, timeout)
        self.expect_clean_exit = True
        if self.worker is None:
            return await self.connect(timeout)
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await self.worker.refresh(timeout=2.0)
                    return self.worker
                except Exception:  # still declared dead, or the reconnect is under way
                    await asyncio.sleep(0.1)

    async def slow(self, seconds: float) -> None:
        """Delay every later command of this daemon by ``seconds`` (0 to stop). Pings stay prompt."""
        assert self.worker is not None
        await self.worker._request("debug_delay", {"seconds": float(seconds)}, timeout=10.0)

    async def close(self) -> int | None:
        """Close the connection and stop the daemon; returns its exit code."""
        if self.worker is not None:
            await self.worker._connection.close(say_goodbye=self.process.running)
        return await asyncio.to_thread(self.process.stop)

    def log_tail(self, lines: int = 30) -> str:
        return self.process.log_tail(lines)

    def __repr__(self) -> str:
        return f"<DaemonHandle {self.id} {self.process.address} pid={self.process.pid}>"


def daemon_args(datasets: dict[str, str] | None, extra: Sequence[str]) -> list[str]:
    args = ["--fault-injection"]
    for name, path in (datasets or {}).items():
        args += ["--data", f"{name}={path}"]
    return [*args, *extra]


__all__ = ["DaemonHandle", "daemon_args"]
