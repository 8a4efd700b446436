"""Breaks found by h33's cold review of 1f587b6..ae70ef5: a local model's turn across workers
(fedzmq/client/turns.py), the daemon's turn of its random generator (fedzmq/worker/randomness.py), and the
owner's release ledgers (fedzmq/worker/ledger.py)."""

import asyncio

import pytest
import torch
from torch import nn

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
