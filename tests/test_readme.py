"""The README's seed example runs as written (so the front page cannot rot)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_seed_example_runs_and_learns(tmp_path):
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    script = tmp_path / "seed_example.py"
    script.write_text(block)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(line) for line in result.stdout.split()]
    assert len(losses) == 20 and losses[-1] < losses[1]
