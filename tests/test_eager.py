"""Commands run as the daemon reads them (``fedzmq.eager``, ``Worker._run_at_once``).

A session with nothing queued or running has its next command run in the pump's callback instead of
waking its task a pass of the event loop later. A command that waits (a big op on a torch thread, a
reply whose buffers are still being sent) is handed to the session's task where it waits. The risk is
order: a command read after one that waits must not run, or answer, before it. These tests hold the
step itself to what a task would do, and the daemon to answering a mix of both kinds in the order sent.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest
import torch

import fedzmq as fz
from fedzmq.eager import Finished, Started, start

pytestmark = pytest.mark.timeout(60)


async def test_a_coroutine_that_never_waits_finishes_in_the_caller():
    ran: list[str] = []

    async def quick() -> int:
        ran.append("quick")
        return 7

    step = start(quick())
    assert ran == ["quick"]  # before any pass of the event loop
    assert isinstance(step, Finished) and step.value == 7


async def test_a_coroutine_that_waits_is_finished_by_the_task_that_awaits_it():
    gate = asyncio.get_running_loop().create_future()
    trail: list[str] = []

    async def waits() -> str:
        trail.append("before")
        value = await gate
        trail.append(f"after {value}")
        await asyncio.sleep(0)  # a bare yield to the loop, too
        return value * 2

    step = start(waits())
    assert isinstance(step, Started) and trail == ["before"]
    task = asyncio.ensure_future(step)
    await asyncio.sleep(0)
    assert not task.done()
    gate.set_result("x")
    assert await task == "xx"
    assert trail == ["before", "after x"]


async def test_cancelling_the_awaiting_task_cancels_the_coroutine_at_its_wait():
    trail: list[str] = []

    async def waits() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            trail.append("cancelled at its wait")
            raise
        finally:
            trail.append("finally")

    step = start(waits())
    assert isinstance(step, Started)
    task = asyncio.ensure_future(step)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert trail == ["cancelled at its wait", "finally"]


async def test_an_error_before_or_after_the_wait_reaches_whoever_runs_that_part():
    async def fails_at_once() -> None:
        raise ValueError("at once")

    with pytest.raises(ValueError, match="at once"):
        start(fails_at_once())

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("later")

    step = start(fails_later())
    assert isinstance(step, Started)
    with pytest.raises(KeyError, match="later"):
        await step


async def test_closing_a_started_coroutine_runs_its_cleanup():
    trail: list[str] = []

    async def waits() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            trail.append("finally")

    step = start(waits())
    assert isinstance(step, Started)
    step.close()
    assert trail == ["finally"]


async def answer_order(worker: fz.RemoteWorker) -> None:
    """Pipeline commands that run at once (small ops) between commands that wait (ops on a quarter
    million elements go to a torch thread; a get of a megabyte waits for its buffers to be sent), and
    check that the replies come back in the order sent, with the values of that order."""
    x = await worker.send(torch.arange(4.0))
    big = await worker.send(torch.zeros(1 << 18))
    pointers = [big + 1, x + 1, x * 3, big * 2, x - 1, big + 5, x + 10]
    done: list[int] = []
    for i, pointer in enumerate(pointers):
        pointer._ready.add_done_callback(lambda _, i=i: done.append(i))
    fetched = [asyncio.ensure_future(pointers[0].get()), asyncio.ensure_future(pointers[1].get())]
    small = x + 100  # after the gets of a megabyte and of four floats
    small._ready.add_done_callback(lambda _: done.append(len(pointers)))
    await asyncio.gather(*pointers, small)
    assert done == list(range(len(pointers) + 1)), done
    assert torch.equal(await fetched[0], torch.ones(1 << 18))
    assert torch.equal(await fetched[1], torch.arange(4.0) + 1)
    assert torch.equal(await pointers[3].get(), torch.zeros(1 << 18))
    assert torch.equal(await pointers[2].get(), torch.arange(4.0) * 3)
    assert torch.equal(await pointers[6].get(), torch.arange(4.0) + 10)
    assert torch.equal(await small.get(), torch.arange(4.0) + 100)
    assert (await worker.status())["errors"] == 0


async def test_a_daemon_answers_waiting_and_immediate_commands_in_the_order_sent(fedzmq_daemons):
    [alice] = await fedzmq_daemons("alice")
    for _ in range(3):
        await answer_order(alice.worker)


async def test_an_in_process_worker_answers_them_in_the_order_sent_too():
    async with fz.VirtualWorker("bob") as bob:
        for _ in range(3):
            await answer_order(bob)


async def test_a_session_closed_by_a_command_run_at_once_ends_its_task():
    """``close`` of a session with nothing queued runs in the pump's callback. Its task, parked on the
    empty queue, must still be told to end (a red-team-style review found it waiting for ever, one
    leaked task per closed session, each logged by asyncio as destroyed while pending)."""
    async with fz.Worker("carol") as server:
        sessions = []
        for _ in range(5):
            client = await fz.connect(server.address)
            await client.send(torch.ones(2))
            sessions += server._all_sessions()
            await client.close()
        for _ in range(20):
            await asyncio.sleep(0.01)
            if all(s.task is not None and s.task.done() for s in sessions):
                break
        assert sessions and all(s.task is not None and s.task.done() for s in sessions)
        assert not server._all_sessions()


@pytest.mark.parametrize("after_a_wait", [False, True])
async def test_a_bug_in_running_a_command_answers_it_and_ends_only_its_session(after_a_wait):
    """A bug outside a handler (the executor raising) must neither hang the client nor stop the worker,
    whether it struck before the command first waited (run at once) or after (in the session's task)."""
    async with fz.Worker("dave") as server:
        async with fz.connect(server.address) as victim, fz.connect(server.address) as bystander:
            mine = await bystander.send(torch.arange(3.0))
            x = await victim.send(torch.ones(2))
            real = server.executor.execute

            async def broken(session, request):
                if request.cmd == "op" and session.key == victim_key:
                    if after_a_wait:
                        await asyncio.sleep(0)
                    raise RuntimeError("a bug")
                return await real(session, request)

            victim_key = next(s.key for s in server._all_sessions() if x.id in s.table.objects)
            server.executor.execute = broken  # type: ignore[method-assign]
            with pytest.raises(fz.RemoteError, match="failed running this command"):
                await asyncio.wait_for(asyncio.ensure_future(x + 1), 10)
            assert torch.equal(await asyncio.wait_for((mine * 2).get(), 10), torch.arange(3.0) * 2)
            assert server.counters["sessions_expired"] == 1


def serve_in_a_thread(worker: fz.Worker, ready: "queue.Queue[str]", stop: threading.Event) -> None:
    """Serve ``worker`` over loopback tcp on an event loop of its own, as a daemon would (the client's
    loop must not be the one a slow command holds)."""

    async def serve() -> None:
        worker.bind("tcp://127.0.0.1:0")
        async with worker:
            ready.put(worker.address)
            while not stop.is_set():
                await asyncio.sleep(0.01)

    asyncio.run(serve())


async def test_commands_run_at_once_from_one_message_give_the_loop_back_after_a_slice():
    """A batch of four commands arrives as one message. Run at once one after the other, four slow
    ones (an inline fit that turned slow may take up to half a second) would hold the daemon's event
    loop four times as long as a session's task did, which yields after each slice. Past the slice,
    the rest of the message goes to the session's queue: a ping that arrived meanwhile is answered
    after at most two of them (the one run at once, and one the session's task may run before the pump
    reads again), not after all four."""
    server = fz.Worker("erin")
    real = server.executor.execute

    async def slow(session, request):
        if request.cmd == "op":
            time.sleep(0.2)  # a command on the loop that turned slow (no await: it holds the loop)
        return await real(session, request)

    server.executor.execute = slow  # type: ignore[method-assign]
    ready: queue.Queue[str] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=serve_in_a_thread, args=(server, ready, stop), daemon=True)
    thread.start()
    try:
        address = ready.get(timeout=10)
        async with fz.connect(address) as busy, fz.connect(address) as other:
            x = await busy.send(torch.ones(2))
            await other.ping()
            answered: list[str] = []
            ops = [x + i for i in range(4)]  # one pass: one batch message
            for i, op in enumerate(ops):
                op._ready.add_done_callback(lambda _, i=i: answered.append(f"op{i}"))
            await asyncio.sleep(0.1)  # the first op is running and holds the daemon's loop
            ping = asyncio.ensure_future(other.ping())
            ping.add_done_callback(lambda _: answered.append("ping"))
            await asyncio.wait_for(asyncio.gather(ping, *ops), 10)
            assert answered.index("ping") <= 2, answered
    finally:
        stop.set()
        thread.join(10)
