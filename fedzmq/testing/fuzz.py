"""Hostile messages for fuzzing a worker daemon: valid requests of every command, then mutated.

Used by the CI fuzz test (through hypothesis strategies) and by ``scripts/fuzz_campaign.py`` (through
a seeded ``random.Random``, for long runs). Every mutation keeps the message a list of byte frames, so
it can be sent as is with a DEALER socket; each must get exactly one reply, and the daemon must
survive all of them.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import msgpack
import torch

from ..codec import encode_request


def _frames(frames: list[Any]) -> list[bytes]:
    return [bytes(f) for f in frames]


def valid_messages() -> list[list[bytes]]:
    """One well-formed request of (nearly) every command, with small arguments."""
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    spec = {"kind": "layer", "type": "Linear", "kwargs": {"in_features": 3, "out_features": 1, "bias": True}}
    state = {"weight": torch.zeros(1, 3), "bias": torch.zeros(1)}
    requests: list[tuple[str, dict[str, Any]]] = [
        ("ping", {}), ("heartbeat", {}), ("status", {}), ("datasets", {"query": "x"}),
        ("store", {"out": 1, "value": t}), ("get", {"obj": 1}), ("info", {"obj": 1}), ("delete", {"objs": [1, 2]}),
        ("alloc", {"out": 3, "dtype": "float32", "shape": [4, 4]}),
        ("write", {"obj": 3, "offset": 0, "data": torch.zeros(16, dtype=torch.uint8)}),
        ("read", {"obj": 1, "offset": 0, "length": 8}),
        ("op", {"op": "add", "args": [t, 1.5], "kwargs": {}, "out": [4]}),
        ("op", {"op": "getitem", "args": [t, (0, slice(0, 2))], "kwargs": {}, "out": [5]}),
        ("backward", {"obj": 4}),
        ("module_put", {"out": 6, "spec": spec, "state": state}),
        ("module_call", {"obj": 6, "args": [t], "kwargs": {}, "out": [7]}),
        ("module_state", {"obj": 6}), ("module_mode", {"obj": 6, "train": False}),
        ("optim_create", {"out": 8, "cls": "SGD", "module": 6, "groups": [{"params": [0, 1], "lr": 0.1}]}),
        ("optim_zero_grad", {"obj": 8}), ("optim_step", {"obj": 8}),
        ("fit", {"module": 6, "dataset": "d", "loss": "mse_loss", "batch_size": 2, "optimizer": {"cls": "SGD"}}),
        ("evaluate", {"module": 6, "dataset": "d", "loss": "mse_loss"}),
        ("dataset_tensor", {"dataset": "d", "part": "features", "out": 9}),
    ]
    return [_frames(encode_request(i + 1, cmd, dict(args))) for i, (cmd, args) in enumerate(requests)]


HEADER_FIELDS = ("v", "id", "cmd", "args")
ODD_VALUES: list[Any] = [None, True, -1, 2**63, -(2**63), 1.5, math.nan, math.inf, -math.inf, "", "x" * 300,
                         b"\x00\xff", [], {}, [[[[]]]], {"$tensor": 1}, {"$ref": "a"}, {"$tuple": 5},
                         {"$slice": [1, 2]}, {"$dtype": ["x"]}, {"$stream": [1, 2, 3, 4]}, {"$node": -1}]


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


class Mutator:
    """Applies one named mutation to a valid message, drawing its parameters from ``rng``."""

    def __init__(self, rng: random.Random, bases: list[list[bytes]] | None = None) -> None:
        self.rng = rng
        self.bases = bases or valid_messages()
        self.mutations: dict[str, Callable[[list[bytes]], list[bytes]]] = {
            "bit_flips": self.bit_flips, "truncate": self.truncate, "swap_frames": self.swap_frames,
            "drop_frame": self.drop_frame, "extra_frame": self.extra_frame, "huge_shape": self.huge_shape,
            "deep_nesting": self.deep_nesting, "nan_inf": self.nan_inf, "wrong_type": self.wrong_type,
            "random_bytes": self.random_bytes, "valid": lambda m: m,
        }

    def message(self) -> tuple[str, list[bytes]]:
        name = self.rng.choice(sorted(self.mutations))
        base = [bytes(f) for f in self.rng.choice(self.bases)]
        return name, self.mutations[name](base)

    def _header(self, message: list[bytes]) -> dict[str, Any]:
        return msgpack.unpackb(message[0], raw=False)

    def bit_flips(self, message: list[bytes]) -> list[bytes]:
        index = self.rng.randrange(len(message))
        frame = bytearray(message[index]) or bytearray(b"\x00")
        for _ in range(self.rng.randint(1, 8)):
            position = self.rng.randrange(len(frame))
            frame[position] ^= 1 << self.rng.randrange(8)
        message[index] = bytes(frame)
        return message

    def truncate(self, message: list[bytes]) -> list[bytes]:
        index = self.rng.randrange(len(message))
        message[index] = message[index][: self.rng.randrange(max(1, len(message[index])))]
        return message

    def swap_frames(self, message: list[bytes]) -> list[bytes]:
        if len(message) > 1:
            i, j = self.rng.sample(range(len(message)), 2)
            message[i], message[j] = message[j], message[i]
        else:
            message.append(message[0])
        return message

    def drop_frame(self, message: list[bytes]) -> list[bytes]:
        return message[:-1] if len(message) > 1 else [b""]

    def extra_frame(self, message: list[bytes]) -> list[bytes]:
        return [*message, self.rng.randbytes(self.rng.randrange(64))]

    def huge_shape(self, message: list[bytes]) -> list[bytes]:
        header = self._header(message)
        big = [self.rng.choice([2**31, 2**40, 2**62, 10**12]) for _ in range(self.rng.randint(1, 3))]
        header["args"] = {"out": 1, "value": {"$tensor": ["float32", big, 1, False]}}
        header["cmd"] = "store"
        if self.rng.random() < 0.5:
            header["cmd"], header["args"] = "alloc", {"out": 2, "dtype": "float64", "shape": big}
        return [msgpack.packb(header), *message[1:2]]

    def deep_nesting(self, message: list[bytes]) -> list[bytes]:
        header = self._header(message)
        header["args"] = {"op": "neg", "args": [_deep(self.rng.randint(30, 400))], "kwargs": {}, "out": [1]}
        header["cmd"] = "op"
        return [msgpack.packb(header)]

    def nan_inf(self, message: list[bytes]) -> list[bytes]:
        header = self._header(message)
        odd = self.rng.choice([math.nan, math.inf, -math.inf, 1e308])
        if isinstance(header.get("args"), dict) and header["args"]:
            key = self.rng.choice(sorted(header["args"]))
            header["args"][key] = odd
        else:
            header["args"] = {"seconds": odd}
        return [msgpack.packb(header), *message[1:]]

    def wrong_type(self, message: list[bytes]) -> list[bytes]:
        header = self._header(message)
        field = self.rng.choice(HEADER_FIELDS + ("args.*",))
        value = self.rng.choice(ODD_VALUES)
        if field == "args.*" and isinstance(header.get("args"), dict) and header["args"]:
            header["args"][self.rng.choice(sorted(header["args"]))] = value
        else:
            header[field if field != "args.*" else "args"] = value
        return [msgpack.packb(header, use_bin_type=True), *message[1:]]

    def random_bytes(self, message: list[bytes]) -> list[bytes]:
        return [self.rng.randbytes(self.rng.randrange(1, 200)) for _ in range(self.rng.randint(1, 3))]
