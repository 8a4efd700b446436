"""Local training and evaluation on a worker's own dataset: one command, no round trip per batch.

These are the only code that reads a protected dataset's rows, and they keep the owner's terms
(``Terms``): every step trains on at least ``min_batch`` rows (an epoch's remainder smaller than that
is skipped, never trained on alone), the order of the rows is shuffled from a seed the daemon derives
from its own secret (a client cannot choose which rows share a batch), a fit processes at most
``max_samples`` rows in all, and metrics are aggregates over at least ``min_metric_rows`` rows.
Long work stops at its budget (``fedzmq.budget``): checked at every step and every batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import budget
from ..errors import BadRequest, LimitExceeded, PermissionDenied
from ..ops import check_loss_shapes
from ..optimizers import OPTIMIZERS, PlainSGD, check_hyper, plain_sgd_applies
from .datasets import Dataset
from .randomness import draws_seed, seeded_draws

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


class Trainee:
    """A module about to be fitted, with what every fit over it needs found once: its parameters (a walk
    of its submodules) and its training mode. A daemon hosting many clients fits the same module for
    each of them in turn, and these walks cost as much as a small model's training step."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        #: every parameter, in ``module.parameters()`` order: the optimizer's one group
        self.params = list(module.parameters())
        #: the parameters that train (FedProx's anchor)
        self.trainable = [p for p in self.params if p.requires_grad]
        self._training = False

    def train(self) -> None:
        """``module.train()``, once: every fit (and ``_row_loss``, which restores it) leaves it so."""
        if not self._training:
            self.module.train()
            self._training = True


def check_optimizer(spec: Any) -> tuple[str, dict[str, Any]]:
    """The allowlisted optimizer class name and hyper-parameters of ``{"cls": "SGD", "lr": 0.1, ...}``."""
    if not isinstance(spec, dict):
        raise BadRequest.new("optimizer must be a map like {'cls': 'SGD', 'lr': 0.1}")
    name = spec.get("cls")
    if name not in OPTIMIZERS:
        raise BadRequest.new(f"optimizer {name!r} is not on the allowlist {sorted(OPTIMIZERS)}")
    hyper = {k: v for k, v in spec.items() if k != "cls"}
    check_hyper(name, hyper)
    return name, hyper


def make_optimizer(spec: dict[str, Any], module: nn.Module | Trainee) -> Any:
    """An optimizer from ``{"cls": "SGD", "lr": 0.1, ...}``, hyper-parameters checked against the allowlist.
    Plain SGD is ``PlainSGD`` (the same results as ``torch.optim.SGD``, bit for bit, at a fraction of
    its cost per fit); the others are ``torch.optim``'s."""
    name, hyper = check_optimizer(spec)
    params = module.params if isinstance(module, Trainee) else list(module.parameters())
    if plain_sgd_applies(name, hyper):
        return PlainSGD(params, **hyper)
    return OPTIMIZERS[name][0](params, **hyper)


def _labels_for(loss_name: str, labels: torch.Tensor) -> torch.Tensor:
    """A batch's labels as ``loss_name`` takes them. Integer and bool class labels go to a class-index loss
    as int64: torch's ``cross_entropy`` takes int64 or uint8 targets and evaluation's ``gather`` int64 or
    int32, so uint8 labels trained and failed every evaluation, int32 ones the other way round, with
    torch's words withheld on protected rows."""
    copy = label_copy_dtype(loss_name, labels.dtype)
    return labels if copy is None else labels.to(copy)


#: the losses that take labels as float32 values of the output's shape
ELEMENTWISE_LOSSES = frozenset({"mse_loss", "l1_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits"})


