"""Model entries a reply reported as streams and the client has yet to read: kept as they were.

A model's state that does not fit one message comes back as its small entries and a ``StreamInfo`` for
each big one, whose bytes the client then reads in pieces (``module_read``). Those reads run after
whatever the session sent meanwhile, so another coroutine's load, fit or optimizer step on the same model
would show through: half an entry old and half new, where the same code run in order reads the state
as it was. So each ``StreamInfo`` names a kept read (its ``stream``). Until the read's last byte has
been read, a command about to write that entry (``Command.writes``) first copies it, charged to the
session like any object, and the read's pieces come from the copy. Without such a write nothing is
copied: the pieces are read from the model itself, as before.

A read the client gives up is ended by a read of nothing at its end (``offset == nbytes``); at most
``MAX_KEPT`` are kept per session (the oldest go first); a deleted model's are dropped.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .. import budget
from ..errors import BadRequest
from .cost import check_work, element_work
from .quota import Quota
from .taint import storage_key

#: kept reads per session: an honest client reads each at once, so only a client that never reads
#: reaches this, and loses its oldest
MAX_KEPT = 1024
#: the work (``fedzmq.worker.cost``) of one entry's copy besides its elements: the torch call and the
#: Python around it, about 20 us (a model of 2,000 one-element entries is 2,000 copies)
COPY_CALL_WORK = 40_000


@dataclass
class KeptRead:
    """One streamed entry of one reply."""

    token: int
    obj_id: int
    #: the entry's place in its model's ``state_dict``. Not its name: ``state_dict`` makes its names
    #: anew on every call, and a red team kept 1,024 copies of a 1.5 MiB one per session, uncharged
    index: int
    nbytes: int
    #: the entry's storage when it was reported: a write to it copies the entry first
    storage: int
    module: "weakref.ref[nn.Module]"
    #: the entry's bytes as they were, once a write made a copy necessary (flat uint8)
    copy: torch.Tensor | None = None


class KeptReads:
    """A session's kept reads, by the token their ``StreamInfo`` carries. Its commands run one at a time,
    but the session can end (``clear``) on the event loop while one runs on a torch thread: a lock."""

    def __init__(self, quota: Quota) -> None:
        self._quota = quota
        self._reads: OrderedDict[int, KeptRead] = OrderedDict()
        self._next = 1
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._reads)

    def report(self, obj_id: int, module: nn.Module, index: int, tensor: torch.Tensor) -> int:
        """Keep a read of ``module``'s entry number ``index`` of its ``state_dict`` (``tensor``) as it is
        now; returns its token."""
        with self._lock:
            token, self._next = self._next, self._next + 1
            self._reads[token] = KeptRead(token, obj_id, index, tensor.numel() * tensor.element_size(),
                                          storage_key(tensor.untyped_storage()), weakref.ref(module))
            while len(self._reads) > MAX_KEPT:
                self._end(next(iter(self._reads)))
        return token

    def read(self, token: int, obj_id: int, module: nn.Module, name: str) -> KeptRead:
        """The kept read ``token`` of entry ``name`` of object ``obj_id`` (``module``); ``BadRequest`` if
        there is none."""
        with self._lock:
            kept = self._reads.get(token)
        names = list(module.state_dict()) if kept is not None and kept.obj_id == obj_id else []
        if kept is None or kept.index >= len(names) or names[kept.index] != name:
            raise BadRequest.new(f"no read of {name!r} of object {obj_id} is kept under stream {token}: it was read "
                                 f"to its end, its model was deleted, or more than {MAX_KEPT} reads came after it")
        return kept

    def end(self, token: int) -> None:
        """The read's last byte was read (or the client gave it up): its copy, if any, is let go."""
        with self._lock:
            self._end(token)

    def keep_before_write(self, tensors: Iterable[torch.Tensor], seconds: float) -> None:
        """Copy every kept entry whose storage is among ``tensors``' (what a command may write), before it
        writes. ``LimitExceeded`` (nothing written yet) when the copies do not fit the session's quota or
        the command's time. Run under the command's budget and reservation (``Executor``), so a copy
        stops at a small fit's deadline and is checked beside what the command is about to make. Reads of
        one entry not copied yet all saw its value since the last write to it: they share one copy,
        charged once (the quota charges by storage)."""
        written = {storage_key(t.untyped_storage()) for t in tensors if t.layout == torch.strided}
        entries: dict[tuple[int, int, int], list[KeptRead]] = {}
        with self._lock:
            for kept in self._reads.values():
                if kept.copy is None and kept.storage in written:
                    entries.setdefault((kept.obj_id, kept.index, kept.storage), []).append(kept)
        states: dict[int, list[torch.Tensor]] = {}  # each model's entries, listed once (not once per read)
        lives = []
        for (obj_id, index, _), reads in entries.items():
            module = reads[0].module()
            if module is None:  # (its model was deleted: ``forget`` drops such reads)
                continue
            if obj_id not in states:
                states[obj_id] = list(module.state_dict().values())
            if index < len(states[obj_id]):
                lives.append((states[obj_id][index], reads))
        if not lives:
            return
        what = f"keeping {len(lives)} model entries as a read in progress saw them"
        check_work(sum(element_work(live) + COPY_CALL_WORK for live, _ in lives), seconds, what)
        self._quota.check(sum(reads[0].nbytes for _, reads in lives), what)
        for live, reads in lives:  # (outside the lock: the session's end must not wait for a copy)
            budget.check()  # (on the event loop, a small fit's deadline)
            copy = live.detach().clone(memory_format=torch.contiguous_format).view(-1).view(torch.uint8)
            with self._lock:
                for kept in reads:
                    if self._reads.get(kept.token) is kept:  # (not ended meanwhile)
                        kept.copy = copy
                        self._quota.hold(("kept", kept.token), [copy])

    def forget(self, obj_ids: Iterable[int]) -> None:
        """Objects were deleted: their reads end (a late read of one is refused, clearly)."""
        gone = set(obj_ids)
        with self._lock:
            for token in [t for t, kept in self._reads.items() if kept.obj_id in gone]:
                self._end(token)

    def clear(self) -> list[torch.Tensor]:
        """The session ended: every read ends. Returns the copies, to be let go off the event loop."""
        with self._lock:
            copies = [kept.copy for kept in self._reads.values() if kept.copy is not None]
            self._reads.clear()
        return copies

    def _end(self, token: int) -> None:
        kept = self._reads.pop(token, None)
        if kept is not None and kept.copy is not None:
            self._quota.drop(("kept", token))


__all__ = ["MAX_KEPT", "KeptRead", "KeptReads"]
