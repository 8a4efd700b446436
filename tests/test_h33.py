"""Breaks found by h33's cold review of 1f587b6..ae70ef5: a local model's turn across workers
(fedzmq/client/turns.py), the daemon's turn of its random generator (fedzmq/worker/randomness.py), and the
owner's release ledgers (fedzmq/worker/ledger.py)."""

import asyncio

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.federated.secure import SecAgg
from fedzmq.testing import write_dataset
from fedzmq.testing.plugin import TEST_SETTINGS
from fedzmq.worker.datasets import Dataset
from fedzmq.worker.ledger import LedgerError

pytestmark = pytest.mark.timeout(120)


async def test_a_send_of_a_model_to_one_worker_does_not_wait_for_its_send_to_a_stopped_one(fedzmq_daemons):
    """Sends of one local model to two workers only read it: neither may wait for the other. The model's
    turn (fedzmq/client/turns.py) made every send of it wait for any other, whatever the worker, so a
    send to a healthy worker waited until a stopped one was declared dead (a federation's first round,
    which sends the model to every worker, went one worker at a time, and behind the slowest)."""
    bob, alice = await fedzmq_daemons("bob", "alice")
    model = nn.Linear(4, 2)
    alice.stop()  # SIGSTOP: its send never ends until its connection is declared dead
    try:
        stuck = asyncio.ensure_future(alice.worker.send(model))
        await asyncio.sleep(0)  # it takes the model's turn and starts sending
        pointer = await bob.worker.send(model)
        finished_first = stuck.done()
        stuck.cancel()
        await asyncio.gather(stuck, return_exceptions=True)
        assert not finished_first, "the send to bob waited for the send to the stopped alice"
        assert bob.worker.hosted(model) is pointer
    finally:
        alice.cont()


def _dropout_model(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.Dropout(0.5), nn.Linear(width, 2))


async def test_a_dropout_fit_waiting_for_the_generators_turn_is_not_stopped_by_the_wait(fedzmq_daemons, tmp_path):
    """A daemon with two torch threads: one session's dropout fit runs to ``--max-command-seconds``, holding
    the process generator's turn (``GENERATOR_TURN``) all along; another session's dropout fit, taken by the
    other thread meanwhile, waits for the turn. Its seconds counted from when the thread took it, not from
    when it had the turn, so it was stopped for running too long before it ran a step: one session made
    another's fits fail (what ``Budget.start`` is there to prevent)."""
    x = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8) / 100
    data = write_dataset(tmp_path / "toy.safetensors", x, (x[:, 0] > 2).long())
    (bob,) = await fedzmq_daemons("bob", datasets={"bob": {"toy": data}},
                                  args=["--threads", "2", "--max-command-seconds", "20"])
    async with fz.connect(bob.address, settings=TEST_SETTINGS) as other:  # another coordinator's session
        hog, honest = await bob.worker.send(_dropout_model()), await other.send(_dropout_model(256))
        optimizer = {"cls": "SGD", "lr": 0.01}
        long_fit = asyncio.ensure_future(hog.fit("toy", batch_size=16, steps=500_000, optimizer=optimizer))
        await asyncio.sleep(0.2)  # it holds the generator's turn by now (were it not, the honest fit would go first)
        # a few hundred steps: counted from its arrival, it would have nothing left when it has the turn;
        # here its whole limit. Its activations (64 x 256) stay under torch's grain size: wider, every op
        # forked OpenMP threads that waited for a core on a loaded host, and 400 steps of a 1024-wide model
        # once took more than the 20 s
        metrics = await honest.fit("toy", batch_size=64, steps=400, optimizer=optimizer)
        assert metrics["steps"] == 400
        with pytest.raises(fz.LimitExceeded):  # the hog ran out of its own time, as it should
            await long_fit


def _shard(seed: int) -> Dataset:
    x = torch.randn(48, 5, generator=torch.Generator().manual_seed(seed))
    return Dataset("d", x, (x[:, 0] > 0).long())


