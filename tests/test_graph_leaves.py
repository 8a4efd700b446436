"""A stored tensor's autograd graph keeps its leaves alive (``AccumulateGrad`` holds each leaf, and a
backward's gradient lands on it): deleting the model or the leaf must leave their memory charged to the
tensors whose graphs still reach them, until the last of those goes (``fedzmq/worker/graphs.py``).

A red team kept 1,538 MiB alive under a 256 MiB quota, charged 30 KB: each turn put a model with a
64 MiB weight, stored one call's output (``w.sum() + x``) and deleted the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.codec import Ref
from fedzmq.modeldesc import describe
from fedzmq.worker.graphs import GRAPH_LEAF_BYTES, LEAF_SET_BYTES, GraphLedger
from fedzmq.worker.quota import Quota
from fedzmq.worker.session import GRAPH_NODE_BYTES, Session

pytestmark = pytest.mark.timeout(120)

N = 250_000  # 1 MB of float32
MB = 4 * N
#: what a graph's set of one leaf takes beside the leaf's storage and gradient (``fedzmq.worker.graphs``)
LEAF = GRAPH_LEAF_BYTES + LEAF_SET_BYTES


class Summed(nn.Module):
    """The red team's model: a 1-element output whose graph saves nothing but reaches ``w``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(N))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.sum() + x


async def test_a_stored_output_keeps_its_deleted_models_weights_and_their_gradients_room_charged():
    """Deleting the model left its weight alive through the output's graph, uncharged: every turn kept
    1 MB (and 1 MB of room for its gradient) beside a few hundred bytes charged. The output now holds
    them, once, until it goes; so the turns are refused within the quota."""
    async with fz.VirtualWorker("bob", config=fz.WorkerConfig(max_session_bytes=7 * MB)) as bob:
        x = await bob.send(torch.zeros(1))
        empty = (await bob.status())["bytes"]
        model = await bob.send(Summed())
        with_model = (await bob.status())["bytes"]
        out = model(x)
        await out
        with_output = (await bob.status())["bytes"]
        graph = with_output - with_model  # the output's 4 bytes and its graph's nodes: the weight is the model's
        assert 4 < graph < 4 + 64 * GRAPH_NODE_BYTES
        await model.delete()
        # the weight and its gradient's room, now charged to the output; the model's Python objects went
        assert (await bob.status())["bytes"] == empty + 2 * MB + graph
        await out.delete()
        assert (await bob.status())["bytes"] == empty

        outputs = []
        with pytest.raises(fz.LimitExceeded, match="max-session-bytes"):
            for _ in range(24):  # the red team's 24 turns
                model = await bob.send(Summed())
                outputs.append(model(x))
                await outputs[-1]
                await model.delete()
        assert len(outputs) <= 3  # each turn keeps 2 MB of the 7
        assert (await bob.status())["bytes"] <= 7 * MB
        for out in outputs:
            await out.delete()
        assert (await bob.status())["bytes"] == empty


async def test_a_stored_op_output_keeps_its_deleted_leaf_charged():
    """The plain-tensor turn: a leaf that requires a gradient, ``sum`` of it stored, the leaf deleted. The
    sum's graph keeps the leaf (1 MB, and room for its gradient) alive: charged to the sum."""
    async with fz.VirtualWorker("bob", config=fz.WorkerConfig(max_session_bytes=7 * MB)) as bob:
        x = await bob.send(torch.randn(N, requires_grad=True))
        assert (await bob.status())["bytes"] == 2 * MB  # the leaf and room for its gradient
        total = x.sum()
        await total
        # the leaf's storage and room charged once, not per holder
        assert (await bob.status())["bytes"] == 2 * MB + 4 + GRAPH_NODE_BYTES + LEAF
        await x.delete()
        assert (await bob.status())["bytes"] == 2 * MB + 4 + GRAPH_NODE_BYTES + LEAF
        await total.delete()
        assert (await bob.status())["bytes"] == 0

        sums = []
        with pytest.raises(fz.LimitExceeded, match="max-session-bytes"):
            for _ in range(12):  # the red team's 12 turns
                x = await bob.send(torch.randn(N, requires_grad=True))
                sums.append(x.sum())
                await sums[-1]
                await x.delete()
        assert len(sums) <= 3
        for total in sums:
            await total.delete()
        assert (await bob.status())["bytes"] == 0


async def test_a_backwards_gradient_on_a_deleted_leaf_stays_charged_until_the_graph_goes():
    """A backward from a stored output fills the gradient of a leaf deleted before it: the gradient
    (1 MB) lives on the leaf, which the output's graph keeps, as long as the output does. It is charged
    as the room the leaf's object held for it, now held by the output."""
    async with fz.VirtualWorker("bob", config=fz.WorkerConfig(max_session_bytes=7 * MB)) as bob:
        x = await bob.send(torch.randn(N, requires_grad=True))
        doubled = x * 2  # saves nothing: its graph only reaches x
        total = doubled.sum()
        await total
        await doubled.delete()  # its node passes to the sum
        await x.delete()
        kept = 2 * MB + 4 + 2 * GRAPH_NODE_BYTES + LEAF  # x and its gradient's room; the sum, the graph's 2 nodes
        assert (await bob.status())["bytes"] == kept
        await total.backward()  # x.grad, 1 MB, on a leaf no object names
        assert (await bob.status())["bytes"] == kept  # charged as room before it was made
        await total.delete()
        assert (await bob.status())["bytes"] == 0

        totals = []
        with pytest.raises(fz.LimitExceeded, match="max-session-bytes"):
            for _ in range(12):
                x = await bob.send(torch.randn(N, requires_grad=True))
                doubled = x * 2
                total = doubled.sum()
                await total
                await doubled.delete()
                await x.delete()
                await total.backward()
                totals.append(total)
        assert len(totals) <= 3
        await doubled.delete()  # where the turn was refused
        await x.delete()
        assert (await bob.status())["bytes"] == len(totals) * kept
        for total in totals:
            await total.delete()
        assert (await bob.status())["bytes"] == 0


