"""Breaks found by h32: determinism across runs and resumption, and the caller's torch modes beside rounds
(docs/api.md: concurrent code gives exactly the results of the same code run sequentially; a round computes
in torch's default modes whatever modes its caller holds, and leaves later rounds as they would be; a
resumed run equals an uninterrupted one)."""

import asyncio
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.worker.datasets import Dataset

CONFIG = fz.WorkerConfig(min_batch_size=1, min_metric_rows=1, shuffle_secret="fixed")

STRATEGIES: dict[str, Callable[[], fz.Strategy]] = {
    "FedAvgM": lambda: fz.FedAvgM(server_momentum=0.9),
    "FedAdam": fz.FedAdam,
    "SecAgg(FedAdam)": lambda: fz.SecAgg(fz.FedAdam()),
}


def _data(seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48 + 16 * seed, 6, generator=g)
    return Dataset("toy", x, x[:, :3].argmax(1))


def _workers() -> list[fz.VirtualWorker]:
    return [fz.VirtualWorker(f"w{i}", config=CONFIG, datasets={"toy": _data(i)}) for i in range(4)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _federation(workers: list[fz.VirtualWorker], model: nn.Module, strategy: fz.Strategy,
                checkpoint_dir: Path) -> fz.Federation:
    return fz.Federation(workers, model, fz.FitConfig(dataset="toy", epochs=1, batch_size=16), strategy,
                         seed=5, round_timeout=60, checkpoint_dir=str(checkpoint_dir))


async def _hold_inference_mode(held: asyncio.Event, done: asyncio.Event) -> None:
    """A neighbour: evaluates something of its own in inference mode, holding it across its awaits."""
    with torch.inference_mode():
        held.set()
        await done.wait()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(STRATEGIES))
