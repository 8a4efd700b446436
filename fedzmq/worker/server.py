"""The worker's transport: a ROUTER socket, one ordered queue per client session, and replies.

    receive loop ──decode──► control command? ──yes──► answer at once (ping, heartbeat, status)
                                   │ no
                                   ▼
                        session queue (FIFO) ──► session task ──► handler (loop or thread pool) ──► reply

The receive loop never runs torch work, so pings and heartbeats are answered while a session is busy;
each session has its own task, so one session's commands keep their order and other sessions do not
wait on it. A message that fails decoding gets an error reply to its sender and is counted; nothing
else is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ..__about__ import __version__
from ..codec import PROTOCOL_VERSION, Request, decode_request, encode_error, encode_reply
from ..commands import COMMANDS, INLINE_NUMEL
from ..errors import LimitExceeded, ProtocolError, error_payload
from ..security import KeyGate, SecurityError, apply_server_keys, is_loopback_address
from ..modeldesc import ModelRegistry
from ..torchmodes import default_modes
from .config import WorkerConfig
from .datasets import Dataset
from .handlers import Handlers, LiveReply, referenced_numel
from .session import DependencyError, Session

log = logging.getLogger("fedzmq.worker")


class Worker:
    """A worker daemon's engine. ``fedzmq-worker`` runs one over tcp; ``VirtualWorker`` over inproc."""

    def __init__(self, worker_id: str, *, config: WorkerConfig | None = None,
                 models: ModelRegistry | None = None, datasets: dict[str, Dataset] | None = None,
                 context: zmq.asyncio.Context | None = None) -> None:
        self.id = worker_id
        self.config = config or WorkerConfig()
        self.instance = uuid.uuid4().hex
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._copy_frames = False
        self._sessions: dict[bytes, Session] = {}
        self._pool = ThreadPoolExecutor(max_workers=self.config.threads, thread_name_prefix=f"fedzmq-{worker_id}")
        self._tasks: list[asyncio.Task[None]] = []
        self._started = time.monotonic()
        self.address: str | None = None
        self.counters = {"requests": 0, "malformed": 0, "errors": 0, "sessions_closed": 0, "sessions_expired": 0,
                         "sessions_refused": 0, "throttled": 0, "limit_errors": 0, "handshake_failures": 0}
        self.handlers = Handlers(worker_id, self.config.limits, models or {}, self.status, self.ping_info,
                                 fault_injection=self.config.fault_injection, datasets=datasets,
                                 private_release=self.config.private_release,
                                 require_secure_aggregation=self.config.require_secure_aggregation)
        self.handlers.policy = self.config
        self.key_gate: KeyGate | None = None
        self.public_key: bytes | None = None
        self._monitor: zmq.asyncio.Socket | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def bind(self, address: str) -> str:
        """Bind the ROUTER socket (synchronously, so a VirtualWorker is reachable at once)."""
        config = self.config
        if config.secret_key is None and not config.insecure and not is_loopback_address(address):
            raise SecurityError(
                f"refusing to serve {address} without keys: anyone who can reach it could run commands and read "
                "traffic. Start with --secret-key FILE --allowed-keys DIR (see 'fedzmq keygen'), or pass "
                "--insecure to accept that")
        if (config.secret_key is None) != (config.allowed_keys is None):
            raise SecurityError("--secret-key and --allowed-keys go together")
        sock = self._context.socket(zmq.ROUTER)
        if config.secret_key is not None:
            assert config.allowed_keys is not None
            self.key_gate = KeyGate(self._context, config.allowed_keys)
            self.public_key = apply_server_keys(sock, config.secret_key)
            self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        # a hard stop far above the codec's limit: frames between the two get a proper error reply,
        # only absurd ones make ZeroMQ drop the connection
        limits = self.config.limits
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * max(limits.max_frame_bytes, limits.max_header_bytes) + (1 << 20))
        sock.bind(address)
        self._socket = sock
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # over inproc a zero-copy frame would alias the sender's memory: copy on that transport only
        self._copy_frames = self.address.startswith("inproc://")
        return self.address

    def start(self) -> None:
        """Start serving on the running event loop (after ``bind``)."""
        if self._socket is None:
            raise RuntimeError("bind() before start()")
        if not self._tasks:
            if self.key_gate is not None:
                self.key_gate.start()
            self._tasks = [asyncio.create_task(self._receive_loop(), name=f"fedzmq-{self.id}-receive"),
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

    async def close(self) -> None:
        tasks = self._tasks + [s.task for s in self._sessions.values() if s.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        for session in self._sessions.values():
            session.clear()
        self._sessions.clear()
        if self._monitor is not None and self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self.key_gate is not None:
            self.key_gate.stop()
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> "Worker":
        self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- introspection -------------------------------------------------------------------------

    def ping_info(self) -> dict[str, Any]:
        limits = self.config.limits
        return {"id": self.id, "version": __version__, "protocol": PROTOCOL_VERSION, "instance": self.instance,
                "limits": {"max_header_bytes": limits.max_header_bytes, "max_frame_bytes": limits.max_frame_bytes,
                           "max_frames": limits.max_frames, "chunk_bytes": limits.chunk_bytes}}

    def status(self) -> dict[str, Any]:
        sessions = list(self._sessions.values())
        return {
            **self.ping_info(),
            "uptime": time.monotonic() - self._started,
            "sessions": len(sessions),
            "objects": sum(len(s.objects) for s in sessions),
            "bytes": sum(s.nbytes_held for s in sessions),  # what the sessions' quotas are charged
            "rss_bytes": _rss_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
            "encrypted": self.key_gate is not None,
            "auth_denied": self.key_gate.denied if self.key_gate else 0,
            "auth_accepted": self.key_gate.accepted if self.key_gate else 0,
            **self.counters,
        }

    def reload_keys(self) -> int | None:
        """Re-read the allowed-keys folder (the daemon calls this on SIGHUP)."""
        return self.key_gate.reload() if self.key_gate else None

    # --- the loops -----------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            # one call per message, so that nothing of it outlives its handling
            self._accept(await self._socket.recv_multipart(copy=False))

    def _accept(self, frames: list[Any]) -> None:
        """Decode one message; answer control commands, queue the rest on their session."""
        key = frames[0].bytes
        self.counters["requests"] += 1
        try:
            request = decode_request(frames[1:], self.config.limits)
        except Exception as exc:  # a decoder bug must not stop the daemon: report it as malformed
            self.counters["malformed"] += 1
            if not isinstance(exc, ProtocolError):
                log.exception("decoder failed on a message from %s", key.hex())
                exc = ProtocolError(f"undecodable message ({type(exc).__name__})")
            log.debug("malformed message from %s: %s", key.hex(), exc)
            self._send(key, encode_error(exc.request_id, error_payload(exc, "")))
            return
        user = _user_id(frames[1])
        session = self._sessions.get(key)
        if session is None:
            if len(self._sessions) >= self.config.max_sessions:
                self.counters["sessions_refused"] += 1
                self._refuse(key, request, "LimitExceeded", f"the worker serves its maximum of "
                             f"{self.config.max_sessions} sessions (--max-sessions); try again later")
                return
            if user is not None and sum(s.user == user for s in self._sessions.values()) >= \
                    self.config.max_sessions_per_key:
                self.counters["sessions_refused"] += 1
                self._refuse(key, request, "LimitExceeded", f"this key has its maximum of "
                             f"{self.config.max_sessions_per_key} sessions open (--max-sessions-per-key); "
                             "close one first")
                return
            session = self._sessions[key] = Session(key, user=user, max_objects=self.config.max_objects,
                                                    max_bytes=self.config.max_session_bytes)
            session.task = asyncio.create_task(self._session_loop(session), name=f"fedzmq-session-{key.hex()}")
        elif session.user != user:  # a routing id reused under another key: never the same session
            self._refuse(key, request, "PermissionDenied", "this session belongs to another key")
            return
        session.touch()
        if COMMANDS[request.cmd].control:
            try:
                frames_out = encode_reply(request.id, self.handlers.handler(request.cmd)(session, request.args))
            except Exception as exc:
                frames_out = encode_error(request.id, error_payload(exc, traceback.format_exc()))
            self._send(key, frames_out)
        elif session.queue.qsize() >= self.config.max_inflight:
            self.counters["throttled"] += 1
            self._refuse(key, request, "LimitExceeded", f"more than {self.config.max_inflight} commands of "
                         "this session are waiting (--max-inflight); wait for replies before sending more",
                         session)
        elif request.nbytes > session.room():
            self.counters["throttled"] += 1
            self._refuse(key, request, "LimitExceeded", f"this session's waiting requests carry "
                         f"{session.nbytes_queued} bytes and it holds {session.nbytes_held}: {request.nbytes} more "
                         f"would pass its quota of {session.max_bytes} bytes (--max-session-bytes)", session)
        else:
            session.nbytes_queued += request.nbytes
            session.queue.put_nowait(request)

    async def _session_loop(self, session: Session) -> None:
        loop = asyncio.get_running_loop()
        while True:
            request = await session.queue.get()
            if request is None or await self._run(loop, session, request):
                return

    async def _run(self, loop: asyncio.AbstractEventLoop, session: Session, request: Request) -> bool:
        """Run one queued command and reply; True when it ended the session. (A method of its own so
        that the request and its reply, a whole model say, are not kept alive until the next one.)"""
        session.running = request.id
        session.nbytes_queued -= request.nbytes  # from now on the handler's own accounting applies
        try:
            if self.handlers.delay:
                await asyncio.sleep(self.handlers.delay)
            frames, live = await self._execute(loop, session, request)
            if live and not self._copy_frames:
                try:
                    await self._send_and_wait(session.key, frames)
                except RuntimeError as exc:  # its client stopped reading: end the session, not the daemon
                    log.warning("%s; closing the session", exc)
                    self._end_session(session, "sessions_expired")
                    return True
            else:
                self._send(session.key, frames)
        finally:
            session.running = None
            session.last_done = request.id
            session.touch()
        if request.cmd == "close":
            self._end_session(session, "sessions_closed")
            self._refuse_queued(session, "the session was closed before this command ran")
            return True
        return False

    async def _execute(self, loop: asyncio.AbstractEventLoop, session: Session,
                       request: Request) -> tuple[list[Any], bool]:
        """Run a command; returns the reply's frames and whether they hold live memory (``LiveReply``)."""
        command = COMMANDS[request.cmd]
        handler = self.handlers.handler(request.cmd)
        try:
            offload = command.offload == "always" or (
                command.offload == "large" and referenced_numel(session, request.args) > INLINE_NUMEL)
            if offload:
                result = await loop.run_in_executor(self._pool, _call_in_default_modes, handler, session,
                                                    request.args)
            else:
                result = _call_in_default_modes(handler, session, request.args)
            return encode_reply(request.id, result), isinstance(result, LiveReply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters["errors"] += 1
            if isinstance(exc, LimitExceeded):
                self.counters["limit_errors"] += 1
            payload = error_payload(exc, traceback.format_exc())
            _fail_outputs(session, request, exc.root if isinstance(exc, DependencyError) else payload)
            return encode_error(request.id, payload), False

    async def _expire_loop(self) -> None:
        timeout = self.config.session_timeout
        while True:
            await asyncio.sleep(max(0.05, timeout / 4))
            now = time.monotonic()
            for session in list(self._sessions.values()):
                if session.idle and now - session.last_seen > timeout:
                    log.info("session %s idle for %.1fs: freeing %d objects", session.key.hex(),
                             now - session.last_seen, len(session.objects))
                    session.queue.put_nowait(None)
                    self._end_session(session, "sessions_expired")

    def _refuse(self, key: bytes, request: Request, error_type: str, message: str,
                session: Session | None = None) -> None:
        """Answer a request with an error without running it (its outputs are marked failed)."""
        payload = {"type": error_type, "message": message, "traceback": ""}
        if session is not None:
            _fail_outputs(session, request, payload)
        self._send(key, encode_error(request.id, payload))

    async def _monitor_loop(self) -> None:
        """Count clients whose handshake failed (no key, wrong server key, refused key)."""
        assert self._monitor is not None
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            self.counters["handshake_failures"] += 1
            log.warning("handshake failed from %s (event %s, %s)", event.get("endpoint"), event.get("event"),
                        event.get("value"))

    def _refuse_queued(self, session: Session, why: str) -> None:
        while not session.queue.empty():
            request = session.queue.get_nowait()
            if request is not None:
                self._send(session.key, encode_error(request.id, {"type": "WorkerClosedError", "message": why,
                                                                  "traceback": ""}))

    def _end_session(self, session: Session, counter: str) -> None:
        session.clear()
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
        self.counters[counter] += 1

    async def _send_and_wait(self, key: bytes, frames: list[Any], limit: float = 300.0) -> None:
        """Send without copying and wait until ZeroMQ no longer needs the frames' memory."""
        if self._socket is None:
            return
        try:
            tracker = await self._socket.send_multipart([key, *frames], copy=False, track=True)
        except zmq.ZMQError:
            return
        deadline, pause = time.monotonic() + limit, 0.0005
        while tracker is not None and not tracker.done:  # polled: no thread is held by a slow reader
            if time.monotonic() > deadline:
                raise RuntimeError(f"a reply to session {key.hex()} was not sent within {limit:g}s")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _send(self, key: bytes, frames: list[Any]) -> None:
        if self._socket is None:
            return
        with contextlib.suppress(zmq.ZMQError):
            self._socket.send_multipart([key, *frames], copy=self._copy_frames)


def _call_in_default_modes(handler: Any, session: Session, args: dict[str, Any]) -> Any:
    """Run a handler with torch's default grad, inference and autocast modes: an in-process worker runs
    small commands on its caller's thread, whose modes a daemon never sees (``fedzmq.torchmodes``)."""
    with default_modes():
        return handler(session, args)


def _fail_outputs(session: Session, request: Request, error: dict[str, str]) -> None:
    """Mark the objects a command would have made as failed, so later uses report ``error``."""
    for name in COMMANDS[request.cmd].outputs:
        out = request.args.get(name)
        for obj_id in out if isinstance(out, list) else [out]:
            session.fail(obj_id, error)


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
