"""docs/strategies.md cannot rot: every python block in it runs as written, and every strategy and every
constructor parameter is in its table."""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedzmq.federated.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "strategies.md"
TEXT = DOC.read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", TEXT, re.S | re.M)


def test_the_page_has_its_examples() -> None:
    assert len(BLOCKS) == 8
    assert "aggregate(1, global_state, updates)" in BLOCKS[0] and "HeldBytesExceeded" in "".join(BLOCKS)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_every_python_block_runs_as_written(number: int, tmp_path: Path) -> None:
    script = tmp_path / f"block{number}.py"
    script.write_text(BLOCKS[number])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    if "print(" in BLOCKS[number]:
        assert result.stdout.strip()
    if "except fz.HeldBytesExceeded" in BLOCKS[number]:
        assert "update 3 would make that 24 bytes" in result.stdout
    if "except ValueError" in BLOCKS[number]:
        assert "Krum does not aggregate a weighted sum" in result.stdout


def test_every_strategy_and_parameter_is_in_the_table() -> None:
    table = TEXT[TEXT.index("## Every strategy"):TEXT.index("## The algorithms")]
    for name, cls in STRATEGIES.items():
        assert f"`{cls.__name__}` (" in table and f"`{name}`" in table, name
        for parameter in inspect.signature(cls.__init__).parameters.values():
            if parameter.name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                assert f"`{parameter.name}=" in table, (cls.__name__, parameter.name)
