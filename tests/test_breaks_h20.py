"""Breaks found by h20: ordinary user code sharing one ``Federation`` (or one hosted model) between two
coroutines must give what the same code gives run one call after the other (docs/api.md: concurrent
code gives exactly the results of the same code run sequentially)."""

import asyncio
import gc
import warnings

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.worker.datasets import Dataset

CONFIG = fz.WorkerConfig(min_batch_size=1, min_metric_rows=1, shuffle_secret="fixed")


def _data(seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    return Dataset("toy", x, x[:, :3].argmax(1))


def _workers() -> list[fz.VirtualWorker]:
    return [fz.VirtualWorker(f"w{i}", config=CONFIG, datasets={"toy": _data(i)}) for i in range(3)]


def _federation(workers: list[fz.VirtualWorker], strategy: fz.Strategy) -> fz.Federation:
    torch.manual_seed(0)
    return fz.Federation(workers, nn.Linear(8, 3), fz.FitConfig(dataset="toy", steps=2, batch_size=16), strategy,
                         round_timeout=60, seed=1)


def _strategy(name: str) -> fz.Strategy:
    return {"fedavg": fz.FedAvg(), "fedadam": fz.FedAdam(), "cyclic": fz.Cyclic()}[name]


async def _two_rounds(name: str, concurrent: bool) -> tuple[fz.Federation, list[int]]:
    workers = _workers()
    try:
        async with _federation(workers, _strategy(name)) as federation:
            if concurrent:
                done = list(await asyncio.gather(federation.run_round(), federation.run_round()))
            else:
                done = [await federation.run_round(), await federation.run_round()]
    finally:
        await asyncio.gather(*(w.close() for w in workers))
    return federation, [m.round for m in done]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["fedavg", "fedadam", "cyclic"])
async def test_two_concurrent_run_rounds_on_one_federation_are_two_rounds(name):
    """``gather(run_round(), run_round())`` on one federation: both read ``round`` before either
    recorded, so both ran as round 1 from the same model and the second commit overwrote the first
    (FedAdam's moments stepped twice for it): history [1, 1], ``round`` 1, another model."""
    sequential, seq_rounds = await _two_rounds(name, concurrent=False)
    concurrent, con_rounds = await _two_rounds(name, concurrent=True)
    assert seq_rounds == [1, 2]
    assert sorted(con_rounds) == [1, 2]
    assert concurrent.round == 2 and [m.round for m in concurrent.history] == [1, 2]
    for key, value in sequential.model.state_dict().items():
        assert torch.equal(concurrent.model.state_dict()[key], value), key


async def _round_beside(user_code, concurrent: bool) -> tuple[object, dict[str, torch.Tensor]]:
    """A first round, then ``user_code(worker 0, model)`` beside (or before) a second round, then a third."""
    workers = _workers()
    try:
        async with _federation(workers, fz.FedAvg()) as federation:
            await federation.run_round()
            if concurrent:
                _, seen = await asyncio.gather(federation.run_round(), user_code(workers[0], federation.model))
            else:
                seen = await user_code(workers[0], federation.model)
                await federation.run_round()
            await federation.run_round()
    finally:
        await asyncio.gather(*(w.close() for w in workers))
    return seen, {k: v.clone() for k, v in federation.model.state_dict().items()}


async def _evaluate_there(worker: fz.VirtualWorker, model: nn.Module) -> float:
    remote = await worker.send(model)
    return (await remote.evaluate("toy"))["loss"]


def _get_back_after(passes: int):
    async def get_back(worker: fz.VirtualWorker, model: nn.Module) -> None:
        for _ in range(passes):
            await asyncio.sleep(0)
        remote = await worker.send(model)
        await remote.get()

    return get_back


