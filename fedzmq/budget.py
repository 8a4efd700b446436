"""A running command's time budget, checked where long work can stop.

A Python thread cannot be killed, so the worker stops long commands cooperatively: it gives each
command a ``Budget`` (a deadline, and a flag its session sets when it closes), and the places where
work repeats call ``check()``: every step of a ``fit``, every batch of an ``evaluate``, every node of a
described model's forward program. One aten call cannot be interrupted; the worker sizes those on the
meta device before running them, so none is allowed to run long.

The budget in force is a context variable, set by the worker around one command (on whichever thread
runs it) and read by the code that checks it, so the checks need no argument threaded through torch.
"""

from __future__ import annotations

import contextvars
import time

from .errors import LimitExceeded


class Budget:
    """A deadline and a cancel flag. ``check()`` raises ``LimitExceeded`` once either is hit; the
    command stops there, and whatever it was making is discarded."""

    __slots__ = ("deadline", "seconds", "cancelled", "source")

    def __init__(self, seconds: float, source: str = "--max-command-seconds") -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.cancelled: str | None = None
        #: what set the limit, for the error message
        self.source = source

    def start(self) -> None:
        """Count the command's seconds from now: called when a torch thread takes it. Its wait for the thread
        (behind other sessions' commands, each within its own limit) is not its running: counted from when
        its session began it, an honest fit queued behind another session's fit that ran to the limit was
        stopped half-way, and one session made another's commands fail."""
        self.deadline = time.monotonic() + self.seconds

    def extend(self, seconds: float) -> None:
        """Move the deadline ``seconds`` later: time the command spent waiting for something another command
        held (the process generator's turn), which is not its running. Unlike ``start``, what it already
        ran (its sizing) still counts: restarted there, a command could run for twice its limit."""
        self.deadline += seconds

    def cancel(self, why: str) -> None:
        """Ask the command to stop at its next check (its session closed or expired)."""
        self.cancelled = why

    def check(self) -> None:
        if self.cancelled is not None:
            raise LimitExceeded.new(f"the command was stopped: {self.cancelled}")
        if time.monotonic() > self.deadline:
            raise LimitExceeded.new(f"the command ran longer than the worker allows ({self.seconds:g} s, "
                                     f"{self.source}) and was stopped")

    @property
    def remaining(self) -> float:
        return self.deadline - time.monotonic()


_CURRENT: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("fedzmq_budget", default=None)


def seconds_left(limit: float) -> float:
    """The seconds a piece of work that cannot be stopped may be admitted for: ``limit``, or less when the
    running command has less left. Two such pieces in one command (a kept entry's copies, then a load's)
    each checked against the whole limit could run for twice it."""
    budget = _CURRENT.get()
    return limit if budget is None else max(0.0, min(limit, budget.remaining))


class running_under:  # noqa: N801 (used as a function: ``with running_under(budget):``)
    """Make ``budget`` the one ``check()`` reads while the block runs (on this thread). A class, not a
    generator: it is entered for every command, and a generator's context manager costs three times as
    much."""

    __slots__ = ("budget", "token")

    def __init__(self, budget: Budget) -> None:
        self.budget = budget

    def __enter__(self) -> None:
        self.token = _CURRENT.set(self.budget)

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self.token)


def check() -> None:
    """Stop here if the running command is out of time or cancelled (a no-op outside a command)."""
    budget = _CURRENT.get()
    if budget is not None:
        budget.check()


__all__ = ["Budget", "check", "running_under", "seconds_left"]
