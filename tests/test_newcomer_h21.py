"""A newcomer's first mistakes through the Python API must say what went wrong (session h21).

`fedzmq train` checks a model against the daemons' public dataset shapes before the first round
(cli.check_datasets), but `fz.Federation`, the API the README teaches, did not: a model whose input
width is not the dataset's came back from every worker as "RuntimeError in a command that computed on
private data; the message is withheld", although the daemon found the mismatch on the meta device,
from shapes alone, before reading a row. A message made from shapes quotes no data, so it may leave.
"""

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.worker.datasets import Dataset

pytestmark = pytest.mark.timeout(60)


def _toy(n: int = 64) -> Dataset:
    """Eight features, three classes: the protected dataset every test here trains on."""
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    return Dataset("toy", x, x[:, :3].argmax(1))


async def _first_round_failure(model: nn.Module) -> str:
    """Why the one worker was left out of round 1 of a FedAvg run of ``model`` on the toy dataset."""
    async with fz.VirtualWorker("bob", datasets={"toy": _toy()}) as bob:
        federation = fz.Federation([bob], model, fz.FitConfig(dataset="toy"), round_timeout=30)
        with pytest.raises(fz.RoundFailed) as failed:
            await federation.run(rounds=1)
    return failed.value.dropped["bob"]


async def test_a_model_of_the_wrong_input_width_is_named_not_withheld():
    reason = await _first_round_failure(nn.Linear(20, 3))
    assert "withheld" not in reason, reason
    assert "RuntimeError" in reason and "[20, 3]" in reason and "8]" in reason, reason


async def test_the_same_model_on_the_right_width_still_trains():
    async with fz.VirtualWorker("bob", datasets={"toy": _toy()}) as bob:
        federation = fz.Federation([bob], nn.Linear(8, 3), fz.FitConfig(dataset="toy"), round_timeout=30)
        [metrics] = await federation.run(rounds=1)
    assert metrics.participants == ["bob"]


async def test_a_model_with_fewer_outputs_than_the_listed_classes_is_named_not_withheld():
    """Labels up to 2 against 2 outputs: torch's "Target 2 is out of bounds" quotes a label, so it is
    withheld; but the dataset's class count is listed to every client, so the daemon can say it first."""
    reason = await _first_round_failure(nn.Linear(8, 2))
    assert "withheld" not in reason, reason
    assert "3 classes" in reason and "2 outputs" in reason, reason


@pytest.mark.parametrize("which", ["server_key", "client_key"])
async def test_a_key_file_that_does_not_exist_is_named_as_missing(tmp_path, which):
    """A typo in a key's path read "Invalid certificate file", as if the file were corrupt."""
    from fedzmq.security import SecurityError, generate_keypair

    public, secret = generate_keypair(tmp_path, "real")
    keys = {"server_key": public, "client_key": secret, which: tmp_path / "typo.key"}
    with pytest.raises(SecurityError, match="no file at .*typo.key.*fedzmq keygen"):
        await fz.connect("tcp://127.0.0.1:9", **keys)


def test_a_resume_already_past_rounds_says_nothing_will_train():
    """`fedzmq train --resume --rounds 3` on a run checkpointed at round 45 printed "training to round 3"
    and then trained nothing."""
    from fedzmq.cli import resume_note

    assert resume_note(45, 3) == ("resumed from the checkpoint of round 45; that is already --rounds 3 or more, "
                                  "so nothing is trained (raise --rounds to go on)")
    assert resume_note(2, 5) == "resumed from the checkpoint of round 2; training to round 5"


async def test_rows_of_another_dtype_than_the_model_are_named_not_withheld():
    """Images saved as uint8 against a float model: torch's meta kernels of a matmul do not check dtypes,
    so the sizing passed, the real forward failed on the rows, and its words were withheld. The dtypes
    are public (``datasets`` lists feature_dtype)."""
    x = torch.randint(0, 255, (64, 8), dtype=torch.uint8)
    async with fz.VirtualWorker("bob", datasets={"toy": Dataset("toy", x, x[:, :3].argmax(1))}) as bob:
        federation = fz.Federation([bob], nn.Linear(8, 3), fz.FitConfig(dataset="toy"), round_timeout=30)
        with pytest.raises(fz.RoundFailed) as failed:
            await federation.run(rounds=1)
    reason = failed.value.dropped["bob"]
    assert "withheld" not in reason and "uint8" in reason and "float32" in reason, reason
