"""Breaks found by h37's cold review and red team of the session before it (03d057c..fdc0e8e): the generator's
turn, quotas, small fits on the event loop and the federation's rounds, attacked by a hostile coordinator
with an allowed key."""

import asyncio

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.testing.plugin import TEST_SETTINGS
from shards import write_shards

pytestmark = pytest.mark.timeout(120)

FEATURES = 8


def _model(dropout: bool = False) -> nn.Module:
    torch.manual_seed(0)
    middle = [nn.Dropout(0.5)] if dropout else []
    return nn.Sequential(nn.Linear(FEATURES, 8), *middle, nn.Linear(8, 2))


async def test_the_generators_holder_does_not_wait_behind_its_own_keys_queued_work(fedzmq_daemons, tmp_path):
    """A command that may draw takes the generator's turn (``FairTurn``) and then, holding it, waits for a torch
    thread (``FairPool``) behind its own key's work queued there before it. One key's hosted clients (one
    connection, seven sessions) queue six fits that run to ``--max-command-seconds`` on a daemon of one thread,
    then a dropout op: it takes the free turn and waits behind the key's six fits, and another key's dropout
    op, sent after it, waited for all six (the turn holder's whole queue, where ``FairPool`` promises one
    piece of each other key's work). The holder's work now goes first in its key's queue: the other key waits
    for the fit running, the holder's op, and at most two more fits of that key (one takes the thread as the
    turn passes on, one is that key's turn in the pool)."""
    write_shards(tmp_path / "shards", "abcdefg", FEATURES, 37)
    (host,) = await fedzmq_daemons("owner", args=["--clients-from", f"d={tmp_path / 'shards'}", "--threads", "1",
                                                  "--max-command-seconds", "2"])
    hosted = sorted(await fz.connect_clients(host.address, settings=TEST_SETTINGS), key=lambda w: w.id)
    try:
        async with fz.connect(host.address, settings=TEST_SETTINGS) as other:  # another coordinator
            ones = await other.send(torch.ones(4, FEATURES))
            mine = await hosted[6].send(torch.ones(4, FEATURES))
            models = [await worker.send(_model()) for worker in hosted[:6]]
            optimizer = {"cls": "SGD", "lr": 0.01}
            hogs = [asyncio.ensure_future(m.fit("d", batch_size=16, steps=500_000, optimizer=optimizer))
                    for m in models]
            await asyncio.sleep(0.5)  # one fit runs, five wait for the thread
            holder = asyncio.ensure_future(mine.dropout(0.5, True).get())
            await asyncio.sleep(0.5)  # it holds the generator's turn, waiting for the thread
            assert not any(h.done() for h in hogs)
            drawn = await ones.dropout(0.5, True).get()
            ended_before = sum(h.done() for h in hogs)
            results = await asyncio.gather(*hogs, return_exceptions=True)
            assert all(isinstance(r, fz.LimitExceeded) for r in results), results
            assert drawn.shape == (4, FEATURES) and (await holder).shape == (4, FEATURES)
            assert ended_before <= 3, f"another key's dropout op waited for {ended_before} fits of one key"
    finally:
        for worker in hosted:
            await worker.close()



async def test_torch_work_whose_waiter_is_closed_unawaited_leaves_the_queue():
    """A command the pump started at once (``eager.start``) and that waits for a torch thread is closed where it
    waits when its session's queue is refused (a revoked key: ``eager.Started.close``, GeneratorExit). The
    generator's turn gives itself up then (h36); ``FairPool.run`` took its work out of the queue only when
    cancelled, so the closed command's work stayed queued, holding its binding (the session's objects and
    the request, uncharged once the session ended) until its key's turn came, and then took a thread."""
    import threading

    from fedzmq.eager import Started, start
    from fedzmq.worker.fairpool import FairPool

    pool, busy, ran = FairPool(1, "h37"), threading.Event(), []
    try:
        running = asyncio.ensure_future(pool.run("a", busy.wait, 30))
        await asyncio.sleep(0)
        closed = start(pool.run("b", ran.append, "closed"))  # waits for the one thread, as an eager command does
        assert isinstance(closed, Started) and pool.has_waiting("b")
        closed.close()
        assert not pool.has_waiting("b"), "the closed command's work is still queued"
        busy.set()
        await asyncio.wait_for(running, 10)
        await asyncio.wait_for(pool.run("c", ran.append, "next"), 10)
        assert ran == ["next"]
    finally:
        busy.set()
        pool.shutdown()


