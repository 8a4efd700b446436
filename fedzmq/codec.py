"""The wire format: one msgpack header frame, then raw buffer frames (see docs/protocol.md).

Like Dask's ``protocol/core.py``, the header is the table of contents: every tensor in it is a small
tag ``{"$tensor": [dtype, shape, frame_index, requires_grad]}`` and its bytes travel as their own frame,
sent without copying (``copy=False``) and rebuilt on receipt with ``torch.frombuffer`` over the received
frame, so a received tensor costs no copy beyond the one ZeroMQ made from the socket.

The decoder is the security boundary: it checks the version, command, argument types, dtype allowlist,
shape × itemsize against each frame's length, header and message sizes, nesting depth, and that every
frame is claimed exactly once, before any other code sees the message. Nothing is ever executed:
only msgpack's plain types and the tags below are understood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import msgpack
import torch

from .commands import COMMANDS, MAX_ID
from .errors import ProtocolError, quoted

PROTOCOL_VERSION = 1

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 32


#: the smallest ``Limits.chunk_bytes`` (and frame and header limit) either side accepts
MIN_CHUNK_BYTES = 4096


@dataclass(frozen=True)
class Limits:
    """Sizes the decoder accepts. Both sides use them; the daemon's are flags of ``fedzmq-worker``."""

    max_header_bytes: int = 4 << 20
    max_frame_bytes: int = 1 << 30
    max_frames: int = 4096
    max_depth: int = 32
    #: values in one header (every list item, map entry and scalar counts): decoding is Python work on
    #: the event loop, so its size is bounded (65,536 values decode in about 25 ms)
    max_items: int = 1 << 14
    #: the largest tensor sent in one message; bigger ones stream in pieces of at most this size (the client
    #: uses min(16 MiB, this): see ``alloc``/``write``/``read`` and ``client.transfers``); never more than
    #: ``max_frame_bytes``
    chunk_bytes: int = 128 << 20
    #: requests (or replies) one message may carry as a batch (``encode_batch``); 1: never batch
    max_batch: int = 64

    def __post_init__(self) -> None:
        if min(self.max_frame_bytes, self.max_header_bytes, self.chunk_bytes) < MIN_CHUNK_BYTES:
            raise ValueError(f"frame, header and chunk limits must be at least {MIN_CHUNK_BYTES} bytes")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        # chunks end on element boundaries of any dtype (8 bytes at most), and fit in one frame
        object.__setattr__(self, "chunk_bytes", min(self.chunk_bytes, self.max_frame_bytes) // 8 * 8)


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to an object held by the worker, in the receiving session's namespace."""

    id: int


@dataclass(frozen=True, slots=True)
class NodeRef:
    """In a model's forward program: the output of an earlier node, by position."""

    index: int


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A reply saying "this tensor is too big for one message: read it in chunks"."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    requires_grad: bool
    #: a model entry's kept read (``fedzmq.worker.kept``): ``module_read`` with this ``stream`` reads the
    #: entry as the reply saw it, whatever the session sent since; None: read the object as it is
    stream: int | None = None


@dataclass
class Request:
    id: int
    cmd: str
    args: dict[str, Any]
    #: bytes of the message's buffer frames (charged to the session while the request waits)
    nbytes: int = 0
    #: the logical client the request is for, on a daemon hosting many (``--clients-from``); None: the
    #: daemon itself
    client: str | None = None


@dataclass
class Reply:
    id: int | None
    ok: bool
    result: Any = None
    error: dict[str, str] | None = None


class Encoded:
    """A value encoded once, to go into many messages unchanged: its msgpack body and its buffer frames
    (a federated round's broadcast of the global model: one encoding, its frames shared by every send).
    The tensors' memory is referenced, not copied: it must not change until the sends are done."""

    __slots__ = ("body", "frames")

    def __init__(self, value: Any) -> None:
        encoder = _Encoder(None)
        self.body = encoder.encode(value)
        self.frames = encoder.frames


def _rebased(body: Any, offset: int) -> Any:
    """``body`` with every ``$tensor`` frame index moved by ``offset`` (an ``Encoded`` value that does not
    come first in its message)."""
    if isinstance(body, list):
        return [_rebased(v, offset) for v in body]
    if isinstance(body, dict):
        if len(body) == 1 and "$tensor" in body:
            dtype, shape, index, grad = body["$tensor"]
            return {"$tensor": [dtype, shape, index + offset, grad]}
        return {k: _rebased(v, offset) for k, v in body.items()}
    return body


#: types sent as they are (exactly these types: subclasses such as IntEnum or numpy scalars are converted)
_PLAIN = frozenset((bool, int, float, str))
#: the other types the encoder encodes itself (exactly these): an encoder's ``default`` hook is tried first
#: on a value of any other type, and a subclass of these reaches their checks when the hook keeps it
_ENCODED = frozenset((list, dict, tuple, slice, type(Ellipsis), torch.Tensor, torch.dtype, Ref, NodeRef, StreamInfo,
                      Encoded, type(None)))


@dataclass
class _Encoder:
    """Turns a Python value into msgpack-able data plus buffer frames. ``default``: the hook that turns
    the values the codec does not know (a client's pointers) into ones it does; it returns any other
    value as it is."""

    default: Callable[[Any], Any] | None
    frames: list[Any] = field(default_factory=list)

    def encode(self, value: Any, depth: int = 0) -> Any:
        if depth > Limits.max_depth:
            raise ProtocolError(f"value nested deeper than {Limits.max_depth} levels")
        kind = type(value)
        if value is None or kind in _PLAIN:
            return value
        if kind is list and depth < Limits.max_depth:
            # the common case first, scalars without a call each (a batch of ids is thousands of them)
            return [v if v is None or type(v) in _PLAIN else self.encode(v, depth + 1) for v in value]
        if kind is dict and depth < Limits.max_depth:  # (arguments, replies: mostly scalars too)
            return self.mapping(value, depth, inline=True)
        if kind is Ref:
            return {"$ref": value.id}
        if self.default is not None and kind not in _ENCODED:  # a pointer, before a dozen checks it fails
            converted = self.default(value)
            if converted is not value:
                return self.encode(converted, depth + 1)
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if isinstance(value, Encoded):
            offset = len(self.frames)
            self.frames.extend(value.frames)
            return value.body if offset == 0 else _rebased(value.body, offset)
        if isinstance(value, Ref):
            return {"$ref": value.id}
        if isinstance(value, NodeRef):
            return {"$node": value.index}
        if isinstance(value, list):
            return [self.encode(v, depth + 1) for v in value]
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v, depth + 1) for v in value]}
        if isinstance(value, dict):
            return self.mapping(value, depth, inline=False)
        if isinstance(value, slice):
            return {"$slice": [self.encode(value.start), self.encode(value.stop), self.encode(value.step)]}
        if value is Ellipsis:
            return {"$ellipsis": True}
        if isinstance(value, torch.dtype):
            return {"$dtype": DTYPE_NAMES[value]}
        if isinstance(value, StreamInfo):
            body = [value.dtype, list(value.shape), value.nbytes, value.requires_grad]
            return {"$stream": body if value.stream is None else [*body, value.stream]}
        if isinstance(value, bool):  # bool subclasses and numpy bools before ints: bool is an int
            return bool(value)
        if isinstance(value, int):  # IntEnum and other int subclasses
            return int(value)
        if isinstance(value, float):
            return float(value)
        if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
            return self.encode(value.item(), depth + 1)  # numpy scalars
        raise ProtocolError(f"cannot send a value of type {type(value).__name__}")

    def mapping(self, value: dict[Any, Any], depth: int, inline: bool) -> dict[str, Any]:
        """A map, its keys checked; with ``inline``, its scalar values taken as they are (no call each)."""
        out = {}
        for k, v in value.items():
            if type(k) is not str or k.startswith("$"):
                raise ProtocolError(f"map keys must be strings not starting with '$', got {quoted(k)}")
            out[k] = v if inline and (v is None or type(v) in _PLAIN) else self.encode(v, depth + 1)
        return out

    def tensor(self, tensor: torch.Tensor) -> dict[str, Any]:
        if tensor.dtype not in DTYPE_NAMES:
            raise ProtocolError(f"dtype {tensor.dtype} is not supported on the wire")
        if tensor.layout != torch.strided or tensor.device.type != "cpu":
            raise ProtocolError("only dense CPU tensors can be sent")
        self.frames.append(tensor_buffer(tensor))
        return {
            "$tensor": [
                DTYPE_NAMES[tensor.dtype],
                list(tensor.shape),
                len(self.frames),  # frame 0 is the header
                bool(tensor.requires_grad),
            ]
        }


