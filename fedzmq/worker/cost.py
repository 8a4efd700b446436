"""What a command will cost, known before it runs: output sizes, intermediates, work.

Everything is measured on the meta device, where tensors have shapes and dtypes but no data: the
same op or forward runs there first, so an outer product of two modest vectors, a forward whose
intermediates are gigabytes, or a matmul that would run for an hour is refused before any memory is
allocated or any time spent. Shapes on the meta device depend only on shapes, dtypes and plain
arguments, never on values: an op whose output size depends on the data (a boolean mask) cannot run
there, and so is refused, which also keeps data-dependent shapes from leaving through ``info``.

Meta runs are slow (hundreds of microseconds for an op, milliseconds for a forward), so results are
cached by signature: the shapes, strides, dtypes and plain arguments of a call. A cache holds no data.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from .. import budget
from ..errors import BadRequest, LimitExceeded, RemoteError, remote_error
from ..modeldesc import ModelRegistry, build, holds_registered
from ..ops import check_call
from .objects import HostedModule
from .opwork import op_work
from .taint import storage_key

#: work a torch thread is assumed to do per second: element operations of simple ops, or floating
#: point operations of a matmul. Conservative (a core does tens of GFLOP/s), so that what it admits
#: fits the time budget with room to spare.
WORK_PER_SECOND = 2e9

#: an op runs on the event loop only when its inputs and outputs hold at most this many elements
INLINE_NUMEL = 1 << 10

#: work per element and per dim (at least 3) of reading a view whose elements are out of row-major order:
#: a copy of it (``contiguous``, ``reshape``, ``cat``, a ``get``'s reply) visits them in order, and
#: measured here it took 3-4 ns an element per dim (6-12 ns for two dims of a sliced transpose, 11.9 at
#: 3 dims, 63-107 at 24-25 dims; float32), against 1-2 ns for a plain copy. Free to make (``permute``,
#: slices), so a view of 2^27 bytes as 27 dims of 2, reversed, took 9 s to copy in one call that no
#: check can stop
STRIDED_WORK_PER_DIM = 8

#: work per output element of an op torch has no formula for: writing it, where reading an operand's
#: element costs 1. Measured here on one thread, fresh outputs: 2.1-2.7 ns an element for add, mul,
#: div, sigmoid, softmax; 3.5-4.5 for exp, log, pow, tanh (one unit is 0.5 ns: ``WORK_PER_SECOND``)
OUTPUT_WORK = 8
#: an integer ``pow`` squares up to 63 times an element: 46 ns an element measured
INTEGER_POW_WORK = 128
#: ``embedding_renorm_`` (an ``Embedding`` with ``max_norm``) renormalizes the rows it looked up one by one,
#: 2.5-4 us each, in place (it makes no tensor for the counter to see)
RENORM_WORK_PER_INDEX = 8192
#: work per floating point operation of a matmul or convolution (torch's flop formulas) by dtype, where
#: torch's CPU kernels are slower than the float32 ones the rate is set for: float16 matmuls ran at
#: 0.3 GFLOP/s, an int64 (1, K) @ (K, 1) at 34 ns per K (a red team held a torch thread 7-8 s under 0.5 s)
FLOP_WORK = {torch.float16: 8, torch.float64: 2}
#: the same for integer dtypes (torch's fallback gemm; it also copies an operand: ``_scratch``)
INTEGER_FLOP_WORK = 64

_ATEN = torch.ops.aten
#: pooling over a window given by its kernel (the argument after the input), 1-d or 2-d on the meta
#: device (1-d pools run as 2-d): every output element reads the whole window, which torch's flop
#: formulas leave out (a 512 x 512 window at stride 1 counted as no work, and held a torch thread 30 s)
_WINDOWED: dict[Any, int] = {  # op -> its spatial dims (a kernel given as one int covers each)
    _ATEN.max_pool1d: 1, _ATEN.avg_pool1d: 1, _ATEN.max_pool2d: 2, _ATEN.max_pool2d_with_indices: 2,
    _ATEN.avg_pool2d: 2, _ATEN.max_pool3d: 3, _ATEN.max_pool3d_with_indices: 3, _ATEN.avg_pool3d: 3}
#: calls whose measured cost grows with the rows they normalize (``opwork``: writes per row)
_NORMALIZED = frozenset({_ATEN._softmax, _ATEN._log_softmax})
_MATMULS = frozenset({_ATEN.mm, _ATEN.bmm, _ATEN.addmm, _ATEN.baddbmm, _ATEN.dot, _ATEN.mv})
#: calls that convert dtypes themselves (their output is the widened copy: nothing besides)
_CASTS = frozenset({_ATEN._to_copy, _ATEN.to, _ATEN.copy_, _ATEN.clone, _ATEN.index, _ATEN.embedding,
                    _ATEN.embedding_dense_backward})
#: pooling to an output size: each output element reads about input / output elements per dim
_ADAPTIVE = frozenset({_ATEN.adaptive_avg_pool1d, _ATEN.adaptive_avg_pool2d, _ATEN.adaptive_avg_pool3d,
                       _ATEN._adaptive_avg_pool2d, _ATEN._adaptive_avg_pool3d, _ATEN.adaptive_max_pool1d,
                       _ATEN.adaptive_max_pool2d, _ATEN.adaptive_max_pool3d})


@dataclass(frozen=True)
class OutputSize:
    shape: tuple[int, ...]
    dtype: torch.dtype
    #: the position of the operand the output views (it needs no new memory), or None
    views: int | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class OpCost:
    outputs: tuple[OutputSize, ...]
    #: element operations the op does (floating point operations for a matmul)
    work: int
    #: elements of the inputs and outputs: small ones run on the event loop
    numel: int
    #: the meta device's error, for shapes the op does not accept: the real op then runs only to raise
    #: torch's own words for it (it fails on the shapes before making anything)
    error: Exception | None = None
    #: bytes of the tensors the op makes on its way and drops (a composite op's intermediates: the
    #: ``log_softmax`` inside ``cross_entropy``), held while it runs
    scratch: int = 0
    #: aten calls it makes: at least the autograd nodes its output's graph gains
    calls: int = 1
    #: whether autograd may record it (an operand requires gradients): only then can it save tensors for a
    #: backward, which the quota must charge (``Quota.charging_saved_tensors``)
    records_graph: bool = True

    @property
    def new_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs if o.views is None)


@dataclass(frozen=True)
class Footprint:
    """A forward pass: bytes of every tensor it makes (an upper bound of what it holds at once), its
    work (``_Counter``), and its output's shape when it is one tensor (a fit checks it against its labels
    before it runs: ``ops.check_loss_shapes``)."""

    nbytes: int
    flops: int
    output: tuple[int, ...] | None = None
    output_dtype: torch.dtype | None = None
    #: aten calls it makes: at least the autograd nodes its output's graph gains
    calls: int = 1
    #: bytes and work of the copies ``module_call`` makes of its outputs that are the module's parameters
    #: (``parameter_copies``)
    copied: int = 0
    copy_work: int = 0


class _Cache(collections.OrderedDict[Hashable, Any]):
    """A bounded LRU cache."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def lookup(self, key: Hashable) -> Any:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def store(self, key: Hashable, value: Any) -> None:
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)