async def _global_models_beside_get(passes: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The global model before and after a round, and the model after a user's send+get of it beside that
    round (the get starting after ``passes`` passes of the event loop)."""
    workers = _workers()
    try:
        async with _federation(workers, fz.FedAvg()) as federation:
            await federation.run_round()
            before = {k: v.clone() for k, v in federation.model.state_dict().items()}
            committed: list[dict[str, torch.Tensor]] = []

            async def round_then_note() -> None:
                await federation.run_round()
                committed.append({k: v.clone() for k, v in federation.model.state_dict().items()})

            await asyncio.gather(round_then_note(), _get_back_after(passes)(workers[0], federation.model))
            return [before, committed[0]], {k: v.clone() for k, v in federation.model.state_dict().items()}
    finally:
        await asyncio.gather(*(w.close() for w in workers))


@pytest.mark.timeout(120)
async def test_send_then_get_of_the_federations_model_beside_a_round_brings_back_a_global_model():
    """``await (await worker.send(model)).get()`` sends the model and copies back what it sent. Beside a
    round, ``send`` returned the very remote copy the round trains (``RemoteWorker.hosted``), the round's
    fit landed between the send and the get, and the get wrote that worker's locally trained weights
    into the federation's global model: a model that was never the global one. (What the get brings back
    may be the model from before the round, written over the round's commit: that is the user's own
    read-then-write across an await.)"""
    strangers = []
    for passes in range(0, 12, 3):  # where the round's trip falls between the send and the get
        globals_seen, after = await _global_models_beside_get(passes)
        if not any(all(torch.equal(after[k], g[k]) for k in after) for g in globals_seen):
            strangers.append(passes)
    assert not strangers, f"a get after {strangers} passes of the event loop brought back a model never global"


@pytest.mark.timeout(120)
async def test_send_then_evaluate_of_the_federations_model_beside_a_round_evaluates_that_model():
    """``evaluate`` after ``send(model)`` evaluates the model sent (before a round: the old global model;
    after: the new one). Beside a round it evaluated a third model: the worker's own locally trained
    weights, which the round's fit left in the remote copy it shares with the user's send."""
    before, _ = await _round_beside(_evaluate_there, concurrent=False)

    async def after_a_round(worker: fz.VirtualWorker, model: nn.Module) -> float:
        return await _evaluate_there(worker, model)

    workers = _workers()
    try:
        async with _federation(workers, fz.FedAvg()) as federation:
            await federation.run_round()
            await federation.run_round()
            after = await after_a_round(workers[0], federation.model)
    finally:
        await asyncio.gather(*(w.close() for w in workers))
    beside, _ = await _round_beside(_evaluate_there, concurrent=True)
    assert beside in (before, after)


async def _run_twice(name: str, concurrent: bool) -> tuple[fz.Federation, list[object]]:
    workers = _workers()
    strategy = fz.FedBuff(buffer_size=2) if name == "fedbuff" else _strategy(name)
    try:
        federation = _federation(workers, strategy)
        if concurrent:
            runs = list(await asyncio.gather(federation.run(3), federation.run(3), return_exceptions=True))
        else:
            runs = [await federation.run(3), await federation.run(3)]
    finally:
        await asyncio.gather(*(w.close() for w in workers))
    return federation, runs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["fedavg", "fedbuff"])
async def test_two_concurrent_runs_to_the_same_total_run_that_many_rounds(name):
    """``run(3)`` runs rounds until 3 are done *in total*; run twice in a row the second does nothing.
    Gathered, the two ran 4 rounds (each checked ``round < 3`` before waiting for the other's round; on
    main, 6 entries of history for rounds 1..3), and under FedBuff one run's ``close`` stopped the
    trips the other's round was waiting for (RoundFailed)."""
    sequential, seq_runs = await _run_twice(name, concurrent=False)
    concurrent, con_runs = await _run_twice(name, concurrent=True)
    assert [len(r) for r in seq_runs if isinstance(r, list)] == [3, 3]
    assert all(isinstance(r, list) for r in con_runs), con_runs
    assert concurrent.round == 3 and [m.round for m in concurrent.history] == [1, 2, 3]
    if name != "fedbuff":  # (FedBuff's updates fold in the order they arrive: not the same model twice)
        for key, value in sequential.model.state_dict().items():
            assert torch.equal(concurrent.model.state_dict()[key], value), key


@pytest.mark.timeout(60)
async def test_a_worker_listed_twice_is_refused_not_counted_twice():
    """``Federation([alice, alice, bob], ...)`` (a list built by hand, or two daemons with one id) was
    accepted: each round fitted alice twice and folded both updates, so her data weighed double in the
    model while ``participants`` listed her once. Bad input gets a clear error and loses nothing."""
    workers = _workers()
    try:
        with pytest.raises(ValueError, match="w0"):
            _federation([workers[0], workers[0], workers[1]], fz.FedAvg())
    finally:
        await asyncio.gather(*(w.close() for w in workers))


def _tensor_evaluate(model: nn.Module) -> dict[str, torch.Tensor]:
    """What many users write: torch's own 0-d tensors, no ``.item()``."""
    x = _data(99).features
    with torch.no_grad():
        logits = model(x)
    target = x[:, :3].argmax(1)
    return {"loss": nn.functional.cross_entropy(logits, target),
            "accuracy": (logits.argmax(1) == target).float().mean()}


