"""Getting secure-aggregation messages across a wire.

The messages are plain data (``fedzmq.secagg.messages``): msgpack with ``use_bin_type=True`` carries
them as they are (``pack``/``unpack``/``roundtrip`` below). fedzmq's own codec differs in two ways: it
accepts no ``bytes`` values, and its header is capped (4 MiB by default), too small for a masked vector
of a million parameters. ``to_codec`` therefore packs a message's small values with msgpack into one
uint8 tensor, which the codec sends as its own zero-copy frame, and gives each large buffer a frame of
its own; ``from_codec`` unpacks it. Both are pure; validation stays with the receiving
``SecAggClient``/``SecAggServer``.
"""

from __future__ import annotations

from typing import Any

import msgpack
import torch

from .messages import MAX_LIST


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

#: the one key of a message ``to_codec`` packed: its msgpack bytes (with the large buffers as
#: ``BIG_EXT`` references into ``BIG_KEY``'s list), as one uint8 tensor
PACKED_KEY = "secagg.packed"
BIG_KEY = "secagg.big"
#: the msgpack extension type code of a reference to a large buffer (4-byte big-endian index)
BIG_EXT = 1
#: the most bytes a packed message may have: the routed shares of a classic round of about 50,000 clients
#: fit (about 150 bytes a peer); SecAgg+ rounds' are a few KB whatever their size. Unpacked,
#: it is at most its values (``PACKED_MAX_VALUES``, each a Python object) and the bytes of its strings,
#: what a daemon charges for it (``worker.charges.secure``); without a cap, 12 MB of empty lists held a
#: daemon's event loop 5 s (msgpack keeps the GIL) and grew it by 850 MiB (a red team's find)
PACKED_MAX_BYTES = 8 << 20
#: the most lists and maps a packed message may unpack into (a message holds a few per peer)
PACKED_MAX_CONTAINERS = 4 * MAX_LIST
#: the most values (list items, map keys and values) a packed message may unpack into: a few per peer.
#: Values, not bytes, are what unpacking multiplies: a 6-byte reference to a big buffer became a numpy
#: array and two views, and a red team's 7.9 MB of them grew a daemon by 1 GiB
PACKED_MAX_VALUES = 8 * MAX_LIST


def to_codec(value: Any) -> Any:
    """A message ready for ``fedzmq.codec``: its small values (ids, keys, ciphertexts, shares) packed with
    plain msgpack into one uint8 tensor, the codec's own zero-copy frame, and each large buffer (a
    masked vector above ``VIEW_ABOVE`` bytes) in a frame of its own, not copied when it is writable.

    One frame per message, not one per key: a SecAgg+ message holds a key, ciphertext or share per
    neighbour (about 70 at a thousand clients), and the codec's cost per tensor, on the coordinator and
    on the daemons, made those small tensors most of a secure round's time."""
    big: list[torch.Tensor] = []
    packed = msgpack.packb(_divert(value, big), use_bin_type=True)
    return {PACKED_KEY: torch.frombuffer(bytearray(packed), dtype=torch.uint8), BIG_KEY: big}


def _divert(value: Any, big: list[torch.Tensor]) -> Any:
    """``value`` with every buffer above ``VIEW_ABOVE`` bytes moved to ``big`` (as a uint8 tensor) and
    replaced by a ``BIG_EXT`` reference; lists for tuples, as msgpack reads them back."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = memoryview(value)
        if data.nbytes <= VIEW_ABOVE:
            return value
        big.append(_uint8(data))
        return msgpack.ExtType(BIG_EXT, (len(big) - 1).to_bytes(4, "big"))
    if isinstance(value, dict):
        return {k: _divert(v, big) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_divert(v, big) for v in value]
    return value


def _uint8(data: memoryview) -> torch.Tensor:
    """A uint8 tensor over ``data``: without a copy when it is a writable contiguous buffer."""
    if not data.readonly and data.contiguous:
        flat = data.cast("B") if data.format != "B" else data
        return torch.frombuffer(flat, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def from_codec(value: Any) -> Any:
    """Inverse of ``to_codec``: the packed message unpacked, each reference to a large buffer a read-only
    memoryview of its received frame (no copy of a masked vector). A malformed packing (not a uint8
    tensor, an unknown extension, a reference out of range) raises ``ValueError``; the receiving
    parser validates the message itself. Values not packed (an older sender) are converted as before:
    every 1-D uint8 tensor becomes bytes, or a read-only view above ``VIEW_ABOVE`` bytes."""
    if isinstance(value, dict) and PACKED_KEY in value:
        packed, big = value[PACKED_KEY], value.get(BIG_KEY, [])
        if set(value) - {PACKED_KEY, BIG_KEY} or not _is_bytes_tensor(packed) or not isinstance(big, list) \
                or not all(_is_bytes_tensor(t) for t in big):
            raise ValueError("malformed packed secure-aggregation message")

        referenced: set[int] = set()

        def ext_hook(code: int, data: bytes) -> Any:
            index = int.from_bytes(data, "big") if code == BIG_EXT and len(data) == 4 else -1
            if not 0 <= index < len(big) or index in referenced:  # each buffer is one value of the message
                raise ValueError("malformed packed secure-aggregation message")
            referenced.add(index)
            return big[index].contiguous().numpy().data.toreadonly()

        if packed.numel() > PACKED_MAX_BYTES:
            raise ValueError(f"packed secure-aggregation message of {packed.numel()} bytes, over {PACKED_MAX_BYTES}")
        containers = values = 0

        def counted(container: Any) -> Any:  # stops msgpack once too many lists, maps or values were built
            nonlocal containers, values
            containers += 1
            values += len(container) * (2 if isinstance(container, dict) else 1)
            if containers > PACKED_MAX_CONTAINERS:
                raise ValueError(f"packed secure-aggregation message of more than {PACKED_MAX_CONTAINERS} lists")
            if values > PACKED_MAX_VALUES:
                raise ValueError(f"packed secure-aggregation message of more than {PACKED_MAX_VALUES} values")
            return container

        return msgpack.unpackb(packed.contiguous().numpy().tobytes(), raw=False, strict_map_key=True,
                               use_list=True, ext_hook=ext_hook, list_hook=counted, object_hook=counted,
                               max_array_len=MAX_LIST, max_map_len=MAX_LIST, max_bin_len=VIEW_ABOVE,
                               max_str_len=VIEW_ABOVE, max_ext_len=4)
    if _is_bytes_tensor(value):
        array = value.contiguous().numpy()
        return array.data.toreadonly() if array.nbytes > VIEW_ABOVE else array.tobytes()
    if isinstance(value, dict):
        return {k: from_codec(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [from_codec(v) for v in value]
    return value


def _is_bytes_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
