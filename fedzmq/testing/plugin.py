"""fedzmq's pytest plugin: real worker daemons and in-process workers as fixtures.

Installed with fedzmq (entry point ``pytest11``), so a user's suite needs no conftest:

    async def test_training(fedzmq_daemons):
        bob, alice = await fedzmq_daemons("bob", "alice")
        ptr = await bob.worker.send(torch.ones(3))
        bob.kill()                                  # fault injection on the real process

Works with pytest-asyncio in strict mode (mark the tests ``@pytest.mark.asyncio``) and in auto mode.
Every daemon a test starts is stopped at teardown and must exit cleanly (unless the test killed it);
``fedzmq_daemons_module`` and ``fedzmq_daemons_session`` keep daemons across tests and reset them
after each (pool.py). When a test fails, the tail of each daemon's log is printed. Daemons stop when
the test process dies, however it dies (the launcher's watchdog pipe). At the end of the run the
plugin kills and reports any daemon still alive, and fails the run; at the start, it kills and
reports daemons an earlier run left (leftovers.py). Both reports reach the controller under
pytest-xdist. See docs/testing.md.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping

import pytest

from .. import torchmodes
from ..client.connection import ConnectionSettings
from ..client.worker import VirtualWorker
from ..launcher import DaemonProcess
from ..worker import WorkerConfig
from .daemons import DaemonHandle
from .datasets import DigitsShards, digits_shards, worker_ids
from .leftovers import Leftover, child_daemons, earlier_orphans, kill_orphans, pid_dir
from .pool import DaemonPool, Lease

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the async fixtures need pytest-asyncio; without it they are absent
    pytest_asyncio = None  # type: ignore[assignment]

_STARTED = pytest.StashKey[list[DaemonProcess]]()
_FAILED = pytest.StashKey[bool]()
_STARTED_BY = pytest.StashKey[dict[int, str]]()  # pid of a daemon that is a child of this process -> test
_LEFTOVERS = pytest.StashKey[list[Leftover]]()  # this run's, killed at its end (with xdist: all workers')
_ORPHANS = pytest.StashKey[list[Leftover]]()  # earlier runs', killed at the start of this one
_WORKER_OUTPUT = "fedzmq_leftovers"  # the key of an xdist worker's leftovers in its workeroutput

#: heartbeats for tests: a dead daemon is noticed within about 5 seconds (0.25 s x 20). Not 2 s (x 8): on a
#: loaded CI host a live daemon busy with a round went 2 s without answering, and a test that was not about
#: liveness failed with WorkerDeadError. A late verdict costs seconds in the few tests that kill a daemon; a
#: false one fails a test for nothing. Heartbeats stay every 0.25 s, so a continued daemon is seen at once.
TEST_SETTINGS = ConnectionSettings(heartbeat_interval=0.25, heartbeat_liveness=20, connect_timeout=30.0)

#: in-process workers' settings: the data owner's terms let a few rows make a batch (test data is tiny)
TEST_CONFIG = WorkerConfig(min_batch_size=1, min_metric_rows=1)


def track_daemon(config: pytest.Config, *daemons: DaemonProcess) -> None:
    """Put daemons a test started itself (``DaemonProcess``, ``launcher.start_daemons``) under the
    end-of-session check: if one is still running when the run ends, it is killed and the run fails."""
    config.stash.setdefault(_STARTED, []).extend(daemons)


def _xdist_worker(config: pytest.Config) -> str | None:
    """The id of this pytest-xdist worker (``gw0``), or None in the controller or without xdist."""
    workerinput = getattr(config, "workerinput", None)
    return workerinput.get("workerid", "?") if workerinput is not None else None


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STARTED] = []
    config.stash[_STARTED_BY] = {}
    config.stash[_LEFTOVERS] = []
    config.stash[_ORPHANS] = []
    config.addinivalue_line("markers", "fedzmq_slow: a fedzmq test that takes tens of seconds")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Kill the daemons earlier runs left behind (once: in the controller under xdist)."""
    if _xdist_worker(session.config) is not None:
        return
    directory = pid_dir()
    orphans = earlier_orphans(directory)
    kill_orphans(directory, orphans)
    session.config.stash[_ORPHANS] = orphans


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[Any]:
    """Remember which test started each daemon child of this process, for the end-of-run report."""
    before = set(child_daemons())
    try:
        return (yield)
    finally:
        started_by = item.config.stash[_STARTED_BY]
        for pid in child_daemons().keys() - before:
            started_by.setdefault(pid, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        item.stash[_FAILED] = True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    return (yield from _keeping_torch_modes(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    return (yield from _keeping_torch_modes(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Any:
    return (yield from _keeping_torch_modes(item, "teardown"))


def _keeping_torch_modes(item: pytest.Item, phase: str) -> Any:
    """Fail a test (or its fixtures) that leaves torch's grad mode, inference mode, autocast or default
    dtype changed: a ``no_grad`` held across an ``await`` breaks unrelated code far from the cause.
    The modes are put back (inference mode cannot be), so the next test starts clean."""
    before = torchmodes.snapshot()
    try:
        result = yield
    except BaseException:
        torchmodes.restore(before)  # the test's own failure is the one to report
        raise
    after = torchmodes.snapshot()
    if after != before:
        torchmodes.restore(before)
        changed = "; ".join(before.differences(after))
        pytest.fail(f"{item.nodeid} left torch's thread modes changed after its {phase} ({changed}). Is a "
                    "mode (torch.no_grad(), inference_mode, autocast) held across an await? Coroutines share "
                    "one thread, so the mode leaks into whatever runs next.", pytrace=False)
    return result


def _leftovers(config: pytest.Config) -> list[Leftover]:
    started_by = config.stash.get(_STARTED_BY, {})
    found = {d.pid: Leftover(d.id, d.pid, d.note or started_by.get(d.pid, ""), str(d.log_path))
             for d in config.stash.get(_STARTED, []) if d.running and d.pid is not None}
    for pid, worker_id in child_daemons().items():
        found.setdefault(pid, Leftover(worker_id, pid, started_by.get(pid, "")))
    return list(found.values())


def leftover_daemons(config: pytest.Config) -> list[tuple[str, int]]:
    """Daemons of this run that are still alive, as ``(id, pid)``: tracked ones and child processes."""
    return [(leftover.id, leftover.pid) for leftover in _leftovers(config)]


@pytest.hookimpl(trylast=True)  # after the runner's own sessionfinish tore down what an interrupt left set up
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    leftovers = _leftovers(config)
    tracked = {d.pid: d for d in config.stash.get(_STARTED, [])}
    for leftover in leftovers:
        if leftover.pid in tracked:
            tracked[leftover.pid].kill()
            continue
        try:
            os.kill(leftover.pid, signal.SIGKILL)
            os.waitpid(leftover.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    worker = _xdist_worker(config)
    if worker is not None:  # the controller reports them (pytest_testnodedown): a worker's output is not shown
        config.workeroutput[_WORKER_OUTPUT] = [  # type: ignore[attr-defined]
            {"id": o.id, "pid": o.pid, "test": o.test, "log": o.log, "worker": worker} for o in leftovers]
    config.stash[_LEFTOVERS] += leftovers
    if config.stash[_LEFTOVERS] and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # keep a worse status


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist, in the controller: a worker finished; take over the daemons it found left running."""
    for entry in getattr(node, "workeroutput", {}).get(_WORKER_OUTPUT, []):
        node.config.stash[_LEFTOVERS].append(Leftover(entry["id"], entry["pid"], entry["test"], entry["log"],
                                                      entry["worker"]))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    orphans, leftovers = config.stash.get(_ORPHANS, []), config.stash.get(_LEFTOVERS, [])
    if orphans:
        terminalreporter.section("fedzmq: daemons left by earlier runs", sep="=", yellow=True, bold=True)
        for orphan in orphans:
            terminalreporter.line(f"killed: {orphan.describe()}")
        terminalreporter.line(f"Their runs ended without stopping them (pid files in {pid_dir()}). "
                              "They do not fail this run.")
    if leftovers:
        terminalreporter.section("fedzmq: worker daemons left running by the tests", sep="=", red=True, bold=True)
        for leftover in leftovers:
            terminalreporter.line(f"killed: {leftover.describe()}", red=True)
        terminalreporter.line("They fail the run. Stop the daemons a test starts (DaemonProcess.stop, "
                              "launcher.stop_all), or start them with the fedzmq_daemons fixtures.")


_warmed_up = False


def _warm_up_torch() -> None:
    """Make torch import what it imports lazily on a process's first optimizer (``torch._dynamo``, a
    few seconds), before any worker is connected: done later, inside a test, that import blocks the
    event loop longer than ``TEST_SETTINGS``' heartbeat timeout, and every worker looks dead."""
    global _warmed_up
    if not _warmed_up:
        import torch

        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        _warmed_up = True


def _load_datasets(entries: Mapping[str, Any] | None) -> dict[str, Any] | None:
    from ..worker.datasets import Dataset, load_dataset

    if not entries:
        return None
    return {name: value if isinstance(value, Dataset) else load_dataset(name, value)
            for name, value in entries.items()}


@pytest.fixture
def fedzmq_digits(tmp_path: Path) -> Callable[..., DigitsShards]:
    """A factory of non-IID shards of scikit-learn's digits in ``tmp_path``:
    ``shards = fedzmq_digits("bob", "alice", alpha=0.5, seed=0)``; pass ``datasets=shards`` to
    ``fedzmq_daemons``; ``shards.test`` is the held-out ``(x, y)``."""
    made = 0

    def make(*ids: str | int, alpha: float = 0.5, seed: int = 0, name: str = "digits",
             test_fraction: float = 0.2) -> DigitsShards:
        nonlocal made
        made += 1
        return digits_shards(tmp_path / f"fedzmq-digits-{made}", ids, alpha=alpha, seed=seed, name=name,
                             test_fraction=test_fraction)

    return make


def _pool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str) -> DaemonPool:
    pids = pid_dir()
    pids.parent.mkdir(mode=0o700, exist_ok=True)  # pytest's own folder, private, as pytest makes it
    return DaemonPool(tmp_path_factory.mktemp(name), pid_dir=pids,
                      on_new=lambda process: track_daemon(request.config, process))


def _scoped_pool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 scope: str) -> Iterator[DaemonPool]:
    """A pool whose daemons live for a module or the session; at its end they must exit cleanly."""
    pool = _pool(request, tmp_path_factory, f"fedzmq-{scope}-daemons")
    yield pool
    problems = pool.stop_all()
    if problems:
        for handle in pool.handles.values():
            print(f"\n----- log of daemon {handle.id} ({handle.process.log_path}) -----\n{handle.log_tail()}")
        pytest.fail(f"fedzmq_daemons_{scope}: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def _fedzmq_module_pool(request: pytest.FixtureRequest,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonPool]:
    yield from _scoped_pool(request, tmp_path_factory, "module")


@pytest.fixture(scope="session")
def _fedzmq_session_pool(request: pytest.FixtureRequest,
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonPool]:
    yield from _scoped_pool(request, tmp_path_factory, "session")


def _lease(request: pytest.FixtureRequest, pool: DaemonPool) -> Lease:
    return Lease(pool, request.node.nodeid, TEST_SETTINGS, before_first_start=_warm_up_torch)


async def _end(request: pytest.FixtureRequest, lease: Lease, stop: bool) -> None:
    """Undo a test's use of its daemons (``Lease.end``), print their logs if the test failed, and fail
    it if one exited uncleanly behind its back."""
    problems = await lease.end(stop=stop)
    if request.node.stash.get(_FAILED, False) or problems:
        for handle in lease.used:
            print(f"\n----- log of daemon {handle.id} ({handle.process.log_path}) -----\n{handle.log_tail()}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def fedzmq_virtual_workers() -> AsyncIterator[Callable[..., Awaitable[list[VirtualWorker]]]]:
        """A factory of in-process workers: ``bob, alice = await make("bob", "alice")`` or ``await make(3)``.

        Keyword arguments: ``datasets={"bob": {"toy": path_or_Dataset}}`` (the same form as for
        ``fedzmq_daemons``), and ``config=``, ``models=``, ``settings=`` for every worker. All are
        closed at teardown."""
        _warm_up_torch()
        made: list[VirtualWorker] = []

        async def make(*ids: str | int, datasets: Mapping[str, Mapping[str, Any]] | None = None,
                       settings: ConnectionSettings | None = None, **kwargs: Any) -> list[VirtualWorker]:
            names = worker_ids(ids)
            taken = {str(w.id) for w in made}
            if taken & set(names):
                raise ValueError(f"workers {sorted(taken & set(names))} were made already in this test")
            unknown = set(datasets or {}) - set(names)
            if unknown:
                raise ValueError(f"datasets given for workers that are not made here: {sorted(unknown)}")
            kwargs.setdefault("config", TEST_CONFIG)
            workers = []
            for name in names:
                workers.append(VirtualWorker(name, settings=settings or TEST_SETTINGS,
                                             datasets=_load_datasets((datasets or {}).get(name)), **kwargs))
                made.append(workers[-1])
            for worker in workers:
                await worker.ping()
            return workers

        yield make
        for worker in made:
            await worker.close()

    @pytest_asyncio.fixture
    async def fedzmq_daemons(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                             ) -> AsyncIterator[Callable[..., Awaitable[list[DaemonHandle]]]]:
        """A factory of real daemons on free loopback ports: ``bob, alice = await start("bob", "alice")``.

        Each handle has a connected ``worker`` and fault injection (``kill``, ``stop``/``cont``,
        ``restart``, ``slow``). Keyword arguments: ``datasets={"bob": {"digits": path}}``,
        ``models={"net": "pkg.module:Class"}``, ``keys=True`` (CurveZMQ keys made for the test),
        ``args=[...]`` extra daemon flags for all (or ``{"bob": [...]}``), ``settings=ConnectionSettings(...)``,
        ``timeout=`` seconds to wait for them. The daemons are stopped at the end of the test."""
        lease = _lease(request, _pool(request, tmp_path_factory, "fedzmq-daemons"))
        yield lease.start
        await _end(request, lease, stop=True)

    @pytest_asyncio.fixture
    async def fedzmq_daemons_module(request: pytest.FixtureRequest, _fedzmq_module_pool: DaemonPool
                                    ) -> AsyncIterator[Callable[..., Awaitable[list[DaemonHandle]]]]:
        """``fedzmq_daemons`` whose daemons live for the test module: a later test that asks for the same
        id with the same flags gets the same process, with a new session and its faults undone."""
        lease = _lease(request, _fedzmq_module_pool)
        yield lease.start
        await _end(request, lease, stop=False)

    @pytest_asyncio.fixture
    async def fedzmq_daemons_session(request: pytest.FixtureRequest, _fedzmq_session_pool: DaemonPool
                                     ) -> AsyncIterator[Callable[..., Awaitable[list[DaemonHandle]]]]:
        """``fedzmq_daemons`` whose daemons live for the whole run (for each pytest-xdist worker), reset
        after each test as ``fedzmq_daemons_module``'s are."""
        lease = _lease(request, _fedzmq_session_pool)
        yield lease.start
        await _end(request, lease, stop=False)


__all__ = ["TEST_CONFIG", "TEST_SETTINGS", "leftover_daemons", "track_daemon"]
