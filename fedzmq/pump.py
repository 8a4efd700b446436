"""Messages between one ZeroMQ socket and the event loop, without a future per message.

``zmq.asyncio`` makes a future, a poller registration and a scheduled callback for every send and
every receive. Under a stream of small commands that bookkeeping was a quarter of the CPU on each side
(docs/profile.md). A ``Pump`` drives a plain ``zmq.Socket`` from the event loop's reader callback
instead: when the socket's file descriptor signals, it receives the messages that wait, one after
another, and hands each to a callback; sends go straight to libzmq without blocking.

Two rules of ZeroMQ's file descriptor shape the code (see ``ZMQ_FD`` in the libzmq manual):

* it is **edge-triggered**: it signals when the socket's state changes, not while messages wait, so
  every wake-up reads until ``ZMQ_EVENTS`` says nothing is left;
* **any operation on the socket may consume the edge**, a send included. After a send, ``ZMQ_EVENTS``
  is checked again, and if a message waits a drain is scheduled (as pyzmq's own asyncio layer does).

Fairness: one wake-up handles at most ``max_batch`` messages or ``budget_seconds`` of callbacks,
whichever ends first, then yields to the loop's other ready callbacks (the sessions' tasks) and comes
back. A peer flooding the socket with slow-to-decode messages so delays other work by one budget,
not by everything it queued.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Callable, cast

import zmq

# plain ints: pyzmq's constants are IntFlag enums, and their arithmetic creates enum objects (measured at
# dozens of enum calls per request/reply pair when the flags were used directly)
_EVENTS, _POLLIN, _POLLOUT, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK

#: messages handled per wake-up before the pump yields to the event loop's other callbacks
MAX_BATCH = 64
#: seconds of message handling per wake-up before the pump yields (checked after each message)
BUDGET_SECONDS = 0.005


class Pump:
    """Receives from ``socket`` into ``on_message`` while ``run()`` is awaited; sends without blocking.

    ``on_message`` is called on the event loop with the message's frames (``zmq.Frame``, not copied).
    If it raises, the pump stops and ``run()`` raises that exception: a bug in a handler stops the
    service instead of being logged and forgotten. Not thread-safe: use it from its loop only.

    Close the socket only after ``run()`` has ended (cancel its task first): the loop watches the
    descriptor's number, and a number freed by a close is soon reused by the next socket.
    """

    def __init__(self, socket: zmq.Socket, on_message: Callable[[list[zmq.Frame]], None], *,
                 max_batch: int = MAX_BATCH, budget_seconds: float = BUDGET_SECONDS) -> None:
        self.socket = socket
        self._on_message = on_message
        self.max_batch = max_batch
        self.budget_seconds = budget_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._scheduled = False
        self._draining = False
        #: messages that could not be sent at once (the socket's send queue was full), oldest first
        self._backlog: collections.deque[tuple[list[Any], bool]] = collections.deque()

    async def run(self) -> None:
        """Serve the socket until cancelled (or until ``on_message`` raises, which is re-raised)."""
        loop = asyncio.get_running_loop()
        fd = cast(int, self.socket.getsockopt(zmq.FD))
        self._loop, self._stopped = loop, loop.create_future()
        loop.add_reader(fd, self._wake)
        try:
            self._wake()  # messages may wait already, and the descriptor signals only on changes
            await self._stopped
        finally:
            loop.remove_reader(fd)
            self._loop = self._stopped = None
            self._scheduled = False

    # --- sending -----------------------------------------------------------------------------------

    def send(self, frames: list[Any], *, copy: bool = False, track: bool = False) -> zmq.MessageTracker | None:
        """Send now. Raises ``zmq.Again`` if the socket cannot take the message without blocking (a
        ROUTER's full pipe), or another ``zmq.ZMQError`` (an unroutable ROUTER peer)."""
        try:
            tracker = self._send(frames, copy, track)
        finally:  # a failed send (a full pipe, a gone peer) processed libzmq's commands too
            self._recheck()
        return tracker if track else None

    def send_or_queue(self, frames: list[Any], *, copy: bool = False) -> None:
        """Send now if the socket can take it, else queue it (in order) until it can."""
        if self.socket.closed:  # as a send on it would (the backlog would never go)
            raise zmq.ZMQError(zmq.ENOTSOCK)
        if not self._backlog:
            try:
                self._send(frames, copy, False)
            except zmq.Again:
                pass
            else:
                return
            finally:
                self._recheck()
        self._backlog.append((frames, copy))
        self._schedule()

    @property
    def backlog(self) -> int:
        """How many messages wait for room in the socket's send queue."""
        return len(self._backlog)

    # --- receiving ---------------------------------------------------------------------------------

    def _wake(self) -> None:
        if not self._draining and not self._scheduled:  # a scheduled drain comes this pass anyway
            self._drain()

    def _recheck(self) -> None:
        """After a send: the send may have taken the descriptor's edge while a message arrived, so ask
        ``ZMQ_EVENTS`` now (as pyzmq's asyncio layer does) and drain soon only if a message waits, or
        if queued sends have room. With nothing waiting, the descriptor signals the next arrival: a
        request's send so costs one option call, not a pass of the event loop for a look that finds
        nothing (a reply is a round trip away). A drain under way looks after each message anyway."""
        if self._draining or self._scheduled or self.socket.closed:
            return
        try:
            events = self._events()
        except zmq.ZMQError:  # the context is ending: the send's own error (if any) is the one to see
            return
        if events & _POLLIN or (self._backlog and events & _POLLOUT):
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._scheduled_drain)

    def _scheduled_drain(self) -> None:
        self._scheduled = False
        if not self._draining:
            self._drain()

    def _drain(self) -> None:
        socket = self.socket
        if socket.closed or self._stopped is None or self._stopped.done():
            return
        self._draining = True
        try:
            started = time.perf_counter()
            for _ in range(self.max_batch):
                events = self._events()
                if self._backlog and events & _POLLOUT:
                    self._flush()
                    events = self._events()  # the flush's sends may have taken the edge
                if not events & _POLLIN:
                    return
                try:
                    frames = self._receive()
                except zmq.Again:
                    return
                self._on_message(frames)
                if socket.closed or time.perf_counter() - started > self.budget_seconds:
                    break
        except BaseException as exc:  # a handler's bug: stop serving and say so through run()
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._draining = False
        self._schedule()  # more may wait: come back after the loop's other ready callbacks

    def _events(self) -> int:
        return self.socket.getsockopt(_EVENTS)  # type: ignore[return-value]  # (an int; not cast: a call each time)

    def _send(self, frames: list[Any], copy: bool, track: bool) -> Any:
        """``send_multipart`` without its per-frame flag arithmetic on enums. A multipart message is
        atomic in libzmq: if its first frame is taken, so are the others.

        Tracked, the tracker covers every frame: pyzmq's covers only the last one, and a last frame
        small enough to be copied (a bias after its weights) is done at once while the big frames
        before it still wait to be sent from the caller's memory."""
        send, last = self.socket.send, len(frames) - 1
        if copy or not track:  # copied frames need no tracker: ZeroMQ holds its own copy at once
            for frame in frames[:last]:
                send(frame, _MORE_NOBLOCK, copy=copy)
            return send(frames[last], _NOBLOCK, copy=copy)
        trackers = [_send_tracked(send, frame, _MORE_NOBLOCK) for frame in frames[:last]]
        trackers.append(_send_tracked(send, frames[last], _NOBLOCK))
        return zmq.MessageTracker(*(t for t in trackers if t is not None))

    def take_waiting(self, limit: int) -> list[list[zmq.Frame]]:
        """Read, without blocking, up to ``limit`` messages that wait in the socket now: a service on its
        way out answers them instead of leaving their senders to find out from silence."""
        taken: list[list[zmq.Frame]] = []
        while len(taken) < limit and not self.socket.closed:
            try:
                taken.append(self._receive())
            except zmq.Again:
                break
        return taken

    def _receive(self) -> list[zmq.Frame]:
        """``recv_multipart(copy=False)`` reading ``Frame.more`` instead of a ``RCVMORE`` option call per frame."""
        recv = self.socket.recv
        frames = [recv(_NOBLOCK, copy=False)]
        while frames[-1].more:
            frames.append(recv(_NOBLOCK, copy=False))
        return frames

    def _flush(self) -> None:
        while self._backlog:
            frames, copy = self._backlog[0]
            try:
                self._send(frames, copy, False)
            except zmq.Again:
                return
            self._backlog.popleft()

    def drop_backlog(self) -> int:
        """Forget the messages waiting to be sent (the socket is closing); returns how many."""
        dropped = len(self._backlog)
        self._backlog.clear()
        return dropped


def _send_tracked(send: Any, frame: Any, flags: int) -> zmq.MessageTracker | None:
    """Send one frame without copying, tracked. A ``zmq.Frame`` carries its own tracker (None if it was
    made untracked): sending it with ``track=True`` would raise midway through a multipart message."""
    if isinstance(frame, zmq.Frame):
        send(frame, flags, copy=False)
        return frame.tracker
    return cast(zmq.MessageTracker, send(frame, flags, copy=False, track=True))


__all__ = ["BUDGET_SECONDS", "MAX_BATCH", "Pump"]
