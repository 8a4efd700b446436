"""Breaks found by h26: ordinary user code of the public API (``import fedzmq as fz``) against the asyncio
promises of README.md and docs/api.md: thread-local torch state never spans an ``await``, concurrent code
gives exactly what the same code gives run sequentially (on ``VirtualWorker``s and daemons alike), and
cancellation leaves nothing dangling on either side."""

import asyncio
import gc

import pytest
import torch
from torch import nn

import fedzmq as fz

#: how long a check waits for the daemon to notice what the client did (a poll, not a timing assertion)
SETTLE_SECONDS = 5.0


async def _sessions_settle_to(observer: fz.RemoteWorker, expected: int) -> int:
    """The daemon's session count once it reaches ``expected``, or what it is after ``SETTLE_SECONDS``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_SECONDS
    while True:
        gc.collect()
        sessions = (await observer.status())["sessions"]
        if sessions == expected or loop.time() > deadline:
            return sessions
        await asyncio.sleep(0.1)


@pytest.mark.timeout(120)
async def test_a_connect_cancelled_at_any_pass_leaves_no_session_on_the_daemon(fedzmq_daemons):
    """``fz.connect`` under a deadline (``asyncio.wait_for``, a ``TaskGroup`` cancelled), cancelled after its
    ping left: the client closes its socket without a goodbye (``close_connection(say_goodbye=False)``), so the
    daemon keeps the session it opened for that ping until ``--session-timeout`` (60 s) or an eviction. Each
    one counts against ``--max-sessions`` and, with keys, ``--max-sessions-per-key`` (32): a retry loop of
    short connect deadlines locks its own key out for a minute. docs/api.md: cancellation leaves nothing
    dangling on either side."""
    [bob] = await fedzmq_daemons("bob")
    baseline = (await bob.worker.status())["sessions"]
    outcomes = []
    for passes in range(30):
        task = asyncio.ensure_future(fz.connect(bob.address))
        for _ in range(passes):
            await asyncio.sleep(0)
        task.cancel()
        [result] = await asyncio.gather(task, return_exceptions=True)
        if isinstance(result, fz.RemoteWorker):
            await result.close()
            outcomes.append("connected")
        else:
            assert isinstance(result, asyncio.CancelledError), result
            outcomes.append("cancelled")
    assert "cancelled" in outcomes and "connected" in outcomes, outcomes  # the sweep crossed the ping's reply
    left = await _sessions_settle_to(bob.worker, baseline)
    assert left == baseline, f"{left - baseline} cancelled connects left their sessions on the daemon ({outcomes})"


def _dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5))


async def _seeded_draws(worker: fz.RemoteWorker) -> list[torch.Tensor]:
    """A user's seeded local randomness (data augmentation, say) around awaits of the worker."""
    torch.manual_seed(1234)
    draws = []
    for _ in range(4):
        draws.append(torch.randn(4))
        await (await worker.send(draws[-1])).get()
    return draws


async def _dropout_forwards(worker: fz.RemoteWorker, remote: fz.ModulePointer, x: fz.TensorPointer) -> None:
    """A neighbour's remote forwards through a dropout layer in train mode: computed on the worker."""
    for _ in range(4):
        await remote(x).get()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["daemon", "virtual"])
async def test_a_workers_dropout_leaves_the_callers_seeded_random_stream_alone(fedzmq_daemons, where):
    """A ``VirtualWorker`` is the daemon's code in this process, and its dropout draws from this process's
    global torch generator: a coroutine's seeded ``torch.randn`` around its awaits gives other numbers when a
    neighbour's remote forward ran on an in-process worker meanwhile (and the worker's dropout masks depend on
    what the client drew). On a daemon the same concurrent code gives what the sequential code gives.
    docs/api.md: concurrent code gives exactly the results of the same code run sequentially, on virtual
    workers and daemons alike."""
    if where == "daemon":
        [handle] = await fedzmq_daemons("bob")
        worker = handle.worker
    else:
        worker = fz.VirtualWorker("bob")
    try:
        remote = await worker.send(_dropout_model())
        x = await worker.send(torch.ones(8, 16))
        alone = await _seeded_draws(worker)
        await _dropout_forwards(worker, remote, x)
        together, _ = await asyncio.gather(_seeded_draws(worker), _dropout_forwards(worker, remote, x))
        assert all(torch.equal(a, b) for a, b in zip(alone, together)), \
            f"the seeded draws differ beside remote dropout on a {where} worker"
    finally:
        if where == "virtual":
            await worker.close()
