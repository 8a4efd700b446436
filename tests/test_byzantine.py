"""A hostile participant (``fedzmq-worker --fault-injection --byzantine ...``): refused unless asked for twice,
exact in what it sends, and, over eight real daemons on digits, what robust aggregation is for."""

import subprocess
import sys

import pytest
import torch

import fedzmq as fz
from fedzmq.examples import byzantine, digits
from fedzmq.worker.byzantine import ByzantineConfigError, parse_attack
from fedzmq.worker.datasets import Dataset


def test_hostile_setting_is_off_by_default_and_refused_without_fault_injection() -> None:
    assert fz.WorkerConfig().byzantine is None
    with pytest.raises(ByzantineConfigError, match="needs --fault-injection"):
        fz.WorkerConfig(byzantine="sign-flip")
    for bad in ("flip", "scale=", "scale=nan", "scale=inf", "scale=two"):
        with pytest.raises(ByzantineConfigError, match="sign-flip' or 'scale=K'"):
            fz.WorkerConfig(byzantine=bad, fault_injection=True)
    assert parse_attack("sign-flip").factor == -1.0 and parse_attack("scale=-10").factor == -10.0
    assert fz.WorkerConfig(byzantine="scale=2.5", fault_injection=True).byzantine == "scale=2.5"


@pytest.mark.timeout(60)
def test_daemon_refuses_byzantine_without_fault_injection() -> None:
    done = subprocess.run([sys.executable, "-m", "fedzmq.worker", "--id", "mallory", "--bind", "tcp://127.0.0.1:0",
                           "--byzantine", "sign-flip"], capture_output=True, text=True, timeout=50)
    assert done.returncode == 1
    assert "ByzantineConfigError" in done.stderr and "--fault-injection" in done.stderr
    assert "ready" not in done.stdout


@pytest.mark.parametrize("attack, factor", [("sign-flip", -1.0), ("scale=-3", -3.0), ("scale=10", 10.0)])
async def test_hostile_worker_returns_exactly_the_distorted_update(attack: str, factor: float) -> None:
    """Same data, same shuffle secret, same seed: the hostile worker's update is g + factor * (honest - g)."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    data = {"d": Dataset("d", x, y)}
    honest = fz.VirtualWorker("honest", config=fz.WorkerConfig(shuffle_secret="s"), datasets=data)
    hostile = fz.VirtualWorker("hostile", config=fz.WorkerConfig(shuffle_secret="s", fault_injection=True,
                                                                 byzantine=attack), datasets=data)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        start = {k: v.clone() for k, v in model.state_dict().items()}
        states = []
        for worker in (honest, hostile):
            remote = await worker.send(model)
            update = await remote.fit_and_fetch("d", optimizer={"cls": "SGD", "lr": 0.1}, epochs=2, batch_size=16,
                                                seed=7, load=start)
            states.append({name: values.clone().view_as(start[name]) async for name, _, values in update.pieces})
        trained, sent = states
        assert any((trained[k] - start[k]).abs().max() > 1e-3 for k in start)  # it did train
        for k, g in start.items():
            torch.testing.assert_close(sent[k], g + factor * (trained[k] - g),
                                       atol=1e-6, rtol=1e-5)
    finally:
        await honest.close()
        await hostile.close()


@pytest.mark.fedzmq_slow
@pytest.mark.timeout(900)
async def test_fedavg_collapses_and_robust_rules_hold_against_a_hostile_daemon(fedzmq_daemons, tmp_path) -> None:
    """Digits over eight daemons, the eighth sending its move times -10 every round: FedAvg collapses;
    Krum, Bulyan, FedMedian and FedTrimmedAvg end within 3 points of FedAvg with the eighth daemon honest."""
    split = byzantine.prepare(tmp_path / "data")
    hostile = "mallory"
    datasets = {owner: {"digits": str(split.shards[owner])} for owner in byzantine.OWNERS}
    datasets[hostile] = {"digits": str(split.shards[byzantine.ATTACKER])}
    common = ["--shuffle-secret", "byzantine-test", "--min-batch-size", "16"]
    args = {name: common for name in datasets}
    args[hostile] = [*common, "--byzantine", "scale=-10"]
    handles = {h.id: h for h in await fedzmq_daemons(*datasets, datasets=datasets, args=args, timeout=600)}
    honest_run = await byzantine.run([handles[o].worker for o in byzantine.OWNERS], split, "FedAvg", "none",
                                     byzantine.ROUNDS)
    attacked = [handles[o].worker for o in byzantine.HONEST] + [handles[hostile].worker]
    results = {s: await byzantine.run(attacked, split, s, "scale=-10", byzantine.ROUNDS) for s in byzantine.STRATEGIES}
    table = byzantine.table([honest_run, *results.values()], honest_run.accuracy)
    assert honest_run.accuracy > 0.85, table
    assert results["FedAvg"].accuracy < 0.3, table  # collapsed: near chance for ten classes
    for strategy in ("Krum", "Bulyan", "FedMedian", "FedTrimmedAvg"):
        assert results[strategy].accuracy >= honest_run.accuracy - 0.03, table
    assert digits.DATASET == byzantine.FIT.dataset
