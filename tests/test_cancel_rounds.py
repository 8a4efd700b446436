"""Federated rounds cancelled at random points (seeded), on in-process workers, then run again: the
final model must be bit-identical to the same rounds run without cancellation, and the federation's
bookkeeping must stay whole (one RoundMetrics per round done). Also: two federations over the same
workers run concurrently give exactly what they give one after the other."""

import asyncio
import random

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.worker.datasets import Dataset

CONFIG = fz.WorkerConfig(min_batch_size=1, min_metric_rows=1, shuffle_secret="fixed")


def _data(seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 6, generator=g)
    return Dataset("toy", x, x[:, :3].argmax(1))


def _workers(tag: str) -> list[fz.VirtualWorker]:
    return [fz.VirtualWorker(f"w{i}", config=CONFIG, datasets={"toy": _data(i)}) for i in range(3)]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _federation(workers, model, strategy, evaluate_on_workers=False) -> fz.Federation:
    return fz.Federation(workers, model, fz.FitConfig(dataset="toy", epochs=1, batch_size=16), strategy,
                         seed=5, evaluate_on_workers=evaluate_on_workers)


async def _close(workers) -> None:
    await asyncio.gather(*(w.close() for w in workers))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedadam"])
async def test_cancelled_rounds_leave_the_model_and_history_as_if_never_started(strategy):
    def make():
        return {"fedavg": fz.FedAvg(), "fedavgm": fz.FedAvgM(server_momentum=0.9),
                "fedadam": fz.FedAdam()}[strategy]

    workers = _workers("ref")
    try:
        reference = _federation(workers, _model(), make(), evaluate_on_workers=True)
        for _ in range(3):
            await reference.run_round()
        expected = {k: v.clone() for k, v in reference.model.state_dict().items()}
        expected_losses = [m.train_loss for m in reference.history]
    finally:
        await _close(workers)

    workers = _workers("storm")
    rng = random.Random(11)
    problems = []
    try:
        federation = _federation(workers, _model(), make(), evaluate_on_workers=True)
        attempts = 0
        while federation.round < 3 and attempts < 200:
            attempts += 1
            task = asyncio.ensure_future(federation.run_round())
            if rng.random() < 0.8:
                for _ in range(rng.randrange(40)):
                    await asyncio.sleep(0)
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if len(federation.history) != federation.round:
                problems.append(f"attempt {attempts}: round {federation.round} but "
                                f"{len(federation.history)} RoundMetrics")
                break
        assert federation.round == 3
        for k, v in federation.model.state_dict().items():
            if not torch.equal(v, expected[k]):
                problems.append(f"{k} differs by {(v - expected[k]).abs().max().item()}")
        losses = [m.train_loss for m in federation.history]
        if losses != expected_losses:
            problems.append(f"train losses {losses} != {expected_losses}")
    finally:
        await _close(workers)
    assert not problems, problems


@pytest.mark.timeout(240)
async def test_two_federations_over_the_same_workers_concurrently_equal_sequentially():
    workers = _workers("seq")
    try:
        a, b = _federation(workers, _model(1), fz.FedAvg()), _federation(workers, _model(2), fz.FedAdam())
        for _ in range(3):
            await a.run_round()
        for _ in range(3):
            await b.run_round()
        seq = [({k: v.clone() for k, v in f.model.state_dict().items()}, [m.train_loss for m in f.history])
               for f in (a, b)]
    finally:
        await _close(workers)
    workers = _workers("conc")
    try:
        a, b = _federation(workers, _model(1), fz.FedAvg()), _federation(workers, _model(2), fz.FedAdam())

        async def rounds(f):
            for _ in range(3):
                await f.run_round()

        await asyncio.gather(rounds(a), rounds(b))
        for f, (state, losses) in zip((a, b), seq):
            assert [m.train_loss for m in f.history] == losses
            for k, v in f.model.state_dict().items():
                assert torch.equal(v, state[k]), k
    finally:
        await _close(workers)
