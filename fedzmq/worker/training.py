"""Local training and evaluation on a worker's own dataset: one command, no round trip per batch.

These are the only code that reads a protected dataset's rows, and they keep the owner's terms
(``Terms``): every step trains on at least ``min_batch`` rows (an epoch's remainder smaller than that
is skipped, never trained on alone), the order of the rows is shuffled from a seed the daemon derives
from its own secret (a client cannot choose which rows share a batch), a fit processes at most
``max_samples`` rows in all, and metrics are aggregates over at least ``min_metric_rows`` rows.
Long work stops at its budget (``fedzmq.budget``): checked at every step and every batch.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import budget
from ..errors import BadRequest, LimitExceeded, PermissionDenied
from ..optimizers import OPTIMIZERS, check_hyper
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


@dataclass(frozen=True)
class Terms:
    """The data owner's terms for training and evaluating on its rows (``fedzmq-worker`` flags)."""

    min_batch: int = 16
    min_metric_rows: int = 16
    max_samples: int = 10_000_000
    #: the daemon's secret for shuffling: the order of rows is HMAC(key, dataset, client seed)
    shuffle_key: bytes = b""
    #: a fit's loss is reported as a sum of per-row terms (``row_terms``), as ``evaluate``'s always is:
    #: on a daemon that requires secure aggregation the loss is all that leaves unmasked, and a model
    #: that mixes the rows of its batch would make it one row's value. It is then the trained model's
    #: loss over the rows of its last epoch, not the mean of the steps' losses.
    row_metrics: bool = False


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
    hyper = {k: v for k, v in spec.items() if k != "cls"}
    check_hyper(name, hyper)
    return OPTIMIZERS[name][0](module.parameters(), **hyper)


def _labels_for(loss_name: str, labels: torch.Tensor) -> torch.Tensor:
    if loss_name in ("mse_loss", "l1_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits"):
        return labels.float()
    return labels


