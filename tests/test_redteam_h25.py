"""Red team h25: a hostile coordinator with an allowed key against real daemons (docs/security.md).

Each test is an attack that broke the daemon's guarantees on main, written as the check that it holds.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.codec import Ref
from fedzmq.testing.datasets import write_dataset
from conftest import FEATURES  # the owner's rows of the secret_rows fixture

pytestmark = pytest.mark.timeout(120)

#: the owner's real terms (the test kit's daemons start with relaxed ones, for tiny test data)
OWNER_TERMS = ["--min-batch-size", "16", "--min-metric-rows", "16"]

MB = 1 << 20


async def test_batchnorm_running_stats_a_forward_wrote_from_open_rows_keep_their_label(fedzmq_daemons, secret_rows):
    """A BatchNorm's running mean and variance are written by torch's kernel without moving their version
    counters, so the executor's write watch never saw them: only ``num_batches_tracked`` (a Python ``add_``)
    was labelled with the rows. A load of that one entry, whole, gave it back the public label, and the
    model then left with the running mean of the rows it saw: a batch of one row twice is that row, exactly,
    under ``--private-release none``."""
    x, _, path = secret_rows
    [bob] = await fedzmq_daemons("bob", args=["--open-data", f"rows={path}", *OWNER_TERMS])
    [ds] = await bob.worker.datasets()
    features = await ds.features()
    norm = nn.BatchNorm1d(FEATURES, momentum=1.0, affine=False)
    remote = await bob.worker.send(norm)
    await remote(features[[3, 3]])  # row 3, twice: the batch mean is the row
    with pytest.raises(fz.PermissionDenied):
        await remote.get()  # refused on main too: num_batches_tracked carries the rows' label
    await remote.load({"num_batches_tracked": torch.tensor(0)})  # overwritten whole: that entry is public again
    with pytest.raises(fz.PermissionDenied):
        await remote.get()
    assert not torch.equal(norm.running_mean, x[3]), "row 3 left in the running mean"


async def test_batchnorm_running_stats_of_a_fit_under_secure_aggregation_leave_only_masked(fedzmq_daemons,
                                                                                          secret_rows):
    """On a daemon that requires secure aggregation, a fit writes a BatchNorm's running statistics from the
    protected rows; they were never labelled (their writes do not move a version counter). Loading the
    trained weights and ``num_batches_tracked`` back whole, and dropping the gradients, left a model whose
    state the daemon gave out: the mean and variance of a batch of the owner's rows, unmasked."""
    x, _, path = secret_rows
    [bob] = await fedzmq_daemons("bob", args=["--data", f"rows={path}", *OWNER_TERMS, "--require-secure-aggregation"])
    worker = bob.worker
    model = nn.Sequential(nn.BatchNorm1d(FEATURES, momentum=1.0, affine=False), nn.Linear(FEATURES, 1), nn.Flatten(0))
    start = {name: value.clone() for name, value in model.state_dict().items()}
    remote = await worker.send(model)
    await remote.fit("rows", loss="mse_loss", optimizer={"cls": "SGD", "lr": 0.1}, batch_size=16, steps=1)
    await remote.load({name: start[name] for name in ("1.weight", "1.bias", "0.num_batches_tracked")})
    optimizer = worker.new_id()
    await worker.request("optim_create", {"out": optimizer, "cls": "SGD", "module": remote.id,
                                          "groups": [{"params": [0, 1], "lr": 0.1}]})
    await worker.request("optim_zero_grad", {"obj": optimizer, "set_to_none": True})
    with pytest.raises(fz.PermissionDenied):
        state = await worker.request("module_state", {"obj": remote.id})
        mean = state["0.running_mean"]
        assert torch.equal(mean, start["0.running_mean"]), f"a batch mean of the rows left: {mean} (rows ~{x.mean(0)})"


