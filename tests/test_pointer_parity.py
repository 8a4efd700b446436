"""Parity with the seed's (PySyft's) pointer suite (issue 15, item 16): a pointer knows its shape and dtype
without a round trip, ``move`` sends a value from one worker to another (refused for private data, decided by
the source's daemon), and the gradient of a remote leaf can be read. Each on in-process workers and on daemons."""

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.worker.datasets import Dataset


def open_toy() -> Dataset:
    return Dataset("toy", torch.randn(8, 4), torch.arange(8) % 2, policy="open")


# --- shape and dtype ------------------------------------------------------------------------------------


async def check_meta_without_round_trips(bob: fz.RemoteWorker) -> None:
    a, w = torch.randn(5, 4), torch.randn(4, 3)
    pa, pw = await bob.send(a), await bob.send(w)
    assert (pa.shape, pa.dtype) == (a.shape, a.dtype)
    sent = bob.bytes_sent
    cases = {
        "matmul": (pa @ pw, a @ w),
        "chain": (((pa @ pw).relu() * 2 + 1).sum(dim=1), ((a @ w).relu() * 2 + 1).sum(dim=1)),
        "index": (pa[1:3, ..., None], a[1:3, ..., None]),
        "pointer index": (pa[(pa.argmax(dim=1))], a[a.argmax(dim=1)]),
        "dtype": ((pa > 0).long(), (a > 0).long()),
        "reshape": (pa.reshape(2, 10).t(), a.reshape(2, 10).t()),
        "cat": (bob.run_op("cat", [[pa, pa * 2]], {"dim": 1}), torch.cat([a, a * 2], dim=1)),
        "loss": (bob.run_op("cross_entropy", [pa, torch.tensor([0, 1, 2, 3, 0])], {}),
                 torch.nn.functional.cross_entropy(a, torch.tensor([0, 1, 2, 3, 0]))),
    }
    values, indices = pa.max(dim=1)
    long_chain = pa
    for _ in range(300):  # longer than the chain the client keeps unresolved
        long_chain = long_chain + 1
    known = {name: (pointer.shape, pointer.dtype, pointer.ndim) for name, (pointer, _) in cases.items()}
    known["max"] = (values.shape, values.dtype, indices.dtype)
    known["long chain"] = (long_chain.shape, long_chain.dtype, long_chain.size(1))
    # commands went out, but none to ask for a shape: the same requests as without reading them
    ops_sent = bob.bytes_sent - sent
    assert ops_sent > 0
    for name, (pointer, expected) in cases.items():
        assert known[name] == (expected.shape, expected.dtype, expected.dim()), name
        got = await pointer.get()
        assert (got.shape, got.dtype) == (expected.shape, expected.dtype), name
    assert known["max"] == (torch.Size([5]), torch.float32, torch.int64)
    assert known["long chain"] == (torch.Size([5, 4]), torch.float32, 4)
    assert torch.allclose(await long_chain.get(), a + 300)


