"""What a load of weights into a model does to labels, and to the metrics computed after it.

A load (``module_load``'s ``state``, or a ``fit``'s or ``evaluate``'s ``load``) that overwrites an entry's
storage whole leaves nothing of what it held: the storage then has exactly the label of the values
copied in (``relabel_loaded``), so a model loaded with a round's global weights is the global model
again, whatever it was trained on before. The same rule, applied ahead, gives the label of what a
fit's or evaluate's metrics are computed from (``metrics_label``). A fit whose metrics only secure
aggregation's label holds back runs with its loss withheld (``withheld_loss``): a secure round needs
the fit, and its update leaves masked. docs/security.md, "Metrics of a model trained under secure
aggregation", tells the attacks behind this.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .binding import Binding, references_label
from .handlers.modules import whole_copies
from .taint import Label, storage_key


def loaded_state(binding: Binding) -> tuple[nn.Module, dict[str, Any]] | None:
    """The model a command copies weights into, and those weights: ``module_load``'s ``state``, or the
    ``load`` of a fit or evaluate (``Command.loads``); None for any other command."""
    if binding.command.name == "module_load":
        return binding.objects["obj"].module, binding.args["state"]
    if binding.command.loads and "load" in binding.args:
        return binding.objects["module"].module, binding.args["load"]
    return None


def metrics_label(binding: Binding) -> Label:
    """The label of what a fit's or evaluate's metrics are computed from: what it references, with the
    model's entries that its own ``load`` overwrites whole counted as what overwrites them."""
    load = loaded_state(binding)
    if load is None or not binding.label:
        return binding.label
    replaced = frozenset(storage_key(entry.untyped_storage()) for entry, _ in whole_copies(*load))
    return references_label(binding.session, binding.command, binding.objects, binding.tensors, replaced)


def relabel_loaded(binding: Binding) -> None:
    """After a load that completed: the storages it overwrote whole hold the loaded values, and only
    their label."""
    load = loaded_state(binding)
    if load is None:
        return
    taint = binding.session.taint
    labels: dict[int, tuple[torch.Tensor, Label]] = {}  # by storage: tied entries join their values' labels
    for entry, value in whole_copies(*load):
        key = storage_key(entry.untyped_storage())
        labels[key] = (entry, labels.get(key, (entry, Label.PUBLIC))[1] | taint.of_tensor(value))
    for entry, label in labels.values():
        taint.replace(entry, label)


def withheld_loss(metrics: Any) -> Any:
    """A fit's metrics without its loss (NaN): a function of weights that may leave only masked."""
    return {**metrics, "loss": math.nan} if isinstance(metrics, dict) and "loss" in metrics else metrics


__all__ = ["loaded_state", "metrics_label", "relabel_loaded", "withheld_loss"]
