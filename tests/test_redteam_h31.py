"""Red team h31: a hostile coordinator with an allowed key against real daemons (docs/security.md).

Each test is an attack that broke the daemon's guarantees on main, written as the check that it holds.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.codec import Ref
from conftest import FEATURES, ROWS  # the owner's rows of the secret_rows fixture

pytestmark = pytest.mark.timeout(120)

#: the owner's real terms (the test kit's daemons start with relaxed ones, for tiny test data)
OWNER_TERMS = ["--min-batch-size", "16", "--min-metric-rows", "16"]
EPS = 1e-5  # BatchNorm's


async def _public_leaf(worker: fz.Worker, rows: int) -> int:
    """A public tensor of the coordinator's own, requiring a gradient: the input the attack differentiates."""
    leaf = worker.new_id()
    await worker.request("store", {"out": leaf, "value": torch.zeros(rows, FEATURES).requires_grad_()})
    return leaf


async def _stale_graph(worker: fz.Worker, module: int, leaf: int) -> int:
    """An output of ``module`` in eval mode over the public leaf: its graph saved the norm layer's running
    variance (a public value, then), and the backward of eval-mode batch norm multiplies by 1/sqrt(var + eps)."""
    await worker.request("module_mode", {"obj": module, "train": False})
    out = worker.new_id()
    await worker.request("module_call", {"obj": module, "args": [Ref(leaf)], "kwargs": {}, "out": [out]})
    await worker.request("module_mode", {"obj": module, "train": True})
    return out


async def _gradient_through(worker: fz.Worker, out: int, leaf: int, ones: torch.Tensor) -> torch.Tensor | None:
    """The leaf's gradient after a backward of the stale output, as far as the daemon lets it out."""
    with contextlib.suppress(fz.PermissionDenied):
        await worker.request("backward", {"obj": out, "grad": ones})
        snapshot = worker.new_id()
        await worker.request("grad", {"obj": leaf, "out": snapshot})
        return await worker.request("get", {"obj": snapshot})
    return None


async def test_a_graph_made_before_a_norm_layer_saw_rows_does_not_carry_its_statistics_out(fedzmq_daemons,
                                                                                           secret_rows):
    """Torch's batch-norm kernel writes ``running_var`` without moving its version counter, so a graph that
    saved it earlier (a forward in eval mode over a public input) still backpropagates after a train-mode
    forward over rows wrote it, and autograd's own check does not fire. The backward's label was its root's
    (public, made before the rows came), so the public leaf's gradient, ``1/sqrt(var + eps)``, left: with
    ``momentum=1`` and a batch of one row and a public value, the row, exactly, under
    ``--private-release none``."""
    x, _, path = secret_rows
    [bob] = await fedzmq_daemons("bob", args=["--open-data", f"rows={path}", *OWNER_TERMS])
    worker = bob.worker
    [ds] = await worker.datasets()
    features = await ds.features()
    norm = await worker.send(nn.BatchNorm1d(FEATURES, momentum=1.0, affine=False))
    leaf = await _public_leaf(worker, 2)
    stale = await _stale_graph(worker, norm.id, leaf)
    far = 5000.0  # above every row: the row is far - sqrt(2 var)
    keep = await worker.send(torch.tensor([[1.0], [0.0]]))
    shift = await worker.send(torch.tensor([[0.0], [far]]))
    pair = features[[3, 3]] * keep + shift  # a batch of row 3 and a public value
    await norm(pair)  # train mode: running_var := the pair's unbiased variance, (far - row)^2 / 2
    gradient = await _gradient_through(worker, stale, leaf, torch.ones(2, FEATURES))
    if gradient is not None:
        variance = gradient[0].double() ** -2 - EPS
        row = far - (2 * variance).sqrt()
        leaked = torch.allclose(row.float(), x[3], atol=0.05)
        assert not leaked, f"row 3 left through a stale graph: {row.tolist()} (row 3: {x[3].tolist()})"


async def test_a_graph_made_before_a_fit_does_not_carry_the_fits_statistics_out_under_secure_aggregation(
        fedzmq_daemons, secret_rows):
    """The same on a daemon that requires secure aggregation: a fit over the protected rows writes the norm
    layer's running variance (labelled masked-only, never read back), and the backward of a graph saved
    before the fit reads it. A full-batch step of 100 rows leaves the variance of every feature of the
    owner's dataset, with no secure round. The linear layer after the norm is frozen (the graph saved its
    weight, which a step would move), and the fit trains a bias of its own."""
    x, _, path = secret_rows
    [bob] = await fedzmq_daemons("bob", args=["--data", f"rows={path}", *OWNER_TERMS, "--require-secure-aggregation"])
    worker = bob.worker

    class Stale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(FEATURES, momentum=1.0, affine=False)
            self.head = nn.Linear(FEATURES, 10, bias=False).requires_grad_(False)
            self.shift = nn.Parameter(torch.zeros(10))

        def forward(self, rows: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(rows)) + self.shift

    model = Stale()
    with torch.no_grad():  # ones @ head.weight: 1 for every feature, so the leaf's gradient is 1/sqrt(var + eps)
        model.head.weight.zero_()
        model.head.weight[0] = 1.0
    remote = await worker.send(model)
    leaf = await _public_leaf(worker, 2)
    stale = await _stale_graph(worker, remote.id, leaf)
    metrics = await worker.request("fit", {"module": remote.id, "dataset": "rows", "loss": "cross_entropy",
                                           "batch_size": ROWS, "steps": 1, "optimizer": {"cls": "SGD", "lr": 0.1}})
    assert metrics["steps"] == 1
    gradient = await _gradient_through(worker, stale, leaf, torch.ones(2, 10))
    if gradient is not None:
        variance = gradient[0].double() ** -2 - EPS
        leaked = torch.allclose(variance.float(), x.var(0), rtol=1e-3)
        assert not leaked, f"the protected rows' variance left unmasked: {variance.tolist()} (rows: {x.var(0).tolist()})"
