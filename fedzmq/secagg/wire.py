"""Getting secure-aggregation messages across a wire.

The messages are plain data (``fedzmq.secagg.messages``): msgpack with ``use_bin_type=True`` carries
them as they are (``pack``/``unpack``/``roundtrip`` below). fedzmq's own codec differs in two ways: it
accepts no ``bytes`` values, and its header is capped (4 MiB by default), too small for a masked vector
of a million parameters. ``to_codec`` therefore turns every bytes value into a uint8 tensor, which the
codec sends as its own zero-copy frame, and ``from_codec`` turns uint8 tensors back into bytes. Both
are pure and recursive; validation stays with the receiving ``SecAggClient``/``SecAggServer``.
"""

from __future__ import annotations

from typing import Any

import msgpack
import torch


def pack(msg: Any) -> bytes:
    """Plain msgpack (bin type for bytes; no extension types, no pickle)."""
    return msgpack.packb(msg, use_bin_type=True)


def unpack(data: bytes, *, max_bytes: int = 1 << 31) -> Any:
    if len(data) > max_bytes:
        raise ValueError("message too large")
    return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)


def roundtrip(msg: Any) -> Any:
    """``unpack(pack(msg))``: what the other side of a msgpack wire receives."""
    return unpack(pack(msg))


#: bytes values above this size are not copied by ``from_codec`` (masked vectors, not keys or shares)
VIEW_ABOVE = 1 << 16


def to_codec(value: Any) -> Any:
    """Replace every bytes value by a uint8 tensor over the same bytes (for ``fedzmq.codec``). Writable
    buffers (a client's masked vector) are wrapped without copying; ``bytes`` are immutable and copied."""
    if isinstance(value, memoryview) and not value.readonly and value.contiguous:
        data = value.cast("B") if value.format != "B" else value
        return torch.frombuffer(data, dtype=torch.uint8) if data.nbytes else torch.empty(0, dtype=torch.uint8)
    if isinstance(value, (bytes, bytearray, memoryview)):
        copy = bytearray(value)
        return torch.frombuffer(copy, dtype=torch.uint8) if copy else torch.empty(0, dtype=torch.uint8)
    if isinstance(value, dict):
        return {k: to_codec(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_codec(v) for v in value]
    return value


def from_codec(value: Any) -> Any:
    """Inverse of ``to_codec``: every 1-D uint8 tensor becomes bytes, or, above ``VIEW_ABOVE`` bytes, a
    read-only memoryview of the received frame (no copy of a masked vector). Other tensors are left
    alone (the receiving parser rejects them)."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1:
        array = value.contiguous().numpy()
        return array.data.toreadonly() if array.nbytes > VIEW_ABOVE else array.tobytes()
    if isinstance(value, dict):
        return {k: from_codec(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [from_codec(v) for v in value]
    return value
