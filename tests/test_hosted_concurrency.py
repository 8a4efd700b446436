"""Logical clients of one daemon (one connection): concurrent pointer work across clients, and a
federated round over them while pointer work runs on the same clients, equal the sequential runs."""

import asyncio
import random

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.worker.datasets import Dataset


def _clients() -> dict:
    out = {}
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(32, 4, generator=g)
        out[f"c{i}"] = {"toy": Dataset("toy", x, x[:, :2].argmax(1))}
    return out


async def _pointer_job(worker: fz.RemoteWorker, seed: int) -> list:
    rng = random.Random(seed)
    x = await worker.send(torch.arange(5.0) * (seed + 1))
    results = []
    for step in range(6):
        x = x * 2 - step if rng.random() < 0.5 else x.relu() + seed
        if rng.random() < 0.5:
            results.append((await x.get()).tolist())
        else:
            await asyncio.sleep(0)
    results.append((await x.sum().get()).item())
    return results


async def _scenario(address: str, concurrent: bool):
    workers = await fz.connect_clients(address)
    try:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        fed = fz.Federation(workers, model, fz.FitConfig(dataset="toy", batch_size=8), seed=1)
        jobs = [_pointer_job(w, i) for i, w in enumerate(workers)]
        if concurrent:
            *pointer_results, metrics = await asyncio.gather(*jobs, fed.run_round())
        else:
            pointer_results = [await j for j in jobs]
            metrics = await fed.run_round()
        return pointer_results, metrics.participants, metrics.train_loss, {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        await asyncio.gather(*(w.close() for w in workers))


@pytest.mark.timeout(120)
async def test_hosted_clients_concurrent_work_and_round_equal_sequential():
    config = fz.WorkerConfig(min_batch_size=1, min_metric_rows=1, shuffle_secret="s")
    results = {}
    for concurrent in (False, True):
        worker = fz.Worker("host", config=config, clients=_clients())
        address = worker.bind("tcp://127.0.0.1:0")
        worker.start()
        try:
            results[concurrent] = await _scenario(address, concurrent)
        finally:
            await worker.close()
    seq, con = results[False], results[True]
    assert con[0] == seq[0]
    assert con[1] == seq[1] and con[2] == seq[2]
    for k in seq[3]:
        assert torch.equal(con[3][k], seq[3][k]), k
