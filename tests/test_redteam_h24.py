"""Red team of the refusals that keep their words on protected rows (session h24).

Three refusals were made to leave a daemon whole even from a command on protected rows, because they
are built from public facts (shapes, dtypes, the dataset listing): a described model's meta-forward
error, the meta sizing's mixed-dtype check, and a fit whose classifier has fewer outputs than the listed
classes. No released word was found to depend on a row, a label or a trained weight (the meta run holds
none); what is here are the cases the new checks left to torch's withheld words, though the facts that
decide them are as public.
"""

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.worker.datasets import Dataset

pytestmark = pytest.mark.timeout(60)


def _toy(features: torch.Tensor | None = None) -> Dataset:
    """Eight features, three classes (labels 0 to 2): protected, as every --data dataset is by default."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) if features is None else features
    return Dataset("toy", x, x[:, :3].float().argmax(1))


async def test_an_evaluation_with_fewer_outputs_than_the_listed_classes_is_named_not_withheld():
    """`fit` refuses a classifier of 2 outputs on a dataset listed with 3 classes, before a row is read;
    `evaluate` of the same model still ran, met torch's "Target 2 is out of bounds" (a label), and gave
    only "RuntimeError ... the message is withheld". The class count is as public for an evaluation."""
    async with fz.VirtualWorker("bob", datasets={"toy": _toy()}) as bob:
        model = await bob.send(nn.Linear(8, 2))
        with pytest.raises(fz.RemoteError) as failed:
            await model.evaluate("toy")
    message = str(failed.value)
    assert "withheld" not in message and "3 classes" in message and "2 outputs" in message, message


async def test_the_evaluation_of_a_model_with_the_listed_classes_still_runs():
    async with fz.VirtualWorker("bob", datasets={"toy": _toy()}) as bob:
        model = await bob.send(nn.Linear(8, 3))
        metrics = await model.evaluate("toy")
        wide = await bob.send(nn.Linear(8, 5))  # more outputs than classes: torch takes it, and so does fedzmq
        assert (await wide.evaluate("toy"))["samples"] == 64
    assert metrics["samples"] == 64


class _Scores(nn.Module):
    """One score per row: the rows times a weight vector (``x @ v``), which torch runs as a matrix-vector
    product (``aten.mv``), not the ``mm`` the mixed-dtype check looks at."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.v


async def test_a_matrix_vector_product_of_rows_of_another_dtype_is_named_not_withheld():
    """uint8 rows against a float model's matmul are named since the meta sizing checks dtypes; the
    same rows times a float weight vector (``aten.mv``: the meta kernel does not check dtypes, the CPU
    kernel does) passed the sizing, failed on the rows and came back withheld."""
    x = torch.randint(0, 255, (64, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = Dataset("toy", x, x[:, 0].float())
    async with fz.VirtualWorker("bob", datasets={"toy": rows}) as bob:
        model = await bob.send(_Scores())
        with pytest.raises(fz.RemoteError) as failed:
            await model.fit("toy", loss="mse_loss", optimizer={"cls": "SGD", "lr": 0.1})
    message = str(failed.value)
    assert "withheld" not in message and "uint8" in message and "float32" in message, message


async def test_a_matrix_vector_product_of_one_dtype_still_trains():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    async with fz.VirtualWorker("bob", datasets={"toy": Dataset("toy", x, x[:, 0])}) as bob:
        model = await bob.send(_Scores())
        result = await model.fit("toy", loss="mse_loss", optimizer={"cls": "SGD", "lr": 0.1})
    assert result["num_examples"] == 64


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int16, torch.bool])
async def test_class_labels_of_any_integer_dtype_both_train_and_evaluate(dtype):
    """The label dtype is public (``datasets`` lists it), yet which command took it was torch's call, with
    its words withheld: uint8 labels (numpy's MNIST) trained and then failed every evaluation ("gather():
    Expected dtype int32/int64"); int32 labels (numpy's int on Windows), int16 and bool labels evaluated
    and failed every fit ("expected target dtype to be Long or Byte"). Both read them as class indices."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    labels = x[:, :2].argmax(1).to(dtype)
    async with fz.VirtualWorker("bob", datasets={"toy": Dataset("toy", x, labels)}) as bob:
        model = await bob.send(nn.Linear(8, 2))
        trained = await model.fit("toy", optimizer={"cls": "SGD", "lr": 0.1})
        metrics = await model.evaluate("toy")
    assert trained["num_examples"] == 64 and metrics["samples"] == 64 and metrics["accuracy"] is not None


@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss"])
async def test_float_class_labels_are_named_not_withheld(loss):
    """Class indices saved as float32 (an .npz of np.float32 labels): ``datasets`` lists them as float32
    with no num_classes, the class-count check skips them, and fit and evaluate met torch's "expected
    target dtype to be Long or Byte, but got Float" (or gather's), withheld. The label dtype and shape are
    listed to every client, so the daemon can say it before a row is read."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    async with fz.VirtualWorker("bob", datasets={"toy": Dataset("toy", x, x[:, :3].argmax(1).float())}) as bob:
        model = await bob.send(nn.Linear(8, 3))
        for attempt in (model.fit("toy", loss=loss, optimizer={"cls": "SGD", "lr": 0.1}),
                        model.evaluate("toy", loss=loss)):
            with pytest.raises(fz.RemoteError) as failed:
                await attempt
            message = str(failed.value)
            assert "withheld" not in message and "float32" in message and "int64" in message, message


async def test_class_probabilities_of_the_outputs_shape_still_train_with_cross_entropy():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    soft = torch.softmax(x[:, :3], dim=1)
    async with fz.VirtualWorker("bob", datasets={"toy": Dataset("toy", x, soft)}) as bob:
        model = await bob.send(nn.Linear(8, 3))
        trained = await model.fit("toy", optimizer={"cls": "SGD", "lr": 0.1})
    assert trained["num_examples"] == 64


class OwnersLayer(nn.Module):
    """An owner's registered class whose forward fails with words of its own (say, a statistic of its rows
    it holds): they are the owner's, not made from the description's public facts."""

    fedzmq_name = "owners-layer"

    def __init__(self) -> None:
        super().__init__()
        self.fedzmq_kwargs: dict[str, int] = {}
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("the owner's own words: 41.5")


async def test_an_owners_registered_class_inside_a_description_keeps_its_failure_withheld():
    """A described model's forward that fails on the meta device is refused in words that may leave even
    from protected rows (they are the model's and the batch's shapes). Not when an owner's registered
    class inside it made the failure: its words are the owner's code's, and stay withheld."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    rows = Dataset("toy", x, x[:, :3].argmax(1))
    async with fz.VirtualWorker("bob", datasets={"toy": rows}, models={"owners-layer": OwnersLayer}) as bob:
        remote = await bob.send(nn.Sequential(OwnersLayer(), nn.ReLU()))
        with pytest.raises(Exception) as caught:
            await remote.fit("toy", steps=1, batch_size=16)
        assert "41.5" not in str(caught.value), caught.value
