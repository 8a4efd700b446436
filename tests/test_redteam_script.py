"""scripts/redteam.py, the data owner's standing campaign, run as the owner would: against daemons of its
own (``--spawn``: rows protected, an open copy, and a daemon that requires secure aggregation). It must
report every route refused or held, no value leaked, and every honest ping p99 under a second."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "redteam.py"


@pytest.mark.timeout(180)
def test_the_redteam_campaign_finds_nothing_leaked_on_a_protected_daemon():
    root = str(SCRIPT.parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(SCRIPT), "--spawn"], capture_output=True, text=True, timeout=170,
                          env=env)
    report = done.stdout
    assert "routes; 0 failed; 0 value(s) leaked" in report, report + done.stderr
    assert done.returncode == 0, report + done.stderr
    for kind in ("1 taint", "2 side channel", "3 graph programs", "4 denial of service", "5 bind guard"):
        assert kind in report, f"no route of class {kind!r} ran:\n{report}"
    assert "skipped" not in report and "ERROR" not in report, report
