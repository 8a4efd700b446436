"""Futures of work the client does not await at once: errors marked as seen, and work in pieces that must
not stop half-way.

A model written to a worker in pieces, or a worker's model read into a local one piece by piece, is
left part old and part new if its coroutine is cancelled between two pieces. Taking a copy first would
make it all or nothing, at the price of a second copy of the model in memory; instead, a cancellation
that comes once the first piece may have landed waits for the last, and goes on after.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def retrieve_error(future: "asyncio.Future[Any]") -> None:
    """Mark a pipelined future's error as seen: it is raised where its pointer is awaited, if ever."""
    if not future.cancelled():
        future.exception()


async def finish_once_begun(task: "asyncio.Future[T]", begun: Callable[[], bool]) -> T:
    """``await task``; a cancellation that comes once ``begun()`` is true lets the task finish first (its
    result is then dropped, its error raised), and is raised after; one that comes before cancels it."""
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            if not begun():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)  # its own clean-up, before ours goes on
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


__all__ = ["finish_once_begun", "retrieve_error"]