class Coster:
    """Sizes ops and forwards on the meta device, with caches. One per worker."""

    def __init__(self, models: ModelRegistry, cache_size: int = 1024, scopes: int = 64) -> None:
        self.models = models
        self._cache_size = cache_size
        #: per client key (``scope``; the sessions of one key share them: the hosted clients of a secure
        #: round each build the same model, and measuring it anew for each took 4-5 ms a client, 2 s of a
        #: 1,000-client round on each of two daemons), an LRU of ops' costs and one of forwards'
        #: footprints. Separate LRUs, so that one key's sizing neither evicts another's entries nor tells
        #: it how many it made; keys are digests (or a small call's signature, ``call_key``), so that no
        #: entry holds a request's plain values (a ``cat`` of 1,024 tensors of 32 dims, or a string passed
        #: through a model, kept megabytes uncharged per entry). The least recently used key's caches go
        #: first past ``scopes`` keys
        self._scopes = _Cache(scopes)
        #: ops and forwards are sized on torch threads too: the lock keeps the LRUs' order consistent
        self._lock = threading.Lock()

    def _lookup(self, scope: Hashable, kind: int, key: Hashable) -> Any:
        with self._lock:
            caches = self._scopes.lookup(scope)
            return None if caches is None else caches[kind].lookup(key)

    def _store(self, scope: Hashable, kind: int, key: Hashable, value: Any) -> None:
        with self._lock:
            caches = self._scopes.lookup(scope)
            if caches is None:
                caches = (_Cache(self._cache_size), _Cache(self._cache_size))
                self._scopes.store(scope, caches)
            caches[kind].store(key, value)

    # --- ops -------------------------------------------------------------------------------------

    def op(self, name: str, args: list[Any] | tuple[Any, ...], kwargs: dict[str, Any],
           scope: Hashable = None) -> OpCost:
        """The cost of op ``name`` on these arguments, checked against the op's schema first
        (``ops.check_call``, which raises ``BadRequest`` for a call it refuses). Both the check and the
        cost depend on the arguments' signature only (types and plain values; tensors by shape, strides,
        dtype and ``requires_grad``), so a call with the signature of one that passed is neither checked
        nor sized again: a stream of small ops pays for a dictionary lookup, not a schema walk. Entries are
        kept per ``scope`` (the client's key): how fast a call is sized tells nothing of another
        coordinator's calls."""
        key = call_key(name, args, kwargs)
        cost = self._lookup(scope, _OPS, key)
        if cost is None:
            schema = check_call(name, args, kwargs)
            cost = _measure_op(name, schema.fn, args, kwargs)
            self._store(scope, _OPS, key, cost)
        return cost

    # --- forwards --------------------------------------------------------------------------------

    def forward(self, hosted: HostedModule, inputs: Sequence[Any], kwargs: dict[str, Any], grad: bool, *,
                training: bool | None = None, scope: Hashable = None, per_row: bool = False) -> Footprint | None:
        """The footprint of ``hosted``'s forward on inputs like these, or None when it cannot be
        measured (an owner's registered model that does not run on the meta device: its code is the
        owner's, and what autograd saves is still charged as it is saved). ``training``: every module in
        that mode (what a fit or an evaluation switches to), else each in its own. ``scope``: whose
        measurements these are (the client's key); a forward is measured once per scope. ``per_row``:
        the forward as a metric runs it, one row of the batch at a time (``training.row_terms``, vmapped):
        what a batch computes once (a buffer's concatenation, a matmul scaled by the batch's sum) is
        then made once per row (a red team's 256 rows beside a 4 MiB buffer: 1 GiB, sized as 4 MiB)."""
        modes: Any = training if training is not None else tuple(m.training for m in hosted.module.modules())
        key = _digest((spec_digest(hosted), signature(inputs), signature(kwargs), grad, modes, per_row))
        known = self._lookup(scope, _FORWARDS, key)
        if known is not None:
            return known[0]
        footprint: Footprint | None = None
        try:
            meta = _meta_module(hosted, self.models)
        except Exception:  # an owner's class that cannot be built on the meta device
            meta = None
        if meta is not None:
            for real, skeleton in zip(hosted.module.modules(), meta.modules()):
                skeleton.training = real.training if training is None else training
            meta_inputs, meta_kwargs = _to_meta(inputs), _to_meta(kwargs)
            counter = _Counter()
            call = meta if not per_row else torch.func.vmap(lambda row: meta(row.unsqueeze(0)), randomness="error")
            try:
                with torch.set_grad_enabled(grad), counter:
                    out = call(*meta_inputs, **meta_kwargs)
                one = isinstance(out, torch.Tensor)
                copies = parameter_copies(meta, out)
                footprint = Footprint(counter.nbytes + counter.scratch, counter.flops,
                                      tuple(out.shape) if one else None, out.dtype if one else None,
                                      max(1, counter.calls), copies.nbytes, copies.flops)
            except (BadRequest, LimitExceeded):
                raise
            except Exception as exc:
                if hosted.spec.get("kind") != "registered":  # (an owner's class alone is measured by running it)
                    # the real forward would fail the same way; its words may leave when they are made of public
                    # facts only, not when an owner's class inside the description made them
                    raise (_shape_error(exc) if holds_registered(hosted.spec) else _forward_shape_error(exc)) from None
        self._store(scope, _FORWARDS, key, (footprint,))  # (None: cannot be measured, worth keeping too)
        return footprint


    def call_work(self, fn: Callable[..., Any], name: str, args: Sequence[Any], scope: Hashable = None) -> int:
        """The work of ``fn(*args)`` (a loss on a forward's output and the labels: ``name`` says which),
        measured on the meta device on tensors like ``args`` and kept per ``scope`` as forwards are."""
        key = _digest(("call", name, signature(args)))
        known = self._lookup(scope, _FORWARDS, key)
        if known is not None:
            return int(known[0])
        counter = _Counter()
        with torch.no_grad(), counter:  # (a call that fails raises its own error; nothing is kept)
            fn(*_to_meta(args))
        self._store(scope, _FORWARDS, key, (counter.flops,))
        return counter.flops