@pytest.mark.timeout(60)
async def test_an_evaluate_returning_tensors_is_recorded_and_checkpointed(tmp_path):
    """``evaluate=`` returning 0-d tensors: the round committed, was put in ``history``, then the checkpoint's
    JSON could not take the tensors (TypeError: Object of type Tensor is not JSON serializable): ``round`` 1,
    no checkpoint, contrary to "federation.round, history and the checkpoint always agree"."""
    workers = _workers()
    try:
        torch.manual_seed(0)
        federation = fz.Federation(workers, nn.Linear(8, 3), fz.FitConfig(dataset="toy", steps=2, batch_size=16),
                                   evaluate=_tensor_evaluate, checkpoint_dir=str(tmp_path))
        metrics = await federation.run_round()
        expected = _tensor_evaluate(federation.model)
        assert metrics.eval_loss == expected["loss"].item() and isinstance(metrics.eval_loss, float)
        assert metrics.eval_accuracy == expected["accuracy"].item()
        resumed = fz.Federation(workers, nn.Linear(8, 3), fz.FitConfig(dataset="toy", steps=2, batch_size=16),
                                checkpoint_dir=str(tmp_path))
        assert resumed.round == federation.round == 1
    finally:
        await asyncio.gather(*(w.close() for w in workers))


@pytest.mark.timeout(60)
async def test_an_evaluate_returning_no_number_leaves_round_history_and_checkpoint_agreeing(tmp_path):
    """An ``evaluate`` whose result is no number (per-class accuracies, say) fails the round after its commit:
    the round must still be checkpointed (docs/api.md), and the error say that the evaluation's result is at
    fault (on main: the checkpoint's JSON TypeError, and no checkpoint)."""
    workers = _workers()
    try:
        torch.manual_seed(0)
        federation = fz.Federation(workers, nn.Linear(8, 3), fz.FitConfig(dataset="toy", steps=2, batch_size=16),
                                   evaluate=lambda model: {"loss": 0.5, "accuracy": torch.tensor([0.25, 0.75])},
                                   checkpoint_dir=str(tmp_path))
        with pytest.raises(TypeError, match="evaluate"):
            await federation.run_round()
        resumed = fz.Federation(workers, nn.Linear(8, 3), fz.FitConfig(dataset="toy", steps=2, batch_size=16),
                                checkpoint_dir=str(tmp_path))
        assert federation.round == len(federation.history) == resumed.round == 1
    finally:
        await asyncio.gather(*(w.close() for w in workers))


def _hosted_data() -> dict[str, dict[str, Dataset]]:
    out = {}
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(32, 4, generator=g)
        out[f"c{i}"] = {"toy": Dataset("toy", x, x[:, :2].argmax(1))}
    return out


@pytest.mark.timeout(60)
async def test_a_closed_hosted_client_is_left_out_of_later_rounds_as_a_closed_worker_is():
    """A worker closed while a federation still lists it is left out of the next round with
    ``WorkerClosedError`` (its commands are refused). A hosted client closed the same way went on being
    trained and counted: the round trains its host's clients in one trip through the host's session,
    which never asked whether the client's own worker was closed."""
    host = fz.Worker("host", config=CONFIG, clients=_hosted_data())
    address = host.bind("tcp://127.0.0.1:0")
    host.start()
    try:
        clients = await fz.connect_clients(address)
        try:
            torch.manual_seed(0)
            federation = fz.Federation(clients, nn.Linear(4, 2), fz.FitConfig(dataset="toy", batch_size=8), seed=1)
            await federation.run_round()
            closed = next(c for c in clients if c.id == "c0")
            await closed.close()
            metrics = await federation.run_round()
            assert "c0" not in metrics.participants
            assert "WorkerClosedError" in metrics.dropped.get("c0", "")
        finally:
            await asyncio.gather(*(c.close() for c in clients))
    finally:
        await host.close()


@pytest.mark.parametrize("strategy, hint", [(fz.FedAvg, r"fz\.FedAvg\(\)"), (fz.Krum, r"fz\.Krum\(\)"),
                                            ("fedavg", r"make_strategy\('fedavg'\)")])
