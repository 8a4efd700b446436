"""Fresh routes of a hostile coordinator (issue 16), found by running scripts/redteam.py's campaign
and by attacking the daemon as a coordinator with an allowed key would. Each test is the attack as an
attacker writes it, against a real daemon subprocess, and asserts what the data owner needs.

The shared helpers and the owner's rows come from tests/test_adversarial.py.
"""

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.codec import Ref
from fedzmq.testing import write_dataset
from test_adversarial import FEATURES, ROWS, call_module, open_args, protected_args


@pytest.fixture
def secret_rows(tmp_path):
    """The owner's rows, as in tests/test_adversarial.py: values with many digits, labels 0-9."""
    generator = torch.Generator().manual_seed(7)
    x = torch.rand(ROWS, FEATURES, generator=generator) * 1000 + 123.456
    y = torch.randint(0, 10, (ROWS,), generator=generator)
    return x, y, write_dataset(tmp_path / "owner.safetensors", x, y)


# --- class 1: a round's weights loaded with a fit or an evaluate are a write like any other ---------------

async def test_weights_loaded_by_a_fit_or_evaluate_keep_the_label_of_what_they_were_copied_from(
        fedzmq_daemons, secret_rows):
    x, _, path = secret_rows
    [bob] = await fedzmq_daemons("bob", args=open_args(path))
    worker = bob.worker
    [ds] = await worker.datasets()
    features = await ds.features()
    # a model whose weight is shaped like the rows: "load" the rows into it, train nothing, read it back
    for command, extra in (("evaluate", {}), ("fit", {"optimizer": {"cls": "SGD", "lr": 0.0}, "steps": 0,
                                                      "batch_size": 16})):
        remote = await worker.send(nn.Linear(FEATURES, ROWS, bias=False))
        await worker._request(command, {"module": remote.id, "dataset": "rows", "loss": "mse_loss",
                                        "load": {"weight": Ref(features.id)}, **extra})
        with pytest.raises(fz.PermissionDenied):
            await worker._request("module_state", {"obj": remote.id})
        with pytest.raises(fz.PermissionDenied):
            await worker._request("module_read", {"obj": remote.id, "name": "weight", "offset": 0, "length": 64})


async def test_trained_weights_under_secure_aggregation_cannot_be_laundered_through_a_load(
        fedzmq_daemons, secret_rows):
    x, _, path = secret_rows
    [bob] = await fedzmq_daemons("bob", args=protected_args(path, "--require-secure-aggregation"))
    worker = bob.worker
    trained = await worker.send(nn.Linear(FEATURES, 10))
    await trained.fit("rows", batch_size=16, steps=2)
    # the trained weight, read out by a forward on the identity (its label: masked only)
    weight_t = await call_module(worker, trained.id, Ref((await worker.send(torch.eye(FEATURES))).id))
    weight = worker._new_id()
    await worker._request("op", {"op": "t", "args": [Ref(weight_t)], "kwargs": {}, "out": [weight]})
    fresh = await worker.send(nn.Linear(FEATURES, 10))
    await worker._request("fit", {"module": fresh.id, "dataset": "rows", "loss": "mse_loss", "batch_size": 16,
                                  "steps": 0, "optimizer": {"cls": "SGD", "lr": 0.0},
                                  "load": {"weight": Ref(weight)}})
    with pytest.raises(fz.PermissionDenied):  # not a masked update: refused
        await worker._request("module_state", {"obj": fresh.id})
