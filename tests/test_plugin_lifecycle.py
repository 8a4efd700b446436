"""The test kit's daemons do not outlive the run: they stop when their launcher dies (the watchdog
pipe), even when it is SIGKILLed; a later run reports and kills what an earlier one left; interrupts
and leftovers are reported as pytest reports them. Everything runs real processes: launchers and
pytest runs in subprocesses, daemons on loopback."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pytest_runs import FEDZMQ_ROOT, finish, is_daemon, kill_daemons, run_pytest, start_pytest, wait_gone

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
    if os.environ["STOP_ONE"] == "1":
        handles[1].stop()  # SIGSTOP: it cannot read its pipe until something continues it
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


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "one-stopped"])
def test_kit_daemons_stop_when_pytest_is_sigkilled(tmp_path, stopped):
    """A stopped daemon too: in a process group of its own, which its launcher's death orphans, it is
    sent SIGHUP and SIGCONT by the kernel (POSIX), and then reads the end of its pipe."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_hangs.py").write_text(HANGING_TEST)
    pids_file = tmp_path / "pids"
    run = start_pytest(project, "-o", "asyncio_mode=strict",
                       env={"DAEMON_PIDS": str(pids_file), "STOP_ONE": str(int(stopped))})
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


# --- this run's leftovers: a terminal-summary section, and a failed run -----------------------------

LEAKY_TEST = '''
import os
from fedzmq.launcher import DaemonProcess
from fedzmq.testing.plugin import track_daemon

kept = []


def test_passes():
    pass


def test_leaks_two_daemons(request, tmp_path):
    tracked = DaemonProcess("leaky-tracked", log_dir=tmp_path)
    untracked = DaemonProcess("leaky-untracked", log_dir=tmp_path)
    tracked.spawn(), untracked.spawn()
    tracked.wait_ready(60), untracked.wait_ready(60)
    track_daemon(request.config, tracked)  # as a test that starts its own daemons should
    kept.extend([tracked, untracked])      # neither is stopped: both outlive the test
    with open(os.environ["LEAKY_PIDS"], "a") as f:
        f.write(f"{tracked.pid} {untracked.pid} ")
'''


def _leaky_run(tmp_path, *args):
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_leaky.py").write_text(LEAKY_TEST)
    pids_file = tmp_path / "pids"
    pids = []
    try:
        result, output = run_pytest(project, "-o", "asyncio_mode=strict", *args, env={"LEAKY_PIDS": str(pids_file)})
    finally:
        pids = [int(p) for p in pids_file.read_text().split()] if pids_file.exists() else []
        survivors = [pid for pid in pids if is_daemon(pid)]
        kill_daemons(pids)  # should the check fail, still leave nothing behind
    assert len(pids) == 2, output
    assert not survivors, f"daemons {survivors} outlived the run:\n{output}"
    return result, output, pids


def test_daemons_left_running_are_killed_and_reported_in_a_summary_section_that_fails_the_run(tmp_path):
    result, output, (tracked, untracked) = _leaky_run(tmp_path)
    assert " 2 passed" in output, output  # the tests themselves passed...
    assert result.returncode == 1, output  # ...and the run failed
    progress, section = output.split("= fedzmq: worker daemons left running by the tests =", 1)
    assert progress.splitlines()[-1].startswith("====="), output  # a section of its own, not glued to the dots
    test = "test_leaky.py::test_leaks_two_daemons"
    assert f"killed: leaky-tracked (pid {tracked}, started by {test}, log " in section, output
    assert f"killed: leaky-untracked (pid {untracked}, started by {test})" in section, output
    assert "They fail the run" in section and section.index("They fail") < section.index(" 2 passed"), output


def test_under_xdist_the_workers_leftovers_reach_the_controller_and_fail_the_run(tmp_path):
    pytest.importorskip("xdist", reason="needs pytest-xdist")
    result, output, (tracked, untracked) = _leaky_run(tmp_path, "-n", "2")
    assert "2 workers [2 items]" in output and " 2 passed" in output, output
    assert result.returncode == 1, output
    section = output.split("= fedzmq: worker daemons left running by the tests =", 1)[1]
    worker = "xdist worker gw"
    assert f"killed: leaky-tracked (pid {tracked}, {worker}" in section, output
    assert f"killed: leaky-untracked (pid {untracked}, {worker}" in section, output
    assert "started by test_leaky.py::test_leaks_two_daemons" in section, output


# --- earlier runs' orphans: pid files, found and killed by the next run ---------------------------

