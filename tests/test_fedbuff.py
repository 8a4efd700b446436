"""FedBuff (buffered asynchronous aggregation): the buffer's arithmetic by hand, a federation's publications
against a hand computation from its own per-update records, slow workers, checkpoint/resume, real daemons."""

import math
import time
from typing import Any

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.examples import digits
from fedzmq.federated import checkpoint
from fedzmq.worker.datasets import Dataset


def test_fresh_updates_are_the_mean_move_times_the_server_learning_rate() -> None:
    g = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])}
    updates = [({"w": torch.tensor([2.0, 2.0]), "n": torch.tensor([5])}, 10),
               ({"w": torch.tensor([1.0, 6.0]), "n": torch.tensor([4])}, 30)]   # sample counts do not weigh
    new = fz.FedBuff(buffer_size=2, server_learning_rate=0.5).aggregate(1, g, updates)
    assert new["w"].tolist() == [1.0 + 0.5 * (1.0 + 0.0) / 2, 2.0 + 0.5 * (0.0 + 4.0) / 2]
    assert new["n"].tolist() == [5] and g["w"].tolist() == [1.0, 2.0]


def test_stale_updates_are_weighed_by_one_over_root_one_plus_staleness() -> None:
    v0, v2 = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}
    strategy = fz.FedBuff(buffer_size=2, server_learning_rate=0.8)
    buffer = strategy.begin_round(3, v2)
    old = buffer.receive_stale(v0, staleness=2)          # trained from version 0, two versions ago
    old.add_slice("w", 0, torch.tensor([2.0]))
    old.add_slice("w", 1, torch.tensor([0.0]))
    old.end()
    fresh = buffer.receive(7)
    fresh.add_slice("w", 0, torch.tensor([1.0, 3.0]))
    fresh.end()
    assert buffer.weights == [1 / math.sqrt(3), 1.0]
    expected = [1.0 + 0.8 * ((2.0 - 0.0) / math.sqrt(3) + 0.0) / 2, 1.0 + 0.8 * (0.0 + 2.0) / 2]
    torch.testing.assert_close(buffer.result()["w"], torch.tensor(expected))
    assert fz.FedBuff(staleness="constant").weight(9) == 1.0
    assert fz.FedBuff(staleness=lambda s: 1 / (1 + s)).weight(3) == 0.25
    for bad in ({"buffer_size": 0}, {"staleness": "linear"}, {"server_learning_rate": 0.0}, {"max_staleness": -1}):
        with pytest.raises(ValueError):
            fz.FedBuff(**bad)


def _workers(n: int, **config: object) -> list[fz.VirtualWorker]:
    torch.manual_seed(0)
    x = torch.randn(60 * n, 6)
    y = (x[:, 0] + x[:, 1] > 0).long()
    base = {"shuffle_secret": "s", "min_batch_size": 1, "min_metric_rows": 1, **config}
    return [fz.VirtualWorker(f"w{i}", config=fz.WorkerConfig(**base),  # type: ignore[arg-type]
                             datasets={"d": Dataset("d", x[60 * i:60 * i + 60], y[60 * i:60 * i + 60])})
            for i in range(n)]


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


FIT = fz.FitConfig(dataset="d", optimizer={"cls": "SGD", "lr": 0.1}, steps=3, batch_size=16)


@pytest.mark.timeout(300)
async def test_publications_equal_a_hand_computation_from_the_recorded_updates() -> None:
    """Every publication is w_(t-1) + lr/K * sum(s(t-1 - version_i) * (x_i - w_version_i)): each x_i redone
    by hand from the version and seed the update's record names (same worker, same shuffle secret)."""
    workers = _workers(4)
    try:
        model = _model()
        versions = [{k: v.clone() for k, v in model.state_dict().items()}]
        strategy = fz.FedBuff(buffer_size=2, server_learning_rate=0.7)
        federation = fz.Federation(workers, model, FIT, strategy, round_timeout=60)
        history = await federation.run(4, on_round=lambda m: versions.append(
            {k: v.clone() for k, v in model.state_dict().items()}))
        by_id = {w.id: w for w in workers}
        stale = 0
        for number, metrics in enumerate(history, start=1):
            updates = metrics.extra["updates"]
            assert len(updates) == 2 and metrics.extra["version"] == number
            total = {k: torch.zeros_like(v) for k, v in versions[number - 1].items()}
            for u in updates:
                assert u["staleness"] == number - 1 - u["version"] >= 0
                assert u["weight"] == pytest.approx(1 / math.sqrt(1 + u["staleness"]))
                stale += u["staleness"] > 0
                again = _model()
                again.load_state_dict(versions[u["version"]])
                remote = await by_id[u["worker"]].send(again)
                await remote.fit("d", optimizer={"cls": "SGD", "lr": 0.1}, steps=3, batch_size=16, seed=u["seed"])
                await remote.get()
                for k, v in again.state_dict().items():
                    total[k] += u["weight"] * (v - versions[u["version"]][k])
            expected = {k: versions[number - 1][k] + 0.7 * total[k] / 2 for k in total}
            fz.testing.assert_state_dicts_close(versions[number], expected, atol=1e-6)
        assert stale > 0  # four workers dispatched on version 0, two updates per publication: some arrive late
    finally:
        for worker in workers:
            await worker.close()