def shuffle_seed(terms: Terms, dataset: Dataset, client_seed: int, salt: str = "") -> int:
    """The seed of a fit's shuffle: the daemon's secret mixed with the client's seed (and, on a daemon
    hosting many clients, the client's id), so the same client seed repeats a run on this daemon but
    no client can pick which rows share a batch."""
    digest = hmac.new(terms.shuffle_key, f"{dataset.name}:{salt}:{client_seed}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def plan_steps(terms: Terms, rows: int, batch_size: int, epochs: int | None, steps: int | None) -> int:
    """Check a fit against the terms; returns how many steps it takes (``steps=0``: none, the model
    comes back as it was sent: a round trip without training, for measuring the framework itself)."""
    if steps == 0 and epochs is None:
        return 0
    if batch_size < 1 or (epochs is None) == (steps is None) or (epochs or steps or 0) < 1:
        raise BadRequest.new("fit needs batch_size >= 1 and exactly one of epochs >= 1 or steps >= 0")
    if batch_size < terms.min_batch:
        raise PermissionDenied.new(f"batch_size {batch_size} is below this worker's minimum of {terms.min_batch} "
                                   "rows per step (--min-batch-size): one step must not reveal a few rows")
    if rows < terms.min_batch:
        raise PermissionDenied.new(f"the dataset has {rows} rows, fewer than this worker's minimum batch of "
                                   f"{terms.min_batch} (--min-batch-size)")
    full, remainder = divmod(rows, batch_size) if batch_size <= rows else (1, 0)
    per_epoch = full + (remainder >= terms.min_batch)
    total = steps if steps is not None else epochs * per_epoch  # type: ignore[operator]
    samples = total * min(batch_size, rows)
    if samples > terms.max_samples:
        raise LimitExceeded.new(f"this fit would process {samples} rows, more than this worker allows in one fit "
                                f"({terms.max_samples}, --max-fit-samples)")
    return total


def batches(terms: Terms, rows: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches of row indexes: shuffled, and without a remainder smaller than the minimum."""
    order = torch.randperm(rows, generator=generator)
    batch_size = min(batch_size, rows)
    out = [order[start:start + batch_size] for start in range(0, rows, batch_size)]
    return [index for index in out if len(index) >= terms.min_batch]


#: the metrics a fit returns, in this order where they travel as a list (a fit over many clients)
METRICS = ("loss", "samples_seen", "num_examples", "steps", "seconds")


def fit(module: nn.Module, dataset: Dataset, terms: Terms, *, loss: str,
        optimizer: torch.optim.Optimizer | dict[str, Any], batch_size: int, epochs: int | None, steps: int | None,
        prox_mu: float, seed: int, salt: str = "") -> dict[str, Any]:
    """Minibatch training of ``module`` on ``dataset``. FedProx adds (mu/2)·||w − w_start||² to the loss.
    ``optimizer`` is one, or its description (made only when there is a step to take)."""
    if len(dataset) == 0:
        raise BadRequest.new(f"dataset {dataset.name} is empty")
    loss_fn = loss_function(loss)
    total_steps = plan_steps(terms, len(dataset), batch_size, epochs, steps)
    if total_steps == 0:
        return {"loss": 0.0, "samples_seen": 0, "num_examples": len(dataset), "steps": 0, "seconds": 0.0}
    if isinstance(optimizer, dict):
        optimizer = make_optimizer(optimizer, module)
    params = [p for p in module.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if prox_mu else []
    generator = torch.Generator().manual_seed(shuffle_seed(terms, dataset, seed, salt))
    module.train()
    started = time.perf_counter()
    loss_sum, seen, done = 0.0, 0, 0
    trained: list[torch.Tensor] = []  # the indexes of the last epoch's worth of batches (for row_metrics)
    while done < total_steps:
        for index in batches(terms, len(dataset), batch_size, generator):
            if done == total_steps:
                break
            budget.check()
            x, y = dataset.features[index], _labels_for(loss, dataset.labels[index])
            optimizer.zero_grad()
            value = loss_fn(module(x), y)
            objective = value
            if prox_mu:
                objective = value + (prox_mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            objective.backward()
            optimizer.step()
            loss_sum += value.item() * len(index)
            seen += len(index)
            done += 1
            if terms.row_metrics:
                trained.append(index)
                while sum(len(i) for i in trained) - len(trained[0]) >= len(dataset):
                    trained.pop(0)
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"training diverged on {dataset.name}: the loss is not finite")
    mean_loss = loss_sum / seen if seen else 0.0
    if terms.row_metrics:
        mean_loss = _row_loss(module, dataset, torch.cat(trained), loss, loss_fn)
    return {"loss": mean_loss, "samples_seen": seen, "num_examples": len(dataset),
            "steps": done, "seconds": time.perf_counter() - started}


def _row_loss(module: nn.Module, dataset: Dataset, index: torch.Tensor, loss: str, loss_fn: Any) -> float:
    """The trained model's mean loss over the rows of its last epoch, as per-row terms (``row_terms``):
    in eval mode (a row alone has no batch statistics), without gradients, once per fit (a pass per
    step would cost more than the training on small models)."""
    per_row = row_terms(module, loss, loss_fn, False)
    module.train(False)
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(index), 1024):
                budget.check()
                chunk = index[start:start + 1024]
                losses, _ = per_row(dataset.features[chunk], dataset.labels[chunk])
                total += losses.double().sum().item()
    finally:
        module.train(True)
    return total / max(1, len(index))


def evaluate(module: nn.Module, dataset: Dataset, terms: Terms, *, loss: str, batch_size: int) -> dict[str, Any]:
    """Mean loss and, for class labels, accuracy of ``module`` on the whole of ``dataset``.

    A metric is a sum of per-row terms, each computed from its row and its label alone
    (``row_terms``): the model sees one row at a time (vmapped over the batch), and the loss pairs a
    row's output with that row's label only. A model that mixes the rows of its batch (an output
    that is the batch's first row, for every row) or an output that broadcasts against the whole
    batch's labels would otherwise turn a metric over many rows into one row's value or label."""
    loss_fn = loss_function(loss)
    if batch_size < 1:
        raise BadRequest.new("evaluate needs batch_size >= 1")
    if len(dataset) < terms.min_metric_rows:
        raise PermissionDenied.new(f"the dataset has {len(dataset)} rows, fewer than this worker reports metrics "
                                   f"over ({terms.min_metric_rows}, --min-metric-rows)")
    was_training = module.training
    module.train(False)
    loss_sum, correct, started = 0.0, 0, time.perf_counter()
    classify = not dataset.labels.dtype.is_floating_point
    per_row = row_terms(module, loss, loss_fn, classify)
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                budget.check()
                x = dataset.features[start:start + batch_size].clone()  # never a view of the owner's data
                y = dataset.labels[start:start + batch_size].clone()
                losses, hits = per_row(x, y)
                loss_sum += losses.double().sum().item()
                correct += int(hits.sum())
    finally:
        module.train(was_training)
    n = max(1, len(dataset))
    return {"loss": loss_sum / n, "accuracy": correct / n if classify else None, "samples": len(dataset),
            "seconds": time.perf_counter() - started}


def row_terms(module: nn.Module, loss: str, loss_fn: Any, classify: bool) -> Any:
    """A function of a batch (rows, labels) -> each row's loss and whether its class was right, where
    row i's terms depend on row i and label i only, whatever the model does (``torch.func.vmap``: the
    model's forward sees a batch of one row; ops that reach across the batch see that row alone)."""
    def one(row: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = module(row.unsqueeze(0))
        if not isinstance(out, torch.Tensor):
            raise BadRequest.new(f"evaluate needs a model that returns one tensor, not {type(out).__name__}")
        term = loss_fn(out, _labels_for(loss, label.unsqueeze(0)), reduction="sum")
        if classify and out.dim() == 2:
            return term, (out.argmax(dim=1) == label).sum()
        return term, torch.zeros((), dtype=torch.long)
    return torch.func.vmap(one, randomness="error")
