"""The command line as a user runs it, in a terminal: the main job, and stopping it with Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import pytest

from fedzmq.federated import checkpoint


def _processes_in_group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    found.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process groups through /proc")
@pytest.mark.timeout(180)
def test_ctrl_c_during_the_demo_stops_everything_promptly_and_keeps_the_checkpoint(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole process group: the coordinator and its daemons.
    All of them exit within a few seconds (it took 9), and the last checkpoint is whole."""
    out = tmp_path / "run"
    demo = subprocess.Popen([sys.executable, "-m", "fedzmq", "demo", "--rounds", "200", "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group, as a terminal's foreground job
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert demo.poll() is None, demo.stdout.read()
            assert time.monotonic() < deadline, "the demo did not train two rounds in 2 minutes"
            time.sleep(0.1)
        os.killpg(demo.pid, signal.SIGINT)
        interrupted = time.monotonic()
        code = demo.wait(30)
        took = time.monotonic() - interrupted
        output = demo.stdout.read()
        assert code == 130, output
        assert took < 5, f"Ctrl-C took {took:.1f}s to stop the demo"
        assert "interrupted" in output
        time.sleep(0.5)
        assert not _processes_in_group(demo.pid), "a daemon outlived the demo"
        saved = checkpoint.load_latest(out / "checkpoints")
        assert saved is not None and saved.round >= 2 and len(saved.history) == saved.round
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        for pid in _processes_in_group(demo.pid):
            os.kill(pid, signal.SIGKILL)
