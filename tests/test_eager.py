"""Commands run as the daemon reads them (``fedzmq.eager``, ``Worker._run_at_once``).

A session with nothing queued or running has its next command run in the pump's callback instead of
waking its task a pass of the event loop later. A command that waits (a big op on a torch thread, a
reply whose buffers are still being sent) is handed to the session's task where it waits. The risk is
order: a command read after one that waits must not run, or answer, before it. These tests hold the
step itself to what a task would do, and the daemon to answering a mix of both kinds in the order sent.
"""

from __future__ import annotations

import asyncio

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
