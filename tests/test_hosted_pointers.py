"""Pointers of a daemon's logical clients live in their own sessions, on a connection shared with the
daemon's own session: a collected pointer must be deleted in its own session. The batched delete used to
go to the daemon's own session, where it freed whatever object had the same id (ids count from 1 in
every session) and left the client's object held until the connection closed."""

import asyncio
import gc

import pytest
import torch

import fedzmq as fz
from fedzmq.client.pointer_ops import RELEASE_DELAY
from fedzmq.worker.datasets import Dataset


@pytest.mark.timeout(60)
async def test_a_hosted_clients_collected_pointer_is_deleted_in_its_own_session():
    clients = {f"c{i}": {"toy": Dataset("toy", torch.randn(16, 2), torch.zeros(16, dtype=torch.long))}
               for i in range(2)}
    worker = fz.Worker("host", clients=clients)
    address = worker.bind("tcp://127.0.0.1:0")
    worker.start()
    try:
        async with fz.connect(address) as host:
            client = (await host.clients())[0]
            kept = await host.send(torch.tensor([1.0, 2.0]))
            dropped = await client.send(torch.tensor([5.0]))
            assert kept.id == dropped.id  # the same id, in two sessions
            assert (await host.status())["objects"] == 2
            del dropped
            gc.collect()
            await asyncio.sleep(RELEASE_DELAY * 5)  # the batched delete leaves
            await client.ping()
            assert torch.equal(await kept.get(), torch.tensor([1.0, 2.0]))
            assert (await host.status())["objects"] == 1
            await client.close()
    finally:
        await worker.close()


@pytest.mark.timeout(60)
async def test_a_closed_hosted_clients_collected_pointer_opens_no_new_session():
    clients = {f"c{i}": {"toy": Dataset("toy", torch.randn(16, 2), torch.zeros(16, dtype=torch.long))}
               for i in range(2)}
    worker = fz.Worker("host", clients=clients)
    address = worker.bind("tcp://127.0.0.1:0")
    worker.start()
    try:
        async with fz.connect(address) as host:
            client = (await host.clients())[0]
            dropped = await client.send(torch.tensor([5.0]))
            assert (await host.status())["sessions"] == 2
            await client.close()
            assert (await host.status())["sessions"] == 1
            del dropped
            gc.collect()
            await asyncio.sleep(RELEASE_DELAY * 5)
            assert (await host.status())["sessions"] == 1  # the client's session stays gone
    finally:
        await worker.close()
