"""Many logical clients on one daemon (``--clients-from``): each its own id, dataset and session,
addressed with the same Federation code as separate daemons."""


import pytest
import torch

import fedzmq as fz
from fedzmq.examples import digits
from fedzmq.testing.plugin import TEST_SETTINGS

CLIENTS = 12


@pytest.fixture
def client_shards(tmp_path):
    """Two folders of digit shards: one per daemon, client ids distinct across them."""
    folders = []
    for d in range(2):
        ids = [f"d{d}-client{i:03d}" for i in range(CLIENTS // 2)]
        split = digits.prepare(tmp_path / f"daemon{d}", ids, alpha=1.0, seed=d)
        folders.append(tmp_path / f"daemon{d}")
    return folders, split.test


async def _clients_reading_few_values(address):
    """Workers for a daemon's hosted clients on a connection that decodes at most 64 values a message."""
    import dataclasses

    settings = dataclasses.replace(TEST_SETTINGS, limits=fz.Limits(max_items=64))
    return await fz.connect_clients(address, settings=settings)


async def _everyone_delivers(workers, model, strategy):
    """One round over ``workers``: every one of them takes part and none is left out."""
    federation = fz.Federation(workers, model, fz.FitConfig(dataset="digits", steps=1, batch_size=16), strategy,
                               round_timeout=120)
    metrics = await federation.run_round()
    assert sorted(metrics.participants) == sorted(w.id for w in workers) and not metrics.dropped


async def _clients(handles):
    workers = []
    for handle in handles:
        workers += await fz.connect_clients(handle.address, settings=TEST_SETTINGS)
    return workers


async def test_each_hosted_client_is_a_worker_with_its_own_data_and_session(fedzmq_daemons, client_shards):
    folders, _ = client_shards
    [host] = await fedzmq_daemons("sim", args=["--clients-from", f"digits={folders[0]}"])
    workers = await _clients([host])
    try:
        assert sorted(w.id for w in workers) == [f"d0-client{i:03d}" for i in range(CLIENTS // 2)]
        sizes = set()
        for worker in workers:
            [ds] = await worker.datasets()
            assert ds.name == "digits" and ds.info["policy"] == "protected"
            sizes.add(ds.samples)
        assert len(sizes) > 1  # each its own shard
        first, second = workers[:2]
        kept = await first.send(torch.arange(3.0))
        assert torch.equal(await kept.get(), torch.arange(3.0))
        with pytest.raises(fz.ObjectNotFound):  # sessions are apart: another client's ids are not there
            await second.request("get", {"obj": kept.id})
        assert (await host.worker.status())["clients"] == CLIENTS // 2
    finally:
        for worker in workers:
            await worker.close()


async def test_a_folder_alone_names_the_clients_dataset_after_itself(fedzmq_daemons, client_shards):
    """``--clients-from shards/`` (the folder alone, as issue 17 writes it): each client's dataset is named
    after the folder, ``shards``."""
    import shutil

    folders, _ = client_shards
    shards = folders[0].parent / "shards"
    shutil.copytree(folders[0], shards)
    [host] = await fedzmq_daemons("sim", args=["--clients-from", f"{shards}/"])
    workers = await _clients([host])
    try:
        assert sorted(w.id for w in workers) == [f"d0-client{i:03d}" for i in range(CLIENTS // 2)]
        for worker in workers:
            [ds] = await worker.datasets()
            assert ds.name == "shards" and ds.info["policy"] == "protected"
    finally:
        for worker in workers:
            await worker.close()


def test_a_clients_folder_that_is_not_there_is_a_clear_error(tmp_path):
    from fedzmq.worker.datasets import DatasetError, load_clients

    with pytest.raises(DatasetError, match="not a folder"):
        load_clients([str(tmp_path / "missing")])
    with pytest.raises(DatasetError, match="not a folder"):
        load_clients([f"digits={tmp_path / 'missing'}"])


async def test_connect_to_one_hosted_client_by_name(fedzmq_daemons, client_shards):
    """``fz.connect(address, client=...)``: one hosted client's worker, alone on its connection; a name the
    daemon does not host is ``ObjectNotFound`` and leaves no connection open."""
    folders, _ = client_shards
    [host] = await fedzmq_daemons("sim", args=["--clients-from", f"digits={folders[0]}"])
    everyone = await _clients([host])
    try:
        sizes = {w.id: (await w.datasets())[0].samples for w in everyone}
    finally:
        for worker in everyone:
            await worker.close()
    async with fz.connect(host.address, client="d0-client002", settings=TEST_SETTINGS) as worker:
        assert worker.id == worker.client == "d0-client002" and worker.host is not worker
        [ds] = await worker.datasets()
        assert ds.name == "digits" and ds.samples == sizes["d0-client002"]
        kept = await worker.send(torch.arange(4.0))
        assert torch.equal(await kept.get(), torch.arange(4.0))
    assert worker.host._connection.closed
    with pytest.raises(fz.ObjectNotFound, match="no-such-client"):
        await fz.connect(host.address, client="no-such-client", settings=TEST_SETTINGS)
    assert (await host.worker.status())["sessions"] <= 1  # only the fixture's own connection


@pytest.mark.parametrize("strategy", [fz.FedAvg, fz.FedMedian], ids=["combined-on-the-daemon", "one-by-one"])
async def test_a_federation_over_hosted_clients_equals_one_over_the_same_updates(fedzmq_daemons, client_shards,
                                                                                 strategy):
    """Two daemons hosting six clients each: a round is one trip per daemon. With FedAvg the daemons combine
    their clients' updates exactly; the model is the same as aggregate() of the clients' own updates."""
    folders, test = client_shards
    handles = await fedzmq_daemons("sim0", "sim1", args={
        "sim0": ["--clients-from", f"digits={folders[0]}"], "sim1": ["--clients-from", f"digits={folders[1]}"]})
    workers = await _clients(handles)
    try:
        model = digits.make_model(seed=0)
        config = fz.FitConfig(dataset="digits", steps=2, batch_size=16)
        federation = fz.Federation(workers, model, config, strategy(), fraction=0.5, seed=3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        metrics = await federation.run_round()
        assert len(metrics.selected) == CLIENTS // 2 and metrics.participants == metrics.selected
        assert not metrics.dropped and not metrics.unreachable
        # the same clients trained one by one give the same updates: aggregate them here
        reference = []
        for worker in workers:
            if worker.id in metrics.participants:
                copy = digits.make_model(seed=0)
                copy.load_state_dict(before)
                remote = await worker.send(copy)
                update = await remote.fit_and_fetch("digits", steps=2, batch_size=16, seed=3 * 100_003 + 1,
                                                    optimizer=dict(config.optimizer))
                state = {k: torch.empty_like(v) for k, v in before.items()}
                async for name, start, values in update.pieces:
                    state[name].view(-1)[start:start + values.numel()].copy_(values)
                reference.append((state, update.metrics["num_examples"]))
        expected = strategy().aggregate(1, before, reference)
        for name, value in model.state_dict().items():
            assert torch.allclose(value, expected[name], atol=1e-6), name
    finally:
        for worker in workers:
            await worker.close()


async def test_a_hosted_client_that_cannot_train_is_left_out_with_why(fedzmq_daemons, client_shards):
    from safetensors.torch import load_file

    folders, _ = client_shards
    sizes = {path.stem: len(load_file(str(path))["y"]) for path in folders[0].glob("*.safetensors")}
    minimum = sorted(sizes.values())[len(sizes) // 2]  # a minimum batch larger than half the clients' shards
    [host] = await fedzmq_daemons("sim", args=["--clients-from", f"digits={folders[0]}",
                                               "--min-batch-size", str(minimum)])
    workers = await _clients([host])
    try:
        small = sorted(c for c, n in sizes.items() if n < minimum)
        assert small and len(small) < len(workers), sizes
        federation = fz.Federation(workers, digits.make_model(), fz.FitConfig(dataset="digits", steps=1,
                                                                             batch_size=minimum))
        metrics = await federation.run_round()
        assert sorted(metrics.dropped) == small
        assert all("PermissionDenied" in why for why in metrics.dropped.values())
        assert sorted(metrics.participants) == sorted(set(sizes) - set(small))
    finally:
        for worker in workers:
            await worker.close()


async def test_a_fit_over_many_failing_clients_writes_one_warning_not_one_per_client(fedzmq_daemons, client_shards):
    """A red team's note: a fit naming one hosted client and 2,000 unknown ones wrote a warning with a
    traceback per failed client, 1.1 MB of the daemon's log in 0.2 s from one small request. Each client
    that fails is still answered in the reply (its error); the log gets one line for the command."""
    folders, _ = client_shards
    [host] = await fedzmq_daemons("sim", args=["--clients-from", f"digits={folders[0]}"])
    worker = host.worker
    model = await worker.send(torch.nn.Linear(64, 10))
    before = host.process.log_path.stat().st_size
    names = ["d0-client000"] + [f"nobody{i}" for i in range(500)]
    reply = await worker.request("fit", {"module": model.id, "dataset": "digits", "loss": "cross_entropy",
                                         "batch_size": 16, "steps": 1, "optimizer": {"cls": "SGD", "lr": 0.1},
                                         "reply_state": True, "clients": names, "combine": True})
    assert reply["weight"] > 0 and len(reply["metrics"]) == 501
    assert all("error" in reply["metrics"][name] for name in names[1:])
    log = host.process.log_path.read_bytes()[before:].decode()
    assert len(log) < 2000, f"one request grew the daemon's log by {len(log)} bytes"
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "501 hosted clients: 500 failed" in warnings[0], log


async def test_a_round_over_hosted_clients_splits_what_one_reply_could_not_carry(fedzmq_daemons, client_shards):
    """The clients a daemon hosts go in as few trips as their replies allow: each brought back on its
    own (FedMedian) with a model of 600 entries, six clients were 3,600 tensors and more values in one
    reply than a message may hold (``Limits.max_items``), and the round failed with the reply undecodable;
    a simulation of 3,000 clients on one daemon failed so with FedAvg (seven values per client)."""
    from torch import nn

    from fedzmq.federated.protocols import clients_per_trip

    folders, _ = client_shards
    [host] = await fedzmq_daemons("sim", args=["--clients-from", f"digits={folders[0]}"])
    workers = await _clients([host])
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 4), *(nn.Linear(4, 4) for _ in range(298)), nn.Linear(4, 10))
        entries = len(model.state_dict())
        assert entries == 600 and clients_per_trip(entries, combine=False) < len(workers)
        await _everyone_delivers(workers, model, fz.FedMedian())
    finally:
        for worker in workers:
            await worker.close()


async def test_trips_are_sized_to_the_limits_the_connection_agreed_on(fedzmq_daemons, client_shards):
    """A coordinator that decodes fewer values per message (``Limits.max_items``) than the defaults gets
    smaller trips: sized from the default limits, six clients' states went in one trip whose reply it
    could not decode, and the round failed."""
    from fedzmq.federated.protocols import clients_per_trip

    folders, _ = client_shards
    [host] = await fedzmq_daemons("sim", args=["--clients-from", f"digits={folders[0]}"])
    workers = await _clients_reading_few_values(host.address)
    try:
        assert workers[0].limits.max_items == 64
        assert clients_per_trip(2, combine=False, limits=workers[0].limits) < len(workers) \
            <= clients_per_trip(2, combine=False)
        await _everyone_delivers(workers, torch.nn.Linear(64, 10), fz.FedMedian())
    finally:
        for worker in workers:
            await worker.close()


async def test_a_fit_over_more_clients_than_a_reply_can_carry_is_refused_before_it_is_sent(fedzmq_daemons,
                                                                                             client_shards):
    """``fit_clients`` by hand over more clients than one reply may carry says so and sends nothing: the
    reply would be past the connection's limits, undecodable, and the connection dropped."""
    from fedzmq.client.broadcast import Broadcast

    folders, _ = client_shards
    [host] = await fedzmq_daemons("sim", args=["--clients-from", f"digits={folders[0]}"])
    workers = await _clients_reading_few_values(host.address)
    try:
        model = torch.nn.Linear(64, 10)
        pointer = await workers[0].host.send(model)
        names = [w.client for w in workers]
        sent = workers[0].host.bytes_sent
        with pytest.raises(ValueError, match="more than one reply can carry"):
            await pointer.fit_clients(names, "digits", combine=False, load=Broadcast(model.state_dict()), steps=1,
                                      batch_size=16)
        assert workers[0].host.bytes_sent == sent
        reply = await pointer.fit_clients(names[:1], "digits", combine=False, load=Broadcast(model.state_dict()),
                                          steps=1, batch_size=16)
        assert list(reply["metrics"]) == names[:1] and await workers[0].host.ping()
    finally:
        for worker in workers:
            await worker.close()


class _SecondSumRefused(fz.FedAvg):
    """FedAvg whose round refuses the second combined update it is handed (the second trip's)."""

    def begin_round(self, number, state):
        aggregator = super().begin_round(number, state)
        take, handed = aggregator.receive_sum, []

        def receive_sum(weight, count):
            handed.append(count)
            if len(handed) == 2:
                raise ValueError("the second trip's sum is refused")
            return take(weight, count)

        aggregator.receive_sum = receive_sum
        return aggregator


async def test_a_failed_later_trip_leaves_out_only_its_own_clients(fedzmq_daemons, client_shards):
    """Clients whose trip delivered stay in the round when a later trip to the same daemon fails; the
    clients of the failed trip and of the trips after it are left out, with why."""
    from fedzmq.federated.protocols import clients_per_trip

    folders, _ = client_shards
    [host] = await fedzmq_daemons("sim", args=["--clients-from", f"digits={folders[0]}"])
    workers = await _clients_reading_few_values(host.address)
    try:
        per_trip = clients_per_trip(2, combine=True, limits=workers[0].limits)
        assert 2 * per_trip < len(workers)  # three trips or more: the second fails, the third never goes
        federation = fz.Federation(workers, torch.nn.Linear(64, 10),
                                   fz.FitConfig(dataset="digits", steps=1, batch_size=16), _SecondSumRefused(),
                                   round_timeout=120)
        metrics = await federation.run_round()
        assert sorted(metrics.participants) == sorted(w.id for w in workers[:per_trip])
        assert sorted(metrics.dropped) == sorted(w.id for w in workers[per_trip:])
        assert all("the second trip's sum is refused" in why for why in metrics.dropped.values()), metrics.dropped
    finally:
        for worker in workers:
            await worker.close()


def test_a_failed_rounds_message_is_short_whatever_the_number_of_workers():
    dropped = {f"client{i:04d}": "WorkerError: the reply was lost" for i in range(3000)}
    dropped["other"] = "RequestTimeout: past the round's deadline"
    message = str(fz.RoundFailed(4, 0, 1, dropped))
    assert len(message) < 400, message
    assert "client0000, client0001, client0002 and 2997 more: WorkerError" in message and "other: Request" in message
    assert len(fz.RoundFailed(4, 0, 1, dropped).dropped) == 3001
