"""Torch's per-thread modes, and the rule fedzmq keeps with them.

Grad mode, inference mode and autocast are per thread, and asyncio runs every coroutine of a loop on
one thread: a ``with torch.no_grad():`` around an ``await`` turns grad mode off for whatever coroutine
runs next, and the blocks exit in the wrong order when two such coroutines interleave. So fedzmq never
holds a mode across an ``await``; where it must not depend on the caller's modes (an in-process
worker's commands run on the caller's thread) it sets them for the duration of one synchronous call
(``default_modes``). The test kit checks that no test changes them (``snapshot``).

The default dtype is not among them: torch keeps it per process, not per thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine as CoroutineABC
from typing import Any, ContextManager, Coroutine, Generator, NamedTuple, TypeVar

import torch

T = TypeVar("T")


class TorchModes(NamedTuple):
    """The modes a piece of code can leave changed behind it."""

    grad_enabled: bool
    inference_mode: bool
    autocast_cpu: bool
    default_dtype: torch.dtype

    def differences(self, other: "TorchModes") -> list[str]:
        """Human-readable ``name: before -> after`` for each mode that differs."""
        return [f"{name}: {mine} -> {theirs}" for name, mine, theirs in zip(self._fields, self, other)
                if mine != theirs]


#: what a fresh thread (and every daemon) runs with
DEFAULT_MODES = TorchModes(True, False, False, torch.float32)


def snapshot() -> TorchModes:
    """The calling thread's modes now (and the process's default dtype)."""
    return TorchModes(torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                      torch.is_autocast_enabled("cpu"), torch.get_default_dtype())


def restore(modes: TorchModes) -> None:
    """Put back what can be put back. Inference mode cannot: it is left only by exiting its block."""
    torch.set_grad_enabled(modes.grad_enabled)
    torch.set_autocast_enabled("cpu", modes.autocast_cpu)
    torch.set_default_dtype(modes.default_dtype)


#: what ``default_modes`` gives when the modes are already the default: it holds nothing, so one serves all
_UNCHANGED = contextlib.nullcontext()


def default_modes() -> ContextManager[Any]:
    """Grad mode on, inference mode and autocast off, and the CPU as the default device, for one synchronous
    block; free when they already are (the common case, and the one on a daemon's own threads). The default
    device is thread-local too (``with torch.device("meta"):``, a TorchFunctionMode): held across an await
    by another coroutine, it made fedzmq's own tensors meta ones."""
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and not torch.is_autocast_enabled("cpu") \
            and default_device_is_cpu():
        return _UNCHANGED
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    stack.enter_context(torch.autocast("cpu", enabled=False))
    stack.enter_context(torch.device("cpu"))
    return stack


def default_device_is_cpu() -> bool:
    """Whether tensors made on this thread now go to the CPU. ``torch.get_default_device()`` walks the
    thread's function-mode stack in Python (3 us, and a tenth of a daemon's CPU per pipelined op, called
    for every command); every way to change the default device (``with torch.device(...)``,
    ``torch.set_default_device``) pushes a mode on that stack, so an empty stack, a C call, answers first.
    (``_len_torch_function_stack`` is torch's own; without it, the walk.)"""
    stack_depth = getattr(torch._C, "_len_torch_function_stack", None)
    if stack_depth is not None and stack_depth() == 0:
        return True
    return bool(torch.get_default_device().type == "cpu")


def in_default_modes(coroutine: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
    """``coroutine`` with every one of its synchronous steps run in the default modes (``default_modes``
    entered before it resumes, left when it awaits): a coroutine itself, to await or to make a task of.
    The caller's modes never reach it: a round awaited inside ``torch.inference_mode()``, or run while
    another coroutine holds that mode across an await, made the strategy's kept state (sums, momentum,
    moments) inference tensors, and every later round failed. The caller's own code between its awaits
    keeps the caller's modes."""
    return _StepsInDefaultModes(coroutine)


class _StepsInDefaultModes(CoroutineABC[Any, Any, T]):
    """The coroutine ``in_default_modes`` returns: each ``send`` and ``throw`` (a step, as a task drives
    it) goes to the wrapped coroutine inside ``default_modes``; ``close`` closes it, started or not."""

    __slots__ = ("_coroutine",)

    def __init__(self, coroutine: Coroutine[Any, Any, T]) -> None:
        self._coroutine = coroutine

    def send(self, value: Any) -> Any:
        with default_modes():
            return self._coroutine.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        with default_modes():
            if val is None and tb is None:
                return self._coroutine.throw(typ)
            return self._coroutine.throw(typ, val, tb)  # (the old three-argument form)

    def close(self) -> None:
        with default_modes():  # its ``finally`` blocks run as its steps do
            self._coroutine.close()

    def __await__(self) -> Generator[Any, Any, T]:
        # an iterator driven by send and throw, as a generator is
        return self

    def __iter__(self) -> "_StepsInDefaultModes[T]":
        return self

    def __next__(self) -> Any:
        return self.send(None)


__all__ = ["DEFAULT_MODES", "TorchModes", "default_device_is_cpu", "default_modes", "in_default_modes", "restore",
           "snapshot"]
