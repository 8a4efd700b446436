"""Settings of a worker daemon: every limit and timeout is a named field with a default."""

from __future__ import annotations

from dataclasses import dataclass, field

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