async def _evaluations_answered_after_a_secure_round_and_a_restart(ledger: str) -> int:
    """w0 keeps both counts in ``ledger`` under ``--max-evaluations 2``: two evaluations, one secure round
    (with w1 and w2), a restart, then evaluations until one is refused. Returns how many it answered."""
    config = fz.WorkerConfig(max_evaluations=2, evaluations_ledger=ledger, secagg_ledger=ledger)
    answered = 0

    async def evaluate(w0: fz.VirtualWorker, times: int) -> None:
        nonlocal answered
        remote = await w0.send(nn.Linear(5, 2))
        for _ in range(times):
            await remote.evaluate("d")
            answered += 1

    workers = [fz.VirtualWorker("w0", config=config, datasets={"d": _shard(0)}, settings=TEST_SETTINGS)]
    workers += [fz.VirtualWorker(f"w{i}", datasets={"d": _shard(i)}, settings=TEST_SETTINGS) for i in (1, 2)]
    try:
        await evaluate(workers[0], 2)
        fit = fz.FitConfig(dataset="d", optimizer={"cls": "SGD", "lr": 0.1}, epochs=1, batch_size=16)
        await fz.Federation(workers, nn.Linear(5, 2), fit, SecAgg(fz.FedAvg(), clip=100.0), seed=3).run_round()
    finally:
        for worker in workers:
            await worker.close()
    async with fz.VirtualWorker("w0", config=config, datasets={"d": _shard(0)}) as w0:  # the daemon restarted
        with pytest.raises(fz.PermissionDenied, match="--max-evaluations"):
            await evaluate(w0, 3)
    return answered


async def test_one_file_for_both_ledgers_is_refused_as_a_secure_round_reset_the_evaluations_counted(tmp_path):
    """``--secagg-ledger`` and ``--evaluations-ledger`` naming one file (the daemon's ledger, an operator would
    say): each ledger writes its own counts whole over the file, in the same format, so the secure round
    wrote its count of 1 over the 2 evaluations counted, and after a restart the data holder answered a third
    evaluation under ``--max-evaluations 2`` (the other way round, evaluations reset the secure rounds'
    count). One file for both is now refused as the worker is made."""
    try:
        answered = await _evaluations_answered_after_a_secure_round_and_a_restart(str(tmp_path / "ledger.json"))
    except LedgerError as refused:
        assert "--evaluations-ledger" in str(refused) and "--secagg-ledger" in str(refused)
        return
    assert answered <= 2, f"w0 answered {answered} evaluations under --max-evaluations 2"


async def test_a_command_waiting_for_the_generators_turn_holds_no_torch_thread(fedzmq_daemons, tmp_path):
    """A daemon with two torch threads: one session's dropout fit holds the generator's turn; another
    session's dropout op waits for it. It waited on a torch thread, so with both threads taken a third
    session's fit of a model that draws nothing waited for the first fit to end (up to
    ``--max-command-seconds``): two commands held the whole daemon. The wait is now an asyncio one, before
    a thread is taken."""
    x = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8) / 100
    data = write_dataset(tmp_path / "toy.safetensors", x, (x[:, 0] > 2).long())
    (bob,) = await fedzmq_daemons("bob", datasets={"bob": {"toy": data}},
                                  args=["--threads", "2", "--max-command-seconds", "10"])
    async with fz.connect(bob.address, settings=TEST_SETTINGS) as second, \
            fz.connect(bob.address, settings=TEST_SETTINGS) as third:
        hog = await bob.worker.send(_dropout_model())
        plain = await third.send(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
        ones = await second.send(torch.ones(4, 8))
        optimizer = {"cls": "SGD", "lr": 0.01}
        long_fit = asyncio.ensure_future(hog.fit("toy", batch_size=16, steps=500_000, optimizer=optimizer))
        await asyncio.sleep(0.5)  # it holds the generator's turn by now
        waiting_draw = asyncio.ensure_future(ones.dropout(0.5, True).get())
        await asyncio.sleep(0.5)  # the dropout op is waiting for the turn by now
        metrics = await plain.fit("toy", batch_size=16, steps=50, optimizer=optimizer)
        hog_ended_first = long_fit.done()
        assert metrics["steps"] == 50
        with pytest.raises(fz.LimitExceeded):
            await long_fit
        assert (await waiting_draw).shape == (4, 8)
        assert not hog_ended_first, "a fit that draws nothing waited for another session's dropout fit to end"
