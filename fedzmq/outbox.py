"""Small messages for one peer, gathered while the event loop runs other code and sent as one batch.

A burst of pipelined ops, the replies a session produced in one turn of its loop: each used to be its
own ZeroMQ message, and each message costs both sides a send, a receive, a wake-up of the I/O thread
and one of the event loop (docs/profile.md). An ``Outbox`` sends the first message of a pass of the
event loop at once (a lone request or reply waits for nothing, and the peer can start on it), keeps
the others added during that pass, and sends them together, as a batch (``codec.encode_batch``), when
the loop next gets to its callbacks: as soon as the code that added them waits for anything.

Order is kept: a message that cannot join a batch (a big frame, or the batch is full) first sends what
waits. Code that sends to the same peer by another path calls ``flush`` first.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

from .codec import Limits, batch_fits, batchable, buffer_bytes, encode_batch


class Outbox:
    """Batches the messages ``add``-ed for one peer; ``send(frames, copy)`` sends one message to it.

    ``send`` is called on the event loop, from ``add`` or from ``flush``, never re-entered for the same
    messages: what it is given has left the outbox, so a ``send`` that fails and leads its caller to
    ``flush`` again finds the outbox empty."""

    def __init__(self, send: Callable[[list[Any], bool], None], limits: Limits) -> None:
        self._send = send
        self.limits = limits
        self._messages: list[list[Any]] = []
        self._sizes = (0, 0, 0, 0)  # messages, frames, header bytes, buffer bytes
        self._scheduled: asyncio.Handle | None = None
        #: batches sent (of at least two messages), for status and tests
        self.batches = 0

    def __len__(self) -> int:
        return len(self._messages)

    def add(self, frames: Sequence[Any], copy: bool = False, hold: bool = False) -> list[Any] | None:
        """Send ``frames`` with the next batch, or now (after what waits) if it cannot join one
        (``copy``: whether that send copies the buffers, as ``send`` would). ``hold``: wait for the end of
        the pass even as its first message (its sender may still change it: ``rewrite_last``). Returns
        the message as it waits, or None if it left.

        A batched message's buffers are copied now: whoever encoded it may change a tensor as soon as
        this returns, and the batch leaves later (pyzmq would have copied these small frames anyway)."""
        limits, header = self.limits, len(frames[0])
        if not batchable(frames, limits):
            self.flush()
            self._send(list(frames), copy)
            return None
        if self._scheduled is None:  # the pass's first message (none waits): at once; the pass's others after
            self._scheduled = asyncio.get_running_loop().call_soon(self._end_of_pass)
            if not hold:
                self._send(list(frames), copy)
                return None
        count, nframes, header_bytes, nbytes = self._sizes
        if count and not batch_fits(self._sizes, frames, limits):
            self.flush()
            count = nframes = header_bytes = nbytes = 0
        message = [frames[0], *map(bytes, frames[1:])] if len(frames) > 1 else [frames[0]]
        self._messages.append(message)
        self._sizes = (count + 1, nframes + len(frames), header_bytes + header, nbytes + buffer_bytes(frames))
        return message

    def rewrite_last(self, message: list[Any], header: bytes) -> bool:
        """Give ``message`` (as ``add`` returned it) a new header, if it still waits and is the last to
        leave, and the batch has room for the header; False, and nothing changed, otherwise."""
        if not self._messages or self._messages[-1] is not message:
            return False
        count, nframes, header_bytes, nbytes = self._sizes
        header_bytes += len(header) - len(message[0])
        # the room a batch has for headers (``batch_fits``; a lone message's, ``batchable``), and what
        # the worker reads of any header
        if header_bytes > self.limits.max_items or len(header) > self.limits.max_header_bytes:
            return False
        message[0] = header
        self._sizes = (count, nframes, header_bytes, nbytes)
        return True

    def _end_of_pass(self) -> None:
        self._scheduled = None
        self.flush()

    def flush(self) -> None:
        """Send what waits now: one message alone, several as a batch."""
        messages, self._messages, self._sizes = self._messages, [], (0, 0, 0, 0)
        if len(messages) == 1:
            self._send(messages[0], False)  # copied already
        elif messages:
            self.batches += 1
            self._send(encode_batch(messages), False)

    def drop(self) -> int:
        """Forget what waits (the peer is gone or the socket closing); returns how many messages."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        dropped = len(self._messages)
        self._messages, self._sizes = [], (0, 0, 0, 0)
        return dropped


__all__ = ["Outbox"]
