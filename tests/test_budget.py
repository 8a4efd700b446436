"""``fedzmq.budget.Budget``: a command's seconds, and the waits that are not its running."""

import time

import pytest

from fedzmq.budget import Budget
from fedzmq.errors import LimitExceeded

pytestmark = pytest.mark.timeout(10)


def test_extend_moves_the_deadline_by_the_wait_and_keeps_what_already_ran() -> None:
    budget = Budget(10.0)
    budget.deadline = time.monotonic() - 1.0  # ran out: its sizing took its seconds
    with pytest.raises(LimitExceeded):
        budget.check()
    budget.extend(0.5)  # a wait shorter than what it overran by does not give it its seconds back
    with pytest.raises(LimitExceeded):
        budget.check()
    budget.extend(5.0)
    budget.check()
    assert 0.0 < budget.remaining <= 4.5


def test_start_counts_from_now() -> None:
    budget = Budget(3.0)
    budget.deadline = time.monotonic() - 1.0
    budget.start()
    budget.check()
    assert 0.0 < budget.remaining <= 3.0
