"""``fedzmq.torchmodes.default_device_is_cpu``: the fast answer (an empty function-mode stack) and the walk
behind it give what ``torch.get_default_device()`` gives, whichever way the device was changed."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fedzmq.torchmodes import default_device_is_cpu, default_modes

pytestmark = pytest.mark.timeout(30)


class _PassThrough(TorchFunctionMode):
    """A mode that changes nothing: the stack is not empty, and the device is still the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def test_the_cpu_by_default() -> None:
    assert default_device_is_cpu()
    with default_modes():
        assert torch.empty(1).device.type == "cpu"


def test_a_device_block_is_seen_and_default_modes_undoes_it() -> None:
    with torch.device("meta"):
        assert not default_device_is_cpu()
        with default_modes():
            assert torch.empty(1).device.type == "cpu"
        assert torch.empty(1).device.type == "meta"
    assert default_device_is_cpu()


def test_set_default_device_is_seen() -> None:
    torch.set_default_device("meta")
    try:
        assert not default_device_is_cpu()
        with default_modes():
            assert torch.empty(1).device.type == "cpu"
    finally:
        torch.set_default_device(None)
    assert default_device_is_cpu()


def test_another_mode_on_the_stack_leaves_the_cpu() -> None:
    with _PassThrough():
        assert default_device_is_cpu()
        with torch.device("meta"), _PassThrough():
            assert not default_device_is_cpu()


def test_the_device_is_per_thread() -> None:
    seen: list[bool] = []
    with torch.device("meta"):
        thread = threading.Thread(target=lambda: seen.append(default_device_is_cpu()))
        thread.start()
        thread.join()
    assert seen == [True]
