"""``PointerHost``: what pointers ask of the worker their value lives on.

A pointer (``fedzmq.client.pointers``) owns an id and a location, nothing else: everything it does goes
through these calls on its location. ``RemoteWorker`` implements them (``VirtualWorker`` inherits them),
in ``fedzmq.client.worker`` (requests and ids), ``fedzmq.client.pointer_ops`` (ops, gradients, forward
calls, dataset tensors, batched deletes) and ``fedzmq.client.transfers`` (values that move). Remote
optimizers (``fedzmq.client.optims``) use the same calls.

These are the pointers' interface, public so that pointers in other modules may call them. They are not
what users call in normal code: ``send``, pointer operations and ``get`` are.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, AsyncContextManager, AsyncGenerator, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..codec import Limits
    from .broadcast import Broadcast
    from .meta import TensorMeta
    from .transfers import StatePieces
    from .module_pointer import ModulePointer
    from .pointers import Pointer, TensorPointer


class PointerHost(Protocol):
    """Where a pointer's value lives: the calls pointers make on their ``location``."""

    @property
    def id(self) -> str | None:
        """The worker's id (pointers name it in their ``repr`` and errors)."""

    @property
    def limits(self) -> Limits:
        """The message limits in force on the worker's connection (a fit over many clients is sized by them)."""

    # --- requests ------------------------------------------------------------------------------

    def submit(self, cmd: str, args: dict[str, Any], copy: bool = False,
               fusable: bool = False) -> asyncio.Future[Any]:
        """Send command ``cmd`` with ``args`` in this worker's session, without waiting: the future of its
        reply (pass it to ``wait_reply``). ``copy`` copies the tensors' bytes at once (the caller may change
        them after); ``fusable``: an op a ``get`` of its output may join. Pointers' interface, not for
        normal code."""
        ...

    async def request(self, cmd: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        """Send command ``cmd`` and wait for its result: ``submit`` then ``wait_reply``. Pointers' interface,
        not for normal code."""
        ...

    async def wait_reply(self, future: asyncio.Future[Any], timeout: float | None = None) -> Any:
        """The result of a reply ``submit`` returned, or its remote error, with the pointers the worker
        called "object N" named as the pointers they are. Pointers' interface, not for normal code."""
        ...

    # --- objects -------------------------------------------------------------------------------

    def new_id(self) -> int:
        """A fresh object id in this worker's session, for the output of a command about to be sent.
        Pointers' interface, not for normal code."""
        ...

    def register_pointer(self, pointer: Pointer) -> None:
        """Remember a new pointer (weakly) so that the worker's errors about its object name it.
        Pointers' interface, not for normal code."""
        ...

    def release(self, obj_id: int) -> None:
        """Queue the remote delete of a collected pointer's value (deletes are batched). Called from
        ``Pointer.__del__``; pointers' interface, not for normal code."""
        ...

    # --- what pointers compute -----------------------------------------------------------------

    def run_op(self, op: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Run the allowlisted op ``op`` (``fedzmq.ops``) on the worker: its output's pointer (a tuple of
        them for an op with several), returned at once. Pointers' interface, not for normal code."""
        ...

    def grad_of(self, pointer: TensorPointer) -> TensorPointer:
        """A pointer to the gradient of the leaf ``pointer`` stands for, as it is now, returned at once.
        Pointers' interface, not for normal code."""
        ...

    def call_module(self, module: ModulePointer, args: list[Any], kwargs: dict[str, Any]) -> TensorPointer:
        """Run the forward of the remote model ``module``: its output's pointer, returned at once.
        Pointers' interface, not for normal code."""
        ...

    async def dataset_tensor(self, name: str, part: str, meta: TensorMeta | None = None) -> TensorPointer:
        """A pointer to a dataset's ``"features"`` or ``"labels"``, once the worker made it. Pointers'
        interface, not for normal code."""
        ...

    # --- values that move ----------------------------------------------------------------------

    async def send(self, obj: torch.Tensor | nn.Module, timeout: float | None = None) -> Any:
        """Send a tensor or a model to this worker (the public ``RemoteWorker.send``; a pointer's ``move``
        uses it)."""
        ...

    async def fetch_tensor(self, obj_id: int, timeout: float | None,
                           made_by: asyncio.Future[Any] | None = None) -> torch.Tensor:
        """The value of tensor ``obj_id``, in one message or as a stream; ``made_by``: the reply future of
        the op that made it, which the fetch may join. Pointers' interface, not for normal code."""
        ...

    async def stream_into(self, pointer: ModulePointer, broadcast: Broadcast, timeout: float | None) -> Broadcast:
        """Stream a broadcast's big entries into the remote model; returns it as split for this worker (its
        ``inline`` part goes in the request that loads it). Pointers' interface, not for normal code."""
        ...

    def discard(self, pointer: ModulePointer) -> None:
        """Delete a remote model whose write in pieces did not finish, and forget it was sent (its next send
        builds it anew). Pointers' interface, not for normal code."""
        ...

    async def request_state(self, cmd: str, args: dict[str, Any], obj_id: int, timeout: float | None) -> Any:
        """``request``, for a request whose reply carries model ``obj_id``'s state: its streamed entries
        are given up if the caller stops waiting. Pointers' interface, not for normal code."""
        ...

    def module_slices(self, pointer: ModulePointer,
                      timeout: float | None = None) -> AsyncGenerator[tuple[str, int, torch.Tensor], None]:
        """The remote model's parameters and buffers as ``(name, first element, flat values)`` pieces.
        Pointers' interface, not for normal code."""
        ...

    def state_pieces(self, pointer: ModulePointer, state: dict[str, Any],
                     timeout: float | None = None) -> "StatePieces":
        """A model state a reply carried, as ``(name, first element, flat values)`` pieces (streamed
        entries fetched as they are iterated; those it will not read, given up: ``StatePieces``).
        Pointers' interface, not for normal code."""
        ...

    def module_turn(self, module: nn.Module) -> AsyncContextManager[None]:
        """Held while a ``get`` writes into ``module``: alone, so no send of it (to any worker) streams a model
        a get has part landed. Pointers' interface, not for normal code."""
        ...

    def sent_modules(self) -> list[tuple[nn.Module, ModulePointer]]:
        """The local models sent to this worker whose copies its session holds, with their pointers (a
        remote optimizer finds its model among them). Pointers' interface, not for normal code."""
        ...
