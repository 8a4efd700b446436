"""The daemon's torch threads, shared fairly between its clients' keys.

A session runs one command at a time, but a client key may hold many sessions (``--max-sessions-per-key``
connections), and a thread pool takes work first come, first served: one key's connections, each keeping
a fit running to ``--max-command-seconds`` (legitimate), made another key's small op wait about as many
times the limit as they were (a red team's 12 connections: 12 s under a 1 s limit; hours at the default
limit). ``FairPool`` keeps a queue of waiting work per key and gives a free thread to the keys in turn
(round robin), so a key waits for the work running and at most one piece of each other key's.

Without CurveZMQ keys every connection is a key of its own: anyone who can reach such a daemon can open
connections, and there is nothing to tell them apart by.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, AsyncIterator, Callable, Hashable

Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class FairPool:
    """``threads`` threads running the work ``run`` is given, each key's oldest first, keys in turn."""

    def __init__(self, threads: int, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._threads = threads
        self._running = 0
        self._closed = False
        #: the keys with work waiting, in the order they get their next turn (a dict keeps insertion order)
        self._waiting: dict[Hashable, collections.deque[Job]] = {}

    async def run(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on a thread when ``key``'s turn comes; its result or its exception. A caller
        cancelled while its work waits takes it out of the queue (with what it holds: a session's
        objects, uncharged once the session ended); once running, the work runs to its end (a thread
        cannot be stopped: the budget it checks stops it)."""
        if self._closed:
            raise RuntimeError("the worker's torch threads are shut down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        job: Job = (fn, args, future)
        self._waiting.setdefault(key, collections.deque()).append(job)
        self._start_waiting(loop)
        try:
            return await future
        except asyncio.CancelledError:
            self._forget(key, job)
            raise

    def has_waiting(self, key: Hashable) -> bool:
        """Whether work of ``key`` waits for a thread now."""
        return key in self._waiting

    def _forget(self, key: Hashable, job: Job) -> None:
        queue = self._waiting.get(key)
        if queue is None:
            return
        try:
            queue.remove(job)
        except ValueError:  # it was running (or ran) already
            return
        if not queue:
            del self._waiting[key]

    def _start_waiting(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._running < self._threads and self._waiting and not self._closed:
            key = next(iter(self._waiting))
            queue = self._waiting.pop(key)
            fn, args, future = queue.popleft()
            if queue:  # its next piece waits for the other keys' turns
                self._waiting[key] = queue
            if future.done():
                continue
            self._executor.submit(fn, *args).add_done_callback(partial(self._on_thread_done, loop, future))
            self._running += 1

    def _on_thread_done(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[Any], ran: Future[Any]) -> None:
        try:  # (on the thread that ran it)
            loop.call_soon_threadsafe(self._finished, loop, ran, waiter)
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            pass

    def _finished(self, loop: asyncio.AbstractEventLoop, ran: Future[Any], waiter: asyncio.Future[Any]) -> None:
        self._running -= 1
        try:
            if waiter.done():
                return
            if ran.cancelled():
                waiter.cancel()
                return
            error = ran.exception()
            if error is None:
                waiter.set_result(ran.result())
            elif isinstance(error, (StopIteration, StopAsyncIteration)):  # a future refuses these as errors
                waiter.set_exception(RuntimeError(f"the work raised {type(error).__name__}"))
            else:
                waiter.set_exception(error)
        finally:  # whatever happened to this waiter, the thread is free for the next key
            self._start_waiting(loop)

    def shutdown(self) -> None:
        """Fail what waits (its sessions are ending), and let the running work finish on its own."""
        self._closed = True
        for queue in self._waiting.values():
            for _, _, future in queue:
                future.cancel()
        self._waiting.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


class FairTurn:
    """An asyncio lock taken by keys in turn, as ``FairPool``'s threads are: each key's waiters oldest first,
    the keys round robin. The generator's turn (``fedzmq.worker.randomness``) was a first-come
    ``asyncio.Lock``: one key's many sessions (a connection naming four hosted clients is four sessions)
    each queued a dropout fit running to ``--max-command-seconds``, and another key's dropout op waited
    for all of them (red team h36)."""

    def __init__(self) -> None:
        self._held = False
        #: the key whose waiter holds the turn: its next waiter goes after every other key's
        self._holder: Hashable = None
        #: the keys with a waiter, in the order they get their next turn (a dict keeps insertion order)
        self._waiting: dict[Hashable, collections.deque[asyncio.Future[None]]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, key: Hashable) -> AsyncIterator[None]:
        """Hold the turn for the block, once ``key``'s turn comes."""
        await self._take(key)
        self._holder = key
        try:
            yield
        finally:
            self._pass_on()

    async def _take(self, key: Hashable) -> None:
        if not self._held and not self._waiting:
            self._held = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, collections.deque()).append(waiter)
        try:
            await waiter
        except BaseException:  # cancelled, or closed unawaited (``eager.Started.close``: GeneratorExit)
            if waiter.done() and not waiter.cancelled():  # given the turn as it was stopped: the next one's
                self._pass_on()
            else:
                self._forget(key, waiter)
            raise

    def _forget(self, key: Hashable, waiter: "asyncio.Future[None]") -> None:
        queue = self._waiting.get(key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[key]

    def _pass_on(self) -> None:
        """Give the turn to the next key's oldest waiter (that key then goes to the back, as the holder's
        does first), or free it."""
        if self._holder in self._waiting:
            self._waiting[self._holder] = self._waiting.pop(self._holder)
        while self._waiting:
            key = next(iter(self._waiting))
            queue = self._waiting.pop(key)
            waiter = queue.popleft()
            if queue:
                self._waiting[key] = queue
            if not waiter.done():
                waiter.set_result(None)
                return
        self._held = False


__all__ = ["FairPool", "FairTurn"]