async def test_torch_work_leaves_the_queue_by_identity_not_by_comparing_its_tensors():
    """``TakeTurns.remove`` found a cancelled (or closed) waiter's work with ``deque.remove``, which compares it
    with each piece of its key's work queued before it: a job is a tuple of the function, its arguments and a
    future, and arguments holding tensors (a ``Binding`` is a dataclass: equal requests, whose ids a client
    picks, compare their arguments' tensors) made the comparison raise ``RuntimeError`` (a tensor's truth value
    is ambiguous): the cancellation turned into that error, and the work stayed queued. It is found by identity."""
    import threading

    from fedzmq.eager import Started, start
    from fedzmq.worker.fairpool import FairPool

    pool, busy, ran = FairPool(1, "h37"), threading.Event(), []

    def record(tensor: torch.Tensor) -> None:
        ran.append(int(tensor.sum()))

    try:
        running = asyncio.ensure_future(pool.run("a", busy.wait, 30))
        await asyncio.sleep(0)
        first = asyncio.ensure_future(pool.run("a", record, torch.ones(3)))
        cancelled = asyncio.ensure_future(pool.run("a", record, torch.zeros(3)))
        await asyncio.sleep(0)
        closed = start(pool.run("a", record, torch.full((3,), 2.0)))
        assert isinstance(closed, Started)
        closed.close()
        cancelled.cancel()
        outcome = (await asyncio.gather(cancelled, return_exceptions=True))[0]
        assert isinstance(outcome, asyncio.CancelledError), repr(outcome)
        busy.set()
        await asyncio.wait_for(asyncio.gather(running, first), 10)
        await asyncio.wait_for(pool.run("a", record, torch.ones(4)), 10)
        assert ran == [3, 4]
    finally:
        busy.set()
        pool.shutdown()


class _Buffered(nn.Module):
    """A small layer and a 4 MiB buffer its forward never reads: a fit's ``load`` of the buffer is 4 MiB."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(FEATURES, 2)
        self.register_buffer("big", torch.zeros(1 << 20))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


async def test_a_running_commands_request_counts_against_its_sessions_quota_until_it_ends():
    """A command's request counts in its session's quota until its own charge (``Quota.starting``, h36); its
    arguments stay in memory until it ends, though: a fit's ``load`` (4 MiB) is held by the request for the
    whole fit, up to ``--max-command-seconds``. Meanwhile the session's next request was measured against a
    room that left the load out: a 7.5 MiB send beside the 4 MiB model and the running fit's 4 MiB load was
    taken in, 15.5 MiB in memory for a quota of 12 MiB (twice the quota, with a load of half of it)."""
    from fedzmq.worker.config import WorkerConfig
    from fedzmq.worker.datasets import Dataset

    g = torch.Generator().manual_seed(37)
    data = Dataset("d", torch.randn(64, FEATURES, generator=g), torch.randint(0, 2, (64,), generator=g))
    config = WorkerConfig(min_batch_size=8, max_session_bytes=12 << 20, max_command_seconds=3)
    async with fz.VirtualWorker("w", datasets={"d": data}, config=config) as worker:
        remote = await worker.send(_Buffered())
        fit = {"module": remote.id, "dataset": "d", "loss": "cross_entropy", "batch_size": 16, "steps": 500_000,
               "optimizer": {"cls": "SGD", "lr": 0.1}, "load": {"big": torch.ones(1 << 20)}}
        running = asyncio.ensure_future(worker.request("fit", fit))
        await asyncio.sleep(1.0)  # charged, and training on a torch thread
        assert not running.done()
        with pytest.raises(fz.LimitExceeded, match="--max-session-bytes"):
            await worker.send(torch.ones(15 << 17))  # 7.5 MiB
        with pytest.raises(fz.LimitExceeded, match="ran longer"):
            await running
        await worker.send(torch.ones(15 << 17))  # once the fit ended, it fits


@pytest.mark.parametrize(("line", "says"), [("rounds = 3.0", "--rounds must be an integer, got 3.0"),
                                            ("seed = 1e300", "--seed must be an integer, got 1e+300")])
def test_a_config_files_float_for_an_integer_flag_is_quoted_as_written(tmp_path, capsys, line, says):
    """A --config file's float for an integer flag is refused (h35), but the message printed it as an integer
    when it had no fraction: ``rounds = 3.0`` said "--rounds must be an integer, got 3" (the user's 3.0 looks
    like a mistake of fedzmq's), and ``seed = 1e300`` printed 301 digits."""
    from fedzmq.cli import main as fz_cli_main

    (tmp_path / "run.toml").write_text(line + "\n")
    code = fz_cli_main(["train", "--config", str(tmp_path / "run.toml"), "--worker", "tcp://127.0.0.1:9",
                        "--dataset", "d", "--in-features", "2", "--classes", "2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and says in err, err
