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
from typing import Any, ContextManager, NamedTuple

import torch


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


def default_modes() -> ContextManager[Any]:
    """Grad mode on, inference mode and autocast off, for one synchronous block; free when they already
    are (the common case, and the one on a daemon's own threads)."""
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and not torch.is_autocast_enabled("cpu"):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    stack.enter_context(torch.autocast("cpu", enabled=False))
    return stack


__all__ = ["DEFAULT_MODES", "TorchModes", "default_modes", "restore", "snapshot"]
