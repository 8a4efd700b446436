"""fedzmq's own suite uses fedzmq's pytest plugin (fedzmq.testing.plugin), loaded by its entry point.

Every test is bounded by pytest-timeout (``timeout`` in pyproject.toml). The example user project
lives in docs/testing.md; tests/test_docs_testing.py runs it."""

import shutil

import pytest
import pytest_asyncio
import torch

import fedzmq as fz
from fedzmq.launcher import DaemonProcess
from fedzmq.security import generate_keypair
from fedzmq.testing import write_dataset
from fedzmq.worker.datasets import Dataset

#: the owner's rows of the adversarial tests (tests/test_adversarial*.py): issue 16's 100 rows of 8 floats
ROWS, FEATURES = 100, 8


@pytest.fixture
def allowed_names():
    """The coordinators whose keys ``keys`` puts in the allowed folder (a test module may override it)."""
    return ("alice",)


@pytest.fixture
def keys(tmp_path, allowed_names):
    """A daemon key pair (``server``), two coordinators' (``alice``, ``mallory``), each ``(public, secret)``
    paths, and the allowed-keys folder (``allowed``) holding ``allowed_names``' public keys."""
    folder = tmp_path / "keys"
    made = {name: generate_keypair(folder, name) for name in ("server", "alice", "mallory")}
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    for name in allowed_names:
        shutil.copy(made[name][0], allowed)
    return {**made, "allowed": allowed}


@pytest.fixture
def secure_daemon(keys, tmp_path):
    """A daemon ``bob`` that runs with ``keys`` (the plugin's fixture connects without keys)."""
    daemon = DaemonProcess("bob", extra_args=["--secret-key", str(keys["server"][1]),
                                              "--allowed-keys", str(keys["allowed"])], log_dir=tmp_path)
    daemon.start()
    yield daemon
    assert daemon.stop() == 0, daemon.log_tail()


@pytest.fixture
def secret_rows(tmp_path):
    """The owner's rows: values with many digits, so that any leak of one shows in text; labels 0-9.
    Returns ``(x, y, path of the dataset file)``."""
    generator = torch.Generator().manual_seed(7)
    x = torch.rand(ROWS, FEATURES, generator=generator) * 1000 + 123.456
    y = torch.randint(0, 10, (ROWS,), generator=generator)
    return x, y, write_dataset(tmp_path / "owner.safetensors", x, y)


@pytest_asyncio.fixture
async def hosting_daemon():
    """An in-process daemon hosting five logical clients ``c0``..``c4`` of 16 toy rows each, on loopback
    tcp; yields its address."""
    clients = {f"c{i}": {"toy": Dataset("toy", torch.randn(16, 2), torch.zeros(16, dtype=torch.long))}
               for i in range(5)}
    worker = fz.Worker("host", clients=clients)
    address = worker.bind("tcp://127.0.0.1:0")
    worker.start()
    try:
        yield address
    finally:
        await worker.close()
