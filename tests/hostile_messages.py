"""Malformed and hostile messages, shared by the codec tests and the tests against real daemons."""

import msgpack


def tensor_message(dtype="float32", shape=(4,), frame=1, nbytes=16, grad=False):
    head = msgpack.packb({"v": 1, "id": 3, "cmd": "store",
                          "args": {"out": 1, "value": {"$tensor": [dtype, list(shape), frame, grad]}}})
    return [head, bytes(nbytes)]


def _nested(depth):
    value = [1]
    for _ in range(depth):
        value = [value]
    return value


BAD_MESSAGES = {
    "garbage bytes": [b"\xc1\xff\x00garbage"],
    "truncated msgpack": [msgpack.packb({"v": 1, "id": 3, "cmd": "ping", "args": {}})[:-3]],
    "non-map header": [msgpack.packb([1, 2, 3])],
    "no id": [msgpack.packb({"v": 1, "cmd": "ping", "args": {}})],
    "negative id": [msgpack.packb({"v": 1, "id": -1, "cmd": "ping", "args": {}})],
    "float id": [msgpack.packb({"v": 1, "id": 1.5, "cmd": "ping", "args": {}})],
    "wrong version": [msgpack.packb({"v": 99, "id": 3, "cmd": "ping", "args": {}})],
    "unknown command": [msgpack.packb({"v": 1, "id": 3, "cmd": "rm_rf", "args": {}})],
    "args not a map": [msgpack.packb({"v": 1, "id": 3, "cmd": "ping", "args": [1]})],
    "unknown argument": [msgpack.packb({"v": 1, "id": 3, "cmd": "get", "args": {"obj": 1, "evil": 2}})],
    "missing argument": [msgpack.packb({"v": 1, "id": 3, "cmd": "get", "args": {}})],
    "wrong argument type": [msgpack.packb({"v": 1, "id": 3, "cmd": "get", "args": {"obj": "1"}})],
    "dtype not allowed": tensor_message(dtype="object"),
    "length mismatch": tensor_message(nbytes=15),
    "huge declared shape": tensor_message(shape=(2**40, 2**40)),
    "negative dim": tensor_message(shape=(-4,)),
    "frame index out of range": tensor_message(frame=7),
    "frame index is the header": tensor_message(frame=0),
    "unclaimed frame": [msgpack.packb({"v": 1, "id": 3, "cmd": "ping", "args": {}}), b"extra"],
    "grad on ints": tensor_message(dtype="int32", grad=True),
    "unknown tag": [msgpack.packb({"v": 1, "id": 3, "cmd": "get", "args": {"obj": {"$pickle": "x"}}})],
    "bad ref": [msgpack.packb({"v": 1, "id": 3, "cmd": "op",
                               "args": {"op": "neg", "args": [{"$ref": -5}], "kwargs": {}, "out": [1]}})],
    "deep nesting": [msgpack.packb({"v": 1, "id": 3, "cmd": "op",
                                    "args": {"op": "neg", "args": _nested(40), "kwargs": {}, "out": [1]}})],
    "empty message": [],
    "binary in args": [msgpack.packb({"v": 1, "id": 3, "cmd": "get", "args": {"obj": b"\x00"}}, use_bin_type=True)],
    "extra header field": [msgpack.packb({"v": 1, "id": 3, "cmd": "ping", "args": {}, "exec": "x"})],
}




def container_bomb(header_bytes: int = 4 << 20) -> list[bytes]:
    """A header within ``max_header_bytes`` (4 MiB) holding millions of empty lists, one byte each,
    every array within ``max_array_len``: msgpack builds them all (seconds of the event loop, hundreds
    of MB) before any check on the decoded value could run."""
    import struct

    inner = b"\xdc" + struct.pack(">H", 16384) + b"\x90" * 16384  # an array of 16,384 empty arrays
    count = (header_bytes - 100) // len(inner)
    body = b"\xdc" + struct.pack(">H", count) + inner * count
    head = msgpack.packb({"v": 1, "id": 3, "cmd": "ping"})
    return [b"\x84" + head[1:] + msgpack.packb("args") + b"\x81" + msgpack.packb("x") + body]


BAD_MESSAGES["millions of empty lists"] = container_bomb()


def _batch(envelope, *parts):
    """A batch message: its envelope (packed as given), then the frames of its parts."""
    return [msgpack.packb(envelope), *(frame for part in parts for frame in part)]


_PING = [msgpack.packb({"v": 1, "id": 3, "cmd": "ping", "args": {}})]
_BIG_HEADER = [msgpack.packb({"v": 1, "id": 3, "cmd": "ping", "args": {"pad": "x" * 9000}})]

#: batches broken at the envelope (each gets one error reply, and nothing in it runs)
BAD_MESSAGES.update({
    "batch counts exceed the frames": _batch([1, [2]], _PING),
    "batch of no messages": _batch([1, []]),
    "batch of more than max_batch messages": _batch([1, [1] * 65], *[_PING] * 65),
    "batch count not an int": _batch([1, ["1"]], _PING),
    "batch count zero": _batch([1, [0, 1]], _PING),
    "batch of another version": _batch([2, [1]], _PING),
    "batch headers past max_items bytes": _batch([1, [1, 1]], _BIG_HEADER, _BIG_HEADER),
    "batch with a big frame": _batch([1, [2]], tensor_message(shape=(17500,), nbytes=70000)),
    "batch past 64 KiB of buffers": _batch([1, [2, 2, 2]], *[tensor_message(shape=(7500,), nbytes=30000)] * 3),
    "batch version true": _batch([True, [1]], _PING),
    "batch envelope garbage": [b"\x92\xc1\xc1", *_PING],
    "batch inside a batch": _batch([1, [2]], _batch([1, [1]], _PING)),
})
