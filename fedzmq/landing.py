"""Where a stream's bytes land: a new tensor that takes the received pieces' memory pages instead of
copying them.

Why. The receiver of a big stream must put every byte into memory it has not used before, and on
machines that back memory lazily (VMs, above all) the first touch of a page costs more than the copy
itself. A piece received from a TCP or IPC socket already lies in fresh pages that the kernel filled
during the socket read: libzmq allocates every large message itself, and glibc maps blocks above
32 MiB with their own ``mmap``. Linux's ``mremap`` moves those pages into the destination by changing
page tables, so no byte is copied and no page is touched twice. On the 2-core VM of
docs/benchmarks_big.md a 4 GiB receive went from 6.6 to 7.0 s (copying 16 MiB pieces) to 4.3 to 5.2 s,
the time raw pyzmq takes to receive the same bytes as one message.

Safety. Pages are taken only when the caller says the pieces are frames received from a socket that
nothing else references (``adopt_pages``: never over inproc, where a frame may be a sender's memory).
Only whole pages inside a piece's bytes move; the piece reads as zeros afterwards and its owner frees it
as usual (``MREMAP_DONTUNMAP`` leaves the source range mapped, so no other allocation can land in a
hole). Any other case, another OS, a piece whose offset in its page differs from the destination's, a
failing ``mremap``, falls back to a copy, so the result is the same bytes either way.

Cost. Each adopted piece splits the destination's mapping: about two kernel memory areas per piece.
Pieces are adopted only from ``ADOPT_MIN_BYTES`` up, so the count stays below one area per 16 MiB
of memory held, far from Linux's limit of 65,530 per process.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
import threading
from typing import Any, Callable, Sequence

import torch

PAGE = mmap.PAGESIZE

#: the smallest piece whose pages are moved rather than copied: a move costs kernel memory areas, a
#: copy of a small piece costs little
ADOPT_MIN_BYTES = 32 << 20

_MREMAP_MAYMOVE, _MREMAP_FIXED, _MREMAP_DONTUNMAP = 1, 2, 4


@functools.cache
def _libc_calls() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """libc's ``mremap`` and ``mmap``, or None where pages cannot be moved (not Linux)."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mremap, mmap_call = libc.mremap, libc.mmap
    except (OSError, AttributeError):
        return None
    mremap.restype = ctypes.c_void_p
    mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    mmap_call.restype = ctypes.c_void_p
    mmap_call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    return mremap, mmap_call


def can_adopt_pages() -> bool:
    """True where this process can move pages (Linux with ``mremap``)."""
    return _libc_calls() is not None


class Landing:
    """The destination of one stream: a tensor of ``dtype`` and ``shape`` whose bytes arrive in pieces.

    ``put`` may run on several threads at once for pieces that do not overlap. ``tensor()`` returns the
    result once every piece is in."""

    def __init__(self, dtype: torch.dtype, shape: Sequence[int], *, adopt_pages: bool) -> None:
        self.dtype = dtype
        self.shape = tuple(shape)
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = self.itemsize * _numel(self.shape)
        #: bytes that arrived by moving pages rather than by copying (for tests and benchmarks)
        self.adopted_bytes = 0
        self._lock = threading.Lock()
        calls = _libc_calls() if adopt_pages and self.nbytes >= ADOPT_MIN_BYTES else None
        self._calls = calls
        self._map: mmap.mmap | None = None
        self._flat: torch.Tensor | None = None
        if calls is None:
            self._flat = torch.empty(self.nbytes, dtype=torch.uint8)
        else:
            # a page of slack: the tensor starts where the first piece's bytes start within their page
            self._map = mmap.mmap(-1, self.nbytes + PAGE)
            self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def put(self, offset: int, piece: torch.Tensor) -> None:
        """Land ``piece`` (flat uint8, contiguous) at byte ``offset``: by moving its whole pages when it
        may, by copying the rest."""
        length = piece.numel()
        if not (piece.dtype == torch.uint8 and piece.dim() == 1 and piece.is_contiguous()):
            raise ValueError("a piece is a flat, contiguous uint8 tensor")
        if offset < 0 or offset + length > self.nbytes:  # a move outside the destination would clobber memory
            raise ValueError(f"a piece of {length} bytes at {offset} runs past the {self.nbytes} bytes of the tensor")
        flat = self._destination(piece)
        if self._calls is not None and length >= ADOPT_MIN_BYTES:
            source, target = piece.data_ptr(), flat.data_ptr() + offset
            if (source - target) % PAGE == 0:
                head = -source % PAGE
                body = (length - head) // PAGE * PAGE
                if body > 0 and self._move(source + head, target + head, body):
                    flat[offset:offset + head].copy_(piece[:head])
                    flat[offset + head + body:offset + length].copy_(piece[head + body:])
                    with self._lock:
                        self.adopted_bytes += body
                    return
        flat[offset:offset + length].copy_(piece)

    def tensor(self) -> torch.Tensor:
        """The landed tensor (it keeps the destination's memory alive)."""
        flat = self._flat if self._flat is not None else self._choose_start(0)
        return flat.view(self.dtype).view(self.shape) if self.nbytes else torch.empty(self.shape, dtype=self.dtype)

    def _destination(self, piece: torch.Tensor) -> torch.Tensor:
        if self._flat is not None:
            return self._flat
        return self._choose_start(piece.data_ptr() % PAGE)

    def _choose_start(self, shift: int) -> torch.Tensor:
        """Place the tensor ``shift`` bytes into the mapping, so that every piece's pages line up with
        the destination's (libzmq's large messages all start at the same offset within a page). A shift
        that would misalign the dtype is refused: pieces are then copied."""
        assert self._map is not None
        with self._lock:
            if self._flat is None:
                if shift % self.itemsize:
                    shift = 0
                self._flat = torch.frombuffer(self._map, dtype=torch.uint8, count=self.nbytes, offset=shift)
            return self._flat

    def _move(self, source: int, target: int, nbytes: int) -> bool:
        """Move ``nbytes`` of whole pages from ``source`` to ``target``; False (nothing moved, the
        target still mapped) when the kernel refuses."""
        assert self._calls is not None
        mremap, mmap_call = self._calls
        flags = _MREMAP_MAYMOVE | _MREMAP_FIXED | _MREMAP_DONTUNMAP
        if mremap(source, nbytes, nbytes, flags, target) == target:
            return True
        # the kernel may have unmapped the target before failing: map fresh pages there again (this
        # range belongs to this landing and holds nothing yet)
        restored = mmap_call(target, nbytes, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
        if restored != target:
            raise MemoryError(f"could not map {nbytes} bytes back after a failed page move (errno "
                              f"{ctypes.get_errno()})")
        return False


_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)


def _numel(shape: Sequence[int]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel


__all__ = ["ADOPT_MIN_BYTES", "Landing", "can_adopt_pages"]
