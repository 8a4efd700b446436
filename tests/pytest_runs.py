"""Running pytest in a subprocess the way a user would, and watching the daemons it starts: shared by
the tests of fedzmq's pytest plugin (test_plugin.py, test_plugin_lifecycle.py)."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fedzmq

#: the folder that holds the fedzmq under test (a source tree on PYTHONPATH, or site-packages)
FEDZMQ_ROOT = str(Path(fedzmq.__file__).resolve().parent.parent)


def pytest_command(directory, *args):
    """``python -m pytest`` for ``directory``, with its own base temporary directory: runs side by side
    would otherwise clean up each other's leftovers in /tmp/pytest-of-USER at the same time."""
    basetemp = Path(directory).parent / f"basetemp-{Path(directory).name}"
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(directory),
            "--basetemp", str(basetemp), *args]


def pytest_env(directory, env=None):
    """The environment of a user's run: none of this project's pytest settings; the fedzmq under test
    and only it on the path (where this suite imports it from, so the run checks this code, not another
    install's); and pytest's temporary root, where the plugin keeps its pid files, next to
    ``directory`` (shared by runs of the same directory, apart from everything else)."""
    kept = {k: v for k, v in os.environ.items()
            if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTHONPATH")}
    temproot = Path(directory).parent / f"temproot-{Path(directory).name}"
    temproot.mkdir(exist_ok=True)
    return {**kept, "PYTHONPATH": FEDZMQ_ROOT, "PYTHONDONTWRITEBYTECODE": "1",
            "PYTEST_DEBUG_TEMPROOT": str(temproot), **(env or {})}


def start_pytest(directory, *args, env=None):
    """A pytest run in the background, in its own session (a signal to its group reaches it alone)."""
    return subprocess.Popen(pytest_command(directory, *args), cwd=directory, env=pytest_env(directory, env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(run, timeout, what="pytest"):
    """Wait for a run started by ``start_pytest``; returns its output. A run that overstays is
    interrupted (so it stops its daemons), then killed with its whole process group, and the test fails."""
    try:
        output, _ = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGINT)  # pytest tears its fixtures down: the daemons stop
        try:
            output, _ = run.communicate(timeout=15)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
        pytest.fail(f"{what} took more than {timeout}s:\n{output}")
    return output


def run_pytest(directory, *args, env=None, timeout=100):
    """``python -m pytest`` in ``directory`` as a user would run it: the plugin comes from the installed
    package's entry point, with no conftest, and none of this project's pytest settings. Bounded below
    the suite's own timeout. Returns the finished ``Popen`` and the output."""
    with start_pytest(directory, *args, env=env) as run:
        output = finish(run, timeout, f"pytest {' '.join(args)} in {directory}")
    return run, output


def is_daemon(pid):
    """``pid`` is a live (not zombie) fedzmq worker daemon."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "Z":
            return False
        return b"fedzmq.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def wait_gone(pids, timeout):
    """Wait until none of ``pids`` is a live daemon; returns those that still are after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if is_daemon(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if is_daemon(pid)]


def kill_daemons(pids):
    """SIGKILL whichever of ``pids`` are still daemons (cleanup after a check that failed)."""
    for pid in pids:
        if is_daemon(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    wait_gone(pids, 5)
