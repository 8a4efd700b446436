"""An in-process worker's random numbers are its own (``fedzmq.worker.randomness``).

torch's dropout draws from the process's one default generator. A ``VirtualWorker`` runs the daemon's code in
its caller's process, so before this change a remote dropout drawn between a coroutine's seeded draws moved the
caller's stream (and the worker's masks depended on what the caller drew): the same code gave other numbers
on a virtual worker than on a daemon. Each check here runs a remote command that draws between two seeded
local draws and compares them with the same draws made without it."""

import asyncio
import copy
from typing import Awaitable, Callable

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.testing import write_dataset
from fedzmq.worker.datasets import Dataset

pytestmark = pytest.mark.timeout(120)


def _dropout_model(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.Dropout(0.5), nn.Linear(width, 2))


def _dataset() -> Dataset:
    x = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8) / 100
    return Dataset("toy", x, (x[:, 0] > 2).long())


async def _caller_stream_is_kept(remote_draw: Callable[[], Awaitable[object]]) -> None:
    """The caller's seeded draws around ``remote_draw()`` equal its draws without it."""
    torch.manual_seed(1234)
    before = torch.randn(8)
    await remote_draw()
    after = torch.randn(8)
    torch.manual_seed(1234)
    assert torch.equal(before, torch.randn(8))
    assert torch.equal(after, torch.randn(8)), "a remote command drew from the caller's random stream"


async def test_a_small_dropout_op_leaves_the_callers_stream_alone():
    async with fz.VirtualWorker("bob") as bob:
        x = await bob.send(torch.ones(16))
        await _caller_stream_is_kept(lambda: x.dropout(0.5, True).get())


async def test_a_big_dropout_op_leaves_the_callers_stream_alone():
    """Past ``INLINE_NUMEL`` elements an op would run on a torch thread, beside the caller's coroutines."""
    async with fz.VirtualWorker("bob") as bob:
        x = await bob.send(torch.ones(1 << 18))
        await _caller_stream_is_kept(lambda: x.dropout(0.5, True).sum().get())


async def test_a_forward_through_dropout_leaves_the_callers_stream_alone():
    async with fz.VirtualWorker("bob") as bob:
        model = await bob.send(_dropout_model(16))
        x = await bob.send(torch.ones(4, 16))
        await _caller_stream_is_kept(lambda: model(x).get())


@pytest.mark.parametrize("width", [8, 512])  # a fit measured fast runs on the event loop; a big one would not
async def test_a_fit_through_dropout_leaves_the_callers_stream_alone(width):
    async with fz.VirtualWorker("bob", datasets={"toy": _dataset()}) as bob:
        model = _dropout_model(8)
        model[0] = nn.Linear(8, width)
        model[2] = nn.Linear(width, 2)
        remote = await bob.send(model)
        await remote.fit("toy", steps=2, batch_size=16)  # measured once, as rounds would
        await _caller_stream_is_kept(lambda: remote.fit("toy", steps=2, batch_size=16))


async def test_concurrent_seeded_draws_beside_remote_dropout_equal_the_sequential_ones():
    """Coroutines interleaving on the loop: one draws seeded numbers around its awaits, the other runs
    remote forwards through dropout (a torch thread's work) meanwhile."""
    async with fz.VirtualWorker("bob") as bob:
        model = await bob.send(_dropout_model(16))
        x = await bob.send(torch.ones(4, 16))

        async def draws() -> list[torch.Tensor]:
            torch.manual_seed(99)
            out = []
            for _ in range(6):
                out.append(torch.randn(3))
                await (await bob.send(out[-1])).get()  # in the session's order, after a forward sent meanwhile
            return out

        async def forwards() -> None:
            for _ in range(6):
                await model(x).get()

        alone = await draws()
        together, _ = await asyncio.gather(draws(), forwards())
        assert all(torch.equal(a, b) for a, b in zip(alone, together))


async def test_a_virtual_workers_masks_do_not_depend_on_what_its_caller_drew():
    """Two fresh in-process workers, their callers' streams seeded apart: the same forwards, the same masks
    (a fresh worker's stream starts where a fresh generator's does)."""
    torch.manual_seed(0)
    local = _dropout_model(16)
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        async with fz.VirtualWorker("alice") as alice:
            model = await alice.send(local)
            x = await alice.send(torch.ones(4, 16))
            outputs.append([await model(x).get() for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    assert not torch.equal(outputs[0][0], outputs[0][1])  # the masks do change between calls


SECRET = "random-test"


async def _fitted_twice(worker: fz.RemoteWorker, start: nn.Module) -> list[dict[str, torch.Tensor]]:
    """The states two fits of ``start`` with one seed give, with a forward through dropout between them."""
    states = []
    for _ in range(2):
        local = copy.deepcopy(start)
        remote = await worker.send(local)
        await remote.fit("toy", steps=3, batch_size=16, seed=7)
        await remote(await worker.send(torch.ones(2, 8))).get()  # draws from the worker's stream
        states.append({k: v.clone() for k, v in (await remote.get()).state_dict().items()})
        await remote.delete()
    return states


async def test_a_seeded_fit_of_a_dropout_model_is_the_same_on_daemons_and_virtual_workers(fedzmq_daemons, tmp_path):
    """A fit's dropout masks come from its seed (mixed with the owner's shuffle secret, as its shuffle):
    two fresh daemons with one ``--shuffle-secret``, a virtual worker with the same secret, and a repeat
    of the fit on each after other draws all train the same model, bit for bit. Before, a daemon drew them
    from its process's generator, which torch seeds at random at start-up."""
    torch.manual_seed(3)
    start = _dropout_model(8)
    data = _dataset()
    path = write_dataset(tmp_path / "toy.safetensors", data.features, data.labels)
    daemons = await fedzmq_daemons("bob", "carol", datasets={"bob": {"toy": path}, "carol": {"toy": path}},
                                   args=["--shuffle-secret", SECRET])
    results = [await _fitted_twice(handle.worker, start) for handle in daemons]
    async with fz.VirtualWorker("dave", datasets={"toy": data}, config=fz.WorkerConfig(shuffle_secret=SECRET)) as dave:
        results.append(await _fitted_twice(dave, start))
    first = results[0][0]
    assert any(not torch.equal(first[k], start.state_dict()[k]) for k in first)  # it trained
    for states in results:
        for state in states:
            assert all(torch.equal(state[k], first[k]) for k in first)


async def test_two_federated_runs_of_a_dropout_model_on_fresh_daemons_are_equal_bit_for_bit(fedzmq_daemons, tmp_path):
    """The determinism promise (docs/api.md) with a model that has dropout: the same federation run twice,
    each on daemons started for it (so each process's generator was seeded anew at random by torch)."""
    data = _dataset()
    path = write_dataset(tmp_path / "toy.safetensors", data.features, data.labels)
    finals = []
    for ids in (("bob", "carol"), ("dan", "erin")):
        handles = await fedzmq_daemons(*ids, datasets={i: {"toy": path} for i in ids},
                                       args=["--shuffle-secret", SECRET])
        torch.manual_seed(5)
        model = _dropout_model(8)
        federation = fz.Federation([h.worker for h in handles], model,
                                   fz.FitConfig(dataset="toy", steps=2, batch_size=16), seed=1)
        await federation.run(2)
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