#: the two caches of a scope: ops' costs and forwards' footprints
_OPS, _FORWARDS = 0, 1


#: calls small enough that their signature is their cache key as it is: a digest costs a ``repr`` and a sha256
#: (4 us warm; with the signature, a tenth of a daemon's CPU per pipelined op), and a key of at most
#: ``SMALL_CALL_ARGS`` numbers or tensors of at most ``SMALL_CALL_DIMS`` dims holds about a kilobyte at most
SMALL_CALL_ARGS = 3
SMALL_CALL_DIMS = 4
_SMALL_SCALARS = frozenset((bool, int, type(None)))  # (the decoder's ints are at most 64 bits)


def call_key(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Hashable:
    """The cache key of op ``name`` on these arguments: their signature itself for a small call (a dict
    compares keys whose hashes meet, so it is exact), else its digest. Either way a key is bounded in
    size, whatever a request holds."""
    signed = (name, signature(args), signature(kwargs) if kwargs else ("D",))
    if not kwargs and len(args) <= SMALL_CALL_ARGS and all(map(_small_argument, args)):
        return signed
    return _digest(signed)


def _small_argument(value: Any) -> bool:
    kind = type(value)
    if kind in _SMALL_SCALARS:
        return True
    if kind is float:
        return bool(value == value)  # NaN equals nothing, itself included: as a key it would never be found again
    return isinstance(value, torch.Tensor) and value.dim() <= SMALL_CALL_DIMS


def _digest(key: Any) -> bytes:
    """A cache key of fixed size (32 bytes) for a signature: ``repr`` is unambiguous over what signatures
    hold (tuples, ints, floats, strings, bools, None, dtypes), and sha256 keeps a request from choosing
    another's entry."""
    return hashlib.sha256(repr(key).encode()).digest()


def spec_digest(hosted: HostedModule) -> bytes:
    """A digest of the description ``hosted`` was built from: what its forward's footprint depends on,
    besides the inputs' signature and the modules' modes (the meta module is built from it alone)."""
    if hosted.spec_digest is None:
        hosted.spec_digest = hashlib.sha256(repr(hosted.spec).encode()).digest()
    return hosted.spec_digest


def own_storages(module: nn.Module) -> set[int]:
    """The storages of ``module``'s parameters and buffers: what a step or a train-mode forward (a batch
    norm's running statistics) changes in place, so an output over one is copied before it is stored."""
    return {storage_key(t.untyped_storage()) for t in itertools.chain(module.parameters(), module.buffers())}


def parameter_copies(module: nn.Module, out: Any) -> _Counter:
    """The copies of a forward's outputs that are ``module``'s parameters or buffers or views of them, which
    ``module_call`` makes (a stored tensor must not change under its pointer when a step or a forward changes
    them in place: ``handlers.modules.unshared``), measured as any call is. On the meta device
    returning a parameter makes nothing: a 32 MiB weight returned 64 times made 2 GiB of copies under a
    256 MiB quota before the quota saw them (a red team's find)."""
    storages = own_storages(module)
    counter = _Counter()
    with torch.no_grad(), counter:
        for output in out if isinstance(out, tuple) else (out,):
            if isinstance(output, torch.Tensor) and storage_key(output.untyped_storage()) in storages:
                output.clone()
    return counter


def warm_up() -> None:
    """Load torch's meta kernels (about a second, the first time in a process), so that the first
    command sized on the meta device does not hold the event loop that long."""
    rows = torch.empty(2, 3, device="meta")
    F.linear(rows + rows, torch.empty(4, 3, device="meta")).relu().sum()


def copy_units(tensor: torch.Tensor) -> int:
    """Work per element of reading ``tensor`` in row-major order (``STRIDED_WORK_PER_DIM``)."""
    if tensor.is_contiguous():
        return 1
    return STRIDED_WORK_PER_DIM * max(3, tensor.dim())


def element_work(tensor: torch.Tensor) -> int:
    """Work of reading every element of ``tensor`` in row-major order, as a copy of it does."""
    return tensor.numel() * copy_units(tensor)


def work_budget(seconds: float) -> float:
    """The most work (see ``WORK_PER_SECOND``) one command may be admitted with."""
    return seconds * WORK_PER_SECOND


def check_work(work: float, seconds: float, what: str) -> None:
    if work > work_budget(seconds):
        needed = work / WORK_PER_SECOND
        about = f"{needed:.0f}" if needed >= 10 else f"{needed:.2g}"
        raise LimitExceeded.new(f"{what} would take about {about} s of computing, more than the {seconds:g} s a "
                                "command may run (--max-command-seconds)")


def _meta_module(hosted: HostedModule, models: ModelRegistry) -> nn.Module:
    """The module rebuilt on the meta device from its description (kept with it: building costs)."""
    if hosted.meta is None:
        with torch.device("meta"):
            hosted.meta = build(hosted.spec, models)
    return hosted.meta


def _measure_op(name: str, fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> OpCost:
    operands: list[torch.Tensor] = []

    def meta(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            operands.append(_meta_tensor(value))
            return operands[-1]
        if isinstance(value, (list, tuple)):
            return type(value)(meta(v) for v in value)
        return value

    meta_args, meta_kwargs = [meta(a) for a in args], {k: meta(v) for k, v in kwargs.items()}
    counter = _Counter()  # what a forward program's node is counted with: one measure for an op, wherever it runs
    try:
        with counter:
            result = fn(*meta_args, **meta_kwargs)
    except (BadRequest, LimitExceeded):
        raise
    except Exception as exc:  # shapes that do not fit, or a size that depends on the data
        error = _shape_error(exc)
        if isinstance(error, BadRequest):
            raise error from None
        return OpCost((), 0, sum(t.numel() for t in operands), error)
    results = result if isinstance(result, tuple) else (result,)
    keys = [storage_key(t.untyped_storage()) for t in operands]
    outputs = []
    for out in results:
        if not isinstance(out, torch.Tensor):
            raise BadRequest.new(f"{name} returned a {type(out).__name__}, not a tensor")
        key = storage_key(out.untyped_storage())
        outputs.append(OutputSize(tuple(out.shape), out.dtype, keys.index(key) if key in keys else None))
    in_numel = sum(t.numel() for t in operands)
    out_numel = sum(o.numel for o in outputs)
    made = sum(o.nbytes for o in outputs if o.views is None)
    # an op that makes a tensor reads every operand and writes every output, whatever it decomposed into
    # (a view of an operand is free: what copies it in order later pays for that)
    floor = sum(element_work(t) for t in operands) + OUTPUT_WORK * out_numel if made else 0
    work = max(counter.flops, floor)
    return OpCost(tuple(outputs), work, in_numel + out_numel, scratch=max(0, counter.nbytes - made) + counter.scratch,
                  calls=max(1, counter.calls), records_graph=any(t.requires_grad for t in operands))


def _shape_error(exc: Exception) -> Exception:
    """The meta run's error, as the real run would raise it: it speaks of shapes and dtypes only (a
    meta tensor holds no values), so its message may go back to the client. An error of the meta device
    itself (a kernel that reads a value, ``.item()``, or has no meta version) is a ``BadRequest``: such a
    call cannot be sized, so it is refused, not run (an op whose sizing failed runs to raise torch's own
    words: an index with a 0-dim tensor beside four broadcasting ones made 483 MiB under a 16 MiB quota)."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if len(message) > 500:  # its start and its end (what went wrong is often said last, after the shapes)
        message = f"{message[:240]} ... {message[-240:]}"
    cannot_size = "data dependent" in message or "data-dependent" in message or "meta tensor" in message \
        or "'Meta'" in message
    if isinstance(exc, NotImplementedError) or cannot_size:
        return BadRequest.new("this call cannot be sized before it runs (its result's size, or its kernel, depends "
                              "on the data's values); such operations are refused (index with ints, slices or "
                              "integer tensors of one or more dims instead of a boolean mask)")
    if type(exc) in (RuntimeError, ValueError, IndexError, TypeError):
        return type(exc)(message)
    return RuntimeError(message)


def _forward_shape_error(exc: Exception) -> RemoteError:
    """A described model's meta forward that failed, as a refusal made from public facts: the model and
    the batch's shape are the client's and the dataset's shape is listed to every client, so the words
    may leave even from a fit on protected rows, where torch's own errors are withheld (a newcomer's
    ``nn.Linear(20, 3)`` on 8 features got only "RuntimeError ... the message is withheld").
    It keeps the built-in type: a ``RemoteRuntimeError`` is a ``RuntimeError`` on both sides."""
    error = _shape_error(exc)
    if isinstance(error, RemoteError):
        return error
    return remote_error(type(error).__name__, f"the model does not fit these inputs' shapes or dtypes: {error}")


def _meta_tensor(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    return meta.requires_grad_(tensor.requires_grad) if tensor.requires_grad else meta


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _meta_tensor(value)
    if isinstance(value, list):
        return [_to_meta(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


#: the scalars a signature takes with their type, the common case first
_SCALARS = frozenset((bool, int, float, str, type(None)))


def signature(value: Any) -> Hashable:
    """A hashable description of an argument structure: tensors by shape, strides, dtype and whether they
    require gradients (never their values), plain values with their type (``1``, ``1.0`` and ``True``
    hash alike, but give different dtypes). (``map``, not generators: one call fewer per item, on every op.)"""
    kind = type(value)
    if kind in _SCALARS:
        return (kind.__name__, value)
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.stride(), value.dtype, value.requires_grad)
    if isinstance(value, (list, tuple)):
        return (kind.__name__, *map(signature, value))
    if isinstance(value, dict):
        return ("D", *zip(value.keys(), map(signature, value.values())))
    if isinstance(value, slice):
        return ("S", signature(value.start), signature(value.stop), signature(value.step))
    return (type(value).__name__, value)


class _Counter(TorchDispatchMode):
    """Adds up the bytes of every tensor the ops under it make, the most any one call builds inside
    and drops (``scratch``), and their work: torch's own formulas for matmuls, convolutions and
    attention (floating point operations); for any other op that makes a tensor, its inputs read
    (``element_work``) and its outputs written (``OUTPUT_WORK``; an output element of a pooling op reads
    its whole window). A dispatch mode on this thread only: torch's FlopCounterMode would also install
    module hooks for every thread of the process."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0
        self.flops = 0
        self.scratch = 0
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        budget.check()  # each call is cheap on the meta device; how many a description makes is not
        self.calls += 1
        kwargs = kwargs or {}
        op = func.overloadpacket
        operands = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        _check_same_dtype(op, operands)
        out = func(*args, **kwargs)
        inputs = {storage_key(t.untyped_storage()) for t in operands}
        made = [t for t in tree_flatten(out)[0]  # views and aliases of an input make nothing new
                if isinstance(t, torch.Tensor) and storage_key(t.untyped_storage()) not in inputs]
        self.nbytes += sum(t.numel() * t.element_size() for t in made)
        self.scratch = max(self.scratch, _scratch(op, args, operands, made))
        formula = flop_registry.get(op)
        if op is _ATEN.embedding_renorm_ and len(args) > 1:
            self.flops += args[1].numel() * RENORM_WORK_PER_INDEX
        elif made or formula is not None:
            self.flops += _call_work(op, args, kwargs, out, operands, made, formula)
        elif op.__name__.endswith("_") and operands:  # in place (dropout's mask): it writes its first operand
            self.flops += OUTPUT_WORK * operands[0].numel()
        elif torch.is_grad_enabled():  # a view: free now, but its backward fills a gradient of its whole input
            self.flops += OUTPUT_WORK * sum(t.numel() for t in operands if t.requires_grad)
        return out


#: ops whose CPU kernels refuse operands of different dtypes, where the meta kernels do not check (``mv``
#: and ``addmv``: a matrix times a vector, ``x @ v`` of uint8 rows and a float weight vector)
_SAME_DTYPE_OPS = frozenset({_ATEN.mm, _ATEN.addmm, _ATEN.bmm, _ATEN.baddbmm, _ATEN.mv, _ATEN.addmv,
                             _ATEN.convolution})


def _check_same_dtype(op: Any, operands: Sequence[torch.Tensor]) -> None:
    """Refuse on the meta device what the CPU kernel would: a float model's matmul on uint8 rows passed
    the sizing and failed on the rows, where its words were withheld; dtypes are public (``datasets``
    lists a dataset's feature_dtype), so this error may leave."""
    if op not in _SAME_DTYPE_OPS:
        return
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in operands})
    if len(dtypes) > 1:
        raise RuntimeError(f"{op.__name__} of tensors of different dtypes ({' and '.join(dtypes)}): give the "
                           "inputs the model's dtype (rows saved as float32 for a float32 model)")


