"""Parameters frozen with ``requires_grad_(False)`` stay as they are on the worker, as they do in torch.

Fine-tuning a model's head over a frozen backbone is common federated work. A worker used to build every
layer's parameters trainable, whatever the client's module said: a frozen layer changed in a ``fit`` and
in every round (by 0.03 after three steps). The description now names the frozen parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.codec import Ref
from fedzmq.modeldesc import describe
from fedzmq.worker.datasets import Dataset

pytestmark = pytest.mark.timeout(120)


def rows(seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=generator)
    return Dataset("d", x, (x[:, 0] > 0).long())


def head_over_frozen_backbone() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    for parameter in model[0].parameters():
        parameter.requires_grad_(False)
    return model


async def check_fit_keeps_frozen(worker: fz.RemoteWorker, dataset: str) -> None:
    model = head_over_frozen_backbone()
    backbone, head = model[0].weight.clone(), model[2].weight.clone()
    remote = await worker.send(model)
    await remote.fit(dataset, steps=3, batch_size=16, optimizer={"cls": "SGD", "lr": 0.5, "weight_decay": 0.1})
    await remote.get()
    assert torch.equal(model[0].weight, backbone), "a frozen parameter changed"
    assert not torch.equal(model[2].weight, head), "the trainable head did not train"
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad


async def test_a_fit_on_a_virtual_worker_leaves_frozen_parameters_as_they_were():
    async with fz.VirtualWorker("w", datasets={"d": rows(0)}) as worker:
        await check_fit_keeps_frozen(worker, "d")


async def test_a_fit_on_a_daemon_leaves_frozen_parameters_as_they_were(fedzmq_daemons, tmp_path):
    from fedzmq.testing.datasets import write_dataset

    data = rows(1)
    write_dataset(tmp_path / "d.safetensors", data.features, data.labels)
    [host] = await fedzmq_daemons("owner", args=["--open-data", f"d={tmp_path / 'd.safetensors'}",
                                                 "--min-batch-size", "1"])
    await check_fit_keeps_frozen(host.worker, "d")


async def test_a_round_leaves_frozen_parameters_as_they_were():
    workers = [fz.VirtualWorker(f"w{i}", datasets={"d": rows(i)}) for i in range(2)]
    model = head_over_frozen_backbone()
    backbone, head = model[0].weight.clone(), model[2].weight.clone()
    try:
        async with fz.Federation(workers, model, fz.FitConfig(dataset="d", steps=3, batch_size=16),
                                 fz.FedAvg()) as federation:
            await federation.run(2)
        assert torch.equal(model[0].weight, backbone)
        assert not torch.equal(model[2].weight, head)
    finally:
        for worker in workers:
            await worker.close()


async def test_a_description_freezing_what_the_model_does_not_have_is_refused():
    async with fz.VirtualWorker("w") as worker:
        weight = await worker.send(torch.zeros(2, 3))
        bias = await worker.send(torch.zeros(2))
        spec = describe(nn.Linear(3, 2))
        for frozen in (["no_such"], "weight", [7], ["weight"] * 3):
            with pytest.raises(fz.BadRequest, match="frozen (must|names)"):
                await worker.request("module_put", {"spec": {**spec, "frozen": frozen}, "out": 99,
                                                    "state": {"weight": Ref(weight.id), "bias": Ref(bias.id)}})
