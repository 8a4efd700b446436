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
from typing import Any, AsyncIterator, Callable, Generic, Hashable, TypeVar

Item = TypeVar("Item")
Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class TakeTurns(Generic[Item]):
    """Items waiting per key, each key's oldest first and the keys round robin: the one order both the
    torch threads (``FairPool``) and the generator's turn (``FairTurn``) serve in. A key whose item is
    taken goes to the back if more of its items wait; a key that holds what it took sends itself to the
    back when it gives it up (``to_back``), so one that got in while nothing waited goes after the others."""

    def __init__(self) -> None:
        #: the keys with items waiting, in the order they get their next turn (a dict keeps insertion order)
        self._queues: dict[Hashable, collections.deque[Item]] = {}

    def __bool__(self) -> bool:
        return bool(self._queues)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._queues

    def add(self, key: Hashable, item: Item, first: bool = False) -> None:
        """Queue ``item`` behind ``key``'s others, or ahead of them if ``first`` (a new key gets its turn after
        every key waiting now)."""
        queue = self._queues.setdefault(key, collections.deque())
        if first:
            queue.appendleft(item)
        else:
            queue.append(item)

    def take(self) -> Item:
        """The oldest item of the key whose turn it is (there must be one: check ``bool`` first)."""
        key = next(iter(self._queues))
        queue = self._queues.pop(key)
        item = queue.popleft()
        if queue:  # its next item waits for the other keys' turns
            self._queues[key] = queue
        return item

    def remove(self, key: Hashable, item: Item) -> bool:
        """Take ``item`` out of ``key``'s queue; False if it is not there (taken already). Found by identity:
        ``deque.remove`` compares it with the items before it, and a job's arguments hold tensors, whose
        ``==`` is elementwise (its truth value raised, and the waiter's cancellation became that error)."""
        queue = self._queues.get(key)
        if queue is None:
            return False
        index = next((i for i, queued in enumerate(queue) if queued is item), None)
        if index is None:
            return False
        del queue[index]
        if not queue:
            del self._queues[key]
        return True

    def to_back(self, key: Hashable) -> None:
        """Give ``key``'s turn to every other key waiting now."""
        if key in self._queues:
            self._queues[key] = self._queues.pop(key)

    def clear(self) -> list[Item]:
        """Empty the queues; returns what waited."""
        items = [item for queue in self._queues.values() for item in queue]
        self._queues.clear()
        return items


class FairPool:
    """``threads`` threads running the work ``run`` is given, each key's oldest first, keys in turn."""

    def __init__(self, threads: int, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._threads = threads
        self._running = 0
        self._closed = False
        self._waiting: TakeTurns[Job] = TakeTurns()

    async def run(self, key: Hashable, fn: Callable[..., Any], *args: Any, first: bool = False) -> Any:
        """Run ``fn(*args)`` on a thread when ``key``'s turn comes; its result or its exception. A caller
        cancelled (or closed) while its work waits takes it out of the queue (with what it holds: a session's
        objects, uncharged once the session ended); once running, the work runs to its end (a thread
        cannot be stopped: the budget it checks stops it). ``first``: ahead of ``key``'s other work (work
        that holds what other keys wait for: the generator's turn)."""
        if self._closed:
            raise RuntimeError("the worker's torch threads are shut down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        job: Job = (fn, args, future)
        self._waiting.add(key, job, first)
        self._start_waiting(loop)
        try:
            return await future
        except (asyncio.CancelledError, GeneratorExit):  # (GeneratorExit: closed unawaited, ``eager.Started.close``)
            self._waiting.remove(key, job)  # (False if it was running, or ran, already)
            raise

    @property
    def busy(self) -> int:
        """Threads running work now (a test waits for work to have taken its thread on this, not on a sleep)."""
        return self._running

    def has_waiting(self, key: Hashable) -> bool:
        """Whether work of ``key`` waits for a thread now."""
        return key in self._waiting

    def _start_waiting(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._running < self._threads and self._waiting and not self._closed:
            fn, args, future = self._waiting.take()
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
        for _, _, future in self._waiting.clear():
            future.cancel()
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
        self._waiting: TakeTurns[asyncio.Future[None]] = TakeTurns()

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
        self._waiting.add(key, waiter)
        try:
            await waiter
        except BaseException:  # cancelled, or closed unawaited (``eager.Started.close``: GeneratorExit)
            if waiter.done() and not waiter.cancelled():  # given the turn as it was stopped: the next one's
                self._pass_on()
            else:
                self._waiting.remove(key, waiter)
            raise

    def _pass_on(self) -> None:
        """Give the turn to the next key's oldest waiter (that key then goes to the back, as the holder's
        does first), or free it."""
        self._waiting.to_back(self._holder)
        while self._waiting:
            waiter = self._waiting.take()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._held = False


__all__ = ["FairPool", "FairTurn", "TakeTurns"]
