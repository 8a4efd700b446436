"""A daemon stops when its launcher dies: the watchdog pipe.

A launcher that wants its daemon to die with it (``fedzmq.launcher.DaemonProcess`` does, by default)
makes a pipe, keeps the write end, and gives the daemon the read end, naming the descriptor in the
environment variable ``FEDZMQ_WATCHDOG_FD``. Nobody ever writes to the pipe. When the launcher exits,
however it exits (SIGKILL, the OOM killer, ``os._exit``), the kernel closes the write end, the read
end reports end of file, and the daemon stops as it would on SIGTERM: sessions closed, exit code 0.
Should that clean stop hang, the process exits anyway after ``GRACE`` seconds: an orphan is worse.

Why a pipe and not Linux's PR_SET_PDEATHSIG: that signal fires when the *thread* that started the
child exits, and launchers start daemons from worker threads (``asyncio.to_thread``); it is also
Linux only. The limit of a pipe: a process forked (not exec'd) from the launcher inherits the write
end, and the daemon stops only once that process has exited as well. A stopped daemon (SIGSTOP)
notices nothing until it is continued; ``DaemonProcess`` starts each daemon in a process group of
its own, which the launcher's death orphans, and the kernel then continues its stopped members.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
from typing import Callable

#: the environment variable that names the read end of the launcher's pipe
WATCHDOG_ENV = "FEDZMQ_WATCHDOG_FD"
#: seconds the clean stop may take once the launcher is gone
GRACE = 30.0

log = logging.getLogger("fedzmq.worker")


def watch_parent(loop: asyncio.AbstractEventLoop, stop: Callable[[], None],
                 grace: float | None = GRACE) -> int | None:
    """Call ``stop`` (in ``loop``) once the launcher's pipe reports end of file, if a launcher passed
    one, and end the process ``grace`` seconds later if it still runs (None: never); returns the
    descriptor watched, or None. The variable is removed from the environment, so nothing this
    process starts mistakes another descriptor for the pipe."""
    value = os.environ.pop(WATCHDOG_ENV, None)
    if value is None:
        return None
    try:
        fd = int(value)
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise ValueError("not a pipe")
    except (ValueError, OSError) as exc:
        log.warning("ignoring %s=%r: %s", WATCHDOG_ENV, value, exc)
        return None
    os.set_inheritable(fd, False)
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            if os.read(fd, 4096):  # nobody should write; whatever comes is not the end
                return
        except BlockingIOError:
            return
        except OSError:
            pass  # an error on the pipe means the same as its end
        loop.remove_reader(fd)
        os.close(fd)
        log.warning("the launcher is gone (watchdog pipe closed): stopping")
        if grace is not None:
            deadline = threading.Timer(grace, _exit_now, (grace,))
            deadline.daemon = True
            deadline.start()
        stop()

    loop.add_reader(fd, readable)
    return fd


def _exit_now(grace: float) -> None:
    log.error("still running %.0f s after the launcher died: exiting without a clean stop", grace)
    logging.shutdown()
    os._exit(70)


__all__ = ["GRACE", "WATCHDOG_ENV", "watch_parent"]
