"""Training across real network hops (network namespaces, veth, netem when the kernel has it), with keys."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "netns_federation.py"


@pytest.mark.timeout(300)
def test_training_over_network_namespaces_with_keys(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--workers", "2", "--rounds", "3", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=280)
    if result.returncode == 77:
        print(result.stdout)
        pytest.skip(result.stdout.strip().removeprefix("SKIP: "))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "final test accuracy" in result.stdout
    assert "netem:" in result.stdout  # says whether latency and loss were added, or why not
    lines = [line for line in result.stdout.splitlines() if line.startswith('{"round"')]
    assert len(lines) == 3 and all('"dropped": {}' in line for line in lines)
