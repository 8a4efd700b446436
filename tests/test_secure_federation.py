"""Secure aggregation and DP wired into the workers and the scheduler (issue 5); the protocol's own
properties (masked vectors uncorrelated with updates, drop-outs, thresholds) are in test_secagg_core."""

import asyncio
import math

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.federated.secure import SecAgg
from fedzmq.testing.plugin import TEST_SETTINGS
from fedzmq.worker.datasets import Dataset


def _shards(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(60 * n, 5, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long()
    sizes = [40 + 10 * i for i in range(n)]  # unequal: sample weights matter
    shards, start = [], 0
    for size in sizes:
        shards.append(Dataset("d", x[start:start + size], y[start:start + size]))
        start += size
    return shards


def _workers(n, **config):
    return [fz.VirtualWorker(f"w{i}", datasets={"d": shard}, settings=TEST_SETTINGS,
                             config=fz.WorkerConfig(**config)) for i, shard in enumerate(_shards(n))]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))


FIT = fz.FitConfig(dataset="d", optimizer={"cls": "SGD", "lr": 0.1}, epochs=1, batch_size=16)


@pytest.mark.parametrize("n", [3, 4, 5])
async def test_secure_aggregate_equals_fedavg_within_the_quantization_error(n):
    workers = _workers(n)
    try:
        plain, secure = _model(), _model()
        plain_run = fz.Federation(workers, plain, FIT, fz.FedAvg(), seed=3)
        secure_run = fz.Federation(workers, secure, FIT, SecAgg(fz.FedAvg(), clip=100.0), seed=3)
        for _ in range(2):
            await plain_run.run_round()
            metrics = await secure_run.run_round()
            bound = metrics.extra["quantization_error_bound"]
            assert metrics.extra["secure_aggregation"] and sorted(metrics.participants) == [f"w{i}" for i in range(n)]
            for a, b in zip(plain.state_dict().values(), secure.state_dict().values()):
                assert (a - b).abs().max().item() <= bound + 1e-6
            secure.load_state_dict(plain.state_dict())  # the next round starts from the same model
    finally:
        for w in workers:
            await w.close()


async def _secure_round_beside_plain(honest, extra):
    """A plain FedAvg round over ``honest`` and a secure round (threshold 3) over ``honest`` and ``extra``,
    each from the same starting model: (the secure round's metrics, the plain model, the secure model).
    With ``extra`` dropped out, the two models agree within the quantization bound."""
    plain, secure = _model(), _model()
    await fz.Federation(honest, plain, FIT, fz.FedAvg(), seed=1).run_round()
    federation = fz.Federation(honest + [extra], secure, FIT, SecAgg(fz.FedAvg(), clip=100.0, threshold=3),
                               seed=1, round_timeout=10)
    return await federation.run_round(), plain, secure


async def test_a_dead_worker_is_left_out_and_the_survivors_aggregate_is_exact():
    workers = _workers(4)
    try:
        await workers[3].server.close()  # dead before the round: never answers
        survivors = workers[:3]
        plain, secure = _model(), _model()
        await fz.Federation(survivors, plain, FIT, fz.FedAvg(), seed=1).run_round()
        federation = fz.Federation(workers, secure, FIT, SecAgg(fz.FedAvg(), clip=100.0, threshold=3), seed=1,
                                   round_timeout=5)
        metrics = await federation.run_round()
        assert "w3" in metrics.dropped and metrics.participants == ["w0", "w1", "w2"]
        fz.testing.assert_state_dicts_close(secure, plain, atol=metrics.extra["quantization_error_bound"] + 1e-6)
    finally:
        for w in workers[:3]:
            await w.close()


async def test_a_worker_whose_fit_fails_after_sharing_keys_drops_out_and_the_survivors_aggregate_is_exact():
    # keys and shares go round while the workers fit: a failed fit makes a drop-out after the
    # key-sharing step, whose masks the survivors' shares remove
    workers = _workers(3)
    [extra_shard] = _shards(1, seed=5)
    failing = fz.VirtualWorker("w3", datasets={"other": extra_shard}, settings=TEST_SETTINGS)  # no dataset "d"
    try:
        metrics, plain, secure = await _secure_round_beside_plain(workers, failing)
        assert "w3" in metrics.dropped and metrics.participants == ["w0", "w1", "w2"], metrics.dropped
        assert "dataset" in metrics.dropped["w3"], metrics.dropped  # the fit's own error, not a protocol failure
        assert metrics.extra["dropped_after_sharing"] == ["w3"]  # it shared keys; its masks were removed
        fz.testing.assert_state_dicts_close(secure, plain, atol=metrics.extra["quantization_error_bound"] + 1e-6)
    finally:
        for w in workers + [failing]:
            await w.close()


