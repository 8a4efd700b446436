"""The codec alone: round trips, zero-copy decoding, and refusal of malformed messages."""

import math

import msgpack
import pytest
import torch

from fedzmq.codec import (
    DTYPES, SMALL_FRAME_BYTES, Limits, NodeRef, Ref, StreamInfo, decode_reply, decode_request, encode_error, encode_reply,
    decode_request_head, encode_request,
)
from fedzmq.errors import ProtocolError
from hostile_messages import BAD_MESSAGES, tensor_message

LIMITS = Limits()


def header(frames):
    return msgpack.unpackb(frames[0])


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_tensor_round_trips_every_allowed_dtype(dtype):
    tensor = (torch.arange(12) % 3).to(dtype).reshape(3, 4)
    frames = encode_request(1, "store", {"out": 5, "value": tensor})
    request = decode_request(frames, LIMITS)
    assert request.args["value"].dtype == dtype
    assert torch.equal(request.args["value"], tensor)


def test_tensor_bytes_travel_as_their_own_frame_not_in_the_header():
    tensor = torch.arange(1000, dtype=torch.float32)
    frames = encode_request(1, "store", {"out": 5, "value": tensor})
    assert len(frames) == 2
    assert len(frames[1]) == 4000
    assert len(frames[0]) < 100
    assert header(frames)["args"]["value"] == {"$tensor": ["float32", [1000], 1, False]}


def test_decoded_tensor_shares_memory_with_the_received_frame():
    buffer = bytearray(torch.arange(4096, dtype=torch.float32).numpy().tobytes())  # 16 kB
    frames = [encode_request(1, "store", {"out": 1, "value": torch.zeros(4096)})[0], buffer]
    tensor = decode_request(frames, LIMITS).args["value"]
    buffer[0:4] = torch.tensor([42.0]).numpy().tobytes()
    assert tensor[0].item() == 42.0  # no copy was made


def test_a_small_decoded_tensor_is_copied_out_of_its_frame():
    """libzmq may receive small frames into one shared 8 KiB buffer, which a tensor over the frame
    would keep alive whole: small tensors get their own memory."""
    size = SMALL_FRAME_BYTES // 4
    buffer = bytearray(torch.arange(size, dtype=torch.float32).numpy().tobytes())
    frames = [encode_request(1, "store", {"out": 1, "value": torch.zeros(size)})[0], buffer]
    tensor = decode_request(frames, LIMITS).args["value"]
    buffer[0:4] = torch.tensor([42.0]).numpy().tobytes()
    assert tensor[0].item() == 0.0 and torch.equal(tensor, torch.arange(size, dtype=torch.float32))


def test_values_keep_their_python_shape():
    args = {"op": "getitem", "args": [Ref(3), (0, slice(1, None, 2), ...)], "kwargs": {"dim": torch.float32},
            "out": [4]}
    request = decode_request(encode_request(9, "op", args), LIMITS)
    assert request.args["args"] == [Ref(3), (0, slice(1, None, 2), Ellipsis)]
    assert request.args["kwargs"] == {"dim": torch.float32}


def test_non_contiguous_and_grad_tensors_are_sent_as_their_values():
    base = torch.arange(6.0).reshape(2, 3).t()
    leaf = torch.ones(2, requires_grad=True)
    request = decode_request(encode_request(1, "op", {"op": "add", "args": [base, leaf], "kwargs": {}, "out": [1]}),
                             LIMITS)
    assert torch.equal(request.args["args"][0], base)
    assert request.args["args"][1].requires_grad


def test_reply_and_error_round_trip():
    reply = decode_reply(encode_reply(7, {"x": torch.ones(2), "s": StreamInfo("float32", (2,), 8, False),
                                         "n": NodeRef(1)}), LIMITS)
    assert reply.ok and reply.id == 7 and torch.equal(reply.result["x"], torch.ones(2))
    assert reply.result["s"] == StreamInfo("float32", (2,), 8, False)
    error = decode_reply(encode_error(7, {"type": "ValueError", "message": "m", "traceback": "tb"}), LIMITS)
    assert not error.ok and error.error == {"type": "ValueError", "message": "m", "traceback": "tb"}


@pytest.mark.parametrize("name", sorted(BAD_MESSAGES))
def test_malformed_message_is_refused_with_a_protocol_error(name):
    with pytest.raises(ProtocolError):
        decode_request(BAD_MESSAGES[name], LIMITS)


def test_protocol_error_keeps_the_request_id_when_it_can_be_read():
    with pytest.raises(ProtocolError) as info:
        decode_request(BAD_MESSAGES["unknown command"], LIMITS)
    assert info.value.request_id == 3
    with pytest.raises(ProtocolError) as info:
        decode_request(BAD_MESSAGES["garbage bytes"], LIMITS)
    assert info.value.request_id is None


def test_header_and_frame_limits_are_enforced_before_decoding():
    small = Limits(max_header_bytes=4096, max_frame_bytes=4096)
    with pytest.raises(ProtocolError, match="header"):
        decode_request([msgpack.packb({"v": 1, "id": 1, "cmd": "ping", "args": {"x": "y" * 5000}})], small)
    with pytest.raises(ProtocolError, match="frame") as info:
        decode_request(tensor_message(shape=(2048,), nbytes=8192), small)
    assert info.value.request_id == 3  # read from the header first, so the error reply can be routed


def test_limits_keep_chunks_on_element_boundaries_and_within_a_frame():
    assert Limits(chunk_bytes=10_001).chunk_bytes == 10_000
    assert Limits(max_frame_bytes=8192, chunk_bytes=1 << 20).chunk_bytes == 8192
    with pytest.raises(ValueError):
        Limits(chunk_bytes=0)


