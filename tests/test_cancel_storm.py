"""Seeded random cancellations of every kind of remote call, at random points (streams of pieces
included: the connection's chunk size is made tiny), on one connection. After each, a check on the
same connection must give the right value (no late reply matched to another request); at the end,
once the pointers are gone, the daemon must hold no object of the session."""

import asyncio
import gc
import random

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.codec import Limits
from fedzmq.testing.plugin import TEST_SETTINGS
from fedzmq.worker.datasets import Dataset

SMALL = fz.ConnectionSettings(heartbeat_interval=TEST_SETTINGS.heartbeat_interval,
                              heartbeat_liveness=TEST_SETTINGS.heartbeat_liveness,
                              connect_timeout=TEST_SETTINGS.connect_timeout,
                              limits=Limits(chunk_bytes=4096))


async def _storm(worker: fz.RemoteWorker, seed: int, iterations: int) -> list[str]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = nn.Linear(40, 30)  # 1200 weights: 4800 bytes, more than one 4096-byte chunk
    base = await worker.send(torch.arange(8.0))
    problems: list[str] = []
    for i in range(iterations):
        kind = rng.choice(["send_small", "send_big", "send_model", "op_get", "get_big", "module_get", "forward"])
        big = torch.randn(3000) + i
        if kind == "send_small":
            coro = worker.send(torch.full((5,), float(i)))
        elif kind == "send_big":
            coro = worker.send(big)
        elif kind == "send_model":
            with torch.no_grad():
                model.bias.add_(1.0)
            coro = worker.send(model)
        elif kind == "op_get":
            coro = (base * i).get()
        elif kind == "get_big":
            coro = (await worker.send(big)).get()
        elif kind == "module_get":
            coro = (await worker.send(model)).get()
        else:
            ptr = await worker.send(model)
            coro = ptr(await worker.send(torch.ones(2, 40))).get()
        task = asyncio.ensure_future(coro)
        for _ in range(rng.randrange(6)):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # the same connection must still answer right
        got = await (base + i).get()
        if not torch.equal(got, torch.arange(8.0) + i):
            problems.append(f"{i} after {kind}: op+get gave {got}")
        back = await (await worker.send(big)).get()
        if not torch.equal(back, big):
            problems.append(f"{i} after {kind}: a streamed round trip differs")
        if kind in ("send_model", "module_get", "forward"):
            expected = {k: v.clone() for k, v in model.state_dict().items()}
            ptr = await worker.send(model)
            await ptr.get()
            for k, v in model.state_dict().items():
                if not torch.equal(v, expected[k]):
                    problems.append(f"{i} after {kind}: model entry {k} differs after send+get")
    return problems


async def _held(worker: fz.RemoteWorker) -> int:
    gc.collect()
    await asyncio.sleep(0.3)  # the batched deletes of collected pointers leave
    gc.collect()
    await asyncio.sleep(0.3)
    return (await worker.status())["objects"]


@pytest.mark.timeout(240)
async def test_random_cancellations_on_a_daemon_leave_right_answers_and_no_objects(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    worker = await fz.connect(bob.address, settings=SMALL)
    try:
        problems = await _storm(worker, seed=3, iterations=60)
        assert not problems, problems[:5]
        assert await _held(worker) == 0
    finally:
        await worker.close()


@pytest.mark.timeout(240)
async def test_random_cancellations_on_a_virtual_worker_leave_right_answers_and_no_objects():
    worker = fz.VirtualWorker("bob", settings=SMALL,
                              config=fz.WorkerConfig(min_batch_size=1, min_metric_rows=1,
                                                     limits=Limits(chunk_bytes=4096)))
    try:
        problems = await _storm(worker, seed=4, iterations=60)
        assert not problems, problems[:5]
        assert await _held(worker) == 0
    finally:
        await worker.close()