class _PeerRewritingOneStep(fz.VirtualWorker):
    """A real worker whose answer to one step of the secure round is rewritten on its way to the
    coordinator by ``rewrite``: an outdated or hostile peer, as the coordinator's ``SecAggServer`` sees it."""

    def __init__(self, worker_id, *, step, rewrite, **kwargs):
        super().__init__(worker_id, **kwargs)
        self.step, self.rewrite = step, rewrite

    def secagg(self, step, round_number, payload, **extra):
        answer = super().secagg(step, round_number, payload, **extra)
        if step != self.step:
            return answer

        async def rewritten():
            return self.rewrite(await answer)

        return asyncio.ensure_future(rewritten())


def _in_version_1(message):
    return {**message, "v": 1}


def _without_commitment(message):
    return {field: value for field, value in message.items() if field != "b_commit"}


@pytest.mark.parametrize("step, rewrite, why", [
    ("advertise", _in_version_1, "unsupported secagg message version 1"),
    ("share_keys", _in_version_1, "unsupported secagg message version 1"),
    ("share_keys", _without_commitment, "secagg.shares: missing fields ['b_commit']"),
], ids=["advertise-in-version-1", "shares-in-version-1", "shares-without-commitment"])
async def test_a_worker_whose_keys_or_shares_the_server_refuses_is_a_drop_out_not_the_end_of_the_round(
        step, rewrite, why):
    """The coordinator's ``SecAggServer`` refuses, with ``SecAggProtocolError``, an advertise or shares
    message that is malformed or of another protocol version (version 1 had no consistency check, and the
    two do not mix). One outdated or broken peer must not end the round for everyone: its sender is a
    drop-out with the refusal as its reason, and the survivors' aggregate is exact (its shares never
    went round, so the survivors never masked against it)."""
    shards = _shards(4)
    honest = [fz.VirtualWorker(f"w{i}", datasets={"d": shard}, settings=TEST_SETTINGS)
              for i, shard in enumerate(shards[:3])]
    outdated = _PeerRewritingOneStep("w3", step=step, rewrite=rewrite, datasets={"d": shards[3]},
                                     settings=TEST_SETTINGS)
    try:
        metrics, plain, secure = await _secure_round_beside_plain(honest, outdated)
        assert metrics.participants == ["w0", "w1", "w2"] and list(metrics.dropped) == ["w3"], metrics.dropped
        assert "SecAggProtocolError" in metrics.dropped["w3"] and why in metrics.dropped["w3"], metrics.dropped
        assert metrics.extra["survivors"] == ["w0", "w1", "w2"] and metrics.extra["dropped_after_sharing"] == []
        fz.testing.assert_state_dicts_close(secure, plain, atol=metrics.extra["quantization_error_bound"] + 1e-6)
    finally:
        for w in honest + [outdated]:
            await w.close()


async def test_below_the_threshold_the_round_fails_and_the_model_is_unchanged():
    workers = _workers(3)
    try:
        await workers[2].server.close()
        model = _model()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        federation = fz.Federation(workers, model, FIT, SecAgg(fz.FedAvg(), clip=100.0, threshold=3),
                                   round_timeout=5)
        with pytest.raises(fz.RoundFailed, match="secure aggregation"):
            await federation.run_round()
        fz.testing.assert_state_dicts_close(model, before, atol=0)
        assert federation.round == 0
    finally:
        for w in workers[:2]:
            await w.close()


