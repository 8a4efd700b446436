"""Turns of a local model: one ``get`` that lands in it at a time, and no send that reads it meanwhile; sends
to different workers share it (they only read), a worker's own sends go one at a time.

A send streams the model's local tensors as they are, across awaits, and a ``get`` lands a worker's copy in
them piece by piece: a send beside a get of the same local model read a model part old, part new, and the
worker it went to kept it torn. The local model is one object for every worker the process talks to (a get
from bob beside a send to alice tore alice's copy), so its turn is kept with the model, not with a worker:
in a table keyed weakly by the model (a model nobody holds has no turn left) within its event loop (a turn
is an asyncio future, which belongs to one loop). It is process-wide state, as the model it guards is.

Sends to two workers do not wait for each other: a federation's first round sends the model to every worker
at once, and one send that waited for another's went behind a stopped worker until it was declared dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import AsyncGenerator

from torch import nn


class ModelTurn:
    """What holds one local model now: a ``get`` landing in it, or the sends reading it (one per worker);
    and how many gets wait for it (sends that start meanwhile wait behind them: else sends to workers in
    turn, each overlapping the next, kept a get out for ever)."""

    __slots__ = ("get", "sends", "gets_waiting")

    def __init__(self) -> None:
        self.get: asyncio.Future[None] | None = None
        self.sends: dict[object, asyncio.Future[None]] = {}
        self.gets_waiting = 0

    def blocking(self, sending_to: object | None) -> asyncio.Future[None] | None:
        """What a send to ``sending_to`` (a get: None) must wait for first, if anything."""
        if self.get is not None:
            return self.get
        if sending_to is None or self.gets_waiting:  # a get waits for every send, and so does a send behind a get
            return next(iter(self.sends.values()), None)
        return self.sends.get(sending_to)  # a send waits for the last send to the same worker only


Turns = weakref.WeakKeyDictionary[nn.Module, ModelTurn]

#: per event loop, the turn each local model is in (resolved when it ends, however it ends)
_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Turns] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def model_turn(module: nn.Module, sending_to: object | None = None) -> AsyncGenerator[None, None]:
    """Hold ``module``'s turn for the block: a ``get`` into it (``sending_to`` None) waits for every other
    send and get of it, to and from any worker; a send to ``sending_to`` waits for a get, and for another
    send to the same worker."""
    loop = asyncio.get_running_loop()
    turns = _TURNS.setdefault(loop, weakref.WeakKeyDictionary())
    waiting = turns.setdefault(module, ModelTurn()) if sending_to is None else None  # kept while a get waits
    if waiting is not None:
        waiting.gets_waiting += 1
    try:
        while (under_way := turns.get(module, ModelTurn()).blocking(sending_to)) is not None:
            await asyncio.shield(under_way)
    finally:
        if waiting is not None:
            waiting.gets_waiting -= 1
    turn = turns.setdefault(module, ModelTurn())
    done: asyncio.Future[None] = loop.create_future()
    if sending_to is None:
        turn.get = done
    else:
        turn.sends[sending_to] = done
    try:
        yield
    finally:
        if sending_to is None:
            turn.get = None
        else:
            del turn.sends[sending_to]
        if turn.get is None and not turn.sends and not turn.gets_waiting:
            del turns[module]
        done.set_result(None)


__all__ = ["ModelTurn", "model_turn"]