async def test_leaves_shared_by_several_outputs_are_charged_once_until_the_last_goes(fedzmq_daemons):
    """On a daemon: two outputs of one model, and an op computed from one of them, share the weight; it
    is charged once while the model lives, stays charged through each deletion, and goes with the last
    tensor whose graph reaches it."""
    [host] = await fedzmq_daemons("bob", args=["--max-session-bytes", str(16 * MB)])
    worker = host.worker
    x = await worker.send(torch.zeros(1))
    empty = (await worker.status())["bytes"]
    model = worker.new_id()
    await worker.request("module_put", {"out": model, "spec": describe(Summed()), "state": {"w": torch.ones(N)}})
    with_model = (await worker.status())["bytes"]
    first, second, third = worker.new_id(), worker.new_id(), worker.new_id()
    for out in (first, second):
        await worker.request("module_call", {"obj": model, "args": [Ref(x.id)], "kwargs": {}, "out": [out]})
    await worker.request("op", {"op": "mul", "args": [Ref(first), 3], "kwargs": {}, "out": [third]})
    graphs = (await worker.status())["bytes"] - with_model
    assert graphs < 3 * (4 + 64 * GRAPH_NODE_BYTES)  # nodes and outputs: no weight charged twice
    await worker.request("delete", {"objs": [model]})
    weight = 2 * MB  # the weight and its gradient's room
    assert (await worker.status())["bytes"] == empty + weight + graphs
    await worker.request("delete", {"objs": [first, second]})  # ``third`` reaches the weight through ``first``
    assert (await worker.status())["bytes"] >= empty + weight
    await worker.request("delete", {"objs": [third]})
    assert (await worker.status())["bytes"] == empty


def test_a_chain_of_ops_shares_one_leaf_set_and_each_new_leaf_adds_one():
    """What finding an output's leaves costs: the walk stops at its stored inputs' graphs, whose leaves
    are known, so an op costs its own nodes, not its history's. A chain of ops that reach no new leaf
    shares one leaf set; a chain that adds a leaf per op makes one set per op, holding only that leaf
    (not a copy of every earlier one: that would be quadratic)."""
    session = Session(key=b"k")
    w = torch.randn(4, requires_grad=True)
    session.put(1, w)
    h = w * 1
    session.put(2, h, 1, [1])
    session.put(9999, w * 2, 1, [1])  # another op on the leaf alone: the same set
    assert session.graphs.leaf_sets() == 1
    session.delete([9999])
    for i in range(3, 2003):
        h = h + 1
        session.put(i, h, 1, [i - 1])
        session.delete([i - 1])
    assert session.graphs.leaf_sets() == 1
    session.delete([1])  # w lives on, through the chain's graph
    assert session.quota.held == 2 * 16 + 4 * 4 + GRAPH_NODE_BYTES * 2001 + LEAF
    previous = 2002
    for i in range(3000, 5000):
        leaf = torch.randn(4, requires_grad=True)
        session.put(i, leaf)
        h = h + leaf
        session.put(i + 10_000, h, 1, [previous, i])
        session.delete([previous, i])
        previous = i + 10_000
    assert session.graphs.leaf_sets() == 2001
    assert session.quota.held == 2001 * (2 * 16 + LEAF) + 4 * 4 + GRAPH_NODE_BYTES * 4001
    session.delete([previous])
    assert session.quota.held == 0
    assert session.graphs.leaf_sets() == 0


def test_an_op_reaching_only_its_inputs_leaves_shares_its_inputs_set():
    """``h = h + w`` step after step (a recurrent cell, a model called on its own output) reaches no leaf
    its input's graph did not: each step made a set of its own and was charged its bookkeeping (1,681
    bytes a step against 657 for ``h + 1``, 8,001 sets over 8,000 steps: a cold review's find). It
    shares the input's set."""
    session = Session(key=b"k")
    w = torch.randn(4, requires_grad=True)
    session.put(1, w)
    h = torch.zeros(4) + w
    session.put(2, h, 1, [1])
    held = session.quota.held
    previous = 2
    for i in range(3, 1003):
        h = h + w
        session.put(i, h, 1, [previous, 1])
        session.delete([previous])
        previous = i
    assert session.graphs.leaf_sets() == 1
    assert session.quota.held == held + GRAPH_NODE_BYTES * 1000
    session.delete([previous, 1])
    assert session.quota.held == 0


def test_a_graph_ledger_alone_hands_its_nodes_on():
    """The node counts' rule is unchanged: a deleted tensor's nodes pass to one computed from it."""
    ledger = GraphLedger(Quota(1 << 20))
    ledger.add(1, 3, [])
    ledger.add(2, 1, [1])
    assert ledger.remove(1) == 2
    assert ledger.nodes[2] == 4
