"""Liveness and introspection: answered by the receive loop at once, even while the session is busy."""

from __future__ import annotations

from typing import Any

from ...codec import MIN_CHUNK_BYTES
from ...errors import BadRequest, PermissionDenied
from ..binding import Binding, Context


def ping(context: Context, binding: Binding) -> Any:
    _note_interval(binding)
    return {**context.ping(), "session": binding.session.uid}


def heartbeat(context: Context, binding: Binding) -> Any:
    _note_interval(binding)
    session = binding.session
    return {"running": session.running, "last_done": session.last_done, "session": session.uid}


def _note_interval(binding: Binding) -> None:
    """A client says how often it sends heartbeats (silent for many of them, it is gone), and the biggest
    piece it reads."""
    interval = binding.args.get("interval")
    peer = binding.session.peer
    chunk = binding.args.get("chunk_bytes")
    if chunk is not None and chunk >= MIN_CHUNK_BYTES and peer is not None:
        peer.chunk_bytes = chunk
    if interval is not None and 0 < interval <= 3600 and peer is not None:
        peer.interval = float(interval)


def status(context: Context, binding: Binding) -> Any:
    return context.status()


def clients(context: Context, binding: Binding) -> Any:
    """The logical clients this daemon hosts (``--clients-from``), by id."""
    return sorted(context.clients)


def debug_delay(context: Context, binding: Binding) -> Any:
    if not context.config.fault_injection:
        raise PermissionDenied.new("fault injection is off on this worker (start it with --fault-injection)")
    if not 0 <= binding.args["seconds"] <= 3600:
        raise BadRequest.new("delay must be between 0 and 3600 seconds")
    context.delay = float(binding.args["seconds"])
    return None


def close(context: Context, binding: Binding) -> Any:
    binding.session.clear()
    return None
