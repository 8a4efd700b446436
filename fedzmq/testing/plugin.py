"""fedzmq's pytest plugin: real worker daemons and in-process workers as fixtures.

Installed with fedzmq (entry point ``pytest11``), so a user's suite needs no conftest:

    async def test_training(fedzmq_daemons):
        bob, alice = await fedzmq_daemons("bob", "alice")
        ptr = await bob.worker.send(torch.ones(3))
        bob.kill()                                  # fault injection on the real process

Works with pytest-asyncio in strict and auto mode. Every daemon a test starts is stopped at teardown
and must exit cleanly (unless the test killed it); when a test fails, the tail of each daemon's log is
printed. At the end of the run the plugin fails the session if any daemon it started is still alive.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import pytest

from ..client.connection import ConnectionSettings
from ..client.worker import VirtualWorker
from ..launcher import DaemonProcess
from .daemons import DaemonHandle, daemon_args

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixtures need pytest-asyncio; without it the plugin stays quiet
    pytest_asyncio = None

_STARTED = pytest.StashKey[list[DaemonProcess]]()
_FAILED = pytest.StashKey[bool]()

#: heartbeats for tests: a dead daemon is noticed within about 2 seconds
TEST_SETTINGS = ConnectionSettings(heartbeat_interval=0.25, heartbeat_liveness=8, connect_timeout=30.0)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STARTED] = []
    config.addinivalue_line("markers", "fedzmq_slow: a fedzmq test that takes tens of seconds")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        item.stash[_FAILED] = True


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leftovers = [d for d in session.config.stash.get(_STARTED, []) if d.running]
    if leftovers:
        for daemon in leftovers:
            daemon.kill()
        names = ", ".join(f"{d.id} (pid {d.pid})" for d in leftovers)
        session.config.get_terminal_writer().line(
            f"fedzmq: worker daemons left running by the tests, now killed: {names}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def fedzmq_virtual_workers() -> AsyncIterator[Callable[..., Awaitable[list[VirtualWorker]]]]:
        """A factory of in-process workers: ``await make("bob", "alice")`` or ``await make(3)``."""
        made: list[VirtualWorker] = []

        async def make(*ids: str | int, **kwargs: Any) -> list[VirtualWorker]:
            names = [f"worker{i}" for i in range(ids[0])] if len(ids) == 1 and isinstance(ids[0], int) else list(ids)
            workers = [VirtualWorker(str(n), settings=kwargs.pop("settings", TEST_SETTINGS), **kwargs) for n in names]
            made.extend(workers)
            for w in workers:
                await w.ping()
            return workers

        yield make
        for worker in made:
            await worker.close()

    @pytest_asyncio.fixture
    async def fedzmq_daemons(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Awaitable[list[DaemonHandle]]]]:
        """A factory of real daemons on free loopback ports: ``bob, alice = await start("bob", "alice")``.

        Each handle has a connected ``worker`` and fault injection (``kill``, ``stop``/``cont``,
        ``restart``, ``slow``). Keyword arguments: ``datasets={"bob": {"digits": path}}``,
        ``args=[...]`` extra daemon flags for all, ``settings=ConnectionSettings(...)``."""
        started = request.config.stash.setdefault(_STARTED, [])
        handles: list[DaemonHandle] = []
        log_dir = tempfile.mkdtemp(prefix="fedzmq-test-logs-")

        async def start(*ids: str | int, datasets: dict[str, dict[str, str]] | None = None,
                        args: Sequence[str] = (), settings: ConnectionSettings | None = None,
                        timeout: float = 60.0) -> list[DaemonHandle]:
            names = [f"worker{i}" for i in range(ids[0])] if len(ids) == 1 and isinstance(ids[0], int) else list(ids)
            new = []
            for name in names:
                process = DaemonProcess(str(name), extra_args=daemon_args((datasets or {}).get(str(name)), args),
                                        log_dir=log_dir)
                process.spawn()
                started.append(process)
                new.append(DaemonHandle(process, settings or TEST_SETTINGS))
            handles.extend(new)
            for handle in new:
                await asyncio.to_thread(handle.process.wait_ready, timeout)
                await handle.connect(timeout)
            return new

        yield start

        problems = []
        for handle in handles:
            code = await handle.close()
            if handle.expect_clean_exit and code != 0:
                problems.append(f"daemon {handle.id} exited with code {code}")
        if request.node.stash.get(_FAILED, False) or problems:
            for handle in handles:
                print(f"\n----- log of daemon {handle.id} ({handle.process.log_path}) -----\n{handle.log_tail()}")
        if problems:
            pytest.fail("; ".join(problems))
        if os.environ.get("FEDZMQ_KEEP_LOGS") is None:
            for handle in handles:
                try:
                    handle.process.log_path.unlink()
                except OSError:
                    pass
