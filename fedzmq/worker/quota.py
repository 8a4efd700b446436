"""A session's byte quota: one sum of everything the session makes the daemon hold.

``room()`` is the only number every check uses: the quota, less

- what the session's objects hold, charged **by storage**, once however many holders share it (a view
  costs nothing beside what it views, and keeps it alive); holders are objects, the tensors autograd
  saved for a backward pass, which live as long as their graph, and the leaves a stored tensor's graph
  reaches (``fedzmq.worker.graphs``);
- room for the gradients of leaves (a model's parameters, a tensor that requires one), charged like a
  storage: once per leaf, however many holders keep it (its object, the graphs that reach it);
- what objects are charged besides (an optimizer's state, a model's Python objects, a graph's nodes);
- copies of model entries kept for a read in progress (``fedzmq.worker.kept``);
- what the session's waiting requests carry (charged from decoding until they run);
- what a running command reserved for what it is about to make (a forward's intermediates, an
  optimizer's first state);
- reply bytes handed to ZeroMQ that the client has not taken yet (a client that stops reading cannot
  pin replies without limit).
"""

from __future__ import annotations

import contextlib
import threading
import traceback
import weakref
from collections.abc import Hashable, Iterator, Sequence
import torch
import zmq

from ..errors import LimitExceeded
from .taint import storage_key


