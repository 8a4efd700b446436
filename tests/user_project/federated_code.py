"""The code under test in this example project: a user's own federated training on fedzmq."""

from __future__ import annotations

import torch
from torch import nn, optim

import fedzmq as fz


class CumsumNet(nn.Module):
    """A model fedzmq cannot describe as data (cumsum): daemons must register it (``--model``)."""

    fedzmq_name = "cumsum-net"

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.fedzmq_kwargs = {"width": width}
        self.fc = nn.Linear(2, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).cumsum(0)


async def pointer_training(model: nn.Module, shards: list[tuple[torch.Tensor, torch.Tensor]],
                           workers: list[fz.RemoteWorker], rounds: int = 5, lr: float = 0.1) -> list[float]:
    """Train ``model`` on each worker's shard in turn, through pointers, one remote Adam per worker.
    Returns the summed loss of each round."""
    remote_data = [(await w.send(x), await w.send(y)) for w, (x, y) in zip(workers, shards)]
    optims = fz.Optims(workers, optim=optim.Adam(model.parameters(), lr=lr))
    totals = []
    for _ in range(rounds):
        total = 0.0
        for x_ptr, y_ptr in remote_data:
            model_ptr = await x_ptr.location.send(model)
            opt = optims.get_optim(x_ptr.location.id)
            await opt.zero_grad()
            loss = ((model_ptr(x_ptr) - y_ptr) ** 2).mean()
            await loss.backward()
            await opt.step()
            await model_ptr.get()
            total += (await loss.get()).item()
        totals.append(total)
    return totals


def local_training(model: nn.Module, shards: list[tuple[torch.Tensor, torch.Tensor]], rounds: int = 5,
                   lr: float = 0.1) -> list[float]:
    """What ``pointer_training`` must compute, in plain torch."""
    optimizers = [optim.Adam(model.parameters(), lr=lr) for _ in shards]
    totals = []
    for _ in range(rounds):
        total = 0.0
        for (x, y), opt in zip(shards, optimizers):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            total += loss.item()
        totals.append(total)
    return totals


async def fedavg(workers: list[fz.RemoteWorker], model: nn.Module, rounds: int) -> list[fz.RoundMetrics]:
    """A few FedAvg rounds of local SGD on each worker's own ``digits`` dataset."""
    config = fz.FitConfig(dataset="digits", optimizer={"cls": "SGD", "lr": 0.1}, epochs=1)
    federation = fz.Federation(workers, model, config, fz.FedAvg(), seed=0)
    return [await federation.run_round() for _ in range(rounds)]