async def test_dp_reports_epsilon_every_round_and_stops_at_the_target():
    pytest.importorskip("dp_accounting")
    workers = _workers(3)
    try:
        strategy = SecAgg(fz.FedAvg(), clip=1.0, noise_multiplier=2.0, target_epsilon=3.0)
        federation = fz.Federation(workers, _model(), FIT, strategy)
        history = await federation.run(50)
        epsilons = [m.epsilon for m in history]
        assert 0 < len(history) < 50 and federation.stopped_early
        assert all(a < b for a, b in zip(epsilons, epsilons[1:])) and epsilons[-1] <= 3.0
        assert '"epsilon"' in history[-1].to_json()
    finally:
        for w in workers:
            await w.close()


async def test_a_daemon_requiring_secure_aggregation_refuses_to_hand_out_its_trained_model():
    [shard] = _shards(1)
    async with fz.VirtualWorker("bob", datasets={"d": shard},
                                config=fz.WorkerConfig(require_secure_aggregation=True)) as bob:
        model = _model()
        remote = await bob.send(model)
        await remote.get()  # before training: just the model we sent
        await remote.fit("d")
        with pytest.raises(fz.PermissionDenied):
            await remote.get()


def test_secagg_refuses_strategies_that_do_not_aggregate_a_sum():
    with pytest.raises(ValueError, match="weighted sum"):
        SecAgg(fz.FedMedian())


async def test_workers_refuse_rounds_below_their_policy_and_weigh_by_their_own_sample_count():
    workers = _workers(2)  # the default policy needs at least 3 clients
    try:
        federation = fz.Federation(workers, _model(), FIT, SecAgg(fz.FedAvg(), clip=100.0, threshold=2),
                                   round_timeout=5)
        with pytest.raises(fz.RoundFailed, match="PermissionDenied|policy|threshold"):
            await federation.run_round()
    finally:
        for w in workers:
            await w.close()


async def test_gradients_of_private_data_taint_the_model_when_secure_aggregation_is_required():
    [shard] = _shards(1)
    shard.policy = "open"  # reachable through pointers: the route this test closes
    async with fz.VirtualWorker("bob", datasets={"d": shard},
                                config=fz.WorkerConfig(require_secure_aggregation=True,
                                                       private_release="none")) as bob:
        model = nn.Linear(5, 1)
        remote = await bob.send(model)
        [ds] = await bob.datasets()
        opt = fz.Optims([bob], optim=torch.optim.SGD(model.parameters(), lr=1.0)).get_optim(bob)
        await remote(await ds.features()).sum().backward()  # a memorizing model's gradient
        await opt.step()
        with pytest.raises(fz.PermissionDenied):
            await remote.get()


async def test_a_round_cannot_spread_the_owners_least_noise_over_survivors_it_will_not_need():
    """A red team's route: ``--secagg-min-noise`` was checked on the noise multiplier alone, but each
    worker adds ``sigma * C / sqrt(expected_survivors)`` and the coordinator chooses that count. A round
    of 65,536 invited ids expecting all of them to survive, with a threshold of 2, had a worker add 181x
    less noise than the owner's floor; the coordinator's own Sybils (its 4 neighbours) then unmasked its
    update nearly bare. The floor now holds for the smallest sum the round can release: ``threshold``
    survivors carry at least ``--secagg-min-noise`` between them."""
    from fedzmq.secagg import SecAggConfig

    [shard] = _shards(1)
    terms = fz.WorkerConfig(require_secure_aggregation=True, secagg_min_noise=1.0, secagg_allow_sparse=True)
    async with fz.VirtualWorker("bob", datasets={"d": shard}, config=terms) as bob:
        remote = await bob.send(_model())
        length = sum(p.numel() for p in _model().parameters())

        def config(expected, round_id, threshold=3, n=1 << 16):
            return SecAggConfig(client_ids=tuple(range(n)), threshold=threshold, vector_length=length, clip=1.0,
                                ring_bits=64, weight_cap=100.0, noise_multiplier=1.0, expected_survivors=expected,
                                degree=4, graph_seed=b"s" * 16, round_id=round_id)

        with pytest.raises(fz.PermissionDenied, match="noise"):
            await bob.secagg("advertise", 1, config(1 << 16, b"r1").to_wire(), module=remote.id, client=0)
        with pytest.raises(fz.PermissionDenied, match="noise"):  # one survivor past the threshold is too many
            await bob.secagg("advertise", 2, config(4, b"r2").to_wire(), module=remote.id, client=0)
        # the noise calibrated to the threshold (the default) meets the floor
        keys = await bob.secagg("advertise", 3, config(3, b"r3").to_wire(), module=remote.id, client=0)
        assert keys


