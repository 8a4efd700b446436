"""The allowlist of tensor operations, with one schema per op: the single table both sides use.

The client turns pointer methods and operators into ``op`` commands naming an entry here; the worker
looks the name up, checks the call against the op's schema (``check_call``) and only then calls the
function. Forward programs of described models (see ``fedzmq.modeldesc``) call the same functions
through the same check, node by node: there is one command set, not two. Anything not named here
cannot run remotely.

A schema says which arguments an op takes, by position and by keyword, and what each may be:
a tensor, a bounded number, a few ints (sizes, dims), a dtype, an index. So an op never gets an
``out=`` or ``inplace=`` argument (nothing writes into a tensor it did not make), never computes on
plain Python numbers alone (``pow(10, 10**8)`` would hold the interpreter for minutes), and never
gets a tensor where torch would read it as a size (an error message would print its value).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from .errors import BadRequest, UnknownCommand

#: the largest int an operand or size may be (int64), and the most dims, tensors in a list, or
#: elements in an index list an op takes
MAX_INT = 2**63 - 1
MAX_DIMS = 32
MAX_TENSORS = 1024
MAX_INDEX_LIST = 64


# --- what an argument may be ----------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return type(value) is int and -MAX_INT <= value <= MAX_INT


def _is_number(value: Any) -> bool:
    return type(value) in (bool, float) or _is_int(value)


def _is_ints(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, (list, tuple)) and len(value) <= MAX_DIMS
                              and all(_is_int(v) for v in value))


def _is_index_item(value: Any) -> bool:
    # index tensors of int64 only (a bool mask is refused later: its result's size depends on its values):
    # torch converts others to int64 expanded to the result's shape, inside the call (a red team's 32
    # int32 indices of (2048, 1) and (1, 2048) built 1 GB beside a 4 MiB result). Not 0-dim: torch's meta
    # kernel reads its value (``.item()``), so such an index cannot be sized before it runs (with four
    # broadcasting index tensors beside it, a 2 KB request made 483 MiB under a 16 MiB quota); an int does it
    if isinstance(value, torch.Tensor):
        return value.dtype in (torch.int64, torch.bool) and value.dim() > 0
    if value is None or value is Ellipsis or _is_int(value) or type(value) is bool:
        return True
    if isinstance(value, slice):
        return all(v is None or _is_int(v) for v in (value.start, value.stop, value.step))
    return isinstance(value, list) and len(value) <= MAX_INDEX_LIST and all(_is_int(v) for v in value)


KINDS: dict[str, Callable[[Any], bool]] = {
    "tensor": lambda v: isinstance(v, torch.Tensor),
    "tensor?": lambda v: v is None or isinstance(v, torch.Tensor),
    "operand": lambda v: isinstance(v, torch.Tensor) or _is_number(v),
    "tensors": lambda v: (isinstance(v, (list, tuple)) and 0 < len(v) <= MAX_TENSORS
                          and all(isinstance(t, torch.Tensor) for t in v)),
    "int": _is_int,
    "int?": lambda v: v is None or _is_int(v),
    "ints": _is_ints,
    "ints?": lambda v: v is None or _is_ints(v),
    "int|tensor": lambda v: _is_int(v) or isinstance(v, torch.Tensor),
    "number": _is_number,
    "bool": lambda v: type(v) is bool,
    "dtype?": lambda v: v is None or isinstance(v, torch.dtype),
    "reduction": lambda v: v in ("mean", "sum", "none"),
    "approximate": lambda v: v in ("none", "tanh"),
    "index": lambda v: _is_index_item(v) or (isinstance(v, tuple) and len(v) <= MAX_DIMS
                                             and all(_is_index_item(i) for i in v)),
}


@dataclass(frozen=True)
class OpSchema:
    """How an op may be called: its positional parameters in order (name, kind), the names among them
    that may also come by keyword, extra keyword-only parameters, and a kind for any further
    positional arguments (``x.reshape(2, 3)``), if it takes them."""

    fn: Callable[..., Any]
    params: tuple[tuple[str, str], ...]
    required: int = 1
    keywords: frozenset[str] = frozenset()
    keyword_only: dict[str, str] = field(default_factory=dict)
    varargs: str | None = None
    #: an op whose first argument is the tensor, callable as a pointer method (``ptr.sum(dim=1)``)
    method: bool = True
    #: parameters whose values torch checks as the op runs (an index in range, a class in range, a
    #: probability in [0, 1]): "all" tensors there, or only "integer" ones (a divisor, for zero). The
    #: op can fail on those values, not only on shapes, so whether it failed tells something of them
    checks_values: dict[str, str] = field(default_factory=dict)
    #: a loss computed element by element over the broadcast of its input with its target and weights
    #: (``check_loss_shapes``)
    elementwise_loss: bool = False
    #: draws from torch's default generator (dropout): an in-process worker runs it with its own generator
    #: state (``fedzmq.worker.randomness``)
    draws_random: bool = False

    def kind_of_keyword(self, name: str) -> str | None:
        if name in self.keyword_only:
            return self.keyword_only[name]
        if name in self.keywords:
            return dict(self.params)[name]
        return None


def _op(fn: Callable[..., Any], *params: tuple[str, str], required: int = 1, keywords: Iterable[str] = (),
        keyword_only: dict[str, str] | None = None, varargs: str | None = None, method: bool = True,
        checks_values: dict[str, str] | None = None, draws_random: bool = False) -> OpSchema:
    return OpSchema(fn, tuple(params), required, frozenset(keywords), dict(keyword_only or {}), varargs, method,
                    dict(checks_values or {}), draws_random=draws_random)


def _max(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    result = torch.max(x, *args, **kwargs)
    return tuple(result) if isinstance(result, tuple) else result


def _min(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    result = torch.min(x, *args, **kwargs)
    return tuple(result) if isinstance(result, tuple) else result


def _relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)  # never in place: stored tensors (and the owner's datasets) must not change


def _dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    return F.dropout(x, p, training)


def _gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


def _binary(fn: Callable[..., Any], checks_values: dict[str, str] | None = None) -> OpSchema:
    return _op(fn, ("a", "operand"), ("b", "operand"), required=2, checks_values=checks_values)


def _unary(fn: Callable[..., Any]) -> OpSchema:
    return _op(fn, ("input", "tensor"))


def _loss(fn: Callable[..., Any], checks: tuple[str, ...] = (), elementwise: bool = False,
          **keyword_only: str) -> OpSchema:
    schema = _op(fn, ("input", "tensor"), ("target", "tensor"), required=2, method=False,
                 keyword_only={"reduction": "reduction", **keyword_only}, checks_values=dict.fromkeys(checks, "all"))
    return replace(schema, elementwise_loss=elementwise)


def check_loss_shapes(name: str, input: torch.Tensor, *others: torch.Tensor | None) -> None:
    """Refuse an elementwise loss whose target or weights would broadcast its input to a bigger shape.
    torch computes such a loss inside one call, over the broadcast shape, and returns one value: an
    (N, 1) input against an (N,) target is N x N terms, built where no sizing sees them (a red team ran
    1.5 GB past a 1 MiB quota), and rarely the loss meant (torch warns of it). Shapes only."""
    schema = SCHEMAS.get(name)
    if schema is None or not schema.elementwise_loss or not isinstance(input, torch.Tensor):  # (torch refuses
        return  # a non-tensor itself)
    for other in others:
        if not isinstance(other, torch.Tensor):
            continue
        try:
            shape = torch.broadcast_shapes(input.shape, other.shape)
        except RuntimeError:  # shapes torch refuses itself, with its own error, before computing
            continue
        if shape != input.shape:
            raise BadRequest.new(f"{name}: an input of shape {tuple(input.shape)} would broadcast against a "
                                 f"target or weight of shape {tuple(other.shape)} to {tuple(shape)}; give the "
                                 "target the input's shape (a model ending in Linear(..., 1) for labels of "
                                 "shape (B,): end it with Flatten(0))")



SCHEMAS: dict[str, OpSchema] = {
    # arithmetic operators
    **{name: _binary(fn) for name, fn in (("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                                          ("truediv", operator.truediv), ("pow", operator.pow))},
    # an integer division by zero raises
    **{name: _binary(fn, {"b": "integer"}) for name, fn in (("floordiv", operator.floordiv), ("mod", operator.mod))},
    "matmul": _op(operator.matmul, ("a", "tensor"), ("b", "tensor"), required=2),
    "neg": _unary(operator.neg),
    "abs": _unary(torch.abs),
    # comparisons
    **{name: _binary(fn) for name, fn in (("eq", operator.eq), ("ne", operator.ne), ("lt", operator.lt),
                                          ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge))},
    # reductions
    "sum": _op(torch.sum, ("input", "tensor"), ("dim", "ints?"), ("keepdim", "bool"), keywords=("dim", "keepdim"),
               keyword_only={"dtype": "dtype?"}),
    "mean": _op(torch.mean, ("input", "tensor"), ("dim", "ints?"), ("keepdim", "bool"), keywords=("dim", "keepdim"),
                keyword_only={"dtype": "dtype?"}),
    "max": _op(_max, ("input", "tensor"), ("dim", "int|tensor"), ("keepdim", "bool"), keywords=("dim", "keepdim")),
    "min": _op(_min, ("input", "tensor"), ("dim", "int|tensor"), ("keepdim", "bool"), keywords=("dim", "keepdim")),
    "amax": _op(torch.amax, ("input", "tensor"), ("dim", "ints"), ("keepdim", "bool"), keywords=("dim", "keepdim")),
    "amin": _op(torch.amin, ("input", "tensor"), ("dim", "ints"), ("keepdim", "bool"), keywords=("dim", "keepdim")),
    "argmax": _op(torch.argmax, ("input", "tensor"), ("dim", "int?"), ("keepdim", "bool"),
                  keywords=("dim", "keepdim")),
    "argmin": _op(torch.argmin, ("input", "tensor"), ("dim", "int?"), ("keepdim", "bool"),
                  keywords=("dim", "keepdim")),
    # shapes (the Tensor methods take sizes both as a tuple and as varargs: x.reshape(2, 6), x.reshape((2, 6)))
    "reshape": _op(torch.Tensor.reshape, ("input", "tensor"), varargs="ints"),
    "view": _op(torch.Tensor.view, ("input", "tensor"), varargs="ints"),
    "flatten": _op(torch.Tensor.flatten, ("input", "tensor"), ("start_dim", "int"), ("end_dim", "int"),
                   keywords=("start_dim", "end_dim")),
    "transpose": _op(torch.Tensor.transpose, ("input", "tensor"), ("dim0", "int"), ("dim1", "int"), required=3),
    "permute": _op(torch.Tensor.permute, ("input", "tensor"), varargs="ints"),
    "squeeze": _op(torch.Tensor.squeeze, ("input", "tensor"), ("dim", "ints?"), keywords=("dim",)),
    "unsqueeze": _op(torch.Tensor.unsqueeze, ("input", "tensor"), ("dim", "int"), required=2, keywords=("dim",)),
    "t": _unary(torch.Tensor.t),
    "getitem": _op(operator.getitem, ("input", "tensor"), ("index", "index"), required=2, method=False,
                   checks_values={"index": "all"}),
    "cat": _op(torch.cat, ("tensors", "tensors"), ("dim", "int"), keywords=("dim",), method=False),
    "stack": _op(torch.stack, ("tensors", "tensors"), ("dim", "int"), keywords=("dim",), method=False),
    "detach": _unary(torch.detach),
    "clone": _unary(torch.clone),
    "float": _unary(torch.Tensor.float),
    "long": _unary(torch.Tensor.long),
    # elementwise functions
    "relu": _unary(_relu),
    "sigmoid": _unary(torch.sigmoid),
    "tanh": _unary(torch.tanh),
    "exp": _unary(torch.exp),
    "log": _unary(torch.log),
    "sqrt": _unary(torch.sqrt),
    "softmax": _op(F.softmax, ("input", "tensor"), ("dim", "int"), keywords=("dim",), keyword_only={"dtype": "dtype?"}),
    "log_softmax": _op(F.log_softmax, ("input", "tensor"), ("dim", "int"), keywords=("dim",),
                       keyword_only={"dtype": "dtype?"}),
    "gelu": _op(_gelu, ("input", "tensor"), keyword_only={"approximate": "approximate"}),
    "dropout": _op(_dropout, ("input", "tensor"), ("p", "number"), ("training", "bool"), keywords=("p", "training"),
                   draws_random=True),
    "linear": _op(F.linear, ("input", "tensor"), ("weight", "tensor"), ("bias", "tensor?"), required=2,
                  keywords=("bias",), method=False),
    # losses
    "mse_loss": _loss(F.mse_loss, elementwise=True),
    "l1_loss": _loss(F.l1_loss, elementwise=True),
    "cross_entropy": _loss(F.cross_entropy, ("target",), weight="tensor?", ignore_index="int",
                           label_smoothing="number"),
    "nll_loss": _loss(F.nll_loss, ("target",), weight="tensor?", ignore_index="int"),
    "binary_cross_entropy": _loss(F.binary_cross_entropy, ("input", "target"), elementwise=True, weight="tensor?"),
    "binary_cross_entropy_with_logits": _loss(F.binary_cross_entropy_with_logits, elementwise=True,
                                              weight="tensor?", pos_weight="tensor?"),
}

#: op name -> function, for looking ops up
OPS: dict[str, Callable[..., Any]] = {name: schema.fn for name, schema in SCHEMAS.items()}

#: ops whose first argument is the tensor, callable as pointer methods (``ptr.sum(dim=1)``)
METHODS: frozenset[str] = frozenset(name for name, schema in SCHEMAS.items() if schema.method)

#: Python operators on pointers: dunder name -> (op name, whether the operands are swapped)
OPERATORS: dict[str, tuple[str, bool]] = {
    **{f"__{n}__": (n, False) for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
                                          "eq", "ne", "lt", "le", "gt", "ge")},
    **{f"__r{n}__": (n, True) for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul")},
    "__neg__": ("neg", False),
    "__abs__": ("abs", False),
}


def check_call(name: str, args: list[Any] | tuple[Any, ...], kwargs: dict[str, Any]) -> OpSchema:
    """Check a call of op ``name`` against its schema; returns the schema, or raises ``BadRequest``
    (``UnknownCommand`` for a name not on the allowlist). Messages name positions, parameters and types,
    never values: a value may have been computed from private data."""
    schema = SCHEMAS.get(name)
    if schema is None:
        raise UnknownCommand.new(f"operation {name!r} is not on the worker's allowlist")
    if len(args) < schema.required:
        raise BadRequest.new(f"{name}: takes at least {schema.required} positional argument(s), got {len(args)}")
    if len(args) > len(schema.params) and schema.varargs is None:
        raise BadRequest.new(f"{name}: takes at most {len(schema.params)} positional argument(s), got {len(args)}")
    for position, value in enumerate(args):
        if position < len(schema.params):
            param, kind = schema.params[position]
        else:
            param, kind = f"size {position - len(schema.params)}", schema.varargs or "ints"
        if not KINDS[kind](value):
            raise BadRequest.new(f"{name}: argument {param!r} must be {_DESCRIBE[kind]}, got {_type_name(value)}")
    if schema.varargs is not None and len(args) > len(schema.params) + 1 and not all(_is_int(v) for v in args[1:]):
        raise BadRequest.new(f"{name}: sizes must be ints")
    given = {p for p, _ in schema.params[:len(args)]}
    for key, value in kwargs.items():
        keyword_kind = schema.kind_of_keyword(key)
        if keyword_kind is None:
            raise BadRequest.new(f"{name}: does not take the keyword {key!r}"
                                 + (" (nothing is computed in place)" if key in ("out", "inplace") else ""))
        if key in given:
            raise BadRequest.new(f"{name}: {key!r} given twice")
        if not KINDS[keyword_kind](value):
            raise BadRequest.new(f"{name}: {key!r} must be {_DESCRIBE[keyword_kind]}, got {_type_name(value)}")
    if not any(_holds_tensor(v) for v in (*args, *kwargs.values())):
        raise BadRequest.new(f"{name}: at least one operand must be a tensor (ops compute on tensors, "
                             "not on plain numbers)")
    if schema.elementwise_loss:
        check_loss_shapes(name, args[0], *args[1:2], *(v for v in kwargs.values() if isinstance(v, torch.Tensor)))
    return schema


_DESCRIBE = {
    "tensor": "a tensor", "tensor?": "a tensor or None", "operand": "a tensor or a number",
    "tensors": f"a list of 1 to {MAX_TENSORS} tensors", "int": "an int", "int?": "an int or None",
    "ints": f"an int or up to {MAX_DIMS} ints", "ints?": f"None, an int or up to {MAX_DIMS} ints",
    "int|tensor": "an int (a dim) or a tensor", "number": "a number", "bool": "a bool",
    "dtype?": "a dtype or None", "reduction": "'mean', 'sum' or 'none'", "approximate": "'none' or 'tanh'",
    "index": f"an index (ints, slices, None, ..., int64 tensors of 1 or more dims (not 0-dim: use an int), lists of "
             f"up to {MAX_INDEX_LIST} ints)",
}


def value_checked(name: str, args: list[Any] | tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a call of op ``name`` whose values torch checks as it runs, with their parameter's
    name (``OpSchema.checks_values``); [] for an op not on the allowlist (``check_call`` refuses it)."""
    schema = SCHEMAS.get(name)
    if schema is None or not schema.checks_values:
        return []
    named = [(param, value) for (param, _), value in zip(schema.params, args)] + list(kwargs.items())
    return [(param, tensor) for param, value in named if param in schema.checks_values
            for tensor in _tensors_in(value)
            if schema.checks_values[param] == "all" or not tensor.is_floating_point()]


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _type_name(value: Any) -> str:
    return type(value).__name__


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value)


def output_count(op: str, args: list[Any], kwargs: dict[str, Any]) -> int:
    """How many tensors an op returns: max/min over a dim return (values, indices)."""
    if op in ("max", "min") and (len(args) > 1 and type(args[1]) is int or "dim" in kwargs):
        return 2
    return 1


#: the inverse table, used to describe forward programs: function object -> op name. Functions that
#: torch spells twice (``torch.relu`` and ``F.relu``) with the same meaning map to the same name.
OP_NAMES: dict[Any, str] = {
    **{fn: name for name, fn in reversed(list(OPS.items()))},
    torch.relu: "relu",
    F.relu: "relu",
    F.dropout: "dropout",
    F.gelu: "gelu",
    torch.softmax: "softmax",
    torch.log_softmax: "log_softmax",
    F.sigmoid: "sigmoid",
    F.tanh: "tanh",
    torch.add: "add",
    torch.sub: "sub",
    torch.mul: "mul",
    torch.matmul: "matmul",
    torch.neg: "neg",
    torch.reshape: "reshape",
    torch.flatten: "flatten",
    torch.transpose: "transpose",
    torch.permute: "permute",
    torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze",
}
