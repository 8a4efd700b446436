"""Review h29: bugs found in the review of 7c9b456..5929c22, each written as the check that should hold."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.testing.datasets import write_dataset
from test_redteam_h19 import two_shards

pytestmark = pytest.mark.timeout(180)


async def settled_bytes(worker: fz.RemoteWorker, want: int) -> int:
    """The daemon's charged bytes once they reach ``want`` (the give-ups are sent without a wait), or after
    a bounded number of polls, whatever they are then."""
    held = (await worker.status())["bytes"]
    for _ in range(50):
        if held <= want:
            break
        await asyncio.sleep(0.1)
        held = (await worker.status())["bytes"]
    return held


async def test_a_held_updates_refusal_over_hosted_clients_gives_up_the_states_streamed_to_it(fedzmq_daemons,
                                                                                                tmp_path):
    """A round over hosted clients whose aggregator holds every update (FedMedian) and refuses the second with
    ``HeldBytesExceeded``: the daemon made each client's trained state for the reply and keeps its streamed
    entries (their own copies, charged to the session) until they are read. ``_clients_group_trip`` asks the
    aggregator for every receiver before it makes any ``StatePieces`` (whose end or collection gives the
    unread up), so a refusal there leaves every state's copies kept on the daemon until the session ends."""
    folder = two_shards(tmp_path)
    small = fz.ConnectionSettings(limits=fz.Limits(max_frame_bytes=4096))  # the 16 KiB weight is streamed
    [host] = await fedzmq_daemons("sim", args=["--clients-from", f"d={folder}"])
    workers = await fz.connect_clients(host.address, settings=small)
    try:
        torch.manual_seed(0)
        model = nn.Linear(64, 64)
        fit = fz.FitConfig(dataset="d", batch_size=16, steps=1)
        held = fz.Federation(workers, model, fit, fz.make_strategy("fedmedian"), seed=3)
        await held.run_round()  # the hosted model is made; nothing is kept once its states are read
        baseline = (await workers[0].status())["bytes"]  # one hosted model (each federation sends its own)
        one_update = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        refusing = fz.Federation(workers, model, fit, fz.FedMedian(max_held_bytes=one_update + 1), seed=4)
        with pytest.raises((fz.RoundFailed, fz.HeldBytesExceeded)):
            await refusing.run_round()
        left = await settled_bytes(workers[0], 2 * baseline)
        assert left <= 2 * baseline, f"the daemon still holds {left - 2 * baseline} bytes of states nobody will read"
    finally:
        for worker in workers:
            await worker.close()


class Scored(nn.Module):
    """A model with a top-level buffer named ``metrics`` (a running score kept with the weights), streamed
    past a 4 KiB piece."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("metrics", torch.zeros(4096))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.metrics[:4]


async def test_a_timed_out_get_of_a_model_with_an_entry_named_metrics_gives_up_its_kept_reads(fedzmq_daemons):
    """``Transfers.reply_states`` (new) tells a fit-over-clients reply from a model state by a ``metrics`` key, and
    a model whose state_dict has one (a buffer named ``metrics``) has its ``module_state`` reply taken for a fit's
    with no states in it: a get that times out gives up nothing, and the daemon keeps the streamed entries' reads
    (and any copy a later write makes of them) until the session ends. Before, a state reply was given up whole."""
    small = fz.ConnectionSettings(limits=fz.Limits(max_frame_bytes=4096))
    [host] = await fedzmq_daemons("bob", settings=small, args=["--fault-injection"])
    worker = host.worker
    model = Scored()  # (kept: a get copies into the local module, which must still exist)
    pointer = await worker.send(model)
    await worker.request("debug_delay", {"seconds": 1.0})
    with pytest.raises(fz.RequestTimeout):
        await pointer.get(timeout=0.3)
    await worker.request("debug_delay", {"seconds": 0.0})
    baseline = (await worker.status())["bytes"]
    await worker.request("module_write", {"obj": pointer.id, "name": "metrics", "offset": 0,
                                          "data": torch.ones(16, dtype=torch.uint8)})  # a kept read is copied now
    left = await settled_bytes(worker, baseline)
    assert left <= baseline, f"the daemon copied {left - baseline} bytes for a read nobody will make"


async def test_a_held_updates_refusal_of_a_daemons_update_gives_up_its_streamed_state(fedzmq_daemons, tmp_path):
    """The same refusal on plain daemons (``fit_trip``): the aggregator refused the second update before its
    pieces were read, and nothing closed them; the daemon kept the streamed entries until the pieces were
    collected, which a traceback held off."""
    path = two_shards(tmp_path) / "a.safetensors"
    small = fz.ConnectionSettings(limits=fz.Limits(max_frame_bytes=4096))  # the 16 KiB weight is streamed
    daemons = await fedzmq_daemons("bob", "alice", args=["--data", f"d={path}", "--min-batch-size", "1",
                                                         "--min-metric-rows", "1"])
    workers = [await fz.connect(d.address, settings=small) for d in daemons]
    try:
        torch.manual_seed(0)
        model = nn.Linear(64, 64)
        fit = fz.FitConfig(dataset="d", batch_size=16, steps=1)
        await fz.Federation(workers, model, fit, fz.make_strategy("fedmedian"), seed=3).run_round()
        baselines = [(await w.status())["bytes"] for w in workers]
        one_update = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        refusing = fz.Federation(workers, model, fit, fz.FedMedian(max_held_bytes=one_update + 1), seed=4)
        with pytest.raises((fz.RoundFailed, fz.HeldBytesExceeded)) as refused:
            await refusing.run_round()
        for worker, baseline in zip(workers, baselines):
            left = await settled_bytes(worker, 2 * baseline)
            assert left <= 2 * baseline, f"{worker.id} still holds {left - 2 * baseline} bytes nobody will read"
        del refused
    finally:
        for worker in workers:
            await worker.close()
