"""``Broadcast``: a model state encoded once, to load into many workers' copies of a model."""

from __future__ import annotations

from typing import Mapping

import torch

from ..codec import Encoded


class Broadcast:
    """A model state to load into many workers' copies of a model (a federated round's global weights),
    encoded once: the entries that fit one message travel inline, their msgpack and frames shared by
    every send; bigger ones are streamed to each worker before its fit. Its tensors' memory is sent
    without copying, so the state must not change until the round's sends are done."""

    __slots__ = ("state", "chunk_bytes", "inline", "streamed")

    def __init__(self, state: Mapping[str, torch.Tensor], chunk_bytes: int = 128 << 20) -> None:
        self.state = {name: tensor.detach() for name, tensor in state.items()}
        self.chunk_bytes = chunk_bytes
        inline, budget = {}, chunk_bytes
        for name, tensor in self.state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes <= budget and tensor.is_contiguous():
                inline[name] = tensor
                budget -= nbytes
        self.streamed = {k: v for k, v in self.state.items() if k not in inline}
        self.inline = Encoded(inline)

    def for_chunk(self, chunk_bytes: int) -> "Broadcast":
        """This broadcast split for a worker whose messages are at most ``chunk_bytes`` (the same one when
        it agrees)."""
        return self if chunk_bytes == self.chunk_bytes else Broadcast(self.state, chunk_bytes)