class Quota:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        #: storage key (or a leaf's ``gradient_key``) -> [holders, bytes]
        self._storages: dict[Hashable, list[int]] = {}
        #: holder (an object id; a kept read's ``("kept", token)``; a graph's ``LeafSet``) -> the storage
        #: keys it holds, and bytes charged to it beside them
        self._holder_storages: dict[Hashable, dict[Hashable, None]] = {}
        self._holder_extra: dict[Hashable, int] = {}
        self.held = 0
        #: bytes of requests waiting in the session's queue
        self.queued = 0
        #: bytes of the request whose command has started and not yet been charged (a session runs one
        #: command at a time): it may wait for a torch thread or the generator's turn, its arguments in
        #: memory all along (``Executor._charge`` hands them over to the command's own accounting)
        self.starting = 0
        #: bytes of the running command's request, from its start to its end: its arguments stay in memory all
        #: along (a fit's ``load``, for the whole fit), after its charge too (``room_for_requests``)
        self.running = 0
        self._reservations: dict[object, int] = {}
        #: reservations under way that already cover what autograd saves (a forward's footprint)
        self._covering_saved = 0
        #: replies ZeroMQ still holds: (tracker, bytes)
        self._unsent: list[tuple[zmq.MessageTracker, int]] = []
        #: while a backward runs (``reading_saved_tensors``): the saved tensors it read
        self.unpacked: list[torch.Tensor] | None = None
        # a graph, and the saved tensors it releases, can be freed on the event loop or on a torch
        # thread (reentrant: releasing an object can free a graph)
        self._lock = threading.RLock()

    # --- the one sum ---------------------------------------------------------------------------

    def room(self) -> int:
        """Bytes the session may still take."""
        return self.max_bytes - self.held - self.queued - self.starting - sum(self._reservations.values()) \
            - self.unsent()

    def room_for_requests(self) -> int:
        """``room()`` for a request arriving while a command runs: the running command's request counts until
        the command ends, not only until its own charge (``starting``), since its arguments stay in memory:
        after it, the next request was taken in beside a running fit's load (twice the quota in memory).
        The command's own checks use ``room()``: what it keeps of its request, it holds and is charged.
        The load takes the room left, never more: a command that declares no charges is not checked beside
        its request (``Executor._charge``), and a room below zero refused even a request carrying no bytes
        (a ``delete``, which only frees; h38)."""
        room = self.room()
        return room - min(self.running - self.starting, max(room, 0))

    def check(self, nbytes: int, what: str) -> None:
        """Refuse ``what``, needing ``nbytes`` more, if it would pass the quota."""
        if nbytes > self.room():
            raise LimitExceeded.new(f"{what} needs up to {nbytes} more bytes, which would exceed this session's "
                                    f"quota of {self.max_bytes} bytes (--max-session-bytes): {self.usage()}")

    def usage(self) -> str:
        """The terms of the one sum, for a refusal's message: a quota that looks mostly free may be taken by
        what running commands reserved or by replies not yet sent (a refusal naming the held bytes alone read
        "0 more would pass" under a quota that looked mostly free, h38)."""
        requests = self.queued + max(self.starting, self.running)
        return (f"{self.held} held, {sum(self._reservations.values())} reserved by commands under way, "
                f"{requests} in requests, {self.unsent()} in replies not sent yet")

    def new_bytes(self, tensors: list[torch.Tensor], gradients: Sequence[torch.Tensor] = (),
                  keyed: Sequence[tuple[Hashable, int]] = ()) -> int:
        """What holding ``tensors``, room for the gradients of ``gradients`` and the ``keyed`` charges would
        add: the bytes of those not held yet."""
        seen: dict[Hashable, int] = dict(keyed)
        for key in seen.keys() & self._storages.keys():
            del seen[key]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            key = storage_key(storage)
            if key not in self._storages:
                seen[key] = storage.nbytes()
        for leaf in gradients:
            room = gradient_key(leaf)
            if room not in self._storages:
                seen[room] = room[-1]
        return sum(seen.values())

    # --- holders -------------------------------------------------------------------------------

    def hold(self, holder: Hashable, tensors: list[torch.Tensor], extra: int = 0,
             gradients: Sequence[torch.Tensor] = (), keyed: Sequence[tuple[Hashable, int]] = ()) -> None:
        """Charge ``holder`` (an object id) for the storages of ``tensors``, room for the gradients of the
        leaves ``gradients``, ``extra`` bytes, and ``keyed``: (key, bytes) charged once whichever holders
        hold the key, like a storage (instead of what it held before, if anything)."""
        with self._lock:
            if holder in self._holder_storages:
                self.drop(holder)
            keys: dict[Hashable, None] = {}  # (a dict: a model's or a graph's thousands of keys, each once)
            for tensor in tensors:
                storage = tensor.untyped_storage()
                key = storage_key(storage)
                if key not in keys:
                    keys[key] = None
                    self._hold_storage(key, storage.nbytes())
            for leaf in gradients:
                room = gradient_key(leaf)
                if room not in keys:
                    keys[room] = None
                    self._hold_storage(room, room[-1])
            for other, nbytes in keyed:
                if other not in keys:
                    keys[other] = None
                    self._hold_storage(other, nbytes)
            self._holder_storages[holder] = keys
            self._holder_extra[holder] = extra
            self.held += extra

    def recharge(self, holder: Hashable, extra: int) -> None:
        """Charge ``holder`` anew for what it holds beside its storages (an optimizer after a step)."""
        with self._lock:
            if holder in self._holder_extra:
                self.held += extra - self._holder_extra[holder]
                self._holder_extra[holder] = extra

    def drop(self, holder: Hashable) -> None:
        """``holder`` is gone: uncharge its extra bytes, and its storages with their last holder."""
        with self._lock:
            self.held -= self._holder_extra.pop(holder, 0)
            for key in self._holder_storages.pop(holder, ()):
                self._release_storage(key)

    def holders_of(self, tensor: torch.Tensor) -> int:
        """How many holders share ``tensor``'s storage (0 when the session does not hold it)."""
        users = self._storages.get(storage_key(tensor.untyped_storage()))
        return users[0] if users else 0

    def _hold_storage(self, key: Hashable, nbytes: int) -> None:
        users = self._storages.get(key)
        if users is None:
            self._storages[key] = [1, nbytes]
            self.held += nbytes
        else:
            users[0] += 1

    def _release_storage(self, key: Hashable) -> None:
        with self._lock:
            users = self._storages.get(key)
            if users is None:  # cleared meanwhile
                return
            users[0] -= 1
            if users[0] == 0:
                del self._storages[key]
                self.held -= users[1]

    # --- what a command is about to make ---------------------------------------------------------

    def reserving(self, nbytes: int, covers_saved: bool = False) -> "Reservation":
        """Hold ``nbytes`` against the quota while the block runs (room for what a command will make),
        so that what else the block charges is checked beside it. A reservation that ``covers_saved``
        (a forward's whole footprint) already counts what autograd saves: saved tensors are then held
        without a check of their own, and stay charged when the reservation ends."""
        return Reservation(self, nbytes, covers_saved)

    @contextlib.contextmanager
    def charging_saved_tensors(self) -> Iterator[None]:
        """Charge what autograd saves for a backward pass while the block runs: the inputs and
        intermediates it keeps live as long as the graph does, after the operands are deleted. A saved
        tensor over the quota fails the command with ``LimitExceeded``."""
        def pack(tensor: torch.Tensor) -> SavedTensor:
            return SavedTensor(self, tensor)

        with torch.autograd.graph.saved_tensors_hooks(pack, SavedTensor.unpack):
            try:
                yield
            except BaseException as exc:
                # the failed command's frames hold its half-built graph, and the traceback travels on
                # through futures: free the graph, and uncharge what it saved, now
                traceback.clear_frames(exc.__traceback__)
                raise

    @contextlib.contextmanager
    def reading_saved_tensors(self, into: list[torch.Tensor]) -> Iterator[None]:
        """Collect into ``into`` the tensors autograd saved that a backward pass reads while the block runs.
        A gradient is computed from them, and they may have changed since the graph saved them without
        autograd noticing: torch's batch-norm kernel writes ``running_var`` without moving its version
        counter, so a graph saved in eval mode backpropagated through the variance a later fit over rows
        wrote, and the gradient left with the label of the graph's root (made before the rows came)."""
        self.unpacked = into
        try:
            yield
        finally:
            self.unpacked = None

    # --- replies in flight -------------------------------------------------------------------------

    def sending(self, tracker: zmq.MessageTracker, nbytes: int) -> None:
        """A reply of ``nbytes`` was handed to ZeroMQ: charged until ZeroMQ has sent it."""
        self._unsent.append((tracker, nbytes))

    def unsent(self) -> int:
        if not self._unsent:
            return 0
        self._unsent = [(t, n) for t, n in self._unsent if not t.done]
        return sum(n for _, n in self._unsent)

    def clear(self) -> None:
        with self._lock:
            self._storages.clear()
            self._holder_storages.clear()
            self._holder_extra.clear()
            self._reservations.clear()
            self.held = 0


