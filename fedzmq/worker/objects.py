"""A session's objects: what an id names, of which kind, and what a failed command left in its place.

Objects belong to the session that made them: ids are looked up only in the session's own table, so
another session can neither read, use nor delete them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BadRequest, LimitExceeded, ObjectNotFound, RemoteError


#: failures a session remembers, the oldest forgotten first (a later use of a forgotten one is told only
#: that the object does not exist), each with its error's type and the first ``FAILURE_MESSAGE_CHARS`` of
#: its message, no traceback (the failed command's own reply had them whole). They are not charged to
#: the session's quota, so they must stay small: a red team's 100,000 failed reshapes, each with 1.8 KB
#: of torch's words and a traceback, had held 280 MB of a daemon under a 16 MiB quota
FAILURES_KEPT = 4096
FAILURE_MESSAGE_CHARS = 300


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
class HostedModule:
    """A model a client sent: the module, and the description it was built from (to size its forward on
    the meta device)."""

    module: nn.Module
    spec: dict[str, Any]
    #: a digest of ``spec``: the worker's cache of forward footprints is keyed by it (made on first use)
    spec_digest: bytes | None = None
    #: the same module rebuilt on the meta device, for measuring (made on first use)
    meta: nn.Module | None = None
    #: samples the module was last trained on by ``fit`` (a secure round's weight comes from here)
    trained_samples: int = 0
    #: a digest of the arguments (``fedzmq.worker.executor.fit_key``) and CPU seconds of its last ``fit`` of
    #: given steps: a fit may run on the event loop only when the same fit was measured fast (``small_fit``)
    last_fit: tuple[bytes, float] | None = None
    #: whether its forward may draw from torch's default generator (``fedzmq.modeldesc.draws_random``; found on
    #: first use: a built module's layers do not change)
    draws: bool | None = None


@dataclass
class HostedOptimizer:
    """An optimizer over a hosted module's parameters, with its state."""

    optimizer: torch.optim.Optimizer
    module_id: int


KINDS = {"tensor": torch.Tensor, "gradient": torch.Tensor, "module": HostedModule, "optimizer": HostedOptimizer,
         "partial": PartialTensor}


def kind_name(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, HostedModule):
        return "module"
    if isinstance(value, HostedOptimizer):
        return "optimizer"
    if isinstance(value, PartialTensor):
        return "stream"
    return type(value).__name__


class ObjectTable:
    """Ids to objects, and ids whose command failed (at most ``max_objects`` of each)."""

    def __init__(self, max_objects: int) -> None:
        self.max_objects = max_objects
        self.objects: dict[int, Any] = {}
        self.failures: dict[int, FailedObject] = {}

    def __len__(self) -> int:
        return len(self.objects)

    def get(self, obj_id: int, kind: str | None = None) -> Any:
        """The object ``obj_id`` names, of ``kind`` if given; the first failure if its command failed."""
        value = self.objects.get(obj_id)
        if value is None:
            failed = self.failures.get(obj_id)
            if failed is not None:
                # report the first failure under its own type, so `except RuntimeError:` still works
                raise DependencyError(obj_id, failed.error)
            raise ObjectNotFound.new(f"object {obj_id} does not exist in this session")
        if kind is None:
            if isinstance(value, PartialTensor):
                raise BadRequest.new(f"object {obj_id} is still being streamed in ({value.written} bytes so far)")
            return value
        if not isinstance(value, KINDS[kind]):
            if isinstance(value, PartialTensor):
                raise BadRequest.new(f"object {obj_id} is still being streamed in ({value.written} bytes so far)")
            raise BadRequest.new(f"object {obj_id} is a {kind_name(value)}, not a {kind}")
        return value

    def check_new(self, obj_id: int) -> None:
        if obj_id in self.objects:
            raise BadRequest.new(f"object id {obj_id} is already in use in this session")
        if len(self.objects) >= self.max_objects:
            raise LimitExceeded.new(f"this session holds {len(self.objects)} objects, the worker's limit "
                                    f"(--max-objects {self.max_objects}); delete some first")

    def add(self, obj_id: int, value: Any) -> None:
        self.failures.pop(obj_id, None)
        self.objects[obj_id] = value

    def replace(self, obj_id: int, value: Any) -> None:
        """Swap an object for its finished form (a completed stream)."""
        self.objects[obj_id] = value

    def fail(self, obj_id: int, error: dict[str, str]) -> None:
        """Remember that ``obj_id`` was never made, with its error's type and the start of its message
        (the oldest failures go first past ``FAILURES_KEPT``)."""
        if obj_id in self.objects:
            return
        self.failures[obj_id] = FailedObject({"type": error["type"],
                                              "message": error["message"][:FAILURE_MESSAGE_CHARS]})
        while len(self.failures) > min(self.max_objects, FAILURES_KEPT):
            self.failures.pop(next(iter(self.failures)))

    def pop(self, obj_id: int) -> bool:
        """Forget ``obj_id`` (object or failure); True if it was there."""
        return self.objects.pop(obj_id, None) is not None or self.failures.pop(obj_id, None) is not None

    def optimizers_over(self, module_ids: set[int]) -> list[int]:
        return [i for i, v in self.objects.items() if isinstance(v, HostedOptimizer) and v.module_id in module_ids]

    def clear(self) -> None:
        self.objects.clear()
        self.failures.clear()


