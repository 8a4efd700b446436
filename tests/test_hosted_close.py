"""Closing the hosted clients of a daemon together (``asyncio.gather(*(c.close() for c in clients))``, as
docs/api.md does) closes their shared connection once. It used to close it from every client whose
goodbye was still in flight, and the second close failed with AttributeError on the closed socket."""

import asyncio

import pytest

import fedzmq as fz


@pytest.mark.timeout(60)
async def test_hosted_clients_closed_together_close_their_connection_once(hosting_daemon):
    workers = await fz.connect_clients(hosting_daemon)
    assert sorted(w.id for w in workers) == [f"c{i}" for i in range(5)]
    assert [len(await w.datasets()) for w in workers] == [1] * 5
    connection = workers[0]._connection
    results = await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
    assert results == [None] * 5
    assert connection.closed and connection.users == 0


@pytest.mark.timeout(60)
async def test_federations_over_hosted_clients_leave_no_model_behind(hosting_daemon):
    """A round sends its model to the daemon's own session (one copy for all the clients it hosts), through
    the daemon's handle that ``connect_clients`` had closed as the clients took the connection over; a
    closed handle sent no release, so every finished federation left its model on the daemon for as long
    as the connection lived (found by a session attacking the concurrency promises)."""
    import gc

    import torch
    from torch import nn

    workers = await fz.connect_clients(hosting_daemon)
    try:
        for seed in range(3):
            torch.manual_seed(seed)
            federation = fz.Federation(workers, nn.Linear(2, 2), fz.FitConfig(dataset="toy", steps=1, batch_size=16))
            await federation.run(1)
            del federation
            gc.collect()
            await asyncio.sleep(0.3)  # releases go out in batches, a moment later
        assert (await workers[0].host.status())["objects"] == 0
    finally:
        await asyncio.gather(*(w.close() for w in workers))
