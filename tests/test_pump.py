"""The socket pump (``fedzmq.pump``) on real ZeroMQ sockets over loopback tcp, and a daemon under a flood.

The pump replaces ``zmq.asyncio`` on the daemon's ROUTER and the client's DEALER. Its risks are those
of ZeroMQ's edge-triggered descriptor (a lost edge is a hang, which the timeouts turn into failures),
a send queue that is full, a handler that raises, cancellation, and fairness: a peer that floods the
socket must not keep the event loop from everything else.
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
from fedzmq.client.connection import Connection, ConnectionSettings
from fedzmq.pump import Pump

pytestmark = pytest.mark.timeout(120)


def plain(context: zmq.Context, kind: int) -> zmq.Socket:
    sock = zmq.Socket(context, kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


@pytest.fixture
def pair(context):
    """A ROUTER and a DEALER connected to it over loopback tcp, closed after the test."""
    router, dealer = plain(context, zmq.ROUTER), plain(context, zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}")
    yield router, dealer
    router.close()
    dealer.close()


async def test_an_echo_of_thousands_of_pipelined_messages_loses_none_and_keeps_order(pair):
    """Both ends are pumps, and the echo sends from inside its receive callback: the sends' effect on
    the edge-triggered descriptor is exactly what would lose a wake-up.

    The echo's ROUTER is mandatory, as the daemon's is: without it, a ROUTER whose pipe to the dealer is
    full (its I/O thread descheduled on a loaded host) drops replies silently, and the test hung on a
    gap of a hundred replies that no pump ever received. With it, a full pipe is ``zmq.Again``, and the
    echo's ``send_or_queue`` keeps the reply in order until there is room."""
    router, dealer = pair
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    got: list[int] = []
    done = asyncio.get_running_loop().create_future()
    total = 5000

    def on_reply(frames):
        got.append(int(frames[0].bytes))
        if len(got) == total:
            done.set_result(None)

    echo = Pump(router, lambda frames: echo.send_or_queue([f.bytes for f in frames]))
    client = Pump(dealer, on_reply)
    tasks = [asyncio.create_task(echo.run()), asyncio.create_task(client.run())]
    try:
        for n in range(total):
            client.send_or_queue([str(n).encode()])
        await asyncio.wait_for(done, 60)
        assert got == list(range(total))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_message_that_arrived_before_a_send_took_the_edge_is_still_read(pair):
    """A message arrives while the loop is busy, and a send (which processes the socket's pending
    commands) then takes the descriptor's edge before the loop looks: the descriptor will not signal
    that message again, so the pump must see it through ``ZMQ_EVENTS`` after its send, or never."""
    router, dealer = pair
    got = asyncio.get_running_loop().create_future()
    client = Pump(dealer, lambda frames: got.done() or got.set_result([f.bytes for f in frames]))
    task = asyncio.create_task(client.run())
    try:
        client.send_or_queue([b"hello"])
        identity, _ = await asyncio.to_thread(router.recv_multipart)
        router.send_multipart([identity, b"reply"])
        time.sleep(0.05)  # without yielding: the reply lands in the dealer's queue, its descriptor signals
        client.send([b"more"])  # ... and this send consumes that signal before the loop looks
        assert await asyncio.wait_for(got, 5) == [b"reply"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_messages_that_cannot_be_sent_yet_wait_in_order_until_the_peer_is_there(context, tmp_path):
    """With no peer (and IMMEDIATE), a DEALER cannot take a message: the pump keeps it and sends it,
    in order, when the connection comes up. (An ipc endpoint: nobody else can be listening on it.)"""
    endpoint = f"ipc://{tmp_path}/pump.sock"
    dealer = plain(context, zmq.DEALER)
    dealer.setsockopt(zmq.IMMEDIATE, 1)
    dealer.connect(endpoint)
    client = Pump(dealer, lambda frames: None)
    task = asyncio.create_task(client.run())
    router = plain(context, zmq.ROUTER)
    try:
        for n in range(50):
            client.send_or_queue([str(n).encode()])
        assert client.backlog == 50  # nothing could go yet
        router.bind(endpoint)
        received = []
        deadline = time.monotonic() + 30
        while len(received) < 50 and time.monotonic() < deadline:
            try:
                received.append(int(router.recv_multipart(zmq.NOBLOCK)[1]))
            except zmq.Again:
                await asyncio.sleep(0.01)
        assert received == list(range(50))
        assert client.backlog == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        router.close()
        dealer.close()


async def test_a_tracked_message_is_done_only_when_all_its_frames_have_left(context):
    """The tracker covers every frame of a message: a big frame followed by a small one (which pyzmq
    copies, and whose own tracker is done at once) is not done while the reader does not read. A copied
    send has no tracker, and a ``zmq.Frame`` in the message keeps its own; neither breaks the message."""
    router, reader = plain(context, zmq.ROUTER), plain(context, zmq.DEALER)
    reader.setsockopt(zmq.RCVHWM, 1)
    reader.setsockopt(zmq.RCVBUF, 4096)
    reader.connect(f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}")
    try:
        reader.send(b"hello")
        [peer, _] = router.recv_multipart()
        pump = Pump(router, lambda frames: None)
        big = bytearray(64 << 20)  # far past loopback's socket buffers: most of it waits in the sender
        tracker = pump.send([peer, big, b"small"], copy=False, track=True)
        assert tracker is not None
        # at once, not after a wait: on an idle machine ZeroMQ's I/O threads moved all 64 MiB in under the
        # half second this test once waited. Tracking the copied small frame alone would be done already
        assert not tracker.done  # the big frame is still being sent
        assert [len(f) for f in reader.recv_multipart()] == [64 << 20, 5]
        deadline = time.monotonic() + 10
        while not tracker.done and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert tracker.done
        assert pump.send([peer, b"copied"], copy=True, track=True) is None
        assert reader.recv_multipart() == [b"copied"]
        tracker = pump.send([peer, zmq.Frame(b"untracked frame"), bytes(100_000)], copy=False, track=True)
        assert [len(f) for f in reader.recv_multipart()] == [15, 100_000]
        assert tracker is not None
    finally:
        router.close()
        reader.close()


async def test_a_handler_that_raises_stops_the_pump_with_its_exception(pair):
    router, dealer = pair

    def broken(frames):
        raise KeyError("a handler's bug")

    dealer.send(b"x")
    with pytest.raises(KeyError, match="a handler's bug"):
        await asyncio.wait_for(Pump(router, broken).run(), 30)


async def until(condition, seconds: float = 30.0) -> None:
    """Wait (polling) until ``condition()`` holds, at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def test_a_cancelled_pump_no_longer_reads_and_a_new_run_picks_up_what_waited(pair):
    router, dealer = pair
    seen: list[bytes] = []
    pump = Pump(router, lambda frames: seen.append(frames[1].bytes))
    task = asyncio.create_task(pump.run())
    dealer.send(b"first")
    await until(lambda: bool(seen))
    assert seen == [b"first"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    dealer.send(b"second")
    await asyncio.sleep(0.3)
    assert seen == [b"first"]  # nobody reads while no run() is awaited
    task = asyncio.create_task(pump.run())
    await until(lambda: len(seen) == 2)
    assert seen == [b"first", b"second"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_flood_of_queued_messages_leaves_the_loop_to_other_tasks_between_batches(pair):
    """400 messages wait, each taking 2 ms to handle (0.8 s in all). Another task must run many times
    while they are handled, not once they are all done."""
    router, dealer = pair
    handled = 0

    def slow(frames):
        nonlocal handled
        time.sleep(0.002)
        handled += 1

    for _ in range(400):
        dealer.send(b"x")
    # let libzmq move them all into the ROUTER's queue before the pump starts
    await until(lambda: bool(router.getsockopt(zmq.EVENTS) & zmq.POLLIN))
    await asyncio.sleep(0.2)
    task = asyncio.create_task(Pump(router, slow).run())
    seen_by_other_task = []
    deadline = time.monotonic() + 30
    while handled < 400 and time.monotonic() < deadline:
        await asyncio.sleep(0)
        seen_by_other_task.append(handled)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert handled == 400
    during = [n for n in seen_by_other_task if 0 < n < 400]
    assert len(set(during)) >= 10, seen_by_other_task[:50]  # the other task ran between batches


def heavy_message(n: int) -> list[bytes]:
    """A request whose header is slow to decode (thousands of small maps: ~10 ms of Python each) and
    then refused: the cheapest way for a peer to make a daemon spend its event loop."""
    return [msgpack.packb({"v": 1, "id": n, "cmd": "get", "args": {"obj": [{"$slice": [1, 2, 3]}] * 4000}})]


async def test_a_flood_of_slow_to_decode_messages_does_not_starve_an_honest_session(fedzmq_daemons):
    """The attack: a peer queues 300 requests that each take ~10 ms to decode and refuse (seconds of
    the daemon's event loop), then an honest client asks for work. Its commands must run while the
    flood is still being handled, not after it (replies to the flood still outstanding when the honest
    client is done). Ordering, not timing, is asserted."""
    [daemon] = await fedzmq_daemons("bob")
    bob = daemon.worker
    x = await bob.send(torch.arange(16, dtype=torch.float32))
    assert torch.equal(await (x + 1).get(), torch.arange(16, dtype=torch.float32) + 1)
    context = zmq.asyncio.Context.instance()
    attacker = context.socket(zmq.DEALER)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.connect(daemon.address)
    flood = 300
    answered = 0
    try:
        for n in range(flood):
            await attacker.send_multipart(heavy_message(n + 1))

        async def count_replies():
            nonlocal answered
            while answered < flood:
                await attacker.recv_multipart()
                answered += 1

        counter = asyncio.create_task(count_replies())
        for k in range(5):
            assert torch.equal(await (x + k).get(), torch.arange(16, dtype=torch.float32) + k)
        answered_when_honest_done = answered
        await asyncio.wait_for(counter, 90)  # the flood is answered too, each with an error
        assert answered_when_honest_done < flood, "the honest session waited for the whole flood"
        status = await bob.status()
        assert status["malformed"] >= flood
    finally:
        attacker.close()


class BrokenConnection(Connection):
    """A connection whose reply handling has a bug (raises on the first reply)."""

    def _dispatch(self, frames):
        raise RuntimeError("a bug in reply handling")


async def test_a_client_whose_reply_handling_breaks_fails_its_waiting_requests_at_once():
    """Heartbeats an hour apart: only the stopped pump can be what fails the request, and it says so."""
    async with fz.VirtualWorker("w") as worker:
        connection = BrokenConnection(worker.address, ConnectionSettings(heartbeat_interval=3600.0))
        try:
            with pytest.raises(fz.WorkerDeadError, match="can no longer be read"):
                await asyncio.wait_for(connection.request("ping", {}), 30)
            with pytest.raises(fz.WorkerDeadError):  # and what comes after fails at once too
                connection.submit("ping", {})
        finally:
            await connection.close(say_goodbye=False)


async def test_a_peer_sending_faster_than_the_daemon_reads_is_held_back_not_buffered():
    """The attack: a peer sends messages as fast as it can and never reads, while the daemon's event loop
    is busy. ZeroMQ's I/O thread reads on regardless; with no receive limit it kept every message in the
    daemon's memory, without end (a batched flood of cheap requests grew a daemon by about 45 MiB/s).
    With one, the peer's connection stops being read once a few messages wait, and TCP makes the peer
    wait: what it can send is bounded by buffers, not by the daemon's memory. Then the daemon serves."""
    from concurrent.futures import ThreadPoolExecutor

    from fedzmq.worker.server import Worker

    worker = Worker("bob")
    address = worker.bind("tcp://127.0.0.1:0")
    worker.start()
    message = b"\x81" + bytes(16 << 10)  # 16 KiB (never decoded: the loop is busy throughout)
    attempts = 20_000  # 320 MiB

    def flood() -> int:
        """Send without blocking until the socket takes no more (or the attempts run out)."""
        context = zmq.Context()
        sock = plain(context, zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 100)
        sock.connect(address)
        sent, deadline = 0, time.monotonic() + 3.0
        try:
            while sent < attempts and time.monotonic() < deadline:
                try:
                    sock.send(message, zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    time.sleep(0.0001)
            return sent
        finally:
            sock.close()
            context.term()

    try:
        with ThreadPoolExecutor(1) as pool:
            flooding = pool.submit(flood)
            time.sleep(3.5)  # the daemon's loop (this one) is busy: only ZeroMQ's I/O thread runs
            sent = flooding.result(timeout=30)
        assert sent < attempts // 4, f"the daemon took {sent} messages of 16 KiB without reading them"
        async with fz.RemoteWorker(address) as bob:  # and it serves an honest client right after
            x = await bob.send(torch.arange(4.0))
            assert torch.equal(await (x * 2).get(), torch.arange(4.0) * 2)
    finally:
        await worker.close()
