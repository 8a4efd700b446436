"""Red team h40 (a hostile coordinator against the newest quota and scheduling code, da7864e..c54a8fc):
the breaks found, each a test that failed before its fix."""

import asyncio

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.client.connection import ConnectionSettings
from turn_rigs import in_process_server_with_turn

pytestmark = pytest.mark.timeout(120)

#: a client patient enough for a machine loaded by other sessions' test runs
PATIENT = ConnectionSettings(heartbeat_interval=0.2, heartbeat_liveness=100, connect_timeout=10.0)


@pytest.fixture
def allowed_names():
    return ("alice", "mallory")


async def _made(pointer: fz.TensorPointer) -> fz.TensorPointer:
    """The pointer once the command that makes it is answered (not a ``get`` queued after it)."""
    return await pointer


async def _status(worker: fz.RemoteWorker, counter: str, at_least: int) -> None:
    while (await worker.status())[counter] < at_least:
        await asyncio.sleep(0.05)


async def _thread_taken(server: fz.Worker) -> None:
    """Until the worker's one torch thread runs work (waited for as a condition: a sleep was too short on a
    loaded host, and the work behind it could take the thread first)."""
    async with asyncio.timeout(30):
        while server.executor.pool.busy < 1:
            await asyncio.sleep(0.005)


async def test_a_revoked_keys_command_waiting_for_its_turn_leaves_the_queue_and_is_answered(keys):
    """A key revoked while its session's command waits for the torch thread (or the generator's turn) lost
    its sessions, but the command the session's task was awaiting stayed queued (h37 took out only those the
    pump had started and queued): it held its request, uncharged once its session ended, kept its place
    ahead of the other keys' work, took the thread and the turn when they came, and its client heard
    nothing until then. Here the one torch thread waits for the process's generator turn (held below as an
    embedded engine's fit would), alice's dropout forward holding it; mallory's forward waits behind it and
    mallory's key is revoked: it is answered at the revocation, the turn still held."""
    config = fz.WorkerConfig(secret_key=str(keys["server"][1]), allowed_keys=str(keys["allowed"]))
    async with in_process_server_with_turn(config, 2, PATIENT, server_key=keys["server"][0],
                                           client_key=[keys["alice"][1], keys["mallory"][1]]) as rig:
        server, workers, pending = rig.server, rig.workers, rig.pending
        model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        remotes = [await worker.send(model) for worker in workers]
        inputs = [await worker.send(torch.ones(2, 4)) for worker in workers]
        rig.turn.take()
        first = asyncio.ensure_future(remotes[0](inputs[0]).get())  # takes the thread, which waits for the turn
        pending.append(first)
        await _thread_taken(server)
        waiting = asyncio.ensure_future(_made(remotes[1](inputs[1])))  # the call alone: it waits for alice's
        pending.append(waiting)
        await asyncio.sleep(0.3)
        assert not first.done() and not waiting.done()
        (keys["allowed"] / keys["mallory"][0].name).unlink()
        assert server.reload_keys() == 1
        with pytest.raises(fz.PermissionDenied, match="ended while this command ran|no longer allowed"):
            await asyncio.wait_for(waiting, 30)  # before: only once the turn was given back
        assert not first.done()


async def test_an_ops_output_charged_before_it_waits_for_a_thread_stays_reserved_while_it_waits():
    """A small op with a big output (an outer sum of two 512-element vectors: 2 MiB of float64) is charged on
    the event loop, its inputs being small, and then waits for a torch thread; its request stops counting at
    that charge (``Quota.starting``), and its reservation began only on the thread. While it waited, its
    session's next request was measured against a room that held neither: a 2.25 MiB send was taken in under
    a quota of 2.5 MiB, beside the 2 MiB the op was about to make (1.7 times the quota in memory; a burst of
    pipelined sends fills the whole quota so, twice). The one torch thread here is held by another session's
    dropout forward, which waits for the process's generator turn (held below as an embedded engine's fit
    would)."""
    config = fz.WorkerConfig(max_session_bytes=5 << 19)
    async with in_process_server_with_turn(config, 2, PATIENT) as rig:
        (other, attacker), pending = rig.workers, rig.pending
        model = await other.send(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))
        x = await other.send(torch.ones(2, 4))
        column = await attacker.send(torch.ones(512, 1, dtype=torch.float64))
        row = await attacker.send(torch.ones(1, 512, dtype=torch.float64))
        rig.turn.take()
        pending.append(asyncio.ensure_future(_made(model(x))))  # takes the one thread, which waits for the turn
        await _thread_taken(rig.server)
        outer = column + row  # charged 2 MiB at once; waits for the thread
        pending.append(asyncio.ensure_future(_made(outer)))
        with pytest.raises(fz.LimitExceeded, match="leave no room for"):  # refused as it arrives
            await asyncio.wait_for(attacker.send(torch.ones(9 << 15, dtype=torch.float64)), 30)  # 2.25 MiB
        assert not pending[1].done()


class _Loaded(nn.Module):
    """A model whose buffer a fit loads from a view of the session's tensor out of order: a copy of about a
    second (a buffer of 2^23 elements permuted in 23 dimensions), and 4 MiB of parameters whose momentum the
    fit reserves."""

    def __init__(self) -> None:
        super().__init__()
        self.fat = nn.Linear(1024, 1024, bias=False)
        self.lin = nn.Linear(1024, 2, bias=False)
        self.register_buffer("big", torch.zeros([2] * 23))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.fat(x))


async def test_a_fits_charges_are_reserved_while_it_loads_its_weights():
    """A fit's charges (20.2 MiB here: its optimizer's momentum, its batch and its forward) are checked on the
    torch thread before it loads the weights its request names, and reserved only after that load, for its
    training: while the load copied (a second here), its session's next request was measured without them,
    and a 16 MiB send was taken in beside the fit with 5.8 MiB of its quota left. The charges are reserved
    from the check on."""
    from fedzmq.worker.datasets import Dataset

    g = torch.Generator().manual_seed(40)
    data = Dataset("d", torch.randn(64, 1024, generator=g), torch.randint(0, 2, (64,), generator=g))
    config = fz.WorkerConfig(max_session_bytes=98 << 20, min_batch_size=8, max_command_seconds=30)
    server = fz.Worker("bob", config=config, datasets={"d": data})
    address = server.bind("tcp://127.0.0.1:0")
    server.start()
    worker = await fz.connect(address, settings=PATIENT)
    try:
        model = await worker.send(_Loaded())  # 40 MiB with its gradients' room
        source = await worker.send(torch.ones(1 << 23))  # 32 MiB: 72 MiB held
        view = await source.view([2] * 23).permute(*reversed(range(23)))
        fit = asyncio.ensure_future(worker.request("fit", {
            "module": model.id, "dataset": "d", "loss": "cross_entropy", "batch_size": 16, "steps": 2,
            "optimizer": {"cls": "SGD", "lr": 0.001, "momentum": 0.9}, "load": {"big": view}}))
        [session] = server._all_sessions()
        big = session.table.objects[model.id].module.big.view(-1)
        async with asyncio.timeout(30):  # charged (20.2 MiB) and loading its buffer on the torch thread: waited
            # for as its first elements change, not slept for (on a loaded host the charge came later, on an
            # idle one the copy may end sooner)
            while not bool(big[:4096].any()):
                await asyncio.sleep(0.002)
        with pytest.raises(fz.LimitExceeded, match="leave no room for"):
            await worker.send(torch.ones(1 << 22))  # 16 MiB
        assert (await fit)["steps"] == 2
    finally:
        await worker.close()
        await server.close()
