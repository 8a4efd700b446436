"""Breaks found by h32: determinism across runs and resumption, and the caller's torch modes beside rounds
(docs/api.md: concurrent code gives exactly the results of the same code run sequentially; a round computes
in torch's default modes whatever modes its caller holds, and leaves later rounds as they would be; a
resumed run equals an uninterrupted one)."""

import asyncio
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.worker.datasets import Dataset

CONFIG = fz.WorkerConfig(min_batch_size=1, min_metric_rows=1, shuffle_secret="fixed")

STRATEGIES: dict[str, Callable[[], fz.Strategy]] = {
    "FedAvgM": lambda: fz.FedAvgM(server_momentum=0.9),
    "FedAdam": fz.FedAdam,
    "SecAgg(FedAdam)": lambda: fz.SecAgg(fz.FedAdam()),
}


def _data(seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48 + 16 * seed, 6, generator=g)
    return Dataset("toy", x, x[:, :3].argmax(1))


def _workers() -> list[fz.VirtualWorker]:
    return [fz.VirtualWorker(f"w{i}", config=CONFIG, datasets={"toy": _data(i)}) for i in range(4)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _federation(workers: list[fz.VirtualWorker], model: nn.Module, strategy: fz.Strategy,
                checkpoint_dir: Path) -> fz.Federation:
    return fz.Federation(workers, model, fz.FitConfig(dataset="toy", epochs=1, batch_size=16), strategy,
                         seed=5, round_timeout=60, checkpoint_dir=str(checkpoint_dir))


async def _hold_inference_mode(held: asyncio.Event, done: asyncio.Event) -> None:
    """A neighbour: evaluates something of its own in inference mode, holding it across its awaits."""
    with torch.inference_mode():
        held.set()
        await done.wait()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(STRATEGIES))
async def test_a_federation_resumed_while_a_neighbour_holds_inference_mode_runs_its_later_rounds(name, tmp_path):
    """A run of two rounds, then a new ``Federation`` on its checkpoint made (the model built before) while
    another coroutine holds ``torch.inference_mode()`` across an await, run to four rounds. The resume
    loads the strategy's server state (momentum, moments) in the caller's modes, so they become inference
    tensors, and every later round fails at its commit: "Inplace update to inference tensor outside
    InferenceMode". Uninterrupted, the same four rounds give a model; resumed, they must give it too."""
    workers = _workers()
    try:
        straight = _federation(workers, _model(), STRATEGIES[name](), tmp_path / "straight")
        await straight.run(4)
        first = _federation(workers, _model(), STRATEGIES[name](), tmp_path / "resumed")
        await first.run(2)
        model = _model()
        held, done = asyncio.Event(), asyncio.Event()
        neighbour = asyncio.ensure_future(_hold_inference_mode(held, done))
        await held.wait()
        try:
            resumed = _federation(workers, model, STRATEGIES[name](), tmp_path / "resumed")
        finally:
            done.set()
            await neighbour
        assert resumed.resumed_from == 2
        await resumed.run(4)
    finally:
        await asyncio.gather(*(w.close() for w in workers))
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