@pytest.mark.parametrize("n, degree, threshold", [(4, None, 2), (10, None, 5), (64, 8, 4), (64, 8, 2)])
async def test_a_round_whose_threshold_is_no_majority_of_share_holders_is_refused(n, degree, threshold):
    """A red-team session's find: with ``threshold`` at most half of the workers holding a worker's
    shares (all ``n``, or its neighbourhood of ``degree + 1`` in SecAgg+), a coordinator that shows two
    halves different survivor sets gets ``threshold`` shares of one worker's self-mask seed from one half
    and of its mask key from the other, and removes every mask from its update. Over a daemon hosting
    four clients, n = 4 with threshold 2, it read one client's trained update to 8.6e-7 with no Sybil
    and every client's own checks passing. A worker now joins only a round whose threshold is a strict
    majority of its share holders: two disjoint sets of that size cannot exist."""
    from fedzmq.secagg import SecAggConfig

    [shard] = _shards(1)
    terms = fz.WorkerConfig(require_secure_aggregation=True, secagg_allow_sparse=True)
    async with fz.VirtualWorker("bob", datasets={"d": shard}, config=terms) as bob:
        remote = await bob.send(_model())
        length = sum(p.numel() for p in _model().parameters())

        def config(t, round_id):
            graph = {"degree": degree, "graph_seed": b"s" * 16} if degree else {}
            return SecAggConfig(client_ids=tuple(range(n)), threshold=t, vector_length=length, clip=1.0,
                                round_id=round_id, **graph)

        holders = n if degree is None else degree + 1
        with pytest.raises(fz.PermissionDenied, match="strict majority"):
            await bob.secagg("advertise", 1, config(threshold, b"r1").to_wire(), module=remote.id, client=0)
        assert 2 * threshold <= holders
        assert await bob.secagg("advertise", 2, config(holders // 2 + 1, b"r2").to_wire(), module=remote.id,
                                client=0)


async def test_a_worker_joins_secagg_plus_rounds_only_if_its_owner_allows_them():
    """SecAgg+ confirms survivor sets within neighbourhoods only; a red-team session unmasked one client of
    an honest-parameters round of 200 through views split across neighbourhoods (with the first version
    of the check). A worker joins sparse-graph rounds only with ``--secagg-allow-sparse``."""
    from fedzmq.secagg import SecAggConfig, choose_parameters

    [shard] = _shards(1)
    length = sum(p.numel() for p in _model().parameters())
    graph = choose_parameters(200)
    config = SecAggConfig(client_ids=tuple(range(200)), threshold=graph.threshold, vector_length=length, clip=1.0,
                          degree=graph.degree, graph_seed=b"g" * 16, round_id=b"sparse round one")
    for allow in (False, True):
        terms = fz.WorkerConfig(require_secure_aggregation=True, secagg_allow_sparse=allow)
        async with fz.VirtualWorker("bob", datasets={"d": shard}, config=terms) as bob:
            remote = await bob.send(_model())
            join = bob.secagg("advertise", 1, config.to_wire(), module=remote.id, client=0)
            if allow:
                assert await join
            else:
                with pytest.raises(fz.PermissionDenied, match="--secagg-allow-sparse"):
                    await join


async def test_an_owner_expecting_colluders_demands_a_threshold_that_holds_with_them():
    """A cold review's find: the strict-majority argument assumes no participant works with the
    coordinator. One that confirms every view it is shown counts in two groups at once; with n = 5,
    t = 3 and one such client the review unmasked another client alone. ``--secagg-colluders C``
    makes a worker demand 2t > share holders + C."""
    from fedzmq.secagg import SecAggConfig

    [shard] = _shards(1)
    length = sum(p.numel() for p in _model().parameters())
    terms = fz.WorkerConfig(require_secure_aggregation=True, secagg_colluders=1)
    async with fz.VirtualWorker("bob", datasets={"d": shard}, config=terms) as bob:
        remote = await bob.send(_model())

        def config(t: int, round_id: bytes) -> SecAggConfig:
            return SecAggConfig(client_ids=tuple(range(5)), threshold=t, vector_length=length, clip=1.0,
                                round_id=round_id)

        with pytest.raises(fz.PermissionDenied, match="1 of them working with the coordinator, at least 4"):
            await bob.secagg("advertise", 1, config(3, b"majority only").to_wire(), module=remote.id, client=0)
        assert await bob.secagg("advertise", 2, config(4, b"holds with one").to_wire(), module=remote.id,
                                client=0)


async def test_a_split_survivor_attack_on_hosted_clients_stops_at_the_first_step(fedzmq_daemons, tmp_path):
    """The red team's attack as it ran, on a real daemon hosting four clients with the owner's default
    terms: the coordinator's round of 4 with threshold 2 is refused by every client before any key is
    made (it went on to unmask client a's update)."""
    from fedzmq.secagg import SecAggConfig
    from fedzmq.testing.datasets import write_dataset

    folder = tmp_path / "shards"
    folder.mkdir()
    generator = torch.Generator().manual_seed(5)
    for name in "abcd":
        write_dataset(folder / f"{name}.safetensors", torch.randn(32, 5, generator=generator),
                      torch.randint(0, 2, (32,), generator=generator))
    [host] = await fedzmq_daemons("owner", args=["--clients-from", f"d={folder}", "--require-secure-aggregation"])
    workers = sorted(await fz.connect_clients(host.address, settings=TEST_SETTINGS), key=lambda w: w.id)
    try:
        length = sum(p.numel() for p in _model().parameters())
        config = SecAggConfig(client_ids=(0, 1, 2, 3), threshold=2, vector_length=length, clip=1e3,
                              weight_cap=1.0, noise_multiplier=0.0, round_id=b"split-survivors!")
        for i, worker in enumerate(workers):
            remote = await worker.send(_model())
            with pytest.raises(fz.PermissionDenied, match="strict majority"):
                await worker.secagg("advertise", 1, config.to_wire(), module=remote.id, client=i)
    finally:
        for worker in workers:
            await worker.close()


async def test_the_clipping_bits_count_against_the_owners_noise_floor():
    """A red-team session's find: a round with ``clip_bits`` and no noise on them passed a daemon's
    ``--secagg-min-noise 1.0``. With the other clients' updates known (zero), each round's count of
    unclipped clients was one exact bit about the worker's update norm for a clip C the coordinator
    chose: 18 rounds of bisection read the norm to 1.2e-5. The floor now holds for the two releases
    together, a Gaussian mechanism of multiplier ``(s**-2 + (2 s_b)**-2) ** -1/2`` at the threshold."""
    from fedzmq.secagg import SecAggConfig

    [shard] = _shards(1)
    async with fz.VirtualWorker("bob", datasets={"d": shard},
                                config=fz.WorkerConfig(require_secure_aggregation=True, secagg_min_noise=1.0)) as bob:
        remote = await bob.send(_model())
        length = sum(p.numel() for p in _model().parameters())

        def config(sigma, bit_noise, round_id):
            return SecAggConfig(client_ids=(0, 1, 2), threshold=2, vector_length=length, clip=1.0, weight_cap=1.0,
                                noise_multiplier=sigma, clip_bits=True, clip_bit_noise=bit_noise, round_id=round_id)

        for number, (sigma, bit_noise) in enumerate([(1.0, 0.0), (1.0, 100.0), (5.0, 0.4)], start=1):
            with pytest.raises(fz.PermissionDenied, match="clipping bits"):
                await bob.secagg("advertise", number, config(sigma, bit_noise, b"r%d" % number).to_wire(),
                                 module=remote.id, client=0)
        assert await bob.secagg("advertise", 9, config(1.5, 2.0, b"r9").to_wire(), module=remote.id, client=0)


async def test_secure_rounds_go_on_when_the_models_entries_are_streamed_in_pieces():
    """A cold review's find: entries too big for one message are streamed into the model piece by piece,
    which never overwrites them whole, so from the second round they kept the label of the last fit,
    and every fit was refused for what its loss would tell (the round failed). Such a fit now runs,
    its update leaves masked as always, and its loss is withheld (NaN), as every fit's over protected
    rows under secure aggregation now is."""
    limits = fz.Limits(chunk_bytes=4096)
    workers = [fz.VirtualWorker(f"w{i}", datasets={"d": shard}, settings=TEST_SETTINGS,
                                config=fz.WorkerConfig(require_secure_aggregation=True, limits=limits))
               for i, shard in enumerate(_shards(3))]
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 2048), nn.ReLU(), nn.Linear(2048, 2))  # a 40 KiB weight: streamed
        federation = fz.Federation(workers, model, FIT, SecAgg(fz.FedAvg(), clip=100.0), seed=3)
        for number in (1, 2, 3):
            metrics = await federation.run_round()
            assert len(metrics.participants) == 3 and not metrics.dropped, (number, metrics.dropped)
        small = fz.Federation(workers, _model(), FIT, SecAgg(fz.FedAvg(), clip=100.0), seed=3)
        for _ in (1, 2):
            metrics = await small.run_round()
        assert all(math.isnan(fit["loss"]) for fit in metrics.fits.values())  # withheld, loaded whole or not
    finally:
        for w in workers:
            await w.close()


