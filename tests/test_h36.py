"""Breaks found by h36's red team of a data owner's daemon (a hostile coordinator with an allowed key),
aimed at hosted clients, the generator's turn, small fits on the event loop and the release ledgers."""

import asyncio

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.testing import write_dataset
from fedzmq.testing.plugin import TEST_SETTINGS

pytestmark = pytest.mark.timeout(120)

FEATURES = 8


def _dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Dropout(0.5), nn.Linear(8, 2))


def _shards(folder, names: str, rows: int = 64) -> None:
    folder.mkdir()
    generator = torch.Generator().manual_seed(36)
    for name in names:
        x = torch.rand(rows, FEATURES, generator=generator)
        write_dataset(folder / f"{name}.safetensors", x, (x[:, 0] > 0.5).long())


async def test_one_keys_many_sessions_take_one_turn_of_the_generator_not_one_each(fedzmq_daemons, tmp_path):
    """One connection to a daemon hosting four clients (``--clients-from``) is four sessions of one key. Each
    starts a dropout fit that runs to ``--max-command-seconds``: each waits for the generator's turn
    (``GENERATOR_TURN``), which was a first-come lock. Another key's dropout op, sent after them, waited for
    all four (four times the limit; with ``--max-sessions-per-key`` connections of many hosted clients, hours
    at the default limit), where the torch threads (``FairPool``) let it wait for one piece of each other
    key's work. The generator's turn now goes to the keys in turn too."""
    _shards(tmp_path / "shards", "abcd")
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
