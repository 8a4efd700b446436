"""Pointers of a daemon's logical clients live in their own sessions, on a connection shared with the
daemon's own session: a collected pointer must be deleted in its own session. The batched delete used to
go to the daemon's own session, where it freed whatever object had the same id (ids count from 1 in
every session) and left the client's object held until the connection closed. And a pointer collected
after its client closed must send nothing (its delete used to open a new, empty session)."""

import asyncio
import gc

import pytest
import torch

import fedzmq as fz
from fedzmq.client.pointer_ops import RELEASE_DELAY


@pytest.mark.timeout(60)
async def test_a_hosted_clients_collected_pointer_is_deleted_in_its_own_session(hosting_daemon):
    async with fz.connect(hosting_daemon) as host:
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


@pytest.mark.timeout(60)
async def test_a_closed_hosted_clients_collected_pointer_opens_no_new_session(hosting_daemon):
    async with fz.connect(hosting_daemon) as host:
        client = (await host.clients())[0]
        dropped = await client.send(torch.tensor([5.0]))
        assert (await host.status())["sessions"] == 2
        await client.close()
        assert (await host.status())["sessions"] == 1
        del dropped
        gc.collect()
        await asyncio.sleep(RELEASE_DELAY * 5)
        assert (await host.status())["sessions"] == 1  # the client's session stays gone