def gradient_key(leaf: torch.Tensor) -> tuple[str, int, int, int]:
    """The key of the room for ``leaf``'s gradient among the quota's storages: one per leaf (its storage,
    where in it, its bytes, the last), whichever holder keeps it."""
    nbytes = leaf.numel() * leaf.element_size()
    return ("gradient", storage_key(leaf.untyped_storage()), int(leaf.storage_offset()), nbytes)


class Reservation:
    """``Quota.reserving``'s block: a class, not a generator, as it is entered for every command."""

    __slots__ = ("quota", "nbytes", "covers_saved")

    def __init__(self, quota: Quota, nbytes: int, covers_saved: bool) -> None:
        self.quota, self.nbytes, self.covers_saved = quota, nbytes, covers_saved

    def __enter__(self) -> None:
        self.quota._reservations[self] = self.nbytes
        self.quota._covering_saved += self.covers_saved

    def __exit__(self, *exc: object) -> None:
        self.quota._reservations.pop(self, None)
        self.quota._covering_saved -= self.covers_saved


class SavedTensor:
    """A tensor autograd saved for a backward pass, held against the quota until the graph that saved it
    is freed (after ``backward``, or with the last output that leads to it)."""

    __slots__ = ("tensor", "version", "quota", "__weakref__")

    def __init__(self, quota: Quota, tensor: torch.Tensor) -> None:
        self.version = tensor._version
        self.quota = quota  # (its finalizer below keeps it alive as long anyway)
        if tensor.layout != torch.strided:  # sparse: no single storage to charge (a gradient, never big data)
            self.tensor = tensor.detach()
            return
        storage = tensor.untyped_storage()
        key = storage_key(storage)
        with quota._lock:
            if key not in quota._storages and not quota._covering_saved:
                quota.check(storage.nbytes(), "a tensor saved for the backward pass")
            quota._hold_storage(key, storage.nbytes())
        # detached: an op that saves its own output would otherwise hold its own grad_fn, a cycle
        # through C++ that no garbage collection frees (the graph would live until a backward)
        self.tensor = tensor.detach()
        weakref.finalize(self, quota._release_storage, key)

    def unpack(self) -> torch.Tensor:
        """The saved tensor, unless it changed in place since (an optimizer step between a forward and
        its backward): the check autograd makes itself when no hooks are installed."""
        if self.tensor._version != self.version:
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                               f"inplace operation: a tensor of shape {tuple(self.tensor.shape)} is at version "
                               f"{self.tensor._version}, saved at version {self.version}")
        if self.quota.unpacked is not None and self.tensor.layout == torch.strided:  # a backward's gradients are
            self.quota.unpacked.append(self.tensor)  # computed from it: its label counts (only strided ones have one)
        return self.tensor


__all__ = ["Quota", "SavedTensor", "gradient_key"]
