"""``PlainSGD`` (the optimizer of a fit that names plain SGD) gives torch.optim.SGD's results bit for bit.

A daemon hosting many clients makes one optimizer per client per round; ``PlainSGD`` does without
torch.optim's per-construction overhead, and these tests hold it to the same weights, exactly, over
several steps and every hyper-parameter a fit may name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedzmq.optimizers import PlainSGD, plain_sgd_applies
from fedzmq.worker import training
from fedzmq.worker.datasets import Dataset

HYPERS = [
    {"lr": 0.1},
    {"lr": 0.05, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.3},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    {"lr": 0.02, "weight_decay": 0.01},
    {"lr": 0.02, "momentum": 0.5, "weight_decay": 0.01, "maximize": True},
    {"lr": 1},
]


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    net[2].bias.requires_grad_(False)  # a frozen parameter: it has no gradient and must not move
    return net


@pytest.mark.parametrize("hyper", HYPERS)
def test_plain_sgd_steps_equal_torch_bit_for_bit(hyper: dict) -> None:
    ours, theirs = model(), model()
    plain = PlainSGD(list(ours.parameters()), **hyper)
    reference = torch.optim.SGD(theirs.parameters(), **hyper)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        for net, opt in ((ours, plain), (theirs, reference)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0].weight, model()[0].weight)  # it did train
    assert torch.equal(ours[2].bias, model()[2].bias)


@pytest.mark.parametrize("hyper", [{"lr": -1.0}, {"lr": 0.1, "momentum": -0.1}, {"lr": 0.1, "weight_decay": -1},
                                   {"lr": 0.1, "nesterov": True}])
def test_plain_sgd_refuses_what_torch_refuses(hyper: dict) -> None:
    with pytest.raises(ValueError) as ours:
        PlainSGD(list(model().parameters()), **hyper)
    with pytest.raises(ValueError) as theirs:
        torch.optim.SGD(model().parameters(), **hyper)
    assert str(ours.value) == str(theirs.value)


def test_only_plain_numbers_take_the_fast_path() -> None:
    assert plain_sgd_applies("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True})
    assert not plain_sgd_applies("SGD", {"lr": (0.1,)})
    assert not plain_sgd_applies("Adam", {"lr": 0.1})


@pytest.mark.parametrize("hyper", HYPERS[:4])
def test_a_fit_with_plain_sgd_equals_a_fit_with_torch_sgd(hyper: dict) -> None:
    """The whole fit (shuffle, batches, FedProx term): a description gives PlainSGD, an optimizer
    object is used as given; the trained weights are identical, on a reused Trainee too."""
    g = torch.Generator().manual_seed(2)
    data = Dataset("d", torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g))
    terms = training.Terms(min_batch=4, shuffle_key=b"k")
    ours, theirs = model(), model()
    trainee = training.Trainee(ours)
    assert isinstance(training.make_optimizer({"cls": "SGD", **hyper}, trainee), PlainSGD)
    common = dict(loss="cross_entropy", batch_size=8, epochs=2, steps=None, prox_mu=0.01, seed=3, salt="c")
    for _ in range(2):  # twice on the same Trainee, as a daemon fits its clients in turn
        a = training.fit(trainee, data, terms, optimizer={"cls": "SGD", **hyper}, **common)
        b = training.fit(theirs, data, terms, optimizer=torch.optim.SGD(theirs.parameters(), **hyper), **common)
        assert a["loss"] == b["loss"] and a["steps"] == b["steps"] == 12
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)