#: the dtypes numpy has (bfloat16 and the float8s it has not: their bytes go through a uint8 view)
_NUMPY_DTYPES = frozenset((torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
                           torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128))


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a buffer that ZeroMQ can send without copying."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if not tensor.numel():
        return memoryview(b"")
    if tensor.dtype in _NUMPY_DTYPES:  # numpy's own view, cast to bytes: two calls fewer through torch
        return memoryview(tensor.numpy()).cast("B")  # type: ignore[arg-type]
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def encode_request(
    request_id: int, cmd: str, args: dict[str, Any], default: Callable[[Any], Any] | None = None,
    client: str | None = None,
) -> list[Any]:
    """Header and frames of a request (to ``client``, one of the logical clients a daemon hosts, if
    given). The caller sends them with ``copy=False``."""
    encoder = _Encoder(default)
    body = encoder.encode(args)
    header = {"v": PROTOCOL_VERSION, "id": request_id, "cmd": cmd, "args": body}
    if client is not None:
        header["client"] = client
    return [_pack(header), *encoder.frames]


def with_argument(header: bytes, name: str, value: Any) -> bytes:
    """A request's header (ours, from ``encode_request``) with one more plain argument: how a client turns
    a request still waiting to leave into another (an op into an op-and-fetch) without encoding its
    values again."""
    fields = msgpack.unpackb(header, raw=False, strict_map_key=False)
    fields["args"][name] = value
    return _pack(fields)