async def test_a_buffer_a_forward_returns_is_not_a_window_on_the_model(fedzmq_daemons, secret_rows):
    """A forward that returns a buffer (``get_attr`` as an output) stored the module's own tensor (only
    parameters were copied, ``unshared``): a pointer that a later fit writes through. Under secure
    aggregation the fit's BatchNorm statistics of the protected rows then read back through the pointer
    (here even when the fit failed after its forward)."""
    _, _, path = secret_rows
    [bob] = await fedzmq_daemons("bob", args=["--data", f"rows={path}", *OWNER_TERMS, "--require-secure-aggregation"])
    worker = bob.worker

    class Window(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(FEATURES, momentum=1.0)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.bn(x), self.bn.running_mean

    remote = await worker.send(Window())
    public = await worker.send(torch.zeros(16, FEATURES))
    out, window = worker.new_id(), worker.new_id()
    await worker.request("module_call", {"obj": remote.id, "args": [Ref(public.id)], "kwargs": {},
                                         "out": [out, window]})
    with pytest.raises(fz.RemoteError):  # two outputs: the fit fails after its forward wrote the statistics
        await worker.request("fit", {"module": remote.id, "dataset": "rows", "loss": "mse_loss", "batch_size": 16,
                                     "steps": 1, "optimizer": {"cls": "SGD", "lr": 0.1}})
    with contextlib.suppress(fz.PermissionDenied):  # refused, or the buffer as it was when the forward returned it
        seen = await worker.request("get", {"obj": window})
        assert torch.equal(seen, torch.zeros(FEATURES)), f"a batch mean of the rows left: {seen}"


def _peak_growth(pid: int | None, before: int) -> int:
    """How far the daemon's peak resident memory (``VmHWM``) rose above ``before`` (its ``VmRSS`` then)."""
    assert pid is not None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 - before
    raise AssertionError("no VmHWM")


def _rss(pid: int | None) -> int:
    assert pid is not None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class _Wide(nn.Module):
    """One weight broadcast over each row: an output of 256 x 256 per row, as a segmentation model's."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(256, 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, 1) * self.w


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
async def test_a_fits_loss_and_its_float_copy_of_the_labels_are_charged(fedzmq_daemons, tmp_path, dtype):
    """A fit is charged its forward and backward (twice the forward's tensors) and its batch, but not its
    loss: ``mse_loss`` makes the difference of output and target and its backward another tensor of the
    output's size, and labels of another dtype than float32 reach an elementwise loss as a float32 copy
    (``training._labels_for``). A fit of 512 rows of 256 x 256 outputs admitted under a 400 MiB quota
    grew the daemon by 645 MiB (float32 labels), and under 330 MiB by 549 MiB (uint8 masks)."""
    rows = 512
    labels = torch.randint(0, 2, (rows, 256, 256), generator=torch.Generator().manual_seed(0)).to(dtype)
    path = write_dataset(tmp_path / "masks.safetensors", torch.randn(rows, 1), labels)
    quota = (400 if dtype == torch.float32 else 330) * MB
    [bob] = await fedzmq_daemons("bob", args=["--data", f"masks={path}", "--max-session-bytes", str(quota)])
    remote = await bob.worker.send(_Wide())
    before = _rss(bob.pid)
    with contextlib.suppress(fz.LimitExceeded):  # refused within the quota: what should happen
        await remote.fit("masks", loss="mse_loss", optimizer={"cls": "SGD", "lr": 0.0}, batch_size=rows, steps=1)
    grown = _peak_growth(bob.pid, before)
    assert grown <= quota + 32 * MB, f"the daemon grew {grown / MB:.0f} MiB under a {quota / MB:.0f} MiB quota"


async def test_a_fedprox_fits_anchor_is_charged(fedzmq_daemons, tmp_path):
    """FedProx (``prox_mu``) keeps a copy of every trained parameter for the fit (its anchor) and, for the
    backward, each parameter's difference from it: two copies of the model no charge counted. A 64 MiB
    model under Adam (amsgrad) admitted under a 540 MiB quota held 588 MiB with ``prox_mu``."""
    rows = 64
    path = write_dataset(tmp_path / "d.safetensors", torch.randn(rows, 4096), torch.randn(rows, 4096))
    quota = 540 * MB
    [bob] = await fedzmq_daemons("bob", args=["--data", f"d={path}", "--max-session-bytes", str(quota)])
    model = nn.Linear(4096, 4096, bias=False)  # 64 MiB
    remote = await bob.worker.send(model)
    before = _rss(bob.pid)
    with contextlib.suppress(fz.LimitExceeded):  # refused within the quota: what should happen
        await remote.fit("d", loss="mse_loss", batch_size=16, steps=1, prox_mu=0.1,
                         optimizer={"cls": "Adam", "lr": 0.0, "amsgrad": True, "weight_decay": 0.1, "maximize": True})
    held = _peak_growth(bob.pid, before) + model.weight.numel() * 4
    assert held <= quota + 16 * MB, f"the session held {held / MB:.0f} MiB under a {quota / MB:.0f} MiB quota"


async def test_a_buffer_a_forward_returned_keeps_its_value_under_its_pointer():
    """The stored output of a forward that returns a buffer is the module's own tensor: a later train-mode
    forward rewrote it under its pointer (parameters were already copied, ``unshared``; buffers were not)."""
    async with fz.VirtualWorker("w", config=fz.WorkerConfig(min_batch_size=1, min_metric_rows=1)) as worker:
        class Window(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bn = nn.BatchNorm1d(3, momentum=1.0)

            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return self.bn(x), self.bn.running_mean

        remote = await worker.send(Window())
        ones, fives = await worker.send(torch.ones(4, 3)), await worker.send(torch.full((4, 3), 5.0))
        window = worker.new_id()
        for x, out in ((ones, [worker.new_id(), window]), (fives, [worker.new_id(), worker.new_id()])):
            await worker.request("module_call", {"obj": remote.id, "args": [Ref(x.id)], "kwargs": {}, "out": out})
        assert torch.equal(await worker.request("get", {"obj": window}), torch.ones(3))
