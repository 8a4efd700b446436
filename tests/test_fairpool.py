"""The daemon's torch threads (``FairPool``): each key's waiting work in turn, and nothing stalls or stays
behind when work fails or its caller goes away (a cold review's finds)."""

import asyncio
import threading
import time

import pytest

from fedzmq.worker.fairpool import FairPool


@pytest.mark.timeout(30)
async def test_keys_take_turns_and_a_failure_or_a_cancelled_waiter_stalls_nothing() -> None:
    pool = FairPool(1, "test-fair")
    release = threading.Event()
    order: list[str] = []

    def blocked() -> str:
        release.wait(10)
        return "first"

    def record(name: str) -> str:
        order.append(name)
        return name

    def stop() -> None:
        raise StopIteration  # a future refuses it as an exception: it must still free the thread

    try:
        first = asyncio.ensure_future(pool.run("a", blocked))
        await asyncio.sleep(0.05)  # the only thread is busy: what follows waits
        queued = [asyncio.ensure_future(pool.run(key, record, f"{key}{i}")) for key in "ab" for i in range(3)]
        failing = asyncio.ensure_future(pool.run("c", stop))
        gone = asyncio.ensure_future(pool.run("d", record, "d0"))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0)
        release.set()
        assert await first == "first"
        assert [await q for q in queued] == ["a0", "a1", "a2", "b0", "b1", "b2"]
        with pytest.raises(RuntimeError, match="StopIteration"):
            await failing
        assert order == ["a0", "b0", "a1", "b1", "a2", "b2"]  # in turn, whatever order they came in
        assert "d0" not in order  # cancelled while it waited: never run, and not kept
    finally:
        release.set()
        pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        await pool.run("a", time.sleep, 0)
