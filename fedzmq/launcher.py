"""Start, watch and stop worker daemons as local subprocesses (the launcher script, demos, tests).

A ``DaemonProcess`` is one ``fedzmq-worker`` process: it starts it, waits for its ``ready at`` line,
knows its address (so ``restart()`` comes back at the same one), and stops it with SIGTERM, checking
the exit code. Fault injection for tests is a method each: ``kill()``, ``pause()``/``resume()``.

Daemons die with their launcher: each gets the read end of a pipe whose write end only the launcher
holds (``fedzmq.worker.watchdog``), so when the launcher exits, killed or not, the daemon stops. Pass
``watchdog=False`` for a daemon meant to outlive the process that started it. Each daemon runs in its
own process group, so a Ctrl-C in the terminal reaches the launcher alone, which stops its daemons
(or dies, and the pipe stops them).

With ``pid_dir=``, a file ``<pid>.json`` in that folder describes the daemon while it runs: its pid
and start time, its id, address and log, and the launcher's pid and start time. A daemon that
outlived its launcher (one started without the watchdog, or one whose pipe a process forked from the
launcher kept open) is found there later; ``fedzmq.testing.leftovers`` does that for test runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import FedzmqError
from .worker.watchdog import WATCHDOG_ENV

READY_MARK = " ready at "


class DaemonError(FedzmqError, RuntimeError):
    """A daemon did not start, or did not stop cleanly."""


class DaemonProcess:
    def __init__(self, worker_id: str, bind: str = "tcp://127.0.0.1:0", extra_args: Sequence[str] = (),
                 log_dir: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
                 watchdog: bool = True, pid_dir: str | os.PathLike[str] | None = None, note: str = "") -> None:
        self.id = worker_id
        self.bind = bind
        self.extra_args = list(extra_args)
        self.address: str | None = None
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="fedzmq-logs-")) / f"{worker_id}.log"
        self.env = env
        #: the daemon stops when this process exits (False: it may outlive it)
        self.watchdog = watchdog
        self.process: subprocess.Popen[bytes] | None = None
        self._stop_sent = False
        self._watchdog_fd: int | None = None  # our end of the pipe; its closing tells the daemon to stop
        #: where ``<pid>.json`` describes the running daemon (None: nowhere), and a note written in it
        self.pid_dir = Path(pid_dir) if pid_dir is not None else None
        self.note = note
        self._pid_file: Path | None = None

    @property
    def command(self) -> list[str]:
        bind = self.address or self.bind  # after the first start, keep the port the system chose
        return [sys.executable, "-m", "fedzmq.worker", "--id", self.id, "--bind", bind, *self.extra_args]

    def start(self, timeout: float = 30.0) -> str:
        """Start the daemon and wait until it is bound; returns its address."""
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process without waiting for it (``wait_ready`` then waits)."""
        if self.running:
            raise DaemonError(f"daemon {self.id} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        env.pop(WATCHDOG_ENV, None)  # a pipe of whoever started us is not the daemon's
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()  # a start after a crash or a kill: the old process's output
        self._reaped()  # and its watchdog pipe and pid file
        pass_fds: tuple[int, ...] = ()
        if self.watchdog:
            read_end, self._watchdog_fd = os.pipe()  # both non-inheritable: no other child holds them
            env[WATCHDOG_ENV] = str(read_end)
            pass_fds = (read_end,)
        try:
            with open(self.log_path, "ab") as log:
                # its own process group: a Ctrl-C in the terminal is for the launcher to handle (and
                # it stops its daemons), not a SIGINT that kills the daemon half-started behind its back
                self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=log, env=env, pass_fds=pass_fds, process_group=0)
        except BaseException:
            self._reaped()
            raise
        finally:
            for fd in pass_fds:
                os.close(fd)  # the daemon has its copy
        self._stop_sent = False
        self._write_pid_file()

    def _write_pid_file(self) -> None:
        if self.pid_dir is None or self.process is None:
            return
        me = os.getpid()
        info = {"pid": self.process.pid, "start_time": process_start_time(self.process.pid), "id": self.id,
                "address": self.address or self.bind, "log": str(self.log_path), "note": self.note,
                "launcher_pid": me, "launcher_start_time": process_start_time(me),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        path = self.pid_dir / f"{self.process.pid}.json"
        partial = path.with_suffix(".part")
        partial.write_text(json.dumps(info))
        os.replace(partial, path)  # a reader never sees half a file
        self._pid_file = path

    def _reaped(self) -> None:
        """The process is gone (or about to be replaced): close our end of its pipe, remove its pid file."""
        if self._watchdog_fd is not None:
            os.close(self._watchdog_fd)
            self._watchdog_fd = None
        if self._pid_file is not None:
            self._pid_file.unlink(missing_ok=True)
            self._pid_file = None

    def wait_ready(self, timeout: float = 30.0) -> str:
        self.address = self._wait_ready(timeout)
        self._write_pid_file()  # now with the address the system chose
        return self.address

    def _wait_ready(self, timeout: float) -> str:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        buffered = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(timeout=min(0.2, max(0.0, deadline - time.monotonic()))):
                    chunk = os.read(self.process.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    buffered += chunk
                    for line in buffered.decode(errors="replace").splitlines():
                        if READY_MARK in line:
                            return line.split(READY_MARK, 1)[1].strip()
                elif self.process.poll() is not None:
                    break
        code = self.process.poll()
        if code is None:
            self.process.kill()
            self.process.wait()
        self._reaped()
        raise DaemonError(f"daemon {self.id} did not become ready within {timeout}s (exit code {code}); "
                          f"log:\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, and return the exit code (SIGKILL if it does not stop in time)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.signal_stop()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        if self.process.stdout:
            self.process.stdout.close()
        self._reaped()
        return code

    def signal_stop(self) -> None:
        """Ask the daemon to stop (SIGTERM, once), without waiting."""
        if self.process is not None and self.process.poll() is None and not self._stop_sent:
            self.process.send_signal(signal.SIGCONT)  # a paused daemon cannot handle SIGTERM
            self.process.terminate()
            self._stop_sent = True

    def kill(self) -> None:
        """SIGKILL: the daemon dies at once, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reaped()

    def pause(self) -> None:
        """SIGSTOP: the daemon hangs (answers nothing) until ``resume``."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 30.0) -> str:
        """Stop (or reap) the daemon and start it again with the same id and address."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __repr__(self) -> str:
        return f"<DaemonProcess {self.id} {self.address or self.bind} pid={self.pid}>"


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux; None elsewhere, or if it is gone):
    with the pid, it tells a process from a later one that reuses its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def start_daemons(ids: Sequence[str], extra_args: Sequence[str] = (), host: str = "127.0.0.1",
                  ports: Sequence[int] | None = None, log_dir: str | None = None,
                  per_daemon_args: Mapping[str, Sequence[str]] | None = None, watchdog: bool = True
                  ) -> list[DaemonProcess]:
    """Start one daemon per id (in parallel) and wait until all are ready; on failure stop them all.
    They stop when this process exits, unless ``watchdog=False``."""
    log_dir = log_dir or tempfile.mkdtemp(prefix="fedzmq-logs-")
    daemons = [
        DaemonProcess(i, f"tcp://{host}:{ports[n] if ports else 0}",
                      [*extra_args, *(per_daemon_args or {}).get(i, ())], log_dir, watchdog=watchdog)
        for n, i in enumerate(ids)
    ]
    try:
        for d in daemons:  # start all first, then wait: their imports of torch overlap
            d.spawn()
        for d in daemons:
            d.wait_ready(60.0)
    except BaseException:
        stop_all(daemons)
        raise
    return daemons


def stop_all(daemons: Sequence[DaemonProcess]) -> dict[str, int]:
    for d in daemons:  # signal all first so they shut down in parallel
        d.signal_stop()
    return {d.id: d.stop() for d in daemons}


async def wait_answering(addresses: Sequence[str], timeout: float = 30.0,
                         keys: Sequence[dict[str, Any]] | None = None) -> list[dict[str, object]]:
    """Connect to each address (with its keys, if given) and wait for its ``ping``; returns the answers."""
    from .client.worker import connect  # the launcher itself needs no client

    async def one(address: str, key: dict[str, Any]) -> dict[str, object]:
        async with connect(address, **key) as worker:
            return await worker.ping(timeout=timeout)

    return list(await asyncio.gather(*(one(a, keys[n] if keys else {}) for n, a in enumerate(addresses))))
