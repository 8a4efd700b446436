"""Two kinds of worker in one process, and torch's one default generator between them.

An embedded ``fz.Worker`` (``in_process=False``, the daemon's engine) draws a fit's dropout masks on a torch
thread, from the process's default generator seeded for that fit, holding ``GENERATOR_TURN``. A
``VirtualWorker`` in the same process swaps its own state into that same generator on the event loop's
thread (``OwnGenerator``). Without a common turn, the swap lands in the middle of the embedded fit's draws:
each then draws from the other's stream, and neither trains or forwards what it does alone. Concurrent code
must give exactly what the same code gives run sequentially (README, docs/api.md)."""

import asyncio
import copy
import threading

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.worker.datasets import Dataset
from fedzmq.worker.randomness import GENERATOR_TURN, generator_turn_on_the_loop

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


def _hold_turn_until(release: threading.Event, held: threading.Event) -> None:
    """An embedded engine's torch thread in a long draw: holds the turn until told."""
    with GENERATOR_TURN:
        held.set()
        release.wait(30)


@pytest.mark.parametrize("leaves", ["cancelled", "at_the_end_of_asyncio_run"])
def test_a_waiter_on_the_loop_that_leaves_before_its_turn_gives_it_back(leaves):
    """The loop waits for the turn on a thread. A waiter cancelled meanwhile, by its caller or by
    ``asyncio.run`` ending with it still waiting, must not keep the turn once that thread takes it: every
    later draw in the process (every embedded engine's fit) would wait for ever."""
    release, held = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_turn_until, args=(release, held))
    holder.start()
    assert held.wait(10)
    entered: list[bool] = []

    async def wait_for_turn() -> None:
        async with generator_turn_on_the_loop():
            entered.append(True)

    async def leave() -> None:
        waiter = asyncio.ensure_future(wait_for_turn())
        await asyncio.sleep(0.2)
        assert not waiter.done()  # the turn is held: it waits (on a thread, the loop free)
        if leaves == "cancelled":
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        else:  # asyncio.run cancels it, then waits for its executor's threads: let the holder finish meanwhile
            threading.Timer(0.5, release.set).start()

    try:
        asyncio.run(leave())
    finally:
        release.set()
        holder.join(10)
    assert GENERATOR_TURN.acquire(timeout=10), "the turn stayed taken after its waiter left"
    GENERATOR_TURN.release()
    assert not entered
