"""Settings of a worker daemon: every limit and timeout is a named field with a default.

Each has a ``fedzmq-worker`` flag of the same name (``--max-sessions``, ...); see docs/security.md
for what the limits protect against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..codec import Limits
from .byzantine import check_setting


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
    #: test-only hostile participant: distort every update this daemon returns from a fit ("sign-flip" or
    #: "scale=K", ``fedzmq.worker.byzantine``); refused unless ``fault_injection`` is on
    byzantine: str | None = None

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
    #: the longest one command may run: a command over it is stopped at its next check (every step of a
    #: fit, batch of an evaluate, node of a forward program) with ``LimitExceeded``, and one that would
    #: need longer (sized on the meta device) is refused before it starts
    max_command_seconds: float = 300.0
    #: the most rows one ``fit`` may process (epochs x rows, or steps x batch size)
    max_fit_samples: int = 10_000_000

    # --- who may connect ----------------------------------------------------------------------
    #: the daemon's ``.key_secret`` file: turns on CurveZMQ encryption and authentication
    secret_key: str | None = None
    #: folder of client ``.key`` files allowed to connect (reloaded on SIGHUP)
    allowed_keys: str | None = None
    #: allow a non-loopback tcp address without keys (plaintext, anyone may connect)
    insecure: bool = False

    # --- what may leave ------------------------------------------------------------------------
    #: what computed from an ``open`` dataset's rows through pointers may leave: "none", or
    #: "aggregates" (scalar results of losses and of sum/mean, and model state trained through
    #: pointers: a coordinator can read any value this way, so only for data you would show).
    #: ``fit``'s trained parameters and fit/evaluate metrics leave under either (that is federated
    #: learning); a ``protected`` dataset's rows are never reachable through pointers at all
    private_release: Literal["aggregates", "none"] = "none"
    #: models trained here (``fit``) can leave only as masked updates of a secure-aggregation round
    require_secure_aggregation: bool = False
    #: the fewest clients and the lowest threshold a secure-aggregation round may have to be joined
    secagg_min_clients: int = 3
    secagg_min_threshold: int = 2
    #: the least DP noise (noise multiplier) a round must add for this worker to join (0: none needed)
    secagg_min_noise: float = 0.0
    #: the least noise multiplier this worker's own share of a round's noise must carry alone
    #: (``sigma / sqrt(expected survivors)``): it holds when every other participant is the coordinator's
    #: (Sybils, or real clients it trained to nothing); a round spreading the noise thinner is refused
    secagg_own_noise: float = 0.0
    #: join SecAgg+ rounds (a sparse graph): their consistency check holds within neighbourhoods only, so
    #: a coordinator that equivocates across neighbourhoods is not ruled out (docs/secagg.md)
    secagg_allow_sparse: bool = False
    #: participants that may work with the coordinator: a round's threshold must stay a strict majority
    #: of share holders with that many of them confirming every view (2t > holders + colluders)
    secagg_colluders: int = 0
    #: the most secure rounds each data holder (the daemon's own datasets, each hosted client) may give a
    #: masked update to (None: no limit); repeated rounds average the noise away (fedzmq.worker.ledger)
    secagg_max_rounds: int | None = None
    #: a file keeping those counts across restarts (None: counted from start-up)
    secagg_ledger: str | None = None
    #: the fewest rows one training step may use (an epoch's smaller remainder is skipped)
    min_batch_size: int = 16
    #: the fewest rows an ``evaluate`` reports metrics over
    min_metric_rows: int = 16
    #: the most evaluations each data holder answers (None: no limit), counted from start-up across sessions:
    #: a coordinator chooses the model, so each evaluation answers a question of its choice about the rows
    max_evaluations: int | None = None
    #: a file keeping those counts across restarts (None: counted from start-up)
    evaluations_ledger: str | None = None
    #: the daemon's secret for shuffling a fit's rows (None: drawn at start-up); a client's seed
    #: repeats a run on this daemon but cannot choose which rows share a batch
    shuffle_secret: str | None = None
    #: send remote tracebacks with errors; None: only when the daemon holds no protected data
    #: (errors of commands on private data never carry them, nor any message that could quote it)
    remote_tracebacks: bool | None = None

    def __post_init__(self) -> None:
        check_setting(self.byzantine, self.fault_injection)
