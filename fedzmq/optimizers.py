"""The optimizers a worker creates over a remote module, and the hyper-parameters each accepts.

Shared by the client (which reads them off a local optimizer) and the worker (which refuses anything
else)."""

from __future__ import annotations

import torch

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], frozenset[str]]] = {
    "SGD": (torch.optim.SGD, frozenset({"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"})),
    "Adam": (torch.optim.Adam, frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"})),
    "AdamW": (torch.optim.AdamW, frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"})),
    "RMSprop": (torch.optim.RMSprop, frozenset({"lr", "alpha", "eps", "weight_decay", "momentum", "centered",
                                                "maximize"})),
    "Adagrad": (torch.optim.Adagrad, frozenset({"lr", "lr_decay", "weight_decay", "initial_accumulator_value",
                                                "eps", "maximize"})),
}
