"""docs/testing.md cannot rot: its opening code block is collected and run as a test of this module, and
every fixture, handle method and helper of the test kit must be documented there."""

import re
from pathlib import Path

import fedzmq.testing
import fedzmq.testing.datasets
import fedzmq.testing.plugin
from fedzmq.testing import DaemonHandle

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"
TEXT = DOC.read_text()


def _first_python_block(text):
    """The first fenced python block, and the line (1-based) its code starts on."""
    match = re.search(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert match, f"{DOC} has no ```python block"
    return match.group(1), text[:match.start(1)].count("\n") + 1


CODE, FIRST_LINE = _first_python_block(TEXT)
# compiled as docs/testing.md, with the line numbers of the file, so a failure points into the page
_namespace = {"__name__": __name__}
exec(compile("\n" * (FIRST_LINE - 1) + CODE, str(DOC), "exec"), _namespace)
DOC_TESTS = {name: obj for name, obj in _namespace.items() if name.startswith("test_") and callable(obj)}
globals().update(DOC_TESTS)  # pytest collects them here, with the fixtures of the installed plugin


def test_the_page_opens_with_a_complete_test_file_of_about_twenty_lines():
    assert TEXT.index("```python") < TEXT.index("\n## "), "the example must come before the first section"
    assert list(DOC_TESTS) == ["test_federated_training_lowers_the_loss"]
    assert "fedzmq_daemons" in CODE and "fz.Optims" in CODE and "model_ptr.get()" in CODE
    assert "conftest" not in CODE and 15 <= len(CODE.splitlines()) <= 35


def _public(names):
    return sorted(n for n in names if not n.startswith("_"))


def test_every_fixture_handle_method_and_helper_is_documented():
    names = ["fedzmq_daemons", "fedzmq_daemons_module", "fedzmq_daemons_session", "fedzmq_virtual_workers",
             "fedzmq_digits", "TEST_SETTINGS", "track_daemon",
             "leftover_daemons", "worker_ids", *_public(vars(DaemonHandle)), *fedzmq.testing.__all__,
             *fedzmq.testing.plugin.__all__, *fedzmq.testing.datasets.__all__]
    missing = [n for n in dict.fromkeys(names) if not re.search(rf"`[^`\n]*\b{n}\b[^`\n]*`", TEXT)]
    assert not missing, f"not documented in {DOC}: {missing}"
    fixtures = {n for n in vars(fedzmq.testing.plugin) if n.startswith("fedzmq_")}
    assert fixtures == {"fedzmq_daemons", "fedzmq_daemons_module", "fedzmq_daemons_session", "fedzmq_virtual_workers",
                        "fedzmq_digits"}
