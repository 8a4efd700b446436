"""A data owner's IT operator and a strategy researcher, new to fedzmq (newcomer h27), against real daemons.

Each test is what the docs promise an operator (docs/security.md) or a strategy author (docs/strategies.md),
checked the way they would find out otherwise: on a daemon of their own."""

import asyncio
import signal
import subprocess
import sys
from typing import Any

import pytest
import torch

import fedzmq as fz
from fedzmq.client.connection import ConnectionSettings
from fedzmq.federated.aggregators import ServerStepAggregator
from fedzmq.federated.base import Aggregator

QUICK = ConnectionSettings(heartbeat_interval=0.2, heartbeat_liveness=25, connect_timeout=3.0)


def daemon_with_config(tmp_path, line: str) -> tuple[int, str, str]:
    """Run ``fedzmq-worker --config`` with a config file of an id, a bind and ``line``: its exit code, stdout
    and stderr (a daemon that served instead of stopping fails the test)."""
    config = tmp_path / "bob.toml"
    config.write_text(f'id = "bob"\nbind = "tcp://127.0.0.1:0"\n{line}\n')
    process = subprocess.Popen([sys.executable, "-m", "fedzmq.worker", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the daemon served with {line}: {out.strip()}")
    return process.returncode, out, err


@pytest.fixture
def allowed_names():
    """Both coordinators allowed at first: alice stays, mallory is revoked."""
    return ("alice", "mallory")


@pytest.mark.timeout(90)
async def test_a_key_taken_out_is_revoked_even_when_another_file_in_the_folder_is_unreadable(secure_daemon, keys):
    """An operator revokes a coordinator by taking its .key out of --allowed-keys and sending SIGHUP
    (docs/security.md). If any other file there could not be read (a half-copied key, a typo), the reload
    failed as a whole and kept every key it had: the revoked coordinator went on connecting and running
    commands, and only an ERROR line in the log said so. A reload now never allows more than the folder's
    readable keys: the unreadable file is left out, and the revocation takes effect."""
    bob = secure_daemon
    as_alice = {"server_key": keys["server"][0], "client_key": keys["alice"][1]}
    as_mallory = {"server_key": keys["server"][0], "client_key": keys["mallory"][1]}
    mallory = await fz.connect(bob.address, settings=QUICK, **as_mallory)
    try:
        kept = await mallory.send(torch.arange(4.0))
        async with fz.connect(bob.address, settings=QUICK, **as_alice) as alice:
            (keys["allowed"] / "new-partner.key").write_text("not a key: copied half-way\n")
            (keys["allowed"] / keys["mallory"][0].name).unlink()
            bob.process.send_signal(signal.SIGHUP)
            async with asyncio.timeout(20):
                while (await alice.status())["sessions_revoked"] < 1:
                    await asyncio.sleep(0.1)
            with pytest.raises(fz.PermissionDenied, match="no longer allowed"):
                await kept.get()
            with pytest.raises(fz.HandshakeRefused):
                await fz.connect(bob.address, settings=QUICK, **as_mallory)
            assert (await alice.ping())["id"] == "bob"  # the keys it could read still get in
    finally:
        await mallory.close()
    assert "new-partner.key" in bob.log_tail()  # the operator is told which file was left out


class _ServerStepMean(fz.Strategy):
    """A researcher's own strategy, written as fedzmq.federated.base says one may be: no ``name`` (the class's
    name stands for it), the weighted mean and a server learning rate, declared ``aggregates_weighted_mean``."""

    aggregates_weighted_mean = True

    def __init__(self, server_learning_rate: float = 1.0) -> None:
        self.server_learning_rate = server_learning_rate

    def begin_round(self, round_number: int, global_state: dict[str, torch.Tensor]) -> Aggregator:
        return ServerStepAggregator(global_state, self._step)

    def _step(self, x: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v + self.server_learning_rate * (mean[k] - v)).to(v.dtype) for k, v in x.items()}


@pytest.mark.timeout(90)
async def test_secure_aggregation_wraps_a_users_own_strategy_that_gives_no_name(tmp_path):
    """docs/strategies.md: SecAgg accepts any strategy that declares ``aggregates_weighted_mean``, and a
    user's own strategy need not give a ``name`` (``strategy_name`` falls back to its class's). SecAgg read
    ``inner.name`` and raised AttributeError for such a strategy. Its secure round must give what the plain
    round of the same strategy gives (the sum is exact to about 1e-12 without clipping)."""
    from torch import nn

    from fedzmq.worker.datasets import Dataset

    def rows(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(48, 4, generator=g)
        return x, (x[:, 0] > 0).long()

    workers = [fz.VirtualWorker(f"w{i}", datasets={"d": Dataset("d", *rows(i))}) for i in range(3)]
    try:
        fit = fz.FitConfig(dataset="d", epochs=1, batch_size=16)
        models = []
        for strategy in (_ServerStepMean(0.5), fz.SecAgg(_ServerStepMean(0.5))):
            torch.manual_seed(0)
            model = nn.Linear(4, 2)
            federation = fz.Federation(workers, model, fit, strategy, min_workers=3,
                                       checkpoint_dir=tmp_path / type(strategy).__name__)
            await federation.run(rounds=1)
            models.append(model.state_dict())
        for name, plain in models[0].items():
            assert torch.allclose(models[1][name], plain, atol=1e-6), name
    finally:
        await asyncio.gather(*(worker.close() for worker in workers))


@pytest.mark.timeout(90)
def test_a_misspelt_setting_in_a_daemons_config_file_stops_it_instead_of_loosening_the_terms(tmp_path):
    """An owner who writes the terms in a --config file (workers/bob.toml: "any flag of fedzmq-worker, with
    underscores") and misspells one (min_batch_sise = 64) got a daemon that served with the default of 16
    rows per step, saying nothing. ``fedzmq train --config`` already refuses keys that are no settings; the
    daemon now does too, naming the key, before it binds or loads anything."""
    code, out, err = daemon_with_config(tmp_path, "min_batch_sise = 64")
    assert code == 2, (out, err)
    assert "min_batch_sise" in err and "ready at" not in out


class _NestedStateMean(_ServerStepMean):
    """A researcher's server state kept the natural way, a dict of tensors per name, which a checkpoint's JSON
    part cannot hold (the built-in strategies flatten theirs: ``momentum.w``)."""

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": {"w": torch.zeros(2)}}


@pytest.mark.timeout(60)
async def test_a_strategy_state_a_checkpoint_cannot_keep_is_refused_before_a_round_not_after_it(tmp_path):
    """A strategy whose state_dict nests tensors trained a whole round, committed it (``round`` 1), then
    failed writing the checkpoint with "Object of type Tensor is not JSON serializable": the round, the
    history and the checkpoint disagreed, which api.md says never happens, and the message named no entry.
    A federation with ``checkpoint_dir`` now checks the strategy's state when it is made, naming the entry."""
    from torch import nn

    from fedzmq.worker.datasets import Dataset

    x = torch.randn(32, 4)
    worker = fz.VirtualWorker("w0", datasets={"d": Dataset("d", x, (x[:, 0] > 0).long())})
    try:
        with pytest.raises(TypeError, match="'momentum'"):
            fz.Federation([worker], nn.Linear(4, 2), fz.FitConfig(dataset="d", batch_size=16), _NestedStateMean(),
                          checkpoint_dir=tmp_path / "ckpt")
        assert not list((tmp_path / "ckpt").glob("round-*"))
    finally:
        await worker.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("line", ['insecure = "false"', 'min_batch_size = "64"', 'private_release = "aggregate"',
                                  'data = "records=records.safetensors"'])
def test_a_setting_of_the_wrong_type_in_a_daemons_config_file_stops_it(tmp_path, line):
    """TOML values skip argparse's types and choices: ``insecure = "false"`` (a string, so true) served
    on 0.0.0.0 without keys, open to anyone who can reach the port; a quoted number or a choice that is none
    started a daemon that failed later or read the setting otherwise. Each must stop the daemon, naming the
    key, as the same value given as a flag would."""
    code, out, err = daemon_with_config(tmp_path, line)
    assert code == 2, (out, err)
    assert line.split(" =")[0] in err and "ready at" not in out
