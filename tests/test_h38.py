"""Breaks found by h38's cold review of da7864e..ce6a67f: the quota's count of a running command's request
(``Quota.running``, ``room_for_requests``), the generator's turn shared with in-process workers, and the
torch threads' queue (``TakeTurns``)."""

import asyncio

import pytest
import torch
from torch import nn

import fedzmq as fz

pytestmark = pytest.mark.timeout(120)

FEATURES = 1024


def _dataset():
    from fedzmq.worker.datasets import Dataset

    g = torch.Generator().manual_seed(38)
    return Dataset("d", torch.randn(64, FEATURES, generator=g), torch.randint(0, 2, (64,), generator=g))


async def test_a_request_that_carries_no_bytes_is_not_refused_for_a_running_commands_load():
    """A running command's request counts against the requests arriving until it ends (h37), and the
    command's own charges were checked without it: a fit with Adam (its state made once the fit is charged)
    and a ``load`` of its weights leaves ``room()`` smaller than its load. ``room_for_requests`` is then
    below zero, and every request of the session was refused while the fit ran, one that carries no bytes
    too: a ``delete``, which only frees (the client's pointers send them unawaited, so a refused one was an
    object left held by its session, the client believing it gone)."""
    from fedzmq.worker.config import WorkerConfig

    config = WorkerConfig(min_batch_size=8, max_session_bytes=31 << 19, max_command_seconds=3)  # 15.5 MiB
    async with fz.VirtualWorker("w", datasets={"d": _dataset()}, config=config) as worker:
        torch.manual_seed(0)
        model = nn.Linear(FEATURES, 512, bias=False)  # 2 MiB, and 2 MiB of room for its gradient
        remote = await worker.send(model)
        spare = await worker.send(torch.ones(4))
        fit = {"module": remote.id, "dataset": "d", "loss": "cross_entropy", "batch_size": 16, "steps": 500_000,
               "optimizer": {"cls": "SGD", "lr": 0.001, "momentum": 0.9}, "load": {"weight": model.weight.detach().clone()}}
        running = asyncio.ensure_future(worker.request("fit", fit))
        await asyncio.sleep(1.0)  # charged, and training on a torch thread
        assert not running.done()
        await worker.request("delete", {"objs": [spare.id]})  # frees 16 bytes: nothing to refuse
        spare.mark_deleted()
        with pytest.raises(fz.LimitExceeded, match="ran longer"):
            await running
