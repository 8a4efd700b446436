"""A closed worker refuses work with ``fz.WorkerClosedError``, whoever noticed the close first: the client,
or the worker refusing the commands queued behind it. (Found by a session breaking the concurrency
promise with ordinary user code.)"""

import asyncio

import pytest
import torch

import fedzmq as fz

pytestmark = pytest.mark.timeout(60)


async def _work(worker: fz.RemoteWorker) -> torch.Tensor:
    x = await worker.send(torch.randn(5000))  # streamed in pieces: several round trips
    for _ in range(20):
        x = x * 1.0001
    return await x.sum().get()


async def test_work_in_flight_when_its_worker_closes_fails_as_worker_closed():
    """Commands the worker refused because the session closed before they ran came back as a plain
    ``RemoteError`` whose ``remote_type`` was "WorkerClosedError": ``except fz.WorkerClosedError`` missed
    them (always on a VirtualWorker; on daemons, as timing had it)."""
    worker = fz.VirtualWorker("bob", config=fz.WorkerConfig(limits=fz.Limits(chunk_bytes=4096)))
    tasks = [asyncio.ensure_future(_work(worker)) for _ in range(4)]
    await asyncio.sleep(0.005)
    await worker.close()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert failures, "no work was in flight at the close: the test proves nothing"
    assert all(isinstance(failure, fz.WorkerClosedError) for failure in failures), \
        [f"{type(failure).__name__}: {failure}" for failure in failures]


async def test_a_closed_hosted_client_refuses_work_and_leaves_nothing_behind(hosting_daemon):
    """A hosted client kept sending after ``close()`` (its connection stays open for the other clients):
    the daemon opened a new session for it, and its objects stayed until the session expired."""
    clients = await fz.connect_clients(hosting_daemon)
    await clients[0].close()
    with pytest.raises(fz.WorkerClosedError):
        await clients[0].send(torch.ones(1000))
    async with fz.connect(hosting_daemon) as host:
        assert (await host.status())["objects"] == 0
    await asyncio.gather(*(client.close() for client in clients[1:]))


async def test_a_stopping_worker_answers_the_requests_it_read_and_had_not_queued_yet():
    """``say_stopping`` answered the commands of sessions, but not those of a batch the pump had read and
    left in the connection's intake (a batch is accepted a few requests per turn): those were dropped at
    the close, and their callers learned of the stop from silent heartbeats, seconds later."""
    async with fz.Worker("erin") as server:
        client = await fz.connect(server.address, settings=fz.ConnectionSettings(heartbeat_interval=5.0))
        try:
            x = await client.send(torch.ones(3))
            replies = [asyncio.ensure_future((x + i).get()) for i in range(300)]  # sent as batches
            for _ in range(1000):
                await asyncio.sleep(0)
                if server.status()["batches"]:
                    break
            assert server.status()["batches"], "no batch was read: the test proves nothing"
            server.say_stopping()
            await server.close()
            outcomes = await asyncio.wait_for(asyncio.gather(*replies, return_exceptions=True), 3)
        finally:
            await client.close()
    refused = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert refused, "every request ran before the stop: the test proves nothing"
    assert all(isinstance(outcome, fz.WorkerClosedError) for outcome in refused), \
        {f"{type(outcome).__name__}: {outcome}" for outcome in refused}