OUTLIVING_TEST = '''
import asyncio
import os

import pytest

from fedzmq.launcher import DaemonProcess
from fedzmq.testing.leftovers import pid_dir


@pytest.mark.asyncio
async def test_starts_a_daemon_that_may_outlive_the_run(request, tmp_path):
    # without the watchdog, and with a pid file where the kit keeps its own
    daemon = DaemonProcess("outliver", log_dir=tmp_path, watchdog=False, pid_dir=pid_dir(), note=request.node.nodeid)
    await asyncio.to_thread(daemon.start, 60)
    with open(os.environ["DAEMON_PIDS"] + ".part", "w") as f:
        f.write(str(daemon.pid))
    os.replace(os.environ["DAEMON_PIDS"] + ".part", os.environ["DAEMON_PIDS"])
    await asyncio.sleep(300)  # until the run is killed
'''


def test_next_run_kills_and_reports_daemons_an_earlier_run_left_without_failing(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_outliving.py").write_text(OUTLIVING_TEST)
    pids_file = tmp_path / "pids"
    run = start_pytest(project, "-o", "asyncio_mode=strict", env={"DAEMON_PIDS": str(pids_file)})
    pids = []
    try:
        pids = _pids_when_written(pids_file, run)
        [pid_file] = (tmp_path / "temproot-project").glob(f"pytest-of-*/fedzmq-daemons/{pids[0]}.json")
        info = json.loads(pid_file.read_text())
        assert info["pid"] == pids[0] and info["launcher_pid"] == run.pid and info["id"] == "outliver"
        assert info["start_time"] > info["launcher_start_time"] > 0 and info["log"].endswith("outliver.log")
        assert info["address"].startswith("tcp://127.0.0.1:") and not info["address"].endswith(":0")
        assert info["note"] == "test_outliving.py::test_starts_a_daemon_that_may_outlive_the_run"
        run.kill()
        finish(run, 10)
        time.sleep(1)
        assert all(is_daemon(pid) for pid in pids), "the daemon must have outlived the killed run"
        (project / "test_outliving.py").unlink()
        (project / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
        result, output = run_pytest(project, "-o", "asyncio_mode=strict")  # the next run, in the same temp root
        assert wait_gone(pids, 5) == [], output
    finally:
        run.kill()
        kill_daemons(pids)
    assert result.returncode == 0 and " 1 passed" in output, output  # not this run's fault
    section = output.split("= fedzmq: daemons left by earlier runs =", 1)[1]
    assert f"killed: outliver (pid {pids[0]}, started by test_outliving.py::test_starts_a_daemon" in section, output
    assert "They do not fail this run" in section, output
    assert list((tmp_path / "temproot-project").glob("pytest-of-*/fedzmq-daemons/*.json")) == []
    _, again = run_pytest(project, "-o", "asyncio_mode=strict")
    assert "left by earlier runs" not in again, again  # reported once


# --- Ctrl-C ----------------------------------------------------------------------------------------

SLOW_START_TEST = '''
import pytest


@pytest.mark.asyncio
async def test_starts_daemons_that_take_long_to_start(fedzmq_daemons):
    await fedzmq_daemons("bob", "alice", models={"net": "slow_import:Net"}, timeout=120)
'''


def _daemon_children(pid):
    """Live worker daemons whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and is_daemon(int(entry)):
            try:
                stat = open(f"/proc/{entry}/stat").read()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                    found.append(int(entry))
            except (OSError, ValueError):
                pass
    return found


def test_ctrl_c_while_daemons_start_exits_with_2_and_a_short_message_and_stops_them(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_slow_start.py").write_text(SLOW_START_TEST)
    (project / "slow_import.py").write_text(  # the daemons hang before they are ready, once they say so
        "import os, time\nopen(f'hanging-{os.getpid()}', 'w').close()\ntime.sleep(120)\n")
    run = start_pytest(project, "-o", "asyncio_mode=strict")
    daemons = []
    try:
        deadline = time.monotonic() + 60
        while len(list(project.glob("hanging-*"))) < 2 and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        daemons = _daemon_children(run.pid)
        assert len(daemons) == 2, finish(run, 10)
        # each in a process group of its own: the terminal's SIGINT is for pytest alone, which stops them
        assert [os.getpgid(pid) for pid in daemons] == daemons and os.getpgid(run.pid) not in daemons
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: SIGINT to the foreground group
        output = finish(run, 30)
        assert wait_gone(daemons, 10) == [], output
    finally:
        run.kill()
        kill_daemons(daemons)
    assert run.returncode == 2, output  # pytest's own status for an interrupted run
    assert "KeyboardInterrupt" in output and "no tests ran" in output, output
    assert "Traceback" not in output and "log of daemon" not in output and "exited with code" not in output, output
    assert len(output.splitlines()) < 25, output
