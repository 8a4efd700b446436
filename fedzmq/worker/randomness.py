"""An in-process worker's random numbers: a generator state of its own, never its caller's stream.

torch's dropout (and any module that draws without a ``generator=``) draws from the process's one default
CPU generator. A daemon owns its process, so that generator is the daemon's. A ``VirtualWorker`` runs the
daemon's code in its caller's process: a remote dropout drawn between a coroutine's seeded draws moved the
caller's stream, and the worker's masks depended on what the caller had drawn, so the same code gave other
numbers on a virtual worker than sequentially or on a daemon (docs/api.md promises the same).

``OwnGenerator`` keeps the in-process worker's state apart: a command that may draw (``may_draw``) runs with
it swapped into the default generator and the caller's put back after. It starts at torch's fixed default
seed (a fresh ``torch.Generator()``), so every fresh virtual worker draws the same masks. The swap is only sound
while nothing else runs in the process: such a command runs on the event loop's thread (``Executor``), where
its caller's coroutines cannot run meanwhile; on a torch thread, a coroutine drawing at the same time would
take the worker's numbers.

A fit draws from a state seeded from its own seed (``seeded_draws``, mixed with the owner's shuffle secret as
its shuffle is), on daemons and in-process workers alike: the same fit trains the same model whatever ran
before it. torch seeds a process's generator at random when it starts, so without this two runs of one
federation on fresh daemons differed from their first dropout mask. On a daemon, commands that may draw
run on its torch threads and take turns on ``GENERATOR_TURN`` (a process has one default generator), so
a fit's seeded stream is not drawn from by another session meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from types import TracebackType
from typing import AsyncIterator, Iterator

import torch

from ..commands import Command
from ..modeldesc import draws_random
from ..ops import SCHEMAS
from .binding import Binding
from .objects import HostedModule

#: commands that run a model's forward, and the argument naming the model: they may draw when the model does
#: (``fedzmq.modeldesc.draws_random``: dropout, or an owner's registered module)
FORWARD_COMMANDS = {"module_call": "obj", "fit": "module", "evaluate": "module"}
#: the commands that may draw at all: ``may_draw`` answers for the others without being called
MAY_DRAW = frozenset({"op", *FORWARD_COMMANDS})


def may_draw(command: Command, binding: Binding) -> bool:
    """Whether running ``binding`` may draw random numbers from the process's default generator: an op whose
    schema says it draws, or a forward of a model that may."""
    if command.name == "op":
        schema = SCHEMAS.get(binding.args["op"])
        return schema is not None and schema.draws_random
    role = FORWARD_COMMANDS.get(command.name)
    return role is not None and module_draws(binding.objects[role])


def module_draws(hosted: HostedModule) -> bool:
    """Whether a forward of the hosted model may draw (found once: a built model's layers do not change)."""
    if hosted.draws is None:
        hosted.draws = draws_random(hosted.module)
    return hosted.draws


#: the turn of the process's one default generator among a daemon's torch threads (the process's, as the
#: generator is: two workers embedded in one process share both)
GENERATOR_TURN = threading.Lock()


@contextlib.asynccontextmanager
async def generator_turn_on_the_loop() -> AsyncIterator[None]:
    """``GENERATOR_TURN`` held by the event loop's thread for the block, for an in-process worker's command
    that swaps its own state into the default generator there (``OwnGenerator``). An embedded daemon engine
    in the same process (``fz.Worker(in_process=False)``) draws a seeded fit on a torch thread in that turn:
    a swap in the middle of it made each draw from the other's stream. The turn may be held for a whole fit,
    so it is waited for on a thread of its own, never by blocking the loop, nor on the loop's default
    executor: waiters there took all its threads, and the coordinator's own work (a download's landing
    copies) waited for the fit too (h38)."""
    if not GENERATOR_TURN.acquire(blocking=False):
        loop = asyncio.get_running_loop()
        taken: asyncio.Future[None] = loop.create_future()
        taker = TurnTaker()
        threading.Thread(target=taker.take, args=(loop, taken), name="fedzmq-generator-turn", daemon=True).start()
        try:
            await taken
        except BaseException:
            taker.abandon()
            raise
    try:
        yield
    finally:
        GENERATOR_TURN.release()


class TurnTaker:
    """Takes ``GENERATOR_TURN`` on a thread for a waiter on the loop that may leave first (cancelled, by its
    caller or by ``asyncio.run`` ending): the turn is then given back by whichever side comes last, on its
    own thread, without a callback that needs the loop to run again."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._taken = self._abandoned = False

    def take(self, loop: asyncio.AbstractEventLoop, taken: "asyncio.Future[None]") -> None:
        """Take the turn, then tell the waiter on ``loop`` (``taken``), unless it left already."""
        GENERATOR_TURN.acquire()
        with self._guard:
            if self._abandoned:
                GENERATOR_TURN.release()
                return
            self._taken = True
        try:
            loop.call_soon_threadsafe(_resolve, taken)
        except RuntimeError:  # the loop closed: its waiter is closed with it, and ``abandon`` gives the turn back
            pass

    def abandon(self) -> None:
        with self._guard:
            self._abandoned = True
            if self._taken:
                GENERATOR_TURN.release()


def _resolve(taken: "asyncio.Future[None]") -> None:
    if not taken.done():  # (cancelled meanwhile: its waiter abandons the turn)
        taken.set_result(None)


def draws_seed(shuffle_seed: int) -> int:
    """The seed of a fit's draws (dropout), made from the seed of its shuffle: as secret, not the same."""
    digest = hashlib.sha256(b"fedzmq fit draws:" + shuffle_seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


#: torch's CPU generator state (``get_state``): the seed (8 bytes), ``left`` and ``seeded`` (4 each), ``next`` (8),
#: then Mersenne Twister's 624 words, each in 8 bytes (and the normal samples' cache after them)
_MT_WORDS, _MT_OFFSET = 624, 24


def generator_state(seed: int) -> torch.Tensor:
    """The CPU generator's state for ``seed``, every one of Mersenne Twister's 624 words drawn from all of
    its bits. ``manual_seed`` keeps a seed's low 32 bits (seeds 7 and 7 + 2**32 draw alike): seeded through
    it, a fit's dropout masks came from 2^32 streams whatever its 63-bit seed, so two fits of one client
    could be given the same masks. The rest of the state is a freshly seeded generator's: its next draw
    starts from these words."""
    state = torch.Generator().manual_seed(seed & 0xFFFF_FFFF).get_state()
    words = hashlib.shake_256(b"fedzmq generator state:" + seed.to_bytes(8, "little")).digest(4 * _MT_WORDS)
    slots = state[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS].view(torch.int64)
    slots.copy_(torch.frombuffer(bytearray(words), dtype=torch.int32).to(torch.int64) & 0xFFFF_FFFF)
    return state


@contextlib.contextmanager
def seeded_draws(seed: int) -> Iterator[None]:
    """The default generator in ``seed``'s state (``generator_state``) for the block, and as it was after it."""
    generator = torch.default_generator
    saved = generator.get_state()
    generator.set_state(generator_state(seed))
    try:
        yield
    finally:
        generator.set_state(saved)


class OwnGenerator:
    """A default-generator state of the worker's own, swapped in for the ``with`` block (not re-entrant: one
    command at a time runs under it, on the event loop's thread)."""

    __slots__ = ("_state", "_callers")

    def __init__(self) -> None:
        self._state = torch.Generator().get_state()  # torch's fixed default seed (a process's is drawn at random)
        self._callers: torch.Tensor | None = None

    def __enter__(self) -> None:
        generator = torch.default_generator
        self._callers = generator.get_state()
        generator.set_state(self._state)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        generator = torch.default_generator
        self._state = generator.get_state()
        assert self._callers is not None
        generator.set_state(self._callers)
        self._callers = None


__all__ = ["FORWARD_COMMANDS", "GENERATOR_TURN", "MAY_DRAW", "OwnGenerator", "TurnTaker", "draws_seed",
           "generator_state", "generator_turn_on_the_loop", "may_draw", "module_draws", "seeded_draws"]