def _call_work(op: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any, operands: list[torch.Tensor],
               made: list[torch.Tensor], formula: Any) -> int:
    """One call's work: its operands read and its outputs written, each times the call's measured
    multiplier (``opwork``), and for a matmul or convolution torch's flop formula (times its own), whichever
    is more (a 1x1 convolution over a million tiny images does few flops and runs 67 ns an element)."""
    normalized = op in _NORMALIZED and bool(made) and len(args) > 1 and made[0].dim() > 0
    innermost = normalized and all(size == 1 for size in made[0].shape[args[1] % made[0].dim() + 1:])
    reads, writes, flops = op_work(op, operands, made, innermost)
    per_output = OUTPUT_WORK * _window(op, args)
    if made and op is _ATEN.pow and not made[0].is_floating_point():
        per_output = INTEGER_POW_WORK
    elif op is _ATEN.index:  # every output element reads every index tensor (the operands after the input)
        per_output = OUTPUT_WORK * len(operands)
    read = sum(element_work(t) for t in operands)
    written = per_output * sum(t.numel() for t in made)
    if normalized:  # the measured part is per row
        rows = made[0].numel() // max(1, made[0].shape[args[1]])
        units = reads * read + written + writes * OUTPUT_WORK * rows
    else:
        units = reads * read + writes * written
    if formula is not None:
        units = max(units, flops * int(formula(*args, **kwargs, out_val=out)) * _flop_work(operands))
    return math.ceil(units)