async def test_a_worker_gives_its_masked_update_to_at_most_its_owners_number_of_rounds():
    """``--secagg-max-rounds``: a coordinator repeating secure rounds averages their noise away (the privacy
    loss grows with every round a worker's data takes part in). Each worker gives its masked update to at
    most that many rounds; the next one leaves it out with why, and the model stays as it was."""
    workers = _workers(3, require_secure_aggregation=True, secagg_max_rounds=2)
    try:
        model = _model()
        federation = fz.Federation(workers, model, FIT, SecAgg(fz.FedAvg(), clip=100.0), seed=3)
        for _ in range(2):
            metrics = await federation.run_round()
            assert sorted(metrics.participants) == ["w0", "w1", "w2"]
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(fz.RoundFailed) as failed:
            await federation.run_round()
        left_out = {name: why for name, why in failed.value.dropped.items() if name != "secure aggregation"}
        assert set(left_out) == {"w0", "w1", "w2"}
        assert all("limit of 2 secure rounds per data holder (--secagg-max-rounds)" in why
                   for why in left_out.values()), left_out
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        for w in workers:
            await w.close()


async def test_the_rounds_a_hosted_client_gave_are_kept_across_a_restart(fedzmq_daemons, tmp_path):
    """With ``--secagg-ledger``, the rounds counted per hosted client survive a restart of the daemon:
    a coordinator cannot get a fresh allowance by making the daemon start again."""
    import json

    from fedzmq.testing.datasets import write_dataset

    folder, ledger = tmp_path / "shards", tmp_path / "ledger.json"
    folder.mkdir()
    for i, shard in enumerate(_shards(3)):
        write_dataset(folder / f"c{i}.safetensors", shard.features, shard.labels)
    flags = ["--clients-from", f"d={folder}", "--require-secure-aggregation", "--min-batch-size", "16",
             "--secagg-max-rounds", "1", "--secagg-ledger", str(ledger)]
    [host] = await fedzmq_daemons("owner", args=flags)

    async def one_round() -> fz.RoundMetrics:
        workers = await fz.connect_clients(host.address, settings=TEST_SETTINGS)
        try:
            return await fz.Federation(workers, _model(), FIT, SecAgg(fz.FedAvg(), clip=100.0), seed=3,
                                       round_timeout=60).run_round()
        finally:
            for worker in workers:
                await worker.close()

    assert sorted((await one_round()).participants) == ["c0", "c1", "c2"]
    assert json.loads(ledger.read_text()) == {"version": 1, "rounds": {"c0": 1, "c1": 1, "c2": 1}}
    await host.restart()
    with pytest.raises(fz.RoundFailed, match="limit of 1 secure rounds per data holder"):
        await one_round()
    assert json.loads(ledger.read_text())["rounds"] == {"c0": 1, "c1": 1, "c2": 1}


