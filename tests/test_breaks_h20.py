"""Breaks found by h20: ordinary user code sharing one ``Federation`` (or one hosted model) between two
coroutines must give what the same code gives run one call after the other (docs/api.md: concurrent
code gives exactly the results of the same code run sequentially)."""

import asyncio

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.worker.datasets import Dataset

CONFIG = fz.WorkerConfig(min_batch_size=1, min_metric_rows=1, shuffle_secret="fixed")


def _data(seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    return Dataset("toy", x, x[:, :3].argmax(1))


def _workers() -> list[fz.VirtualWorker]:
    return [fz.VirtualWorker(f"w{i}", config=CONFIG, datasets={"toy": _data(i)}) for i in range(3)]


def _federation(workers: list[fz.VirtualWorker], strategy: fz.Strategy) -> fz.Federation:
    torch.manual_seed(0)
    return fz.Federation(workers, nn.Linear(8, 3), fz.FitConfig(dataset="toy", steps=2, batch_size=16), strategy,
                         round_timeout=60, seed=1)


def _strategy(name: str) -> fz.Strategy:
    return {"fedavg": fz.FedAvg(), "fedadam": fz.FedAdam(), "cyclic": fz.Cyclic()}[name]


async def _two_rounds(name: str, concurrent: bool) -> tuple[fz.Federation, list[int]]:
    workers = _workers()
    try:
        async with _federation(workers, _strategy(name)) as federation:
            if concurrent:
                done = list(await asyncio.gather(federation.run_round(), federation.run_round()))
            else:
                done = [await federation.run_round(), await federation.run_round()]
    finally:
        await asyncio.gather(*(w.close() for w in workers))
    return federation, [m.round for m in done]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["fedavg", "fedadam", "cyclic"])
async def test_two_concurrent_run_rounds_on_one_federation_are_two_rounds(name):
    """``gather(run_round(), run_round())`` on one federation: both read ``round`` before either
    recorded, so both ran as round 1 from the same model and the second commit overwrote the first
    (FedAdam's moments stepped twice for it): history [1, 1], ``round`` 1, another model."""
    sequential, seq_rounds = await _two_rounds(name, concurrent=False)
    concurrent, con_rounds = await _two_rounds(name, concurrent=True)
    assert seq_rounds == [1, 2]
    assert sorted(con_rounds) == [1, 2]
    assert concurrent.round == 2 and [m.round for m in concurrent.history] == [1, 2]
    for key, value in sequential.model.state_dict().items():
        assert torch.equal(concurrent.model.state_dict()[key], value), key