def _flop_work(operands: list[torch.Tensor]) -> int:
    """Work per floating point operation of a matmul or convolution on these operands' dtype."""
    dtype = operands[0].dtype if operands else torch.float32
    return FLOP_WORK.get(dtype, 1) if dtype.is_floating_point else INTEGER_FLOP_WORK


def _scratch(op: Any, args: Sequence[Any], operands: list[torch.Tensor], made: list[torch.Tensor]) -> int:
    """Bytes one call builds inside and drops, which no dispatch shows: a convolution's unfolded input
    (torch's slow path for one small image: (input channels x kernel) x output positions, per image), and
    an operand widened to the dtype the call computes in (``sum`` of bools counts in int64, a uint8
    compared with a float64 is first cast to float64, half floats are reduced in float32), and the
    operands an integer matmul copies."""
    if op is _ATEN.convolution and len(args) > 1 and made:
        weight, output = args[1], made[0]
        return output.shape[0] * math.prod(weight.shape[1:]) * math.prod(output.shape[2:]) * weight.element_size()
    if not made or op in _CASTS:
        return 0
    if op in _MATMULS and not made[0].is_floating_point():  # the integer gemm copies its operands
        return sum(t.numel() * t.element_size() for t in operands)
    dtypes = [t.dtype for t in (*operands, *made)]
    wide = functools.reduce(torch.promote_types, dtypes)
    if wide in (torch.float16, torch.bfloat16):  # CPU kernels reduce and normalize half floats in float32
        wide = torch.float32
    return sum(t.numel() * wide.itemsize for t in operands if t.dtype != wide and t.numel() > 1)


def _window(op: Any, args: Sequence[Any]) -> int:
    """How many input elements each output element of ``op`` reads: its pooling window, else 1."""
    if op in _WINDOWED and len(args) > 1:
        kernel = list(args[1]) if isinstance(args[1], (list, tuple)) else [args[1]]
        return math.prod(kernel * _WINDOWED[op] if len(kernel) == 1 else kernel)
    if op in _ADAPTIVE and len(args) > 1 and isinstance(args[0], torch.Tensor):
        sizes = list(args[1]) if isinstance(args[1], (list, tuple)) else [args[1]]
        inputs = args[0].shape[-len(sizes):]
        return math.prod(-(-int(i) // max(1, int(o))) + 1 for i, o in zip(inputs, sizes))
    return 1


__all__ = ["Coster", "Footprint", "INLINE_NUMEL", "OpCost", "OutputSize", "STRIDED_WORK_PER_DIM", "WORK_PER_SECOND",
           "check_work", "copy_units", "element_work", "parameter_copies", "signature", "spec_digest", "work_budget"]
