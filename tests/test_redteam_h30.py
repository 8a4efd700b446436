"""Red team h30: a hostile coordinator with an allowed key against real daemons (docs/security.md).

Each test is an attack that broke the daemon's guarantees on main, written as the check that it holds.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.testing.datasets import write_dataset
from test_redteam_h19 import two_shards
from test_redteam_h25 import MB, _peak_growth, _rss, _Wide

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("loss", ["l1_loss", "binary_cross_entropy"])
async def test_a_fits_loss_is_charged_what_that_loss_makes(fedzmq_daemons, tmp_path, loss):
    """A fit is charged one tensor of the output's size for its loss (``charges.LOSS_COPIES``), what
    ``mse_loss`` makes; ``l1_loss`` makes three (the difference, its absolute value, and the backward's
    sign of it) and ``binary_cross_entropy`` two. A fit of 512 rows of 256 x 256 outputs charged 641 MiB
    and admitted under a 660 MiB quota grew the daemon by 900 MiB (``l1_loss``) and 773 MiB
    (``binary_cross_entropy``); ``mse_loss`` grew it by 645 MiB."""
    rows = 512
    labels = torch.randint(0, 2, (rows, 256, 256), generator=torch.Generator().manual_seed(0)).float()
    path = write_dataset(tmp_path / "masks.safetensors", torch.rand(rows, 1), labels)
    quota = 660 * MB
    [bob] = await fedzmq_daemons("bob", args=["--data", f"masks={path}", "--max-session-bytes", str(quota)])
    remote = await bob.worker.send(_Wide())
    before = _rss(bob.pid)
    with contextlib.suppress(fz.LimitExceeded):  # refused within the quota: what should happen
        await remote.fit("masks", loss=loss, optimizer={"cls": "SGD", "lr": 0.0}, batch_size=rows, steps=1)
    grown = _peak_growth(bob.pid, before)
    assert grown <= quota + 32 * MB, f"the daemon grew {grown / MB:.0f} MiB under a {quota / MB:.0f} MiB quota"


async def test_a_fit_over_hosted_clients_admitted_keeps_every_clients_state_it_trained(fedzmq_daemons, tmp_path):
    """A fit over hosted clients whose states stream (a client reading small pieces) holds each state's made
    entries as kept reads (``KeptReads.report_made``), one state at a time. Each one's quota check ran beside
    the command's reservation, which counts the states already, and beside the holds of the states reported
    before it: admitted under a 45 MiB quota (it needs 44.7), the round trained both clients, then failed
    ('keeping 6 entries made for the reply'), and the first state's copy stayed charged to the session, under
    a token no reply carried, until its model was deleted."""
    folder = two_shards(tmp_path)
    small = fz.ConnectionSettings(limits=fz.Limits(max_frame_bytes=4096))
    [host] = await fedzmq_daemons("sim", settings=small,
                                  args=["--clients-from", f"d={folder}", "--max-session-bytes", str(45 * MB)])
    worker = host.worker
    model = await worker.send(nn.Sequential(nn.Linear(64, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 10)))
    held = (await worker.status())["bytes"]
    args = {"module": model.id, "dataset": "d", "loss": "cross_entropy", "batch_size": 16, "steps": 1,
            "optimizer": {"cls": "SGD", "lr": 0.01}, "reply_state": True, "combine": False, "clients": ["a", "b"]}
    try:
        reply = await worker.request("fit", args)
    except fz.LimitExceeded as exc:  # refused before it trained: fine, and nothing is left charged
        assert str(exc).startswith("fit ("), f"refused after it trained both clients: {exc}"
        assert (await worker.status())["bytes"] == held
    else:
        assert len(reply["states"]) == 2


@pytest.mark.parametrize("loss", ["binary_cross_entropy_with_logits"])
async def test_an_evaluations_loss_is_charged_what_it_makes(fedzmq_daemons, tmp_path, loss):
    """An evaluation is charged its forward row by row and one tensor of the output's size for its loss; under
    ``binary_cross_entropy_with_logits`` an evaluation of 256 rows of 256 x 256 outputs, charged 192 MiB and
    admitted under a 256 MiB quota, grew the daemon by 644 MiB."""
    rows = 256
    labels = torch.randint(0, 2, (rows, 256, 256), generator=torch.Generator().manual_seed(0)).float()
    path = write_dataset(tmp_path / "masks.safetensors", torch.rand(rows, 1), labels)
    quota = 256 * MB
    [bob] = await fedzmq_daemons("bob", args=["--data", f"masks={path}", "--max-session-bytes", str(quota)])
    remote = await bob.worker.send(_Wide())
    before = _rss(bob.pid)
    with contextlib.suppress(fz.LimitExceeded):  # refused within the quota: what should happen
        await remote.evaluate("masks", loss=loss)
    grown = _peak_growth(bob.pid, before)
    assert grown <= quota + 32 * MB, f"the daemon grew {grown / MB:.0f} MiB under a {quota / MB:.0f} MiB quota"
