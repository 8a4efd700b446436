"""Red team h40 (a hostile coordinator against the newest quota and scheduling code, da7864e..c54a8fc):
the breaks found, each a test that failed before its fix."""

import asyncio
import threading

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.client.connection import ConnectionSettings
from fedzmq.worker.randomness import GENERATOR_TURN

pytestmark = pytest.mark.timeout(120)

#: a client patient enough for a machine loaded by other sessions' test runs
PATIENT = ConnectionSettings(heartbeat_interval=0.2, heartbeat_liveness=100, connect_timeout=10.0)


@pytest.fixture
def allowed_names():
    return ("alice", "mallory")


async def _made(pointer: fz.TensorPointer) -> fz.TensorPointer:
    """The pointer once the command that makes it is answered (not a ``get`` queued after it)."""
    return await pointer


def _hold_turn_until(release: threading.Event, held: threading.Event) -> None:
    """An embedded engine's torch thread in a long seeded dropout fit: it holds the process's generator
    turn until told (the daemon's own drawing commands wait for it on their torch thread)."""
    with GENERATOR_TURN:
        held.set()
        release.wait(60)


async def _status(worker: fz.RemoteWorker, counter: str, at_least: int) -> None:
    while (await worker.status())[counter] < at_least:
        await asyncio.sleep(0.05)


async def test_a_revoked_keys_command_waiting_for_its_turn_leaves_the_queue_and_is_answered(keys):
    """A key revoked while its session's command waits for the torch thread (or the generator's turn) lost
    its sessions, but the command the session's task was awaiting stayed queued (h37 took out only those the
    pump had started and queued): it held its request, uncharged once its session ended, kept its place
    ahead of the other keys' work, took the thread and the turn when they came, and its client heard
    nothing until then. Here the one torch thread waits for the process's generator turn (held below as an
    embedded engine's fit would), alice's dropout forward holding it; mallory's forward waits behind it and
    mallory's key is revoked: it is answered at the revocation, the turn still held."""
    config = fz.WorkerConfig(secret_key=str(keys["server"][1]), allowed_keys=str(keys["allowed"]))
    server = fz.Worker("bob", config=config)
    address = server.bind("tcp://127.0.0.1:0")
    server.start()
    release, held = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_turn_until, args=(release, held))
    workers, pending = [], []
    try:
        for name in ("alice", "mallory"):
            workers.append(await fz.connect(address, server_key=keys["server"][0], client_key=keys[name][1],
                                            settings=PATIENT))
        alice, mallory = workers
        model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        remotes = [await worker.send(model) for worker in workers]
        inputs = [await worker.send(torch.ones(2, 4)) for worker in workers]
        holder.start()
        assert held.wait(10)
        first = asyncio.ensure_future(remotes[0](inputs[0]).get())  # takes the thread, which waits for the turn
        pending.append(first)
        await asyncio.sleep(0.3)
        waiting = asyncio.ensure_future(_made(remotes[1](inputs[1])))  # the call alone: it waits for alice's
        pending.append(waiting)
        await asyncio.sleep(0.3)
        assert not first.done() and not waiting.done()
        (keys["allowed"] / keys["mallory"][0].name).unlink()
        assert server.reload_keys() == 1
        with pytest.raises(fz.PermissionDenied, match="ended while this command ran|no longer allowed"):
            await asyncio.wait_for(waiting, 30)  # before: only once the turn was given back
        assert not first.done()
    finally:
        release.set()
        holder.join(10)
        await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 60)
        for worker in workers:
            await worker.close()
        await server.close()
