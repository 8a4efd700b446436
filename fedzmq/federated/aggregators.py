"""The aggregators behind the strategies: what each one keeps while a round's updates arrive.

* ``WeightedMeanAggregator`` (FedAvg, FedProx): one running weighted sum, folded slice by slice, so the
  coordinator holds the global model, the sum and the pieces in flight: about three model copies, whatever
  the number of workers.
* ``ServerStepAggregator`` (FedAvgM, the FedOpt family): the same mean, then one server optimizer step on it.
* ``HeldUpdatesAggregator`` (FedMedian, FedTrimmedAvg, Krum, Bulyan): a copy of every update, because the rule
  needs all of them at once. It refuses, with ``HeldBytesExceeded``, an update that would take it past
  ``max_held_bytes``.
* ``CyclicAggregator`` (Cyclic): the last model only.

The interface and the conventions they share are in base.py.
"""

from __future__ import annotations

import abc
import hashlib
import threading
import weakref
from collections.abc import Callable, Sequence

import torch

from ..errors import HeldBytesExceeded
from .base import Aggregator, State, UpdateReceiver, check_samples, state_bytes, work_dtype

#: the ``0`` of a first fold's ``0 + weight * x`` (+0 where every update is -0, as a sum zeroed first gives)
_ZERO = torch.zeros((), dtype=torch.float64)

#: What FedMedian, FedTrimmedAvg, Krum and Bulyan may hold of a round's updates unless told otherwise: 1 GiB.
DEFAULT_MAX_HELD_BYTES = 1 << 30


