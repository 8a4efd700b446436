"""Telling a failed ZeroMQ handshake from silence while a connection waits for a daemon's first answer.

ZeroMQ connects in the background and tries again for ever, so to a request a daemon that refuses our
key looks just like one that is not there. The socket's monitor tells them apart. What libzmq 4.3.5
reports on the client's side (tests/test_handshake_errors.py has each case against a real daemon):

- the daemon's ZAP refuses our key: ``HANDSHAKE_FAILED_AUTH`` (ZAP status 400), once; libzmq does not retry;
- keys on one side only: ``HANDSHAKE_FAILED_PROTOCOL`` with a mechanism mismatch within about 0.4 s, often
  after hang-ups (``HANDSHAKE_FAILED_NO_DETAIL``, EPIPE: the side that sees the mismatch first closes). A
  client without keys saw ``HANGUPS`` hang-ups first in 4 to 8 connects of 30, so hang-ups tell it that
  the daemon most likely uses keys;
- a ``server_key`` that is not the daemon's: only hang-ups (the daemon cannot open our HELLO), on every
  retry, 0.1-0.2 s apart. A daemon that stops mid-handshake hangs up too, so it takes ``HANGUPS`` of them;
- no daemon: no handshake event at all. That silence is the connect timeout's to judge, as before.
"""

from __future__ import annotations

from typing import cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from ..errors import HandshakeFailed, HandshakeRefused

#: what a client without keys must pass to a daemon with keys
PASS_KEYS = ("pass server_key (the daemon's public .key file) and client_key (your .key_secret file, whose .key "
             "the daemon must have in its --allowed-keys folder)")
#: hang-ups during the handshake after which a connection gives up (one may be a daemon that stopped)
HANGUPS = 3

EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class HandshakeWatch:
    """The monitor of a socket that connects, read until its handshake succeeds or fails for good.

    Make it before the socket connects (a monitor misses what happened before it), await ``outcome()``,
    and ``close()`` it in any case."""

    def __init__(self, socket: zmq.Socket, address: str, client_key: bytes | None) -> None:
        self.address = address
        #: this client's public key (Z85), or None when the socket has no keys
        self.client_key = client_key
        self._socket = socket
        # made by the socket's asyncio context, so an asyncio socket, as the daemon's own monitor
        self._monitor = cast(zmq.asyncio.Socket, socket.get_monitor_socket(EVENTS))
        self._hangups = 0

    async def outcome(self) -> HandshakeFailed | None:
        """None once the handshake succeeded, or the error of one that failed in a way that trying again
        does not mend. Silence (nothing listening) is no outcome: this waits until it is cancelled."""
        while True:
            event = await recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return None
            error = self._failure(event["event"], event["value"])
            if error is not None:
                return error

    def _failure(self, event: int, value: int) -> HandshakeFailed | None:
        daemon = f"the daemon at {self.address}"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            key = (self.client_key or b"").decode("ascii", "replace")
            return HandshakeRefused(
                f"{daemon} refused this client key, whose public part is '{key}' (ZAP status {value}): the "
                "daemon's owner must put your .key file in its --allowed-keys folder and reload it (kill -HUP), "
                "or connect with a key it allows")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if self.client_key is None:
                return HandshakeFailed(f"{daemon} uses keys (CurveZMQ) and this client gave none: {PASS_KEYS}")
            return HandshakeFailed(
                f"{daemon} does not use keys, and this client gave server_key and client_key: connect without "
                "them, or have the daemon started with --secret-key and --allowed-keys")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return HandshakeFailed(f"the handshake with {self.address} broke ZeroMQ's protocol (error {value:#x}): "
                                   "is a fedzmq daemon listening there?")
        self._hangups += 1  # HANDSHAKE_FAILED_NO_DETAIL: the peer closed the connection
        if self._hangups < HANGUPS:
            return None
        if self.client_key is None:
            return HandshakeFailed(f"{daemon} hung up during the handshake {HANGUPS} times: it most likely uses keys "
                                   f"(CurveZMQ), and this client gave none: {PASS_KEYS}")
        return HandshakeFailed(
            f"{daemon} hung up during the CurveZMQ handshake {HANGUPS} times: server_key is most likely not its "
            "public key (use the .key file of this daemon), or the daemon does not use keys")

    def close(self) -> None:
        """Stop monitoring; the socket itself is left as it is."""
        if self._monitor.closed:
            return
        if not self._socket.closed:
            self._socket.disable_monitor()
        self._monitor.close(linger=0)
