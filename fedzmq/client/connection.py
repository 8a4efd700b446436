"""One client session with one worker: a DEALER socket, request ids, replies, heartbeats.

Every request gets a fresh id; its reply carries the same id and resolves the matching future, so
requests can be pipelined: ``submit`` sends at once and returns the future, and ZeroMQ keeps the
order of sends, which the worker keeps when it runs them.

Liveness and deadlines are separate (the ZeroMQ Guide's Paranoid Pirate): a heartbeat goes out every
``heartbeat_interval`` seconds, and anything the worker sends counts as a sign of life. After
``heartbeat_liveness`` intervals of silence the worker is declared dead and every waiting request fails
with ``WorkerDeadError``; a long command on a live worker never times out unless its caller gave
a deadline (``timeout=``), which raises ``RequestTimeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple, Sequence

import zmq
import zmq.asyncio

from ..codec import (Limits, Reply, check_message, decode_reply, encode_request, is_batch, split_batch,
                     split_fetched, with_argument)
from ..commands import COMMANDS
from ..outbox import Outbox
from ..pump import Pump
from ..torchmodes import default_modes
from ..security import KeyPath, SecurityError, apply_client_keys
from ..errors import (
    LimitExceeded, ProtocolError, RequestTimeout, WorkerClosedError, WorkerDeadError, WorkerError, error_payload,
    remote_error,
)
from .addresses import check_address, resolve
from .futures import retrieve_error as _retrieve
from .handshake import HandshakeWatch

log = logging.getLogger("fedzmq.client")

#: how long ``close`` waits for the worker to confirm the session's end (it frees the objects either
#: way when the session times out)
GOODBYE_SECONDS = 1.0


@dataclass(frozen=True)
class ConnectionSettings:
    #: seconds between heartbeats sent to the worker
    heartbeat_interval: float = 1.0
    #: heartbeat intervals of silence after which the worker is declared dead
    heartbeat_liveness: int = 10
    #: how long ``connect`` waits for the first answer
    connect_timeout: float = 10.0
    limits: Limits = Limits()


class Connection:
    """A session with one worker. Not usable from several event loops."""

    def __init__(self, address: str, settings: ConnectionSettings | None = None,
                 context: zmq.asyncio.Context | None = None,
                 encode_default: Callable[[Any], Any] | None = None,
                 server_key: KeyPath | bytes | None = None, client_key: KeyPath | None = None) -> None:
        self.address = check_address(address)  # a malformed address fails here, before any socket exists
        self.settings = settings or ConnectionSettings()
        self._context = context or zmq.asyncio.Context.instance()
        self._encode_default = encode_default
        # a plain socket driven by a Pump: no zmq.asyncio future per message
        self._socket: zmq.Socket | None = zmq.Socket(self._context, zmq.DEALER)
        self._pump = Pump(self._socket, self._dispatch)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.setsockopt(zmq.ROUTING_ID, os.urandom(16))  # the session key: unguessable
        if (server_key is None) != (client_key is None):
            self._socket.close(linger=0)
            raise SecurityError("pass both server_key (the daemon's public key) and client_key (your .key_secret); "
                                "on the command line, --server-key and --client-key")
        #: this client's public key (Z85), or None without keys
        self._client_key = None
        if server_key is not None and client_key is not None:
            self._client_key = apply_client_keys(self._socket, server_key, client_key)
        self._socket_connected = False  # connected by ``open`` once the host resolved, or by the first request
        #: the socket's monitor from ``open`` until the handshake succeeded or failed
        self._handshake: HandshakeWatch | None = None
        self._copy_frames = address.startswith("inproc://")
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: the tear-down once ``close`` started it (it finishes even when that close is cancelled)
        self._closing: asyncio.Task[None] | None = None
        self._last_heard = time.monotonic()
        #: how long ZeroMQ may still deliver what was sent once the socket is closed (``give_up``'s goodbye)
        self._linger_ms = 0
        #: ``close`` sent the goodbye that ends the worker's session: no request may follow it
        self._said_goodbye = False
        self._dead: WorkerDeadError | None = None
        self._heartbeat_id: int | None = None
        #: ids of pending requests outside the daemon session's order (control commands, and requests to
        #: the logical clients a daemon hosts); every other pending request runs in session order
        self._control: set[int] = set()
        #: the worker-side session we talk to; a change means it was reset (restart or expiry)
        self.session: str | None = None
        self.session_resets = 0
        #: the limits in force: ours, lowered to the worker's once it told us (``adopt_worker_limits``)
        self.limits = self.settings.limits
        #: the small requests after the first of a pass of the event loop go as one message, once the
        #: worker said it reads batches (``adopt_worker_limits``); until then one by one
        self._outbox = Outbox(self._send_message, dataclasses.replace(self.limits, max_batch=1))
        #: what a batch of replies may hold: up to the worker's limits where they are above ours (it
        #: batches within its own; each reply in a batch is still decoded within ``limits``)
        self._reply_batches = self.limits
        #: the worker runs an op and a ``get`` of its output as one command (``commands.FEATURES``)
        self.fuses_fetch = False
        #: the last request submitted, when it is an op that may still become an op-and-fetch (``fetch_with``)
        self._fusable: _HeldOp | None = None
        #: op-and-fetch requests: the future of the fetched value's reply, by request id
        self._fetches: dict[int, asyncio.Future[Reply]] = {}
        #: RemoteWorkers sharing this connection (one per logical client of the daemon): it closes with the last
        self.users = 1
        #: the numbers the secure-aggregation rounds of this connection's sessions go by on the daemon, which
        #: keeps a session's rounds by that number: unique here, so two federations' round 1 over the same
        #: sessions at once are two rounds, not one whose keys and module each overwrites
        self.secure_round_numbers = itertools.count(1)
        self.bytes_sent = 0
        self.bytes_received = 0

    # --- lifecycle -----------------------------------------------------------------------------

    async def open(self, timeout: float | None = None) -> None:
        """Check that the address's host name resolves (``AddressError`` at once if not, instead of a
        connect that waits its whole timeout), then connect the socket, watching its handshake: one that
        fails for good (a refused key, keys on one side only) fails the requests then waiting with
        ``HandshakeFailed`` at once. Requests connect the socket too, unchecked."""
        if self._socket is None:
            raise WorkerClosedError(f"connection to {self.address} is closed")
        if not self._socket_connected:
            await resolve(self.address, timeout)
            if not self._copy_frames:  # inproc has no handshake
                self._handshake = HandshakeWatch(self._socket, self.address, self._client_key)
            self._connect_socket()

    def _connect_socket(self) -> None:
        assert self._socket is not None
        if not self._socket_connected:
            self._socket.connect(self.address)
            self._socket_connected = True

    def _ensure_started(self) -> None:
        if self._socket is None:
            raise WorkerClosedError(f"connection to {self.address} is closed")
        self._connect_socket()
        if not self._tasks:
            self._last_heard = time.monotonic()
            receiving = asyncio.create_task(self._pump.run(), name=f"fedzmq-recv-{self.address}")
            receiving.add_done_callback(self._on_receiving_ended)
            self._tasks = [receiving,
                           asyncio.create_task(self._heartbeat_loop(), name=f"fedzmq-heartbeat-{self.address}")]
            if self._handshake is not None:
                self._tasks.append(asyncio.create_task(self._watch_handshake(self._handshake),
                                                       name=f"fedzmq-handshake-{self.address}"))

    async def _watch_handshake(self, watch: HandshakeWatch) -> None:
        """Until the handshake's outcome; a failed one fails what waits (``connect``'s ping) with its reason."""
        try:
            failure = await watch.outcome()
        finally:
            watch.close()
            self._handshake = None
        if failure is not None:
            self._fail_all(failure)

    def _on_receiving_ended(self, task: asyncio.Task[None]) -> None:
        """Replies are no longer read (a bug in handling one): fail what waits now, not after the
        heartbeats' silence, and say why."""
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("reading replies from %s stopped: %s: %s", self.address, type(error).__name__, error)
        self._dead = WorkerDeadError(f"replies from {self.address} can no longer be read "
                                     f"({type(error).__name__}: {error})")
        self._fail_all(self._dead)

    @property
    def closed(self) -> bool:
        return self._socket is None

    @property
    def alive(self) -> bool:
        return self._dead is None

    async def close(self, say_goodbye: bool = True) -> None:
        """End the session: the worker frees its objects. Waits briefly for the worker's answer.

        A close that is cancelled (a deadline around it, or around an ``async with``'s exit) still
        closes: the tear-down runs whatever happens to the goodbye, on a task of its own that a later
        ``close()`` waits for, so no heartbeat keeps the session alive and no socket stays open."""
        if self._socket is None:
            return
        if self._closing is None:
            try:
                if say_goodbye and self._tasks and self._dead is None:
                    # nothing may follow the goodbye: the worker would open a new session for it, where the
                    # objects it names are gone (ObjectNotFound instead of WorkerClosedError)
                    self._said_goodbye = True
                    with contextlib.suppress(Exception):  # a worker that does not answer at once is gone or busy
                        await self.request("close", {}, timeout=GOODBYE_SECONDS)
            finally:
                if self._closing is None and self._socket is not None:
                    self._closing = asyncio.ensure_future(self._tear_down())
        if self._closing is not None:
            if self._closing.cancelled() and self._socket is not None:  # the tear-down itself was cancelled
                self._closing = asyncio.ensure_future(self._tear_down())
            await asyncio.shield(self._closing)

    async def give_up(self) -> None:
        """Close the connection of a connect that was given up (cancelled, a deadline): once its ping left, the
        daemon opened a session for it, which only a goodbye ends (else it stays until --session-timeout, and
        counts against --max-sessions and --max-sessions-per-key). The goodbye is queued, not awaited, and
        ZeroMQ may deliver it (and the ping, if that still waits for the daemon) for up to
        ``GOODBYE_SECONDS`` after the socket is closed: a deadline is not stretched by it."""
        if self._socket is not None and self._closing is None and self._tasks and self._dead is None:
            with contextlib.suppress(WorkerError):  # (a socket that cannot send: nothing reached the daemon)
                self.submit("close", {}).add_done_callback(_retrieve)
                self._outbox.flush()
                self._linger_ms = int(GOODBYE_SECONDS * 1000)
        await self.close(say_goodbye=False)

    def discard_unused(self) -> None:
        """Close the socket now if nothing was ever started on it (no task, no request, no close under way);
        else leave it to ``close``."""
        if self._socket is None or self._tasks or self._pending or self._closing is not None:
            return
        if self._handshake is not None:
            self._handshake.close()
            self._handshake = None
        self._socket.close(linger=0)
        self._socket = None

    async def _tear_down(self) -> None:
        """Stop the receive and heartbeat tasks, fail what still waits for a reply, close the socket."""
        try:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)  # the reader leaves the socket's descriptor
        finally:  # even when cancelled itself (the loop shutting down cancels every task)
            self._tasks = []
            self._fail_all(WorkerClosedError(f"connection to {self.address} was closed"))
            self._outbox.drop()
            self._pump.drop_backlog()
            if self._handshake is not None:  # its task never ran
                self._handshake.close()
                self._handshake = None
            if self._socket is not None:
                self._socket.close(linger=self._linger_ms)
                self._socket = None

    # --- requests ------------------------------------------------------------------------------

    def submit(self, cmd: str, args: dict[str, Any], copy: bool = False, client: str | None = None,
               default: Callable[[Any], Any] | None = None, fusable: bool = False) -> asyncio.Future[Reply]:
        """Send a request and return the future of its reply (which may hold an error reply).

        The first request of a pass of the event loop leaves at once; small ones after it in the same
        pass leave together when the loop next runs its callbacks (when the caller waits for anything;
        ``fedzmq.outbox``), their tensors' bytes copied now. ``copy``: also copy a big request's
        tensors (else they must not change until sent).
        ``client``: one of the logical clients the daemon hosts (None: the daemon itself); ``default``:
        the encoder's hook for values it does not know (pointers), if not the connection's; ``fusable``:
        an op with one output, held to the end of the pass so that a ``get`` of it may join it
        (``fetch_with``)."""
        self._ensure_started()
        if self._dead is not None:
            raise WorkerDeadError(str(self._dead))
        if self._said_goodbye and cmd != "close":
            raise WorkerClosedError(f"connection to {self.address} is closing")
        request_id = next(self._ids)
        frames = encode_request(request_id, cmd, args, default or self._encode_default, client)
        self._check_size(cmd, frames)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if COMMANDS[cmd].control or client is not None:
            # answered out of the daemon session's order: a lost-reply check must not judge it
            self._control.add(request_id)
            future.add_done_callback(partial(_discard, self._control, request_id))
        fusable = fusable and self.fuses_fetch
        message = self._outbox.add(frames, copy=copy or self._copy_frames, hold=fusable)
        self._fusable = _HeldOp(request_id, future, message) if fusable and message is not None else None
        self.bytes_sent += sum(map(len, frames))
        return future

    def fetch_with(self, ready: asyncio.Future[Reply]) -> asyncio.Future[Reply] | None:
        """Make the op whose reply is ``ready`` an op-and-fetch, if it is the last request submitted and
        still waits to leave: it then runs as the op and a ``get`` of its output one after the other, in
        one command and one reply. Returns the future of the fetched value's reply; None when the op
        left already or another request followed it (send a ``get``: its place in the order is now)."""
        held = self._fusable
        if held is None or held.reply is not ready:
            return None
        self._fusable = None
        if not self._outbox.rewrite_last(held.message, with_argument(held.message[0], "fetch", True)):
            return None  # past the worker's header limits: the op as it is, then a get
        fetched: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._fetches[held.request_id] = fetched
        return fetched

    def _send_message(self, frames: list[Any], copy: bool) -> None:
        """The outbox's send, often from a callback of the loop: a socket that cannot send any more
        (closed, or its context terminated) fails the waiting requests instead of leaving them waiting."""
        try:
            self._pump.send_or_queue(frames, copy=copy or self._copy_frames)
        except zmq.ZMQError as exc:
            self._dead = WorkerDeadError(f"cannot send to {self.address}: {exc}")
            self._fail_all(self._dead)

    @property
    def batches_sent(self) -> int:
        """Messages sent that carried several requests."""
        return self._outbox.batches

    def announce(self) -> dict[str, Any]:
        """What a ping or heartbeat tells the worker about us: how often we send heartbeats, so it can
        tell a client that is gone (silent for many of them) from one that is quietly waiting, and the
        biggest piece we read (a reply's tensor past it comes as a stream)."""
        return {"interval": self.settings.heartbeat_interval, "chunk_bytes": self.settings.limits.chunk_bytes}

    def note_progress(self) -> None:
        """A stream's chunk was acknowledged: the worker is alive (no heartbeat needed meanwhile)."""
        self._last_heard = time.monotonic()

    def _check_size(self, cmd: str, frames: list[Any]) -> None:
        """Refuse locally what the worker would refuse, instead of waiting for its error (it could not
        name this request in its error: the request would wait for ever)."""
        try:
            check_message(frames, self.limits)
        except ProtocolError as exc:
            raise LimitExceeded.new(f"{cmd}: message exceeds the worker's limits: {exc} "
                                    f"(max_items {self.limits.max_items})") from None

    def adopt_features(self, features: Any) -> None:
        """Use what the worker says it offers beyond the protocol's first version (its ping's ``features``)."""
        self.fuses_fetch = isinstance(features, list) and "fetch" in features

    def adopt_worker_limits(self, worker_limits: dict[str, Any]) -> None:
        """Use the smaller of our limits and the worker's, so that both sides agree on chunk sizes."""
        mine = self.settings.limits
        self.limits = dataclasses.replace(mine, **{
            name: min(getattr(mine, name), value) for name, value in worker_limits.items()
            if hasattr(mine, name) and type(value) is int and value > 0})
        self._reply_batches = dataclasses.replace(self.limits, **{
            name: max(getattr(mine, name), worker_limits[name]) for name in ("max_batch", "max_frames", "max_items")
            if type(worker_limits.get(name)) is int and worker_limits[name] > 0})
        # a worker that does not name max_batch predates batches: send it one request per message
        speaks_batches = type(worker_limits.get("max_batch")) is int
        self._outbox.flush()
        self._outbox.limits = self.limits if speaks_batches else dataclasses.replace(self.limits, max_batch=1)

    async def request(self, cmd: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        """Send a request and wait for its result; raise the remote error if it failed."""
        return await self.wait(self.submit(cmd, args), timeout)

    async def wait(self, future: asyncio.Future[Reply], timeout: float | None = None) -> Any:
        """The reply's result (or its error raised), within ``timeout`` seconds. ``asyncio.timeout``, not
        ``wait_for``: on Python 3.11, a ``wait_for`` cancelled just as its reply arrives returns the reply and
        loses the cancellation (CPython gh-86296), so a connect under a deadline returned a live worker
        nobody held, its session and tasks left running."""
        if not timeout:
            return unwrap(await future)
        try:
            async with asyncio.timeout(timeout):
                reply = await asyncio.shield(future)
        except TimeoutError:
            raise RequestTimeout(f"no reply from {self.address} within {timeout}s") from None
        return unwrap(reply)

    # --- the loops -----------------------------------------------------------------------------

    def _dispatch(self, frames: list[Any]) -> None:
        self._last_heard = time.monotonic()
        self.bytes_received += sum(map(len, frames))  # (a zmq.Frame's len is its bytes)
        if self._dead is not None:
            log.info("worker at %s answers again", self.address)
            self._dead = None
        if not is_batch(frames):
            self._resolve(frames)
            return
        try:
            replies = split_batch(frames, self._reply_batches)
        except ProtocolError as exc:  # replies were lost, and which ones cannot be told: fail every request
            log.warning("undecodable batch of replies from %s: %s", self.address, exc)
            self._fail_all(ProtocolError(f"{self.address} sent a batch of replies that breaks the protocol "
                                         f"({exc}); the requests waiting on it may or may not have run"))
            return
        for reply_frames in replies:
            self._resolve(reply_frames)

    def _resolve(self, frames: Sequence[Any]) -> None:
        """Decode one reply and hand it to the request waiting for it."""
        try:
            with default_modes():  # tensors made in the default modes, whatever a coroutine holds meanwhile
                reply = decode_reply(frames, self.limits)  # (an inference tensor can be neither trained nor folded)
        except ProtocolError as exc:  # the worker's reply broke the protocol: a local error
            log.warning("undecodable reply from %s: %s", self.address, exc)
            if exc.request_id is not None:
                for broken in (self._pending.pop(exc.request_id, None), self._fetches.pop(exc.request_id, None)):
                    if broken is not None and not broken.done():  # an op-and-fetch's: the op's pointer too
                        broken.set_exception(exc)
            return
        fetched = self._fetches.pop(reply.id, None) if reply.id is not None else None
        if fetched is not None:
            reply = self._hand_fetched(reply, fetched)
        future = self._pending.pop(reply.id, None) if reply.id is not None else None
        if future is None:  # its request was cancelled or timed out
            if not reply.ok and reply.error:
                log.warning("worker %s reports: %s: %s", self.address, reply.error["type"], reply.error["message"])
            return
        if not future.done():
            future.set_result(reply)

    def _hand_fetched(self, reply: Reply, fetched: asyncio.Future[Reply]) -> Reply:
        """Give an op-and-fetch's fetched value to whoever waits for it; returns the op's own reply."""
        try:
            op_reply, fetch_reply = split_fetched(reply)
        except ProtocolError as exc:
            log.warning("bad op-and-fetch reply from %s: %s", self.address, exc)
            op_reply = fetch_reply = Reply(reply.id, False, error=error_payload(exc, ""))
        if not fetched.done():
            fetched.set_result(fetch_reply)
        return op_reply

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            slept_from = time.monotonic()
            await asyncio.sleep(interval)
            stall = time.monotonic() - slept_from - interval
            if stall > interval / 2:
                # our own event loop was blocked (a long computation, an import): replies may be waiting
                # unread. That silence is ours, not the worker's: give it back, and judge next time.
                self._last_heard += stall
                continue
            silent = time.monotonic() - self._last_heard
            if silent > interval * self.settings.heartbeat_liveness and self._dead is None:
                self._dead = WorkerDeadError(
                    f"worker at {self.address} silent for {silent:.1f}s "
                    f"({self.settings.heartbeat_liveness} heartbeats missed)")
                log.warning("%s", self._dead)
                self._fail_all(self._dead)
            if silent >= interval:
                self._send_heartbeat()

    def _send_heartbeat(self) -> None:
        if self._heartbeat_id is not None:  # one unanswered heartbeat at a time is enough
            self._pending.pop(self._heartbeat_id, None)
        request_id = self._heartbeat_id = next(self._ids)
        answered: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        answered.add_done_callback(self._on_heartbeat)
        self._pending[request_id] = answered
        self._pump.send_or_queue(encode_request(request_id, "heartbeat", self.announce()))

    def note_session(self, session: str | None) -> bool:
        """Record the worker-side session id a reply named; True (and pending requests failed) when it
        changed: the worker restarted or expired our session, and its objects are gone."""
        if session is None or session == self.session:
            return False
        changed = self.session is not None
        self.session = session
        if changed:
            self.session_resets += 1
            self.fuses_fetch = False  # the worker may be another version now: until a ping names it again
            self._fail_ordered(lambda _: True, "the worker's session was reset (restarted, or idle too long): "
                                               "its objects are gone")
        return changed

    def _on_heartbeat(self, future: asyncio.Future[Reply]) -> None:
        if future.cancelled() or future.exception() is not None or not future.result().ok:
            return
        result = future.result().result
        if not isinstance(result, dict):
            return
        self.note_session(result.get("session"))
        last_done = result.get("last_done")
        if type(last_done) is int:  # finished on the worker but no reply here: lost in a reconnect
            self._fail_ordered(lambda i: i <= last_done, "the reply was lost (the connection dropped while "
                                                         "the worker answered); the command did run")

    def _fail_ordered(self, which: Callable[[int], bool], why: str) -> None:
        for request_id in [i for i in self._pending if i not in self._control and i != self._heartbeat_id
                           and which(i)]:
            for future in (self._pending.pop(request_id, None), self._fetches.pop(request_id, None)):
                if future is not None and not future.done():
                    future.set_exception(WorkerError(f"{self.address}: {why}"))
                    future.add_done_callback(_ignore_result)

    def _fail_all(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        fetches, self._fetches = self._fetches, {}
        for future in [*pending.values(), *fetches.values()]:
            if not future.done():
                future.set_exception(type(error)(str(error)))
                future.add_done_callback(_ignore_result)  # raised to whoever awaits it; no warning otherwise


class _HeldOp(NamedTuple):
    """An op waiting in the outbox that a ``get`` of its output may still join."""

    request_id: int
    reply: asyncio.Future[Reply]  # the op's own reply's future (its pointers')
    message: list[Any]  # as it waits in the outbox


def unwrap(reply: Reply) -> Any:
    if reply.ok:
        return reply.result
    assert reply.error is not None
    raise remote_error(reply.error["type"], reply.error["message"], reply.error["traceback"])


def _discard(ids: set[int], request_id: int, _: object) -> None:
    ids.discard(request_id)


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