class WeightedMeanAggregator(Aggregator):
    """Streaming sample-weighted mean, folded piece by piece as updates arrive, in any order and
    concurrently.

    Deterministic: the sum it keeps per float entry is ``sum(n_i * x_i)`` in float64, and the mean is
    ``sum / sum(n_i)`` rounded once more to the model's dtype. Each ``n_i * x_i`` is exact in float64 (a
    float32 value times a sample count below 2^29), and so is their sum whenever an element's values lie
    within a factor of about ``2^28 / sum(n_i)`` of each other, as the updates of one model do (they are
    the global model plus a small step): then the sum, and the model, are the same bit for bit whatever
    order the updates arrive in. Only where one element's values differ by more than that (near a sign
    change) can float64 round, and the order then matter, on values far below the float32 result's last
    bit (the chance that it shows, an element's float64 sum landing within its rounding error of a
    float32 rounding boundary, is of the order of 1e-10 per element and round). That is for float32,
    float16 and bfloat16 models: a float64 model's ``n_i * x_i`` is itself rounded, so its mean may
    differ in the last bit from one order to another. Memory: the global model, the float64 sum (two
    float32 copies' worth) and the pieces in flight, whatever the number of workers.

    ``sums``: where the running sums come from and go back to when this aggregator is gone (a strategy
    keeps one for its rounds): fresh ones cost a page fault per 4 KiB every round."""

    def __init__(self, global_state: State, sums: "SumRecycler | None" = None) -> None:
        super().__init__(global_state)
        self._acc: State = {}
        self._sums = sums
        if sums is not None:
            weakref.finalize(self, sums.keep, self._acc)
        self._total = 0
        #: pieces folded in by updates that broke off mid-download: (start, length, weight) per entry.
        #: They cannot be taken out again (that would need the update in memory), so their elements are
        #: averaged over the updates that delivered them; every other element over the complete updates.
        self._partial: dict[str, list[tuple[int, int, int]]] = {}
        #: per thread and dtype, a buffer of a block's elements (``SCRATCH_BLOCK``) that folds widen
        #: updates into (pieces fold on the event loop and on fold threads)
        self._scratches: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def _scratch(self, dtype: torch.dtype, wanted: int) -> torch.Tensor:
        """A buffer of at least ``wanted`` elements (at most a block) that only this thread uses, reused
        (a model of small entries never allocates a whole block)."""
        key = (threading.get_ident(), dtype)
        buffer = self._scratches.get(key)
        if buffer is None or buffer.numel() < wanted:
            buffer = self._scratches[key] = torch.empty(wanted, dtype=dtype)
        return buffer

    accepts_sums = True

    def receive(self, num_samples: int) -> UpdateReceiver:
        check_samples(num_samples)
        return _MeanReceiver(self, num_samples)

    def receive_sum(self, weight: int, count: int) -> UpdateReceiver:
        check_samples(weight)
        return _SumReceiver(self, weight, count)

    def _fold(self, name: str, start: int, values: torch.Tensor, weight: int) -> None:
        ref, values = self.check_slice(name, start, values)
        n = values.numel()
        # the first piece of a float entry that covers all of it writes ``0 + weight * values`` into a sum
        # that is not zeroed first (a reused sum's fill and the add's read of it saved: a model-sized
        # float64 pass each). The ``0 +`` is kept (on the block, in cache): ``w * x`` alone would leave a
        # -0 where every update has -0, while a sum zeroed first, or cut in pieces, gives +0
        first = ref.is_floating_point() and start == 0 and n == ref.numel() and name not in self._acc
        target = _piece(self._sum(name, ref, zeroed=not first).view(-1), start, n)
        if not ref.is_floating_point():
            torch.maximum(target, values.to(ref.dtype), out=target)
            return
        # block by block (in cache): ``target += weight * values``, with ``values`` widened to float64
        # (exact) first, so each operation has one dtype (a mixed-dtype one is ~4x slower), and no fresh
        # float64 temporary (and its page faults) per piece. The first piece is widened straight into the
        # sum and becomes ``0 + weight * x`` in one more operation (0.52 against 0.82 ms per 10^6
        # elements through the scratch buffer); the others go through a scratch buffer kept for the
        # round. The blocks' views come from ``split`` (one call each, not a slice per block and tensor)
        try:
            block = SCRATCH_BLOCK
            wide = None if first else self._scratch(target.dtype, min(n, block))
            blocks = zip(values.split(block), target.split(block)) if n > block else ((values, target),)
            for piece, piece_sum in blocks:
                if wide is None:
                    torch.add(_ZERO, piece_sum.copy_(piece), alpha=weight, out=piece_sum)
                else:
                    widened = _piece(wide, 0, piece.numel())
                    piece_sum.add_(widened.copy_(piece), alpha=weight)
        except BaseException:
            if first:  # a sum written only in part holds stale values: the next update starts a fresh one
                del self._acc[name]
            raise

    def _sum(self, name: str, ref: torch.Tensor, zeroed: bool = True) -> torch.Tensor:
        """The running sum of one entry: zeros (non-float entries: their dtype's least value) at first;
        with ``zeroed`` false, a new one's values are left as they are (its caller writes all of them)."""
        acc = self._acc.get(name)
        if acc is None:
            if self._sums is not None:
                acc = self._sums.take(name, ref, zeroed)
            else:
                acc = fresh_sum(ref) if zeroed else torch.empty_like(ref, dtype=sum_dtype(ref))
            self._acc[name] = acc
        return acc

    def _entry_mean(self, name: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Elements [lo, hi) of one entry of the mean, flat, in float64 (non-float entries: the max). Elements
        an update that broke off delivered are divided by the weight of the updates that delivered them."""
        flat_acc = self._acc[name].view(-1)
        hi = flat_acc.numel() if hi is None else hi
        acc = _piece(flat_acc, lo, hi - lo)
        if not self._global[name].is_floating_point():
            return acc
        if name not in self._partial:
            return acc / self._total
        weights = torch.full((acc.numel(),), float(self._total), dtype=acc.dtype)
        for start, length, weight in self._partial[name]:
            begin, end = max(start, lo), min(start + length, hi)
            if begin < end:
                weights[begin - lo:end - lo] += weight
        return acc / weights

    def _check_total(self) -> None:
        self._require_updates()
        if self._total <= 0:
            raise ValueError("the updates' sample counts sum to zero")

    def write_result(self, into: State) -> None:
        """The mean, written entry by entry and block by block: never a whole extra model in memory."""
        self._check_total()
        block = SCRATCH_BLOCK
        with torch.no_grad():
            for name, acc in self._acc.items():
                target, ref = into[name].view(-1), self._global[name]
                if not ref.is_floating_point() or name in self._partial:
                    for lo in range(0, target.numel(), block):
                        hi = min(lo + block, target.numel())
                        _piece(target, lo, hi - lo).copy_(self._entry_mean(name, lo, hi))
                    continue
                # ``sum / total`` block by block, computed in float64 and rounded to the model's dtype as it is
                # stored (the same two roundings as ``_entry_mean(name).to(dtype)``, without a scratch pass)
                flat_acc, n = acc.view(-1), target.numel()
                blocks = zip(flat_acc.split(block), target.split(block)) if n > block else ((flat_acc, target),)
                for piece_acc, piece_target in blocks:
                    torch.div(piece_acc, self._total, out=piece_target)

    def mean(self) -> State:
        """sum(n_i * x_i) / sum(n_i) per entry in the working dtype (non-float entries: the max, copied)."""
        self._check_total()
        return {k: self._entry_mean(k).to(work_dtype(self._global[k]) if self._global[k].is_floating_point()
                                          else self._global[k].dtype).view(self._global[k].shape).clone()
                for k in self._acc}


class _MeanReceiver(UpdateReceiver):
    """One update folding straight into the running sum, with what it folded remembered in case it breaks off."""

    def __init__(self, aggregator: WeightedMeanAggregator, weight: int) -> None:
        self.aggregator, self.weight = aggregator, weight
        self.elements: dict[str, int] = {}
        self.segments: list[tuple[str, int, int]] = []

    def add_slice(self, name: str, start: int, values: torch.Tensor) -> None:
        self.aggregator._fold(name, start, values, self.weight)
        self.elements[name] = self.elements.get(name, 0) + values.numel()
        self.segments.append((name, start, values.numel()))

    def end(self) -> None:
        incomplete = [k for k, ref in self.aggregator._global.items() if self.elements.get(k, 0) != ref.numel()]
        if incomplete:
            self.abort()
            raise ValueError(f"update is missing (parts of) {sorted(incomplete)}")
        self.aggregator._total += self.weight
        self.aggregator._count += 1
        self.segments = []

    def abort(self) -> None:
        for name, start, length in self.segments:
            self.aggregator._partial.setdefault(name, []).append((start, length, self.weight))
        self.segments = []


class _SumReceiver(_MeanReceiver):
    """Updates combined where they were trained: their weighted sum ``sum(n_i * x_i)``, added to the running sum."""

    def __init__(self, aggregator: WeightedMeanAggregator, weight: int, count: int) -> None:
        super().__init__(aggregator, weight)
        self.count = count

    def add_slice(self, name: str, start: int, values: torch.Tensor) -> None:
        aggregator = self.aggregator
        ref, values = aggregator.check_slice(name, start, values)
        acc = aggregator._sum(name, ref)
        target = acc.view(-1)[start:start + values.numel()]
        if ref.is_floating_point():
            target.add_(values)
        else:
            torch.maximum(target, values.to(ref.dtype), out=target)
        self.elements[name] = self.elements.get(name, 0) + values.numel()
        self.segments.append((name, start, values.numel()))

    def end(self) -> None:
        super().end()
        self.aggregator._count += self.count - 1


#: elements of a fold or of the mean computed at once: 2^15, torch's grain size, through a float64
#: scratch buffer (256 KiB) per thread that stays in the allocator's heap. A block this size runs on the
#: calling thread whatever torch's thread setting (a bigger one is split across torch's OpenMP threads,
#: whose start-up and spinning after every operation cost more than they save on these memory-bound
#: passes), and a block's scratch, sum and piece stay in a core's L2 cache (2 MiB here). Fold and mean of
#: cold 10^6-parameter updates, in process, one torch thread, CPU, block sizes interleaved, medians of
#: 40 (6 Dec, load 1): 2 updates 3.83 ms in blocks of 2^15, 3.94 in 2^16, 4.93 in 2^17; 16 updates
#: 20.8, 21.2 and 25.6 ms; two 10^7 updates 49.2, 49.6 and 55.9 ms.
SCRATCH_BLOCK = 1 << 15


def sum_dtype(ref: torch.Tensor) -> torch.dtype:
    """The dtype the weighted mean's running sum is kept in: float64 (see ``WeightedMeanAggregator``);
    a non-float entry's own dtype (its sum is a maximum)."""
    return torch.promote_types(ref.dtype, torch.float64) if ref.is_floating_point() else ref.dtype


class SumRecycler:
    """The running sums of a strategy's last finished round, handed to its next round instead of fresh
    ones: a fresh float64 sum is new memory, a page fault per 4 KiB on first touch (for 10^7 parameters,
    ~37 ms of CPU per round against ~4 ms to zero a reused one). An aggregator's sums come back only
    when the aggregator itself is gone (``weakref.finalize``), so no two rounds ever share one. It holds
    one set at most: the coordinator keeps the float64 sum (two float32 model copies) between rounds,
    and no more than that during one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: State = {}

    def take(self, name: str, ref: torch.Tensor, zeroed: bool = True) -> torch.Tensor:
        """A sum for entry ``name`` like ``ref``: a kept one reset when its shape and dtype match (left as
        it is without ``zeroed``: its caller writes every element)."""
        with self._lock:
            kept = self._free.pop(name, None)
        if kept is not None and kept.shape == ref.shape and kept.dtype == sum_dtype(ref):
            return kept.fill_(_sum_start(ref)) if zeroed else kept
        return fresh_sum(ref) if zeroed else torch.empty_like(ref, dtype=sum_dtype(ref))

    def keep(self, sums: State) -> None:
        """Keep a finished round's sums (replacing any kept before)."""
        with self._lock:
            self._free = dict(sums)


def _piece(flat: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    """Elements [start, start + numel) of a flat tensor (itself, not a slice, when that is all of it)."""
    return flat if start == 0 and numel == flat.numel() else flat[start:start + numel]


def _sum_start(ref: torch.Tensor) -> float | int | bool:
    """What a running sum starts at: 0 for float entries, the least value for the others (their max)."""
    if ref.is_floating_point():
        return 0
    return torch.iinfo(ref.dtype).min if ref.dtype != torch.bool else False


def fresh_sum(ref: torch.Tensor) -> torch.Tensor:
    """A new running sum for an entry like ``ref`` (``sum_dtype``), at its start."""
    return torch.full_like(ref, _sum_start(ref), dtype=sum_dtype(ref))


#: A server optimizer step: (global model, weighted mean of the updates in the working dtype) -> new model
ServerStep = Callable[[State, State], State]


class ServerStepAggregator(WeightedMeanAggregator):
    """The weighted mean, then one server optimizer step on it. The step (which advances the strategy's server
    state, e.g. its moments) runs once, on the first result; later results are the same model, and adding
    after it is an error. Memory: the weighted mean's, plus the new model."""

    def __init__(self, global_state: State, step: ServerStep) -> None:
        super().__init__(global_state)
        self._step = step
        self._new: State | None = None

    def receive(self, num_samples: int) -> UpdateReceiver:
        if self._new is not None:
            raise RuntimeError("this round was already aggregated")
        return super().receive(num_samples)

    def write_result(self, into: State) -> None:
        if self._new is None:
            self._new = self._step(self._global, self.mean())
            self._acc = {}
        with torch.no_grad():
            for name, value in self._new.items():
                into[name].copy_(value)


class _PendingUpdate:
    """One update being downloaded: its slices copied into fresh tensors of the global model's dtypes."""

    def __init__(self, num_samples: int) -> None:
        check_samples(num_samples)
        self.num_samples = num_samples
        self.state: State = {}
        self.elements: dict[str, int] = {}

    def add(self, ref: torch.Tensor, name: str, start: int, flat: torch.Tensor) -> None:
        if name not in self.state:
            self.state[name] = torch.empty_like(ref)
        self.state[name].view(-1)[start:start + flat.numel()].copy_(flat)
        self.elements[name] = self.elements.get(name, 0) + flat.numel()

    def finish(self, global_state: State) -> State:
        incomplete = [k for k, ref in global_state.items() if self.elements.get(k, 0) != ref.numel()]
        if incomplete:
            raise ValueError(f"update is missing (parts of) {sorted(incomplete)}")
        return self.state


class _PendingAggregator(Aggregator):
    """Collects each update whole before handing it to ``_keep`` (for rules that need whole updates)."""

    #: updates being received now (each collects a whole copy)
    _in_flight = 0

    def receive(self, num_samples: int) -> UpdateReceiver:
        receiver = _PendingReceiver(self, _PendingUpdate(num_samples))
        self._in_flight += 1
        return receiver

    @abc.abstractmethod
    def _keep(self, state: State, num_samples: int) -> None:
        """Take a complete update (fresh tensors: the aggregator's own)."""


class _PendingReceiver(UpdateReceiver):
    def __init__(self, aggregator: _PendingAggregator, pending: _PendingUpdate) -> None:
        self.aggregator, self.pending = aggregator, pending
        self.closed = False

    def add_slice(self, name: str, start: int, values: torch.Tensor) -> None:
        ref, flat = self.aggregator.check_slice(name, start, values)
        self.pending.add(ref, name, start, flat)

    def end(self) -> None:
        try:
            state = self.pending.finish(self.aggregator._global)
        finally:
            self._close()
        self.aggregator._keep(state, self.pending.num_samples)
        self.aggregator._count += 1

    def abort(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.aggregator._in_flight -= 1
            self.pending.state = {}


#: Which of the held updates the result is made of: (updates, names of the float entries) -> indices
Select = Callable[[Sequence[State], Sequence[str]], list[int]]
#: One float entry of the result: (that entry of each kept update in the working dtype, their sample counts)
Reduce = Callable[[list[torch.Tensor], list[int]], torch.Tensor]


def _select_all(updates: Sequence[State], names: Sequence[str]) -> list[int]:
    return list(range(len(updates)))


class HeldUpdatesAggregator(_PendingAggregator):
    """Holds a copy of every update of the round, in the model's own dtypes: one model per participant.

    ``select`` picks the updates the result is made of (all, unless it is given: Krum and Bulyan pick); then
    each float entry is ``reduce``d from those updates' values, and each non-float entry is their maximum.
    Computing an entry takes, on top of the held updates, a few copies of that entry for every update.

    ``max_held_bytes`` (None: no limit) bounds the held updates: the update that would pass it is refused with
    ``HeldBytesExceeded`` before anything of it is kept, and the round's result then raises the same error,
    so the round never aggregates only the updates that happened to fit."""

    def __init__(self, global_state: State, reduce: Reduce, *, select: Select = _select_all,
                 max_held_bytes: int | None, rule: str) -> None:
        super().__init__(global_state)
        if max_held_bytes is not None and max_held_bytes < 0:
            raise ValueError(f"max_held_bytes must be >= 0 or None, got {max_held_bytes}")
        self._reduce, self._select, self._rule = reduce, select, rule
        self._max_held_bytes = max_held_bytes
        self._update_bytes = state_bytes(global_state)
        self._updates: list[State] = []
        self._samples: list[int] = []
        self._refused: str | None = None
        self._kept: list[int] | None = None

    @property
    def held_bytes(self) -> int:
        """Bytes of the complete updates held now."""
        return len(self._updates) * self._update_bytes

    def receive(self, num_samples: int) -> UpdateReceiver:
        wanted = self.held_bytes + (self._in_flight + 1) * self._update_bytes
        if self._max_held_bytes is not None and wanted > self._max_held_bytes:
            number = len(self._updates) + self._in_flight + 1
            self._refused = (f"{self._rule} holds every update of a round; update {number}"
                             f" would make that {wanted} bytes ({self._update_bytes} per update), over max_held_bytes="
                             f"{self._max_held_bytes}: raise max_held_bytes or let fewer workers take part")
            raise HeldBytesExceeded(self._refused)
        if self._kept is not None:
            raise RuntimeError("this round was already aggregated")
        return super().receive(num_samples)

    def _keep(self, state: State, num_samples: int) -> None:
        self._updates.append(state)
        self._samples.append(num_samples)

    def _put_in_content_order(self) -> None:
        """Order the held updates by their content, not by when they arrived: a rule that breaks a tie by
        position (Krum's first lowest score) or sums what it keeps in order would otherwise give another
        model when the same updates come in another order (two runs from the same seeds differed by 0.05)."""
        keys = [(content_digest(update), samples) for update, samples in zip(self._updates, self._samples)]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self._updates = [self._updates[i] for i in order]
        self._samples = [self._samples[i] for i in order]

    def write_result(self, into: State) -> None:
        self._require_updates()
        if self._refused is not None:
            raise HeldBytesExceeded(f"the round cannot be aggregated without the updates it refused: {self._refused}")
        if self._kept is None:
            self._put_in_content_order()
            names = [k for k, ref in self._global.items() if ref.is_floating_point()]
            self._kept = self._select(self._updates, names)
        kept = [self._updates[i] for i in self._kept]
        samples = [self._samples[i] for i in self._kept]
        with torch.no_grad():
            for name, ref in self._global.items():
                if ref.is_floating_point():
                    into[name].copy_(self._reduce([u[name].to(work_dtype(ref)) for u in kept], samples))
                else:
                    into[name].copy_(torch.stack([u[name] for u in kept]).amax(dim=0))


def content_digest(state: State) -> bytes:
    """A digest of a state's entries, names and bytes in name order: the same for equal states, whatever
    object holds them."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        tensor = state[name].detach().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().data)
    return digest.digest()


class CyclicAggregator(_PendingAggregator):
    """The model visits the workers in turn: each update replaces the current model, ``result()`` is the last
    one added. Holds one model copy besides the global one (and the next one while it downloads)."""

    def __init__(self, global_state: State) -> None:
        super().__init__(global_state)
        self._current: State | None = None

    def _keep(self, state: State, num_samples: int) -> None:
        self._current = state

    def current_model(self) -> State:
        """A copy of the model the next worker starts from: the global model before any add, then the last."""
        return {k: t.clone() for k, t in (self._global if self._current is None else self._current).items()}

    def write_result(self, into: State) -> None:
        self._require_updates()
        assert self._current is not None
        with torch.no_grad():
            for name, value in self._current.items():
                into[name].copy_(value)
