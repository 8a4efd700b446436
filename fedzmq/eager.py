"""Run a coroutine at once, in the caller, until it first waits for something.

A daemon's session task costs a pass of the event loop per command: the pump puts the request in the
session's queue, the queue's future wakes the task on the next pass, the task runs the command. Most
commands (a small op, a get) never wait at all, so the pump can run them where it reads them, in
order, and only a command that does wait (a big op on a torch thread, a reply whose buffers are still
being sent) needs a task. ``start`` steps the coroutine by hand until it finishes or first waits;
``Started`` lets a task await the rest of it. (Python 3.12's ``asyncio.eager_task_factory`` does this
for whole tasks; this is the same step for one coroutine, on 3.11 too.)

What runs before the first wait runs outside any task: code in it must not need
``asyncio.current_task()`` (``asyncio.timeout`` does); code after it runs in the awaiting task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Coroutine, Generator, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Finished(Generic[T]):
    """The coroutine ran to its end without waiting: its return value."""

    value: T


class Started(Generic[T]):
    """A coroutine that waits for ``pending`` (what it yielded to the event loop). Await this, in a
    task, to run the rest of it: the task waits for ``pending`` as if the coroutine had yielded it
    there, and a cancellation of the task goes into the coroutine at its wait, as it would."""

    def __init__(self, coroutine: Coroutine[Any, Any, T], pending: Any) -> None:
        self.coroutine = coroutine
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, T]:
        coroutine, pending = self.coroutine, self.pending
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # a cancellation (or an exception thrown in): to the coroutine
                try:
                    pending = coroutine.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = coroutine.send(sent)
                except StopIteration as stop:
                    return stop.value

    def close(self) -> None:
        """Abandon the rest (its ``finally`` blocks run now): for a coroutine no task will await."""
        self.coroutine.close()


def start(coroutine: Coroutine[Any, Any, T]) -> Finished[T] | Started[T]:
    """Run ``coroutine`` until it ends (``Finished``) or first waits (``Started``, to be awaited by a
    task). An exception it raises before waiting propagates from here."""
    try:
        pending = coroutine.send(None)
    except StopIteration as stop:
        return Finished(stop.value)
    return Started(coroutine, pending)


__all__ = ["Finished", "Started", "start"]
