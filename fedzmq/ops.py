"""The allowlist of tensor operations a worker runs: the single table both sides use.

The client turns pointer methods and operators into ``op`` commands naming an entry here; the worker
looks the name up and calls the function, and forward programs of described models (see
``fedzmq.modeldesc``) may call only these functions. Anything not named here cannot run remotely.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F


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


OPS: dict[str, Callable[..., Any]] = {
    # arithmetic operators
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "pow": operator.pow,
    "matmul": operator.matmul,
    "neg": operator.neg,
    "abs": torch.abs,
    # comparisons
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    # reductions
    "sum": torch.sum,
    "mean": torch.mean,
    "max": _max,
    "min": _min,
    "amax": torch.amax,
    "amin": torch.amin,
    "argmax": torch.argmax,
    "argmin": torch.argmin,
    # shapes
    "reshape": torch.Tensor.reshape,
    "view": torch.Tensor.view,
    "flatten": torch.Tensor.flatten,
    "transpose": torch.Tensor.transpose,
    "permute": torch.Tensor.permute,
    "squeeze": torch.Tensor.squeeze,
    "unsqueeze": torch.Tensor.unsqueeze,
    "t": torch.Tensor.t,
    "getitem": operator.getitem,
    "cat": torch.cat,
    "stack": torch.stack,
    "detach": torch.detach,
    "clone": torch.clone,
    "float": torch.Tensor.float,
    "long": torch.Tensor.long,
    # elementwise functions
    "relu": _relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "softmax": F.softmax,
    "log_softmax": F.log_softmax,
    "gelu": F.gelu,
    "dropout": _dropout,
    "linear": F.linear,
    # losses
    "mse_loss": F.mse_loss,
    "l1_loss": F.l1_loss,
    "cross_entropy": F.cross_entropy,
    "nll_loss": F.nll_loss,
    "binary_cross_entropy": F.binary_cross_entropy,
    "binary_cross_entropy_with_logits": F.binary_cross_entropy_with_logits,
}

#: ops whose first argument is the tensor, callable as pointer methods (``ptr.sum(dim=1)``)
METHODS: frozenset[str] = frozenset(
    set(OPS) - {"cat", "stack", "getitem", "linear", "mse_loss", "l1_loss", "cross_entropy", "nll_loss",
                "binary_cross_entropy", "binary_cross_entropy_with_logits"}
)

#: Python operators on pointers: dunder name -> (op name, whether the operands are swapped)
OPERATORS: dict[str, tuple[str, bool]] = {
    **{f"__{n}__": (n, False) for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
                                          "eq", "ne", "lt", "le", "gt", "ge")},
    **{f"__r{n}__": (n, True) for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul")},
    "__neg__": ("neg", False),
    "__abs__": ("abs", False),
}


def output_count(op: str, args: list[Any], kwargs: dict[str, Any]) -> int:
    """How many tensors an op returns: max/min over a dim return (values, indices)."""
    if op in ("max", "min") and (len(args) > 1 and type(args[1]) is int or "dim" in kwargs):
        return 2
    return 1


# Shape operations use the Tensor methods, which take sizes both as a tuple and as varargs
# (``x.reshape(2, 6)`` and ``x.reshape((2, 6))``), a superset of the torch functions.

#: the inverse table, used to describe forward programs: function object -> op name. Functions that
#: torch spells twice (``torch.relu`` and ``F.relu``) with the same meaning map to the same name.
OP_NAMES: dict[Any, str] = {
    **{fn: name for name, fn in reversed(list(OPS.items()))},
    torch.relu: "relu",
    F.relu: "relu",
    F.dropout: "dropout",
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