@pytest.mark.timeout(300)
async def test_a_slow_worker_does_not_hold_back_publication() -> None:
    workers = _workers(4, fault_injection=True)
    slow = workers[3]
    try:
        await slow.request("debug_delay", {"seconds": 30.0}, timeout=10.0)
        federation = fz.Federation(workers, _model(), FIT, fz.FedBuff(buffer_size=3), round_timeout=60)
        history = await federation.run(3)
        assert [m.round for m in history] == [1, 2, 3]
        contributors = {u["worker"] for m in history for u in m.extra["updates"]}
        # published three times without the slow worker's update. Which of the three fast ones fill the
        # buffers is their race (FedBuff promises no turns): under load w1 and w2 once made all nine updates
        # before w0's first arrived (red team h37: 2 of 15 runs), and this asked for all three
        assert contributors and contributors <= {"w0", "w1", "w2"}
        assert all(len(m.extra["updates"]) == 3 for m in history)
    finally:
        await slow.request("debug_delay", {"seconds": 0.0}, timeout=10.0)
        for worker in workers:
            await worker.close()


@pytest.mark.timeout(300)
async def test_checkpoint_and_resume(tmp_path) -> None:
    workers = _workers(3)
    try:
        first = fz.Federation(workers, _model(), FIT, fz.FedBuff(buffer_size=2), checkpoint_dir=str(tmp_path))
        await first.run(2)
        saved = {k: v.clone() for k, v in first.model.state_dict().items()}
        strategy = fz.FedBuff(buffer_size=2)
        again = fz.Federation(workers, _model(), FIT, strategy, checkpoint_dir=str(tmp_path))
        assert again.resumed_from == 2 and again.round == 2 and strategy.state_dict()["version"] == 2
        fz.testing.assert_state_dicts_close(again.model, saved, atol=0)
        history = await again.run(4)
        assert [m.round for m in history] == [1, 2, 3, 4]
        assert history[0].extra["updates"][0]["version"] == 0
        assert all(u["version"] >= 2 for m in history[2:] for u in m.extra["updates"])
        assert strategy.state_dict()["version"] == 4
    finally:
        for worker in workers:
            await worker.close()


