"""Breaks found by h36's red team of a data owner's daemon (a hostile coordinator with an allowed key),
aimed at hosted clients, the generator's turn, small fits on the event loop and the release ledgers."""

import asyncio

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.testing.plugin import TEST_SETTINGS
from shards import write_shards

pytestmark = pytest.mark.timeout(120)

FEATURES = 8


def _dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Dropout(0.5), nn.Linear(8, 2))


async def test_one_keys_many_sessions_take_one_turn_of_the_generator_not_one_each(fedzmq_daemons, tmp_path):
    """One connection to a daemon hosting four clients (``--clients-from``) is four sessions of one key. Each
    starts a dropout fit that runs to ``--max-command-seconds``: each waits for the generator's turn
    (``GENERATOR_TURN``), which was a first-come lock. Another key's dropout op, sent after them, waited for
    all four (four times the limit; with ``--max-sessions-per-key`` connections of many hosted clients, hours
    at the default limit), where the torch threads (``FairPool``) let it wait for one piece of each other
    key's work. The generator's turn now goes to the keys in turn too."""
    write_shards(tmp_path / "shards", "abcd", FEATURES, 36)
    (host,) = await fedzmq_daemons("owner", args=["--clients-from", f"d={tmp_path / 'shards'}", "--threads", "2",
                                                  "--max-command-seconds", "4"])
    hosted = sorted(await fz.connect_clients(host.address, settings=TEST_SETTINGS), key=lambda w: w.id)
    try:
        async with fz.connect(host.address, settings=TEST_SETTINGS) as other:  # another coordinator
            ones = await other.send(torch.ones(4, FEATURES))
            models = [await worker.send(_dropout_model()) for worker in hosted]
            optimizer = {"cls": "SGD", "lr": 0.01}
            hogs = [asyncio.ensure_future(m.fit("d", batch_size=16, steps=500_000, optimizer=optimizer))
                    for m in models]
            await asyncio.sleep(1.0)  # one holds the generator's turn, the three others wait for it
            assert not any(h.done() for h in hogs)
            drawn = await ones.dropout(0.5, True).get()
            ended_before = sum(h.done() for h in hogs)
            results = await asyncio.gather(*hogs, return_exceptions=True)
            assert all(isinstance(r, fz.LimitExceeded) for r in results), results
            assert drawn.shape == (4, FEATURES)
            assert ended_before <= 1, f"another key's dropout op waited for {ended_before} fits of one key"
    finally:
        for worker in hosted:
            await worker.close()


#: a buffer of 786,432 elements (under ``INLINE_FIT_NUMEL`` with the layer), and an order of its dims that keeps
#: its shape: a view of a tensor of that shape so permuted is read 19 dims out of order by a copy
WIDE_SHAPE = [2] * 18 + [3]
WIDE_ORDER = [*reversed(range(18)), 18]


class _Wide(nn.Module):
    """A small layer, and a big buffer its forward never reads: a fit of it is fast, a load of it is not."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(FEATURES, 3)
        self.register_buffer("big", torch.zeros(WIDE_SHAPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


async def test_a_small_fit_whose_load_copies_a_view_out_of_order_runs_on_a_thread():
    """``small_fit`` runs a fit on the event loop once the same fit (``fit_key``: every argument but the
    weights loaded and the seed) was measured under 2 ms of CPU. The ``load`` may name the session's tensors,
    and a view of one read out of order is slow to copy (``cost.copy_units``): a load of a 786,432-element
    buffer from a view permuted in 19 dims took 15 ms on the loop (7x the bound, up to the 0.5 s an inline
    fit may be sized for), once per model primed with a fast fit, so a key's sessions could hold the loop
    that long per model, every other session waiting. Such a load now sends the fit to a torch thread."""
    from fedzmq.worker.config import WorkerConfig
    from fedzmq.worker.datasets import Dataset

    g = torch.Generator().manual_seed(1)
    data = Dataset("d", torch.randn(64, FEATURES, generator=g), torch.randint(0, 3, (64,), generator=g))
    async with fz.VirtualWorker("w", datasets={"d": data}, config=WorkerConfig(min_batch_size=8)) as worker:
        remote = await worker.send(_Wide())
        source = (await worker.send(torch.zeros(WIDE_SHAPE))).permute(*WIDE_ORDER)
        fit = {"module": remote.id, "dataset": "d", "loss": "cross_entropy", "batch_size": 16, "steps": 2,
               "optimizer": {"cls": "SGD", "lr": 0.1}}
        for _ in range(60):  # measured fast (under a loaded host's spinning threads, it may take a few)
            await worker.request("fit", fit)
            if (await worker.status())["inline_fits"]:
                break
        primed = (await worker.status())["inline_fits"]
        assert primed >= 1
        await worker.request("fit", {**fit, "load": {"big": source}})
        assert (await worker.status())["inline_fits"] == primed, "a load out of order was copied on the event loop"


async def test_the_generators_fair_turn_survives_a_waiter_cancelled_or_closed_unawaited():
    """``FairTurn`` (the generator's turn since h36) must be given up by a waiter that is cancelled, or closed
    where it waits (a command the pump started, ``eager.Started.close``, when a revoked key's queue is refused),
    as ``asyncio.Lock`` was: a waiter left queued would be given the turn, which nobody then gives back, and
    every command that draws would wait forever. Keys take turns: the holder's next waiter goes last."""
    from fedzmq.eager import Started, start
    from fedzmq.worker.fairpool import FairTurn

    turn, order, release = FairTurn(), [], asyncio.Event()

    async def hold(key: str, name: str, until: asyncio.Event | None = None) -> None:
        async with turn.turn(key):
            order.append(name)
            if until is not None:
                await until.wait()

    first = asyncio.ensure_future(hold("a", "a1", release))
    await asyncio.sleep(0)
    second, third = asyncio.ensure_future(hold("a", "a2")), asyncio.ensure_future(hold("b", "b1"))
    cancelled = asyncio.ensure_future(hold("c", "c1"))
    closed = start(hold("d", "d1"))  # waits for the turn where it started, as an eager command does
    await asyncio.sleep(0)
    assert isinstance(closed, Started)
    closed.close()
    cancelled.cancel()
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second, third, cancelled, return_exceptions=True), 10)
    assert order == ["a1", "b1", "a2"]
    await asyncio.wait_for(hold("e", "e1"), 10)  # the turn is free again
