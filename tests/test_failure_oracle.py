"""Whether a command fails must not tell a value the owner's terms keep.

Torch checks some values as it runs: an index must be in range, an integer divisor not zero, a target
class in range, a probability in [0, 1]. A red-team session read the labels and pixels of open rows
exactly, under the default ``--private-release none``, by bisection on whether ``table[row_value - lo]``
failed: the get of every one of those values was refused, but the op's success was one bit. These
tests hold the daemon to refusing such calls on values it does not release, before anything runs, so
the answer is the same whatever the values are."""

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.codec import Ref
from fedzmq.examples import digits


@pytest.fixture
def shard(tmp_path):
    return str(digits.prepare(tmp_path / "data", ["bob"], alpha=1.0, seed=2).shards["bob"])


async def outcome(pointer: fz.TensorPointer) -> str:
    """What a client learns from an op: that it ran, or the type and text of its error."""
    try:
        await pointer
    except fz.RemoteError as exc:
        return f"{type(exc).__name__}: {exc.remote_message if hasattr(exc, 'remote_message') else exc}"
    return "ran"


@pytest.mark.timeout(120)
async def test_whether_an_op_fails_tells_nothing_of_rows_the_terms_keep(fedzmq_daemons, shard):
    [bob] = await fedzmq_daemons("bob", args={"bob": ["--open-data", f"digits={shard}"]})
    worker = bob.worker
    [ds] = await worker.datasets()
    features, labels = await ds.features(), await ds.labels()
    label = labels[0:1]  # one row's class, 0-9
    table = await worker.send(torch.zeros(5))
    # the red team's oracle: table[label - lo] fails exactly when the label is outside [lo - 5, lo + 5)
    answers = {await outcome(worker.run_op("getitem", [table, label - lo], {})) for lo in (-100, 0, 4, 100)}
    assert len(answers) == 1 and "PermissionDenied" in answers.pop()
    logits = await worker.send(torch.zeros(1, 3))  # three classes: a label above 2 is out of range
    attacks = {
        "a target class": worker.run_op("cross_entropy", [logits, label], {}),
        "an nll target": worker.run_op("nll_loss", [logits, label], {}),
        "an integer divisor": worker.run_op("floordiv", [await worker.send(torch.ones(1, dtype=torch.long)), label],
                                            {}),
        "a probability": worker.run_op("binary_cross_entropy", [features[0:1, 0:4], torch.zeros(1, 4)], {}),
    }
    for name, pointer in attacks.items():
        assert "PermissionDenied" in await outcome(pointer), name
    # what cannot fail on the rows' values still runs: a public index into the rows, arithmetic on them
    assert await outcome(features[torch.tensor([0, 1])]) == "ran"
    assert await outcome(label // 2) == "ran"  # a public divisor
    with pytest.raises(fz.PermissionDenied):
        await (label // 2).get()  # and its value stays


@pytest.mark.timeout(120)
async def test_aggregates_release_keeps_the_seed_loss(fedzmq_daemons, shard):
    """Under ``--private-release aggregates`` any aggregate of the rows is released already, so the
    seed tutorial's loss on the rows' labels runs as before."""
    [bob] = await fedzmq_daemons("bob", args={"bob": ["--open-data", f"digits={shard}",
                                                      "--private-release", "aggregates"]})
    [ds] = await bob.worker.datasets()
    features, labels = await ds.features(), await ds.labels()
    remote = await bob.worker.send(digits.make_model())
    loss = bob.worker.run_op("cross_entropy", [remote(features), labels], {})
    assert 0 < (await loss.get()).item() < 10


@pytest.mark.timeout(120)
async def test_a_model_that_indexes_with_its_input_is_refused_rows_it_cannot_release(fedzmq_daemons, shard):
    [bob] = await fedzmq_daemons("bob", args={"bob": ["--open-data", f"digits={shard}"]})
    worker = bob.worker
    [ds] = await worker.datasets()
    label = (await ds.labels())[0:1]
    embedding = await worker.send(nn.Sequential(nn.Embedding(3, 2)))
    assert "PermissionDenied" in await outcome(embedding(label))
    assert await outcome(embedding(await worker.send(torch.tensor([1])))) == "ran"  # public indices


@pytest.mark.timeout(120)
async def test_a_daemon_computes_without_subnormal_floats(fedzmq_daemons):
    """How long an op takes must not tell a value either. A red-team session timed ``sqrt`` of a public
    tensor scaled by ``(row_value > t) * 1e-40``: subnormal floats are six times slower on this CPU (8
    against 50 ms), which read rows' labels and pixels exactly by bisection, with no op failing. A
    daemon flushes subnormals to zero (``torch.set_flush_denormal``, on all its threads), so such a
    product is 0 whatever the bit, and takes the time of any 0. (No timing is asserted here: the test
    checks the flush itself.)"""
    [bob] = await fedzmq_daemons("bob")
    tiny = (await bob.worker.send(torch.ones(4))) * 1e-40
    assert torch.equal(await tiny.get(), torch.zeros(4))
    big = (await bob.worker.send(torch.ones(1 << 16))) * 1e-40  # computed on the daemon's torch threads
    assert torch.equal(await big.get(), torch.zeros(1 << 16))