def costly_to_free(value: Any) -> bool:
    """Whether freeing ``value`` is work worth a torch thread: a model or an optimizer (an optimizer over
    2,000 one-element parameters holds 4,000 state tensors and their dicts: 256 of them held the event
    loop 0.75 s as a delete freed them), or a tensor with an autograd graph (a million nodes, freed with
    the last tensor that leads to them)."""
    if isinstance(value, (HostedModule, HostedOptimizer)):
        return True
    return isinstance(value, torch.Tensor) and value.grad_fn is not None


def tensors_of(value: Any) -> list[torch.Tensor]:
    """The tensors an object's data lives in: a tensor (or a stream), a module's parameters and buffers.
    An optimizer's state is charged by size instead (``extra_bytes``), as it grows."""
    if isinstance(value, PartialTensor):
        return [value.tensor]
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, HostedModule):
        return list(value.module.state_dict().values())
    return []


#: what a hosted model's Python objects take per submodule beside its tensors: the ``nn.Module`` and its
#: twin on the meta device that sizes its forwards (2.6 KB measured for a ReLU), rounded up. Uncharged, 40
#: models of 2,000 ReLUs each had held 208 MiB under a 16 MiB quota (a red team's find)
BYTES_PER_SUBMODULE = 4096
#: what a value of a kept model description takes beside a string's characters
BYTES_PER_DESCRIPTION_VALUE = 64


def description_bytes(value: Any) -> int:
    """About what a model description (plain data, its values capped by the codec) takes in memory."""
    if isinstance(value, str):
        return BYTES_PER_DESCRIPTION_VALUE + len(value)
    if isinstance(value, dict):
        return BYTES_PER_DESCRIPTION_VALUE + sum(description_bytes(k) + description_bytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return BYTES_PER_DESCRIPTION_VALUE + sum(description_bytes(v) for v in value)
    return BYTES_PER_DESCRIPTION_VALUE


#: what an optimizer's Python objects take per parameter it steps, beside its state's storages: the state's
#: dict and tensor objects (Adagrad's two: 1.6 KB measured for a one-element parameter), rounded up.
#: Uncharged, 800 Adagrads over 1,800 one-element parameters had held 2.2 GiB under a 16 MiB quota
BYTES_PER_OPTIMIZED_PARAMETER = 2048


def optimized_parameters(optimizer: Any) -> int:
    """How many parameters ``optimizer``'s groups list."""
    return sum(len(group["params"]) for group in optimizer.param_groups)


def extra_bytes(value: Any) -> int:
    """What an object is charged besides its storages and its gradients' room (``gradient_rooms``): an
    optimizer's state, a model's Python objects and the description it keeps."""
    if isinstance(value, HostedModule):
        return BYTES_PER_SUBMODULE * sum(1 for _ in value.module.modules()) + description_bytes(value.spec)
    if isinstance(value, HostedOptimizer):  # its state (momentum, moments); the parameters are the module's
        return sum(t.untyped_storage().nbytes() for t in optimizer_state(value.optimizer)) + \
            BYTES_PER_OPTIMIZED_PARAMETER * optimized_parameters(value.optimizer)
    return 0


def gradient_rooms(value: Any) -> list[torch.Tensor]:
    """The leaves whose gradients (to come) an object is charged room for, by leaf
    (``fedzmq.worker.quota.gradient_key``): a graph that reaches them keeps the same room."""
    if isinstance(value, torch.Tensor):
        return [value] if value.requires_grad and value.is_leaf else []
    if isinstance(value, HostedModule):
        return list(value.module.parameters())
    if isinstance(value, PartialTensor) and value.requires_grad:
        return [value.tensor]
    return []


def optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """An optimizer's state tensors. list() copies each dict in one step under the GIL: ``status`` runs
    on the event loop while a step may be adding state on a torch thread."""
    return [t for state in list(optimizer.state.values()) for t in list(state.values())
            if isinstance(t, torch.Tensor)]


def module_tensors(module: nn.Module, grads: bool = True) -> list[torch.Tensor]:
    """A module's parameters and buffers, and their gradients: every tensor a command on it may write."""
    tensors = list(module.state_dict(keep_vars=True).values())
    if grads:
        tensors += [p.grad for p in module.parameters() if p.grad is not None]
    return tensors


__all__ = ["DependencyError", "FailedObject", "HostedModule", "HostedOptimizer", "ObjectTable", "PartialTensor",
           "costly_to_free", "extra_bytes", "gradient_rooms", "kind_name", "module_tensors", "optimized_parameters",
           "optimizer_state", "tensors_of", "BYTES_PER_OPTIMIZED_PARAMETER"]
