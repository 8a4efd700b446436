"""Local training and evaluation on a worker's own dataset: one command, no round trip per batch."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadRequest
from ..optimizers import OPTIMIZERS
from .datasets import Dataset

#: losses ``fit`` and ``evaluate`` accept, by name
LOSSES = {
    "cross_entropy": F.cross_entropy,
    "nll_loss": F.nll_loss,
    "mse_loss": F.mse_loss,
    "l1_loss": F.l1_loss,
    "binary_cross_entropy": F.binary_cross_entropy,
    "binary_cross_entropy_with_logits": F.binary_cross_entropy_with_logits,
}


def loss_function(name: str) -> Any:
    if name not in LOSSES:
        raise BadRequest.new(f"loss {name!r} is not on the allowlist {sorted(LOSSES)}")
    return LOSSES[name]


def make_optimizer(spec: dict[str, Any], module: nn.Module) -> torch.optim.Optimizer:
    """An optimizer from ``{"cls": "SGD", "lr": 0.1, ...}``, hyper-parameters checked against the allowlist."""
    if not isinstance(spec, dict):
        raise BadRequest.new("optimizer must be a map like {'cls': 'SGD', 'lr': 0.1}")
    name = spec.get("cls")
    if name not in OPTIMIZERS:
        raise BadRequest.new(f"optimizer {name!r} is not on the allowlist {sorted(OPTIMIZERS)}")
    cls, allowed = OPTIMIZERS[name]
    hyper = {k: v for k, v in spec.items() if k != "cls"}
    unknown = set(hyper) - allowed
    if unknown:
        raise BadRequest.new(f"{name} does not take {sorted(unknown)} (allowed: {sorted(allowed)})")
    for key, value in hyper.items():
        if not (type(value) in (int, float, bool) or (isinstance(value, (list, tuple)) and len(value) <= 4
                                                      and all(type(v) in (int, float) for v in value))):
            raise BadRequest.new(f"hyper-parameter {key!r} must be a number, bool or tuple of numbers")
    return cls(module.parameters(), **hyper)


def _labels_for(loss_name: str, labels: torch.Tensor) -> torch.Tensor:
    if loss_name in ("mse_loss", "l1_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits"):
        return labels.float()
    return labels


def fit(module: nn.Module, dataset: Dataset, *, loss: str, optimizer: torch.optim.Optimizer,
        batch_size: int, epochs: int | None, steps: int | None, prox_mu: float, seed: int,
        first_step: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> dict[str, Any]:
    """Minibatch training of ``module`` on ``dataset``. FedProx adds (mu/2)·||w − w_start||² to the loss.

    The first step's forward and backward run inside ``first_step()``: the worker charges what autograd
    saves there against the session's quota, so a batch whose activations do not fit is refused. Later
    steps repeat its shapes, and charging each of them would cost a large part of a small model's step."""
    if batch_size < 1 or (epochs is None) == (steps is None) or (epochs or steps or 0) < 1:
        raise BadRequest.new("fit needs batch_size >= 1 and exactly one of epochs >= 1 or steps >= 1")
    if len(dataset) == 0:
        raise BadRequest.new(f"dataset {dataset.name} is empty")
    loss_fn = loss_function(loss)
    params = [p for p in module.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if prox_mu else []
    generator = torch.Generator().manual_seed(seed)
    batches_per_epoch = math.ceil(len(dataset) / batch_size)
    total_steps = steps if steps is not None else epochs * batches_per_epoch  # type: ignore[operator]
    module.train()
    started = time.perf_counter()
    loss_sum, seen, done = 0.0, 0, 0
    while done < total_steps:
        order = torch.randperm(len(dataset), generator=generator)
        for start in range(0, len(dataset), batch_size):
            if done == total_steps:
                break
            index = order[start:start + batch_size]
            x, y = dataset.features[index], _labels_for(loss, dataset.labels[index])
            optimizer.zero_grad()
            with contextlib.ExitStack() as first:
                if done == 0:
                    first.enter_context(_buffers_restored_on_error(module))
                    first.enter_context(first_step())
                value = loss_fn(module(x), y)
                objective = value
                if prox_mu:
                    objective = value + (prox_mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                objective.backward()
            optimizer.step()
            loss_sum += value.item() * len(index)
            seen += len(index)
            done += 1
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"training diverged on {dataset.name}: loss is {loss_sum}")
    return {"loss": loss_sum / seen, "samples_seen": seen, "num_examples": len(dataset), "steps": done,
            "seconds": time.perf_counter() - started}


@contextlib.contextmanager
def _buffers_restored_on_error(module: nn.Module) -> Iterator[None]:
    """Put the module's buffers back if the block fails: a first step refused midway (its activations
    over the quota) must not leave batch-norm statistics moved by a batch that never trained."""
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)
        raise


@torch.no_grad()
def evaluate(module: nn.Module, dataset: Dataset, *, loss: str, batch_size: int) -> dict[str, Any]:
    """Mean loss and, for class labels, accuracy of ``module`` on ``dataset``."""
    loss_fn = loss_function(loss)
    if batch_size < 1:
        raise BadRequest.new("evaluate needs batch_size >= 1")
    was_training = module.training
    module.train(False)
    loss_sum, correct, started = 0.0, 0, time.perf_counter()
    classify = not dataset.labels.dtype.is_floating_point
    try:
        for start in range(0, len(dataset), batch_size):
            x = dataset.features[start:start + batch_size].clone()  # never a view of the owner's data
            y = dataset.labels[start:start + batch_size].clone()
            out = module(x)
            loss_sum += loss_fn(out, _labels_for(loss, y), reduction="sum").item()
            if classify and out.dim() == 2:
                correct += int((out.argmax(dim=1) == y).sum())
    finally:
        module.train(was_training)
    n = max(1, len(dataset))
    return {"loss": loss_sum / n, "accuracy": correct / n if classify else None, "samples": len(dataset),
            "seconds": time.perf_counter() - started}
