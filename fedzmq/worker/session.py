"""A client session's objects on the worker.

Objects belong to the session that made them: ids are looked up only in the session's own table,
so another session can neither read, use nor delete them. Ending a session frees everything in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..codec import Request
from ..errors import BadRequest, LimitExceeded, ObjectNotFound, PermissionDenied, RemoteError


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
    #: the CurveZMQ public key the session authenticated with (None without keys)
    user: str | None = None
    max_objects: int = 100_000
    max_bytes: int = 8 << 30
    objects: dict[int, Any] = field(default_factory=dict)
    #: ids whose command failed, with the failure (reported by later uses of the id)
    failures: dict[int, FailedObject] = field(default_factory=dict)
    #: ids of objects computed from private data, and those among them the policy lets ``get`` release
    private: set[int] = field(default_factory=set)
    releasable: set[int] = field(default_factory=set)
    #: Memory is charged by storage, once however many holders share it: a view costs nothing more
    #: than what it views, and keeps it alive. Holders are objects (a tensor, a module's parameters)
    #: and tensors autograd saved for a backward pass. Each object's storages, and each storage's
    #: [holders, bytes]:
    object_storages: dict[int, list[int]] = field(default_factory=dict)
    storage_users: dict[int, list[int]] = field(default_factory=dict)
    #: bytes charged to an object besides its storages: room for gradients, an optimizer's state
    sizes: dict[int, int] = field(default_factory=dict)
    nbytes_held: int = 0
    #: guards the counts above: a graph, and the saved tensors it releases, can be freed on the event
    #: loop or on a worker thread (reentrant: freeing an object inside ``delete`` can free a graph)
    counts_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    #: bytes of requests waiting in the queue: charged to the quota until they run
    nbytes_queued: int = 0
    #: room promised to state a running command will make (``reserving``), by holder
    reservations: dict[object, int] = field(default_factory=dict)
    #: secure-aggregation rounds under way (fedzmq.worker.secure)
    secure_rounds: dict[int, Any] = field(default_factory=dict)
    #: samples each module was last trained on by ``fit`` (a secure round's weight comes from here)
    trained_samples: dict[int, int] = field(default_factory=dict)
    queue: asyncio.Queue[Request | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    last_seen: float = field(default_factory=time.monotonic)
    #: the id of the request being worked on, if any (reported in heartbeats)
    running: int | None = None
    #: the highest request id this session finished (heartbeats report it, so a client can tell a
    #: reply lost in a reconnect from one still to come)
    last_done: int = 0
    #: this session's identity: a client that sees it change knows its objects are gone
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    @property
    def idle(self) -> bool:
        return self.running is None and self.queue.empty()

    # --- lookups -------------------------------------------------------------------------------

    def lookup(self, obj_id: int) -> Any:
        value = self.objects.get(obj_id)
        if value is None:
            value = self.failures.get(obj_id)
        if value is None:
            raise ObjectNotFound.new(f"object {obj_id} does not exist in this session")
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

    def put(self, obj_id: int, value: Any, private: bool = False, releasable: bool = False) -> None:
        """Store an object, within the session's object and byte quotas."""
        if obj_id in self.objects:
            raise BadRequest.new(f"object id {obj_id} is already in use in this session")
        if len(self.objects) >= self.max_objects:
            raise LimitExceeded.new(f"this session holds {len(self.objects)} objects, the worker's limit "
                                    f"(--max-objects {self.max_objects}); delete some first")
        storages = {storage_key(st): st.nbytes() for st in _storages_of(value)}
        extra = object_nbytes(value)
        self.check_room(extra + sum(n for k, n in storages.items() if k not in self.storage_users),
                        f"storing object {obj_id}")
        self.failures.pop(obj_id, None)
        with self.counts_lock:
            self.objects[obj_id] = value
            for key, nbytes in storages.items():
                self.hold(key, nbytes)
            self.object_storages[obj_id] = list(storages)
            self.sizes[obj_id] = extra
            self.nbytes_held += extra
        if private:
            self.private.add(obj_id)
            if releasable:
                self.releasable.add(obj_id)

    def hold(self, key: int, nbytes: int) -> None:
        """One more holder of a storage; its bytes are charged with the first (see ``storage_users``)."""
        with self.counts_lock:
            users = self.storage_users.get(key)
            if users is None:
                self.storage_users[key] = [1, nbytes]
                self.nbytes_held += nbytes
            else:
                users[0] += 1

    def release(self, key: int) -> None:
        """One holder fewer; the storage's bytes are uncharged with the last (it is freed then)."""
        with self.counts_lock:
            users = self.storage_users.get(key)
            if users is None:  # the session was cleared meanwhile
                return
            users[0] -= 1
            if users[0] == 0:
                del self.storage_users[key]
                self.nbytes_held -= users[1]

    @contextlib.contextmanager
    def charging_saved_tensors(self) -> Iterator[None]:
        """Charge what autograd saves for a backward pass while the block runs (an op or a forward on
        tensors that require gradients): the inputs and intermediates it keeps (a softmax's output, a
        dropout mask) live as long as the graph does, after the operands themselves are deleted. A
        saved tensor over the quota fails the command with ``LimitExceeded``."""
        def pack(tensor: torch.Tensor) -> _SavedTensor:
            return _SavedTensor(self, tensor)

        with torch.autograd.graph.saved_tensors_hooks(pack, _SavedTensor.unpack):
            try:
                yield
            except BaseException as exc:
                # the failed command's frames hold its half-built graph, and the traceback travels on
                # through futures: free the graph, and uncharge what it saved, now
                traceback.clear_frames(exc.__traceback__)
                raise

    @contextlib.contextmanager
    def reserving(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` against the quota while the block runs: room for state a command will make
        (a fit's optimizer state), so that what else the block charges is checked beside it."""
        token = object()
        self.reservations[token] = nbytes
        try:
            yield
        finally:
            self.reservations.pop(token, None)

    def recount(self, obj_id: int) -> None:
        """Count an object's bytes again after it grew in place (an optimizer's state after a step)."""
        value = self.objects.get(obj_id)
        if value is None:  # the session was cleared meanwhile
            return
        size = object_nbytes(value)
        with self.counts_lock:
            self.nbytes_held += size - self.sizes.get(obj_id, 0)
            self.sizes[obj_id] = size

    def room(self) -> int:
        """Bytes this session may still take: its quota less what it holds, what its waiting requests
        carry and what its running command reserved (the one sum every quota check uses)."""
        return self.max_bytes - self.nbytes_held - self.nbytes_queued - sum(self.reservations.values())

    def check_room(self, nbytes: int, what: str) -> None:
        """Refuse ``what``, needing ``nbytes`` more, if it would pass this session's quota (``room``)."""
        if nbytes > self.room():
            raise LimitExceeded.new(f"{what} needs up to {nbytes} more bytes, which would exceed this session's "
                                    f"quota of {self.max_bytes} bytes (--max-session-bytes); {self.nbytes_held} held")

    def replace(self, obj_id: int, value: Any) -> None:
        """Swap an object for its finished form (a completed stream) without counting it twice."""
        self.objects[obj_id] = value

    def fail(self, obj_id: int, error: dict[str, str]) -> None:
        """Remember that ``obj_id`` was never made. Failures are kept apart from objects (they hold no
        data and do not count against the quota), at most ``max_objects`` of them: the oldest go first."""
        if obj_id in self.objects:
            return
        self.failures[obj_id] = FailedObject(error)
        while len(self.failures) > self.max_objects:
            self.failures.pop(next(iter(self.failures)))

    def delete(self, obj_ids: list[int]) -> int:
        """Delete objects, and with a module the optimizers over it: they would keep its parameters
        alive, uncounted, where no command can reach them."""
        deleted = 0
        modules = {i for i in obj_ids if isinstance(self.objects.get(i), nn.Module)}
        if modules:
            obj_ids = list(obj_ids) + [i for i, v in self.objects.items()
                                       if isinstance(v, RemoteOptimizer) and v.module_id in modules and i not in obj_ids]
        with self.counts_lock:
            for obj_id in obj_ids:
                if self.objects.pop(obj_id, None) is not None or self.failures.pop(obj_id, None) is not None:
                    deleted += 1
                self.nbytes_held -= self.sizes.pop(obj_id, 0)
                for key in self.object_storages.pop(obj_id, ()):
                    self.release(key)
                self.private.discard(obj_id)
                self.releasable.discard(obj_id)
        return deleted

    def clear(self) -> None:
        with self.counts_lock:
            self.objects.clear()
            self.failures.clear()
            self.secure_rounds.clear()
            self.sizes.clear()
            self.object_storages.clear()
            self.storage_users.clear()
            self.private.clear()
            self.releasable.clear()
            self.reservations.clear()
            self.nbytes_held = 0

    def check_release(self, obj_id: int) -> None:
        """Refuse to hand out a value computed from the worker's private data (unless released)."""
        if obj_id in self.private and obj_id not in self.releasable:
            raise PermissionDenied.new(
                f"object {obj_id} was computed from this worker's private data; the data owner's policy "
                "releases only aggregate scalars (losses, sums, means), model parameters and fit/evaluate "
                "metrics")


def object_nbytes(value: Any) -> int:
    """What an object is charged besides its storages (``_storages_of``, charged by ``Session.put``)."""
    if isinstance(value, nn.Module):  # room for the gradients to come
        return sum(p.numel() * p.element_size() for p in value.parameters())
    if isinstance(value, torch.Tensor) and value.requires_grad and value.is_leaf:
        return value.numel() * value.element_size()  # room for its gradient
    if isinstance(value, PartialTensor) and value.requires_grad:
        return value.tensor.numel() * value.tensor.element_size()
    if isinstance(value, RemoteOptimizer):  # its state (momentum, moments); the parameters are the module's
        # list() copies each dict in one step under the GIL: ``status`` runs on the event loop while a
        # step may be adding state on a worker thread
        return sum(t.untyped_storage().nbytes() for state in list(value.optimizer.state.values())
                   for t in list(state.values()) if isinstance(t, torch.Tensor))
    return 0


def storage_key(storage: torch.UntypedStorage) -> int:
    """The identity of a storage, shared by every view of it and by ``detach``; unique while it lives.
    Not ``data_ptr()``: two storages can start at the same address (a numpy array and its column)."""
    return storage._cdata


def _storages_of(value: Any) -> list[torch.UntypedStorage]:
    """The storages an object's data lives in: a tensor's (or a stream's), a module's parameters' and
    buffers'. An optimizer's state is charged by size instead (``object_nbytes``), as it grows."""
    if isinstance(value, PartialTensor):
        return [value.tensor.untyped_storage()]
    if isinstance(value, torch.Tensor):
        return [value.untyped_storage()]
    if isinstance(value, nn.Module):
        return [t.untyped_storage() for t in value.state_dict().values()]
    return []


class _SavedTensor:
    """A tensor autograd saved for a backward pass, held against the session's quota until the graph
    that saved it is freed (after ``backward``, or with the last output that leads to it)."""

    __slots__ = ("tensor", "version", "__weakref__")

    def __init__(self, session: Session, tensor: torch.Tensor) -> None:
        self.version = tensor._version
        if tensor.layout != torch.strided:  # sparse: no single storage to charge (a gradient, never big data)
            self.tensor = tensor.detach()
            return
        storage = tensor.untyped_storage()
        key = storage_key(storage)
        if key not in session.storage_users:
            session.check_room(storage.nbytes(), "a tensor saved for the backward pass")
        session.hold(key, storage.nbytes())
        # detached: an op that saves its own output would otherwise hold its own grad_fn, a cycle
        # through C++ that no garbage collection frees (the graph would live until a backward)
        self.tensor = tensor.detach()
        weakref.finalize(self, session.release, key)

    def unpack(self) -> torch.Tensor:
        """The saved tensor, unless it changed in place since (an optimizer step between a forward and
        its backward): the check autograd makes itself when no hooks are installed."""
        if self.tensor._version != self.version:
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                               f"inplace operation: a tensor of shape {tuple(self.tensor.shape)} is at version "
                               f"{self.tensor._version}, saved at version {self.version}")
        return self.tensor


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, nn.Module):
        return "module"
    if isinstance(value, RemoteOptimizer):
        return "optimizer"
    return type(value).__name__


__all__ = ["DependencyError", "FailedObject", "PartialTensor", "RemoteOptimizer", "Session", "object_nbytes", "storage_key"]
