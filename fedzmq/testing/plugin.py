"""fedzmq's pytest plugin: real worker daemons and in-process workers as fixtures.

Installed with fedzmq (entry point ``pytest11``), so a user's suite needs no conftest:

    async def test_training(fedzmq_daemons):
        bob, alice = await fedzmq_daemons("bob", "alice")
        ptr = await bob.worker.send(torch.ones(3))
        bob.kill()                                  # fault injection on the real process

Works with pytest-asyncio in strict mode (mark the tests ``@pytest.mark.asyncio``) and in auto mode.
Every daemon a test starts is stopped at teardown and must exit cleanly (unless the test killed it);
when a test fails, the tail of each daemon's log is printed. At the end of the run the plugin fails
the session if a daemon is still alive: one it started, one registered with ``track_daemon``, or any
``fedzmq.worker`` child process of the test run. See docs/testing.md.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Sequence

import pytest

from .. import torchmodes
from ..client.connection import ConnectionSettings
from ..client.worker import VirtualWorker
from ..launcher import DaemonProcess
from ..worker import WorkerConfig
from .daemons import DaemonHandle, PathLike, daemon_args
from .datasets import DigitsShards, digits_shards, worker_ids

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the async fixtures need pytest-asyncio; without it they are absent
    pytest_asyncio = None

_STARTED = pytest.StashKey[list[DaemonProcess]]()
_FAILED = pytest.StashKey[bool]()

#: heartbeats for tests: a dead daemon is noticed within about 2 seconds (0.25 s x 8)
TEST_SETTINGS = ConnectionSettings(heartbeat_interval=0.25, heartbeat_liveness=8, connect_timeout=30.0)

#: in-process workers' settings: the data owner's terms let a few rows make a batch (test data is tiny)
TEST_CONFIG = WorkerConfig(min_batch_size=1, min_metric_rows=1)

#: how a worker daemon shows in a process's command line
_DAEMON_MARKS = ("fedzmq.worker", "fedzmq-worker")


def track_daemon(config: pytest.Config, *daemons: DaemonProcess) -> None:
    """Put daemons a test started itself (``DaemonProcess``, ``launcher.start_daemons``) under the
    end-of-session check: if one is still running when the run ends, it is killed and the run fails."""
    config.stash.setdefault(_STARTED, []).extend(daemons)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STARTED] = []
    config.addinivalue_line("markers", "fedzmq_slow: a fedzmq test that takes tens of seconds")


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


def _child_daemons() -> dict[int, str]:
    """Worker daemons that are live child processes of this one: pid -> id (Linux only; else empty)."""
    found: dict[int, str] = {}
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) != me or fields[0] == "Z":
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue
        if any(mark in arg for arg in argv for mark in _DAEMON_MARKS):
            worker_id = argv[argv.index("--id") + 1] if "--id" in argv[:-1] else "?"
            found[int(entry)] = worker_id
    return found


def leftover_daemons(config: pytest.Config) -> list[tuple[str, int]]:
    """Daemons of this run that are still alive, as ``(id, pid)``: tracked ones and child processes."""
    tracked = [d for d in config.stash.get(_STARTED, []) if d.running]
    leftovers = [(d.id, d.pid) for d in tracked if d.pid is not None]
    known = {pid for _, pid in leftovers}
    leftovers += [(worker_id, pid) for pid, worker_id in _child_daemons().items() if pid not in known]
    return leftovers


@pytest.hookimpl(trylast=True)  # after the runner's own sessionfinish tore down what an interrupt left set up
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leftovers = leftover_daemons(session.config)
    if not leftovers:
        return
    tracked = {d.pid: d for d in session.config.stash.get(_STARTED, [])}
    for worker_id, pid in leftovers:
        if pid in tracked:
            tracked[pid].kill()
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    names = ", ".join(f"{worker_id} (pid {pid})" for worker_id, pid in leftovers)
    message = f"fedzmq: worker daemons left running by the tests, now killed: {names}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, red=True, bold=True)
    else:  # pragma: no cover - running without the terminal reporter
        print(message)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):  # keep a worse status
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
            taken = {w.id for w in made}
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
        ``timeout=`` seconds to wait for them."""
        started = request.config.stash.setdefault(_STARTED, [])
        handles: list[DaemonHandle] = []
        base = tmp_path_factory.mktemp("fedzmq-daemons")
        log_dir = base / "logs"
        key_dir = base / "keys"

        def make_keys(name: str) -> tuple[list[str], dict[str, Path]]:
            from ..security import generate_keypair

            client_public = key_dir / "allowed" / "client.key"
            if not client_public.exists():
                generate_keypair(key_dir / "client", "client")
                client_public.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(key_dir / "client" / "client.key", client_public)
            public, secret = generate_keypair(key_dir / name, name)
            return (["--secret-key", str(secret), "--allowed-keys", str(client_public.parent)],
                    {"server_key": public, "client_key": key_dir / "client" / "client.key_secret"})

        async def start(*ids: str | int, datasets: Mapping[str, Mapping[str, PathLike]] | None = None,
                        models: Mapping[str, str] | None = None, keys: bool = False,
                        args: Sequence[str] | Mapping[str, Sequence[str]] = (),
                        settings: ConnectionSettings | None = None, timeout: float = 60.0) -> list[DaemonHandle]:
            names = worker_ids(ids)
            taken = {h.id for h in handles}
            if taken & set(names):
                raise ValueError(f"daemons {sorted(taken & set(names))} were started already in this test")
            unknown = (set(datasets or {}) | (set(args) if isinstance(args, Mapping) else set())) - set(names)
            if unknown:
                raise ValueError(f"datasets or args given for daemons that are not started here: {sorted(unknown)}")
            new = []
            for name in names:
                extra = list(args.get(name, ()) if isinstance(args, Mapping) else args)
                key_args, key_files = make_keys(name) if keys else ([], {})
                process = DaemonProcess(name, extra_args=daemon_args((datasets or {}).get(name), [*key_args, *extra],
                                                                     models), log_dir=log_dir)
                handle = DaemonHandle(process, settings or TEST_SETTINGS, **key_files)
                handles.append(handle)
                new.append(handle)
                process.spawn()  # all start before any is waited for: their imports of torch overlap
                started.append(process)
            if not _warmed_up:  # while the daemons start
                await asyncio.to_thread(_warm_up_torch)
            for handle in new:
                try:
                    await asyncio.to_thread(handle.process.wait_ready, timeout)
                except BaseException:
                    handle.expect_clean_exit = False  # its failure to start is the error to report
                    raise
                await handle.connect(timeout)
            return new

        yield start

        problems = []
        try:
            for handle in handles:
                try:
                    await handle.close_connection()
                except Exception as exc:  # still stop every daemon
                    problems.append(f"closing the connection to daemon {handle.id} failed: {exc!r}")
        finally:
            for handle in handles:  # signal all first: they shut down in parallel
                handle.process.signal_stop()
            for handle in handles:
                code = await asyncio.to_thread(handle.process.stop)
                if handle.expect_clean_exit and code != 0:
                    problems.append(f"daemon {handle.id} exited with code {code}")
        if request.node.stash.get(_FAILED, False) or problems:
            for handle in handles:
                print(f"\n----- log of daemon {handle.id} ({handle.process.log_path}) -----\n{handle.log_tail()}")
        if problems:
            pytest.fail("; ".join(problems), pytrace=False)


__all__ = ["TEST_CONFIG", "TEST_SETTINGS", "leftover_daemons", "track_daemon"]
