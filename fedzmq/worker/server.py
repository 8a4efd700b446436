"""The worker's transport: a ROUTER socket, one ordered queue per client session, and replies.

    socket pump ──decode──► control command? ──yes──► answer at once (ping, heartbeat, status)
                                   │ no
                                   ▼
           session idle? ──yes──► run it now, in the pump's callback (``fedzmq.eager``) ──► reply
                                   │ no                        │ it waits (torch thread, big reply)
                                   ▼                           ▼
                        session queue (FIFO) ──► session task ──► executor (loop or torch thread) ──► reply

The pump (``fedzmq.pump``: the socket driven by the event loop's reader callback, a bounded batch of
messages per wake-up) never runs long work: commands that run on the event loop are small by rule
(``fedzmq.worker.cost``), and everything else goes to a torch thread, so pings and heartbeats are
answered while a session is busy. A command of a session with nothing queued or running runs as the
pump reads it, which saves a pass of the loop and a task step per command; one that waits is handed to
the session's task, and the session's later commands queue behind it. Each session has its own task,
so one session's commands keep their order and other sessions do not wait on it. A message that fails
decoding gets an error reply to its sender and is counted; nothing else is touched. What a command does
is the executor's business (``fedzmq.worker.executor``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import secrets
import time
import uuid
from functools import partial
from typing import Any, Sequence, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ..__about__ import __version__
from ..codec import (PROTOCOL_VERSION, Request, buffer_bytes, decode_request, decode_request_head, encode_error,
                     is_batch, split_batch)
from ..commands import COMMANDS, FEATURES
from ..eager import Started, start
from ..errors import FedzmqError, ProtocolError, error_payload
from ..modeldesc import ModelRegistry
from ..outbox import Outbox
from ..pump import BUDGET_SECONDS, Pump
from ..security import KeyGate, SecurityError, address_problem, apply_server_keys, is_loopback_address
from ..torchmodes import default_modes
from .binding import Context
from .config import WorkerConfig
from .cost import Coster, warm_up
from .datasets import Dataset
from .executor import Executor, fail_outputs
from .fairpool import FairPool
from .randomness import OwnGenerator
from .ledger import ReleaseLedger, check_apart
from .policy import Policy
from .reaper import Reaper
from .replies import ARREARS_FORGIVEN_AFTER, UNTRACKED_REPLY_BYTES, RepliesOwed
from .session import Peer, Session, StartedCommand
from .training import Terms

log = logging.getLogger("fedzmq.worker")


#: requests of one peer accepted in a row before the next peer's turn; a batch of at most this many from
#: a peer with nothing waiting is accepted at once (see ``Worker._accept``)
INTAKE_TURN = 4

#: the most messages waiting in the socket a stopping worker reads to answer "is stopping"
STOPPING_READS = 1024

#: the longest a session's commands run on the event loop before it lets others have it (see
#: ``Worker._session_loop``; the pump bounds its own batches the same way)
SESSION_SLICE_SECONDS = 0.005

#: a session whose client announced its heartbeat interval is closed after this many intervals of
#: silence (and may be evicted for a new client after ``EVICT_AFTER_INTERVALS``, or sooner if empty)
GONE_AFTER_INTERVALS = 20
EVICT_AFTER_INTERVALS = 10
EVICT_EMPTY_AFTER_INTERVALS = 3
#: seconds of silence after which a session of a client that announced nothing may be evicted
EVICT_AFTER_SECONDS = 10.0
#: how long ZeroMQ may still deliver, once the worker closed, the refusals of what it will not answer
FAREWELL_SECONDS = 0.5
#: after a look for a connection to evict found none, the next look waits this long: the look walks
#: every connection, and a full daemon would otherwise walk them for each request of each new peer
EVICT_SCAN_SECONDS = 0.1

#: complete messages of one connection that may wait unread in ZeroMQ's queue (``RCVHWM``); past them
#: ZeroMQ stops reading that connection, and TCP holds its sender back. Bounds in messages what a peer
#: sending faster than the daemon reads makes it hold (each message's frames are bounded only one by
#: one, by ``MAXMSGSIZE``: docs/security.md), without slowing a peer the daemon keeps up with
RECEIVE_QUEUE = 64

#: what a connection whose key was taken out of ``--allowed-keys`` since it connected is told
KEY_REVOKED = "this client's key is no longer allowed (the daemon's --allowed-keys were reloaded without it)"


class WorkerNotBound(FedzmqError, RuntimeError):
    """``Worker.start`` was called before ``Worker.bind``."""


class Worker:
    """A worker daemon's engine. ``fedzmq-worker`` runs one over tcp; ``VirtualWorker`` over inproc."""

    def __init__(self, worker_id: str, *, config: WorkerConfig | None = None,
                 models: ModelRegistry | None = None, datasets: dict[str, Dataset] | None = None,
                 clients: dict[str, dict[str, Dataset]] | None = None,
                 context: zmq.asyncio.Context | None = None, in_process: bool = False) -> None:
        """``in_process``: the worker shares its caller's process (``VirtualWorker``), so it keeps a random
        state of its own (``fedzmq.worker.randomness``)."""
        self.id = worker_id
        self.config = config = config or WorkerConfig()
        self.instance = uuid.uuid4().hex
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.Socket | None = None
        self._pump: Pump | None = None
        self._copy_frames = False
        self._peers: dict[bytes, Peer] = {}
        self._pool = FairPool(config.threads, f"fedzmq-{worker_id}")
        self._reaper = Reaper(worker_id)
        self._tasks: list[asyncio.Task[None]] = []
        #: ``say_stopping`` answered what will not run: ``close`` lets ZeroMQ deliver it
        self._farewell = False
        #: sessions with commands to run (or running one), which share ``SESSION_SLICE_SECONDS``
        self._busy_sessions = 0
        #: per peer, requests of batches not yet accepted (in order), and the peers' turns (``_take_intake``)
        self._intake: dict[bytes, collections.deque[tuple[Sequence[Any], bool]]] = {}
        self._intake_turns: collections.deque[bytes] = collections.deque()
        self._intake_scheduled = False
        #: when ``_evict_one`` may next look for a connection to evict (see ``EVICT_SCAN_SECONDS``)
        self._next_evict_scan = 0.0
        #: until when commands may still run at once in the message (or intake turn) being read: past one
        #: slice, a batch's later commands go to their session's queue (see ``_run_at_once``)
        self._run_at_once_until = 0.0
        #: what connections without a session were sent and may not have read yet (``_forget``, ``_account``)
        self._owing: dict[bytes, RepliesOwed] = {}
        #: the status snapshot of the intake turn being taken, if one was asked for (see ``status``)
        self._status: dict[str, Any] | None = None
        self._status_batch = False
        self._started = time.monotonic()
        self.address: str | None = None
        self.datasets = datasets or {}
        #: logical clients this daemon hosts (``--clients-from``): client id -> its datasets
        self.clients = clients or {}
        self.counters = {"requests": 0, "malformed": 0, "errors": 0, "sessions_closed": 0, "sessions_expired": 0,
                         "sessions_evicted": 0, "sessions_refused": 0, "throttled": 0, "limit_errors": 0,
                         "handshake_failures": 0, "unread_replies": 0, "dropped_unread": 0, "inline_fits": 0,
                         "batches": 0, "sessions_revoked": 0}
        protected = any(d.policy == "protected" for d in self.datasets.values()) or bool(self.clients)
        tracebacks = config.remote_tracebacks if config.remote_tracebacks is not None else not protected
        secret = config.shuffle_secret.encode() if config.shuffle_secret is not None else secrets.token_bytes(32)
        check_apart({"--secagg-ledger": config.secagg_ledger, "--evaluations-ledger": config.evaluations_ledger})
        self.context = Context(
            worker_id=worker_id, config=config,
            policy=Policy(config.private_release, config.require_secure_aggregation, tracebacks),
            datasets=self.datasets, clients=self.clients, models=models or {}, coster=Coster(models or {}),
            status=self.status, ping=self.ping_info,
            terms=Terms(config.min_batch_size, config.min_metric_rows, config.max_fit_samples, secret,
                        row_metrics=config.require_secure_aggregation),
            ledger=ReleaseLedger(config.secagg_max_rounds, config.secagg_ledger),
            evaluations=ReleaseLedger(config.max_evaluations, config.evaluations_ledger, what="evaluations",
                                      flag="--max-evaluations",
                                      why="each one answers a question of the coordinator's choice about its rows"))
        self.executor = Executor(self.context, self._pool, self.counters, OwnGenerator() if in_process else None)
        warm_up()  # the meta kernels load here, not inside the first command on the event loop
        self.key_gate: KeyGate | None = None
        self.public_key: bytes | None = None
        self._monitor: zmq.asyncio.Socket | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def bind(self, address: str) -> str:
        """Bind the ROUTER socket (synchronously, so a VirtualWorker is reachable at once)."""
        config = self.config
        if (config.secret_key is None) != (config.allowed_keys is None):
            raise SecurityError("--secret-key and --allowed-keys go together")
        problem = address_problem(address)
        if problem:
            raise SecurityError(problem)
        sock: zmq.Socket = zmq.Socket(self._context, zmq.ROUTER)  # driven by a Pump, not zmq.asyncio
        if config.secret_key is not None:
            assert config.allowed_keys is not None
            self.key_gate = KeyGate(self._context, config.allowed_keys)
            self.public_key = apply_server_keys(sock, config.secret_key)
            # made by the socket's (asyncio) context, so an asyncio socket: its loop awaits it
            self._monitor = cast(zmq.asyncio.Socket, sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH))
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
        # a client that stops reading fills its pipe: sends fail at once (ROUTER_MANDATORY) instead of
        # queueing without end, and its session is closed
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 2 * config.max_inflight + 64)
        # a peer that sends faster than the daemon reads is held back by TCP, not buffered here without
        # end: once this many of its messages wait unread, ZeroMQ stops reading its connection
        sock.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
        # a hard stop far above the codec's limit: frames between the two get a proper error reply,
        # only absurd ones make ZeroMQ drop the connection
        limits = config.limits
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * max(limits.max_frame_bytes, limits.max_header_bytes) + (1 << 20))
        sock.bind(address)
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # decided on what libzmq bound, not on what was asked: an interface name, a wildcard or an
        # address a URL parser reads otherwise all show here as the address actually served
        if config.secret_key is None and not config.insecure and not is_loopback_address(bound):
            sock.close(linger=0)
            self._close_key_gate()
            raise SecurityError(
                f"refusing to serve {address} (bound as {bound}) without keys: anyone who can reach it could run "
                "commands and read traffic. Start with --secret-key FILE --allowed-keys DIR (see 'fedzmq keygen'), "
                "or pass --insecure to accept that")
        self._socket = sock
        self._pump = Pump(sock, self._accept)
        self.address = bound
        # over inproc a zero-copy frame would alias the sender's memory: copy on that transport only
        self._copy_frames = bound.startswith("inproc://")
        return bound

    def start(self) -> None:
        """Start serving on the running event loop (after ``bind``)."""
        if self._pump is None:
            raise WorkerNotBound("bind() before start(), or use 'async with Worker(...)', which binds for you")
        if not self._tasks:
            if self.key_gate is not None:
                self.key_gate.start()
            self._tasks = [asyncio.create_task(self._pump.run(), name=f"fedzmq-{self.id}-receive"),
                           asyncio.create_task(self._expire_loop(), name=f"fedzmq-{self.id}-expire")]
            if self._monitor is not None:
                self._tasks.append(asyncio.create_task(self._monitor_loop(), name=f"fedzmq-{self.id}-monitor"))

    async def wait_closed(self) -> None:
        """Return when a serving task ends on its own (it should not: that is a bug to report)."""
        if self._tasks:
            done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]

    async def serve(self, address: str) -> None:
        """Bind, serve until cancelled, then close everything."""
        self.bind(address)
        self.start()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self.close()

    def say_stopping(self) -> None:
        """Answer every command taken and not answered yet with ``WorkerClosedError`` ("worker ... is
        stopping"), before ``close``: those of sessions, those read in a batch and not queued yet, and
        those waiting in the socket (up to ``STOPPING_READS`` messages). A daemon stopped by a signal
        does this: its clients would otherwise learn it from silent heartbeats, seconds later (a round's
        worker dropped as dead). ``close`` then gives ZeroMQ ``FAREWELL_SECONDS`` to deliver them."""
        why = f"worker {self.id} is stopping; this command did not finish"
        for session in self._all_sessions():
            self._refuse_unanswered(session, why)
        for key, waiting in self._intake.items():  # read from a batch, not yet queued on a session
            for frames, _batched in waiting:
                self._refuse_unqueued(key, frames, "WorkerClosedError", why)
        self._intake.clear()
        self._intake_turns.clear()
        if self._pump is not None:  # arrived, not read yet (bounded: a flood must not hold the stop)
            for identity, *message in self._pump.take_waiting(STOPPING_READS):
                try:
                    requests = split_batch(message, self.config.limits) if is_batch(message) else [message]
                except ProtocolError as exc:
                    self._malformed(identity.bytes, exc)
                    continue
                for frames in requests:
                    self._refuse_unqueued(identity.bytes, frames, "WorkerClosedError", why)
        self._farewell = True

    async def close(self) -> None:
        sessions = self._all_sessions()
        for session in sessions:
            session.clear()  # cancels a running command at its next check
        tasks = self._tasks + [s.task for s in sessions if s.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for session in sessions:  # commands that waited and were never taken up by their task
            while not session.queue.empty():
                item = session.queue.get_nowait()
                if isinstance(item, StartedCommand):
                    item.rest.close()
        self._tasks = []
        self._peers.clear()
        self._intake.clear()
        self._intake_turns.clear()
        if self._monitor is not None and self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self._close_key_gate()
        if self._socket is not None:  # (ZeroMQ may still deliver those refusals for a moment)
            self._socket.close(linger=int(FAREWELL_SECONDS * 1000) if self._farewell else 0)
            self._socket = self._pump = None
        self._pool.shutdown()
        self._reaper.close()  # what the sessions held is freed, on its thread

    def _close_key_gate(self) -> None:
        if self.key_gate is not None:
            self.key_gate.stop()

    async def __aenter__(self) -> "Worker":
        """Serve until the block ends: on the address ``bind`` chose, or on a fresh ``inproc://`` address
        (``worker.address``) if it was never bound, so ``async with`` alone gives a worker to connect to."""
        if self._socket is None:
            self.bind(f"inproc://fedzmq-{self.id}-{uuid.uuid4().hex}")
        self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- introspection -------------------------------------------------------------------------

    def ping_info(self) -> dict[str, Any]:
        limits = self.config.limits
        return {"id": self.id, "version": __version__, "protocol": PROTOCOL_VERSION, "instance": self.instance,
                "limits": {"max_header_bytes": limits.max_header_bytes, "max_frame_bytes": limits.max_frame_bytes,
                           "max_frames": limits.max_frames, "chunk_bytes": limits.chunk_bytes,
                           "max_items": limits.max_items, "max_batch": limits.max_batch},
                # what a client may ask of this daemon beyond the protocol's first version
                "features": list(FEATURES)}

    def _all_sessions(self) -> list[Session]:
        return [s for peer in self._peers.values() for s in peer.sessions.values()]

    def status(self) -> dict[str, Any]:
        """What the daemon holds and has counted. Its sums walk every session, so the ``status`` commands
        of one batch, or of one pass of ``_take_intake``, share one snapshot."""
        if self._status is not None:
            return dict(self._status)
        sessions = self._all_sessions()
        snapshot = {
            **self.ping_info(),
            "uptime": time.monotonic() - self._started,
            "sessions": len(sessions),
            "connections": len(self._peers),
            "clients": len(self.clients),
            "objects": sum(len(s.table) for s in sessions),
            "bytes": sum(s.quota.held for s in sessions),  # what the sessions' quotas are charged
            "rss_bytes": _rss_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
            "encrypted": self.key_gate is not None,
            "auth_denied": self.key_gate.denied if self.key_gate else 0,
            "auth_accepted": self.key_gate.accepted if self.key_gate else 0,
            "freeing": self._reaper.waiting,  # hand-overs the reaper has not dropped yet
            **self.counters,
        }
        if self._status_batch:
            self._status = dict(snapshot)
        return snapshot

    def reload_keys(self) -> int | None:
        """Re-read the allowed-keys folder (the daemon calls this on SIGHUP). A key taken out loses its
        connections' sessions now, and their requests are refused from now on: ZAP sees only new
        handshakes, and an owner who revokes a key means its open connections too."""
        if self.key_gate is None:
            return None
        allowed = self.key_gate.reload()
        for peer in list(self._peers.values()):
            if peer.user is not None and not self.key_gate.allows(peer.user):
                log.warning("key %s is no longer allowed: ending its connection's sessions", peer.user)
                for frames, _batched in self._intake.get(peer.key, ()):  # read, not yet queued: refused too
                    self._refuse_revoked(peer.key, frames)
                for session in list(peer.sessions.values()):  # queued: each told why, not left to time out
                    self._refuse_queued(session, KEY_REVOKED, "PermissionDenied")
                self._end_peer(peer, "sessions_revoked")
        return allowed

    # --- the loops -----------------------------------------------------------------------------

    def _accept(self, frames: list[Any]) -> None:
        """Take one message off the socket: a request, or a batch of them (``codec.split_batch``).

        A few requests from a peer with nothing waiting are accepted at once. A bigger batch's requests
        wait in the peer's intake, accepted ``INTAKE_TURN`` at a time per peer in turn (``_take_intake``): so
        the pump reads a batch about as cheaply as a lone request, and a peer that sends batches of 64
        does not make the others' messages wait behind 64 requests each in the socket's queue."""
        key, message = frames[0].bytes, frames[1:]
        self._run_at_once_until = time.perf_counter() + SESSION_SLICE_SECONDS
        if is_batch(message):
            try:
                requests = split_batch(message, self.config.limits)
            except ProtocolError as exc:
                self.counters["requests"] += 1
                self._malformed(key, exc)
                return
            self.counters["batches"] += 1
            batched = True
        else:
            requests, batched = [message], False
        waiting = self._intake.get(key)
        if waiting is None and len(requests) <= INTAKE_TURN:
            self._status_batch = True  # one status snapshot for the batch
            try:
                for request_frames in requests:
                    if not self._accept_connected(key, request_frames, batched):
                        break
            finally:
                self._status_batch, self._status = False, None
            return
        if waiting is not None and len(waiting) >= self.config.max_inflight:
            for request_frames in requests:  # sent faster than served: refused, each (else memory, and the
                self._refuse_unread(key, request_frames)  # garbage collector's pauses, would grow without end)
            return
        if waiting is None:
            waiting = self._intake[key] = collections.deque()
            self._intake_turns.append(key)
        waiting.extend((request, batched) for request in requests)  # after what waits, in order
        if not self._intake_scheduled:
            self._intake_scheduled = True
            asyncio.get_running_loop().call_soon(self._take_intake)

    def _refuse_owing(self, key: bytes, frames: Sequence[Any], owed: RepliesOwed) -> None:
        """Refuse a request of a connection that owes more replies than a session's quota, without
        decoding its arguments; past another ``UNTRACKED_REPLY_BYTES`` of refusals (they are replies
        it does not read either), drop it unanswered."""
        self.counters["throttled"] += 1
        if owed.owed() > self.config.max_session_bytes + UNTRACKED_REPLY_BYTES:
            self.counters["dropped_unread"] += 1
            return
        payload = self._owing_error(owed)
        self._refuse_unqueued(key, frames, payload["type"], payload["message"])

    def _refuse_revoked(self, key: bytes, frames: Sequence[Any]) -> None:
        """Refuse a request of a connection whose key was taken out of the allowed keys since it connected."""
        self.counters["throttled"] += 1
        self._refuse_unqueued(key, frames, "PermissionDenied", KEY_REVOKED)

    def _refuse_unqueued(self, key: bytes, frames: Sequence[Any], error_type: str, message: str) -> None:
        """Refuse a request read but never queued on a session, decoding its header's id only (its
        arguments could be a model's worth of frames)."""
        try:
            request = decode_request_head(frames, self.config.limits)
        except Exception as exc:
            self._malformed(key, exc)
            return
        peer = self._peers.get(key)
        self._refuse(key, request, error_type, message, peer.sessions.get(request.client) if peer else None)

    def _owing_error(self, owed: RepliesOwed) -> dict[str, str]:
        return {"type": "LimitExceeded", "traceback": "", "message": (
            f"this connection has not read {owed.owed()} bytes of replies, more than a session's quota of "
            f"{self.config.max_session_bytes} bytes (--max-session-bytes): read them before sending more")}

    def _refuse_unread(self, key: bytes, frames: Sequence[Any]) -> None:
        """Answer a request that arrived while its connection's intake was full, without running it."""
        self.counters["requests"] += 1
        try:  # its arguments are not decoded: refusing must cost less than running it
            request = decode_request_head(frames, self.config.limits)
        except Exception as exc:
            self._malformed(key, exc)
            return
        self.counters["throttled"] += 1
        peer = self._peers.get(key)
        session = peer.sessions.get(request.client) if peer is not None else None
        self._refuse(key, request, "LimitExceeded", f"more than {self.config.max_inflight} requests of this "
                     "connection wait to be read (--max-inflight); wait for replies before sending more", session)

    def _take_intake(self) -> None:
        """Accept waiting requests, ``INTAKE_TURN`` per peer in turn, for at most the pump's budget per
        pass of the event loop (the sessions run in between). The ``status`` commands of one pass share
        one snapshot: it walks every session, and a batch may hold 64 of them."""
        self._intake_scheduled = False
        started = time.perf_counter()
        self._run_at_once_until = started + SESSION_SLICE_SECONDS
        self._status_batch = True
        try:
            while self._intake_turns and time.perf_counter() - started < BUDGET_SECONDS:
                key = self._intake_turns.popleft()
                waiting = self._intake.get(key)
                for _ in range(min(INTAKE_TURN, len(waiting or ()))):
                    assert waiting is not None
                    if not self._accept_connected(key, *waiting.popleft()):
                        break
                if waiting is None or self._intake.get(key) is not waiting:
                    continue  # its connection was ended: what it sent is dropped with it (``_end_peer``)
                if waiting:
                    self._intake_turns.append(key)
                else:
                    del self._intake[key]
        finally:
            self._status_batch, self._status = False, None
        if self._intake_turns and not self._intake_scheduled:
            self._intake_scheduled = True
            asyncio.get_running_loop().call_soon(self._take_intake)

    def _accept_connected(self, key: bytes, frames: Sequence[Any], batched: bool) -> bool:
        """Accept one request; False if that ended its connection (it stopped reading its replies): the
        rest of what it sent would only open a session to end it again."""
        peer = self._peers.get(key)
        self._accept_request(key, frames, batched)
        return peer is None or self._peers.get(key) is peer

    def _accept_request(self, key: bytes, frames: Sequence[Any], batched: bool) -> None:
        """Decode one request; answer control commands, queue the rest on their session. A connection
        that owes more replies than a session's quota (it does not read them) is refused, and past
        another ``UNTRACKED_REPLY_BYTES`` of refusals, not answered: its requests are dropped unread."""
        self.counters["requests"] += 1
        peer = self._peers.get(key)
        owed = peer.replies if peer is not None else self._owing.get(key)
        if owed is not None and owed.owed() > self.config.max_session_bytes:
            self._refuse_owing(key, frames, owed)
            return
        user = _user_id(frames[0]) if self.config.secret_key is not None else None  # no keys, no User-Id
        if self.key_gate is not None and (user is None or not self.key_gate.allows(user)):
            self._refuse_revoked(key, frames)
            return
        try:
            with default_modes():  # in process, the caller's thread: its inference mode would mark the tensors
                request = decode_request(frames, self.config.limits)
        except Exception as exc:  # a decoder bug must not stop the daemon: report it as malformed
            self._malformed(key, exc)
            return
        session = self._session_for(key, user, request)
        if session is None:
            return
        assert session.peer is not None and session.outbox is not None
        session.peer.touch()
        if batched and session.outbox.limits.max_batch == 1:  # it reads batches: send it batches too
            session.outbox.limits = self.config.limits
        if COMMANDS[request.cmd].control:
            self._send(key, self.executor.control(session, request), session)
        elif request.cmd == "close":  # never refused for room: it frees the session
            self._stop_before_goodbye(session)
            self._queue(session, request)
        elif session.queue.qsize() >= self.config.max_inflight:
            self.counters["throttled"] += 1
            self._refuse(key, request, "LimitExceeded", f"more than {self.config.max_inflight} commands of "
                         "this session are waiting (--max-inflight); wait for replies before sending more",
                         session)
        elif request.nbytes > session.quota.room_for_requests():
            self.counters["throttled"] += 1
            self._refuse(key, request, "LimitExceeded", f"this session's waiting requests (and the one running) "
                         f"and what it holds leave no room for {request.nbytes} more bytes under its quota of "
                         f"{session.quota.max_bytes} bytes (--max-session-bytes): {session.quota.usage()}", session)
        else:
            self._queue(session, request)

    def _queue(self, session: Session, request: Request) -> None:
        session.quota.queued += request.nbytes
        if session.parked and session.queue.empty() and time.perf_counter() < self._run_at_once_until:
            self._run_at_once(session, request)
        else:
            session.queue.put_nowait(request)

    def _stop_before_goodbye(self, session: Session) -> None:
        """A client's goodbye (``close``) runs after the commands it sent before it, and its client has failed
        their calls (``WorkerClosedError``): the one running is stopped at its next check and the queued ones
        are refused, instead of running for nobody (a fit of a closed session held the torch thread to its
        end or ``--max-command-seconds``, h41)."""
        if session.queue.empty() and session.running is None:
            return
        self._refuse_queued(session, "the session was closed before this command ran")
        if session.running is not None and session.budget is not None:
            session.budget.cancel("its client closed the session")

    def _run_at_once(self, session: Session, request: Request) -> None:
        """Run a command of a session that has nothing queued or running here, as the pump reads it,
        instead of waking the session's task for it on the next pass of the event loop (a pass, a queue's
        future and a task step per command: a tenth of a small op's cost on the daemon). Most commands
        never wait; one that does is handed to the session's task where it waits, and the session's later
        commands queue behind it, so the order is the same. Only for one slice of each message read (or
        intake turn): past it, a batch's later commands go to their session's queue, so a batch of slow
        commands holds the loop no longer than the session's task would, which yields after each slice."""
        try:
            step = start(self._run(session, request))
        except Exception as exc:
            self._crashed(session, request, exc)
            return
        if isinstance(step, Started):
            session.queue.put_nowait(StartedCommand(request, step))

    def _crashed(self, session: Session, request: Request, exc: Exception) -> None:
        """A bug outside the command's handler (whose errors are replies): answer the command with an
        error that quotes nothing of it, refuse what the session queued after it, and end the session
        (its objects may be half made); the daemon and the other sessions go on."""
        log.error("command %s of session %s failed outside its handler", request.cmd, session.key.hex(),
                  exc_info=exc)
        if not self._live(session):
            return
        assert session.outbox is not None
        session.outbox.flush()  # what ran before it was answered
        self._transmit(session.key, encode_error(request.id, {
            "type": "WorkerError", "message": "the worker failed running this command (its log says why); "
            "this session was closed", "traceback": ""}), session)
        self._refuse_queued(session, "the session was closed: the worker failed running an earlier command")
        self._end_session(session, "sessions_expired")

    def _malformed(self, key: bytes, exc: Exception) -> None:
        """Answer a message that could not be decoded, and count it; nothing else is touched."""
        self.counters["malformed"] += 1
        if not isinstance(exc, ProtocolError):
            log.exception("decoder failed on a message from %s", key.hex())
            exc = ProtocolError(f"undecodable message ({type(exc).__name__})")
        log.debug("malformed message from %s: %s", key.hex(), exc)
        self._send(key, encode_error(exc.request_id, error_payload(exc, "")))

    def _session_for(self, key: bytes, user: str | None, request: Request) -> Session | None:
        """The sender's session with the daemon or with the logical client it names, made if new
        (evicting a gone connection if the worker is full); None if refused."""
        peer = self._peers.get(key)
        if peer is not None and peer.user != user:  # a routing id reused under another key: never the same
            self._refuse(key, request, "PermissionDenied", "this session belongs to another key")
            return None
        if peer is None:
            peer = self._new_peer(key, user, request)
            if peer is None:
                return None
        session = peer.sessions.get(request.client)
        if session is not None:
            return session
        if request.client is not None and request.client not in self.clients:
            self._refuse(key, request, "ObjectNotFound", f"worker {self.id!r} hosts no client {request.client!r} "
                         f"({len(self.clients)} clients; the 'clients' command lists them)")
            return None
        config = self.config
        session = peer.sessions[request.client] = Session(
            key, user=user, client=request.client, peer=peer, max_objects=config.max_objects,
            max_bytes=config.max_session_bytes, free=self._reaper.free,
            datasets=self.datasets if request.client is None else self.clients[request.client])
        # replies go one by one until the client shows it reads batches (by sending one)
        session.outbox = Outbox(partial(self._transmit_replies, session),
                                dataclasses.replace(config.limits, max_batch=1))
        session.task = asyncio.create_task(self._session_loop(session), name=f"fedzmq-session-{key.hex()}")
        return session

    def _new_peer(self, key: bytes, user: str | None, request: Request) -> Peer | None:
        if len(self._peers) >= self.config.max_sessions and not self._evict_one():
            self.counters["sessions_refused"] += 1
            self._refuse(key, request, "LimitExceeded", f"the worker serves its maximum of "
                         f"{self.config.max_sessions} sessions (--max-sessions); try again later")
            return None
        if user is not None and sum(p.user == user for p in self._peers.values()) >= \
                self.config.max_sessions_per_key:
            self.counters["sessions_refused"] += 1
            self._refuse(key, request, "LimitExceeded", f"this key has its maximum of "
                         f"{self.config.max_sessions_per_key} sessions open (--max-sessions-per-key); close one first")
            return None
        peer = self._peers[key] = Peer(key, user=user)
        owed = self._owing.pop(key, None)
        if owed is not None:  # what the connection was sent in its earlier sessions and has not read
            peer.replies = owed
        return peer

    def _evict_one(self) -> bool:
        """Make room for a new client: end the idle connection that has been silent longest, if it looks
        gone (one that holds nothing sooner than one holding objects). False if none does, and for
        ``EVICT_SCAN_SECONDS`` after a look that found none (a connection turns gone at its own pace: a
        new client then waits that much longer for room)."""
        now = time.monotonic()
        if now < self._next_evict_scan:
            return False

        def silent_for(peer: Peer) -> float:
            return now - peer.last_seen

        def gone(peer: Peer) -> bool:
            if peer.interval is None:
                return silent_for(peer) > EVICT_AFTER_SECONDS
            after = EVICT_EMPTY_AFTER_INTERVALS if peer.empty else EVICT_AFTER_INTERVALS
            return silent_for(peer) > after * peer.interval

        candidates = [p for p in self._peers.values() if p.idle and gone(p)]
        if not candidates:
            self._next_evict_scan = now + EVICT_SCAN_SECONDS
            return False
        victim = max(candidates, key=lambda p: (p.empty, silent_for(p)))
        log.info("connection %s silent for %.1fs: evicted to make room for a new client", victim.key.hex(),
                 silent_for(victim))
        self._end_peer(victim, "sessions_evicted")
        return True

    async def _session_loop(self, session: Session) -> None:
        """Run the session's commands in order. Commands that run on the event loop (small ops and
        fits) do not suspend it, so a session with many queued gives the loop back after its slice:
        ``SESSION_SLICE_SECONDS`` shared by the sessions that have work, so that however many busy
        sessions a peer opens, the others and the pump wait about one slice per pass of the loop."""
        slice_started, busy = time.perf_counter(), False
        try:
            while True:
                if session.queue.empty():
                    if busy:
                        self._busy_sessions -= 1
                        busy = False
                    self._flush_replies(session)  # now, not a pass of the loop later
                    session.parked = True  # from now the pump runs its commands at once (``_run_at_once``)
                    try:
                        request = await session.queue.get()
                    finally:
                        session.parked = False
                    slice_started = time.perf_counter()
                else:
                    request = session.queue.get_nowait()
                if not busy:
                    self._busy_sessions += 1
                    busy = True
                if request is None:
                    return
                command = request.request if isinstance(request, StartedCommand) else request
                try:
                    if await (request.rest if isinstance(request, StartedCommand) else self._run(session, request)):
                        return
                except Exception as exc:
                    self._crashed(session, command, exc)
                    return
                if time.perf_counter() - slice_started > SESSION_SLICE_SECONDS / self._busy_sessions:
                    self._flush_replies(session)
                    await asyncio.sleep(0)
                    slice_started = time.perf_counter()
        finally:
            if busy:
                self._busy_sessions -= 1

    @staticmethod
    def _flush_replies(session: Session) -> None:
        """Send the session's waiting replies (it is about to wait, or to let the others run)."""
        if session.outbox is not None and len(session.outbox):
            session.outbox.flush()

    async def _run(self, session: Session, request: Request) -> bool:
        """Run one queued command and reply; True when it ended the session. (A method of its own so
        that the request and its reply, a whole model say, are not kept alive until the next one.)"""
        session.running = request.id  # from here (its wait for earlier replies included) it is not idle
        try:
            if COMMANDS[request.cmd].waits_for_replies and session.quota.unsent() and not await self._sent(session):
                return True
            # from its charge on, the command's own accounting applies; until then (a wait for a torch thread
            # or the generator's turn) its request still counts: a second request of a full quota was taken in
            # beside a first waiting for a thread, twice the quota in memory (red team h36)
            session.quota.queued -= request.nbytes
            session.quota.starting = session.quota.running = request.nbytes
            if session.peer is not None and session.peer.replies.owed() > self.config.max_session_bytes:
                self.counters["throttled"] += 1
                payload = self._owing_error(session.peer.replies)  # sent before its connection owed this much
                fail_outputs(session, request, payload)
                frames = encode_error(request.id, payload)
            else:
                frames = await self.executor.execute(session, request)
            assert session.outbox is not None
            if not self._live(session):  # ended while it ran (a revoked key, an expiry): what it computed
                # from the session's objects does not leave; the connection is told why, in a few words
                self._refuse_ended(session, request)
                return True
            session.closing = request.cmd == "close"  # its reply carries what the connection owes
            session.outbox.add(frames)  # with the others this session answers before it next waits
        except asyncio.CancelledError:
            if self._live(session):  # the worker is closing (``close`` cancels every task)
                raise
            self._refuse_ended(session, request)  # its session ended while it waited (``_stop_waiting``)
            return True
        finally:
            session.quota.starting = session.quota.running = 0
            session.running = None
            session.last_done = request.id
            if session.peer is not None:
                session.peer.touch()
        if request.cmd == "close":  # what it queued is refused first: the None that ends its task comes last
            self._refuse_queued(session, "the session was closed before this command ran")
            self._end_session(session, "sessions_closed")
            return True
        return not self._live(session)  # ended while it ran (its client stopped reading)

    def _refuse_ended(self, session: Session, request: Request) -> None:
        self._send(session.key, encode_error(request.id, {
            "type": "PermissionDenied", "traceback": "",
            "message": "the session ended while this command ran (its key was revoked, or it expired)"}))

    def _live(self, session: Session) -> bool:
        peer = self._peers.get(session.key)
        return peer is not None and peer.sessions.get(session.client) is session

    async def _expire_loop(self) -> None:
        timeout = self.config.session_timeout
        while True:
            await asyncio.sleep(max(0.05, min(timeout, 10.0) / 4))
            now = time.monotonic()
            for key, owed in list(self._owing.items()):
                if owed.settled(forgive_after=self._forgive_after):
                    del self._owing[key]
            for peer in list(self._peers.values()):
                silent = now - peer.last_seen
                if peer.idle and silent > self._expiry(peer):
                    log.info("connection %s silent for %.1fs: freeing its %d sessions", peer.key.hex(), silent,
                             len(peer.sessions))
                    self._end_peer(peer, "sessions_expired")

    def _expiry(self, peer: Peer) -> float:
        """Seconds of silence after which an idle connection's sessions are closed: ``--session-timeout``,
        or sooner for a client that announced its heartbeat interval and has missed many of them."""
        timeout = self.config.session_timeout
        if peer.interval is None:
            return timeout
        return min(timeout, max(10.0, GONE_AFTER_INTERVALS * peer.interval))

    def _refuse(self, key: bytes, request: Request, error_type: str, message: str,
                session: Session | None = None) -> None:
        """Answer a request with an error without running it (its outputs are marked failed)."""
        payload = {"type": error_type, "message": message, "traceback": ""}
        if session is not None:
            fail_outputs(session, request, payload)
        self._send(key, encode_error(request.id, payload), session)

    async def _monitor_loop(self) -> None:
        """Count clients whose handshake failed (no key, wrong server key, refused key)."""
        assert self._monitor is not None
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            self.counters["handshake_failures"] += 1
            log.warning("a client's handshake failed on %s (%s, %s)", describe_endpoint(event.get("endpoint")),
                        describe_event(event.get("event")), event.get("value"))

    def _refuse_unanswered(self, session: Session, why: str) -> None:
        """Answer the command running and those queued with ``WorkerClosedError``: the worker is closing, and
        its clients would otherwise learn it from silent heartbeats, seconds later."""
        if session.running is not None:
            if session.outbox is not None:
                session.outbox.flush()  # the replies of what ran go first
            self._send(session.key, encode_error(session.running, {"type": "WorkerClosedError", "message": why,
                                                                   "traceback": ""}))
        self._refuse_queued(session, why)

    def _refuse_queued(self, session: Session, why: str, error_type: str = "WorkerClosedError") -> None:
        if session.outbox is not None:
            session.outbox.flush()  # the replies of what ran go first
        while not session.queue.empty():
            request = session.queue.get_nowait()
            if isinstance(request, StartedCommand):  # not so: a command that waited ran before this one
                if session.budget is not None:  # it may be running on a torch thread: stop it at its next
                    session.budget.cancel(why)  # check (closing its rest forgets the budget, not the thread's)
                request.rest.close()
            elif request is not None:
                self._send(session.key, encode_error(request.id, {"type": error_type, "message": why,
                                                                  "traceback": ""}))

    def _end_session(self, session: Session, counter: str) -> None:
        if session.outbox is not None:  # what it answered leaves on a close; a gone client reads nothing
            session.outbox.flush() if counter == "sessions_closed" else session.outbox.drop()
        session.clear()  # a running command is cancelled at its next check
        self._stop_waiting(session)
        session.queue.put_nowait(None)
        peer = self._peers.get(session.key)
        if peer is not None and peer.sessions.get(session.client) is session:
            del peer.sessions[session.client]
            self._forget(peer)
        self.counters[counter] += 1

    @staticmethod
    def _stop_waiting(session: Session) -> None:
        """Stop the command the ended session's task awaits. Waiting for a torch thread or the generator's turn,
        it stayed queued: it held its request (uncharged once the session ended), kept its place ahead of
        the other keys' work, took the thread and the turn when they came, and its client heard nothing
        until then (red team h40). Cancelled, it leaves the queue now and ``_run`` answers it; one running
        on a thread runs on to its next check (``Session.clear`` cancelled its budget)."""
        task = session.task
        if task is not None and not session.parked and session.running is not None and \
                task is not asyncio.current_task():
            task.cancel()

    def _forget(self, peer: Peer) -> None:
        """Forget a connection with no sessions left. What it was sent and may not have read stays on
        account (``_owing``) until it has left, or its TCP connection has closed (which frees it), and
        untracked replies until ``ARREARS_FORGIVEN_AFTER`` after the last one: a new session on the same
        connection starts with that account, not with a clean slate (a red team otherwise had sessions
        expired or evicted between replies just under the 1 MiB that gets one tracked)."""
        if peer.sessions or self._peers.get(peer.key) is not peer:
            return
        del self._peers[peer.key]
        if not peer.replies.settled(forgive_after=self._forgive_after):
            self._owing[peer.key] = peer.replies

    @property
    def _forgive_after(self) -> float:
        return max(ARREARS_FORGIVEN_AFTER, 2 * self.config.session_timeout)

    def _account(self, key: bytes) -> RepliesOwed:
        """The account of what connection ``key`` was sent and may not have read: its peer's, or, for a
        connection without a session (refused, or sending what cannot be decoded), one kept aside."""
        peer = self._peers.get(key)
        if peer is not None:
            return peer.replies
        owed = self._owing.get(key)
        if owed is None:
            owed = self._owing[key] = RepliesOwed()
        return owed

    def _end_peer(self, peer: Peer, counter: str) -> None:
        if self._intake.pop(peer.key, None) is not None and peer.key in self._intake_turns:
            self._intake_turns.remove(peer.key)  # it is gone or stopped reading: what it sent is not run
        for session in list(peer.sessions.values()):
            self._end_session(session, counter)
        self._forget(peer)

    async def _sent(self, session: Session) -> bool:
        """Wait until ZeroMQ has sent the session's replies that left uncopied. Their frames are the
        session's objects' own memory (a tensor a ``get`` released, a model's weights), and the command
        about to run may change it: the bytes a client receives must be the ones released. Waiting here,
        and not right after each send, leaves the session free between its commands: a federated round's
        next command comes long after its state left, and runs at once. No deadline: a slow link may take
        minutes, and a session whose replies wait is neither idle nor evicted (``Session.idle``), so what
        they pin stays charged to it. False if the session ended meanwhile (its client went away)."""
        pause = 0.0005
        while session.quota.unsent() and self._live(session):  # polled: no thread is held by a slow reader
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
        return self._live(session)

    def _send(self, key: bytes, frames: list[Any], session: Session | None = None) -> None:
        """Send a reply: a session's through its outbox, after the replies waiting there (so that they
        keep their order: a heartbeat's ``last_done`` never arrives before the reply it counts)."""
        if session is not None and session.outbox is not None:
            session.outbox.add(frames)
        else:
            self._transmit(key, frames, session)

    def _transmit_replies(self, session: Session, frames: list[Any], copy: bool) -> None:
        """An outbox's send: one reply, or a batch of them; none for a session that has ended (a close
        sends its last replies before it ends)."""
        if self._live(session):
            self._transmit(session.key, frames, session)

    def _transmit(self, key: bytes, frames: list[Any], session: Session | None = None) -> None:
        """Send a message without blocking. Frames of the socket's ``copy_threshold`` or more leave
        uncopied (they are objects' own memory): such a reply is tracked, charged to its session until
        ZeroMQ has sent it, and the session's commands that may change memory wait for that (``_sent``).
        Every message to a connection is counted on its account (``Peer.replies``), copied ones in
        arrears: the one that takes them to ``UNTRACKED_REPLY_BYTES``, and a closing session's, are
        tracked and carry them. A client whose pipe is full (it stopped reading) or gone loses its
        sessions."""
        if self._pump is None:
            return
        threshold = self._pump.socket.copy_threshold
        of_objects = not self._copy_frames and any(memoryview(f).nbytes >= threshold for f in frames[1:])
        owed = None if self._copy_frames else self._account(key)
        buffers = buffer_bytes(frames)
        nbytes = len(frames[0]) + buffers
        track = of_objects or (owed is not None and (owed.needs_tracking(nbytes) or (
            session is not None and session.closing and owed.untracked > 0)))
        if track:  # the last frame leaves last: tracked, its tracker's end is the whole message's
            frames = [*frames[:-1], _tracked_frame(frames[-1], threshold)]
        try:
            tracker = self._pump.send([key, *frames], copy=self._copy_frames, track=track)
        except zmq.Again:
            self.counters["unread_replies"] += 1
            peer = self._peers.get(key)
            if peer is not None:
                log.warning("connection %s does not read its replies (its pipe is full): closing it", key.hex())
                self._end_peer(peer, "sessions_expired")
            return
        except zmq.ZMQError:  # the client is gone (EHOSTUNREACH)
            peer = self._peers.get(key)
            if peer is not None and peer.idle:
                self._end_peer(peer, "sessions_expired")
            return
        tracked = tracker if isinstance(tracker, zmq.MessageTracker) else None
        if owed is not None:
            owed.sent(nbytes, tracked)
        if of_objects and session is not None and tracked is not None and not tracked.done:
            session.quota.sending(tracked, buffers)


def _tracked_frame(frame: Any, threshold: int) -> zmq.Frame:
    """``frame`` to be sent uncopied and tracked. ZeroMQ sends a message's frames in order, so when this,
    the last one, has left, the copies of the frames before it have too. A frame under ``threshold``
    that is not our own ``bytes`` (a small tensor's memory) is copied first: pyzmq would have copied it,
    and a reply of objects' memory makes the session's later commands wait."""
    if not isinstance(frame, bytes) and memoryview(frame).nbytes < threshold:
        frame = bytes(frame)
    return zmq.Frame(frame, copy=False, track=True)


def _user_id(frame: Any) -> str | None:
    """The authenticated CurveZMQ key of the sender (ZAP's User-Id), or None without keys."""
    try:
        return frame.get("User-Id") or None
    except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
        return None


def _rss_bytes() -> int | None:
    """This process's resident memory now (Linux), for status and memory tests."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory (Linux VmHWM), for memory tests and benchmarks."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def describe_endpoint(endpoint: Any) -> str:
    """A monitor event's endpoint as text (pyzmq gives bytes): the daemon's own address the event came on."""
    return endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else str(endpoint)


def describe_event(event: Any) -> str:
    """A monitor event's number by its ZeroMQ name (``HANDSHAKE_FAILED_AUTH``), for a log a person reads."""
    names = {member.value: member.name for member in zmq.Event}
    return names.get(event) or str(event)


__all__ = ["Worker", "peak_rss_bytes"]

