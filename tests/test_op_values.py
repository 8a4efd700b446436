"""An op's reply carries its outputs' values when they are tiny and a ``get`` would be let through:
``await (x + 1).get()`` then takes one trip, not two (``Command.returns_small_outputs``). These tests
hold that to what a ``get`` would have answered: the client uses a value only while nothing else was
sent to the session since the op, each ``get`` gets its own tensor, and a value the owner's terms keep
is never in a reply, on a real daemon, whatever a client asks."""

import asyncio

import pytest
import torch

import fedzmq as fz
from fedzmq.codec import Ref
from fedzmq.examples import digits
from fedzmq.worker.executor import SMALL_OUTPUT_BYTES


async def requests_run(worker: fz.RemoteWorker) -> int:
    """The requests the worker has received (the ``status`` asking for it included)."""
    return (await worker.status())["requests"]


@pytest.mark.timeout(60)
async def test_a_get_right_after_its_op_takes_one_trip():
    async with fz.VirtualWorker("bob") as bob:
        x = await bob.send(torch.arange(4.0))
        before = await requests_run(bob)
        assert torch.equal(await (x + 1).get(), torch.arange(4.0) + 1)
        assert await requests_run(bob) - before == 2  # the op, and this status


@pytest.mark.timeout(60)
async def test_a_command_sent_between_the_op_and_its_get_makes_the_get_ask():
    async with fz.VirtualWorker("bob") as bob:
        x = await bob.send(torch.arange(4.0))
        y = x + 1
        z = x * 3  # sent after y's op: from here on a get of y asks the worker, as nothing is assumed
        before = await requests_run(bob)
        assert torch.equal(await y.get(), torch.arange(4.0) + 1)
        assert await requests_run(bob) - before == 2  # y's get, and this status
        assert torch.equal(await z.get(), torch.arange(4.0) * 3)  # z's op was the last: its reply serves


@pytest.mark.timeout(60)
async def test_each_get_returns_a_tensor_of_its_own():
    async with fz.VirtualWorker("bob") as bob:
        x = await bob.send(torch.arange(4.0))
        y = x + 1
        first = await y.get()
        first += 100
        assert torch.equal(await y.get(), torch.arange(4.0) + 1)
        assert not torch.equal(first, await y.get())


@pytest.mark.timeout(60)
async def test_values_above_the_bound_and_failed_ops_go_through_get():
    async with fz.VirtualWorker("bob") as bob:
        numel = SMALL_OUTPUT_BYTES // 4 + 1
        x = await bob.send(torch.ones(numel))
        before = await requests_run(bob)
        assert torch.equal(await (x + 1).get(), torch.full((numel,), 2.0))
        assert await requests_run(bob) - before == 3  # the op, the get, this status
        # a failed op: its get reports the op's error, as it always has
        with pytest.raises(fz.RemoteError, match="never made because its command failed: index 10 is out of bounds"):
            await (await bob.send(torch.arange(4.0)))[10].get()


@pytest.mark.timeout(60)
async def test_concurrent_op_and_get_give_the_sequential_results():
    async with fz.VirtualWorker("bob") as bob:
        x = await bob.send(torch.arange(8.0))
        sequential = [await (x * i + 1).get() for i in range(20)]

        async def one(i: int) -> torch.Tensor:
            await asyncio.sleep(0.001 * (i % 3))
            return await (x * i + 1).get()

        concurrent = await asyncio.gather(*(one(i) for i in range(20)))
        assert all(torch.equal(a, b) for a, b in zip(sequential, concurrent))


@pytest.fixture
def owner_data(tmp_path):
    split = digits.prepare(tmp_path / "data", ["bob"], alpha=1.0, seed=2)
    return str(split.shards["bob"])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("release", ["none", "aggregates"])
async def test_an_op_reply_never_carries_a_value_the_terms_keep(fedzmq_daemons, owner_data, release):
    """A raw op request, as any client may send, on a real daemon serving open rows: the reply carries
    a value only where a ``get`` of it would be answered."""
    [bob] = await fedzmq_daemons("bob", args={"bob": ["--open-data", f"digits={owner_data}",
                                                      "--private-release", release]})
    [ds] = await bob.worker.datasets()
    features = await ds.features()
    worker = bob.worker
    one_pixel = await worker._request("op", {"op": "getitem", "args": [Ref(features.id), [0, 5]], "kwargs": {},
                                             "out": [10_001]})
    assert one_pixel is None  # a row's value: no reply ever carries it
    mean = await worker._request("op", {"op": "mean", "args": [Ref(features.id)], "kwargs": {}, "out": [10_002]})
    if release == "aggregates":  # released as it was made, as its get would be
        assert isinstance(mean, list) and mean[0].numel() == 1
    else:
        assert mean is None
    public = await worker._request("op", {"op": "add", "args": [torch.ones(2), 1], "kwargs": {}, "out": [10_003]})
    assert torch.equal(public[0], torch.full((2,), 2.0))
    with pytest.raises(fz.PermissionDenied):
        await features[0, 5].get()