def label_copy_dtype(loss_name: str, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of the copy of labels of ``dtype`` that ``loss_name`` takes (``_labels_for``), or None when it
    takes them as they are: a float32 copy for an elementwise loss, an int64 one of integer class labels
    for a class-index loss. Charged as a batch's (``charges.batch``): uint8 masks become four times their
    size as float32 targets (a red team's fit grew a daemon past its quota with them, h25)."""
    if loss_name in ELEMENTWISE_LOSSES:
        return torch.float32 if dtype != torch.float32 else None
    return torch.int64 if widens_labels(loss_name, dtype) else None


def widens_labels(loss_name: str, dtype: torch.dtype) -> bool:
    """Whether labels of ``dtype`` go to ``loss_name`` as an int64 copy (``_labels_for``; charged as a batch's)."""
    return loss_name in ("cross_entropy", "nll_loss") and not dtype.is_floating_point and not dtype.is_complex \
        and dtype != torch.int64


def shuffle_seed(terms: Terms, dataset: Dataset, client_seed: int, batch_size: int, salt: str = "") -> int:
    """The seed of a fit's shuffle: the daemon's secret mixed with the client's seed, the batch size (and,
    on a daemon hosting many clients, the client's id), so the same fit repeats a run on this daemon but
    no client can pick which rows share a batch, nor make two fits whose first batches differ by one row
    (the same order cut at 16 and 17 rows did: a red team's differencing of their losses)."""
    digest = hmac.new(terms.shuffle_key, f"{dataset.name}:{salt}:{client_seed}:{batch_size}".encode(),
                      hashlib.sha256).digest()
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


class RowShuffle:
    """A fit's row orders, one per epoch, from a seed of up to 64 bits. torch's CPU generator keeps only a
    seed's low 32 bits (seeds 7 and 7 + 2**32 draw alike): one generator gave 2^32 orders, so about 2^16
    fits of batch 16 and as many of 17 held a pair with one order, the pair a differencing of two fits
    needs to read a row. Two generators, one per half of the seed, their permutations composed, give an
    order for each seed (``shuffle_seed``'s are 63 bits: 2^63 orders, as many as a permutation of 21 rows
    or more can take)."""

    def __init__(self, seed: int) -> None:
        self._low = torch.Generator().manual_seed(seed & 0xFFFF_FFFF)
        self._high = torch.Generator().manual_seed(seed >> 32 & 0xFFFF_FFFF)

    def order(self, rows: int) -> torch.Tensor:
        """The next epoch's order of ``rows`` rows."""
        return torch.randperm(rows, generator=self._low)[torch.randperm(rows, generator=self._high)]


def epoch(terms: Terms, rows: int, batch_size: int, shuffle: RowShuffle) -> Iterator[tuple[torch.Tensor, int]]:
    """One epoch's batches of row indexes, each with its size: shuffled, and without a remainder smaller
    than the minimum. The order is drawn at once, the slices only as a fit takes them (one step of a
    100-row shard needs one)."""
    order = shuffle.order(rows)
    batch_size = min(batch_size, rows)
    for start in range(0, rows, batch_size):
        size = min(batch_size, rows - start)
        if size >= terms.min_batch:
            yield order[start:start + size], size


#: the metrics a fit returns, in this order where they travel as a list (a fit over many clients)
METRICS = ("loss", "samples_seen", "num_examples", "steps", "seconds")


def fit(module: nn.Module | Trainee, dataset: Dataset, terms: Terms, *, loss: str,
        optimizer: Any, batch_size: int, epochs: int | None, steps: int | None,
        prox_mu: float, seed: int, salt: str = "", draws: bool = False) -> dict[str, Any]:
    """Minibatch training of ``module`` on ``dataset``. FedProx adds (mu/2)·||w − w_start||² to the loss.
    ``optimizer`` is one, or its description (made only when there is a step to take). A ``Trainee``
    (a module prepared once for many fits) saves each fit its walks of the module. ``draws``: the model
    may draw random numbers (``fedzmq.worker.randomness``); they come from a state seeded as the shuffle is,
    so the same fit draws the same dropout masks whatever ran before it."""
    trainee = module if isinstance(module, Trainee) else Trainee(module)
    if len(dataset) == 0:
        raise BadRequest.new(f"dataset {dataset.name} is empty")
    loss_fn = loss_function(loss)
    total_steps = plan_steps(terms, len(dataset), batch_size, epochs, steps)
    if total_steps == 0:
        return {"loss": 0.0, "samples_seen": 0, "num_examples": len(dataset), "steps": 0, "seconds": 0.0}
    if isinstance(optimizer, dict):
        optimizer = make_optimizer(optimizer, trainee)
    shuffle = shuffle_seed(terms, dataset, seed, batch_size, salt)
    with seeded_draws(draws_seed(shuffle)) if draws else contextlib.nullcontext():
        return _train(trainee, dataset, terms, loss, loss_fn, optimizer, batch_size, total_steps, prox_mu,
                      RowShuffle(shuffle))


def _train(trainee: Trainee, dataset: Dataset, terms: Terms, loss: str, loss_fn: Any, optimizer: Any,
           batch_size: int, total_steps: int, prox_mu: float, shuffle: RowShuffle) -> dict[str, Any]:
    """``fit``'s steps, once it is planned and its optimizer made; ``shuffle`` orders the rows."""
    model, params = trainee.module, trainee.trainable
    anchor = [p.detach().clone() for p in params] if prox_mu else []
    trainee.train()
    started = time.perf_counter()
    loss_sum, seen, done = 0.0, 0, 0
    trained: list[torch.Tensor] = []  # the indexes of the last epoch's worth of batches (for row_metrics)
    features, labels = dataset.features, dataset.labels
    while done < total_steps:
        for index, size in epoch(terms, len(dataset), batch_size, shuffle):
            if done == total_steps:
                break
            budget.check()
            x, y = features[index], _labels_for(loss, labels[index])
            optimizer.zero_grad()
            out = model(x)
            check_loss_shapes(loss, out, y)
            value = loss_fn(out, y)
            objective = value
            if prox_mu:
                objective = value + (prox_mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            objective.backward()
            optimizer.step()
            loss_sum += value.item() * size
            seen += size
            done += 1
            if terms.row_metrics:
                trained.append(index)
                while sum(len(i) for i in trained) - len(trained[0]) >= len(dataset):
                    trained.pop(0)
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"training diverged on {dataset.name}: the loss is not finite")
    mean_loss = loss_sum / seen if seen else 0.0
    if min(seen, len(dataset)) < terms.min_metric_rows:
        # the loss is a metric over at most that many distinct rows: withheld, as evaluate refuses one (a
        # zero model's mse over a 20-row dataset told the mean of its squared labels)
        mean_loss = math.nan
    elif terms.row_metrics:
        mean_loss = _row_loss(model, dataset, torch.cat(trained), loss, loss_fn, batch_size)
    return {"loss": mean_loss, "samples_seen": seen, "num_examples": len(dataset),
            "steps": done, "seconds": time.perf_counter() - started}


def _row_loss(module: nn.Module, dataset: Dataset, index: torch.Tensor, loss: str, loss_fn: Any,
              batch_size: int) -> float:
    """The trained model's mean loss over the rows of its last epoch, as per-row terms (``row_terms``):
    in eval mode (a row alone has no batch statistics), without gradients, once per fit (a pass per
    step would cost more than the training on small models), a batch at a time (what the fit was
    charged for: a batch's copy, and a forward over that many rows)."""
    per_row = row_terms(module, loss, loss_fn, False)
    module.train(False)
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(index), batch_size):
                budget.check()
                chunk = index[start:start + batch_size]
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
        target = _labels_for(loss, label.unsqueeze(0))
        check_loss_shapes(loss, out, target)
        term = loss_fn(out, target, reduction="sum")
        if classify and out.dim() == 2:
            return term, (out.argmax(dim=1) == label).sum()
        return term, torch.zeros((), dtype=torch.long)
    return torch.func.vmap(one, randomness="error")
