"""Several requests (and replies) in one ZeroMQ message: the codec's batch, the client's and the
daemon's outboxes, and what a hostile peer can do with a batch.

A batch is a transport matter only: every request in it is decoded, checked, throttled and answered
exactly as if it had come alone, in the order sent.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio

import fedzmq as fz
from fedzmq.codec import (
    BATCH_BYTES, BATCH_MESSAGE_BYTES, Limits, ProtocolError, batch_fits, batchable, decode_reply, decode_request,
    encode_batch,
    encode_request, is_batch, split_batch,
)
from fedzmq.worker.server import INTAKE_TURN

from hostile_messages import BAD_MESSAGES

pytestmark = pytest.mark.timeout(120)
LIMITS = Limits()


# --- the codec ----------------------------------------------------------------------------------------

def test_a_batch_splits_into_exactly_the_messages_it_was_made_of():
    messages = [encode_request(1, "ping", {}), encode_request(2, "store", {"out": 5, "value": torch.arange(4.0)}),
                encode_request(3, "get", {"obj": 5})]
    frames = encode_batch(messages)
    assert is_batch(frames) and not is_batch(messages[0])
    parts = split_batch(frames, LIMITS)
    assert [[bytes(f) for f in p] for p in parts] == [[bytes(f) for f in m] for m in messages]
    request = decode_request(parts[1], LIMITS)
    assert request.cmd == "store" and torch.equal(request.args["value"], torch.arange(4.0))


def test_only_small_messages_join_a_batch_and_a_batch_stays_within_one_messages_limits():
    small = encode_request(1, "store", {"out": 1, "value": torch.zeros(16)})
    big = encode_request(2, "store", {"out": 1, "value": torch.zeros(BATCH_MESSAGE_BYTES // 4)})
    assert batchable(small, LIMITS) and not batchable(big, LIMITS)
    assert not batchable(small, Limits(max_batch=1))
    assert batch_fits((63, 2, 100, 0), small, LIMITS) and not batch_fits((64, 2, 100, 0), small, LIMITS)
    assert not batch_fits((1, 2, LIMITS.max_items - 10, 0), small, LIMITS)  # headers: max_items bytes in all
    assert not batch_fits((1, 2, 100, BATCH_BYTES - 32), small, LIMITS)  # buffers: BATCH_BYTES in all


@pytest.mark.parametrize("name", sorted(n for n in BAD_MESSAGES if n.startswith("batch")))
def test_a_broken_batch_is_refused_whole_or_its_part_fails_alone(name):
    frames = BAD_MESSAGES[name]
    with pytest.raises(ProtocolError):
        for part in split_batch(frames, LIMITS):
            decode_request(part, LIMITS)


# --- the client and a worker ---------------------------------------------------------------------------

async def test_the_first_request_of_a_pass_leaves_at_once_and_the_rest_together():
    async with fz.VirtualWorker("w") as server:
        worker = await fz.connect(server.address)
        try:
            x = await worker.send(torch.arange(16.0))
            before = (await worker.status())["batches"]
            sent = worker._connection.batches_sent
            y = x + 1  # the pass's first request: sent now, so the worker can start on it
            assert worker._connection.batches_sent == sent
            assert torch.equal(await (y * 2).get(), (torch.arange(16.0) + 1) * 2)  # these two: one message
            assert (await worker.status())["batches"] == before + 1
            assert worker._connection.batches_sent == sent + 1
        finally:
            await worker.close()


async def test_pipelined_ops_in_batches_give_what_they_give_one_by_one(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    worker = bob.worker
    x = await worker.send(torch.arange(8.0))
    before = (await worker.status())
    results = [x * float(i) + 1 for i in range(500)]  # issued without waiting: batches of at most 64
    values = await asyncio.gather(*(r.get() for r in results))
    for i, value in enumerate(values):
        assert torch.equal(value, torch.arange(8.0) * float(i) + 1)
    after = await worker.status()
    assert after["batches"] - before["batches"] >= 1000 // 64  # ops, then gets
    assert after["requests"] - before["requests"] >= 1000  # every command counted, each ran


async def test_a_tensor_changed_right_after_an_op_is_sent_as_it_was(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    x = await bob.worker.send(torch.zeros(4))
    local = torch.ones(4)
    y = x + local  # queued in the outbox, not sent yet
    local.add_(100)  # the caller's tensor is theirs again at once
    assert torch.equal(await y.get(), torch.ones(4))


async def test_big_and_small_requests_mixed_keep_their_order(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    worker = bob.worker
    big = torch.arange(100_000, dtype=torch.float32)  # past BATCH_MESSAGE_BYTES: it goes alone
    x = await worker.send(torch.zeros(4))
    y = x + 1
    z = x + big[:4]
    total = x.sum() + big.sum()  # an op with the big tensor as an argument, between batched ones
    w = y * 3
    assert torch.equal(await w.get(), torch.full((4,), 3.0))
    assert torch.equal(await z.get(), big[:4])
    assert float(await total.get()) == float(big.sum())


# --- a hostile peer ------------------------------------------------------------------------------------

def _replies(frames):
    messages = split_batch(frames, LIMITS) if is_batch(frames) else [frames]
    return [decode_reply(m, LIMITS) for m in messages]


async def _collect(sock, count, timeout=20.0):
    replies = []
    while len(replies) < count:
        replies += _replies(await asyncio.wait_for(sock.recv_multipart(copy=False), timeout))
    return replies


async def test_a_batch_of_good_and_bad_requests_answers_each_and_runs_the_good_ones(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    kept = await bob.worker.send(torch.arange(3.0))
    attacker = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.connect(bob.address)
    try:
        bad = [msgpack.packb({"v": 1, "id": 11, "cmd": "rm_rf", "args": {}})]
        steal = encode_request(12, "get", {"obj": kept.id})  # another session's object: not ours to read
        mine = kept.id + 1000
        messages = [encode_request(10, "store", {"out": mine, "value": torch.arange(4.0)}), bad, steal,
                    encode_request(13, "get", {"obj": mine})]
        await attacker.send_multipart(encode_batch(messages))
        replies = {r.id: r for r in await _collect(attacker, 4)}
        assert replies[10].ok and replies[13].ok and torch.equal(replies[13].result, torch.arange(4.0))
        assert replies[11].error["type"] == "ProtocolError"
        assert replies[12].error["type"] == "ObjectNotFound"
    finally:
        attacker.close()
    assert torch.equal(await kept.get(), torch.arange(3.0))  # the honest session lost nothing


async def test_a_batch_cannot_pass_the_sessions_inflight_limit(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob", args=["--max-inflight", "8"])
    attacker = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.connect(bob.address)
    try:
        sleepy = [encode_request(i, "store", {"out": i, "value": torch.zeros(2)}) for i in range(1, 65)]
        await attacker.send_multipart(encode_batch(sleepy))
        replies = await _collect(attacker, 64)
        refused = [r for r in replies if not r.ok]
        assert sorted(r.id for r in replies) == list(range(1, 65))  # every request answered once
        assert all(r.error["type"] == "LimitExceeded" for r in refused)
        assert len(replies) - len(refused) >= 8  # as many as may wait ran; the rest were refused, not lost
    finally:
        attacker.close()
    assert (await bob.worker.status())["throttled"] >= 1


async def test_requests_refused_unread_mark_their_outputs_with_the_refusal():
    """A connection's intake holds at most --max-inflight requests; what arrives beyond is refused
    without its arguments being decoded. Its outputs are still marked failed with the refusal, so a
    later use of one says why it was never made."""
    from fedzmq.worker.config import WorkerConfig
    from fedzmq.worker.server import Worker

    worker = Worker("bob", config=WorkerConfig(max_inflight=8))
    address = worker.bind("tcp://127.0.0.1:0")
    worker.start()
    attacker = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.connect(address)
    try:
        await attacker.send_multipart(encode_request(1, "ping", {}))
        await _collect(attacker, 1)  # connected
        for base in (100, 200):
            await attacker.send_multipart(encode_batch(
                [encode_request(base + i, "store", {"out": base + i, "value": torch.zeros(2)}) for i in range(64)]))
        time.sleep(0.5)  # the daemon's loop (this one) reads nothing meanwhile: both batches wait in its socket
        replies = await _collect(attacker, 128)
        unread = [r.id for r in replies if not r.ok and "wait to be read" in r.error["message"]]
        assert set(unread) == set(range(200, 264))  # the second batch found the intake full
        await attacker.send_multipart(encode_request(999, "get", {"obj": 230}))
        [reply] = await _collect(attacker, 1)
        assert reply.error["type"] == "LimitExceeded", reply.error
    finally:
        attacker.close()
        await worker.close()


async def test_a_heartbeat_answer_never_overtakes_a_reply_waiting_to_leave():
    """The heartbeat's ``last_done`` tells a client which replies were lost; a reply still waiting in
    the session's outbox must therefore leave before the heartbeat's answer does."""
    from fedzmq.codec import encode_reply
    from fedzmq.worker.server import Worker

    async with Worker("w") as server:
        context = zmq.asyncio.Context.instance()
        client = context.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.setsockopt(zmq.ROUTING_ID, b"k" * 16)
        client.connect(server.address)
        try:
            await client.send_multipart(encode_batch([encode_request(1, "ping", {}), encode_request(2, "ping", {})]))
            assert [r.id for r in await _collect(client, 2)] == [1, 2]
            [session] = server._peers[b"k" * 16].sessions.values()
            session.outbox.add(encode_reply(3, "ran"))  # made, not yet sent (its flush comes next pass)
            heartbeat = encode_request(4, "heartbeat", {})
            server._accept([zmq.Frame(b"k" * 16), *(zmq.Frame(f) for f in heartbeat)])  # in the same pass
            assert [r.id for r in await _collect(client, 2)] == [3, 4]
        finally:
            client.close()


async def test_a_client_with_smaller_limits_reads_the_workers_reply_batches(fedzmq_daemons):
    """The worker batches replies within its own limits; a client whose limits are smaller still reads
    them (each reply within its own limits), instead of losing whole batches."""
    from fedzmq.client.connection import ConnectionSettings

    [bob] = await fedzmq_daemons("bob")
    settings = ConnectionSettings(limits=Limits(max_batch=8, max_frames=32))
    async with fz.connect(bob.address, settings=settings) as worker:
        x = await worker.send(torch.arange(4.0))
        values = await asyncio.gather(*((x + float(i)).get() for i in range(40)), return_exceptions=True)
    assert all(torch.equal(v, torch.arange(4.0) + i) for i, v in enumerate(values)), values


async def test_the_status_commands_of_one_batch_share_one_snapshot(fedzmq_daemons):
    """``status`` walks every session; a batch of them must not cost the event loop 64 walks."""
    [bob] = await fedzmq_daemons("bob")
    attacker = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.connect(bob.address)
    try:
        await attacker.send_multipart(encode_batch([encode_request(i, "status", {}) for i in range(1, 65)]))
        replies = await _collect(attacker, 64)
    finally:
        attacker.close()
    assert sorted(r.id for r in replies) == list(range(1, 65))
    # one snapshot per pass of the intake, which takes at least 4 requests (INTAKE_TURN) before its 5 ms
    # budget ends a pass: at most 16 walks for the 64 (each status would show its own count otherwise;
    # a quiet machine takes all 64 in one pass)
    assert len({r.result["requests"] for r in replies}) <= 64 // INTAKE_TURN
    assert (await bob.worker.status())["requests"] > replies[0].result["requests"]  # and not kept after


async def test_a_broken_batch_of_replies_fails_the_waiting_requests_at_once():
    """Replies lost in a batch that cannot be read cannot be told apart: every waiting request fails,
    with the reason, instead of waiting for a deadline that may never come."""
    from fedzmq.client.connection import Connection

    context = zmq.asyncio.Context.instance()
    server = context.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    connection = Connection(f"tcp://127.0.0.1:{port}", context=context)
    try:
        waiting = connection.submit("info", {"obj": 1})
        key, *_ = await asyncio.wait_for(server.recv_multipart(), 10)
        await server.send_multipart([key, msgpack.packb([1, [5]]), b"not enough frames"])
        with pytest.raises(ProtocolError, match="batch of replies"):
            await asyncio.wait_for(waiting, 10)
    finally:
        await connection.close(say_goodbye=False)
        server.close()
