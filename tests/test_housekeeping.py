"""One meaning per name, one hierarchy of errors, one default, and ``async with`` meaning the same on every
resource (issue 15, item 17)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import fedzmq as fz
from fedzmq.cli import DEFAULTS
from fedzmq.client.connection import Connection
from fedzmq.federated.protocols import FitConfig
from fedzmq.optimizers import DEFAULT_OPTIMIZER
from fedzmq.worker.daemon import config_from, load_settings
from fedzmq.worker.server import WorkerNotBound

pytestmark = pytest.mark.timeout(60)


def _fedzmq_modules() -> list[object]:
    names = [m.name for m in pkgutil.walk_packages(fz.__path__, "fedzmq.")
             if not m.name.endswith("__main__")]
    return [importlib.import_module(name) for name in names]


def test_every_exception_fedzmq_defines_is_a_fedzmq_error() -> None:
    defined = {cls for module in _fedzmq_modules() for _, cls in inspect.getmembers(module, inspect.isclass)
               if issubclass(cls, BaseException) and cls.__module__.startswith("fedzmq")}
    assert len(defined) > 20, "the walk found fedzmq's exception classes"
    strays = sorted(f"{c.__module__}.{c.__qualname__}" for c in defined if not issubclass(c, fz.FedzmqError))
    assert strays == []


def test_no_export_shadows_a_torch_name() -> None:
    torch_names = set(dir(torch)) | set(dir(torch.nn)) | set(dir(torch.optim))
    assert sorted(n for n in set(fz.__all__) & torch_names if not n.startswith("__")) == []
    assert not hasattr(fz, "Sequential")
    assert isinstance(fz.make_strategy("cyclic"), fz.Cyclic)
    assert isinstance(fz.make_strategy("sequential"), fz.Cyclic), "the old name still finds the strategy"


def test_every_public_name_is_exported_once() -> None:
    assert len(fz.__all__) == len(set(fz.__all__))
    assert all(hasattr(fz, name) for name in fz.__all__)


def test_one_default_learning_rate() -> None:
    assert DEFAULT_OPTIMIZER == {"cls": "SGD", "lr": 0.1}
    assert DEFAULTS["lr"] == DEFAULT_OPTIMIZER["lr"]
    assert FitConfig(dataset="train").optimizer == DEFAULT_OPTIMIZER


def test_the_frame_limit_flag_is_named_for_what_it_limits() -> None:
    assert config_from(load_settings(["--id", "w", "--bind", "tcp://127.0.0.1:0", "--max-frame-bytes", "4096"])).limits.max_frame_bytes == 4096
    assert config_from(load_settings(["--id", "w", "--bind", "tcp://127.0.0.1:0", "--max-message-bytes", "8192"])).limits.max_frame_bytes == 8192


def test_dead_code_is_gone() -> None:
    assert not hasattr(Connection("inproc://nowhere"), "unmatched_replies")
    with pytest.raises(NotImplementedError, match="inside a Federation round"):
        fz.SecAgg(fz.FedAvg()).aggregate(1, {"w": torch.zeros(2)}, [({"w": torch.ones(2)}, 1)])


async def test_async_with_a_worker_binds_and_serves_it() -> None:
    async with fz.Worker("carol") as server:
        assert server.address is not None and server.address.startswith("inproc://")
        async with fz.RemoteWorker(server.address) as carol:
            assert carol.id == "carol", "entering a RemoteWorker connects it, as fz.connect does"
            assert await (await carol.send(torch.ones(2))).get() == pytest.approx([1.0, 1.0])


async def test_async_with_a_remote_worker_that_is_not_there_fails_clearly() -> None:
    settings = fz.ConnectionSettings(connect_timeout=0.5)
    with pytest.raises(fz.WorkerError, match="is the daemon running"):
        async with fz.RemoteWorker("inproc://fedzmq-nobody-here", settings=settings):
            pass


def test_start_before_bind_is_a_fedzmq_error() -> None:
    with pytest.raises(WorkerNotBound, match="async with"):
        fz.Worker("dave").start()
