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
