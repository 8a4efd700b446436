"""Freeing what a session lets go of, on a thread of its own.

Freeing is work: an optimizer over 1,800 one-element parameters holds 3,600 state tensors and their
dicts, and a session ended holding a thousand of them (3.5 GiB, inside the default quota) freed them all
in one call on the event loop, which answered no session for 3 s. Python frees an object the moment its
last reference goes, in C, without letting another thread run, so the objects a session drops (a
``delete``, the end of the session) are handed here and dropped one at a time on the reaper's thread:
between two objects the event loop takes the interpreter back (its switch interval), so a long free is
slices of a few milliseconds beside every session's work, never one long hold.

What the quota charges is not waited for: an object is uncharged when its session lets it go (``delete``
answers at once), and its memory returns a moment later, as the reaper reaches it.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Reaper:
    """One thread that drops objects handed to it, oldest first."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fedzmq-{name}-free")
        self._closed = False
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """How many hand-overs (a ``delete``'s objects, an ended session's) are not all dropped yet: shown
        in ``status()["freeing"]``, so that a long free can be seen running beside the sessions' work."""
        return self._waiting

    def free(self, objects: list[Any]) -> None:
        """Drop ``objects`` (the caller gives up its references) on the reaper's thread (here, once closed)."""
        if not objects:
            return
        if self._closed:
            objects.clear()
            return
        with self._lock:
            self._waiting += 1
        self._pool.submit(self._drop, objects)

    def _drop(self, objects: list[Any]) -> None:
        try:
            drop_one_at_a_time(objects)
        finally:
            with self._lock:
                self._waiting -= 1

    def close(self) -> None:
        """Stop taking objects; the thread frees what it was given, then ends (not waited for here: the
        caller is an event loop)."""
        self._closed = True
        self._pool.shutdown(wait=False)


def drop_one_at_a_time(objects: list[Any]) -> None:
    """Drop the list's objects one by one: a Python loop, so other threads run between two frees (clearing
    the list in one call would free them all without a switch)."""
    while objects:
        objects.pop()


__all__ = ["Reaper", "drop_one_at_a_time"]
