"""A client whose messages are smaller than the worker's (``Limits(max_frame_bytes=...)``, which caps its
``chunk_bytes``) tells the worker in its ping, and the worker streams it every tensor past that size:
such a client refused every reply between the two sizes, as a message it could not read (a session
breaking the concurrency promise found it)."""

import pytest
import torch
from torch import nn

import fedzmq as fz

pytestmark = pytest.mark.timeout(120)

SMALL = fz.ConnectionSettings(limits=fz.Limits(max_frame_bytes=4096))


@pytest.fixture(params=["virtual", "daemon"])
async def bob(request, fedzmq_daemons):
    if request.param == "virtual":  # the worker's own limits: the defaults (128 MiB chunks)
        async with fz.VirtualWorker("bob", settings=SMALL) as worker:
            yield worker
    else:
        [handle] = await fedzmq_daemons("bob", settings=SMALL)
        yield handle.worker


async def test_a_client_with_smaller_messages_gets_big_values_in_pieces(bob):
    value = torch.arange(5000, dtype=torch.float32)  # 20,000 bytes: past the client's 4,096
    assert torch.equal(await (await bob.send(value)).get(), value)
    assert torch.equal(await ((await bob.send(value)) * 2).get(), value * 2)  # an op and its fetch
    torch.manual_seed(0)
    model = nn.Linear(64, 64)  # a 16 KiB weight
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    remote = await bob.send(model)
    with torch.no_grad():
        model.weight.zero_()
    got = (await remote.get()).state_dict()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
