"""A client session's objects on the worker.

Objects belong to the session that made them: ids are looked up only in the session's own table,
so another session can neither read, use nor delete them. Ending a session frees everything in it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..codec import Request
from ..errors import BadRequest, ObjectNotFound, RemoteError


@dataclass
class FailedObject:
    """Stands where a failed command's output would be, so that later uses report the first failure."""

    error: dict[str, str]


class DependencyError(RemoteError):
    """A command used an object whose own command failed. Carries that first failure (``root``), which
    is what this command's outputs are marked with, so errors do not nest along a chain of pointers."""

    def __init__(self, obj_id: int, root: dict[str, str]) -> None:
        super().__init__(root["type"], f"object {obj_id} was never made because its command failed: "
                         f"{root['message']}", root.get("traceback", ""))
        self.root = root


@dataclass
class PartialTensor:
    """A tensor being streamed in by chunks (``alloc`` then ``write``): unusable until complete."""

    tensor: torch.Tensor
    requires_grad: bool = False
    written: int = 0

    @property
    def flat_bytes(self) -> torch.Tensor:
        return self.tensor.detach().view(-1).view(torch.uint8)


@dataclass
class RemoteOptimizer:
    optimizer: torch.optim.Optimizer
    module_id: int


@dataclass
class Session:
    key: bytes
    objects: dict[int, Any] = field(default_factory=dict)
    queue: asyncio.Queue[Request | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    last_seen: float = field(default_factory=time.monotonic)
    #: the id of the request being worked on, if any (reported in heartbeats)
    running: int | None = None

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    @property
    def idle(self) -> bool:
        return self.running is None and self.queue.empty()

    # --- lookups -------------------------------------------------------------------------------

    def lookup(self, obj_id: int) -> Any:
        try:
            value = self.objects[obj_id]
        except KeyError:
            raise ObjectNotFound.new(f"object {obj_id} does not exist in this session") from None
        if isinstance(value, FailedObject):
            # report the first failure under its own type, so `except RuntimeError:` still works
            raise DependencyError(obj_id, value.error)
        if isinstance(value, PartialTensor):
            raise BadRequest.new(f"object {obj_id} is still being streamed in ({value.written} bytes so far)")
        return value

    def tensor(self, obj_id: int) -> torch.Tensor:
        value = self.lookup(obj_id)
        if not isinstance(value, torch.Tensor):
            raise BadRequest.new(f"object {obj_id} is a {_kind(value)}, not a tensor")
        return value

    def module(self, obj_id: int) -> nn.Module:
        value = self.lookup(obj_id)
        if not isinstance(value, nn.Module):
            raise BadRequest.new(f"object {obj_id} is a {_kind(value)}, not a module")
        return value

    def optimizer(self, obj_id: int) -> RemoteOptimizer:
        value = self.lookup(obj_id)
        if not isinstance(value, RemoteOptimizer):
            raise BadRequest.new(f"object {obj_id} is a {_kind(value)}, not an optimizer")
        return value

    def partial(self, obj_id: int) -> PartialTensor:
        value = self.objects.get(obj_id)
        if not isinstance(value, PartialTensor):
            raise BadRequest.new(f"object {obj_id} is not being streamed in")
        return value

    # --- changes -------------------------------------------------------------------------------

    def put(self, obj_id: int, value: Any) -> None:
        if obj_id in self.objects and not isinstance(self.objects[obj_id], FailedObject):
            raise BadRequest.new(f"object id {obj_id} is already in use in this session")
        self.objects[obj_id] = value

    def fail(self, obj_id: int, error: dict[str, str]) -> None:
        if obj_id not in self.objects:
            self.objects[obj_id] = FailedObject(error)

    def delete(self, obj_ids: list[int]) -> int:
        return sum(self.objects.pop(i, None) is not None for i in obj_ids)

    def clear(self) -> None:
        self.objects.clear()

    def nbytes(self) -> int:
        return sum(object_nbytes(v) for v in list(self.objects.values()))


def object_nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    if isinstance(value, PartialTensor):
        return value.tensor.untyped_storage().nbytes()
    if isinstance(value, nn.Module):
        return sum(t.untyped_storage().nbytes() for t in value.state_dict().values()) + sum(
            p.grad.untyped_storage().nbytes() for p in value.parameters() if p.grad is not None
        )
    return 0


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, nn.Module):
        return "module"
    if isinstance(value, RemoteOptimizer):
        return "optimizer"
    return type(value).__name__


__all__ = ["DependencyError", "FailedObject", "PartialTensor", "RemoteOptimizer", "Session", "object_nbytes"]
