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
from fedzmq.testing.datasets import write_dataset

pytestmark = pytest.mark.timeout(180)

MB = 1 << 20


def rss_bytes(pid: int | None) -> int:
    """The daemon's resident memory (``VmRSS``), what the quotas exist to bound."""
    assert pid is not None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def two_shards(tmp_path: Path) -> Path:
    """A folder of two hosted clients' datasets (``a`` and ``b``: 32 rows of 64 features, 10 classes)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        write_dataset(folder / f"{name}.safetensors", torch.randn(32, 64, generator=generator),
                      torch.randint(0, 10, (32,), generator=generator))
    return folder


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


async def test_a_fit_over_hosted_clients_keeps_to_the_pieces_its_client_reads(fedzmq_daemons, tmp_path):
    """A client with smaller messages than its worker's says so in its ping (``chunk_bytes``), and the worker's
    replies keep to it (``Session.reply_chunk``): ``get``, ``module_state`` and a fit's ``reply_state`` do. A fit
    over hosted clients does not: its weighted sums (and its states kept apart) go inline, and the client
    cannot read the reply (a 32 KiB frame to a client reading 4 KiB: ``ProtocolError``), so the round's
    training was lost to it. They come as streams now, as a fit's ``reply_state`` does."""
    folder = two_shards(tmp_path)
    small = fz.ConnectionSettings(limits=fz.Limits(max_frame_bytes=4096))
    [host] = await fedzmq_daemons("sim", settings=small, args=["--clients-from", f"d={folder}"])
    worker = host.worker
    model = await worker.send(nn.Linear(64, 64))  # a 16 KiB weight: its float64 sum is 32 KiB
    args = {"module": model.id, "dataset": "d", "loss": "cross_entropy", "batch_size": 16, "steps": 1,
            "optimizer": {"cls": "SGD", "lr": 0.01}, "reply_state": True, "combine": True, "clients": ["a", "b"]}
    reply = await worker.request("fit", args)
    assert reply["weight"] == 64 and set(reply["weighted_sum"]) == {"weight", "bias"}


@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian"])  # sums combined on the daemon, or each state apart
async def test_a_round_over_hosted_clients_reading_small_pieces_equals_the_round_with_big_ones(fedzmq_daemons,
                                                                                                tmp_path, strategy):
    """The same round over two hosted clients, read by a coordinator taking 4 KiB pieces and by one taking the
    default: the streamed sums (or states) are the same numbers, bit for bit."""
    folder = two_shards(tmp_path)
    [host] = await fedzmq_daemons("sim", args=["--clients-from", f"d={folder}"])
    models = []
    for settings in (None, fz.ConnectionSettings(limits=fz.Limits(max_frame_bytes=4096))):
        workers = await fz.connect_clients(host.address, settings=settings)
        try:
            torch.manual_seed(0)
            model = nn.Linear(64, 64)  # a 16 KiB weight: more than one 4 KiB piece, as float32 and as float64
            federation = fz.Federation(workers, model, fz.FitConfig(dataset="d", batch_size=16, steps=1),
                                       fz.make_strategy(strategy), seed=3)
            metrics = await federation.run_round()
            assert len(metrics.participants) == 2 and not metrics.dropped, metrics
            models.append(model.state_dict())
        finally:
            for worker in workers:
                await worker.close()
    for name, tensor in models[0].items():
        assert torch.equal(tensor, models[1][name]), name
