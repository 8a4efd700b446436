"""Worker daemons that outlive their test run, and how the plugin finds them.

Earlier runs: every daemon the kit starts has a pid file while it runs (``DaemonProcess(pid_dir=)``
with ``pid_dir()`` below), naming the daemon and its launcher, each by pid and start time. The folder is
beside pytest's numbered base temporary folders, not inside one: the next run with ``--basetemp``
wipes its folder, and pytest deletes all but the last three. A daemon outlives its run only when the
watchdog pipe could not stop it (started with ``watchdog=False``, or a process forked from pytest
kept the pipe open); at the start of the next run ``earlier_orphans`` finds those whose launcher is
gone and which still run.

This run: ``child_daemons`` finds the worker daemons that are live children of this process.
Both need Linux's /proc (elsewhere they find nothing).
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..launcher import process_start_time

#: how a worker daemon shows in a process's command line
DAEMON_MARKS = ("fedzmq.worker", "fedzmq-worker")


@dataclass(frozen=True)
class Leftover:
    """A daemon that outlived what started it."""

    id: str
    pid: int
    #: the test that started it, when known
    test: str = ""
    log: str = ""
    #: the pytest-xdist worker that started it (``gw0``), if any
    worker: str = ""

    def describe(self) -> str:
        details = [f"pid {self.pid}", *([f"xdist worker {self.worker}"] if self.worker else []),
                   *([f"started by {self.test}"] if self.test else []), *([f"log {self.log}"] if self.log else [])]
        return f"{self.id} ({', '.join(details)})"


def pid_dir() -> Path:
    """The folder of the kit's pid files: ``fedzmq-daemons`` in the folder where pytest keeps its base
    temporary folders, ``<temp>/pytest-of-<user>/`` (``$PYTEST_DEBUG_TEMPROOT`` moves it, as it moves
    pytest's). The same for every run of the user, with or without ``--basetemp`` and pytest-xdist."""
    temproot = Path(os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()).resolve()
    try:
        user = getpass.getuser()
    except (ImportError, OSError, KeyError):
        user = "unknown"
    return temproot / f"pytest-of-{user}" / "fedzmq-daemons"


def _argv(pid: int) -> list[str] | None:
    """The command line of a live (not zombie) process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "Z":
            return None
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (OSError, ValueError, IndexError):
        return None


def _is_daemon(argv: list[str] | None) -> bool:
    return argv is not None and any(mark in arg for arg in argv for mark in DAEMON_MARKS)


def _same_process(pid: int, start_time: object) -> bool:
    return start_time is not None and process_start_time(pid) == start_time


def earlier_orphans(directory: Path) -> list[Leftover]:
    """Daemons with a pid file in ``directory`` that still run though their launcher is gone. Pid files
    of daemons that are gone are removed; those whose launcher runs (a run going on beside this one)
    are left alone."""
    found = []
    for path in sorted(directory.glob("*.json")):
        try:
            info = json.loads(path.read_text())
            pid, start_time = int(info["pid"]), info["start_time"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge
        if not (_same_process(pid, start_time) and _is_daemon(_argv(pid))):
            path.unlink(missing_ok=True)  # the daemon is gone (its pid may be another process's now)
            continue
        if _same_process(int(info.get("launcher_pid", 0)), info.get("launcher_start_time")):
            continue
        found.append(Leftover(str(info.get("id", "?")), pid, str(info.get("note", "")), str(info.get("log", ""))))
    return found


def kill_orphans(directory: Path, orphans: list[Leftover], timeout: float = 5.0) -> None:
    """SIGKILL each orphan (after checking once more that its pid file still names that process) and
    remove its pid file. They are not our children: their new parent reaps them."""
    for orphan in orphans:
        path = directory / f"{orphan.pid}.json"
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _same_process(orphan.pid, info.get("start_time")) and _is_daemon(_argv(orphan.pid)):
            try:
                os.kill(orphan.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        path.unlink(missing_ok=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_is_daemon(_argv(o.pid)) for o in orphans):
        time.sleep(0.05)


def child_daemons() -> dict[int, str]:
    """Worker daemons that are live child processes of this one: pid -> id."""
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
            if int(stat[stat.rindex(")") + 2:].split()[1]) != me:
                continue
        except (OSError, ValueError, IndexError):
            continue
        argv = _argv(int(entry))
        if argv is not None and _is_daemon(argv):
            found[int(entry)] = argv[argv.index("--id") + 1] if "--id" in argv[:-1] else "?"
    return found


__all__ = ["Leftover", "child_daemons", "earlier_orphans", "kill_orphans", "pid_dir"]
