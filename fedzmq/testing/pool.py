"""The daemons behind the ``fedzmq_daemons*`` fixtures: a pool per fixture scope, a lease per test.

A ``DaemonPool`` holds the daemons of one scope (a test, a module, the session) by id, with the
folders of their logs and keys. A ``Lease`` is one test's use of a pool: its ``start(*ids, ...)`` is
the factory the fixture yields, and ``end()`` undoes what the test changed. With ``fedzmq_daemons``
the pool lives as long as the test and ``end(stop=True)`` stops everything. With
``fedzmq_daemons_module`` and ``fedzmq_daemons_session`` the pool outlives the test, and a daemon
that a later test asks for with the same flags is the same process, reset:

- each test gets its own session (a new connection); the previous test's session was closed, so
  its objects are gone;
- faults are undone when the test ends: a stopped daemon is continued, a slowed one sped up;
- a daemon the test killed is started again (same id, same address) when a later test asks for it,
  and so is one whose session could not be closed (its client had declared it dead);
- a daemon that died without the test asking for it (a crash) fails that test at teardown;
- asked for with other flags (datasets, models, keys, args), a daemon is replaced by a new one.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..client.connection import ConnectionSettings
from ..launcher import DaemonProcess
from .daemons import DaemonHandle, PathLike, daemon_args
from .datasets import worker_ids


class DaemonPool:
    """The daemons of one fixture scope, by id."""

    def __init__(self, base: Path, *, pid_dir: Path | None = None,
                 on_new: Callable[[DaemonProcess], None] = lambda process: None) -> None:
        self.base = base
        self.log_dir = base / "logs"
        self.key_dir = base / "keys"
        self.pid_dir = pid_dir
        self.on_new = on_new  # told of every new DaemonProcess (the end-of-run check tracks them)
        self.handles: dict[str, DaemonHandle] = {}
        self.needs_restart: set[str] = set()
        self._flags: dict[str, tuple[list[str], bool]] = {}  # id -> (daemon flags, keys) it runs with
        self._retired: list[DaemonHandle] = []  # replaced by a daemon of the same id with other flags

    def _keys(self, name: str) -> tuple[list[str], dict[str, Path]]:
        """Key pairs for daemon ``name`` and for the client (made once per pool)."""
        from ..security import generate_keypair

        client_public = self.key_dir / "allowed" / "client.key"
        if not client_public.exists():
            generate_keypair(self.key_dir / "client", "client")
            client_public.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.key_dir / "client" / "client.key", client_public)
        public, secret = self.key_dir / name / f"{name}.key", self.key_dir / name / f"{name}.key_secret"
        if not secret.exists():
            public, secret = generate_keypair(self.key_dir / name, name)
        return (["--secret-key", str(secret), "--allowed-keys", str(client_public.parent)],
                {"server_key": public, "client_key": self.key_dir / "client" / "client.key_secret"})

    def prepare(self, name: str, flags: list[str], keys: bool, note: str) -> tuple[DaemonHandle, bool]:
        """The handle of daemon ``name`` with these flags, and whether it must be (re)started."""
        existing = self.handles.get(name)
        if existing is not None and self._flags[name] == (flags, keys):
            return existing, not existing.running or name in self.needs_restart
        key_args, key_files = self._keys(name) if keys else ([], {})
        process = DaemonProcess(name, extra_args=[*key_args, *flags], log_dir=self.log_dir, pid_dir=self.pid_dir,
                                note=note)
        if existing is not None:
            self._retired.append(existing)
        self.handles[name] = DaemonHandle(process, server_key=key_files.get("server_key"),
                                          client_key=key_files.get("client_key"))
        self._flags[name] = (flags, keys)
        self.needs_restart.discard(name)
        self.on_new(process)
        return self.handles[name], True

    def stop_retired(self) -> list[str]:
        problems = _stop(self._retired)
        self._retired.clear()
        return problems

    def stop_all(self) -> list[str]:
        """Stop every daemon (in parallel); returns the unclean exits nobody asked for."""
        problems = _stop([*self._retired, *self.handles.values()])
        self._retired.clear()
        return problems


def _stop(handles: Sequence[DaemonHandle]) -> list[str]:
    for handle in handles:  # signal all first: they shut down in parallel
        handle.process.signal_stop()
    problems = []
    for handle in handles:
        code = handle.process.stop()
        if handle.expect_clean_exit and code != 0:
            problems.append(f"daemon {handle.id} exited with code {code}")
        handle.expect_clean_exit = False  # judged once
    return problems


class Lease:
    """One test's use of a pool: ``start`` is the factory a fixture yields, ``end`` resets."""

    def __init__(self, pool: DaemonPool, note: str, settings: ConnectionSettings,
                 before_first_start: Callable[[], None] = lambda: None) -> None:
        self.pool = pool
        self.note = note  # the test, written into the pid files of the daemons it starts
        self.settings = settings
        self.before_first_start = before_first_start  # run in a thread while the first daemons start
        self.used: list[DaemonHandle] = []
        self.problems: list[str] = []

    async def start(self, *ids: str | int, datasets: Mapping[str, Mapping[str, PathLike]] | None = None,
                    models: Mapping[str, str] | None = None, keys: bool = False,
                    args: Sequence[str] | Mapping[str, Sequence[str]] = (),
                    settings: ConnectionSettings | None = None, timeout: float = 60.0) -> list[DaemonHandle]:
        names = worker_ids(ids)
        taken = {h.id for h in self.used}
        if taken & set(names):
            raise ValueError(f"daemons {sorted(taken & set(names))} were started already in this test")
        unknown = (set(datasets or {}) | (set(args) if isinstance(args, Mapping) else set())) - set(names)
        if unknown:
            raise ValueError(f"datasets or args given for daemons that are not started here: {sorted(unknown)}")
        chosen, starting = [], []
        for name in names:
            extra = list(args.get(name, ()) if isinstance(args, Mapping) else args)
            handle, must_start = self.pool.prepare(name, daemon_args((datasets or {}).get(name), extra, models),
                                                   keys, self.note)
            handle.settings = settings or self.settings
            chosen.append(handle)
            if must_start:
                starting.append(handle)
        self.used += chosen
        self.problems += await asyncio.to_thread(self.pool.stop_retired)
        try:
            for handle in starting:
                handle.expect_clean_exit = False  # until it answers: an interrupted start is not a crash
                if handle.running:  # to be restarted
                    await asyncio.to_thread(handle.process.stop)
                handle.process.note = self.note
                handle.process.spawn()  # all start before any is waited for: their imports of torch overlap
                self.pool.needs_restart.discard(handle.id)
            if starting:
                await asyncio.to_thread(self.before_first_start)
            for handle in starting:
                await asyncio.to_thread(handle.process.wait_ready, timeout)
            for handle in chosen:
                await handle.connect(timeout)
                handle.expect_clean_exit, handle.stopped, handle.delay = True, False, 0.0
        except BaseException:  # a daemon that failed to start, or Ctrl-C: stop what this call started
            for handle in starting:
                handle.process.signal_stop()
            raise
        return chosen

    async def end(self, stop: bool = False) -> list[str]:
        """Close the test's sessions and undo its faults; with ``stop``, stop every daemon of the pool.
        Returns the problems to fail the test with (daemons that exited uncleanly behind its back)."""
        problems, self.problems = self.problems, []
        for handle in self.used:
            worker = handle.worker
            clean = worker is not None and worker.alive and handle.running  # a stopped one is continued first
            try:
                await handle.close_connection()
            except Exception as exc:  # still reset every daemon
                problems.append(f"closing the connection to daemon {handle.id} failed: {exc!r}")
                clean = False
            if worker is not None and (not clean or handle.delay):
                self.pool.needs_restart.add(handle.id)  # its session, or its delay, may be left on it
        if stop:
            return problems + await asyncio.to_thread(self.pool.stop_all)
        for handle in self.used:
            if not handle.running and handle.expect_clean_exit:
                code = await asyncio.to_thread(handle.process.stop)  # reaps it
                problems.append(f"daemon {handle.id} exited with code {code}")
                handle.expect_clean_exit = False
        return problems


__all__ = ["DaemonPool", "Lease"]
