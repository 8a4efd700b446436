"""What the client knows of a remote tensor's shape and dtype, without asking the worker.

A pointer to a value the client sent knows it from the tensor; a pointer to a dataset's tensor from the
dataset's description; a gradient has its leaf's. An op's output is worked out by running the same op
(``fedzmq.ops.OPS``, the table the worker runs) on the meta device, where tensors have shapes and
dtypes but no data. That costs tens to hundreds of microseconds per op (more than sending it), so it is
done only when ``shape`` or ``dtype`` is first read, and remembered: a pipelined chain of ops pays
nothing unless someone looks. A pending op holds the meta of its inputs, never their pointers (which
would keep the remote values alive); a chain left unread is worked out once it is ``MAX_PENDING``
ops deep, so it neither grows without bound nor needs deep recursion.

What the client cannot work out (a module's forward runs only on the worker; an op whose output size
depends on the data, which the meta device refuses, as the worker does) is unknown: ``await ptr.info()``
asks the worker once. The worker computes with torch's default dtype of its own process; a client that
changed its default dtype may see another dtype for an op that promotes an int to a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from ..errors import FedzmqError
from ..ops import OPS
from ..torchmodes import default_modes

#: ops of a chain left unread before the client works out its shapes anyway
MAX_PENDING = 64


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """A tensor's shape and dtype."""

    shape: torch.Size
    dtype: torch.dtype

    @staticmethod
    def of(tensor: torch.Tensor) -> "TensorMeta":
        return TensorMeta(tensor.shape, tensor.dtype)

    def empty(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    def __str__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"


class _Unknown(FedzmqError):
    """An input's meta is unknown: so is the op's (raised and caught here only; the class also stands
    for an unknown input among an op's arguments)."""


class OpMeta:
    """The outputs' meta of one op, worked out on the meta device the first time it is asked for."""

    __slots__ = ("op", "args", "kwargs", "depth", "outputs")

    def __init__(self, op: str, args: Any, kwargs: Any, depth: int) -> None:
        self.op, self.args, self.kwargs, self.depth = op, args, kwargs, depth
        self.outputs: tuple[TensorMeta | None, ...] | None = None

    def resolve(self) -> tuple[TensorMeta | None, ...]:
        if self.outputs is None:
            try:
                args, kwargs = _materialize(self.args), _materialize(self.kwargs)
                with default_modes():  # as the worker runs ops: grad on, autocast off (one synchronous block)
                    result = OPS[self.op](*args, **kwargs)
                results = result if isinstance(result, tuple) else (result,)
                self.outputs = tuple(TensorMeta.of(r) if isinstance(r, torch.Tensor) else None for r in results)
            except Exception:  # an unknown input, or shapes the op refuses: the worker will say why
                self.outputs = ()
            self.args = self.kwargs = None  # the inputs' meta is no longer needed
            self.depth = 0
        return self.outputs


class OpOutput:
    """Output ``index`` of an op with several (max over a dim): where its pointer gets its shape and dtype.
    The pointer to an op's only output holds the ``OpMeta`` itself."""

    __slots__ = ("op", "index")

    def __init__(self, op: OpMeta, index: int) -> None:
        self.op, self.index = op, index

    def resolve(self) -> TensorMeta | None:
        outputs = self.op.resolve()
        return outputs[self.index] if self.index < len(outputs) else None


#: what a pointer holds: its meta, the op that will tell it, or None (unknown)
Meta = Union[TensorMeta, OpMeta, OpOutput, None]


def known(meta: Meta) -> TensorMeta | None:
    """The shape and dtype, working them out now if an op still has to."""
    if isinstance(meta, OpMeta):
        outputs = meta.resolve()
        return outputs[0] if outputs else None
    return meta.resolve() if isinstance(meta, OpOutput) else meta


def _pending_depth(meta: Meta) -> int:
    op = meta.op if isinstance(meta, OpOutput) else meta
    return op.depth if isinstance(op, OpMeta) and op.outputs is None else 0


def op_outputs(op: str, args: list[Any], kwargs: dict[str, Any], count: int, pointer_type: type,
               meta_of: Callable[[Any], Meta]) -> list[Meta]:
    """The meta of an op's ``count`` outputs, to be worked out when read. Values of ``pointer_type`` among
    the arguments stand for their ``meta_of(pointer)``; local tensors for their own meta. Cheap: it only
    notes the inputs' meta (a few microseconds, on the path of every pipelined op)."""
    depth = [0]
    # scalars (the 1 of x + 1) as they are, without a call and its type checks each
    stripped_args = [value if type(value) in _SCALARS else _strip(value, pointer_type, meta_of, depth)
                     for value in args]
    stripped_kwargs = {k: _strip(v, pointer_type, meta_of, depth) for k, v in kwargs.items()} if kwargs else kwargs
    pending = OpMeta(op, stripped_args, stripped_kwargs, depth[0] + 1)
    if pending.depth > MAX_PENDING:
        pending.resolve()
    return [pending] if count == 1 else [OpOutput(pending, index) for index in range(count)]


#: arguments that hold no pointer and no tensor
_SCALARS = frozenset((bool, int, float, str, type(None)))


def _strip(value: Any, pointer_type: type, meta_of: Callable[[Any], Meta], depth: list[int]) -> Any:
    """An argument with pointers replaced by their meta and local tensors by theirs (``depth[0]``: the
    deepest pending chain among them)."""
    if isinstance(value, pointer_type):
        meta = meta_of(value)
        if meta is None:
            return _Unknown
        pending = _pending_depth(meta)
        if pending > depth[0]:
            depth[0] = pending
        return meta
    if isinstance(value, torch.Tensor):
        return TensorMeta.of(value)  # a local tensor: its meta, not its memory
    if isinstance(value, (list, tuple)):
        return type(value)(_strip(v, pointer_type, meta_of, depth) for v in value)
    if isinstance(value, dict):
        return {k: _strip(v, pointer_type, meta_of, depth) for k, v in value.items()}
    return value


def _materialize(value: Any) -> Any:
    if value is _Unknown:
        raise _Unknown
    if isinstance(value, (OpMeta, OpOutput)):
        value = known(value)
        if value is None:
            raise _Unknown
    if isinstance(value, TensorMeta):
        return value.empty()
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v) for v in value)
    if isinstance(value, dict):
        return {k: _materialize(v) for k, v in value.items()}
    return value


__all__ = ["MAX_PENDING", "Meta", "OpMeta", "OpOutput", "TensorMeta", "known", "op_outputs"]