@pytest.mark.fedzmq_slow
@pytest.mark.timeout(300)
async def test_checkpoint_and_resume_on_daemons_with_a_new_coordinator(fedzmq_daemons, tmp_path) -> None:
    """test_checkpoint_and_resume on real daemons: the first coordinator publishes twice and goes away (its
    trips stopped, its connections closed); a second one, over fresh connections, resumes from the
    checkpoint with the model and version saved there, and its publications train from version 2 on."""
    ids = ["w0", "w1", "w2"]
    torch.manual_seed(0)
    x = torch.randn(60 * len(ids), 6)
    y = (x[:, 0] + x[:, 1] > 0).long()
    files = {i: fz.testing.write_dataset(tmp_path / f"{i}.safetensors", x[60 * n:60 * n + 60], y[60 * n:60 * n + 60])
             for n, i in enumerate(ids)}
    handles = await fedzmq_daemons(*ids, datasets={i: {"d": str(files[i])} for i in ids}, timeout=120)
    checkpoints = str(tmp_path / "checkpoints")

    async def coordinator(strategy: fz.FedBuff, rounds: int) -> tuple[Any, dict[str, torch.Tensor], list[Any]]:
        """A coordinator over fresh connections: where it started (resumed from, round, strategy version), its
        model then, and its run's history. It goes away when the run returns."""
        workers = [await fz.connect(h.address) for h in handles]
        try:
            federation = fz.Federation(workers, _model(), FIT, strategy, checkpoint_dir=checkpoints, round_timeout=60)
            start = (federation.resumed_from, federation.round, strategy.state_dict()["version"])
            model = {k: v.clone() for k, v in federation.model.state_dict().items()}
            return start, model, await federation.run(rounds)
        finally:
            for worker in workers:
                await worker.close()

    start, _, first = await coordinator(fz.FedBuff(buffer_size=2), 2)
    assert start == (None, 0, 0) and [m.round for m in first] == [1, 2]
    saved = checkpoint.load_latest(checkpoints)
    assert saved is not None and saved.round == 2 and saved.strategy == {"strategy": "fedbuff", "version": 2}
    strategy = fz.FedBuff(buffer_size=2)
    start, model, history = await coordinator(strategy, 4)
    assert start == (2, 2, 2)
    fz.testing.assert_state_dicts_close(model, saved.model, atol=0)
    assert [m.round for m in history] == [1, 2, 3, 4]
    assert history[0].extra["updates"][0]["version"] == 0
    assert all(len(m.extra["updates"]) == 2 and m.extra["version"] == m.round for m in history)
    assert all(u["version"] >= 2 for m in history[2:] for u in m.extra["updates"])
    assert strategy.state_dict()["version"] == 4


@pytest.mark.fedzmq_slow
@pytest.mark.timeout(600)
async def test_fedbuff_on_daemons_a_slow_daemons_update_arrives_stale_and_discounted(fedzmq_daemons, tmp_path) -> None:
    ids = ["bob", "alice", "carol"]
    split = digits.prepare(tmp_path / "data", ids, alpha=1.0, seed=2)
    handles = await fedzmq_daemons(*ids, datasets={i: {"digits": str(split.shards[i])} for i in ids}, timeout=300)
    carol = handles[2]
    await carol.slow(3.0)  # every command of carol waits 3 s: bob and alice publish meanwhile
    model = digits.make_model()
    fit = fz.FitConfig(dataset="digits", optimizer={"cls": "SGD", "lr": 0.1}, epochs=1, batch_size=32)
    federation = fz.Federation([h.worker for h in handles], model, fit, fz.FedBuff(buffer_size=2),
                               round_timeout=120, evaluate=lambda m: digits.evaluate(m, *split.test))
    try:
        seen_carol = None
        give_up = time.monotonic() + 300  # carol's trip takes several 3 s commands; on an idle machine the
        while seen_carol is None and time.monotonic() < give_up:  # others publish hundreds of times meanwhile
            metrics = await federation.run_round()
            assert len(metrics.extra["updates"]) == 2
            seen_carol = next((u for u in metrics.extra["updates"] if u["worker"] == "carol"), None)
    finally:
        await federation.close()
    assert seen_carol is not None
    assert federation.history[0].extra["updates"] and "carol" not in {
        u["worker"] for u in federation.history[0].extra["updates"]}
    assert seen_carol["staleness"] >= 1
    assert seen_carol["weight"] == pytest.approx(1 / math.sqrt(1 + seen_carol["staleness"]))
    assert federation.history[-1].eval_accuracy is not None


@pytest.mark.timeout(300)
async def test_a_failed_worker_is_left_out_and_a_round_without_a_publication_fails() -> None:
    workers = _workers(3)
    try:
        await workers[2].close()  # its trips fail at once
        model = _model()
        federation = fz.Federation(workers, model, FIT, fz.FedBuff(buffer_size=2), round_timeout=60)
        metrics = await federation.run_round()
        assert {u["worker"] for u in metrics.extra["updates"]} <= {"w0", "w1"} and "w2" in metrics.dropped
        await federation.close()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        lonely = fz.Federation(workers[2:], model, FIT, fz.FedBuff(buffer_size=2), round_timeout=60)
        with pytest.raises(fz.RoundFailed, match="0 of the 1 required"):
            await lonely.run(1)
        fz.testing.assert_state_dicts_close(model, before, atol=0)
        assert lonely.round == 0
    finally:
        for worker in workers[:2]:
            await worker.close()
