"""What a session's values were computed from, recorded on their storage.

Privacy follows storage, not names or object ids: a view, an in-place write, a parameter updated by
an optimizer step or a buffer updated by a forward pass all share (or change) the bytes of a storage,
so the label lives there. A value's label is the join of the labels of the storages it holds; a write
by a command joins the command's input label into every storage it wrote. Nothing lowers a label but a
load that overwrites a storage whole with a copy of other values (``TaintRecord.replace``): nothing of
what it held is left, so it has their label (a model loaded with a round's global weights is the
global model again, whatever it was trained on before).

Labels (bits; ``PUBLIC`` is none of them):

- ``ROWS``: computed from the rows of an ``open`` dataset. Leaves only as the owner's
  ``--private-release`` allows (aggregate scalars, model state), never as rows.
- ``SECURE``: trained on the owner's data on a daemon that requires secure aggregation: leaves only
  as a masked update of a secure round.
- ``PRIVATE``: computed from a ``protected`` dataset's rows outside what ``fit`` releases. Never leaves.

Storages are keyed by identity (``storage_key``); an entry goes when its storage is freed (a
finalizer on the storage), so a new storage at the same address starts clean. Public storages have no
entry at all: a session that never touches private data pays nothing here.
"""

from __future__ import annotations

import enum
import threading
import weakref
from collections.abc import Iterable

import torch


class Label(enum.IntFlag):
    PUBLIC = 0
    ROWS = 1
    SECURE = 2
    PRIVATE = 4


def storage_key(storage: torch.UntypedStorage) -> int:
    """The identity of a storage, shared by every view of it and by ``detach``; unique while it lives.
    Not ``data_ptr()``: two storages can start at the same address (a numpy array and its column)."""
    return storage._cdata


class TaintRecord:
    """Labels of a session's storages, and the objects released despite their label."""

    def __init__(self) -> None:
        self._labels: dict[int, Label] = {}
        #: object ids the owner's policy released as they were made (aggregate scalars of open rows)
        self.released: set[int] = set()
        # finalizers run on whichever thread frees a storage (the event loop or a torch thread)
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        """True when anything in the session is labelled (otherwise every label is PUBLIC)."""
        return bool(self._labels)

    def of_tensor(self, tensor: torch.Tensor) -> Label:
        if not self._labels:
            return Label.PUBLIC
        return self._labels.get(storage_key(tensor.untyped_storage()), Label.PUBLIC)

    def of(self, tensors: Iterable[torch.Tensor]) -> Label:
        """The join of the labels of ``tensors``' storages."""
        label = Label.PUBLIC
        if self._labels:
            for tensor in tensors:
                label |= self._labels.get(storage_key(tensor.untyped_storage()), Label.PUBLIC)
        return label

    def mark(self, tensors: Iterable[torch.Tensor], label: Label) -> None:
        """Join ``label`` into the storages of ``tensors`` (they were written, or made, from it)."""
        if not label:
            return
        for tensor in tensors:
            if tensor.device.type == "meta" or tensor.layout != torch.strided:
                continue
            storage = tensor.untyped_storage()
            key = storage_key(storage)
            with self._lock:
                old = self._labels.get(key)
                self._labels[key] = label if old is None else old | label
            if old is None:
                weakref.finalize(storage, self._forget, key)

    def replace(self, tensor: torch.Tensor, label: Label) -> None:
        """Give ``tensor``'s storage exactly ``label``: its every byte was just overwritten by a copy of
        values of that label (``whole_copies``), so nothing it held before is left in it."""
        storage = tensor.untyped_storage()
        key = storage_key(storage)
        with self._lock:
            old = self._labels.pop(key, None)
            if label:
                self._labels[key] = label
        if label and old is None:
            weakref.finalize(storage, self._forget, key)

    def _forget(self, key: int) -> None:
        with self._lock:
            self._labels.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._labels.clear()
            self.released.clear()


__all__ = ["Label", "TaintRecord", "storage_key"]
