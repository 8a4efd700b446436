"""A user's tests of their federated code, using only the fixtures fedzmq's plugin provides.

There is no conftest.py: the fixtures come from the installed package. Every async test carries
``@pytest.mark.asyncio``, which strict mode requires and auto mode accepts.
"""

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.examples.digits import evaluate, make_model
from fedzmq.testing import assert_state_dicts_close, toy_shards

from federated_code import CumsumNet, fedavg, local_training, pointer_training


def seed_shards():
    data = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]])
    target = torch.tensor([[0], [0], [1], [1.0]])
    return [(data[:2], target[:2]), (data[2:], target[2:])]


@pytest.mark.asyncio
async def test_pointer_training_on_virtual_workers_equals_plain_torch(fedzmq_virtual_workers):
    bob, alice = await fedzmq_virtual_workers("bob", "alice")
    torch.manual_seed(0)
    model, reference = nn.Linear(2, 1), nn.Linear(2, 1)
    reference.load_state_dict(model.state_dict())
    losses = await pointer_training(model, seed_shards(), [bob, alice])
    expected = local_training(reference, seed_shards())
    assert losses == pytest.approx(expected, abs=1e-6)
    assert_state_dicts_close(model, reference, atol=1e-6)
    assert losses[-1] < losses[0]


@pytest.mark.asyncio
async def test_counted_virtual_workers_hold_the_toy_data(fedzmq_virtual_workers, tmp_path):
    workers = await fedzmq_virtual_workers(2, datasets=toy_shards(tmp_path, 2))
    assert [w.id for w in workers] == ["worker0", "worker1"]
    for worker in workers:
        [toy] = await worker.datasets()
        assert (toy.name, toy.samples, toy.feature_shape) == ("toy", 2, (2,))
        remote = await worker.send(nn.Linear(2, 1))
        result = await remote.fit("toy", loss="mse_loss", optimizer={"cls": "SGD", "lr": 0.1}, epochs=3)
        assert result["num_examples"] == 2 and result["samples_seen"] == 6


def test_digit_shards_are_non_iid_and_disjoint(fedzmq_digits):
    shards = fedzmq_digits("bob", "alice", alpha=0.3, seed=1)
    assert set(shards) == {"bob", "alice"} and set(shards["bob"]) == {"digits"}
    bob, alice = shards.sizes["bob"], shards.sizes["alice"]
    assert sum(bob) + sum(alice) + len(shards.test[1]) == 1797
    assert any(abs(b - a) > 20 for b, a in zip(bob, alice))  # the classes are spread unevenly


@pytest.mark.asyncio
async def test_fedavg_on_daemons_with_digit_shards_and_a_registered_model(fedzmq_daemons, fedzmq_digits):
    shards = fedzmq_digits("bob", "alice", alpha=0.5, seed=0)
    bob, alice = await fedzmq_daemons("bob", "alice", datasets=shards,
                                      models={"cumsum-net": "federated_code:CumsumNet"})
    assert {d.name for d in await bob.worker.datasets()} == {"digits"}

    model = make_model(hidden=16)
    before = evaluate(model, *shards.test)["loss"]
    history = await fedavg([bob.worker, alice.worker], model, rounds=2)
    assert [m.participants for m in history] == [["alice", "bob"]] * 2
    assert evaluate(model, *shards.test)["loss"] < before

    net, x = CumsumNet(width=4), torch.randn(3, 2)  # built on the daemon from the class it registered
    remote = await alice.worker.send(net)
    assert torch.allclose(await remote(await alice.worker.send(x)).get(), net(x), atol=1e-6)


@pytest.mark.asyncio
async def test_a_stopped_daemon_times_out_and_answers_after_cont(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    kept = await bob.worker.send(torch.arange(4.0))
    bob.stop()
    with pytest.raises(fz.RequestTimeout):
        await bob.worker.ping(timeout=0.3)
    bob.cont()
    await bob.wait_answering(timeout=10)
    assert torch.equal(await kept.get(), torch.arange(4.0))
