"""Every code block of README.md and docs/*.md runs as written (issue 15, item 9).

docs/strategies.md and docs/testing.md have their own tests (test_docs_strategies.py,
test_docs_testing.py); every other page's blocks run here. A ```python block runs as a script, a
```bash/```sh/```shell block as a bash script (``set -e``: a failing command fails the block), each in
a subprocess of its own, in a fresh temporary folder, with this checkout's fedzmq first on the path and
the interpreter's scripts (``fedzmq``, ``fedzmq-worker``) on PATH. A block must leave no process
behind: anything still alive in its session afterwards (a daemon it started and did not stop) fails
the test, and is killed.

A block that should not run here says so in its fence, with the reason: ```bash no-run="why". That is
for installs, full trainings and benchmarks that take minutes; a block that starts daemons runs, and
stops them itself. Blocks without a language (diagrams, layouts, hex dumps) and ```text blocks are
not code.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from doc_blocks import Block, blocks

ROOT = Path(__file__).resolve().parent.parent
#: pages whose blocks another test runs
COVERED_ELSEWHERE = {"strategies.md", "testing.md"}
PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in COVERED_ELSEWHERE)
RUNNABLE = {"python", "bash", "sh", "shell"}
#: languages a block may have that are not run: data and output
NOT_CODE = {"", "text", "toml", "json"}
NO_RUN = re.compile(r'\bno-run="([^"]+)"')
#: the most blocks that may be marked no-run, over all pages: sparingly
MAX_NO_RUN = 12  # the benchmark pages hold most of them
#: seconds one block may take
BLOCK_SECONDS = 150


def _all_blocks() -> list[tuple[Path, Block]]:
    return [(page, block) for page in PAGES for block in blocks(page)]


def _info(page: Path, block: Block) -> str:
    """The fence's info string (after the language): ``doc_blocks`` keeps only the title of it."""
    line = page.read_text().splitlines()[block.line - 2]
    return line[3 + len(block.lang):]


BLOCKS = _all_blocks()
TO_RUN = [(page, block) for page, block in BLOCKS
          if block.lang in RUNNABLE and not NO_RUN.search(_info(page, block))]


def _id(item: tuple[Path, Block]) -> str:
    page, block = item
    return f"{page.relative_to(ROOT)}:{block.line}"


def _session_processes(sid: int) -> list[int]:
    """Pids of the live processes of session ``sid`` (Linux /proc): a block's leftovers. A daemon the
    launcher put in a process group of its own is still in the block's session."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _run(command: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str] | None, list[int]]:
    """Run a block in a session of its own; return its result (None on timeout) and what it left alive."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                       if p),
           "PATH": os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", ""))),
           "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    out, err = cwd.parent / "stdout.txt", cwd.parent / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:  # files, not pipes: a leftover cannot hold them
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True,
                                   start_new_session=True, stdin=subprocess.DEVNULL)
    result: subprocess.CompletedProcess[str] | None
    try:
        process.wait(timeout=BLOCK_SECONDS)
        result = subprocess.CompletedProcess(command, process.returncode, out.read_text(), err.read_text())
    except subprocess.TimeoutExpired:
        result = None
    left = _session_processes(process.pid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    return result, [pid for pid in left if pid != process.pid]


@pytest.mark.timeout(BLOCK_SECONDS + 20)
@pytest.mark.parametrize("item", TO_RUN, ids=[_id(item) for item in TO_RUN])
def test_every_block_runs_as_written(item: tuple[Path, Block], tmp_path: Path) -> None:
    page, block = item
    suffix = ".py" if block.lang == "python" else ".sh"
    script = tmp_path / f"block{suffix}"
    # written at its own line of the page: a traceback points into the page
    script.write_text(block.padded() if block.lang == "python" else block.code)
    work = tmp_path / "work"
    work.mkdir()
    command = [sys.executable, str(script)] if block.lang == "python" else ["bash", "-e", "-o", "pipefail",
                                                                             str(script)]
    result, left = _run(command, work)
    where = _id(item)
    assert result is not None, f"{where}: did not finish within {BLOCK_SECONDS}s:\n" \
                               f"{(tmp_path / 'stdout.txt').read_text()[-2000:]}\n" \
                               f"{(tmp_path / 'stderr.txt').read_text()[-4000:]}"
    assert result.returncode == 0, f"{where} failed (rc {result.returncode}):\n{result.stdout[-2000:]}\n" \
                                   f"{result.stderr[-4000:]}"
    assert not left, f"{where} left processes running: {left}"
    if "print(" in block.code:
        assert result.stdout.strip(), f"{where} prints nothing"


def test_every_block_is_code_that_runs_or_says_why_not() -> None:
    marked = []
    for page, block in BLOCKS:
        where = f"{page.relative_to(ROOT)}:{block.line}"
        info = _info(page, block)
        assert block.lang in RUNNABLE | NOT_CODE, f"{where}: a ```{block.lang} block is neither run nor data"
        if "no-run" in info:
            assert NO_RUN.search(info), f'{where}: write no-run="the reason"'
            assert block.lang in RUNNABLE, f"{where}: no-run on a block that would not run anyway"
            marked.append(where)
    assert len(marked) <= MAX_NO_RUN, f"too many blocks do not run: {marked}"
    assert len(TO_RUN) >= 10


def test_the_readme_opens_with_the_two_commands() -> None:
    first = blocks(ROOT / "README.md")[0]
    assert first.code.splitlines() == [
        'python -m pip install torch==2.13.0 -e ".[demo]" && fedzmq demo',
        'python -m pip install torch==2.13.0 -e ".[test]" && python -m pytest',
    ]
    assert (ROOT / "README.md").read_text().index("```") < (ROOT / "README.md").read_text().index("\n## ")


def test_the_complete_example_is_on_the_front_page() -> None:
    """One example goes from dataset files to daemons with --data, training, evaluating and closing."""
    complete = [block for block in blocks(ROOT / "README.md") if block.lang == "python"
                and "save_file" in block.code and "--data" in block.code and "start_daemons" in block.code]
    assert len(complete) == 1
    code = complete[0].code
    assert "fz.Federation" in code and "evaluate=" in code and "stop_all" in code and ".run(" in code
