"""``await (x + 1).get()`` is one command: the op goes out at the end of the event loop's pass, and a
``get`` of its output in the same pass, with nothing sent between them, turns it into an op-and-fetch
(``op``'s ``fetch`` argument). The daemon runs it as the op and then the ``get``, the get bound and
checked for release like any other, and answers both in one reply. These tests hold it to giving what
the two commands give, in the same order, with the same refusals and errors, and to leaving the op's
pointer whole whatever happens to the get."""

import asyncio
import re

import pytest
import torch

import fedzmq as fz
from fedzmq.codec import Reply, split_fetched
from fedzmq.errors import ProtocolError
from fedzmq.examples import digits


#: heartbeats only after minutes of silence: a loaded host's stall between two requests sent none to count
UNHURRIED = fz.ConnectionSettings(heartbeat_interval=600.0, connect_timeout=30.0)


@pytest.fixture
def shard(tmp_path):
    return str(digits.prepare(tmp_path / "data", ["bob"], alpha=1.0, seed=2).shards["bob"])


async def requests_for(worker: fz.RemoteWorker, calls: int, x: fz.TensorPointer) -> int:
    """How many requests the daemon decoded for ``calls`` op+get (and the batched deletes after them)."""
    before = (await worker.status())["requests"]
    kept = []  # held until all ran: their deletes leave as one batch, not one per op a loaded host spaced out
    for i in range(calls):
        kept.append(y := x + i)
        assert torch.equal(await y.get(), torch.arange(4.0) + i)
    del kept, y
    await asyncio.sleep(0.1)  # the collected pointers' batched delete leaves
    return (await worker.status())["requests"] - before - 1  # the status itself


@pytest.mark.timeout(60)
async def test_an_op_and_its_get_are_one_command_with_the_same_value(fedzmq_daemons):
    [alice] = await fedzmq_daemons("alice", settings=UNHURRIED)  # no heartbeat among the requests counted
    worker = alice.worker
    x = await worker.send(torch.arange(4.0))
    assert worker._connection.fuses_fetch  # the daemon says it offers it in its ping
    fused = await requests_for(worker, 20, x)
    worker._connection.fuses_fetch = False  # as with a daemon that does not offer it: op, then get
    plain = await requests_for(worker, 20, x)
    assert fused <= 22 and plain >= 40, (fused, plain)


@pytest.mark.timeout(60)
async def test_a_get_that_does_not_follow_its_op_at_once_keeps_its_place(fedzmq_daemons):
    [alice] = await fedzmq_daemons("alice")
    worker = alice.worker
    x = await worker.send(torch.arange(4.0))
    y = x + 1
    z = y * 10  # sent after y's op and before y's get: y's get goes on its own, after z
    assert torch.equal(await y.get(), torch.arange(4.0) + 1)
    assert torch.equal(await z.get(), (torch.arange(4.0) + 1) * 10)
    later = x + 2
    await asyncio.sleep(0)  # the op left with the end of that pass: the get is a command of its own
    assert worker._connection.fetch_with(later._ready) is None
    assert torch.equal(await later.get(), torch.arange(4.0) + 2)


@pytest.mark.timeout(120)
async def test_a_refused_fetch_is_the_gets_refusal_and_leaves_the_op_made(fedzmq_daemons, shard):
    [bob] = await fedzmq_daemons("bob", args={"bob": ["--open-data", f"digits={shard}"]})
    worker = bob.worker
    [ds] = await worker.datasets()
    features = await ds.features()
    with pytest.raises(fz.PermissionDenied) as fused:
        await (features + 0).get()
    worker._connection.fuses_fetch = False
    plain_pointer = features + 0
    with pytest.raises(fz.PermissionDenied) as plain:
        await plain_pointer.get()
    worker._connection.fuses_fetch = True
    assert re.sub(r"\d+", "N", fused.value.remote_message) == re.sub(r"\d+", "N", plain.value.remote_message)
    made = features + 0
    with pytest.raises(fz.PermissionDenied):
        await made.get()
    await made  # the op itself ran: its pointer is whole and may be used on
    assert made.shape == features.shape
    assert (await made.info())["shape"] == list(features.shape)


