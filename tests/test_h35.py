"""Breaks found by h35's cold review of 6f8153e..03d057c: FedBuff's up-front sends of the model
(fedzmq/federated/asyncround.py), a local model's turn (fedzmq/client/turns.py), and the CLI's checks of a
--config file's values (fedzmq/cli.py)."""

import asyncio

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.cli import main as fz_cli_main
from fedzmq.worker.datasets import Dataset

pytestmark = pytest.mark.timeout(120)


def _workers(n: int) -> list[fz.VirtualWorker]:
    torch.manual_seed(0)
    x = torch.randn(60 * n, 6)
    y = (x[:, 0] + x[:, 1] > 0).long()
    config = fz.WorkerConfig(shuffle_secret="s", min_batch_size=1, min_metric_rows=1, fault_injection=True)
    return [fz.VirtualWorker(f"w{i}", config=config,
                             datasets={"d": Dataset("d", x[60 * i:60 * i + 60], y[60 * i:60 * i + 60])})
            for i in range(n)]


FIT = fz.FitConfig(dataset="d", optimizer={"cls": "SGD", "lr": 0.1}, steps=3, batch_size=16)


async def test_fedbuff_publishes_while_one_participant_never_answers_its_first_send() -> None:
    """FedBuff's first round sends the model to every participant and started no trip until all those
    sends were over (``BufferedAsyncRounds._host_model``, bounded only by the round's deadline): one
    participant that is connected but does not answer (a stopped daemon not yet declared dead, one busy
    with another coordinator's work) held every other participant's trips to the deadline, and the round
    failed with no update at all, where FedAvg's and FedBuff's own trips leave the slow one behind."""
    workers = _workers(3)
    slow = workers[2]
    try:
        await slow.request("debug_delay", {"seconds": 60.0}, timeout=10.0)  # every command waits 60 s first
        federation = fz.Federation(workers, nn.Linear(6, 2), FIT, fz.FedBuff(buffer_size=2), round_timeout=15)
        metrics = await federation.run_round()
        assert {u["worker"] for u in metrics.extra["updates"]} <= {"w0", "w1"}
        await federation.close()
    finally:
        await slow.request("debug_delay", {"seconds": 0.0}, timeout=10.0)
        for worker in workers:
            await worker.close()


#: a --config file's value the flag would not take (argparse refuses ``--rounds 2.5`` and ``--sampling fixd``),
#: and the one line that names the flag
BAD_CONFIG = [("rounds = 2.5", "--rounds must be an integer, got 2.5"),
              ("min_workers = 1.5", "--min-workers must be an integer, got 1.5"),
              ("hidden = 8.5", "--hidden must be an integer, got 8.5"),
              ("seed = \"x\"", "--seed must be a number, got 'x'"),
              ("sampling = \"fixd\"", "--sampling must be one of fixed, poisson, got 'fixd'")]


@pytest.mark.parametrize(("line", "says"), BAD_CONFIG, ids=[line for line, _ in BAD_CONFIG])
def test_a_config_files_value_its_flag_would_not_take_is_refused_in_one_line(tmp_path, capsys, line, says):
    """``settings_problem`` checks a --config file's numbers for range and for being numbers, not for being
    integers, and not ``sampling`` at all: these went on to connect to the daemons (with none at the
    address: 10 s of RequestTimeout and exit 1; ``seed = "x"``: a ValueError traceback), not a usage error."""
    (tmp_path / "run.toml").write_text(line + "\n")
    code = fz_cli_main(["train", "--config", str(tmp_path / "run.toml"), "--worker", "tcp://127.0.0.1:9",
                        "--dataset", "d", "--in-features", "2", "--classes", "2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert says in err and len(err.strip().splitlines()) == 1, err