def test_a_ledger_that_cannot_be_read_stops_the_daemon_from_starting(tmp_path):
    from fedzmq.worker.ledger import LedgerError, ReleaseLedger

    path = tmp_path / "ledger.json"
    path.write_text('{"version": 1, "rounds": {"a": -1}}')
    with pytest.raises(LedgerError, match="not a fedzmq secure rounds ledger"):
        ReleaseLedger(3, path)
    with pytest.raises(LedgerError, match="cannot write"):
        ReleaseLedger(3, tmp_path / "no-such-folder" / "ledger.json")
    ledger = ReleaseLedger(1, tmp_path / "fresh.json")
    ledger.charge(["a", "b"])
    with pytest.raises(fz.PermissionDenied, match="client 'a'"):
        ledger.charge(["a"])
    ledger.refund(["a"])
    ledger.charge(["a"])
    assert ReleaseLedger(1, tmp_path / "fresh.json").used("b") == 1


async def _masked_release(worker, remote, number, length):
    """One secure round by hand, with two in-process peers, up to ``worker``'s masked input of ``remote``:
    its masked bytes, or the daemon's refusal raised."""
    from fedzmq.secagg import SecAggClient, SecAggConfig

    config = SecAggConfig(client_ids=(0, 1, 2), threshold=2, vector_length=length, clip=1e3,
                          round_id=b"budget round %04d" % number)
    peers = {i: SecAggClient(i, config) for i in (1, 2)}
    advertised = {0: await worker.secagg("advertise", number, config.to_wire(), module=remote.id, client=0)}
    advertised |= {i: peer.advertise() for i, peer in peers.items()}
    keys = {"v": 2, "type": "secagg.keys",
            "keys": [[j, bytes(a["c_pk"]), bytes(a["s_pk"])] for j, a in sorted(advertised.items())]}
    shares = {0: await worker.secagg("share_keys", number, keys)} | {i: p.share_keys(keys) for i, p in peers.items()}
    sealed = {(m["from"], j): ct for m in shares.values() for j, ct in m["shares"]}
    routed = {"v": 2, "type": "secagg.routed", "to": 0, "u1": [0, 1, 2], "shares": [[j, sealed[j, 0]] for j in (1, 2)]}
    return await worker.secagg("masked_input", number, routed, module=remote.id)


