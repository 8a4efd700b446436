"""Secure-aggregation messages cross fedzmq's codec packed: one frame for the small values, one per
large buffer, and a malformed packing is refused, not guessed at."""

from __future__ import annotations

import pytest
import torch

from fedzmq.codec import Limits, decode_reply, encode_reply
from fedzmq.secagg import wire
from fedzmq.secagg.messages import VERSION, check_message


def test_a_message_of_many_keys_is_one_frame_and_comes_back_equal() -> None:
    msg = {"v": 1, "type": "secagg.keys", "keys": [[i, bytes([i]) * 32, bytes([i + 1]) * 32] for i in range(70)]}
    frames = encode_reply(1, wire.to_codec(msg))
    assert len(frames) <= 3  # header and one packed frame, not 140 tensors
    assert wire.from_codec(decode_reply(frames, Limits()).result) == {**msg, "keys": [list(k) for k in msg["keys"]]}


def test_a_large_buffer_travels_in_its_own_frame_without_a_copy() -> None:
    vector = bytearray(range(256)) * 1024  # 256 KiB, above VIEW_ABOVE
    packed = wire.to_codec({"from": 3, "masked": memoryview(vector)})
    big = packed[wire.BIG_KEY]
    assert len(big) == 1 and big[0].data_ptr() == torch.frombuffer(vector, dtype=torch.uint8).data_ptr()
    back = wire.from_codec(decode_reply(encode_reply(1, packed), Limits()).result)
    assert back["from"] == 3 and back["masked"].readonly and bytes(back["masked"]) == bytes(vector)


@pytest.mark.parametrize("value", [
    {wire.PACKED_KEY: torch.zeros(3, dtype=torch.int32)},
    {wire.PACKED_KEY: torch.frombuffer(bytearray(b"\xd6\x01\x00\x00\x00\x05"), dtype=torch.uint8)},  # ext ref 5
    {wire.PACKED_KEY: torch.frombuffer(bytearray(b"\xd6\x07\x00\x00\x00\x00"), dtype=torch.uint8)},  # ext code 7
    {wire.PACKED_KEY: torch.frombuffer(bytearray(b"\xc0"), dtype=torch.uint8), "other": 1},
])
def test_a_malformed_packing_is_refused(value: dict) -> None:
    with pytest.raises(ValueError):
        wire.from_codec(value)


def test_a_message_missing_one_field_is_refused_naming_that_field_alone() -> None:
    """The refusal says what the peer got wrong: the one missing field, not every field of the message
    (an operator reads it in the round's ``dropped`` reasons)."""
    message = {"v": VERSION, "type": "secagg.shares", "from": 1, "shares": [], "surplus": 0}
    with pytest.raises(ValueError, match=r"missing fields \['b_commit'\], unknown fields \['surplus'\]"):
        check_message(message, "secagg.shares", {"from", "b_commit", "shares"})


def test_a_packed_message_refers_to_each_big_buffer_once_and_holds_few_values():
    """A red team's 7.9 MB of 6-byte references to one big buffer unpacked into a numpy array and two
    views each: 1 GiB on a daemon. A buffer is one value of a message; a message's values are capped."""
    import msgpack
    import torch

    from fedzmq.secagg.wire import BIG_EXT, BIG_KEY, PACKED_KEY, PACKED_MAX_VALUES, from_codec

    ref = msgpack.ExtType(BIG_EXT, (0).to_bytes(4, "big"))
    big = [torch.zeros(1, dtype=torch.uint8)]

    def message(value) -> dict:
        packed = msgpack.packb(value, use_bin_type=True)
        return {PACKED_KEY: torch.frombuffer(bytearray(packed), dtype=torch.uint8), BIG_KEY: big}

    assert bytes(from_codec(message([ref]))[0]) == b"\0"
    with pytest.raises(ValueError, match="malformed"):
        from_codec(message([ref, ref]))
    with pytest.raises(ValueError, match=f"more than {PACKED_MAX_VALUES} values"):
        from_codec(message([[1] * 60_000] * 10))