@pytest.mark.timeout(30)
async def test_a_strategy_class_or_name_instead_of_a_strategy_is_a_clear_error(strategy, hint):
    """``fz.Federation(workers, model, fit, fz.FedAvg)`` (the class, not an instance) raised
    ``TypeError: '<' not supported between instances of 'int' and 'property'``, and a name
    ``AttributeError: 'str' object has no attribute 'min_updates'``: neither says what is wrong."""
    workers = _workers()
    try:
        with pytest.raises(TypeError, match=hint):
            fz.Federation(workers, nn.Linear(8, 3), fz.FitConfig(dataset="toy"), strategy)
    finally:
        await asyncio.gather(*(w.close() for w in workers))


async def _connect_cancelled_before_it_ran(address: str) -> None:
    """A connect made a task and cancelled before it ran; nothing of it is kept (no traceback either)."""
    task = asyncio.create_task(fz.connect(address))
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()


@pytest.mark.timeout(60)
async def test_connect_can_be_made_a_task_and_a_task_cancelled_before_it_ran_leaves_no_socket():
    """``asyncio.create_task(fz.connect(address))`` (or a TaskGroup's: how one connects to many daemons at
    once) raised ``TypeError: a coroutine was expected, got <...Connecting object>``, and the socket the
    ``Connecting`` had opened was left to the garbage collector (``ResourceWarning: Unclosed socket``)."""
    host = fz.Worker("h20-connect", config=CONFIG)
    address = host.bind("tcp://127.0.0.1:0")
    host.start()
    try:
        worker = await asyncio.create_task(fz.connect(address))
        assert worker.id == "h20-connect"
        await worker.close()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await _connect_cancelled_before_it_ran(address)
            gc.collect()
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    finally:
        await host.close()


@pytest.mark.timeout(60)
async def test_a_remote_optimizer_of_a_model_a_federation_also_trains_steps_the_users_copy():
    """A guard for the rounds' own remote copy (``remote_twin``), not a break of main: a remote optimizer
    finds its model on the worker by its parameters, so the rounds' copy must not hold the same
    ``Parameter`` objects, or the user's ``opt.step()`` could step the rounds' copy instead of theirs."""
    workers = _workers()
    try:
        torch.manual_seed(0)
        model = nn.Linear(8, 3)
        federation = fz.Federation(workers, model, fz.FitConfig(dataset="toy", steps=2, batch_size=16))
        await federation.run_round()  # (its copy is the first the worker lists)
        remote = await workers[0].send(model)
        sent = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = fz.Optims([workers[0]], optim=torch.optim.SGD(model.parameters(), lr=0.5)).get_optim(workers[0])
        await optimizer.zero_grad()
        x = await workers[0].send(torch.ones(4, 8))
        await remote(x).pow(2).mean().backward()
        await optimizer.step()
        await remote.get()
        assert not torch.equal(model.weight.detach(), sent["weight"])
    finally:
        await asyncio.gather(*(w.close() for w in workers))


@pytest.mark.timeout(180)
async def test_fedbuff_rounds_that_fail_min_workers_leave_nothing_in_the_next_model():
    """FedBuff with ``min_workers=2``, one fast worker and one slow: the fast one fills the buffer
    (``buffer_size=2``) alone, so the federation raises ``RoundFailed`` ("the model does not change";
    its message says "1 of the 2 required updates arrived (no participants)": 2 updates did, from one
    participant). But the protocol had sealed that publication and went on from it: the next buffers
    start from models never committed, and the round that finally commits publishes version 15, made of
    an update trained from version 14, i.e. of the fourteen publications the federation had refused."""
    fast = fz.VirtualWorker("fast", config=CONFIG, datasets={"toy": _data(0)})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 8, generator=g)
    slow = fz.VirtualWorker("slow", config=CONFIG, datasets={"toy": Dataset("toy", x, x[:, :3].argmax(1))})
    try:
        torch.manual_seed(0)
        async with fz.Federation([fast, slow], nn.Linear(8, 3), fz.FitConfig(dataset="toy", epochs=1, batch_size=16),
                                 fz.FedBuff(buffer_size=2), min_workers=2, round_timeout=60) as federation:
            failures: list[str] = []
            for _ in range(400):
                try:
                    metrics = await federation.run_round()
                    break
                except fz.RoundFailed as exc:
                    failures.append(str(exc))
            else:
                pytest.fail("no round committed")
        assert metrics.extra["version"] == metrics.round == 1
        assert all(update["version"] == 0 for update in metrics.extra["updates"]), metrics.extra["updates"]
        assert not any("no participants" in f for f in failures), failures[:1]
    finally:
        await asyncio.gather(fast.close(), slow.close())
