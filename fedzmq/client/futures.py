"""Futures of work the client does not await at once: errors marked as seen, and local work in pieces
that must not stop half-way (a worker's model read into a local one piece by piece is left part old,
part new if cancelled between two pieces; taking a copy first would cost a second copy of the model).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine as CoroutineABC
from typing import Any, Coroutine, Generator, TypeVar

T = TypeVar("T")


def retrieve_error(future: "asyncio.Future[Any]") -> None:
    """Mark a pipelined future's error as seen: it is raised where its pointer is awaited, if ever."""
    if not future.cancelled():
        future.exception()


async def finish(task: "asyncio.Future[T]") -> T:
    """``await task``; a cancellation lets the task finish first, then goes on (raised from the task's error,
    if it failed: the cancellation is never lost)."""
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True
        except BaseException as exc:
            if cancelled:
                raise asyncio.CancelledError() from exc
            raise
    if cancelled:
        raise asyncio.CancelledError
    return result


__all__ = ["finish", "retrieve_error"]


class RunsEvenIfCancelledFirst(CoroutineABC[Any, Any, T]):
    """A coroutine (``close()``'s) that runs to its end on a task of its own when its awaiter is cancelled
    before its first step: ``asyncio.wait_for(worker.close(), 0)``, or a ``TaskGroup``'s close task cancelled
    in the pass that made it, threw the cancellation into a coroutine that had not started, and nothing of
    the close ever ran (the worker stayed open, its heartbeats keeping the daemon's session alive).
    ``started`` holds that task (a task the loop holds only weakly must be held somewhere)."""

    __slots__ = ("_coroutine", "_started", "started")

    def __init__(self, coroutine: Coroutine[Any, Any, T]) -> None:
        self._coroutine = coroutine
        self._started = False
        self.started: asyncio.Future[T] | None = None

    def send(self, value: Any) -> Any:
        self._started = True
        return self._coroutine.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if not self._started:  # cancelled before it ran: it runs on its own, and the cancellation goes on
            self._started = True
            self.started = asyncio.ensure_future(self._coroutine)
            self.started.add_done_callback(retrieve_error)
        elif val is None and tb is None:
            return self._coroutine.throw(typ)
        else:
            return self._coroutine.throw(typ, val, tb)  # (the old three-argument form)
        raise typ if val is None else val

    def close(self) -> None:
        if self._started:
            self._coroutine.close()
        # never awaited: the wrapped coroutine's own warning says so when it is collected

    def __await__(self) -> Generator[Any, Any, T]:
        return self

    def __iter__(self) -> "RunsEvenIfCancelledFirst[T]":
        return self

    def __next__(self) -> Any:
        return self.send(None)
