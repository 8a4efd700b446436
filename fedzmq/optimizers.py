"""The optimizers a worker creates over a remote module, and the hyper-parameters each accepts.

Shared by the client (which reads them off a local optimizer) and the worker (which refuses anything
else)."""

from __future__ import annotations

from typing import Any

import torch

from .errors import BadRequest

#: the optimizer of a fit that names none, everywhere (``FitConfig``, ``ModulePointer.fit``, the CLI)
DEFAULT_OPTIMIZER: dict[str, Any] = {"cls": "SGD", "lr": 0.1}

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], frozenset[str]]] = {
    "SGD": (torch.optim.SGD, frozenset({"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"})),
    "Adam": (torch.optim.Adam, frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"})),
    "AdamW": (torch.optim.AdamW, frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"})),
    "RMSprop": (torch.optim.RMSprop, frozenset({"lr", "alpha", "eps", "weight_decay", "momentum", "centered",
                                                "maximize"})),
    "Adagrad": (torch.optim.Adagrad, frozenset({"lr", "lr_decay", "weight_decay", "initial_accumulator_value",
                                                "eps", "maximize"})),
}


def check_hyper(name: str, hyper: dict[str, Any]) -> None:
    """Refuse hyper-parameters optimizer ``name`` does not take, or that are not plain numbers."""
    allowed = OPTIMIZERS[name][1]
    unknown = set(hyper) - allowed
    if unknown:
        raise BadRequest.new(f"{name} does not take {sorted(unknown)} (allowed: {sorted(allowed)})")
    for key, value in hyper.items():
        if not (type(value) in (int, float, bool) or (isinstance(value, (list, tuple)) and len(value) <= 4
                                                      and all(type(v) in (int, float) for v in value))):
            raise BadRequest.new(f"hyper-parameter {key!r} must be a number, bool or tuple of numbers")
