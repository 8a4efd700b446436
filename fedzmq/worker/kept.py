"""Model entries a reply reported as streams and the client has yet to read: kept as they were.

A model's state that does not fit one message comes back as its small entries and a ``StreamInfo`` for
each big one, whose bytes the client then reads in pieces (``module_read``). Those reads run after
whatever the session sent meanwhile, so another coroutine's load, fit or optimizer step on the same model
would show through: half an entry old and half new, where the same code run in order reads the state
as it was. So each ``StreamInfo`` names a kept read (its ``stream``). Until the read's last byte has
been read, a command about to write that entry (``Command.writes``) first copies it, charged to the
session like any object, and the read's pieces come from the copy. Without such a write nothing is
copied: the pieces are read from the model itself, as before.

Reads of one entry reported since its last write all see the same bytes, so they share one
``KeptEntry``: a write copies each entry once, however many reads wait on it, and looks only at the
entries not copied yet (at most one per model entry). Each kept read's bookkeeping is charged
``KEPT_READ_BYTES`` (at the most it has kept since it last kept none: its tables do not shrink), and a
session keeps at most ``MAX_KEPT_READS`` (a reply that would pass it is
refused: ending reads one by one, a delete or the session's end, must stay quick). A read the client
gives up is ended by a read of nothing at its end (``offset == nbytes``); deleting the model ends its
reads.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from .. import budget
from ..errors import BadRequest, LimitExceeded
from .cost import check_work, element_work
from .quota import Quota
from .taint import storage_key

#: bytes charged for one kept read's bookkeeping (its token's slots in two dicts and a set; about 200)
KEPT_READ_BYTES = 256
#: kept reads one session may have: dozens of the biggest replies at once (a reply's header holds at
#: most 16,384 values, and a reported entry takes six), and few enough that ending them all, on a
#: delete of their model or at the session's end on the event loop, takes milliseconds
MAX_KEPT_READS = 1 << 16
#: the work (``fedzmq.worker.cost``) of one entry's copy besides its elements: the torch call and the
#: Python around it, about 20 us (a model of 2,000 one-element entries is 2,000 copies)
COPY_CALL_WORK = 40_000
#: the quota holder of the reads' bookkeeping (copies are held under ``("kept", entry number)``)
_BOOKKEEPING = ("kept", "reads")


@dataclass(eq=False)
class KeptEntry:
    """One model entry as the reads reported since its last write saw it."""

    #: this entry's number in its session: its copy's quota holder is ``("kept", key)``
    key: int
    obj_id: int
    #: the entry's place in its model's ``state_dict``. Not its name: ``state_dict`` makes its names
    #: anew on every call, and a red team kept 1,024 copies of a 1.5 MiB one per session, uncharged
    index: int
    nbytes: int
    #: the entry's storage when it was reported: a write to it copies the entry first
    storage: int
    module: "weakref.ref[nn.Module]"
    #: the kept reads that read it
    readers: int = 0
    #: the entry's bytes as they were, once a write made a copy necessary (flat uint8)
    copy: torch.Tensor | None = None


class KeptReads:
    """A session's kept reads, by the token their ``StreamInfo`` carries. Its commands run one at a time,
    but the session can end (``clear``) on the event loop while one runs on a torch thread: a lock."""

    def __init__(self, quota: Quota) -> None:
        self._quota = quota
        self._reads: dict[int, KeptEntry] = {}
        #: the most reads kept since the tables were last made anew: what they take (a dict does not
        #: shrink as it empties), and so what the session is charged for
        self._high_water = 0
        #: the tokens of each model's reads (deleting a model ends them)
        self._by_object: dict[int, set[int]] = {}
        #: the entries reads wait on that no write has copied yet, by (model, entry index)
        self._uncopied: dict[tuple[int, int], KeptEntry] = {}
        self._tokens = itertools.count(1)
        self._keys = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def uncopied(self) -> bool:
        """Whether a write may have entries to copy first."""
        return bool(self._uncopied)

    def report(self, obj_id: int, module: nn.Module, entries: Sequence[tuple[int, torch.Tensor]]) -> list[int]:
        """Keep reads of ``module``'s entries ``(index in its state_dict, tensor)`` as they are now; returns
        their tokens. ``LimitExceeded`` if their bookkeeping does not fit the session's quota."""
        what = f"keeping reads of {len(entries)} model entries"
        self._quota.check(KEPT_READ_BYTES * len(entries), what)
        tokens = []
        with self._lock:
            self._check_count(len(entries), what)
            for index, tensor in entries:
                storage = storage_key(tensor.untyped_storage())
                entry = self._uncopied.get((obj_id, index))
                if entry is None or entry.storage != storage:
                    entry = KeptEntry(next(self._keys), obj_id, index, tensor.numel() * tensor.element_size(),
                                      storage, weakref.ref(module))
                    self._uncopied[(obj_id, index)] = entry
                tokens.append(self._add_read(entry))
            self._charge_bookkeeping()
        return tokens

    def report_made(self, obj_id: int, module: nn.Module, entries: Sequence[tuple[int, torch.Tensor]]) -> list[int]:
        """Keep reads of tensors a command made for its reply, which no model holds (a fit over hosted
        clients: their weighted sums, or each client's trained state), under the indexes of ``module``'s
        entries they stand for. Each is its own copy from the start (no write can change it), charged to
        the session until its read ends. Neither their bytes nor their bookkeeping are checked again: the
        command's reservation (its charge, ``fedzmq.worker.charges.clients``) counted both, and their hold takes
        its place when it ends. A check here stood beside that reservation and beside the holds of the states
        reported before (a fit over hosted clients reports one per client): a round admitted at a tight quota
        trained every client, then failed, its first states left charged under tokens no reply carried (red
        team h30). ``LimitExceeded`` only past ``MAX_KEPT_READS``."""
        what = f"keeping {len(entries)} entries made for the reply until they are read"
        copies = [tensor.detach().contiguous().view(-1).view(torch.uint8) for _, tensor in entries]
        tokens = []
        with self._lock:
            self._check_count(len(entries), what)
            for (index, _), copy in zip(entries, copies):
                entry = KeptEntry(next(self._keys), obj_id, index, copy.numel(), storage_key(copy.untyped_storage()),
                                  weakref.ref(module), copy=copy)
                self._quota.hold(("kept", entry.key), [copy])
                tokens.append(self._add_read(entry))
            self._charge_bookkeeping()
        return tokens

    def _check_count(self, more: int, what: str) -> None:
        if len(self._reads) + more > MAX_KEPT_READS:
            raise LimitExceeded.new(f"{what}: the session keeps {len(self._reads)} reads not made yet, and at most "
                                    f"{MAX_KEPT_READS} (read the entries of the states it was sent, or close them)")

    def _add_read(self, entry: KeptEntry) -> int:
        """One more read of ``entry``: its token."""
        entry.readers += 1
        token = next(self._tokens)
        self._reads[token] = entry
        self._by_object.setdefault(entry.obj_id, set()).add(token)
        self._high_water = max(self._high_water, len(self._reads))
        return token

    def read(self, token: int, obj_id: int, names: list[str], name: str) -> KeptEntry:
        """The entry kept read ``token`` reads, which must be entry ``name`` of object ``obj_id`` (whose
        ``state_dict`` names are ``names``); ``BadRequest`` if there is none."""
        with self._lock:
            entry = self._reads.get(token)
        if entry is None or entry.obj_id != obj_id or entry.index >= len(names) or names[entry.index] != name:
            raise BadRequest.new(f"no read of {name!r} of object {obj_id} is kept under stream {token}: it was read "
                                 "to its end or given up, or its model was deleted")
        return entry

    def end(self, token: int) -> None:
        """The read's last byte was read (or the client gave it up): its entry's copy, if it was the
        entry's last read, is let go."""
        with self._lock:
            self._end(token)
            self._charge_bookkeeping()

    def keep_before_write(self, tensors: Iterable[torch.Tensor], seconds: float) -> None:
        """Copy every kept entry whose storage is among ``tensors``' (what a command may write), before it
        writes. ``LimitExceeded`` (nothing written yet) when the copies do not fit the session's quota or
        the command's time. Run under the command's budget and reservation (``Executor``), so a copy
        stops at a small fit's deadline and is checked beside what the command is about to make."""
        written = {storage_key(t.untyped_storage()) for t in tensors if t.layout == torch.strided}
        with self._lock:
            pending = [entry for entry in self._uncopied.values() if entry.storage in written]
        states: dict[int, list[torch.Tensor]] = {}  # each model's entries, listed once
        lives = []
        for entry in pending:
            module = entry.module()
            if module is None:  # (its model was deleted: ``forget`` ends its reads)
                continue
            if entry.obj_id not in states:
                states[entry.obj_id] = list(module.state_dict().values())
            if entry.index < len(states[entry.obj_id]):
                lives.append((states[entry.obj_id][entry.index], entry))
        if not lives:
            return
        what = f"keeping {len(lives)} model entries as a read in progress saw them"
        check_work(sum(element_work(live) + COPY_CALL_WORK for live, _ in lives), budget.seconds_left(seconds), what)
        self._quota.check(sum(entry.nbytes for _, entry in lives), what)
        for live, entry in lives:  # (outside the lock: the session's end must not wait for a copy)
            budget.check()  # (on the event loop, a small fit's deadline)
            copy = live.detach().clone(memory_format=torch.contiguous_format).view(-1).view(torch.uint8)
            with self._lock:
                if self._uncopied.get((entry.obj_id, entry.index)) is entry:  # (its reads not ended meanwhile)
                    del self._uncopied[(entry.obj_id, entry.index)]
                    entry.copy = copy
                    self._quota.hold(("kept", entry.key), [copy])

    def forget(self, obj_ids: Iterable[int]) -> None:
        """Objects were deleted: their reads end (a late read of one is refused, clearly)."""
        with self._lock:
            for obj_id in obj_ids:
                for token in list(self._by_object.get(obj_id, ())):
                    self._end(token)
            self._charge_bookkeeping()

    def clear(self) -> list[torch.Tensor]:
        """The session ended: every read ends. Returns the copies, to be let go off the event loop."""
        with self._lock:
            copies = list({id(e.copy): e.copy for e in self._reads.values() if e.copy is not None}.values())
            self._reads.clear()
            self._charge_bookkeeping()  # (the tables made anew, their charge back to nothing)
        return copies

    def _end(self, token: int) -> None:
        entry = self._reads.pop(token, None)
        if entry is None:
            return
        tokens = self._by_object[entry.obj_id]
        tokens.discard(token)
        if not tokens:
            del self._by_object[entry.obj_id]
        entry.readers -= 1
        if entry.readers:
            return
        if self._uncopied.get((entry.obj_id, entry.index)) is entry:
            del self._uncopied[(entry.obj_id, entry.index)]
        if entry.copy is not None:
            self._quota.drop(("kept", entry.key))
            entry.copy = None

    def _charge_bookkeeping(self) -> None:
        """Charge the tables at their largest since made; made anew (and so freed) once no read is left."""
        if not self._reads and self._high_water:
            self._reads, self._by_object, self._uncopied, self._high_water = {}, {}, {}, 0
        self._quota.hold(_BOOKKEEPING, [], KEPT_READ_BYTES * self._high_water)


__all__ = ["COPY_CALL_WORK", "KEPT_READ_BYTES", "MAX_KEPT_READS", "KeptEntry", "KeptReads"]