def test_encoder_refuses_values_it_cannot_describe():
    with pytest.raises(ProtocolError):
        encode_request(1, "op", {"op": "add", "args": [object()], "kwargs": {}, "out": [1]})
    with pytest.raises(ProtocolError):
        encode_request(1, "op", {"op": "add", "args": [{"$ref": 1}], "kwargs": {}, "out": [1]})


def test_shape_product_limit_rejects_overflowing_shapes():
    with pytest.raises(ProtocolError):
        decode_request(tensor_message(shape=(2**62, 4)), LIMITS)
    assert math.prod([2**31, 2]) == 2**32  # plain Python ints: no 32-bit lengths anywhere


def test_a_header_of_millions_of_tiny_containers_is_refused_before_they_are_built():
    """The attack: 4 MiB of one-byte empty lists. Refused as a ProtocolError after
    building at most about twice ``max_items`` containers, not four million of them: the memory the
    decode allocates shows it (four million lists would be hundreds of MB)."""
    import tracemalloc

    from hostile_messages import container_bomb

    message = container_bomb()
    assert len(message[0]) <= Limits().max_header_bytes
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="more than") as refused:
            decode_request(message, Limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    assert "header holds more than" in str(refused.value)


def test_the_container_counter_is_left_out_only_where_it_could_not_stop_anything():
    """The counter's hooks cost a Python call per list and map, so headers of at most half its allowance
    in bytes go without them. That is safe because a header cannot count more than twice its bytes:
    every value, container or not, takes at least one, and is counted once in its container and once
    more if it is a container. Checked on the densest headers msgpack can write (empty lists, empty
    maps, maps of one-byte keys and values, lists of one empty list), each of the most bytes that go
    without hooks; past that the counter runs and stops a bomb of empty lists."""
    limits = Limits(max_items=1000)
    allowance = (2 * limits.max_items + 64) // 2
    counted = []

    def count(container):
        counted.append(len(container) + 1)
        return container

    def densest(fill: bytes, per_item: int) -> bytes:
        count_ = (allowance - 3) // per_item
        return b"\xdc" + count_.to_bytes(2, "big") + fill * count_

    for header in (densest(b"\x90", 1), densest(b"\x80", 1), densest(b"\x81\xa0\x00", 3),
                   densest(b"\x91\x90", 2), densest(b"\x00", 1)):
        assert len(header) <= allowance
        counted.clear()
        msgpack.unpackb(header, list_hook=count, object_hook=count, strict_map_key=False)
        assert sum(counted) <= 2 * len(header) <= 2 * limits.max_items + 64, header[:8]
    bomb = b"\x84" + msgpack.packb({"v": 1, "id": 3, "cmd": "ping"})[1:] + msgpack.packb("args") + \
        b"\x81" + msgpack.packb("x") + b"\x92" + (b"\xdc" + (1000).to_bytes(2, "big") + b"\x90" * 1000) * 2
    assert len(bomb) > allowance
    with pytest.raises(ProtocolError, match="lists and maps"):
        decode_request([bomb], limits)


def test_a_request_head_is_checked_like_the_request_and_keeps_only_its_output_ids():
    """What the daemon refuses unread (a connection past --max-inflight) is decoded only this far: its
    header checked as always, its arguments left as sent except the ids its outputs would have had."""
    frames = encode_request(9, "op", {"op": "add", "args": [torch.ones(3), 1], "kwargs": {}, "out": [41]})
    head = decode_request_head(frames, LIMITS)
    assert (head.id, head.cmd, head.client, head.args) == (9, "op", None, {"out": [41]})
    assert head.nbytes == decode_request(frames, LIMITS).nbytes == 12
    for bad in ([msgpack.packb({"v": 1, "id": 3, "cmd": "nonsense", "args": {}})],
                [msgpack.packb({"v": 9, "id": 3, "cmd": "op", "args": {}})],
                [msgpack.packb({"v": 1, "id": 3, "cmd": "op", "args": [], "x": 1})]):
        with pytest.raises(ProtocolError) as head_error:
            decode_request_head(bad, LIMITS)
        with pytest.raises(ProtocolError) as full_error:
            decode_request(bad, LIMITS)
        assert str(head_error.value) == str(full_error.value)
    # output ids a full decode refuses are not kept (a refusal marks the ids it keeps as failed)
    bad_ids = [msgpack.packb({"v": 1, "id": 4, "cmd": "store", "args": {"out": list(range(-5, 100)), "value": 1}})]
    with pytest.raises(ProtocolError):
        decode_request(bad_ids, LIMITS)
    assert decode_request_head(bad_ids, LIMITS).args == {}


def test_a_sender_checks_its_message_against_the_limits_its_peer_reads():
    """A peer stops reading a message over its limits before it knows which request the message asks or
    answers, so it can name none in its error; each side checks what it sends (``check_message``): a
    client's request that waited for ever, a daemon's reply of 4,800 tensors that dropped the connection."""
    from fedzmq.codec import check_message, encode_reply

    limits = Limits(max_frames=8, max_items=64)
    check_message(encode_reply(1, {"state": {f"p{i}": torch.ones(1) for i in range(8)}}), limits)
    with pytest.raises(ProtocolError, match="9 frames"):
        check_message(encode_reply(1, {"state": {f"p{i}": torch.ones(1) for i in range(9)}}), limits)
    with pytest.raises(ProtocolError, match="values"):
        check_message(encode_reply(1, {"ids": [[i] * 10 for i in range(20)]}), limits)
    with pytest.raises(ProtocolError, match="header of"):
        check_message(encode_reply(1, "x" * 5000), Limits(max_header_bytes=4096))
