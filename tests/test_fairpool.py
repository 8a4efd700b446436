"""The daemon's torch threads (``FairPool``): each key's waiting work in turn, and nothing stalls or stays
behind when work fails or its caller goes away (a cold review's finds). Both it and the generator's turn
(``FairTurn``) take their order from ``TakeTurns``, tested alone first."""

import asyncio
import threading
import time

import pytest

from fedzmq.worker.fairpool import FairPool, TakeTurns


@pytest.mark.timeout(10)
def test_keys_take_turns_each_oldest_first_and_a_key_sent_back_goes_after_the_others() -> None:
    turns: TakeTurns[str] = TakeTurns()
    assert not turns and "a" not in turns
    for item in ("a0", "a1", "a2", "b0", "c0", "c1"):
        turns.add(item[0], item)
    assert turns.remove("a", "a1") and not turns.remove("a", "a1") and not turns.remove("z", "z0")
    assert [turns.take() for _ in range(3)] == ["a0", "b0", "c0"]
    assert "b" not in turns and "a" in turns  # b's only item went; a and c wait, in that order
    turns.add("b", "b1")  # a key that comes back waits behind the keys waiting now
    turns.to_back("a")  # (what a holder of the turn does as it gives it up)
    assert [turns.take() for _ in range(2)] == ["c1", "b1"]
    turns.add("d", "d0")
    assert turns.clear() == ["a2", "d0"] and not turns


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
