"""The project's own linters stay clean: ``ruff check fedzmq`` and ``mypy`` (both configured in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(330)
def test_ruff_finds_nothing():
    done = _run("ruff", "check", "fedzmq")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(330)
def test_mypy_finds_nothing():
    done = _run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
