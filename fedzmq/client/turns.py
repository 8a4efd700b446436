"""Turns of a local model: one send that reads it, or one ``get`` that lands in it, at a time, whatever the
workers.

A send streams the model's local tensors as they are, across awaits, and a ``get`` lands a worker's copy in
them piece by piece: a send beside a get of the same local model read a model part old, part new, and the
worker it went to kept it torn. The local model is one object for every worker the process talks to (a get
from bob beside a send to alice tore alice's copy), so its turn is kept with the model, not with a worker:
in a table keyed weakly by the model (a model nobody holds has no turn left) within its event loop (a turn
is an asyncio future, which belongs to one loop). It is process-wide state, as the model it guards is.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import AsyncGenerator

from torch import nn

Turns = weakref.WeakKeyDictionary[nn.Module, "asyncio.Future[None]"]

#: per event loop, the turn each local model is in (resolved when it ends, however it ends)
_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Turns] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def model_turn(module: nn.Module) -> AsyncGenerator[None, None]:
    """Hold ``module``'s turn for the block: other sends and gets of it, to and from any worker, wait."""
    loop = asyncio.get_running_loop()
    turns = _TURNS.setdefault(loop, weakref.WeakKeyDictionary())
    while (under_way := turns.get(module)) is not None:
        await asyncio.shield(under_way)
    done: asyncio.Future[None] = loop.create_future()
    turns[module] = done
    try:
        yield
    finally:
        del turns[module]
        done.set_result(None)


__all__ = ["model_turn"]
