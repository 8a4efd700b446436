"""A command's request bytes count against its session's quota from when it is read until its own charge
takes over, its waits for a torch thread or the generator's turn included (red team h36: they were
uncounted there, so a session could queue another request of a full quota beside it, holding twice its
quota for the length of the wait)."""

import asyncio

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.testing import write_dataset
from fedzmq.errors import LimitExceeded
from fedzmq.testing.plugin import TEST_SETTINGS
from fedzmq.worker.quota import Quota

pytestmark = pytest.mark.timeout(120)

FEATURES = 8
QUOTA = 7_000_000
#: a stream's destination of 4 MB and two chunks of 2 MB: the destination and one chunk fit the quota,
#: the destination and two chunks do not
DESTINATION, CHUNK = 4_000_000, 2_000_000


async def test_a_write_waiting_for_a_thread_still_counts_against_its_sessions_quota(fedzmq_daemons, tmp_path):
    """One torch thread, held by a fit of another session. A session allocates 4 MB under a quota of 7 MB
    and sends two writes of 2 MB into it. The first waits for the thread: its 2 MB are in the daemon's
    memory all along. Before, the second was taken in beside it (8 MB for a 7 MB quota). Now it is
    refused as it arrives, and the first, sent first, is written."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in "ab":
        x = torch.rand(64, FEATURES)
        write_dataset(shards / f"{name}.safetensors", x, (x[:, 0] > 0.5).long())
    (host,) = await fedzmq_daemons("owner", args=["--clients-from", f"d={shards}", "--threads", "1",
                                                  "--max-command-seconds", "3", "--max-session-bytes", str(QUOTA)])
    first, second = sorted(await fz.connect_clients(host.address, settings=TEST_SETTINGS), key=lambda w: w.id)
    try:
        model = await first.send(nn.Linear(FEATURES, 2))
        hog = asyncio.ensure_future(model.fit("d", batch_size=16, steps=600_000,
                                              optimizer={"cls": "SGD", "lr": 0.01}))
        obj = second.new_id()
        await second.request("alloc", {"out": obj, "dtype": "uint8", "shape": [DESTINATION], "grad": False})
        await asyncio.sleep(1.0)  # (the fit holds the one thread until its 3 s are up)
        assert not hog.done()
        chunks = [torch.full((CHUNK,), 1, dtype=torch.uint8), torch.full((CHUNK,), 2, dtype=torch.uint8)]
        written = await asyncio.gather(*(second.request("write", {"obj": obj, "offset": i * CHUNK, "data": c})
                                         for i, c in enumerate(chunks)), return_exceptions=True)
        await asyncio.gather(hog, return_exceptions=True)
        assert written[0] == CHUNK, written[0]
        assert isinstance(written[1], fz.LimitExceeded), written[1]
    finally:
        await first.close()
        await second.close()


@pytest.mark.timeout(10)
def test_a_quota_refusal_names_every_term_of_the_sum() -> None:
    """A refusal named what the session held and what its requests carried, not what running commands had
    reserved or what replies ZeroMQ still held: under a quota that looked mostly free it read "0 more would
    pass" (h38). Each term of the one sum is in the message."""
    quota = Quota(1000)
    quota.hold(1, [torch.zeros(25)])  # 100 bytes
    quota.queued, quota.starting = 30, 20
    with quota.reserving(700):
        with pytest.raises(LimitExceeded) as refused:
            quota.check(200, "an op")
    message = str(refused.value)
    for term in ("100 held", "700 reserved", "50 in requests"):
        assert term in message, message
