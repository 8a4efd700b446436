"""Closing the hosted clients of a daemon together (``asyncio.gather(*(c.close() for c in clients))``, as
docs/api.md does) closes their shared connection once. It used to close it from every client whose
goodbye was still in flight, and the second close failed with AttributeError on the closed socket."""

import asyncio

import pytest
import torch

import fedzmq as fz
from fedzmq.worker.datasets import Dataset


@pytest.mark.timeout(60)
async def test_hosted_clients_closed_together_close_their_connection_once():
    clients = {f"c{i}": {"toy": Dataset("toy", torch.randn(16, 2), torch.zeros(16, dtype=torch.long))}
               for i in range(5)}
    worker = fz.Worker("host", clients=clients)
    address = worker.bind("tcp://127.0.0.1:0")
    worker.start()
    try:
        workers = await fz.connect_clients(address)
        assert sorted(w.id for w in workers) == sorted(clients)
        assert [len(await w.datasets()) for w in workers] == [1] * 5
        connection = workers[0]._connection
        results = await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
        assert results == [None] * 5
        assert connection.closed and connection.users == 0
    finally:
        await worker.close()
