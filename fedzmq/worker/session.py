"""A client's sessions on the worker: its objects, its quota and its taint record, and its queue.

A ``Peer`` is one client connection (a ZeroMQ routing id): it has one session with the daemon itself
and, on a daemon hosting many logical clients (``--clients-from``), one with each logical client it
addresses. Liveness is the peer's: any message from it keeps all its sessions alive.

A session composes three records that change together and are tested apart: the ``ObjectTable``
(what each id names), the ``Quota`` (one sum of the bytes it makes the daemon hold) and the
``TaintRecord`` (what its storages were computed from). Ending a session frees everything in it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..budget import Budget
from ..codec import Request
from ..eager import Started
from ..outbox import Outbox
from .datasets import Dataset
from .graphs import GraphLedger
from .kept import KeptReads
from .objects import HostedModule, ObjectTable, extra_bytes, gradient_rooms, tensors_of
from .quota import Quota
from .replies import RepliesOwed
from .taint import TaintRecord


#: what one autograd node holds beside what it saves (measured: about 550 bytes, counted per aten call,
#: which is at least one node)
GRAPH_NODE_BYTES = 640


@dataclass(eq=False)
class Peer:
    """One client connection: its routing id, the key it authenticated with, when it was last heard
    from, the heartbeat interval it announced, and its sessions (by logical client; None: the daemon)."""

    key: bytes
    #: the CurveZMQ public key the connection authenticated with (None without keys)
    user: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    #: the heartbeat interval the client announced: a client silent for many of them is gone
    interval: float | None = None
    #: the biggest piece the client said it reads (its ``Limits.chunk_bytes``): replies' tensors past it
    #: go as streams (``Session.reply_chunk``)
    chunk_bytes: int | None = None
    sessions: dict[str | None, "Session"] = field(default_factory=dict)
    #: what it has been sent and may not have read (``fedzmq.worker.replies``): it outlives its sessions
    replies: RepliesOwed = field(default_factory=RepliesOwed)

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    @property
    def idle(self) -> bool:
        """No session has work, and no tracked reply waits to leave: a connection that has not read
        what it was sent is not expired or evicted (what it owes would be nobody's account)."""
        return all(s.idle for s in self.sessions.values()) and not self.replies.pending()

    @property
    def empty(self) -> bool:
        return all(s.empty for s in self.sessions.values())


@dataclass
class StartedCommand:
    """A command that was run at once and then waited: the rest of it, for the session's task to await."""

    request: Request
    rest: Started[bool]


@dataclass(eq=False)
class Session:
    key: bytes
    #: the CurveZMQ public key the session authenticated with (None without keys)
    user: str | None = None
    #: the logical client this session talks to (None: the daemon itself), and its datasets
    client: str | None = None
    datasets: dict[str, Dataset] = field(default_factory=dict)
    max_objects: int = 100_000
    max_bytes: int = 8 << 30
    table: ObjectTable = field(init=False)
    quota: Quota = field(init=False)
    #: model entries replies reported as streams, kept as they were until read (``fedzmq.worker.kept``)
    kept: KeptReads = field(init=False)
    #: the autograd nodes its stored tensors keep alive, each charged to one of them, and the leaves their
    #: graphs reach, charged to all of them
    graphs: GraphLedger = field(init=False)
    taint: TaintRecord = field(default_factory=TaintRecord)
    #: secure-aggregation rounds under way (fedzmq.worker.secure)
    secure_rounds: dict[int, Any] = field(default_factory=dict)
    #: the data holders whose rows any fit of this session read (``""``: the daemon's own datasets; else
    #: a hosted client). Every masked update the session gives counts one round for each of them
    #: (``fedzmq.worker.ledger``): values can move between the session's objects without a fit (a load
    #: of one model's outputs into another), so a model's own fits would not say whose rows it holds
    trained_by: set[str] = field(default_factory=set)
    #: commands to run in order; a command that started at once and then waited (``fedzmq.eager``);
    #: None: the session ended
    queue: asyncio.Queue[Request | StartedCommand | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    #: the session's task waits for a command with none queued: the next one may run at once
    parked: bool = False
    #: the id of the request being worked on, if any (reported in heartbeats), and its budget
    running: int | None = None
    budget: Budget | None = None
    #: the highest request id this session finished (heartbeats report it, so a client can tell a
    #: reply lost in a reconnect from one still to come)
    last_done: int = 0
    #: the connection this session belongs to (its liveness is the peer's)
    peer: Peer | None = None
    #: this session's identity: a client that sees it change knows its objects are gone
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: replies waiting to leave together (``fedzmq.outbox``); set by the server that made the session
    outbox: Outbox | None = None
    #: the session is answering its ``close``: its last replies carry what its connection owes
    #: (``Worker._transmit``), so the connection is not forgotten before they have left
    closing: bool = False
    #: frees what the session lets go of (``fedzmq.worker.reaper``, off the event loop); None: at once
    free: Callable[[list[Any]], None] | None = None

    def __post_init__(self) -> None:
        self.table = ObjectTable(self.max_objects)
        self.quota = Quota(self.max_bytes)
        self.graphs = GraphLedger(self.quota)
        self.kept = KeptReads(self.quota)

    def reply_chunk(self, chunk_bytes: int) -> int:
        """The biggest tensor a reply to this session carries in one piece: the worker's ``chunk_bytes``, or
        less if the client said it reads less (``ping``'s ``chunk_bytes``: a client with a smaller
        ``max_frame_bytes`` refused every reply between the two, and could name none of them)."""
        peer = self.peer
        return chunk_bytes if peer is None or peer.chunk_bytes is None else min(chunk_bytes, peer.chunk_bytes)

    @property
    def idle(self) -> bool:
        """Nothing to run and nothing on its way: a session whose uncopied replies ZeroMQ still holds is
        not idle, so it is not expired or evicted while they pin memory charged to it."""
        return self.running is None and self.queue.empty() and not self.quota.unsent()

    @property
    def empty(self) -> bool:
        """Holds nothing: evicting it loses the client nothing but its session id."""
        return not self.table.objects and not self.table.failures and not self.secure_rounds

    def put(self, obj_id: int, value: Any, made_nodes: int | None = None, inputs: Iterable[int] = ()) -> None:
        """Store an object, within the session's object and byte quotas. A tensor with an autograd graph
        (``made_nodes`` not None) made with ``made_nodes`` nodes from the stored tensors ``inputs`` is
        charged ``GRAPH_NODE_BYTES`` a node, and holds the leaves its graph reaches
        (``fedzmq.worker.graphs``)."""
        self.table.check_new(obj_id)
        tensors, gradients, extra = tensors_of(value), gradient_rooms(value), extra_bytes(value)
        if made_nodes is None:
            self.quota.check(extra + self.quota.new_bytes(tensors, gradients), f"storing object {obj_id}")
            self.table.add(obj_id, value)
            self.quota.hold(obj_id, tensors, extra, gradients)
            return
        extra += GRAPH_NODE_BYTES * made_nodes
        leaves = self.graphs.leaves_of(value)
        self.quota.check(extra + self.quota.new_bytes(tensors) + self.graphs.new_bytes(leaves),
                         f"storing object {obj_id} (its autograd graph's {made_nodes} nodes and leaves)")
        self.table.add(obj_id, value)
        self.graphs.add(obj_id, made_nodes, inputs, value, leaves)
        self.quota.hold(obj_id, tensors, extra)

    def delete(self, obj_ids: list[int]) -> int:
        """Delete objects, and with a module the optimizers over it: they would keep its parameters
        alive, uncounted, where no command can reach them."""
        modules = {i for i in obj_ids if isinstance(self.table.objects.get(i), HostedModule)}
        if modules:
            obj_ids = list(obj_ids) + [i for i in self.table.optimizers_over(modules) if i not in obj_ids]
        deleted = 0
        for obj_id in obj_ids:  # (a delete that frees much runs on a torch thread: ``costly_to_free``)
            deleted += self.table.pop(obj_id)
            self.quota.drop(obj_id)
            self.taint.released.discard(obj_id)
            heir = self.graphs.remove(obj_id)
            if heir is not None:  # its graph's nodes live on through a tensor computed from it: charged there
                nodes = GRAPH_NODE_BYTES * self.graphs.nodes[heir]
                self.quota.recharge(heir, extra_bytes(self.table.objects[heir]) + nodes)
        self.kept.forget(obj_ids)
        return deleted

    def recount(self, obj_id: int) -> None:
        """Charge an object anew after it grew in place (an optimizer's state after a step)."""
        value = self.table.objects.get(obj_id)
        if value is not None:
            self.quota.recharge(obj_id, extra_bytes(value))

    def clear(self) -> None:
        """End the session's holdings: its running command is stopped at its next check, and its objects
        are uncharged and let go."""
        if self.budget is not None:
            self.budget.cancel("its session ended")
        held = [*self.table.objects.values(), *self.secure_rounds.values(), *self.kept.clear()]
        self.table.clear()
        self.graphs.clear()
        self.quota.clear()
        self.taint.clear()
        self.secure_rounds.clear()
        self.let_go(held)

    def let_go(self, objects: list[Any]) -> None:
        """Drop the last references the session held to ``objects``: on the reaper's thread when the server
        gave one (freeing a thousand optimizers' state held the event loop 3 s), else here."""
        if self.free is not None:
            self.free(objects)
        else:
            objects.clear()


__all__ = ["GRAPH_NODE_BYTES", "Peer", "Session", "StartedCommand"]