async def test_the_round_budget_counts_every_model_of_a_session_that_read_the_rows(fedzmq_daemons, tmp_path):
    """A cold review's find: the budget counted the holders whose rows trained the very model released,
    but a session can move trained values into another model without a fit (a load of its outputs).
    Every masked update of a session counts each holder whose rows any fit of the session read."""
    from fedzmq.testing.datasets import write_dataset

    folder = tmp_path / "shards"
    folder.mkdir()
    for i, shard in enumerate(_shards(3)):
        write_dataset(folder / f"c{i}.safetensors", shard.features, shard.labels)
    [host] = await fedzmq_daemons("owner", args=["--clients-from", f"d={folder}", "--require-secure-aggregation",
                                                 "--min-batch-size", "16", "--secagg-max-rounds", "1"])
    workers = await fz.connect_clients(host.address, settings=TEST_SETTINGS)
    try:
        [worker] = [w for w in workers if w.id == "c0"]
        length = sum(p.numel() for p in _model().parameters())
        trained = await worker.send(_model())
        await trained.fit("d", optimizer={"cls": "SGD", "lr": 0.5}, epochs=1, batch_size=16)
        assert (await _masked_release(worker, trained, 1, length))["masked"]
        untrained = await worker.send(_model())  # never fit itself: values could have been loaded into it
        with pytest.raises(fz.PermissionDenied, match="limit of 1 secure rounds per data holder"):
            await _masked_release(worker, untrained, 2, length)
    finally:
        for worker in workers:
            await worker.close()


