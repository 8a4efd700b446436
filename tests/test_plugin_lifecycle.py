"""The test kit's daemons do not outlive the run: they stop when their launcher dies (the watchdog
pipe), even when it is SIGKILLed; a later run reports and kills what an earlier one left; interrupts
and leftovers are reported as pytest reports them. Everything runs real processes: launchers and
pytest runs in subprocesses, daemons on loopback."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from pytest_runs import FEDZMQ_ROOT, finish, is_daemon, kill_daemons, start_pytest, wait_gone

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches processes through /proc")

LAUNCHER = '''
import sys, threading, time
from fedzmq.launcher import DaemonProcess

daemon = DaemonProcess("bob", log_dir=sys.argv[1], watchdog=sys.argv[2] == "on")
# started from a thread that then ends: Linux's parent-death signal would already fire here
starting = threading.Thread(target=daemon.start)
starting.start()
starting.join()
print(daemon.pid, flush=True)
time.sleep(300)
'''


def _launch(tmp_path, watchdog):
    """A launcher process that started one daemon; returns it and the daemon's pid."""
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    launcher = subprocess.Popen([sys.executable, str(script), str(tmp_path), watchdog], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": FEDZMQ_ROOT})
    try:
        line = launcher.stdout.readline()  # bounded by the suite's timeout; the daemon starts in seconds
        return launcher, int(line)
    except BaseException:
        launcher.kill()
        raise


def test_daemon_stops_cleanly_when_its_launcher_is_killed(tmp_path):
    launcher, pid = _launch(tmp_path, "on")
    try:
        time.sleep(0.5)
        assert is_daemon(pid), "the daemon must live while its launcher does"
        launcher.kill()  # SIGKILL: no cleanup of any kind runs in the launcher
        launcher.wait(10)
        assert wait_gone([pid], 10) == []
    finally:
        launcher.kill()
        kill_daemons([pid])
    log = (tmp_path / "bob.log").read_text()
    assert "the launcher is gone (watchdog pipe closed): stopping" in log, log
    assert "worker bob stopping" in log and "Traceback" not in log, log  # the clean way out, as on SIGTERM


def test_daemon_started_without_the_watchdog_outlives_its_launcher(tmp_path):
    launcher, pid = _launch(tmp_path, "off")
    try:
        launcher.kill()
        launcher.wait(10)
        time.sleep(2)
        assert is_daemon(pid)
        assert "launcher is gone" not in (tmp_path / "bob.log").read_text()
        os.kill(pid, signal.SIGTERM)
        assert wait_gone([pid], 20) == []
    finally:
        kill_daemons([pid])


async def test_watch_parent_stops_at_the_end_of_the_pipe_and_ignores_what_is_not_one(tmp_path, monkeypatch):
    from fedzmq.worker.watchdog import WATCHDOG_ENV, watch_parent

    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    with open(tmp_path / "file", "w") as not_a_pipe:
        monkeypatch.setenv(WATCHDOG_ENV, str(not_a_pipe.fileno()))
        assert watch_parent(loop, stopped.set) is None
    assert WATCHDOG_ENV not in os.environ  # never handed on to what the daemon starts

    read_end, write_end = os.pipe()
    monkeypatch.setenv(WATCHDOG_ENV, str(read_end))
    try:
        assert watch_parent(loop, stopped.set, grace=None) == read_end  # no forced exit of this process
        await asyncio.sleep(0.2)
        assert not stopped.is_set()
    finally:
        os.close(write_end)  # what the launcher's death does
    await asyncio.wait_for(stopped.wait(), 5)


HANGING_TEST = '''
import asyncio
import os

import pytest


@pytest.mark.asyncio
async def test_hangs(fedzmq_daemons):
    handles = await fedzmq_daemons("bob", "alice")
    with open(os.environ["DAEMON_PIDS"] + ".part", "w") as f:
        f.write(" ".join(str(h.pid) for h in handles))
    os.replace(os.environ["DAEMON_PIDS"] + ".part", os.environ["DAEMON_PIDS"])
    await asyncio.sleep(300)  # until the run is killed
'''


def _pids_when_written(path, run, timeout=90):
    """The pids a test of ``run`` wrote to ``path``, once it has."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if run.poll() is not None or time.monotonic() > deadline:
            run.kill()
            pytest.fail(f"the run ended or hung before its daemons started:\n{run.communicate()[0]}")
        time.sleep(0.05)
    return [int(pid) for pid in path.read_text().split()]


def test_kit_daemons_stop_when_pytest_is_sigkilled(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_hangs.py").write_text(HANGING_TEST)
    pids_file = tmp_path / "pids"
    run = start_pytest(project, "-o", "asyncio_mode=strict", env={"DAEMON_PIDS": str(pids_file)})
    pids = []
    try:
        pids = _pids_when_written(pids_file, run)
        assert len(pids) == 2 and all(is_daemon(pid) for pid in pids)
        run.kill()  # SIGKILL to pytest alone, as the OOM killer or a cancelled CI job would
        finish(run, 10)
        assert wait_gone(pids, 10) == [], "the daemons outlived the pytest run that started them"
    finally:
        run.kill()
        kill_daemons(pids)