def encode_reply(request_id: int | None, result: Any) -> list[Any]:
    encoder = _Encoder(None)
    body = encoder.encode(result)
    return [_pack({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": body}), *encoder.frames]


def encode_error(request_id: int | None, payload: dict[str, str]) -> list[Any]:
    return [_pack({"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": payload})]


# ---------------------------------------------------------------------------------------------------
# Batches: several small messages in one ZeroMQ message
#
# Each ZeroMQ message costs a send and a receive on both sides, a wake-up of each side's I/O thread and
# of its event loop: more than decoding a small command. Messages sent in the same pass of the event
# loop (an op and its ``get``, a burst of pipelined ops, a batch of replies) travel as one:
#
#     envelope [PROTOCOL_VERSION, [n_1, ..., n_k]]   then message 1's n_1 frames, ..., message k's n_k
#
# Each message inside is exactly what it would be alone (its header, then its buffer frames), and is
# decoded alone. So that a batch costs the receiver no more than one message may, its headers total at
# most ``Limits.max_items`` bytes (msgpack spends at least a byte per value: no more decoding than one
# header) and its buffers at most ``BATCH_BYTES`` (no more memory per queued message than before
# batches, when pyzmq copied every frame under 64 KiB: a peer that does not read its replies holds no
# more). Bigger messages go alone, without copying.

#: a message joins a batch only if its buffer frames total less than this
BATCH_MESSAGE_BYTES = 1 << 15
#: a batch's buffer frames total at most this
BATCH_BYTES = 1 << 16


def buffer_bytes(frames: Sequence[Any]) -> int:
    """Bytes in a message's buffer frames (all but its header)."""
    total = 0
    for frame in frames[1:]:
        total += _frame_len(frame)
    return total


def batchable(frames: Sequence[Any], limits: Limits) -> bool:
    """Whether a message (header, then buffer frames) may go inside a batch."""
    return limits.max_batch > 1 and len(frames[0]) <= limits.max_items and buffer_bytes(frames) < BATCH_MESSAGE_BYTES


def batch_fits(sizes: tuple[int, int, int, int], frames: Sequence[Any], limits: Limits) -> bool:
    """Whether a batch of ``sizes`` (messages, frames, header bytes, buffer bytes so far) has room for
    the ``batchable`` message ``frames``."""
    count, nframes, header_bytes, nbytes = sizes
    return (count < limits.max_batch and nframes + len(frames) <= limits.max_frames
            and header_bytes + len(frames[0]) <= limits.max_items and nbytes + buffer_bytes(frames) <= BATCH_BYTES)


def encode_batch(messages: Sequence[Sequence[Any]]) -> list[Any]:
    """One ZeroMQ message holding ``messages`` (each ``batchable``, together within ``batch_fits``)."""
    envelope = msgpack.packb([PROTOCOL_VERSION, [len(m) for m in messages]])
    return [envelope, *(frame for message in messages for frame in message)]


def is_batch(frames: Sequence[Any]) -> bool:
    """Whether a message is a batch's envelope and parts (a lone message's header is a msgpack map)."""
    first = _frame_buffer(frames[0]) if frames else b""
    return len(first) > 0 and first[0] == 0x92  # a msgpack array of two: [version, counts]


def split_batch(frames: Sequence[Any], limits: Limits) -> list[Sequence[Any]]:
    """The messages of a batch, checked against the limits a batch must keep; ``ProtocolError`` if not."""
    raw = _frame_buffer(frames[0])
    if len(raw) > 16 + 9 * limits.max_batch:
        raise ProtocolError("batch envelope too long")
    try:
        envelope = msgpack.unpackb(raw, raw=False, use_list=True, max_array_len=limits.max_batch + 2)
    except Exception as exc:  # msgpack raises several types for bad input; all mean the same here
        raise ProtocolError(f"batch envelope is not valid msgpack: {type(exc).__name__}") from None
    if (type(envelope) is not list or len(envelope) != 2 or type(envelope[0]) is not int
            or envelope[0] != PROTOCOL_VERSION or type(envelope[1]) is not list):
        raise ProtocolError(f"batch envelope must be [{PROTOCOL_VERSION}, [frames per message]]")
    counts = envelope[1]
    if not 1 <= len(counts) <= limits.max_batch:
        raise ProtocolError(f"a batch holds 1 to {limits.max_batch} messages, not {len(counts)}")
    if len(frames) - 1 > limits.max_frames:
        raise ProtocolError(f"too many frames: {len(frames) - 1} > {limits.max_frames}")
    parts, start, end, header_room, byte_room = [], 1, len(frames), limits.max_items, BATCH_BYTES
    for n in counts:
        if type(n) is not int or n < 1 or start + n > end:
            raise ProtocolError(f"batch envelope's frame counts do not match its {end - 1} frames")
        part = frames[start:start + n]
        header_room -= _frame_len(part[0])
        if header_room < 0:
            raise ProtocolError(f"a batch's headers exceed {limits.max_items} bytes in all")
        byte_room -= buffer_bytes(part)
        if byte_room < 0:
            raise ProtocolError(f"a batch's buffer frames exceed {BATCH_BYTES} bytes in all")
        parts.append(part)
        start += n
    if start != end:
        raise ProtocolError(f"batch envelope's frame counts do not match its {end - 1} frames")
    return parts


# ---------------------------------------------------------------------------------------------------
# Decoding


def _frame_len(frame: Any) -> int:
    """Bytes in a frame: a ``zmq.Frame``, ``bytes`` or a buffer (``len`` of a memoryview counts items)."""
    return frame.nbytes if type(frame) is memoryview else len(frame)


def _frame_buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


class _ContainerCounter:
    """Stops msgpack once the lists and maps it built hold more than about twice ``max_items`` values.

    msgpack builds the whole header before the decoder counts its values, and a header within
    ``max_header_bytes`` can hold millions of one-byte empty lists: seconds of the event loop and
    hundreds of MB. msgpack calls these hooks as each list or map is complete, so counting there stops
    it after a bounded number of objects. The decoder's own count (``Limits.max_items``: the values in
    lists and maps) stays the rule; this one also counts each container, so it allows twice that."""

    __slots__ = ("left",)

    def __init__(self, max_items: int) -> None:
        self.left = 2 * max_items + 64

    def seen(self, container: Any) -> Any:
        self.left -= len(container) + 1
        if self.left < 0:
            raise ProtocolError("header holds more than the limit of values (max_items) in its lists and maps")
        return container


def _unpack_header(frames: Sequence[Any], limits: Limits) -> dict[str, Any]:
    """Unpack and check the header, then the frames' count and sizes, naming the request id if known."""
    if not frames:
        raise ProtocolError("empty message")
    raw = _frame_buffer(frames[0])
    raw_bytes = len(raw)
    if raw_bytes > limits.max_header_bytes:
        raise ProtocolError(f"header of {raw_bytes} bytes exceeds the limit of {limits.max_header_bytes}")
    # a header of at most half as many bytes as the counter allows cannot trip it: every value takes a
    # byte, and the counter counts each value twice at most (in its container, and as a container
    # itself). So most messages go without the hooks, and their Python call per list and map
    counter = _ContainerCounter(limits.max_items)
    hooks = {"list_hook": counter.seen, "object_hook": counter.seen} if 2 * raw_bytes > counter.left else {}
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True,
                                 max_array_len=limits.max_items, max_map_len=limits.max_items, **hooks)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types for bad input; all mean the same here
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if type(header) is not dict:  # (msgpack makes plain dicts)
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    if len(frames) - 1 > limits.max_frames:
        raise ProtocolError(f"too many frames: {len(frames) - 1} > {limits.max_frames}", _header_id(header))
    for frame in frames[1:]:
        if _frame_len(frame) > limits.max_frame_bytes:
            raise ProtocolError(f"frame of {_frame_len(frame)} bytes exceeds the limit of {limits.max_frame_bytes}",
                                _header_id(header))
    return header


def check_message(frames: Sequence[Any], limits: Limits) -> None:
    """``ProtocolError`` if a peer with ``limits`` would refuse this message (its header's bytes or values,
    its frames' number or size). A peer stops reading such a message before it knows which request it
    answers or asks, so its error can name none: each side checks what it sends (a request that waited
    for ever; a reply of 4,800 tensors that dropped the connection). Cheap: the values are counted only
    in a header of more than ``limits.max_items`` bytes, the only kind that can hold that many."""
    header, header_bytes = frames[0], len(frames[0])
    largest = max(map(_frame_len, frames[1:]), default=0)
    if (header_bytes > limits.max_header_bytes or len(frames) - 1 > limits.max_frames
            or largest > limits.max_frame_bytes):
        raise ProtocolError(f"header of {header_bytes} bytes, {len(frames) - 1} frames, largest frame {largest} bytes "
                            f"(limits: {limits.max_header_bytes}, {limits.max_frames}, {limits.max_frame_bytes})")
    if header_bytes > limits.max_items:
        _unpack_header([header], limits)


def _header_id(header: dict[str, Any]) -> int | None:
    value = header.get("id")
    return value if type(value) is int and 0 <= value <= MAX_ID else None


def decode_request(frames: Sequence[Any], limits: Limits) -> Request:
    """Validate and decode a request. Raises ``ProtocolError`` (with the request id when readable)."""
    request_id, cmd, client, args = _request_head(frames, limits)
    try:
        decoded = _Decoder(frames, limits).decode_all(args)
    except ProtocolError as exc:
        raise ProtocolError(str(exc), request_id) from None
    problem = COMMANDS[cmd].check_args(decoded)
    if problem:
        raise ProtocolError(problem, request_id)
    return Request(request_id, cmd, decoded, buffer_bytes(frames), client)


def decode_request_head(frames: Sequence[Any], limits: Limits) -> Request:
    """A request checked as ``decode_request`` checks its header, with only its output ids among its
    arguments (those that pass the command's own checks, ``Command.output_args``): what refusing it
    without running it needs. The rest stays undecoded, so that refusing a flood costs less than
    running it. Its ``args`` are not the command's whole arguments: never run it."""
    request_id, cmd, client, args = _request_head(frames, limits)
    return Request(request_id, cmd, COMMANDS[cmd].output_args(args), buffer_bytes(frames), client)


def _request_head(frames: Sequence[Any], limits: Limits) -> tuple[int, str, str | None, dict[str, Any]]:
    """The checked id, command, client and (undecoded) arguments of a request."""
    header = _unpack_header(frames, limits)
    request_id = _header_id(header)
    if request_id is None:
        raise ProtocolError("request id missing or not an integer in [0, 2**63)")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {quoted(header.get('v'))} "
                            f"(this side speaks {PROTOCOL_VERSION})", request_id)
    cmd = header.get("cmd")
    if type(cmd) is not str or cmd not in COMMANDS:
        raise ProtocolError(f"unknown command {quoted(cmd)}", request_id)
    extra = set(header) - {"v", "id", "cmd", "args", "client"}
    if extra:
        raise ProtocolError(f"unknown header fields {quoted(sorted(map(str, extra)))}", request_id)
    client = header.get("client")
    if client is not None and (type(client) is not str or not 0 < len(client) <= 256):
        raise ProtocolError("client must be a string of 1 to 256 characters", request_id)
    args = header.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("args must be a map", request_id)
    return request_id, cmd, client, args


def decode_reply(frames: Sequence[Any], limits: Limits) -> Reply:
    header = _unpack_header(frames, limits)
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {quoted(header.get('v'))}", _header_id(header))
    request_id = header.get("id")
    if request_id is not None and _header_id(header) is None:
        raise ProtocolError("reply id is not an integer")
    ok = header.get("ok")
    if ok is True:
        result = _Decoder(frames, limits).decode_all(header.get("result"))
        return Reply(request_id, True, result=result)
    error = header.get("error")
    if ok is not False or not isinstance(error, dict):
        raise ProtocolError("reply has neither a result nor an error", request_id)
    return Reply(
        request_id,
        False,
        error={k: str(error.get(k, "")) for k in ("type", "message", "traceback")},
    )


def split_fetched(reply: Reply) -> tuple[Reply, Reply]:
    """The reply of an op sent with ``fetch`` as the op's own and the fetch's (the ``get`` of its output):
    an error reply is the op's failure, and so both's."""
    if not reply.ok:
        return reply, reply
    result = reply.result
    if not isinstance(result, dict) or set(result) not in ({"result", "value"}, {"result", "error"}):
        raise ProtocolError("an op-and-fetch reply needs 'result' and one of 'value' or 'error'", reply.id)
    op = Reply(reply.id, True, result=result["result"])
    if "value" in result:
        return op, Reply(reply.id, True, result=result["value"])
    error = result["error"]
    if not isinstance(error, dict):
        raise ProtocolError("an op-and-fetch reply's 'error' must be a map", reply.id)
    return op, Reply(reply.id, False, error={k: str(error.get(k, "")) for k in ("type", "message", "traceback")})


class _Decoder:
    def __init__(self, frames: Sequence[Any], limits: Limits) -> None:
        self.frames = frames
        self.limits = limits
        self.claimed = [False] * len(frames)
        self.claimed[0] = True  # the header
        self.items = 0

    def decode_all(self, value: Any) -> Any:
        decoded = self.decode(value, 0)
        if not all(self.claimed):
            raise ProtocolError("message has frames that no tensor claims")
        return decoded

    def decode(self, value: Any, depth: int) -> Any:
        """``value`` as msgpack made it (None, bool, int, float, str, bytes, list or dict: exactly these
        types, never subclasses) with its tags turned into objects, checked."""
        max_depth = self.limits.max_depth
        if depth > max_depth:
            raise ProtocolError(f"value nested deeper than {max_depth}")
        kind = type(value)
        if value is None or kind in _PLAIN:
            return value
        if kind is not list and kind is not dict:
            raise ProtocolError(f"values of type {kind.__name__} are not accepted")
        size = len(value)
        self.items += size
        if self.items > self.limits.max_items:
            raise ProtocolError(f"header holds more than {self.limits.max_items} values")
        # below the deepest level, scalars one level down need no call (the common case: ids, names,
        # numbers, flags); at it, any value inside is too deep, and its call says so
        inline = depth < max_depth
        if kind is list:
            if inline:
                return [v if v is None or type(v) in _PLAIN else self.decode(v, depth + 1) for v in value]
            return [self.decode(v, depth + 1) for v in value]
        if size == 1:
            (key, body), = value.items()
            if type(key) is str and key.startswith("$"):
                return self.tag(key, body, depth)
        out = {}
        for key, item in value.items():  # (a loop, not a comprehension: one call fewer per map)
            if type(key) is not str or key.startswith("$"):  # keys are strings; only a tag's starts with $
                raise ProtocolError(f"bad map key {quoted(key)}")
            out[key] = item if inline and (item is None or type(item) in _PLAIN) else self.decode(item, depth + 1)
        return out

    def tag(self, key: str, body: Any, depth: int) -> Any:
        if key == "$tensor":
            return self.tensor(body)
        if key == "$ref":
            if type(body) is not int or not 0 <= body <= MAX_ID:
                raise ProtocolError("bad object id in $ref")
            return Ref(body)
        if key == "$node":
            if type(body) is not int or not 0 <= body <= MAX_ID:
                raise ProtocolError("bad node index in $node")
            return NodeRef(body)
        if key == "$tuple":
            if not isinstance(body, list):
                raise ProtocolError("$tuple must hold a list")
            return tuple(self.decode(v, depth + 1) for v in body)
        if key == "$slice":
            if not isinstance(body, list) or len(body) != 3 or not all(v is None or type(v) is int for v in body):
                raise ProtocolError("$slice must hold [start, stop, step] of ints or nulls")
            return slice(*body)
        if key == "$ellipsis":
            return Ellipsis
        if key == "$dtype":
            if type(body) is not str or body not in DTYPES:
                raise ProtocolError(f"dtype {quoted(body)} is not on the allowlist")
            return DTYPES[body]
        if key == "$stream":
            if (
                not isinstance(body, list)
                or len(body) not in (4, 5)
                or type(body[0]) is not str
                or body[0] not in DTYPES
                or not is_shape(body[1])
                or type(body[2]) is not int
                or type(body[3]) is not bool
                or (len(body) == 5 and (type(body[4]) is not int or not 0 <= body[4] <= MAX_ID))
            ):
                raise ProtocolError("bad $stream description")
            return StreamInfo(body[0], tuple(body[1]), body[2], body[3], body[4] if len(body) == 5 else None)
        raise ProtocolError(f"unknown tag {quoted(key)}")

    def tensor(self, body: Any) -> torch.Tensor:
        if not isinstance(body, list) or len(body) != 4:
            raise ProtocolError("$tensor must be [dtype, shape, frame, requires_grad]")
        dtype_name, shape, index, requires_grad = body
        dtype = DTYPES.get(dtype_name) if type(dtype_name) is str else None
        if dtype is None:
            raise ProtocolError(f"dtype {quoted(dtype_name)} is not on the allowlist")
        if not is_shape(shape):
            raise ProtocolError("tensor shape must be a list of at most 32 non-negative ints")
        if type(index) is not int or not 1 <= index < len(self.frames):
            raise ProtocolError(f"tensor frame index {quoted(index)} out of range")
        if self.claimed[index]:
            raise ProtocolError(f"frame {index} is claimed twice")
        if type(requires_grad) is not bool:
            raise ProtocolError("requires_grad must be a bool")
        self.claimed[index] = True
        numel = math.prod(shape)
        itemsize = dtype.itemsize
        frame = self.frames[index]
        if numel * itemsize != _frame_len(frame):
            raise ProtocolError(
                f"tensor of shape {shape} and dtype {dtype_name} needs {numel * itemsize} bytes, "
                f"frame has {_frame_len(frame)}"
            )
        if requires_grad and not dtype.is_floating_point:
            raise ProtocolError("only floating point tensors can require gradients")
        tensor = tensor_from_buffer(_frame_buffer(frame), dtype, shape)
        return tensor.requires_grad_(True) if requires_grad else tensor


#: frames up to this size are copied out: libzmq may receive them into a shared 8 KiB buffer
#: (ZMQ_IN_BATCH_SIZE), which a tensor over the frame would keep alive whole, 20 times the bytes of a
#: 400-byte tensor, uncharged to any quota
SMALL_FRAME_BYTES = 8192


def tensor_from_buffer(buffer: Any, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor over ``buffer`` without copying it, unless it is small (``SMALL_FRAME_BYTES``); a fresh
    empty tensor when there are no bytes."""
    size = len(buffer)
    if size == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    # a small one's own memory is a bytearray copy that the tensor keeps alive: a third of what a
    # clone costs (no call through torch's dispatcher), on every small tensor received
    tensor = torch.frombuffer(bytearray(buffer) if size <= SMALL_FRAME_BYTES else buffer, dtype=dtype)
    return tensor if len(shape) == 1 else tensor.view(tuple(shape))


def is_shape(shape: Any) -> bool:
    return (
        isinstance(shape, list)
        and len(shape) <= MAX_DIMS
        and all(type(d) is int and 0 <= d <= MAX_ID for d in shape)
        and math.prod(shape) <= MAX_ID
    )


def dtype_itemsize(name: str) -> int:
    return DTYPES[name].itemsize
