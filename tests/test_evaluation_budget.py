"""``--max-evaluations``: how many evaluations each data holder of a daemon answers.

Each ``evaluate`` releases a sum over rows of per-row terms, and a coordinator chooses the model, so it
chooses the question: counting queries by bisection read rows' values (a red team, h31, read a whole
8-feature protected row in 12 evaluations under the default terms). The owner caps the evaluations per
data holder, across sessions and connections, as ``--secagg-max-rounds`` caps secure rounds."""

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.testing import write_dataset
from fedzmq.worker.datasets import Dataset

pytestmark = pytest.mark.timeout(120)


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    return x, (x[:, 0] > 0).long()


async def test_a_daemon_answers_at_most_max_evaluations_per_data_holder_across_connections(fedzmq_daemons,
                                                                                           tmp_path):
    path = write_dataset(tmp_path / "rows.safetensors", *_rows())
    [bob] = await fedzmq_daemons("bob", datasets={"bob": {"rows": path}}, args=["--max-evaluations", "2"])
    model = nn.Linear(4, 2)
    first = await bob.worker.send(model)
    assert (await first.evaluate("rows"))["samples"] == 64
    async with fz.connect(bob.address) as other:  # another session, another connection: the same holder
        second = await other.send(model)
        await second.evaluate("rows")
        with pytest.raises(fz.PermissionDenied, match="--max-evaluations"):
            await second.evaluate("rows")
    with pytest.raises(fz.PermissionDenied, match="2 evaluations per data holder"):
        await first.evaluate("rows")
    assert (await first.fit("rows", steps=1, batch_size=16))["steps"] == 1  # training goes on


async def test_an_in_process_workers_evaluations_are_counted_too():
    config = fz.WorkerConfig(max_evaluations=1)
    async with fz.VirtualWorker("bob", config=config, datasets={"rows": Dataset("rows", *_rows())}) as bob:
        remote = await bob.send(nn.Linear(4, 2))
        await remote.evaluate("rows")
        with pytest.raises(fz.PermissionDenied, match="--max-evaluations"):
            await remote.evaluate("rows")


async def test_without_the_flag_evaluations_are_not_limited():
    async with fz.VirtualWorker("bob", datasets={"rows": Dataset("rows", *_rows())}) as bob:
        remote = await bob.send(nn.Linear(4, 2))
        for _ in range(5):
            await remote.evaluate("rows")


def test_a_daemon_requiring_secure_aggregation_without_a_noise_floor_says_what_that_leaves_open():
    """h31: under --require-secure-aggregation with the default terms, a coordinator that fits the other
    participants with lr 0 reads one client's update from a secure round (a strict xfail in
    tests/test_redteam_h31.py); the operator is told at start-up, with the flags that bound it."""
    from fedzmq.worker.config import WorkerConfig
    from fedzmq.worker.daemon import terms_warnings

    open_terms = terms_warnings(WorkerConfig(require_secure_aggregation=True))
    assert any("--secagg-min-noise" in w for w in open_terms)
    assert any("--secagg-max-rounds" in w for w in open_terms)
    assert not terms_warnings(WorkerConfig(require_secure_aggregation=True, secagg_min_noise=1.0,
                                           secagg_max_rounds=50))
    assert not terms_warnings(WorkerConfig())


async def test_the_daemon_logs_those_warnings_at_start(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob", args=["--require-secure-aggregation"])
    assert "WARNING" in bob.log_tail() and "--secagg-min-noise" in bob.log_tail()


async def test_an_evaluations_ledger_keeps_the_counts_across_restarts(tmp_path):
    ledger = tmp_path / "evaluations.json"
    config = fz.WorkerConfig(max_evaluations=1, evaluations_ledger=str(ledger))
    datasets = {"rows": Dataset("rows", *_rows())}
    async with fz.VirtualWorker("bob", config=config, datasets=datasets) as bob:
        await (await bob.send(nn.Linear(4, 2))).evaluate("rows")
    async with fz.VirtualWorker("bob", config=config, datasets=datasets) as bob:  # the daemon restarted
        with pytest.raises(fz.PermissionDenied, match="--max-evaluations"):
            await (await bob.send(nn.Linear(4, 2))).evaluate("rows")
