"""What a connection has been sent and not read yet: the daemon's bound on replies a client leaves in it.

ZeroMQ keeps a reply until it has written it to the connection: uncopied frames are objects' own
memory, copied ones its own. A client that stops reading leaves all of them in the daemon, however
small each is: thousands of copied replies just under 64 KiB were about 500 MiB per connection.
What waits belongs to the connection, not to one of its sessions: a session can end (``close``,
expiry, a full pipe) while its replies still wait, and the connection can open a new one. So each
connection keeps this account, past the end of its sessions, and the daemon refuses, then drops,
what a connection sends while it owes more than a session's quota (``Worker._accept_request``,
``Worker._run``, ``Worker._forget``).

Knowing when a reply has left takes a tracked send (pyzmq's zero-copy send and release: about 20 µs,
more on a busy machine), so copied replies are counted in arrears: once they reach
``UNTRACKED_REPLY_BYTES``, the next reply is tracked and carries them. ZeroMQ writes a connection's
messages in order, so when a tracked reply has left, so have all the replies before it: the account
is a queue, read from its oldest end.
"""

from __future__ import annotations

import collections
import time

import zmq

#: bytes of copied replies a connection may have been sent before one of its replies is tracked
UNTRACKED_REPLY_BYTES = 1 << 20
#: seconds after its last reply that a connection without a session is let off its untracked arrears
#: (at least twice ``--session-timeout``): a connection can so pin less than ``UNTRACKED_REPLY_BYTES``
#: beside its account once per this long, and the account of a client gone for good is dropped
ARREARS_FORGIVEN_AFTER = 600.0


class RepliesOwed:
    """The replies of one connection that ZeroMQ may still hold: tracked ones until they leave, and
    the untracked bytes sent since the last tracked one."""

    def __init__(self) -> None:
        self._tracked: collections.deque[tuple[zmq.MessageTracker, int]] = collections.deque()
        self._tracked_bytes = 0
        #: bytes of replies sent untracked since the last tracked one
        self.untracked = 0
        #: when the last reply was sent (``time.monotonic``)
        self.last_sent = time.monotonic()

    def needs_tracking(self, nbytes: int) -> bool:
        """Whether a reply of ``nbytes`` should be tracked, to carry the arrears."""
        return self.untracked + nbytes >= UNTRACKED_REPLY_BYTES

    def sent(self, nbytes: int, tracker: zmq.MessageTracker | None) -> None:
        """A reply of ``nbytes`` was handed to ZeroMQ: tracked (it carries the arrears), or not."""
        self.last_sent = time.monotonic()
        if tracker is None:
            self.untracked += nbytes
            return
        if not tracker.done:
            self._tracked.append((tracker, self.untracked + nbytes))
            self._tracked_bytes += self.untracked + nbytes
        self.untracked = 0

    def pending(self) -> bool:
        """Whether a tracked reply has not left yet."""
        while self._tracked and self._tracked[0][0].done:
            self._tracked_bytes -= self._tracked.popleft()[1]
        return bool(self._tracked)

    def settled(self, forgive_after: float) -> bool:
        """Whether nothing may wait any more: every tracked reply has left, and no untracked one was sent
        in the last ``forgive_after`` seconds (arrears can only be known to have left through a later
        tracked reply; a connection silent that long is let off them)."""
        return not self.pending() and (not self.untracked or time.monotonic() - self.last_sent > forgive_after)

    def owed(self) -> int:
        """Bytes that may still wait in ZeroMQ: tracked replies not sent, and the arrears."""
        self.pending()
        return self._tracked_bytes + self.untracked


__all__ = ["ARREARS_FORGIVEN_AFTER", "RepliesOwed", "UNTRACKED_REPLY_BYTES"]