async def test_a_federation_resumed_while_a_neighbour_holds_inference_mode_runs_its_later_rounds(name, tmp_path):
    """A run of two rounds, then a new ``Federation`` on its checkpoint made (the model built before) while
    another coroutine holds ``torch.inference_mode()`` across an await, run to four rounds. The resume
    loads the strategy's server state (momentum, moments) in the caller's modes, so they become inference
    tensors, and every later round fails at its commit: "Inplace update to inference tensor outside
    InferenceMode". Uninterrupted, the same four rounds give a model; resumed, they must give it too."""
    workers = _workers()
    try:
        straight = _federation(workers, _model(), STRATEGIES[name](), tmp_path / "straight")
        await straight.run(4)
        first = _federation(workers, _model(), STRATEGIES[name](), tmp_path / "resumed")
        await first.run(2)
        model = _model()
        held, done = asyncio.Event(), asyncio.Event()
        neighbour = asyncio.ensure_future(_hold_inference_mode(held, done))
        await held.wait()
        try:
            resumed = _federation(workers, model, STRATEGIES[name](), tmp_path / "resumed")
        finally:
            done.set()
            await neighbour
        assert resumed.resumed_from == 2
        await resumed.run(4)
    finally:
        await asyncio.gather(*(w.close() for w in workers))
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def _rows(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = _data(seed)
    return data.features, data.labels


def _secure_federations(workers: list) -> list[fz.Federation]:
    """Two secure federations of their own models over the same workers (the same sessions)."""
    made = []
    for seed, inner in ((1, fz.FedAvg()), (2, fz.FedAdam())):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        made.append(fz.Federation(workers, model, fz.FitConfig(dataset="toy", epochs=1, batch_size=16),
                                  fz.SecAgg(inner), seed=seed, round_timeout=60))
    return made


@pytest.mark.timeout(180)
async def test_two_secure_federations_over_the_same_daemons_at_once_equal_one_after_the_other(fedzmq_daemons,
                                                                                              tmp_path):
    """``SecAgg(FedAvg())`` and ``SecAgg(FedAdam())`` federations of two models over the same three daemons:
    run one after the other, each trains its two rounds; run at once (``gather(a.run(2), b.run(2))``),
    round 1 of both failed (``RoundFailed``: "the relayed keys do not include this client's own keys
    unchanged", "round 1 masks module 2, not 1"). A daemon's session keeps its secure rounds by the
    federation's round number (``fedzmq/worker/secure.py``), so the two federations' round 1 overwrite each
    other's keys and module on every worker. Two plain federations over the same workers at once already
    equal the sequential runs (tests/test_cancel_rounds.py); secure ones must too."""
    from fedzmq.testing import write_dataset

    ids = ["w0", "w1", "w2"]
    paths = {w: {"toy": write_dataset(tmp_path / f"{w}.safetensors", *_rows(i))} for i, w in enumerate(ids)}
    handles = await fedzmq_daemons(*ids, datasets=paths, args=["--shuffle-secret", "fixed"])
    workers = [h.worker for h in handles]
    sequential = _secure_federations(workers)
    for federation in sequential:
        await federation.run(2)
    concurrent = _secure_federations(workers)
    await asyncio.gather(*(federation.run(2) for federation in concurrent))
    for one, other in zip(sequential, concurrent):
        assert [m.participants for m in other.history] == [m.participants for m in one.history]
        for key, value in one.model.state_dict().items():
            assert torch.equal(other.model.state_dict()[key], value), key


async def _secure_bytes_held(cancel_after: int | None) -> list[tuple[int, int]]:
    """What each worker holds (objects, bytes) after three secure rounds, round 2 first cancelled after
    ``cancel_after`` passes of the event loop and run again (None: never cancelled)."""
    workers = _workers()
    try:
        federation = fz.Federation(workers, _model(), fz.FitConfig(dataset="toy", epochs=1, batch_size=16),
                                   fz.SecAgg(fz.FedAvg()), seed=5, round_timeout=60)
        await federation.run_round()
        if cancel_after is not None:
            task = asyncio.ensure_future(federation.run_round())
            for _ in range(cancel_after):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        while federation.round < 3:
            await federation.run_round()
        return [(status["objects"], status["bytes"]) for status in [await w.status() for w in workers]]
    finally:
        await asyncio.gather(*(w.close() for w in workers))


@pytest.mark.timeout(120)
async def test_a_secure_round_cancelled_and_run_again_holds_no_more_than_one_never_cancelled():
    """Secure rounds go by a number of their own on each session (so that two federations' round 1 are two
    rounds); a round cancelled and run again must go by the same one, so that its session replaces the
    cancelled round's state, copy of the model included, instead of holding it until it ages out."""
    uninterrupted = await _secure_bytes_held(None)
    for passes in (200, 1500):
        assert await _secure_bytes_held(passes) == uninterrupted, passes


async def _two_federations_sharing_one_secure_strategy(concurrent: bool) -> list[dict[str, torch.Tensor]]:
    """Two federations of their own models over the same in-process workers, given one ``SecAgg(FedAvg())``
    (stateless: FedAvg keeps nothing between rounds), run one after the other or at once."""
    workers = _workers()
    strategy = fz.SecAgg(fz.FedAvg())
    try:
        federations = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
            federations.append(fz.Federation(workers, model, fz.FitConfig(dataset="toy", epochs=1, batch_size=16),
                                             strategy, seed=seed, round_timeout=60))
        if concurrent:
            await asyncio.gather(*(federation.run(2) for federation in federations))
        else:
            for federation in federations:
                await federation.run(2)
        return [{k: v.clone() for k, v in f.model.state_dict().items()} for f in federations]
    finally:
        await asyncio.gather(*(w.close() for w in workers))


@pytest.mark.timeout(120)
async def test_two_federations_sharing_one_secure_strategy_at_once_equal_one_after_the_other():
    """The number a secure round goes by on a session is kept per federation, not per strategy object: two
    federations given the same ``SecAgg(FedAvg())`` at once are two rounds on each session, as two
    federations with a strategy each are."""
    sequential = await _two_federations_sharing_one_secure_strategy(concurrent=False)
    concurrent = await _two_federations_sharing_one_secure_strategy(concurrent=True)
    for one, other in zip(sequential, concurrent):
        for key, value in one.items():
            assert torch.equal(other[key], value), key
