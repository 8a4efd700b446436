"""Breaks found by h38's cold review of da7864e..ce6a67f: the quota's count of a running command's request
(``Quota.running``, ``room_for_requests``), the generator's turn shared with in-process workers, and the
torch threads' queue (``TakeTurns``)."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import fedzmq as fz
from turn_rigs import held_generator_turn

pytestmark = pytest.mark.timeout(120)

FEATURES = 1024


def _dataset():
    from fedzmq.worker.datasets import Dataset

    g = torch.Generator().manual_seed(38)
    return Dataset("d", torch.randn(64, FEATURES, generator=g), torch.randint(0, 2, (64,), generator=g))


async def test_a_fit_is_charged_beside_its_load_and_a_delete_meanwhile_is_answered():
    """A running command's request counts against the requests arriving until it ends (h37), but the
    command's own charges were checked without it: a fit with momentum (its optimizer's state reserved at its
    charge) and a ``load`` of its weights was taken in with 4.2 MiB held, 10.2 MiB reserved and its 2 MiB
    load in memory under a quota of 15.5 MiB. ``room_for_requests`` was then below zero, and every request
    of the session was refused while the fit ran, one that carries no bytes too: a ``delete``, which only
    frees (the client's pointers send them unawaited: a refused one left the object held, the client
    believing it gone). The fit is now refused at its charge; given the room, it runs and the delete is
    answered."""
    from fedzmq.worker.config import WorkerConfig

    for quota, fits in ((31 << 19, False), (35 << 19, True)):  # 15.5 MiB: 0.9 MiB short; 17.5 MiB
        config = WorkerConfig(min_batch_size=8, max_session_bytes=quota, max_command_seconds=3)
        async with fz.VirtualWorker("w", datasets={"d": _dataset()}, config=config) as worker:
            torch.manual_seed(0)
            model = nn.Linear(FEATURES, 512, bias=False)  # 2 MiB, and 2 MiB of room for its gradient
            remote = await worker.send(model)
            spare = await worker.send(torch.ones(4))
            fit = {"module": remote.id, "dataset": "d", "loss": "cross_entropy", "batch_size": 16,
                   "steps": 500_000, "optimizer": {"cls": "SGD", "lr": 0.001, "momentum": 0.9},
                   "load": {"weight": model.weight.detach().clone()}}
            if not fits:
                with pytest.raises(fz.LimitExceeded, match="optimizer's state"):
                    await worker.request("fit", fit)
                continue
            running = asyncio.ensure_future(worker.request("fit", fit))
            await asyncio.sleep(1.0)  # charged, and training on a torch thread
            assert not running.done()
            await worker.request("delete", {"objs": [spare.id]})  # frees 16 bytes: nothing to refuse
            spare.mark_deleted()
            with pytest.raises(fz.LimitExceeded, match="ran longer"):
                await running


async def test_in_process_workers_waiting_for_the_generators_turn_leave_the_loops_default_executor_free():
    """An in-process worker's drawing command waits for the process's generator turn on a thread (h37), and
    that thread was one of the event loop's default executor's: while an embedded engine's fit held the turn
    (up to ``--max-command-seconds``), as many virtual workers' dropout forwards as that executor has threads
    took them all, and the coordinator's own work there waited for the fit too (a download's landing copies,
    ``Transfers._download``; a secure round's ``asyncio.to_thread``): every download from every worker
    stalled, whatever its timeout. Four threads here make it what six do on two cores (``min(32, cpus + 4)``)."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(4))
    workers = [fz.VirtualWorker(f"v{i}") for i in range(5)]
    forwards = []
    with held_generator_turn() as turn:
        try:
            models = [await worker.send(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))) for worker in workers]
            inputs = [await worker.send(torch.ones(2, 4)) for worker in workers]
            turn.take()
            forwards = [asyncio.ensure_future(model(x).get()) for model, x in zip(models, inputs)]
            await asyncio.sleep(0.5)  # each waits for the turn (on a thread, the loop free)
            assert not any(forward.done() for forward in forwards)
            assert await asyncio.wait_for(loop.run_in_executor(None, int), 10) == 0  # the coordinator's own work
        finally:
            turn.release()
            await asyncio.wait_for(asyncio.gather(*forwards, return_exceptions=True), 30)
            for worker in workers:
                await worker.close()


async def test_a_commands_charges_are_checked_beside_its_own_arguments():
    """A command's request stopped counting at its charge, before its declared charges were checked: an op
    with a 15 MiB operand sent inline, and the 15 MiB product reserved for it, were both taken in under a
    quota of 16 MiB (30 MiB of the session's in memory at once; a fit's ``load`` beside its reservations
    likewise). The charges are checked with the request still counted."""
    from fedzmq.worker.config import WorkerConfig

    config = WorkerConfig(max_session_bytes=16 << 20)
    async with fz.VirtualWorker("w", config=config) as worker:
        with pytest.raises(fz.LimitExceeded, match="--max-session-bytes"):
            await worker.request("op", {"op": "mul", "args": [torch.ones(15 << 18), 2.0], "kwargs": {},
                                        "out": [worker.new_id()]})
        await worker.request("op", {"op": "mul", "args": [torch.ones(7 << 18), 2.0], "kwargs": {},
                                    "out": [worker.new_id()]})  # 7 + 7 MiB fit