async def test_pointers_know_shape_and_dtype_on_an_in_process_worker(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    await check_meta_without_round_trips(bob)


async def test_pointers_know_shape_and_dtype_on_a_daemon(fedzmq_daemons_module):
    [bob] = await fedzmq_daemons_module("bob")
    await check_meta_without_round_trips(bob.worker)


async def test_an_unknown_shape_says_how_to_get_it(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob", datasets={"bob": {"toy": open_toy()}})
    [ds] = await bob.datasets()
    features = await ds.features()
    assert (features.shape, features.dtype) == (torch.Size([8, 4]), torch.float32)  # from the dataset's info
    model = await bob.send(nn.Linear(4, 2))
    out = model(features)  # a forward on the worker: the client does not run the model
    with pytest.raises(fz.ShapeUnknown, match=r"await ptr\.info\(\)") as info:
        _ = out.shape
    assert out.describe() in str(info.value)
    with pytest.raises(fz.ShapeUnknown):
        _ = out.dtype
    details = await out.info()  # one round trip, remembered
    assert details["shape"] == [8, 2] and details["dtype"] == "float32"
    assert (out.shape, out.dtype) == (torch.Size([8, 2]), torch.float32)
    assert (out.sum(dim=0) * 2).shape == torch.Size([2])  # and what is computed from it is known again
    bad = (await bob.send(torch.ones(2, 3))) @ (await bob.send(torch.ones(2, 3)))  # the shapes do not fit
    with pytest.raises(fz.ShapeUnknown):
        _ = bad.shape
    with pytest.raises(RuntimeError):
        await bad


# --- move -----------------------------------------------------------------------------------------------


async def check_move(bob: fz.RemoteWorker, alice: fz.RemoteWorker, elsewhere: fz.RemoteWorker,
                     features: fz.TensorPointer) -> None:
    x = torch.randn(3, 2, requires_grad=True)
    px = await bob.send(x)
    source_id = px.id
    moved = await px.move(alice)
    assert isinstance(moved, fz.TensorPointer) and moved.location is alice
    assert (moved.shape, moved.dtype) == (x.shape, x.dtype)
    assert torch.equal(await moved.get(), x.detach())
    with pytest.raises(fz.ObjectNotFound):  # the source is deleted, as the seed's move does
        await bob.request("get", {"obj": source_id})
    loss = (moved * moved).sum()  # still a leaf that wants a gradient, on its new worker
    await loss.backward()
    assert torch.allclose(await moved.grad.get(), 2 * x.detach())
    assert await moved.move(alice) is moved  # already there
    # the source's daemon decides what may leave: a value computed from a dataset's rows does not
    private = features[0:2] * 1
    await elsewhere.ping()
    sent = elsewhere.bytes_sent  # a session that holds nothing: no deletes of collected pointers go to it
    with pytest.raises(fz.PermissionDenied) as info:
        await private.move(elsewhere)
    assert private.describe() in str(info.value)
    assert elsewhere.bytes_sent == sent  # nothing was sent there
    assert (await (private.sum(dim=1) * 0).info())["shape"] == [2]  # and the source still holds it


async def test_move_between_in_process_workers(fedzmq_virtual_workers):
    bob, alice, carol = await fedzmq_virtual_workers("bob", "alice", "carol", datasets={"bob": {"toy": open_toy()}})
    [ds] = await bob.datasets()
    await check_move(bob, alice, carol, await ds.features())


async def test_move_between_daemons(fedzmq_daemons_module, fedzmq_digits):
    shards = fedzmq_digits("bob")
    bob, alice = await fedzmq_daemons_module("bob", "alice",
                                             args={"bob": ["--open-data", f"digits={shards.paths['bob']}"]})
    [ds] = await bob.worker.datasets()
    async with fz.connect(alice.address) as elsewhere:  # a second session on alice's daemon
        await check_move(bob.worker, alice.worker, elsewhere, await ds.features())


# --- gradients of remote leaves -------------------------------------------------------------------------


async def check_remote_leaf_gradient(bob: fz.RemoteWorker) -> None:
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    pw, pb, px, py = [await bob.send(t) for t in (w, b, x, y)]
    loss = bob.run_op("cross_entropy", [px @ pw + pb, py], {})
    await loss.backward()
    torch.nn.functional.cross_entropy(x @ w + b, y).backward()
    grad_w, grad_b = pw.grad, pb.grad
    assert (grad_w.shape, grad_w.dtype) == (w.shape, w.dtype)  # a gradient has its leaf's shape
    assert torch.allclose(await grad_w.get(), w.grad, atol=1e-6)
    assert torch.allclose(await grad_b.get(), b.grad, atol=1e-6)
    # a snapshot: a second backward accumulates on the worker, as in torch, and a new grad pointer shows it
    loss2 = bob.run_op("cross_entropy", [px @ pw + pb, py], {})
    await loss2.backward()
    assert torch.allclose(await grad_w.get(), w.grad, atol=1e-6)
    assert torch.allclose(await pw.grad.get(), 2 * w.grad, atol=1e-6)
    with pytest.raises(fz.BadRequest, match="no gradient") as info:  # no backward reached it: says which
        await px.grad.get()
    assert px.describe() in str(info.value)


async def test_remote_leaf_gradient_on_an_in_process_worker(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    await check_remote_leaf_gradient(bob)


async def test_remote_leaf_gradient_on_a_daemon(fedzmq_daemons_module):
    [bob] = await fedzmq_daemons_module("bob")
    await check_remote_leaf_gradient(bob.worker)
