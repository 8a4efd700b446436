"""Exceptions of the secure-aggregation and differential-privacy core.

    FedzmqError
    └── SecAggError
        ├── SecAggAborted        the round cannot finish (fewer than ``threshold`` participants at some step,
        │                        zero total weight): no aggregate is produced, nothing more should be sent
        └── SecAggProtocolError  a message is malformed, out of order, inconsistent, or asks a client for
                                 something it must never reveal; ``client_id`` names the culprit when known
"""

from __future__ import annotations

from ..errors import FedzmqError


class SecAggError(FedzmqError):
    """Base class of the errors raised by ``fedzmq.secagg``."""


class SecAggAborted(SecAggError):
    """The round was aborted; ``reason`` says why and ``step`` at which step. No result exists."""

    def __init__(self, reason: str, step: str = "") -> None:
        super().__init__(f"secure aggregation aborted{f' at {step}' if step else ''}: {reason}")
        self.reason = reason
        self.step = step


class SecAggProtocolError(SecAggError, ValueError):
    """A message broke the protocol. Raised before any state changes, so the caller may discard the
    offending message (treat its sender as dropped) and go on."""

    def __init__(self, message: str, client_id: int | None = None) -> None:
        super().__init__(message if client_id is None else f"client {client_id}: {message}")
        self.client_id = client_id
