"""Red team h19: a hostile coordinator with an allowed key against a real daemon (docs/security.md).

Each test is an attack that broke the daemon's guarantees on main, written as the check that it holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.codec import Ref
from fedzmq.modeldesc import describe

pytestmark = pytest.mark.timeout(180)

MB = 1 << 20


def rss_bytes(pid: int | None) -> int:
    """The daemon's resident memory (``VmRSS``), what the quotas exist to bound."""
    assert pid is not None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def tied_stack(layers: int, width: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])


async def test_one_object_named_by_many_entries_of_a_model_charges_each_parameters_gradient(fedzmq_daemons):
    """``module_put`` with every entry naming one stored tensor: each entry becomes its own ``Parameter``
    (a leaf, with its own gradient) over the one storage, and the quota charged the room for their
    gradients once (``gradient_key`` is the storage, offset and size, the same for all). A backward then
    made 128 gradients of 1 MiB under a 16 MiB quota, charged 1 MiB."""
    layers, width = 128, 512  # 1 MiB of float32 per entry
    [host] = await fedzmq_daemons("bob", args=["--max-session-bytes", str(16 * MB)])
    worker = host.worker
    weight = await worker.send(torch.randn(width, width) * 0.01)
    x = await worker.send(torch.randn(2, width))
    before = rss_bytes(host.pid)
    model, out, total = worker.new_id(), worker.new_id(), worker.new_id()
    try:
        await worker.request("module_put", {"out": model, "spec": describe(tied_stack(layers, width)),
                                            "state": {f"{i}.weight": Ref(weight.id) for i in range(layers)}})
        await worker.request("module_call", {"obj": model, "args": [Ref(x.id)], "kwargs": {}, "out": [out]})
        await worker.request("op", {"op": "sum", "args": [Ref(out)], "kwargs": {}, "out": [total]})
        await worker.request("backward", {"obj": total})
    except (fz.LimitExceeded, fz.BadRequest):
        pass  # refused (within the quota, or the state itself): what should happen
    grown = rss_bytes(host.pid) - before
    charged = (await worker.status())["bytes"]
    assert charged <= 16 * MB
    assert grown < 48 * MB, f"the daemon grew {grown / MB:.0f} MiB under a 16 MiB quota (charged {charged / MB:.1f})"
