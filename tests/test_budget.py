"""``fedzmq.budget.Budget``: a command's seconds, and the waits that are not its running.

No assertion here reads how long the test took: the deadlines are set far (hundreds of seconds) from now,
so what is asserted is arithmetic on the deadline and the order of clock readings, and holds on a host
stalled for anything under the test's timeout."""

import time

import pytest

from fedzmq.budget import Budget
from fedzmq.errors import LimitExceeded

pytestmark = pytest.mark.timeout(10)


def test_extend_moves_the_deadline_by_the_wait_and_keeps_what_already_ran() -> None:
    budget = Budget(1000.0)
    overran = time.monotonic() - 100.0
    budget.deadline = overran  # ran out 100 s ago: its sizing took its seconds
    with pytest.raises(LimitExceeded):
        budget.check()
    budget.extend(50.0)  # a wait shorter than what it overran by does not give it its seconds back
    assert budget.deadline == pytest.approx(overran + 50.0, abs=1e-6)
    with pytest.raises(LimitExceeded):
        budget.check()
    budget.extend(500.0)
    assert budget.deadline == pytest.approx(overran + 550.0, abs=1e-6)  # moved by the waits, not restarted
    budget.check()  # 450 s left: no stall shorter than the test's timeout runs it out


def test_start_counts_from_now() -> None:
    budget = Budget(300.0)
    budget.deadline = time.monotonic() - 1.0
    before = time.monotonic()
    budget.start()
    after = time.monotonic()
    assert before + 300.0 <= budget.deadline <= after + 300.0  # from a reading between the two
    budget.check()