async def test_a_secure_step_stops_at_the_workers_command_time_limit() -> None:
    """A cold review's find: a coordinator chooses n and the threshold, and a client's share_keys does
    O(n t) Shamir work (n = 4,000, t = 2,001: seconds; n = 16,000: about a minute) that nothing
    stopped, past ``--max-command-seconds`` and past the end of its session. The steps now check the
    command's budget before each neighbour's work, as a fit checks it at each step."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from fedzmq.secagg import SecAggConfig
    from fedzmq.secagg.messages import VERSION

    def public() -> bytes:
        return X25519PrivateKey.generate().public_key().public_bytes_raw()

    n = 4000
    worker = fz.VirtualWorker("victim", config=fz.WorkerConfig(max_command_seconds=0.2))
    try:
        model = await worker.send(nn.Linear(2, 1))
        config = SecAggConfig(tuple(range(n)), n // 2 + 1, 3, clip=1.0)
        mine = await worker.secagg("advertise", 1, config.to_wire(), module=model.id, client=0)
        keys = [[0, mine["c_pk"], mine["s_pk"]]] + [[i, public(), public()] for i in range(1, n)]
        with pytest.raises(fz.LimitExceeded, match="longer than the worker allows"):
            await worker.secagg("share_keys", 1, {"v": VERSION, "type": "secagg.keys", "keys": keys})
        assert (await worker.ping())["id"] == "victim"
    finally:
        await worker.close()


async def test_a_finished_secure_rounds_copy_of_the_model_is_uncharged():
    """A cold review's find: a round's float32 copy of the model stayed charged until the round aged
    out, four copies in steady state: a federation of a 4 MiB model under a 40 MiB quota failed at
    round 3. The copy is released once the masked input is made."""
    g = torch.Generator().manual_seed(0)
    features = 1024  # Linear(1024, 1024): 4 MiB
    workers = [fz.VirtualWorker(f"w{i}", settings=TEST_SETTINGS, config=fz.WorkerConfig(max_session_bytes=40 << 20),
                                datasets={"d": Dataset("d", torch.randn(64, features, generator=g),
                                                       torch.randint(0, features, (64,), generator=g))})
               for i in range(3)]
    fit = fz.FitConfig(dataset="d", optimizer={"cls": "SGD", "lr": 0.01}, steps=1, batch_size=16)
    try:
        federation = fz.Federation(workers, nn.Linear(features, features), fit, SecAgg(fz.FedAvg(), clip=100.0),
                                   seed=1)
        await federation.run(6)
        assert federation.round == 6 and all(len(m.participants) == 3 for m in federation.history)
    finally:
        for w in workers:
            await w.close()


async def test_a_second_secure_federation_over_the_same_workers_starts_at_round_one():
    """A cold review's find: the first federation left rounds 2-5 live in each daemon session; the
    second advertised its round 1 beside them, and the eviction of the smallest round number evicted
    the round just made (KeyError). The oldest round goes now."""
    workers = [fz.VirtualWorker(f"w{i}", datasets={"d": shard}, settings=TEST_SETTINGS)
               for i, shard in enumerate(_shards(3))]
    try:
        first = fz.Federation(workers, _model(), FIT, SecAgg(fz.FedAvg(), clip=100.0), seed=1)
        await first.run(5)
        second = fz.Federation(workers, _model(), FIT, SecAgg(fz.FedAvg(), clip=100.0), seed=2)
        metrics = await second.run_round()
        assert first.round == 5 and len(metrics.participants) == 3 and not metrics.dropped
    finally:
        for w in workers:
            await w.close()


async def test_an_owner_can_ask_for_noise_that_holds_even_when_every_other_participant_is_the_coordinators():
    """h31: ``--secagg-min-noise`` holds for a sum of ``threshold`` honest participants, but a coordinator that
    fits the other real participants with lr 0 (or runs Sybils) leaves one worker's update with its own
    share of the noise alone, ``sigma / sqrt(expected_survivors)``. ``--secagg-own-noise`` puts the floor on
    that share: a round spreading the noise thinner is refused before any key is made."""
    from fedzmq.secagg import SecAggConfig

    [shard] = _shards(1)
    terms = fz.WorkerConfig(require_secure_aggregation=True, secagg_own_noise=1.0)
    async with fz.VirtualWorker("bob", datasets={"d": shard}, config=terms) as bob:
        remote = await bob.send(_model())
        length = sum(p.numel() for p in _model().parameters())

        def config(sigma, round_id):
            return SecAggConfig(client_ids=tuple(range(4)), threshold=3, vector_length=length, clip=1.0,
                                noise_multiplier=sigma, expected_survivors=4, round_id=round_id)

        with pytest.raises(fz.PermissionDenied, match="own share"):  # 1.5 / sqrt(4) = 0.75 alone
            await bob.secagg("advertise", 1, config(1.5, b"r1").to_wire(), module=remote.id, client=0)
        assert await bob.secagg("advertise", 2, config(2.0, b"r2").to_wire(), module=remote.id, client=0)
