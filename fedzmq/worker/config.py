"""Settings of a worker daemon: every limit and timeout is a named field with a default.

Each has a ``fedzmq-worker`` flag of the same name (``--max-sessions``, ...); see docs/security.md
for what the limits protect against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..codec import Limits


@dataclass(frozen=True)
class WorkerConfig:
    #: sizes the decoder accepts (header, frame, nesting); also the chunk size for streamed tensors
    limits: Limits = field(default_factory=Limits)
    #: a session that sends nothing (not even a heartbeat) for this long, with no command running,
    #: is closed and its objects freed
    session_timeout: float = 60.0
    #: threads that run torch work (forward, backward, steps), so the event loop keeps answering pings
    threads: int = 1
    #: accept the test-only ``debug_delay`` command (``--fault-injection``); never in production
    fault_injection: bool = False

    # --- limits that protect the daemon from one client ------------------------------------------
    #: concurrent client sessions; a new one beyond this is refused
    max_sessions: int = 256
    #: concurrent sessions of one client key (with keys): one allowed key cannot take every session,
    #: nor multiply its byte quota by opening sessions
    max_sessions_per_key: int = 32
    #: objects one session may hold
    max_objects: int = 100_000
    #: bytes of tensors and models one session may hold
    max_session_bytes: int = 8 << 30
    #: commands of one session waiting to run; more are refused at once (a flood slows only its sender)
    max_inflight: int = 4096

    # --- who may connect ----------------------------------------------------------------------
    #: the daemon's ``.key_secret`` file: turns on CurveZMQ encryption and authentication
    secret_key: str | None = None
    #: folder of client ``.key`` files allowed to connect (reloaded on SIGHUP)
    allowed_keys: str | None = None
    #: allow a non-loopback tcp address without keys (plaintext, anyone may connect)
    insecure: bool = False

    # --- what may leave ------------------------------------------------------------------------
    #: which values computed from private datasets a client may ``get``: "aggregates" (scalar
    #: results of losses and of sum/mean), or "none"; model parameters and fit/evaluate metrics
    #: are always released (that is federated learning)
    private_release: Literal["aggregates", "none"] = "aggregates"
    #: models trained here (``fit``) can leave only as masked updates of a secure-aggregation round
    require_secure_aggregation: bool = False
    #: the fewest clients and the lowest threshold a secure-aggregation round may have to be joined
    secagg_min_clients: int = 3
    secagg_min_threshold: int = 2
    #: the least DP noise (noise multiplier) a round must add for this worker to join (0: none needed)
    secagg_min_noise: float = 0.0
