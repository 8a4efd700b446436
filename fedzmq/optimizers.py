"""The optimizers a worker creates over a remote module, and the hyper-parameters each accepts.

Shared by the client (which reads them off a local optimizer) and the worker (which refuses anything
else)."""

from __future__ import annotations

from typing import Any, Sequence

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


def plain_sgd_applies(name: str, hyper: dict[str, Any]) -> bool:
    """Whether ``PlainSGD`` stands in for ``torch.optim.SGD`` with these hyper-parameters: plain numbers
    only (anything else goes to torch, which raises its own errors for it)."""
    return name == "SGD" and all(type(v) in (int, float, bool) for v in hyper.values())


class PlainSGD:
    """``torch.optim.SGD`` on CPU tensors without its per-construction and per-step overhead, with the same
    results bit for bit: the same operations as torch's single-tensor SGD (the path it takes for CPU
    tensors), in the same order, on the same values. A daemon hosting a thousand clients makes one
    optimizer per client per round, and ``torch.optim.Optimizer.__init__`` (parameter groups, defaults,
    hooks, profiler labels) costs as much as a small model's training step.

    It keeps what a fit uses (``zero_grad``, ``step``) and nothing else: a remote optimizer
    (``optim_new``) is always ``torch.optim``'s own."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False) -> None:
        # the checks and messages of torch.optim.SGD.__init__
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        self.params = list(params)
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.nesterov, self.maximize = weight_decay, nesterov, maximize
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad = None

    def step(self) -> None:
        lr, momentum, weight_decay = self.lr, self.momentum, self.weight_decay
        with torch.no_grad():
            for i, param in enumerate(self.params):
                if param.grad is None:
                    continue
                grad = param.grad if not self.maximize else -param.grad
                if weight_decay != 0:
                    grad = grad.add(param, alpha=weight_decay)
                if momentum != 0:
                    buf = self.buffers[i]
                    if buf is None:
                        buf = self.buffers[i] = grad.detach().clone()
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1 - self.dampening)
                    grad = grad.add(buf, alpha=momentum) if self.nesterov else buf
                param.add_(grad, alpha=-lr)
