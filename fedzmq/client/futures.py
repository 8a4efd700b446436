"""Futures of work the client does not await at once: errors marked as seen, and local work in pieces
that must not stop half-way (a worker's model read into a local one piece by piece is left part old,
part new if cancelled between two pieces; taking a copy first would cost a second copy of the model).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

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
