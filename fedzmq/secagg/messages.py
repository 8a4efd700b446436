"""The messages of a secure-aggregation round, as plain dicts.

Every message is a dict with string keys whose values are ints, bytes, lists and dicts of those, so it
can travel as msgpack (``use_bin_type=True``). Per-client collections are lists of ``[client_id, value]``
pairs, never maps keyed by ints (fedzmq's codec accepts only string map keys). No pickle, no tensors:
``fedzmq.secagg.wire`` converts bytes values to uint8 tensors for fedzmq's codec, where large byte
strings must travel as frames.

Direction  Type                   Fields
c -> s     ``secagg.advertise``   from: int, c_pk: bytes[32], s_pk: bytes[32]
s -> c     ``secagg.keys``        keys: [[id, c_pk, s_pk], ...] (U0, or its part in the neighbourhood; by id)
c -> s     ``secagg.shares``      from: int, b_commit: bytes[32], shares: [[to_id, ciphertext], ...]
s -> c     ``secagg.routed``      to: int, u1: [id, ...], shares: [[from_id, ciphertext], ...]
c -> s     ``secagg.masked``      from: int, masked: bytes (masked_length little-endian ring elements)
s -> c     ``secagg.confirm_request``  u2: [id, ...], dropped: [id, ...]
c -> s     ``secagg.confirm``     from: int, tags: [[to_id, tag: bytes[32]], ...] (to_id in U2)
s -> c     ``secagg.unmask_request``  u2, dropped (as confirmed), confirm: [[from_id, to_id, tag], ...]
c -> s     ``secagg.unmask``      from: int, b_shares: [[id, share], ...] (id in U2),
                                  s_shares: [[id, share], ...] (id dropped)

With SecAgg+ (``SecAggConfig.degree``) every list a client receives (keys, u1 and the routed shares,
u2 and dropped) holds only that client and its neighbours, and what it sends names only them.

Every message also carries ``v`` (the protocol version, 2: version 1 had no consistency check, and
the two do not mix). The parsers below check types, sizes and
duplicates and raise ``SecAggProtocolError`` naming the peer; they never look at content they do not
understand (unknown fields are an error).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

from .config import MAX_CLIENT_ID, MAX_CLIENTS
from .errors import SecAggProtocolError

VERSION = 2
MAX_LIST = MAX_CLIENTS


# Functional TypedDict syntax, because "from" is a Python keyword.
AdvertiseMsg = TypedDict("AdvertiseMsg", {
    "v": int, "type": Literal["secagg.advertise"], "from": int, "c_pk": bytes, "s_pk": bytes})
KeysMsg = TypedDict("KeysMsg", {
    "v": int, "type": Literal["secagg.keys"], "keys": list[list[Any]]})  # [[id, c_pk, s_pk], ...]
SharesMsg = TypedDict("SharesMsg", {
    "v": int, "type": Literal["secagg.shares"], "from": int, "b_commit": bytes,
    "shares": list[list[Any]]})  # [[to_id, ciphertext], ...]
RoutedSharesMsg = TypedDict("RoutedSharesMsg", {
    "v": int, "type": Literal["secagg.routed"], "to": int, "u1": list[int],
    "shares": list[list[Any]]})  # [[from_id, ciphertext], ...]
MaskedMsg = TypedDict("MaskedMsg", {
    "v": int, "type": Literal["secagg.masked"], "from": int, "masked": bytes | memoryview})
ConfirmRequestMsg = TypedDict("ConfirmRequestMsg", {
    "v": int, "type": Literal["secagg.confirm_request"], "u2": list[int], "dropped": list[int]})
ConfirmMsg = TypedDict("ConfirmMsg", {
    "v": int, "type": Literal["secagg.confirm"], "from": int,
    "tags": list[list[Any]]})  # [[to_id, tag], ...]: its word on U1 and U2 to each other survivor
UnmaskRequestMsg = TypedDict("UnmaskRequestMsg", {
    "v": int, "type": Literal["secagg.unmask_request"], "u2": list[int], "dropped": list[int],
    "confirm": list[list[Any]]})  # [[from_id, to_id, tag], ...]: the survivors' words to the receiver
UnmaskMsg = TypedDict("UnmaskMsg", {
    "v": int, "type": Literal["secagg.unmask"], "from": int,
    "b_shares": list[list[Any]],  # [[survivor_id, share], ...]
    "s_shares": list[list[Any]]})  # [[dropped_id, share], ...]


# --------------------------------------------------------------------------------------------------
# parsing helpers


def check_message(msg: Any, kind: str, required: set[str], peer: int | None = None) -> Mapping[str, Any]:
    """``msg`` is a dict of ``kind`` with exactly the fields ``required | {"v", "type"}``."""
    if not isinstance(msg, Mapping):
        raise SecAggProtocolError(f"expected a {kind} message, got {type(msg).__name__}", peer)
    if msg.get("type") != kind:
        raise SecAggProtocolError(f"expected a {kind} message, got {msg.get('type')!r}", peer)
    if msg.get("v") != VERSION:
        raise SecAggProtocolError(f"unsupported secagg message version {msg.get('v')!r}", peer)
    fields, expected = set(msg), required | {"v", "type"}
    if fields != expected:
        missing, extra = sorted(expected - fields), sorted(fields - expected)
        raise SecAggProtocolError(f"{kind}: missing fields {missing}, unknown fields {extra}", peer)
    return msg


def as_id(value: Any, what: str, peer: int | None = None) -> int:
    if type(value) is not int or not 0 <= value <= MAX_CLIENT_ID:
        raise SecAggProtocolError(f"{what} is not a client id", peer)
    return value


def as_bytes(value: Any, what: str, peer: int | None = None, *, length: int | None = None,
             max_length: int | None = None) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise SecAggProtocolError(f"{what} must be bytes, got {type(value).__name__}", peer)
    value = bytes(value)
    if length is not None and len(value) != length:
        raise SecAggProtocolError(f"{what} must be {length} bytes, got {len(value)}", peer)
    if max_length is not None and len(value) > max_length:
        raise SecAggProtocolError(f"{what} longer than {max_length} bytes", peer)
    return value


def as_id_list(value: Any, what: str, peer: int | None = None) -> list[int]:
    """A strictly increasing list of client ids (sorted and duplicate-free by construction)."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_LIST:
        raise SecAggProtocolError(f"{what} must be a list of client ids", peer)
    ids = [as_id(v, what, peer) for v in value]
    if any(a >= b for a, b in zip(ids, ids[1:])):
        raise SecAggProtocolError(f"{what} must be sorted and without duplicates", peer)
    return ids


def as_pairs(value: Any, what: str, peer: int | None = None, *, width: int = 2) -> dict[int, list[Any]]:
    """``[[id, v1, ...], ...]`` as ``{id: [v1, ...]}``; ids must be distinct."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_LIST:
        raise SecAggProtocolError(f"{what} must be a list of [id, ...] entries", peer)
    out: dict[int, list[Any]] = {}
    for entry in value:
        if not isinstance(entry, (list, tuple)) or len(entry) != width:
            raise SecAggProtocolError(f"{what}: each entry must have {width} items", peer)
        cid = as_id(entry[0], what, peer)
        if cid in out:
            raise SecAggProtocolError(f"{what}: client {cid} listed twice", peer)
        out[cid] = list(entry[1:])
    return out