@pytest.mark.timeout(60)
async def test_a_failed_op_fails_its_fetch_with_the_ops_error(fedzmq_daemons):
    [alice] = await fedzmq_daemons("alice")
    worker = alice.worker
    x = await worker.send(torch.arange(4.0))
    bad = x + torch.ones(3)
    with pytest.raises(fz.RemoteError) as fetched:
        await bad.get()
    with pytest.raises(fz.RemoteError) as awaited:
        await bad
    assert type(fetched.value) is type(awaited.value)
    assert "Attempting to broadcast a dimension of length 3" in fetched.value.remote_message  # the meta kernel's words
    assert torch.equal(await (x + 1).get(), torch.arange(4.0) + 1)  # the session goes on


@pytest.mark.timeout(60)
async def test_cancelling_a_fused_get_leaves_the_ops_pointer_usable(fedzmq_daemons):
    [alice] = await fedzmq_daemons("alice")
    worker = alice.worker
    x = await worker.send(torch.arange(4.0))
    made: list[fz.TensorPointer] = []

    async def op_and_get() -> torch.Tensor:
        made.append(x + 5)
        return await made[0].get()

    task = asyncio.ensure_future(op_and_get())
    await asyncio.sleep(0)  # the op and its get were joined, and left
    assert task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await made[0]  # the op's own reply still came, and its pointer works
    assert torch.equal(await made[0].get(), torch.arange(4.0) + 5)
    assert torch.equal(await (made[0] * 2).get(), (torch.arange(4.0) + 5) * 2)


@pytest.mark.timeout(60)
async def test_a_hosted_clients_op_and_get_run_in_its_own_session(hosting_daemon):
    async with fz.connect(hosting_daemon) as host:
        client = (await host.clients())[0]
        mine = await host.send(torch.tensor([1.0, 2.0]))
        theirs = await client.send(torch.tensor([5.0]))
        assert mine.id == theirs.id  # the same id, in two sessions
        assert torch.equal(await (theirs + 1).get(), torch.tensor([6.0]))
        assert torch.equal(await (mine + 1).get(), torch.tensor([2.0, 3.0]))
        await client.close()


@pytest.mark.timeout(60)
async def test_a_fetch_of_an_op_with_two_outputs_is_refused_and_the_op_still_runs(fedzmq_daemons):
    """A client that asks for more than ours does (``fetch`` on an op with two outputs) gets a clear
    error for the fetch, and the op's outputs are made as without it."""
    [alice] = await fedzmq_daemons("alice")
    worker = alice.worker
    x = await worker.send(torch.tensor([[1.0, 5.0], [7.0, 2.0]]))
    ids = [worker.new_id(), worker.new_id()]
    reply = await worker._connection.wait(worker.submit(
        "op", {"op": "max", "args": [x, 1], "kwargs": {}, "out": ids, "fetch": True}))
    assert reply["result"] is None and reply["error"]["type"] == "BadRequest"
    assert torch.equal(await worker.request("get", {"obj": ids[0]}), torch.tensor([5.0, 7.0]))


def test_an_op_and_fetch_reply_splits_into_the_ops_and_the_gets():
    op, fetched = split_fetched(Reply(3, True, {"result": None, "value": 7}))
    assert (op.ok, op.result, fetched.ok, fetched.result) == (True, None, True, 7)
    op, fetched = split_fetched(Reply(3, True, {"result": None, "error": {"type": "PermissionDenied",
                                                                          "message": "no"}}))
    assert op.ok and not fetched.ok and fetched.error == {"type": "PermissionDenied", "message": "no",
                                                          "traceback": ""}
    failed = Reply(3, False, error={"type": "BadRequest", "message": "x", "traceback": ""})
    assert split_fetched(failed) == (failed, failed)
    for broken in ({"value": 1}, {"result": 1, "value": 1, "error": {}}, {"result": 1, "error": "no"}, [1]):
        with pytest.raises(ProtocolError):
            split_fetched(Reply(3, True, broken))


