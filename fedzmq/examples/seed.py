"""The seed tutorial (PySyft 0.2, "Part 2: Intro to Federated Learning"), on fedzmq.

Part 1 trains a toy linear model centrally. Part 2 does the same with the data split between two
workers: each iteration sends the model to a worker, trains it there with that worker's own Adam,
brings it back, and prints the loss. ``local_reference`` runs part 2's exact sequence in plain torch
(one Adam per worker over the same model), which the tests compare against, value for value.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn, optim

from ..client.optims import Optims
from ..client.worker import RemoteWorker


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]], requires_grad=True)
    target = torch.tensor([[0], [0], [1], [1.0]], requires_grad=True)
    return data, target


def central_training(model: nn.Module, iterations: int = 20, verbose: bool = True) -> list[float]:
    data, target = toy_data()
    opt = optim.SGD(params=model.parameters(), lr=0.1)
    losses = []
    for _ in range(iterations):
        opt.zero_grad()
        pred = model(data)
        loss = ((pred - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if verbose:
            print(f"central  loss {loss.item():.6f}")
    return losses


async def federated_training(model: nn.Module, bob: RemoteWorker, alice: RemoteWorker,
                             iterations: int = 10, lr: float = 0.1, verbose: bool = True) -> list[float]:
    """Part 2 of the seed: 10 iterations over both workers = 20 losses."""
    data, target = toy_data()
    # get pointers to training data on each worker by sending some training data to bob and alice
    data_bob, target_bob = await bob.send(data[0:2]), await bob.send(target[0:2])
    data_alice, target_alice = await alice.send(data[2:]), await alice.send(target[2:])
    datasets = [(data_bob, target_bob), (data_alice, target_alice)]

    optims = Optims([bob, alice], optim=optim.Adam(params=model.parameters(), lr=lr))
    losses = []
    for _ in range(iterations):
        for data_ptr, target_ptr in datasets:
            model_ptr = await data_ptr.location.send(model)     # send model to the data's worker
            opt = optims.get_optim(data_ptr.location.id)        # that worker's own optimizer
            await opt.zero_grad()
            pred = model_ptr(data_ptr)                           # pipelined: no round trip yet
            loss = ((pred - target_ptr) ** 2).sum()
            await loss.backward()
            await opt.step()
            await model_ptr.get()                                # bring the trained weights back
            value = (await loss.get()).item()
            losses.append(value)
            if verbose:
                print(f"{data_ptr.location.id:>8} loss {value:.6f}")
    return losses


def local_reference(model: nn.Module, iterations: int = 10, lr: float = 0.1,
                    split: Sequence[slice] = (slice(0, 2), slice(2, None))) -> list[float]:
    """The same sequence as ``federated_training`` in plain torch: one Adam per worker."""
    data, target = toy_data()
    parts = [(data[s].detach(), target[s].detach()) for s in split]
    optimizers = [optim.Adam(params=model.parameters(), lr=lr) for _ in parts]
    losses = []
    for _ in range(iterations):
        for (x, y), opt in zip(parts, optimizers):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).sum()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses
