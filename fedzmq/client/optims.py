"""Remote optimizers: one per worker, each with its own state, as in the seed's ``Optims``.

``fz.Optims([bob, alice], optim=torch.optim.Adam(model.parameters(), lr=0.1))`` keeps the local
optimizer only as a template (its class and hyper-parameters). ``get_optim(bob)`` is bob's own optimizer
of that class over bob's copy of the model; it is created on first use, after the model was sent,
and its state (Adam's moments, say) stays on bob across sends of the model.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Iterable

import torch

from ..errors import FedzmqError
from ..optimizers import OPTIMIZERS
from .pointers import ModulePointer
from .worker import RemoteWorker


class RemoteOptimizer:
    """An optimizer living on one worker, over that worker's copy of a model."""

    def __init__(self, worker: RemoteWorker, template: torch.optim.Optimizer) -> None:
        name = type(template).__name__
        if name not in OPTIMIZERS or OPTIMIZERS[name][0] is not type(template):
            raise TypeError(f"optimizer {name} is not supported remotely (supported: {sorted(OPTIMIZERS)})")
        self.worker = worker
        self._template = template
        self._name = name
        self._remote_id: int | None = None
        self._module: ModulePointer | None = None
        #: the reply future of the last creation sent (a use that comes before it is answered waits for it)
        self._creating: asyncio.Future[Any] | None = None

    async def zero_grad(self, set_to_none: bool = True) -> None:
        await self.worker.request("optim_zero_grad", {"obj": await self.remote_id(), "set_to_none": set_to_none})

    async def step(self) -> None:
        obj_id = await self.remote_id()
        if self._module is not None:  # a write of its model being sent: the step comes after all of it
            await self._module.settled()
        await self.worker.request("optim_step", {"obj": obj_id})

    async def remote_id(self) -> int:
        """The optimizer's object id on its worker, made there first if it is not yet (after the model it
        trains was sent, or sent anew): ``ModulePointer.fit(optimizer=...)`` names it in its request."""
        module, index = self._find_module()
        creating = self._creating
        if creating is not None and not creating.done():  # another use's creation is under way: its outcome
            with contextlib.suppress(Exception):  # first, as in a sequential run (a failure is that use's to tell)
                await asyncio.shield(creating)
        if self._remote_id is not None and self._module is module:
            return self._remote_id
        allowed = OPTIMIZERS[self._name][1]
        groups = []
        for group in self._template.param_groups:
            hyper = {k: _plain(v) for k, v in group.items() if k in allowed and v is not None}
            groups.append({"params": [index[id(p)] for p in group["params"]], **hyper})
        obj_id = self.worker.new_id()
        created = self.worker.submit("optim_create", {"out": obj_id, "cls": self._name, "module": module.id,
                                                      "groups": groups})
        # known before the reply: a use that comes meanwhile (another coroutine's, or a retry after this
        # one was cancelled) waits for it and runs on this optimizer, instead of making a second one the
        # client would never free; if the creation fails, that use tries again, as it would in turn
        self._remote_id, self._module, self._creating = obj_id, module, created
        created.add_done_callback(lambda future: self._forget_unless_made(obj_id, future))
        await self.worker.wait_reply(asyncio.shield(created))
        return obj_id

    def _forget_unless_made(self, obj_id: int, created: "asyncio.Future[Any]") -> None:
        """The next use makes the optimizer anew if this creation failed (or never got its answer)."""
        failed = created.cancelled() or created.exception() is not None or not created.result().ok
        if failed and self._remote_id == obj_id:
            self._remote_id = self._module = None

    def _find_module(self) -> tuple[ModulePointer, dict[int, int]]:
        wanted = {id(p) for group in self._template.param_groups for p in group["params"]}
        for local, pointer in self.worker.sent_modules():
            index = {id(p): i for i, p in enumerate(local.parameters())}
            if wanted <= index.keys():
                return pointer, index
        raise FedzmqError(f"the model this optimizer trains was not sent to {self.worker.id!r}: "
                          "await worker.send(model) first")


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


class Optims:
    """One remote optimizer per worker, all copies of one local template."""

    def __init__(self, workers: Iterable[RemoteWorker], optim: torch.optim.Optimizer) -> None:
        self._optims = {w.id: RemoteOptimizer(w, optim) for w in workers}

    def get_optim(self, worker: RemoteWorker | str) -> RemoteOptimizer:
        key = worker if isinstance(worker, str) else worker.id
        try:
            return self._optims[key]
        except KeyError:
            raise KeyError(f"no optimizer for worker {key!r}; known: {sorted(map(str, self._optims))}") from None