@pytest.fixture
def daemon_process(tmp_path):
    """One real daemon the test may restart or start with options (stopped after the test)."""
    from fedzmq.launcher import DaemonProcess, stop_all

    started: list[DaemonProcess] = []

    def start(*extra: str) -> DaemonProcess:
        process = DaemonProcess("solo", "tcp://127.0.0.1:0", extra_args=list(extra), log_dir=tmp_path / "logs")
        process.start(60.0)
        started.append(process)
        return process

    yield start
    stop_all(started)


@pytest.mark.timeout(60)
async def test_a_fused_reply_the_client_cannot_decode_fails_the_get_at_once(daemon_process):
    """A value bigger than the client takes (its own ``max_frame_bytes``) fails its ``get`` with a
    ``ProtocolError``, fused or not: a fused get used to wait for ever (found by a review). (A client
    tells the worker the pieces it reads, and gets bigger values streamed: here it claims more than it
    reads, so that the worker sends a reply it cannot decode.)"""
    from fedzmq.codec import Limits

    solo = daemon_process()
    settings = fz.ConnectionSettings(limits=Limits(max_frame_bytes=4096, chunk_bytes=4096))
    async with fz.connect(solo.address, settings=settings) as worker:
        await worker.request("ping", {"chunk_bytes": 1 << 20})
        x = await worker.send(torch.ones(64))
        with pytest.raises(ProtocolError):
            async with asyncio.timeout(10):
                await (x.reshape(64, 1) * x).get()  # 16 KiB in one frame
        assert not worker._connection._fetches
        assert torch.equal(await (x + 1).get(), torch.ones(64) + 1)


@pytest.mark.timeout(60)
async def test_an_op_whose_header_would_pass_the_workers_limit_with_fetch_goes_unfused(daemon_process):
    """``fetch`` adds 7 bytes to the op's header: an op just under the worker's ``max_header_bytes``
    goes as it is, with its own get after it, instead of a header the worker refuses unread (and so
    cannot answer: the op and the get used to wait, found by a review)."""
    from fedzmq.codec import encode_request, with_argument

    solo = daemon_process("--max-header-bytes", "4096")
    async with fz.connect(solo.address) as worker:
        x = await worker.send(torch.ones(4))
        index = next(n for n in range(4000) if 4090 <= len(encode_request(
            99, "op", {"op": "add", "args": [fz.codec.Ref(x.id), [0.5] * n], "kwargs": {}, "out": [100]})[0]))
        y = x.add([0.5] * index)
        assert len(with_argument(worker._connection._fusable.message[0], "fetch", True)) > 4096
        with pytest.raises(fz.RemoteError):  # a list is no tensor: the op fails, and its get says so
            async with asyncio.timeout(10):
                await y.get()


@pytest.mark.timeout(90)
async def test_a_restarted_daemon_is_asked_again_before_an_op_and_get_are_fused(daemon_process):
    """A daemon restarted at the same address may be another version: after the session reset the
    client fuses no op and get until a ping names the feature again (found by a review: an older
    daemon refused every op with ``fetch``)."""
    solo = daemon_process()
    settings = fz.ConnectionSettings(heartbeat_interval=0.1)
    async with fz.connect(solo.address, settings=settings) as worker:
        assert worker._connection.fuses_fetch
        solo.restart(60.0)
        for _ in range(100):
            if worker._connection.session_resets:
                break
            await asyncio.sleep(0.1)
        assert worker._connection.session_resets and not worker._connection.fuses_fetch
        x = await worker.send(torch.ones(2))
        assert torch.equal(await (x + 1).get(), torch.full((2,), 2.0))  # op, then get
        assert await worker.refresh() and worker._connection.fuses_fetch
        assert torch.equal(await (x + 2).get(), torch.full((2,), 3.0))
