"""h43: outcomes that depended on a lucky random draw.

A secure federation under Poisson sampling ended its run with ``RoundFailed`` when the OS's draw took one
worker: ``SecAgg`` said it could aggregate a round of one update (the default ``min_updates``), so the
federation ran the round instead of skipping it, and secure aggregation aborted at once ("1 participants:
secure aggregation needs at least 2"). At 20 workers and ``fraction=0.1`` a round draws one worker with
probability 0.27: 5 of 5 ten-round runs failed so. The draw is unseedable by design (DP's amplification
needs a hidden draw), so the test below makes the draw of one certain: two workers, one of them gone, and
``fraction=1.0``."""

import asyncio
import subprocess
import sys

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.testing import write_dataset
from fedzmq.testing.plugin import TEST_SETTINGS
from fedzmq.worker.datasets import Dataset

pytestmark = pytest.mark.timeout(60)

FIT = fz.FitConfig(dataset="d", optimizer={"cls": "SGD", "lr": 0.1}, steps=1, batch_size=16)


def _rows(seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=generator)
    return Dataset("d", x, (x[:, 0] > 0).long())


def _workers(n: int) -> list[fz.VirtualWorker]:
    return [fz.VirtualWorker(f"w{i}", datasets={"d": _rows(i)}, settings=TEST_SETTINGS,
                             config=fz.WorkerConfig(min_batch_size=1, min_metric_rows=1, secagg_min_clients=2))
            for i in range(n)]


def test_secure_aggregation_needs_two_updates_or_its_fixed_threshold():
    assert fz.SecAgg(fz.FedAvg()).min_updates == 2
    assert fz.SecAgg(fz.FedAvg(), threshold=3).min_updates == 3
    worker = fz.RemoteWorker("tcp://127.0.0.1:9")  # never connected: the federation is refused when made
    with pytest.raises(ValueError, match="needs at least 2 updates a round; this federation takes 1"):
        fz.Federation([worker], nn.Linear(5, 2), FIT, fz.SecAgg(fz.FedAvg(), clip=10.0))


async def test_a_poisson_draw_of_one_worker_is_a_skipped_secure_round_not_the_end_of_the_run():
    alive, gone = workers = _workers(2)
    try:
        await gone.status()  # a request starts its heartbeats: the coordinator notices when they stop
        await gone.server.close()
        while gone.alive:  # missed heartbeats (TEST_SETTINGS: about 2 s); the test's timeout bounds the wait
            await asyncio.sleep(0.1)
        torch.manual_seed(0)
        model = nn.Linear(5, 2)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        federation = fz.Federation(workers, model, FIT, fz.SecAgg(fz.FedAvg(), clip=10.0), fraction=1.0,
                                   sampling="poisson")
        metrics = await federation.run_round()  # draws the one live worker: every draw, at fraction 1
        assert metrics.participants == [] and federation.round == 1
        assert "Poisson sampling drew 1 of 1 workers, fewer than the 2 a round needs" in metrics.extra["skipped"]
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        await asyncio.gather(*(w.close() for w in workers))


async def test_train_with_secure_aggregation_over_one_daemon_says_so_in_the_flags_words(fedzmq_daemons, tmp_path):
    """The federation now refuses, when made, a run that can never take 2 workers a round; ``fedzmq train``
    says why in one line (its first round used to fail with the same exit code) rather than a traceback."""
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    path = write_dataset(tmp_path / "d.safetensors", x, (x[:, 0] > 0).long())
    [owner] = await fedzmq_daemons("owner", args=["--data", f"d={path}"])
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "fedzmq", "train", "--worker", owner.address, "--dataset", "d", "--in-features", "4",
        "--classes", "2", "--rounds", "1", "--no-progress", "--secure-aggregation", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=50)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "secagg(fedavg) needs at least 2 workers a round; this run takes 1 of its 1 (--fraction 1" in done.stderr
