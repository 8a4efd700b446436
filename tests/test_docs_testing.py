"""docs/testing.md cannot rot: every code block on it runs as written. The example project (the blocks
fenced with a file name) runs in a pytest subprocess in strict and in auto mode, with nothing but the
installed package (no conftest); every other python block is a test module, and they all run in one
pytest subprocess in strict mode. Each block is written at its own line of the page, so a failure
points into docs/testing.md. Every fixture, handle method and helper of the test kit must be named
on the page."""

import ast
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fedzmq.testing
import fedzmq.testing.datasets
import fedzmq.testing.leftovers
import fedzmq.testing.plugin
from fedzmq.testing import DaemonHandle

from doc_blocks import blocks
from pytest_runs import run_pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"
TEXT = DOC.read_text()
BLOCKS = blocks(DOC)
PROJECT = {block.title: block for block in BLOCKS if block.title}
TEST_BLOCKS = [block for block in BLOCKS if block.lang == "python" and not block.title]
MODES = ("strict", "auto")


def _tests(block):
    """The names of the test functions a block defines."""
    return [node.name for node in ast.parse(block.code).body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")]


def test_the_page_opens_with_a_complete_test_file_of_about_twenty_lines():
    first = BLOCKS[0]
    assert first.lang == "python" and TEXT.index("```python") < TEXT.index("\n## "), \
        "the example must come before the first section"
    assert _tests(first) == ["test_federated_training_lowers_the_loss"]
    assert "fedzmq_daemons" in first.code and "fz.Optims" in first.code and "model_ptr.get()" in first.code
    assert "conftest" not in first.code and 15 <= len(first.code.splitlines()) <= 35


def test_every_block_is_a_test_module_a_file_of_the_example_project_shell_or_output():
    assert set(PROJECT) == {"pyproject.toml", "federated_code.py", "test_federated_code.py"}
    for block in BLOCKS:
        where = f"{DOC}:{block.line}"
        assert block.lang in ("python", "toml", "bash", "text"), where
        if block.lang == "python":
            compile(block.padded(), str(DOC), "exec")
            assert block.title or _tests(block), f"{where}: a python block that is neither a test nor a file"
    assert len(TEST_BLOCKS) >= 8


def test_every_async_test_and_fixture_on_the_page_is_written_for_strict_mode():
    """What strict mode needs, checked where it is written: an async test carries @pytest.mark.asyncio,
    an async fixture is a @pytest_asyncio.fixture."""
    for block in BLOCKS:
        if block.lang != "python":
            continue
        for node in ast.walk(ast.parse(block.padded())):
            if not isinstance(node, ast.AsyncFunctionDef):
                continue
            decorators = [ast.unparse(d) for d in node.decorator_list]
            where = f"{DOC}:{node.lineno} {node.name}"
            if node.name.startswith("test_"):
                assert any(d.startswith("pytest.mark.asyncio") for d in decorators), where
            elif any("fixture" in d for d in decorators):
                assert any(d.startswith("pytest_asyncio.fixture") for d in decorators), where


def _write(directory, files):
    directory.mkdir(parents=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


@pytest.mark.timeout(300)
def test_the_example_project_passes_in_strict_and_auto_mode_with_the_installed_plugin_and_no_conftest(tmp_path):
    files = {name: block.padded() for name, block in PROJECT.items()}
    assert "conftest.py" not in files
    # a copy each, outside this repository: nothing of it is on the path, nothing is written here
    copies = {mode: _write(tmp_path / mode / "project", files) for mode in MODES}
    expected = len(_tests(PROJECT["test_federated_code.py"]))
    with ThreadPoolExecutor(2) as pool:  # side by side: they are independent
        runs = dict(zip(MODES, pool.map(
            lambda mode: run_pytest(copies[mode], "-o", f"asyncio_mode={mode}", "-v", timeout=240), MODES)))
    for mode, (result, output) in runs.items():
        assert result.returncode == 0, output
        assert f"mode=Mode.{mode.upper()}" in output, output
        assert f"rootdir: {copies[mode]}" in output and "configfile: pyproject.toml" in output, output
        assert "fedzmq-" in output.split("plugins:", 1)[1].splitlines()[0], output  # loaded by its entry point
        assert f" {expected} passed" in output and "skipped" not in output and "warning" not in output.lower(), output


@pytest.mark.timeout(420)
def test_the_test_blocks_pass_in_strict_mode(tmp_path):
    files = {f"test_docs_line_{block.line}.py": block.padded() for block in TEST_BLOCKS}
    files["pyproject.toml"] = PROJECT["pyproject.toml"].code  # the example project's settings: warnings are errors
    project = _write(tmp_path / "project", files)
    result, output = run_pytest(project, "-o", "asyncio_mode=strict", "-p", "no:randomly", timeout=360)
    expected = sum(len(_tests(block)) for block in TEST_BLOCKS)
    assert result.returncode == 0, output
    assert f" {expected} passed" in output and "skipped" not in output and "warning" not in output.lower(), output


def _public(names):
    return sorted(n for n in names if not n.startswith("_"))


def test_every_fixture_handle_method_and_helper_is_documented():
    names = ["fedzmq_daemons", "fedzmq_daemons_module", "fedzmq_daemons_session", "fedzmq_virtual_workers",
             "fedzmq_digits", "TEST_SETTINGS", "track_daemon", "leftover_daemons", "worker_ids", "pid_dir",
             "watchdog=False", "FEDZMQ_WATCHDOG_FD", *_public(vars(DaemonHandle)), *fedzmq.testing.__all__,
             *fedzmq.testing.plugin.__all__, *fedzmq.testing.datasets.__all__]
    missing = [n for n in dict.fromkeys(names) if not re.search(rf"`[^`\n]*\b{re.escape(n)}[^`\n]*`", TEXT)]
    assert not missing, f"not documented in {DOC}: {missing}"
    fixtures = {n for n in vars(fedzmq.testing.plugin) if n.startswith("fedzmq_")}
    assert fixtures == {"fedzmq_daemons", "fedzmq_daemons_module", "fedzmq_daemons_session", "fedzmq_virtual_workers",
                        "fedzmq_digits"}
