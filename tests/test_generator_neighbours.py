"""Two kinds of worker in one process, and torch's one default generator between them.

An embedded ``fz.Worker`` (``in_process=False``, the daemon's engine) draws a fit's dropout masks on a torch
thread, from the process's default generator seeded for that fit, holding ``GENERATOR_TURN``. A
``VirtualWorker`` in the same process swaps its own state into that same generator on the event loop's
thread (``OwnGenerator``). Without a common turn, the swap lands in the middle of the embedded fit's draws:
each then draws from the other's stream, and neither trains or forwards what it does alone. Concurrent code
must give exactly what the same code gives run sequentially (README, docs/api.md)."""

import asyncio
import copy

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.worker.datasets import Dataset

pytestmark = pytest.mark.timeout(180)

WIDTH = 256


def _dropout_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(8, WIDTH), nn.Dropout(0.5), nn.Linear(WIDTH, 2))


def _dataset() -> Dataset:
    x = torch.arange(256 * 8, dtype=torch.float32).reshape(256, 8) / 1000
    return Dataset("toy", x, (x[:, 0] > 1).long())


async def _seeded_fit(worker: fz.RemoteWorker, start: nn.Module) -> dict[str, torch.Tensor]:
    """The state a long seeded fit of ``start`` gives (hundreds of steps: it draws for a while on a thread)."""
    local = copy.deepcopy(start)
    remote = await worker.send(local)
    await remote.fit("toy", steps=400, batch_size=64, seed=11)
    return {k: v.clone() for k, v in (await remote.get()).state_dict().items()}


async def _virtual_forwards(bob: fz.VirtualWorker, calls: int) -> list[torch.Tensor]:
    """A fresh virtual worker's forwards through dropout (its masks come from its own stream)."""
    local = _dropout_model()
    model = await bob.send(local)
    x = await bob.send(torch.ones(4, 8))
    outputs = []
    for _ in range(calls):
        outputs.append(await model(x).get())
        await asyncio.sleep(0.002)  # spread over the embedded fit's run
    return outputs


async def test_a_virtual_worker_beside_an_embedded_worker_changes_neither_ones_draws():
    start = _dropout_model()
    embedded = fz.Worker("emb", datasets={"toy": _dataset()})
    address = embedded.bind("tcp://127.0.0.1:0")
    embedded.start()
    try:
        async with await fz.connect(address) as emb:
            await _seeded_fit(emb, start)  # sized once, as a second fit would be
            fitted_alone = await _seeded_fit(emb, start)
            async with fz.VirtualWorker("bob") as bob:
                forwards_alone = await _virtual_forwards(bob, 60)
            async with fz.VirtualWorker("bob") as bob:
                fitted_together, forwards_together = await asyncio.gather(
                    _seeded_fit(emb, start), _virtual_forwards(bob, 60))
    finally:
        await embedded.close()
    assert all(torch.equal(forwards_alone[i], forwards_together[i]) for i in range(60)), \
        "the virtual worker's dropout masks changed beside the embedded worker's fit"
    assert all(torch.equal(fitted_alone[k], fitted_together[k]) for k in fitted_alone), \
        "the embedded worker's seeded fit trained another model beside the virtual worker's forwards"
